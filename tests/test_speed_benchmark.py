"""`benchmarks/speed.py`'s machinery on tiny models: every section runs and the JSON / Markdown / PNG are well formed.

The numbers of a tiny run mean nothing; what is checked is that the rows, the goal verdicts, the extrapolation of
shortened end-to-end runs, the peak-memory bookkeeping and the three output files come out right.
"""

from __future__ import annotations

import json

import PIL.Image
import pytest
from scripts import load_script


@pytest.fixture(scope="module")
def speed():
    return load_script("benchmarks/speed.py", "lcad_speed_benchmark")


@pytest.fixture(scope="module")
def tiny_run(speed, tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    # 3 of the real 50 / 20 end-to-end steps: exercises the per-step extrapolation and keeps the test short
    report = speed.main(
        ["--tiny", "--device", "cpu", "--output-dir", str(out), "--step-repeats", "2", "--e2e-repeats", "1", "--e2e-steps", "3"]
    )
    return speed, report, out


def test_writes_json_markdown_and_png_named_by_device(tiny_run):
    speed, report, out = tiny_run
    stem = out / f"speed_{report['device_slug']}_tiny"
    assert report["device_slug"].startswith("cpu-") and report["device_slug"].endswith(f"-{speed.usable_cores()}c")
    assert json.loads(stem.with_suffix(".json").read_text()) == json.loads(json.dumps(report))
    with PIL.Image.open(stem.with_suffix(".png")) as chart:
        assert chart.format == "PNG" and chart.width > 400 and chart.height > 200
    markdown = stem.with_suffix(".md").read_text()
    for heading in ("## Machine", "## Goals", "## Per denoising step", "## End to end", "## GPU only", "## Method"):
        assert heading in markdown
    # every Markdown table row has as many cells as its header
    lines = markdown.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|---"):
            width = lines[i - 1].count("|")
            j = i + 1
            while j < len(lines) and lines[j].startswith("|"):
                assert lines[j].count("|") == width, lines[j]
                j += 1


def test_machine_is_described(tiny_run):
    _, report, _ = tiny_run
    machine = report["machine"]
    for key in ("cpu_model", "usable_cores", "torch", "diffusers", "date_utc", "torch_threads"):
        assert machine[key]
    assert report["mode"] == "tiny"


def test_every_section_has_its_rows(tiny_run):
    speed, report, _ = tiny_run
    rows = report["rows"]
    for res in (32, 64):
        at = {(r["section"], r["name"]) for r in rows if r["resolution"] == res}
        assert {("unet_step", "stock SD1.5 UNet"), ("unet_step", "L-CAD UNet")} <= at
        assert {("end_to_end", speed.RELEASE), ("end_to_end", speed.PORT_RELEASE), ("end_to_end", speed.OURS)} <= at
        assert sum(1 for s, _ in at if s == "conv_in") == 3
        assert sum(1 for s, _ in at if s == "instance_step") == 4
        assert ("instance_step", speed.RELEASE_STEP) in at
        assert sum(1 for s, _ in at if s == "gpu") == 5
    for r in rows:
        if r["section"] == "gpu":
            assert not r["measured"] and r["note"] == speed.NO_GPU
        else:
            assert r["measured"], r
            assert r["median_s"] > 0 and len(r["wall_s"]) == r["repeats"] >= 1
        if r["section"] in ("unet_step", "instance_step", "end_to_end"):
            assert r["peak_rss_mib"] > 0 and r["rss_rise_mib"] >= 0
            assert r["other_cores"] is None or r["other_cores"] >= 0


def test_end_to_end_rows_extrapolate_shortened_runs(tiny_run):
    speed, report, _ = tiny_run
    for r in (r for r in report["rows"] if r["section"] == "end_to_end"):
        real = speed.E2E_SETTINGS[r["name"]]["steps"]
        assert r["steps"] == real and r["steps_run"] == 3 and r["extrapolated"]
        assert r["median_s"] == pytest.approx(r["before_steps_s"] + r["after_steps_s"] + real * r["step_s"], rel=0.02, abs=0.01)
        assert r["unet_passes_per_step"] == (1 if r["name"] == speed.OURS else 2)
        # counted by a hook: the release encodes the grey image every step (and once for the decoder), this port once
        assert r["luminance_encodings"] == (real + 1 if r["name"] == speed.RELEASE else 1)


def test_goals_are_evaluated_with_numbers(tiny_run):
    speed, report, _ = tiny_run
    goals = report["goals"]
    assert len(goals) == 4  # two goals at two resolutions
    for g in goals:
        assert isinstance(g["met"], bool) and g["value"] > 0
        if "end-to-end" in g["goal"]:  # the release computed as released is the baseline; this port's row is beside it
            res = int(g["goal"].rsplit("(", 1)[1].split()[0])
            e2e = {r["name"]: r for r in report["rows"] if r["section"] == "end_to_end" and r["resolution"] == res}
            assert g["value"] == pytest.approx(e2e[speed.RELEASE]["median_s"] / e2e[speed.OURS]["median_s"], rel=1e-3)
            assert g["port_release_settings_s"] == e2e[speed.PORT_RELEASE]["median_s"]
        assert g["met"] == (g["value"] <= g["target"] if "UNet" in g["goal"] else g["value"] >= g["target"])


def test_peak_memory_sees_an_allocation(speed):
    import numpy as np
    import torch

    with speed.PeakMemory(torch.device("cpu")) as mem:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        del block
    assert mem.peak_rss - mem.start_rss >= 48 * 2**20


def test_quiet_wait_gives_up_after_its_limit(speed):
    import time

    wait = speed.QuietWait(max_wait_s=0.2, threshold=-1.0, window_s=0.1)  # never quiet enough
    start = time.perf_counter()
    wait()
    assert wait.gave_up == 1 and 0.2 <= time.perf_counter() - start < 2
    speed.QuietWait(max_wait_s=0)()  # disabled: returns at once


def test_gpu_rows_code_path_runs_on_the_cpu(speed, tmp_path):
    # No GPU in CI: the developer switch runs the GPU-only rows (fp16 / bf16 / math attention / torch.compile) on the
    # CPU with tiny models, so their code is exercised before a GPU run depends on it.
    report = speed.main(
        ["--tiny", "--device", "cpu", "--output-dir", str(tmp_path), "--sections", "gpu", "--gpu-rows-on-cpu",
         "--step-repeats", "1", "--resolutions", "32"]
    )
    rows = [r for r in report["rows"] if r["section"] == "gpu"]
    assert [r["name"] for r in rows] == [
        "L-CAD UNet fp32, SDPA",
        "L-CAD UNet fp16, SDPA",
        "L-CAD UNet bf16, SDPA",
        "L-CAD UNet fp16, math attention",
        "L-CAD UNet fp16, SDPA, torch.compile",
    ]
    assert all(r["measured"] and r["median_s"] > 0 for r in rows)
    assert rows[0]["ratio"] == 1.0 and rows[-1]["first_call_s"] > 0
    assert "## GPU only" in (tmp_path / f"speed_{report['device_slug']}_tiny.md").read_text()
