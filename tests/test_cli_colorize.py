"""`lcad colorize` on folders, against a tiny pipeline saved by the test (2 denoising steps, CPU).

What users rely on: outputs mirror the input tree at the inputs' sizes, broken files are reported and the rest is
done, the exit status says whether anything failed, inputs are never touched, reruns skip finished work, and a
seed reproduces the files exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lcad_pipeline import cli_colorize
from lcad_pipeline.cli import main
from lcad_pipeline.cli_colorize import UsageError, image_seed, load_prompts_file, match_prompt_entries
from tiny_models import make_tiny_pipeline

SUMMARY = re.compile(r"(\d+) done, (\d+) skipped \(existing\), (\d+) ignored \(not images\), (\d+) failed")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny-lcad"
    make_tiny_pipeline().save_pretrained(path)
    return path


def _photo(seed: int, size: tuple[int, int], mode: str) -> Image.Image:
    """A smooth random picture (width, height), so JPEG keeps it recognisable."""
    rng = np.random.default_rng(seed)
    small = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC).convert(mode)


@pytest.fixture
def photos(tmp_path) -> Path:
    """Three photos (one in a subfolder), a corrupt .jpg and a .txt file."""
    folder = tmp_path / "photos"
    (folder / "holiday").mkdir(parents=True)
    _photo(0, (45, 60), "L").save(folder / "grandma.jpg")
    _photo(1, (52, 40), "RGB").save(folder / "garden.png")
    _photo(2, (37, 29), "L").save(folder / "holiday" / "beach.jpg")
    (folder / "scan_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    (folder / "notes.txt").write_text("grandma, 1952\n")
    return folder


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    } | {p.relative_to(folder).as_posix() + "/": ("dir", 0) for p in folder.rglob("*") if p.is_dir()}


def _colorize(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(["colorize", *argv, "--steps", "2", "--no-progress"])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _summary(out: str) -> tuple[int, int, int, int]:
    found = SUMMARY.findall(out)
    assert len(found) == 1, out
    return tuple(int(n) for n in found[0])


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_folder_run_outputs_failures_and_rerun(photos, model_dir, tmp_path, capsys):
    before = _snapshot(photos)
    out = tmp_path / "colourised"

    status, stdout, stderr = _colorize(capsys, str(photos), "-o", str(out), "--model", str(model_dir), "--prompt", "a red car")

    assert status == 1  # the corrupt file failed
    assert _summary(stdout) == (3, 0, 1, 1)
    assert "scan_broken.jpg" in stderr and "failed" in stderr
    assert "notes.txt" in stderr  # listed as ignored
    expected = {"grandma.png": (45, 60), "garden.png": (52, 40), "holiday/beach.png": (37, 29)}
    assert sorted(_bytes(out)) == sorted(expected)
    for name, size in expected.items():
        with Image.open(out / name) as image:
            assert image.size == size and image.mode == "RGB"
            rgb = np.asarray(image).astype(int)
            assert np.abs(rgb[..., 0] - rgb[..., 1]).max() > 0  # colour, not grey
    assert not (out / "scan_broken.png").exists() and not list(out.rglob("*.partial"))
    assert _snapshot(photos) == before  # the input folder is untouched

    record = json.loads((out / "lcad_run.json").read_text())
    (run,) = record["runs"]
    assert run["settings"]["steps"] == 2 and run["settings"]["seed"] == 0 and run["settings"]["prompt"] == "a red car"
    assert run["summary"] == {"done": 3, "skipped": 0, "ignored": 1, "failed": 1}
    files = {f["output"]: f for f in run["files"] if "output" in f}
    assert files["holiday/beach.png"]["seed"] == image_seed(0, "holiday/beach.jpg")
    assert files["scan_broken.png"]["status"] == "failed" and files["scan_broken.png"]["error"]
    assert run["command"].startswith("lcad colorize ") and "--seed 0" in run["command"]

    # A second run skips the finished outputs and leaves them as they are.
    first = {name: (out / name).stat().st_mtime_ns for name in expected}
    status, stdout, _ = _colorize(capsys, str(photos), "-o", str(out), "--model", str(model_dir), "--prompt", "a red car")
    assert status == 1 and _summary(stdout) == (0, 3, 1, 1)
    assert {name: (out / name).stat().st_mtime_ns for name in expected} == first
    assert len(json.loads((out / "lcad_run.json").read_text())["runs"]) == 2  # both runs recorded
    assert _snapshot(photos) == before


def test_same_seed_same_files_and_seed_independent_of_other_files(photos, model_dir, tmp_path, capsys):
    (photos / "scan_broken.jpg").unlink()
    common = ["--model", str(model_dir), "--prompt", "a blue sky"]
    runs = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        status, stdout, _ = _colorize(capsys, str(photos), "-o", str(tmp_path / name), "--seed", seed, *common)
        assert status == 0 and _summary(stdout) == (3, 0, 1, 0)
        runs[name] = _bytes(tmp_path / name)
    assert runs["a"] == runs["b"]  # same seed: identical files
    assert all(runs["a"][k] != runs["c"][k] for k in runs["a"])  # another seed: other colours

    # The seed depends on the image's relative path only: alone in its folder, beach.jpg comes out the same.
    alone = tmp_path / "alone"
    (alone / "holiday").mkdir(parents=True)
    (alone / "holiday" / "beach.jpg").write_bytes((photos / "holiday" / "beach.jpg").read_bytes())
    status, _, _ = _colorize(capsys, str(alone), "-o", str(tmp_path / "d"), "--seed", "3", *common)
    assert status == 0
    assert (tmp_path / "d" / "holiday" / "beach.png").read_bytes() == runs["a"]["holiday/beach.png"]

    # --overwrite redoes existing outputs (and gives the same bytes again).
    status, stdout, _ = _colorize(capsys, str(photos), "-o", str(tmp_path / "a"), "--seed", "3", "--overwrite", *common)
    assert status == 0 and _summary(stdout) == (3, 0, 1, 0)
    assert _bytes(tmp_path / "a") == runs["a"]


def test_prompts_file_formats_schedulers_and_files_given_directly(photos, model_dir, tmp_path, capsys):
    (photos / "scan_broken.jpg").unlink()
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"holiday/beach.jpg": "a yellow tree", "grandma.jpg": {"prompt": "a green cup", "seed": 11}}))
    out = tmp_path / "out"
    status, stdout, _ = _colorize(
        capsys, str(photos), "-o", str(out), "--model", str(model_dir), "--prompts", str(prompts),
        "--prompt", "a red car", "--format", "same", "--scheduler", "dpm++", "--resolution", "24",
    )
    assert status == 0 and _summary(stdout) == (3, 0, 1, 0)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "garden.png", "grandma.jpg", "holiday/beach.jpg", "lcad_run.json",
    ]
    run = json.loads((out / "lcad_run.json").read_text())["runs"][0]
    by_input = {Path(f["input"]).name: f for f in run["files"] if f["status"] != "ignored"}
    assert by_input["beach.jpg"]["prompt"] == "a yellow tree"
    assert by_input["grandma.jpg"]["prompt"] == "a green cup" and by_input["grandma.jpg"]["seed"] == 11
    assert by_input["garden.png"]["prompt"] == "a red car"  # --prompt for images the file does not name
    assert run["settings"]["scheduler"] == "dpm++" and run["settings"]["resolution"] == 24

    # Files named directly: output named after the file; the prompt really reaches the pipeline.
    grandma = photos / "grandma.jpg"
    outputs = {}
    for name, prompt in (("p1", "a red car"), ("p2", "a green tree")):
        status, _, _ = _colorize(capsys, str(grandma), "-o", str(tmp_path / name), "--model", str(model_dir), "--prompt", prompt)
        assert status == 0
        outputs[name] = (tmp_path / name / "grandma.png").read_bytes()
    assert outputs["p1"] != outputs["p2"]


def test_exif_rotation_is_applied_so_the_output_matches_what_viewers_show(model_dir, tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated by 90 degrees
    _photo(3, (40, 24), "L").save(folder / "rotated.jpg", exif=exif)
    status, _, _ = _colorize(capsys, str(folder), "-o", str(tmp_path / "out"), "--model", str(model_dir))
    assert status == 0
    with Image.open(tmp_path / "out" / "rotated.png") as image:
        assert image.size == (24, 40)


@pytest.fixture(scope="module")
def tiny_pipe():
    return make_tiny_pipeline()


@pytest.mark.parametrize("name", sorted(cli_colorize.SCHEDULERS))
def test_every_scheduler_name_samples(name, tiny_pipe):
    from diffusers import DDIMScheduler

    from lcad_pipeline import LCADPipeline

    pipe = tiny_pipe
    released = DDIMScheduler(**LCADPipeline.default_scheduler_config()).config
    pipe.scheduler = cli_colorize.make_scheduler(name, released)
    assert type(pipe.scheduler).__name__ == cli_colorize.SCHEDULERS[name][0]
    image = pipe(_photo(4, (20, 16), "L"), "a red car", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 20, 3) and np.isfinite(image).all()


def test_command_line_problems_stop_before_any_work(photos, model_dir, tmp_path, capsys):
    before = _snapshot(photos)
    model = ["--model", str(model_dir)]
    cases = [
        ([str(photos), "-o", str(photos / "out"), *model], "inside the input folder"),
        ([str(photos), "-o", str(photos), *model], "inside the input folder"),
        ([str(photos / "grandma.jpg"), "-o", str(photos), *model], "folder of the input"),
        ([str(tmp_path / "missing"), "-o", str(tmp_path / "o1"), *model], "no such file or folder"),
        ([str(photos), "-o", str(tmp_path / "o2"), "--model", str(tmp_path / "nomodel")], "--model"),
        ([str(photos), "-o", str(tmp_path / "o3"), *model, "--device", "cpu", "--dtype", "float16"], "--dtype float16"),
        ([str(photos), "-o", str(tmp_path / "o4"), *model, "--prompts", str(tmp_path / "none.json")], "--prompts"),
        ([str(photos), "-o", str(tmp_path / "o5"), *model, "--auto-masks"], "--auto-masks needs --sam-checkpoint"),
    ]
    for argv, message in cases:
        status, _, stderr = _colorize(capsys, *argv)
        assert status == 2, argv
        assert message in stderr, (argv, stderr)
    assert _snapshot(photos) == before
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))

    # Two inputs that would be written to the same output.
    (photos / "grandma.png").write_bytes((photos / "garden.png").read_bytes())
    status, _, stderr = _colorize(capsys, str(photos), "-o", str(tmp_path / "o6"), *model)
    assert status == 2 and "would both be written to" in stderr

    for flag in (["--steps", "0"], ["--scheduler", "nope"], ["--guidance", "-1"], ["--format", "gif"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["colorize", str(photos), "-o", str(tmp_path / "o7"), *model, *flag])
        assert exit_info.value.code == 2
        assert flag[0] in capsys.readouterr().err


def test_prompts_file_parsing(tmp_path):
    (tmp_path / "cup_mask.png").write_bytes(b"")  # existence is checked when planning; content when colourising
    json_file = tmp_path / "p.json"
    json_file.write_text(
        json.dumps(
            {
                "./a.jpg": "a red car",
                "sub/b.jpg": {
                    "prompt": "a red car, a green cup",
                    "boxes": {"a red car": [1, 2, 30, 40]},
                    "points": {"a red car": [[5, 6]]},
                    "masks": {"a green cup": "cup_mask.png"},
                },
            }
        )
    )
    entries = load_prompts_file(json_file)
    assert entries["a.jpg"].prompt == "a red car" and not entries["a.jpg"].has_instances
    b = entries["sub/b.jpg"]
    assert b.boxes == {"a red car": [1.0, 2.0, 30.0, 40.0]} and b.points == {"a red car": [[5.0, 6.0]]}
    assert b.masks == {"a green cup": tmp_path / "cup_mask.png"}

    csv_file = tmp_path / "p.csv"
    csv_file.write_text(
        "file,prompt,phrase,x0,y0,x1,y1\n"
        'sub/b.jpg,"a red car, a blue sky",a red car,0,0,10,10\n'
        "sub/b.jpg,,a blue sky,0,10,20,20\n"
        "a.jpg,a green tree,,,,,\n"
    )
    entries = load_prompts_file(csv_file)
    assert entries["sub/b.jpg"].prompt == "a red car, a blue sky"
    assert entries["sub/b.jpg"].boxes == {"a red car": [0, 0, 10, 10], "a blue sky": [0, 10, 20, 20]}
    assert entries["a.jpg"].prompt == "a green tree"
    headerless = tmp_path / "h.csv"
    headerless.write_text('a.jpg,"a red car, a blue sky"\nb.png,a cup\n')
    assert {k: e.prompt for k, e in load_prompts_file(headerless).items()} == {"a.jpg": "a red car, a blue sky", "b.png": "a cup"}

    bad = {
        '{"a.jpg": {"prompt": "x", "colour": 1}}': "unknown keys",
        '{"a.jpg": {"prompt": "a cup", "boxes": {"a cup": [1, 2, 0, 5]}}}': "x1 > x0",
        '{"a.jpg": {"prompt": "a cup", "masks": {"a cup": "missing.png"}}}': "does not exist",
        '["a.jpg"]': "JSON object",
        "{not json": "not valid JSON",
    }
    for text, message in bad.items():
        json_file.write_text(text)
        with pytest.raises(UsageError, match=re.escape(message)):
            load_prompts_file(json_file)
    csv_file.write_text("a.jpg,a red car,extra\n")
    with pytest.raises(UsageError, match="two columns"):
        load_prompts_file(csv_file)


def test_prompt_names_match_relative_paths_file_names_or_paths_as_given(tmp_path):
    from lcad_pipeline.cli_colorize import PromptEntry, Task
    from pathlib import PurePosixPath

    def task(relative: str, given: str) -> Task:
        return Task(Path(given), PurePosixPath(relative), given, tmp_path / relative, 0, "", None)

    tasks = [task("a.jpg", "photos/a.jpg"), task("sub/b.jpg", "photos/sub/b.jpg"), task("x/c.jpg", "p/x/c.jpg"), task("y/c.jpg", "p/y/c.jpg")]
    entries = {"a.jpg": PromptEntry("1"), "b.jpg": PromptEntry("2"), "p/x/c.jpg": PromptEntry("3"), "zzz.jpg": PromptEntry("4")}
    assert match_prompt_entries(entries, tasks, Path("p.json")) == ["zzz.jpg"]
    assert [t.entry.prompt if t.entry else None for t in tasks] == ["1", "2", "3", None]
    for t in tasks:
        t.entry = None
    with pytest.raises(UsageError, match="matches several images"):
        match_prompt_entries({"c.jpg": PromptEntry("5")}, tasks, Path("p.json"))


def test_phrases_must_occur_in_their_description(photos, model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"grandma.jpg": {"prompt": "a red car", "boxes": {"a blue cup": [0, 0, 10, 10]}}}))
    status, _, stderr = _colorize(capsys, str(photos), "-o", str(tmp_path / "out"), "--model", str(model_dir), "--prompts", str(prompts))
    assert status == 2 and "'a blue cup' does not occur" in stderr
    assert not (tmp_path / "out").exists()


def test_a_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out" / "photo.png"
    image = _photo(5, (8, 8), "RGB")

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"half an image")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        cli_colorize.save_image_atomically(image, target, {})
    assert os.listdir(tmp_path / "out") == []


# ---------------------------------------------------------------------------------------------- phrase regions

TINY_SAM = dict(
    image_size=64, patch_size=8, prompt_embed_dim=32, window_size=0, use_rel_pos=False, mlp_ratio=2, mask_in_chans=4,
    decoder_depth=1, decoder_mlp_dim=32, decoder_num_heads=2, iou_head_depth=2, iou_head_hidden_dim=16,
    encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2, encoder_global_attn_indexes=(),
)


def test_phrase_boxes_points_and_mask_files_reach_the_pipeline(photos, model_dir, tmp_path, capsys):
    (photos / "scan_broken.jpg").unlink()
    mask = Image.new("L", (45, 60), 0)
    mask.paste(255, (20, 30, 45, 60))
    mask.save(tmp_path / "cup.png")
    with_regions = {
        "grandma.jpg": {"prompt": "a red car, a blue cup", "boxes": {"a red car": [0, 0, 20, 30]}, "masks": {"a blue cup": "cup.png"}},
        "garden.png": {"prompt": "a green tree", "points": {"a green tree": [[10, 10], [20, 20]]}},
    }
    without = {name: entry["prompt"] for name, entry in with_regions.items()}
    outputs = {}
    for name, prompts in (("regions", with_regions), ("plain", without)):
        (tmp_path / f"{name}.json").write_text(json.dumps(prompts))
        status, stdout, stderr = _colorize(
            capsys, str(photos), "-o", str(tmp_path / name), "--model", str(model_dir), "--prompts", str(tmp_path / f"{name}.json")
        )
        assert status == 0, stderr
        assert _summary(stdout) == (3, 0, 1, 0)
        outputs[name] = _bytes(tmp_path / name)
    assert outputs["regions"]["grandma.png"] != outputs["plain"]["grandma.png"]
    assert outputs["regions"]["garden.png"] != outputs["plain"]["garden.png"]
    assert outputs["regions"]["holiday/beach.png"] == outputs["plain"]["holiday/beach.png"]  # no entry: no regions
    run = json.loads((tmp_path / "regions" / "lcad_run.json").read_text())["runs"][0]
    by_output = {f["output"]: f for f in run["files"] if "output" in f}
    assert by_output["grandma.png"]["phrase_regions"] == ["a red car", "a blue cup"]
    assert by_output["garden.png"]["phrase_regions"] == ["a green tree"]
    assert "phrase_regions" not in by_output["holiday/beach.png"]


def test_sam_checkpoint_segments_boxes_and_finds_automatic_masks(photos, model_dir, tmp_path, capsys, monkeypatch):
    import torch

    from lcad_pipeline import sam_masks

    (photos / "scan_broken.jpg").unlink()
    monkeypatch.setitem(sam_masks.SAM_CONFIGS, "vit_b", TINY_SAM)  # a tiny SAM under the released name
    torch.manual_seed(0)
    checkpoint = tmp_path / "sam_vit_b_tiny.pth"
    torch.save(sam_masks.build_sam("vit_b").state_dict(), checkpoint)
    real_loader, loaded = cli_colorize.load_segmenter, []

    def permissive_loader(*args, **kwargs):  # random SAM weights pass no quality threshold
        segmenter = real_loader(*args, **kwargs)
        segmenter.pred_iou_thresh = segmenter.stability_score_thresh = 0.0
        segmenter.points_per_side, segmenter.box_nms_thresh = 6, 1.0
        loaded.append(segmenter)
        return segmenter

    monkeypatch.setattr(cli_colorize, "load_segmenter", permissive_loader)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"grandma.jpg": {"prompt": "a red car, a blue cup", "boxes": {"a red car": [0, 0, 20, 30]}}}))
    out = tmp_path / "out"
    status, stdout, stderr = _colorize(
        capsys, str(photos), "-o", str(out), "--model", str(model_dir), "--prompts", str(prompts),
        "--prompt", "a red car, a green tree", "--sam-checkpoint", str(checkpoint), "--auto-masks",
    )
    assert status == 0, stderr
    assert _summary(stdout) == (3, 0, 1, 0) and len(loaded) == 1
    run = json.loads((out / "lcad_run.json").read_text())["runs"][0]
    by_output = {f["output"]: f for f in run["files"] if "output" in f}
    assert by_output["grandma.png"]["phrase_regions"] == ["a red car"]
    assert by_output["grandma.png"]["automatic_masks"] == ["a blue cup"]
    assert by_output["garden.png"]["automatic_masks"] == ["a red car", "a green tree"]

    # The architecture comes from the file name; otherwise --sam-model-type must say it.
    renamed = tmp_path / "my_sam.pth"
    renamed.write_bytes(checkpoint.read_bytes())
    status, _, stderr = _colorize(
        capsys, str(photos), "-o", str(tmp_path / "out2"), "--model", str(model_dir), "--prompt", "a red car",
        "--sam-checkpoint", str(renamed), "--auto-masks",
    )
    assert status == 2 and "--sam-model-type" in stderr


def test_mask_options_are_refused_by_a_pipeline_without_them():
    from lcad_pipeline.cli_colorize import check_instance_support

    plain = {"image", "prompt", "generator"}
    with pytest.raises(UsageError, match="not available in this version"):
        check_instance_support(plain, needs_masks=True, needs_auto=False, needs_segmenter=False, source="--prompts 'p.json'")
    with pytest.raises(UsageError, match="--auto-masks is not available"):
        check_instance_support(plain, needs_masks=False, needs_auto=True, needs_segmenter=False, source="--prompts")
    with pytest.raises(UsageError, match="--sam-checkpoint is not available"):
        check_instance_support(plain | {"instance_masks"}, needs_masks=True, needs_auto=False, needs_segmenter=True, source="--prompts")
    check_instance_support(plain | {"instance_masks", "segmenter"}, needs_masks=True, needs_auto=True, needs_segmenter=True, source="--prompts")


def test_hidden_files_and_folders_are_left_out(model_dir, tmp_path, capsys):
    folder = tmp_path / "archive"
    (folder / ".git" / "objects").mkdir(parents=True)
    _photo(6, (20, 16), "L").save(folder / "scan.png")
    (folder / "._scan.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata, not a PNG")
    _photo(7, (20, 16), "L").save(folder / ".git" / "objects" / "icon.png")
    status, stdout, stderr = _colorize(capsys, str(folder), "-o", str(tmp_path / "out"), "--model", str(model_dir))
    assert status == 0, stderr
    assert _summary(stdout) == (1, 0, 1, 0)
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.png")) == ["scan.png"]


def test_no_images_found_is_said(model_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    status, stdout, stderr = _colorize(capsys, str(tmp_path / "empty"), "-o", str(tmp_path / "out"), "--model", str(model_dir))
    assert status == 0 and _summary(stdout) == (0, 0, 0, 0)
    assert "no images found" in stderr
