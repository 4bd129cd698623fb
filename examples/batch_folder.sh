#!/usr/bin/env bash
# Colourise a whole folder of photos (family albums, archive scans) with `lcad colorize`.
#
#   examples/batch_folder.sh MODEL INPUT_DIR OUTPUT_DIR [PROMPTS_FILE]
#
# - INPUT_DIR is searched recursively; outputs mirror its subfolders under OUTPUT_DIR, at each photo's own size, as
#   PNG. INPUT_DIR is only read. Files that are not images are ignored; broken images are reported and skipped.
# - PROMPTS_FILE (optional) describes photos one by one, e.g. a CSV:
#       file,prompt
#       wedding/1962_church.jpg,"a bride in a white dress, a red carpet"
#       holiday/beach.tif,a blue sea under a blue sky
#   Photos it does not name are colourised without a description (automatically).
# - Each photo's seed comes from --seed and its path, so a rerun gives the same files; a rerun also skips the photos
#   already done, so an interrupted run is resumed by running this again. OUTPUT_DIR/lcad_run.json records the
#   settings of every run.
#
# Settings through the environment: STEPS (default 30), SCHEDULER (default dpm++, good results in few steps),
# SEED (default 0), GUIDANCE (default 5). The exit status is lcad's: 0 all done, 1 some photos failed, 2 a usage
# problem (nothing written).
set -euo pipefail

if [ "$#" -lt 3 ] || [ "$#" -gt 4 ]; then
  echo "usage: $0 MODEL INPUT_DIR OUTPUT_DIR [PROMPTS_FILE]" >&2
  exit 2
fi
model=$1
input_dir=$2
output_dir=$3

args=(colorize "$input_dir" -o "$output_dir" --model "$model"
      --steps "${STEPS:-30}" --scheduler "${SCHEDULER:-dpm++}" --seed "${SEED:-0}" --guidance "${GUIDANCE:-5}")
if [ "$#" -eq 4 ]; then
  args+=(--prompts "$4")
fi

status=0
lcad "${args[@]}" || status=$?

if [ "$status" -eq 1 ]; then
  echo "Some photos failed (listed above and in $output_dir/lcad_run.json); the others are in $output_dir." >&2
fi
exit "$status"
