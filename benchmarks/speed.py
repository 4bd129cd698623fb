#!/usr/bin/env python
# Copyright 2026 The L-CAD diffusers port authors. Licensed under the Apache License, Version 2.0.
"""Speed and memory of L-CAD sampling, measured side by side in one process on the full-size SD1.5 architecture.

What it measures (random weights: the timings do not depend on the values):

1. ``unet_step``: one classifier-free-guidance denoising step (UNet batch 2) of the stock SD1.5
   ``UNet2DConditionModel`` vs ``LCADUNet2DConditionModel`` (516-channel ``conv_in``), interleaved. Plus the
   ``conv_in`` alone: stock (4 channels), L-CAD (516 channels, as every step computes it now) and L-CAD with the
   constant luminance term computed once per image (what a cached implementation would pay per step).
2. ``instance_step``: the L-CAD UNet step plain vs single-pass instance-aware refinement vs the two-pass
   ("official") refinement in this port vs the same step as the released code does it (``release_emulation.py``:
   luminance encoding every step, pass 1 with autograd and explicit attention, a gradient per layer), interleaved.
3. ``end_to_end``: colourising one square image of 256 px and of 512 px (text encoding, luminance encoding,
   denoising, luminance-guided decoding, post-processing) with the release's defaults (DDIM 50 steps, CFG 5.0,
   two-pass refinement) computed as the released code computes them, vs this port's defaults through
   ``LCADPipeline`` (DPM-Solver++ 20 steps, CFG 5.0, single-pass refinement); beside them, for reference, the
   release's settings through ``LCADPipeline`` (``mode="official"``).
4. ``gpu`` (CUDA only): fp32 / fp16 / bf16, SDPA vs math attention, ``torch.compile``; on a CPU these rows are
   written as "not measured: no GPU".

Why: the issue's goals are an L-CAD UNet step at most 1.03x the stock step (the luminance input must be nearly
free) and an end-to-end time with our defaults at least 5x faster than the release's at equal resolution.

How:

- Every case is run once or more for warm-up, then the cases of a section are timed in turns (the order rotates
  each round), so slow drifts of a shared machine hit all of them alike. The reported time is the median of the
  repeats; the process CPU time (all threads) is reported beside the wall time, since it is less sensitive to other
  processes competing for the cores. For every timed call the CPU used meanwhile by other processes is recorded
  ("other load", in cores, from /proc/stat), so contaminated rows show; ``--quiet-wait S`` waits up to S seconds
  before each timed call for other processes to go quiet.
- End-to-end: the scheduler's ``step`` is wrapped to time-stamp every denoising step. The median step interval is
  the time per step; the rest of the call (before the first / after the last step) is the fixed cost. Where fewer
  steps than the setting's real count were run (``--quick``; on a CPU the 512 px release row and the reference
  rows of a full run),
  the total is extrapolated as fixed + steps x median step, and the table says so.
- Peak memory: on Linux the process's peak RSS (``VmHWM``) is reset before each measured call through
  ``/proc/self/clear_refs`` (and freed heap is returned with ``malloc_trim``), so every row gets its own peak even
  though all rows run in one process; the table gives that peak and its rise over the RSS at the call's start (the
  memory the call itself needed, the models being already loaded). Where the reset is not allowed, a thread samples
  the RSS every 5 ms instead (psutil). On CUDA, ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``.

Outputs: ``benchmarks/results/speed_<device>.json``, ``.md`` and ``.png`` (``speed_<device>_quick.*`` for
``--quick``, ``speed_<device>_tiny.*`` for ``--tiny``).

Usage::

    python benchmarks/speed.py                # full run (long on a CPU: run it with nohup; --quiet-wait 300 if shared)
    python benchmarks/speed.py --quick        # every row, 256 px, scaled-down step counts; < 10 min on a 2-core CPU
    python benchmarks/speed.py --tiny         # tiny random models: checks the machinery in seconds (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime as _dt
import gc
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import PIL.ImageDraw  # noqa: E402
import PIL.ImageFont  # noqa: E402
import torch  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCHEMA_VERSION = 1
PROMPT = "a red car, a green tree, a blue sky"
GUIDANCE_SCALE = 5.0
NO_GPU = "not measured: no GPU"

# The end-to-end settings. The second goal compares OURS with RELEASE: the release's defaults computed the
# way the released code computes them (benchmarks/release_emulation.py). PORT_RELEASE is the same settings in this
# port (`mode="official"`: the release's results with less work), for reference.
RELEASE = "release defaults"
PORT_RELEASE = "release settings, this port"
OURS = "our defaults"
E2E_SETTINGS: dict[str, dict[str, Any]] = {
    RELEASE: {"sampler": "DDIM (eta 0)", "steps": 50, "refinement": "two-pass as released (emulated)", "mode": "official",
              "runner": "release", "passes_per_step": 2},
    PORT_RELEASE: {"sampler": "DDIM (eta 0)", "steps": 50, "refinement": "official", "mode": "official",
                   "runner": "pipeline", "passes_per_step": 2},
    OURS: {"sampler": "DPM-Solver++ (2M)", "steps": 20, "refinement": "single_pass", "mode": "single_pass",
           "runner": "pipeline", "passes_per_step": 1},
}

# The instance_step row of the release's own per-step work (benchmarks/release_emulation.py).
RELEASE_STEP = "release's two-pass step as released (emulated)"

# Goals of the issue.
UNET_RATIO_GOAL = 1.03
E2E_SPEEDUP_GOAL = 5.0


# ==================================================================================================== configuration


@dataclass
class RunConfig:
    """What one invocation measures; built from the command line by `make_config`. Dicts are keyed by resolution."""

    mode: str  # "full", "quick" or "tiny"
    resolutions: list[int]  # image sizes in pixels (square)
    step_warmup: int  # warm-up calls per case, per-step sections
    instance_warmup: int  # warm-up calls per case, instance-aware refinement (the UNet is warm by then)
    step_repeats: dict[int, int]  # timed calls per case, stock vs L-CAD UNet (and the GPU rows)
    instance_repeats: dict[int, int]  # timed calls per case, instance-aware refinement
    conv_repeats: int  # timed calls per case, conv_in rows
    e2e_warmup_steps: int  # steps of the one warm-up pipeline call per resolution (our defaults: warms every model)
    e2e_repeats: dict[str, dict[int, int]]  # setting -> resolution -> timed pipeline calls
    e2e_steps: dict[str, dict[int, int]]  # setting -> resolution -> steps actually run (<= the setting's real count)
    gpu_rows_on_cpu: bool = False  # developer switch: run the GPU-only rows on the CPU (to test their code path)
    compile_mode: str | None = None  # torch.compile mode for the GPU row (None: default)


def make_config(args: argparse.Namespace, device: torch.device) -> RunConfig:
    """Repeats, resolutions and step counts for the chosen mode; explicit flags override the mode's defaults."""
    real_steps = {name: s["steps"] for name, s in E2E_SETTINGS.items()}
    if args.tiny:
        mode, resolutions = "tiny", [32, 64]
        step, instance, conv = {32: 3, 64: 3}, {32: 3, 64: 3}, 5
        e2e = {name: {32: 2, 64: 2} for name in real_steps}
        e2e_steps = {name: {r: n for r in resolutions} for name, n in real_steps.items()}
    elif args.quick:
        # 24 full-size UNet passes in all: a few minutes on an idle 2-core CPU, < 10 min with 3 other jobs on it
        mode, resolutions = "quick", [256]
        step, instance, conv = {256: 2}, {256: 2}, 10
        e2e = {name: {256: 1} for name in real_steps}
        e2e_steps = {name: {256: 3} for name in real_steps}
    else:
        mode, resolutions = "full", [256, 512]
        # about 30 min on an idle 2-core CPU: the release's two-pass step with its per-step luminance encoding takes
        # ~5.5 s at 256 px and ~45 s at 512 px there
        step, instance, conv = {256: 7, 512: 3}, {256: 5, 512: 2}, 20
        e2e = {RELEASE: {256: 1, 512: 1}, PORT_RELEASE: {256: 1, 512: 1}, OURS: {256: 3, 512: 1}}
        e2e_steps = {name: {r: n for r in resolutions} for name, n in real_steps.items()}
        if device.type != "cuda":  # 100 UNet passes at 512 px take too long on a CPU: measure some, extrapolate
            e2e_steps[RELEASE][512] = args.release_512_steps
            # the reference row: its per-step cost is steady, 10 of its steps tell it
            e2e_steps[PORT_RELEASE] = {r: 10 for r in resolutions}
    if args.resolutions:
        resolutions = args.resolutions
        default = lambda table: {r: table.get(r, max(table.values())) for r in resolutions}  # noqa: E731
        step, instance = default(step), default(instance)
        e2e = {name: default(per_res) for name, per_res in e2e.items()}
        e2e_steps = {name: {r: per_res.get(r, max(per_res.values())) for r in resolutions} for name, per_res in e2e_steps.items()}
    if args.step_repeats is not None:
        step = instance = {r: args.step_repeats for r in resolutions}
    if args.e2e_repeats is not None:
        e2e = {name: {r: args.e2e_repeats for r in resolutions} for name in real_steps}
    if args.e2e_steps is not None:
        e2e_steps = {name: {r: min(args.e2e_steps, n) for r in resolutions} for name, n in real_steps.items()}
    for name, per_res in e2e_steps.items():
        for r, n in per_res.items():
            if not 2 <= n <= real_steps[name]:
                raise SystemExit(f"{name} at {r} px: steps run must be in [2, {real_steps[name]}], got {n}.")
    return RunConfig(
        mode=mode,
        resolutions=resolutions,
        step_warmup=1,
        instance_warmup=0 if mode == "quick" else 1,
        step_repeats=step,
        instance_repeats=instance,
        conv_repeats=conv,
        e2e_warmup_steps=1 if mode == "quick" else 2,
        e2e_repeats=e2e,
        e2e_steps=e2e_steps,
        gpu_rows_on_cpu=args.gpu_rows_on_cpu,
        compile_mode=args.compile_mode,
    )


# ==================================================================================================== machine


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    from benchmarks.instance_attention import cpu_name

    return cpu_name()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def device_slug(device: torch.device) -> str:
    """File-name tag of the device: e.g. `cpu-intel-xeon-processor-2c`, `cuda-nvidia-h100-80gb-hbm3`."""
    if device.type == "cuda":
        return "cuda-" + _slug(torch.cuda.get_device_name(device))
    return f"cpu-{_slug(cpu_model())}-{usable_cores()}c"


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    match = re.search(r"^flags\s*:(.*)$", text, flags=re.MULTILINE)
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "fma")
    return [f for f in wanted if match and f in match.group(1).split()]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def describe_machine(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, memory, GPU, library versions, date and load: what a reader needs to compare numbers."""
    import diffusers
    import transformers

    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "cpu_model": cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "memory_total_gib": None,
        "python": platform.python_version(),
        "os": platform.platform(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "git_commit": _git_commit(),
        "script_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16],
        "load_average_at_start": _loadavg(),
    }
    try:
        import psutil

        info["memory_total_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
            info["memory_total_gib"] = round(kib / 2**20, 1)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
        )
    return info


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


# ==================================================================================================== memory


def _read_status_kib(field_name: str) -> int | None:
    try:
        match = re.search(rf"^{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text(), flags=re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def current_rss() -> int:
    """Resident set size of this process, bytes."""
    kib = _read_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


def _malloc_trim() -> None:
    """Give freed heap back to the OS (glibc), so a row's RSS rise is its own, not earlier rows' leftovers."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory of a block: process RSS (and CUDA allocations on a GPU).

    RSS: the kernel's high-water mark `VmHWM`, reset at entry through `/proc/self/clear_refs` ("5"), so each block
    gets its own peak in one long process. If the reset is refused (not Linux, or not allowed), a thread samples the
    RSS every 5 ms (psutil), which can miss short spikes.
    """

    _hwm_reset_works: bool | None = None

    def __init__(self, device: torch.device):
        self.device = device
        self.method = ""
        self.start_rss = 0
        self.peak_rss = 0
        self.cuda_peak: int | None = None
        self.cuda_start: int | None = None
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()

    @classmethod
    def _reset_hwm(cls) -> bool:
        if cls._hwm_reset_works is False:
            return False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            ok = _read_status_kib("VmHWM") is not None
        except OSError:
            ok = False
        cls._hwm_reset_works = ok
        return ok

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_rss = max(self.peak_rss, current_rss())

    def __enter__(self) -> "PeakMemory":
        gc.collect(1)  # the young generations: a full collection takes ~0.7 s with diffusers + transformers loaded
        _malloc_trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.cuda_start = torch.cuda.memory_allocated(self.device)
        self.start_rss = current_rss()
        self.peak_rss = self.start_rss
        if self._reset_hwm():
            self.method = "VmHWM reset via /proc/self/clear_refs"
        else:
            self.method = "RSS sampled every 5 ms"
            self._stop.clear()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_peak = torch.cuda.max_memory_allocated(self.device)
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self._sampler = None
        else:
            self.peak_rss = max(self.peak_rss, (_read_status_kib("VmHWM") or 0) * 1024)
        self.peak_rss = max(self.peak_rss, current_rss())


# ==================================================================================================== timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def system_busy_s() -> float | None:
    """CPU seconds spent busy by the whole machine since boot (all cores; /proc/stat), or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Stopwatch:
    """Wall time, this process's CPU time (all threads) and the CPU used meanwhile by other processes of a block.

    `other_cores` = (machine busy time - this process's CPU time) / wall time: how many cores other work took while
    the block ran; 0 on an otherwise idle machine. CUDA is synchronised at both ends.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.wall = self.cpu = self.start = 0.0
        self.other_cores: float | None = None

    def __enter__(self) -> "Stopwatch":
        synchronize(self.device)
        self._busy = system_busy_s()
        self._cpu, self.start = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.wall = time.perf_counter() - self.start
        self.cpu = time.process_time() - self._cpu
        busy = system_busy_s()
        if busy is not None and self._busy is not None and self.wall > 0:
            self.other_cores = max(0.0, (busy - self._busy - self.cpu) / self.wall)


class QuietWait:
    """Before each timed call, wait (up to `max_wait_s`) until other processes use less than `threshold` cores.

    On a shared machine this keeps other jobs' bursts out of the measurements where it can; the time waited is
    reported. `max_wait_s=0` disables it.
    """

    def __init__(self, max_wait_s: float = 0.0, threshold: float = 0.3, window_s: float = 1.0):
        self.max_wait_s, self.threshold, self.window_s = max_wait_s, threshold, window_s
        self.waited_s = 0.0
        self.gave_up = 0

    def __call__(self) -> None:
        if self.max_wait_s <= 0 or system_busy_s() is None:
            return
        start = time.perf_counter()
        while True:
            busy0, cpu0, t0 = system_busy_s(), time.process_time(), time.perf_counter()
            time.sleep(self.window_s)
            others = (system_busy_s() - busy0 - (time.process_time() - cpu0)) / (time.perf_counter() - t0)
            if others < self.threshold:
                break
            if time.perf_counter() - start > self.max_wait_s:
                self.gave_up += 1
                break
        self.waited_s += time.perf_counter() - start - self.window_s


QUIET = QuietWait()  # configured by main() from --quiet-wait


@dataclass
class Case:
    """One thing to time: `fn()` inside `context()` (entered and left outside the timed region)."""

    name: str
    fn: Callable[[], Any]
    context: Callable[[], ContextManager] = contextlib.nullcontext


@dataclass
class Measurement:
    """Timings and memory of one case over its timed repeats."""

    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    other_cores: list[float] = field(default_factory=list)
    peak_rss: list[int] = field(default_factory=list)
    rss_rise: list[int] = field(default_factory=list)
    cuda_peak: list[int] = field(default_factory=list)
    cuda_rise: list[int] = field(default_factory=list)
    memory_method: str = ""

    def add_time(self, watch: Stopwatch) -> None:
        self.wall_s.append(watch.wall)
        self.cpu_s.append(watch.cpu)
        if watch.other_cores is not None:
            self.other_cores.append(watch.other_cores)

    def add_memory(self, mem: PeakMemory) -> None:
        self.memory_method = mem.method
        self.peak_rss.append(mem.peak_rss)
        self.rss_rise.append(mem.peak_rss - mem.start_rss)
        if mem.cuda_peak is not None:
            self.cuda_peak.append(mem.cuda_peak)
            self.cuda_rise.append(mem.cuda_peak - (mem.cuda_start or 0))

    def memory_summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "peak_rss_mib": _mib(max(self.peak_rss)) if self.peak_rss else None,
            "rss_rise_mib": _mib(max(self.rss_rise)) if self.rss_rise else None,
            "memory_method": self.memory_method,
        }
        if self.cuda_peak:
            out["cuda_max_allocated_mib"] = _mib(max(self.cuda_peak))
            out["cuda_rise_mib"] = _mib(max(self.cuda_rise))
        return out


def _mib(n: int) -> float:
    return round(n / 2**20, 1)


def time_interleaved(
    cases: Sequence[Case], warmup: int, repeats: int, device: torch.device, measure_memory: bool = True
) -> dict[str, Measurement]:
    """Warm every case up, then time the cases in turns, rotating the order each round; median by the caller."""
    results = {case.name: Measurement() for case in cases}
    for case in cases:
        for _ in range(warmup):
            with case.context():
                case.fn()
    synchronize(device)
    for r in range(repeats):
        shift = r % len(cases)
        for case in list(cases[shift:]) + list(cases[:shift]):
            if measure_memory:  # the calls worth waiting for (not the millisecond conv_in ones)
                QUIET()
            with case.context():
                mem = PeakMemory(device) if measure_memory else contextlib.nullcontext()
                with mem, Stopwatch(device) as watch:
                    case.fn()
            m = results[case.name]
            m.add_time(watch)
            if measure_memory:
                m.add_memory(mem)
    return results


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def paired_ratio(m: Measurement, base: Measurement) -> float:
    """Median over rounds of this case's time over the base case's time in the same round."""
    return median([a / b for a, b in zip(m.wall_s, base.wall_s)])


# ==================================================================================================== models


@dataclass
class Models:
    stock_unet: Any
    lcad_unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    size: str  # "SD1.5 (full size)" or "tiny"


def sd15_unet_config() -> dict[str, Any]:
    """SD1.5's UNet: diffusers' defaults are SD1.x's except these three."""
    return {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}


def sd15_vae_config() -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }


def build_models(tiny: bool, device: torch.device, seed: int = 0) -> Models:
    """Random-weight models: SD1.5-sized (or the tests' tiny ones) stock UNet, L-CAD UNet, L-CAD VAE and CLIP."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from lcad_pipeline import LCADUNet2DConditionModel, LuminanceAutoencoderKL
    from lcad_pipeline.convert import clip_vit_l14_text_config

    if str(REPO_ROOT / "tests") not in sys.path:  # the tests' offline tokenizer and tiny models import each other
        sys.path.append(str(REPO_ROOT / "tests"))
    import tiny_models

    tokenizer = tiny_models.make_tokenizer()
    if tiny:
        stock = tiny_models.make_stock_unet(seed)
        vae = LuminanceAutoencoderKL.from_vae(tiny_models.make_stock_vae(seed))
        text_encoder = tiny_models.make_text_encoder(len(tokenizer), seed)
        lcad = LCADUNet2DConditionModel.from_unet(stock, luminance_channels=vae.luminance_feature_channels)
        size = "tiny (tests/tiny_models.py)"
    else:
        torch.manual_seed(seed)
        stock = UNet2DConditionModel(**sd15_unet_config())
        lcad = LCADUNet2DConditionModel.from_unet(stock, luminance_channels=512)
        vae = LuminanceAutoencoderKL.from_vae(AutoencoderKL(**sd15_vae_config()))
        # CLIP ViT-L/14's text tower (the real vocabulary size, so the embedding table weighs what it weighs), with
        # the offline test tokenizer's special-token ids (its ids all lie below 49408).
        config = clip_vit_l14_text_config()
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        text_encoder = CLIPTextModel(config)
        size = "SD1.5 (full size, random weights)"
    models = Models(stock, lcad, vae, text_encoder, tokenizer, size)
    for model in (models.stock_unet, models.lcad_unet, models.vae, models.text_encoder):
        model.to(device).eval().requires_grad_(False)
    return models


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ==================================================================================================== inputs


def make_grey_image(size: int) -> PIL.Image.Image:
    """A deterministic grey test photo: smooth gradients and a few shapes (content does not change the timings)."""
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    grey = 0.35 + 0.3 * x + 0.2 * np.sin(6 * y)
    image = PIL.Image.fromarray((np.clip(grey, 0, 1) * 255).astype(np.uint8), mode="L")
    draw = PIL.ImageDraw.Draw(image)
    draw.rectangle([size * 0.1, size * 0.6, size * 0.5, size * 0.85], fill=60)
    draw.ellipse([size * 0.6, size * 0.3, size * 0.9, size * 0.8], fill=180)
    return image


def make_masks(size: int) -> torch.Tensor:
    """Masks [3, size, size] for the 3 phrases of `PROMPT`: `benchmarks/instance_attention.py`'s, resized."""
    from benchmarks.instance_attention import make_masks as instance_benchmark_masks

    masks = instance_benchmark_masks()
    if masks.shape[-1] != size:
        masks = torch.nn.functional.interpolate(masks[None], size=(size, size), mode="nearest")[0]
    return masks


def phrases_of(prompt: str) -> list[str]:
    from lcad_pipeline.instance_masks import split_prompt_phrases

    return split_prompt_phrases(prompt)


# ==================================================================================================== instance-aware helpers


def make_guidance(mode: str, masks: torch.Tensor, token_indices: list[list[int]]):
    """The instance-aware guidance with its defaults for `mode` ("single_pass" or "official")."""
    from lcad_pipeline.attention_lcad import InstanceAttentionGuidance

    return InstanceAttentionGuidance(masks=masks, token_indices=token_indices, mode=mode)


def pipeline_instance_kwargs(refinement: str, masks: torch.Tensor) -> dict[str, Any]:
    """Pipeline call arguments: one mask per phrase of `PROMPT`, refinement `mode` with its default settings."""
    return {"instance_masks": dict(zip(phrases_of(PROMPT), list(masks))), "instance_guidance": {"mode": refinement}}


# ==================================================================================================== sections


def _row(section: str, name: str, resolution: int, m: Measurement | None = None, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"section": section, "name": name, "resolution": resolution, "measured": m is not None}
    if m is not None:
        row.update(
            median_s=round(median(m.wall_s), 5),
            cpu_median_s=round(median(m.cpu_s), 5),
            repeats=len(m.wall_s),
            wall_s=[round(v, 5) for v in m.wall_s],
            other_cores=round(median(m.other_cores), 2) if m.other_cores else None,
            other_cores_max=round(max(m.other_cores), 2) if m.other_cores else None,
            **m.memory_summary(),
        )
    row.update(extra)
    return row


def unet_inputs(models: Models, resolution: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A CFG batch (2 images: unconditional, conditional) of UNet inputs for an image of `resolution` px."""
    factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
    side = resolution // factor
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, side, side, generator=g).to(device, dtype)
    luminance = torch.randn(2, models.lcad_unet.config.luminance_channels, side, side, generator=g).to(device, dtype)
    text = torch.randn(2, 77, models.text_encoder.config.hidden_size, generator=g).to(device, dtype)
    timestep = torch.tensor(500, device=device)
    return latents, luminance, text, timestep


def section_unet_step(models: Models, cfg: RunConfig, device: torch.device, log: Callable[[str], None]) -> list[dict]:
    """Stock vs L-CAD UNet per CFG step, and the conv_in alone (stock / L-CAD / L-CAD with a cached luminance term)."""
    rows = []
    for res in cfg.resolutions:
        latents, luminance, text, t = unet_inputs(models, res, device, torch.float32)
        stock, lcad = models.stock_unet, models.lcad_unet
        load0 = _loadavg()
        with torch.no_grad():
            results = time_interleaved(
                [
                    Case("stock SD1.5 UNet", lambda: stock(latents, t, text, return_dict=False)),
                    Case("L-CAD UNet", lambda: lcad(latents, t, text, luminance=luminance, return_dict=False)),
                ],
                cfg.step_warmup,
                cfg.step_repeats[res],
                device,
            )
        base = median(results["stock SD1.5 UNet"].wall_s)
        base_cpu = median(results["stock SD1.5 UNet"].cpu_s)
        for name, m in results.items():
            rows.append(
                _row(
                    "unet_step", name, res, m,
                    ratio=round(median(m.wall_s) / base, 4),
                    paired_ratio=round(paired_ratio(m, results["stock SD1.5 UNet"]), 4),
                    cpu_ratio=round(median(m.cpu_s) / base_cpu, 4),
                    ratio_to="stock SD1.5 UNet",
                    batch=2,
                    load_average=[load0, _loadavg()],
                )
            )
            log(f"  unet_step {res}px {name}: {median(m.wall_s):.3f} s ({rows[-1]['ratio']:.3f}x stock)")

        # conv_in alone: what the 516-channel first convolution costs per step, and what caching would leave.
        weight, bias = lcad.conv_in.weight, lcad.conv_in.bias
        c_lat = lcad.config.in_channels
        w_lat, w_lum = weight[:, :c_lat].contiguous(), weight[:, c_lat:].contiguous()
        pad = lcad.conv_in.padding
        with torch.no_grad():
            cached_term = torch.nn.functional.conv2d(luminance[:1], w_lum, bias, padding=pad)  # once per image
            conv_cases = [
                Case("conv_in stock (4 ch)", lambda: stock.conv_in(latents)),
                Case("conv_in L-CAD (4+512 ch, as now)", lambda: lcad.conv_in(torch.cat([latents, luminance], dim=1))),
                Case(
                    "conv_in L-CAD, luminance term cached",
                    lambda: torch.nn.functional.conv2d(latents, w_lat, None, padding=pad) + cached_term,
                ),
            ]
            conv = time_interleaved(conv_cases, max(cfg.step_warmup, 2), cfg.conv_repeats, device, measure_memory=False)
        for name, m in conv.items():
            rows.append(
                _row(
                    "conv_in", name, res, m,
                    share_of_stock_step=round(median(m.wall_s) / base, 4),
                    batch=2,
                )
            )
            share = 100 * rows[-1]["share_of_stock_step"]
            log(f"  conv_in {res}px {name}: {1000 * median(m.wall_s):.2f} ms ({share:.2f}% of a stock step)")
    return rows


def section_instance_step(models: Models, cfg: RunConfig, device: torch.device, log: Callable[[str], None]) -> list[dict]:
    """L-CAD UNet per CFG step: plain vs single-pass vs official (two-pass) refinement vs the release's own step."""
    names = ["plain", "single-pass refinement", "official two-pass refinement", RELEASE_STEP]
    from benchmarks.release_emulation import ReleasedInstanceSampler
    from lcad_pipeline.instance_masks import find_phrase_token_spans

    lcad = models.lcad_unet
    token_indices = find_phrase_token_spans(models.tokenizer, PROMPT, phrases_of(PROMPT))
    rows = []
    for res in cfg.resolutions:
        latents, luminance, text, t = unet_inputs(models, res, device, torch.float32)
        masks = make_masks(res)
        guidances = {"single": make_guidance("single_pass", masks, token_indices)}
        guidances["official"] = make_guidance("official", masks, token_indices)
        released = ReleasedInstanceSampler(lcad, models.vae, masks, token_indices)
        grey = released_luminance_input(models, res, device)

        def call() -> torch.Tensor:
            return lcad(latents, t, text, luminance=luminance, return_dict=False)[0]

        def attached(kind: str) -> Callable[[], ContextManager]:
            @contextlib.contextmanager
            def context() -> Iterator[None]:
                with guidances[kind].attached(lcad, do_classifier_free_guidance=True) as g:
                    g.set_step(0, 1)
                    yield

            return context

        load0 = _loadavg()
        with torch.no_grad():
            results = time_interleaved(
                [
                    Case(names[0], call),
                    Case(names[1], lambda: guidances["single"].run_unet(call), attached("single")),
                    Case(names[2], lambda: guidances["official"].run_unet(call), attached("official")),
                    Case(names[3], lambda: released.predict_noise(latents, t, text, grey), released.attached),
                ],
                cfg.instance_warmup,
                cfg.instance_repeats[res],
                device,
            )
        base = median(results[names[0]].wall_s)
        base_cpu = median(results[names[0]].cpu_s)
        for name, m in results.items():
            rows.append(
                _row(
                    "instance_step", name, res, m,
                    ratio=round(median(m.wall_s) / base, 4),
                    paired_ratio=round(paired_ratio(m, results[names[0]]), 4),
                    cpu_ratio=round(median(m.cpu_s) / base_cpu, 4),
                    ratio_to="plain",
                    unet_passes=2 if "two-pass" in name else 1,
                    luminance_encodings=1 if name == RELEASE_STEP else 0,
                    batch=2,
                    load_average=[load0, _loadavg()],
                )
            )
            log(f"  instance_step {res}px {name}: {median(m.wall_s):.3f} s ({rows[-1]['ratio']:.3f}x plain)")
    return rows


def released_luminance_input(models: Models, resolution: int, device: torch.device) -> torch.Tensor:
    """The release's UNet hint: the normalised grey image for both CFG halves, [2, 3, res, res] (L/127.5 - 1)."""
    g = torch.Generator().manual_seed(1)
    lightness = torch.rand(1, 1, resolution, resolution, generator=g) * 100
    grey = (lightness / 127.5 - 1).expand(1, models.vae.config.luminance_in_channels, -1, -1)
    return torch.cat([grey, grey]).to(device)


def make_scheduler(setting: str):
    """DDIM as released, or DPM-Solver++ (multistep, 2nd order) on the same noise schedule."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from lcad_pipeline import LCADPipeline

    ddim = DDIMScheduler(**LCADPipeline.default_scheduler_config())
    if E2E_SETTINGS[setting]["sampler"].startswith("DDIM"):
        return ddim
    return DPMSolverMultistepScheduler.from_config(ddim.config, algorithm_type="dpmsolver++", solver_order=2)


@dataclass
class PipelineRun:
    total_s: float
    cpu_s: float
    step_stamps: list[float]
    start: float
    unet_calls: int
    other_cores: float | None
    luminance_encodings: int = 0


def run_pipeline(pipe, setting: str, image: PIL.Image.Image, masks: torch.Tensor, steps: int, device: torch.device) -> PipelineRun:
    """One colourisation with `setting`'s sampler and refinement, time-stamping every denoising step."""
    scheduler = make_scheduler(setting)
    stamps: list[float] = []
    original_step = scheduler.step

    def timed_step(*args, **kwargs):
        out = original_step(*args, **kwargs)
        synchronize(device)
        stamps.append(time.perf_counter())
        return out

    scheduler.step = timed_step  # an instance attribute: only this scheduler object is affected
    spec = E2E_SETTINGS[setting]
    generator = torch.Generator(device=device).manual_seed(0)
    if spec["runner"] == "release":
        from benchmarks.release_emulation import released_colorize

        def colourise():
            released_colorize(pipe, image, PROMPT, masks, steps, GUIDANCE_SCALE, generator, scheduler=scheduler)
    else:
        pipe.scheduler = scheduler
        call_kwargs = pipeline_call_kwargs(spec["mode"], image, masks, steps, generator)

        def colourise():
            pipe(**call_kwargs)

    calls = [0, 0]  # UNet passes, luminance-encoder passes
    hooks = [
        pipe.unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)),
        pipe.vae.luminance_encoder.register_forward_pre_hook(lambda *_: calls.__setitem__(1, calls[1] + 1)),
    ]
    try:
        with Stopwatch(device) as watch:
            colourise()
    finally:
        for hook in hooks:
            hook.remove()
    return PipelineRun(watch.wall, watch.cpu, stamps, watch.start, calls[0], watch.other_cores, calls[1])


def pipeline_call_kwargs(refinement: str, image: PIL.Image.Image, masks: torch.Tensor, steps: int, generator) -> dict:
    """`LCADPipeline.__call__` arguments: processing at the image's size, instance-aware refinement `refinement`."""
    call_kwargs = dict(
        image=image,
        prompt=PROMPT,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE_SCALE,
        processing_resolution=image.size[0],
        generator=generator,
        output_type="pil",
    )
    call_kwargs.update(pipeline_instance_kwargs(refinement, masks))
    return call_kwargs


def section_end_to_end(models: Models, cfg: RunConfig, device: torch.device, log: Callable[[str], None]) -> list[dict]:
    """The whole pipeline call, release defaults vs ours, per resolution; per-step extrapolation where needed."""
    from lcad_pipeline import LCADPipeline

    pipe = LCADPipeline(
        vae=models.vae,
        unet=models.lcad_unet,
        text_encoder=models.text_encoder,
        tokenizer=models.tokenizer,
        scheduler=make_scheduler(RELEASE),
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for res in cfg.resolutions:
        image, masks = make_grey_image(res), make_masks(res)
        for setting in E2E_SETTINGS:  # warm-up: every model and every code path (explicit attention, autograd)
            run_pipeline(pipe, setting, image, masks, cfg.e2e_warmup_steps, device)
        runs: dict[str, list[PipelineRun]] = {s: [] for s in E2E_SETTINGS}
        mems: dict[str, Measurement] = {s: Measurement() for s in E2E_SETTINGS}
        load0 = _loadavg()
        settings = list(E2E_SETTINGS)
        for r in range(max(cfg.e2e_repeats[s][res] for s in E2E_SETTINGS)):
            order = settings[r % len(settings) :] + settings[: r % len(settings)]
            for setting in (s for s in order if r < cfg.e2e_repeats[s][res]):
                QUIET()
                mem = PeakMemory(device)
                with torch.no_grad(), mem:
                    run = run_pipeline(pipe, setting, image, masks, cfg.e2e_steps[setting][res], device)
                runs[setting].append(run)
                mems[setting].add_memory(mem)
                log(f"  end_to_end {res}px {setting}: {run.total_s:.2f} s for {len(run.step_stamps)} steps")
        load1 = _loadavg()
        for setting, spec in E2E_SETTINGS.items():
            rows.append(e2e_row(setting, spec, res, runs[setting], mems[setting], [load0, load1]))
        base = next(r for r in rows if r["resolution"] == res and r["name"] == OURS)
        for row in rows:
            if row["resolution"] == res:
                row["ratio_to_ours"] = round(row["median_s"] / base["median_s"], 3)
    return rows


def e2e_row(setting: str, spec: dict, res: int, runs: list[PipelineRun], mem: Measurement, load: list) -> dict[str, Any]:
    """Median over runs of the per-step time, the fixed cost and the (measured or extrapolated) total."""
    target = spec["steps"]
    per_run = []
    for run in runs:
        stamps = run.step_stamps
        steps_run = len(stamps)
        intervals = np.diff(stamps)
        step_s = float(np.median(intervals))
        before = stamps[0] - run.start - step_s  # text + luminance encoding (+ the first step's excess over the median)
        after = run.start + run.total_s - stamps[-1]  # luminance-guided decoding and post-processing
        if steps_run == target:
            total = run.total_s
        else:
            total = before + after + target * step_s
        per_run.append({"total": total, "step": step_s, "before": before, "after": after, "measured": run.total_s,
                        "cpu": run.cpu_s, "steps_run": steps_run})
    steps_run = per_run[0]["steps_run"]
    extrapolated = steps_run != target
    m = Measurement(
        wall_s=[p["total"] for p in per_run],
        cpu_s=[p["cpu"] for p in per_run],
        other_cores=[run.other_cores for run in runs if run.other_cores is not None],
    )
    m.peak_rss, m.rss_rise, m.cuda_peak, m.cuda_rise, m.memory_method = (
        mem.peak_rss, mem.rss_rise, mem.cuda_peak, mem.cuda_rise, mem.memory_method,
    )
    row = _row("end_to_end", setting, res, m)
    row.update(
        sampler=spec["sampler"],
        steps=target,
        steps_run=steps_run,
        extrapolated=extrapolated,
        refinement=spec["refinement"],
        unet_passes_per_step=round(statistics.mean(run.unet_calls / len(run.step_stamps) for run in runs), 2),
        # per image at the real step count: once per image, or (the release) once per step plus once for decoding
        luminance_encodings=round(statistics.mean(
            run.luminance_encodings if run.luminance_encodings <= 1
            else (run.luminance_encodings - 1) * target / len(run.step_stamps) + 1
            for run in runs
        )),
        guidance_scale=GUIDANCE_SCALE,
        step_s=round(median([p["step"] for p in per_run]), 4),
        before_steps_s=round(median([p["before"] for p in per_run]), 3),
        after_steps_s=round(median([p["after"] for p in per_run]), 3),
        measured_call_s=[round(p["measured"], 3) for p in per_run],
        load_average=load,
    )
    if extrapolated:
        row["note"] = f"{steps_run} of {target} steps run; total = fixed + {target} x median step"
    return row


def section_gpu(models: Models, cfg: RunConfig, device: torch.device, log: Callable[[str], None]) -> list[dict]:
    """CUDA only: L-CAD UNet step in fp32 / fp16 / bf16 (SDPA), fp16 with math attention, fp16 + torch.compile."""
    names = [
        "L-CAD UNet fp32, SDPA",
        "L-CAD UNet fp16, SDPA",
        "L-CAD UNet bf16, SDPA",
        "L-CAD UNet fp16, math attention",
        "L-CAD UNet fp16, SDPA, torch.compile",
    ]
    if device.type != "cuda" and not cfg.gpu_rows_on_cpu:
        return [_row("gpu", n, r, note=NO_GPU) for r in cfg.resolutions for n in names]
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    fp32 = models.lcad_unet
    half = copy.deepcopy(fp32).to(torch.float16)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    math_attn = copy.deepcopy(half)
    math_attn.set_attn_processor(AttnProcessor())
    half.set_attn_processor(AttnProcessor2_0())
    compiled = torch.compile(copy.deepcopy(half), mode=cfg.compile_mode)
    models_by_name = dict(zip(names, [fp32, half, bf16, math_attn, compiled]))
    dtypes = dict(zip(names, [torch.float32, torch.float16, torch.bfloat16, torch.float16, torch.float16]))
    rows = []
    for res in cfg.resolutions:
        inputs = {dt: unet_inputs(models, res, device, dt) for dt in set(dtypes.values())}

        def caller(name: str) -> Callable[[], Any]:
            latents, luminance, text, t = inputs[dtypes[name]]
            model = models_by_name[name]
            return lambda: model(latents, t, text, luminance=luminance, return_dict=False)

        with torch.no_grad():
            # compilation happens on the first call(s): timed separately, then part of the warm-up
            synchronize(device)
            t0 = time.perf_counter()
            caller(names[-1])()
            synchronize(device)
            compile_s = time.perf_counter() - t0
            results = time_interleaved([Case(n, caller(n)) for n in names], max(cfg.step_warmup, 2), cfg.step_repeats[res], device)
        base = median(results[names[0]].wall_s)
        for name, m in results.items():
            extra: dict[str, Any] = {"ratio": round(median(m.wall_s) / base, 4), "ratio_to": names[0], "batch": 2}
            if "compile" in name:
                extra["first_call_s"] = round(compile_s, 2)
                extra["note"] = f"first call (compilation) {compile_s:.1f} s, not in the median"
            rows.append(_row("gpu", name, res, m, **extra))
            log(f"  gpu {res}px {name}: {median(m.wall_s) * 1000:.1f} ms")
    del half, bf16, math_attn, compiled
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ==================================================================================================== goals and reports


def evaluate_goals(rows: list[dict]) -> list[dict[str, Any]]:
    """The issue's two goals, per resolution, with the numbers."""
    goals = []
    for res in sorted({r["resolution"] for r in rows if r["section"] == "unet_step" and r["measured"]}):
        lcad = next(r for r in rows if r["section"] == "unet_step" and r["resolution"] == res and r["name"] == "L-CAD UNet")
        goals.append(
            {
                "goal": f"L-CAD UNet step <= {UNET_RATIO_GOAL}x stock UNet step ({res} px)",
                "target": UNET_RATIO_GOAL,
                "value": lcad["ratio"],
                "cpu_time_value": lcad["cpu_ratio"],
                "met": lcad["ratio"] <= UNET_RATIO_GOAL,
                "detail": f"median {lcad['median_s']:.4g} s vs {lcad['median_s'] / lcad['ratio']:.4g} s per CFG step; "
                f"paired ratio {lcad['paired_ratio']:.3f}, CPU-time ratio {lcad['cpu_ratio']:.3f}",
            }
        )
    for res in sorted({r["resolution"] for r in rows if r["section"] == "end_to_end" and r["measured"]}):
        release = next(r for r in rows if r["section"] == "end_to_end" and r["resolution"] == res and r["name"] == RELEASE)
        ours = next(r for r in rows if r["section"] == "end_to_end" and r["resolution"] == res and r["name"] == OURS)
        speedup = release["median_s"] / ours["median_s"]
        extrapolated = [r["name"] for r in (release, ours) if r["extrapolated"]]
        denoise = {k: r["steps"] * r["step_s"] for k, r in (("release", release), ("ours", ours))}
        fixed = {k: r["before_steps_s"] + r["after_steps_s"] for k, r in (("release", release), ("ours", ours))}
        passes = {k: round(r["steps"] * r["unet_passes_per_step"]) for k, r in (("release", release), ("ours", ours))}
        encodings = {k: r["luminance_encodings"] for k, r in (("release", release), ("ours", ours))}
        port = next((r for r in rows if r["section"] == "end_to_end" and r["resolution"] == res and r["name"] == PORT_RELEASE), None)
        port_note = (
            f"; for reference, the release's settings in this port (closed-form official mode) take {port['median_s']:.4g} s"
            f"{' (extrapolated)' if port['extrapolated'] else ''}, {port['median_s'] / ours['median_s']:.2f}x ours"
            if port is not None
            else ""
        )
        goals.append(
            {
                "goal": f"end-to-end, our defaults >= {E2E_SPEEDUP_GOAL:g}x faster than the release's ({res} px)",
                "target": E2E_SPEEDUP_GOAL,
                "value": round(speedup, 3),
                "met": speedup >= E2E_SPEEDUP_GOAL,
                "detail": f"{release['median_s']:.4g} s vs {ours['median_s']:.4g} s per image"
                + (f" (extrapolated: {', '.join(extrapolated)})" if extrapolated else "")
                + f"; UNet passes {passes['release']} vs {passes['ours']}, luminance-encoder passes "
                f"{encodings['release']} vs {encodings['ours']}; denoising alone {denoise['release']:.4g} s vs {denoise['ours']:.4g} s = "
                f"{denoise['release'] / denoise['ours']:.2f}x; fixed cost (encoding, decoding) {fixed['release']:.3g} s vs "
                f"{fixed['ours']:.3g} s" + port_note,
                "unet_passes": passes,
                "luminance_encoder_passes": encodings,
                "denoising_s": {k: round(v, 3) for k, v in denoise.items()},
                "fixed_s": {k: round(v, 3) for k, v in fixed.items()},
                "port_release_settings_s": port["median_s"] if port is not None else None,
            }
        )
    return goals


def _fmt_s(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 0.01:
        return f"{value * 1000:.3f} ms"
    if value < 1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s"


def _fmt_load(row: dict) -> str:
    """Other processes' CPU use during the row's calls: median (max) cores."""
    if row.get("other_cores") is None or row["section"] == "conv_in":
        return "-"
    return f"{row['other_cores']:.2f} ({row['other_cores_max']:.2f})"


def _fmt_mib(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1024:.2f} GiB" if value >= 1024 else f"{value:.0f} MiB"


def write_markdown(report: dict[str, Any], path: Path) -> None:
    """The human-readable table: machine, goals, one table per section, method notes."""
    rows, machine, goals = report["rows"], report["machine"], report["goals"]
    cuda = any("cuda_max_allocated_mib" in r for r in rows)
    mem_head = "Peak CUDA alloc. | CUDA rise" if cuda else "Peak RSS | RSS rise"

    def mem_cells(r: dict) -> str:
        if cuda:
            return f"{_fmt_mib(r.get('cuda_max_allocated_mib'))} | {_fmt_mib(r.get('cuda_rise_mib'))}"
        return f"{_fmt_mib(r.get('peak_rss_mib'))} | {_fmt_mib(r.get('rss_rise_mib'))}"

    out = [f"# L-CAD speed benchmark: {report['device_slug']} ({report['mode']} run)", ""]
    out += [
        f"Generated by `{report['command']}` on {machine['date_utc']}, git {machine.get('git_commit') or '?'}; "
        f"models: {report['models']}. Raw numbers: [{path.with_suffix('.json').name}]({path.with_suffix('.json').name}), "
        f"chart: [{path.with_suffix('.png').name}]({path.with_suffix('.png').name}).",
        "",
        "## Machine",
        "",
        f"- CPU: {machine['cpu_model']} ({', '.join(machine['cpu_flags']) or 'flags unknown'}), "
        f"{machine['usable_cores']} usable cores, torch threads {machine['torch_threads']}, "
        f"memory {machine['memory_total_gib']} GiB",
    ]
    if "gpu" in machine:
        out.append(f"- GPU: {machine['gpu']}, {machine['gpu_memory_gib']} GiB, CUDA {machine['cuda']}, cuDNN {machine['cudnn']}, "
                   f"TF32 matmul {machine['tf32_matmul']}, TF32 cuDNN {machine['tf32_cudnn']}")
    else:
        out.append("- GPU: none")
    out += [
        f"- Python {machine['python']}, torch {machine['torch']}, diffusers {machine['diffusers']}, "
        f"transformers {machine['transformers']}; {machine['os']}",
        f"- Load average (1, 5, 15 min) at start {machine['load_average_at_start']}, at end {report.get('load_average_at_end')} "
        "(this run itself accounts for about the torch thread count)",
        "- 'Other load' columns: cores used by other processes during the row's timed calls, median (max) over the calls "
        "(from /proc/stat minus this process's CPU time); 0 means the machine was the benchmark's alone"
        + (
            ". **Some rows ran beside other work** (median other load above 0.3 cores): their wall times are inflated; "
            "the CPU-time columns are steadier."
            if report.get("shared_machine")
            else "."
        ),
        f"- Waiting for quiet (`--quiet-wait {report['quiet_wait']['max_wait_s']:g}`): waited {report['quiet_wait']['waited_s']:.0f} s "
        f"in all, gave up waiting {report['quiet_wait']['gave_up']} time(s)"
        if report["quiet_wait"]["max_wait_s"] > 0
        else "- No waiting for a quiet machine (`--quiet-wait 0`).",
        f"- Wall time of the whole run: {report['run_wall_s'] / 60:.1f} min",
        "",
        "## Goals",
        "",
        "| Goal | Target | Measured | Verdict | Numbers |",
        "|---|---|---|---|---|",
    ]
    for g in goals:
        value = f"{g['value']:.3f}x"
        verdict = "**met**" if g["met"] else "**NOT MET**"
        out.append(f"| {g['goal']} | {'<=' if 'UNet' in g['goal'] else '>='} {g['target']:g}x | {value} | {verdict} | {g['detail']} |")
    if not goals:
        out.append("| - | - | - | not evaluated | no measured rows |")

    def section_table(section: str, title: str, intro: str, ratio_label: str) -> None:
        sel = [r for r in rows if r["section"] == section]
        if not sel:
            return
        out.extend(["", f"## {title}", "", intro, ""])
        if not any(r["measured"] for r in sel):
            out.extend(["| Resolution | Case | Status |", "|---|---|---|"])
            out.extend(f"| {r['resolution']} px | {r['name']} | {r['note']} |" for r in sel)
            return
        out.append(f"| Resolution | Case | Median wall | Median CPU time | {ratio_label} | {mem_head} | Other load | Repeats | Note |")
        out.append("|---" * 10 + "|")
        for r in sel:
            if not r["measured"]:
                out.append(f"| {r['resolution']} px | {r['name']} | - | - | - | - | - | - | - | {r.get('note', '')} |")
                continue
            ratio = r.get("ratio", r.get("share_of_stock_step"))
            ratio_s = f"{ratio:.3f}x" if "ratio" in r else f"{100 * ratio:.2f}%"
            if "cpu_ratio" in r:
                ratio_s += f" (CPU {r['cpu_ratio']:.3f}x)"
            mem = mem_cells(r) if r.get("memory_method") else "- | -"
            out.append(
                f"| {r['resolution']} px | {r['name']} | {_fmt_s(r['median_s'])} | {_fmt_s(r['cpu_median_s'])} | {ratio_s} "
                f"| {mem} | {_fmt_load(r)} | {r['repeats']} | {r.get('note', '')} |"
            )

    section_table(
        "unet_step", "Per denoising step: stock vs L-CAD UNet",
        "One CFG step = one UNet call on a batch of 2 (unconditional + conditional), fp32, default (SDPA) attention.",
        "vs stock",
    )
    section_table(
        "conv_in", "The first convolution alone",
        "Per step, batch 2. 'as now': `LCADUNet2DConditionModel` concatenates the 512 luminance channels to the latent "
        "and convolves all 516 every step. 'cached': the luminance part of the convolution (constant during sampling, "
        "identical for both CFG halves) computed once per image, leaving a 4-channel convolution and an add per step.",
        "share of a stock step",
    )
    section_table(
        "instance_step", "Per denoising step: instance-aware refinement",
        "L-CAD UNet, one CFG step, 3 phrases with masks, refinement on every cross-attention layer. 'official' runs the "
        "UNet twice per step (the release's algorithm; this port computes the logit gradient in closed form, so no "
        "backward pass). 'as released (emulated)': the work the released sampler does per step "
        "(`benchmarks/release_emulation.py`): the luminance encoder again on both CFG halves, pass 1 with autograd "
        "recording and explicit attention logits kept in every attention layer, one `autograd.grad` per "
        "cross-attention layer, pass 2 reusing the kept logits.",
        "vs plain",
    )
    e2e = [r for r in rows if r["section"] == "end_to_end"]
    if e2e:
        out += [
            "",
            "## End to end: one image",
            "",
            f"One square grey image colourised at its own size, CFG {GUIDANCE_SCALE:g}, "
            f"prompt \"{PROMPT}\" with one mask per phrase, PIL output. Release defaults: DDIM 50 steps, two-pass "
            "refinement (mean-reduced BCE), computed as the released code computes it "
            "(`benchmarks/release_emulation.py`: per step the luminance encoder again, pass 1 with autograd and "
            "explicit attention, a gradient per cross-attention layer, pass 2; no Lab recombination at the end). "
            "Release settings, this port: the same settings through `LCADPipeline` (`mode=\"official\"`, closed-form "
            "gradient, luminance encoded once), for reference. Our defaults: `LCADPipeline` with DPM-Solver++ (2M) 20 "
            "steps, single-pass refinement. 'Before' = text and luminance encoding (and the first step's excess over "
            "the median step); 'after' = luminance-guided decoding and post-processing. The goal compares our defaults "
            "with the release defaults.",
            "",
            f"| Resolution | Setting | Steps (run) | UNet passes/step | Luminance encodings/image | Median per image | "
            f"Per step | Before / after steps | vs ours | {mem_head} | Other load | Runs | Note |",
            "|---" * 14 + "|",
        ]
        for r in e2e:
            if not r["measured"]:
                out.append(f"| {r['resolution']} px | {r['name']} |" + " - |" * 12 + f" {r.get('note', '')} |")
                continue
            steps = f"{r['steps']} ({r['steps_run']})"
            total = _fmt_s(r["median_s"]) + (" (extrapolated)" if r["extrapolated"] else "")
            out.append(
                f"| {r['resolution']} px | {r['name']}: {r['sampler']}, {r['refinement']} | {steps} | {r['unet_passes_per_step']} "
                f"| {r['luminance_encodings']} | {total} | {_fmt_s(r['step_s'])} | {_fmt_s(r['before_steps_s'])} / {_fmt_s(r['after_steps_s'])} "
                f"| {r['ratio_to_ours']:.2f}x | {mem_cells(r)} | {_fmt_load(r)} | {r['repeats']} | {r.get('note', '')} |"
            )
    section_table(
        "gpu", "GPU only: precision, attention kernel, torch.compile",
        "L-CAD UNet, one CFG step (batch 2).",
        "vs fp32",
    )
    out += ["", "## Method", ""]
    out += [f"- {line}" for line in report["method"]]
    out.append("")
    path.write_text("\n".join(out), encoding="utf-8")


def write_chart(report: dict[str, Any], path: Path) -> None:
    """A horizontal bar chart (PIL only, no plotting dependency): per-step rows and end-to-end rows."""
    rows = [r for r in report["rows"] if r["measured"] and r["section"] != "conv_in"]
    resolutions = sorted({r["resolution"] for r in rows})
    per_step = [r for r in rows if r["section"] != "end_to_end"]
    panels = [
        (f"Per denoising step at {res} px (CFG batch 2), median", [r for r in per_step if r["resolution"] == res])
        for res in resolutions
    ]
    panels.append(("End to end, one image, median (hatched: extrapolated)", [r for r in rows if r["section"] == "end_to_end"]))
    panels = [(title, sel) for title, sel in panels if sel]
    font = _font(14)
    small = _font(12)
    label_w, bar_w, value_w, row_h, title_h, margin = 480, 520, 110, 24, 34, 16
    height = margin * 2 + 40 + sum(title_h + row_h * len(sel) + 12 for _, sel in panels)
    width = margin * 2 + label_w + bar_w + value_w
    image = PIL.Image.new("RGB", (width, max(height, 120)), "white")
    draw = PIL.ImageDraw.Draw(image)
    draw.text((margin, margin), f"L-CAD speed: {report['device_slug']} ({report['mode']} run, {report['machine']['date_utc']})",
              fill="black", font=font)
    colours = {"unet_step": (70, 110, 180), "instance_step": (220, 130, 40), "gpu": (90, 160, 90), "end_to_end": (150, 80, 160)}
    y = margin + 40
    for title, sel in panels:
        draw.text((margin, y), title, fill="black", font=font)
        y += title_h
        top = max(r["median_s"] for r in sel)
        for r in sel:
            label = f"{r['resolution']} px  " + ("L-CAD UNet, " if r["section"] == "instance_step" else "") + r["name"]
            if r["section"] == "end_to_end":
                label += f" ({r['steps']} steps)"
            draw.text((margin, y + 4), label[:72], fill="black", font=small)
            x0 = margin + label_w
            length = max(1, int(bar_w * r["median_s"] / top))
            box = [x0, y + 3, x0 + length, y + row_h - 3]
            draw.rectangle(box, fill=colours.get(r["section"], (120, 120, 120)))
            if r.get("extrapolated"):
                for hx in range(x0, x0 + length, 8):
                    draw.line([hx, y + row_h - 3, min(hx + 8, x0 + length), y + 3], fill="white", width=2)
            draw.text((x0 + length + 6, y + 4), _fmt_s(r["median_s"]), fill="black", font=small)
            y += row_h
        y += 12
    image.save(path)


def _font(size: int) -> PIL.ImageFont.ImageFont:
    try:
        return PIL.ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return PIL.ImageFont.load_default()


def method_notes(cfg: RunConfig, device: torch.device) -> list[str]:
    notes = [
        "All rows come from one process and the same inputs; models have random weights (timings do not depend on them).",
        f"Per-step sections: {cfg.step_warmup} warm-up call per case ({cfg.instance_warmup} for the refinement cases), then "
        "the timed calls (Repeats column) of the cases taken in turns, the order rotated each round; the median is "
        "reported, and the ratio is the ratio of the medians ('paired' in the JSON: the median of the per-round ratios). "
        "CPU time = process CPU time (all threads) of the call, beside the wall time since it is less sensitive to "
        "other processes competing for the cores (though threads spinning while they wait for a core count in it too).",
        f"End to end: one warm-up call of each setting ({cfg.e2e_warmup_steps} step(s)) per resolution, then the timed "
        "calls (Runs column) of the settings, taken in turns. The scheduler's `step` is wrapped to time-stamp each "
        "denoising step; per step = median interval between stamps; 'before' and 'after' = the rest of the call. "
        "Forward hooks count the UNet passes (UNet passes/step: that count over the steps run) and the luminance "
        "encoder's passes (per image, scaled to the real step count where steps were extrapolated).",
        "The release's own work is rebuilt from this port's models in `benchmarks/release_emulation.py`, following "
        "the released sampler (DDIMSampler_withsam.p_sample_ddim_with_attn_gdc, ControlLDM_cat.apply_model; see "
        "shared/reference/official-implementation.md): per step the luminance encoder on both CFG halves, pass 1 with "
        "the latent and the cross-attention weights requiring gradients, every attention layer computing and keeping "
        "explicit logits, torch.autograd.grad of each cross-attention layer's mean BCE, pass 2 without gradients "
        "reusing the kept logits; the VAE's attention explicit as well. With self-attention recomputed in pass 2 it "
        "gives this port's official-mode output (tests/test_release_emulation.py), so the timed work is the "
        "algorithm itself. The release turns the decoded image straight into 8-bit RGB; this port's Lab "
        "recombination and resize back are not charged to it (which only flatters the release).",
        "Peak memory: the process's peak RSS (VmHWM), reset before every timed call via /proc/self/clear_refs after "
        "a young-generation gc + malloc_trim, so each row has its own peak; 'rise' = peak minus the RSS at the call's start, i.e. what the "
        "call needed on top of the loaded models (the absolute peak counts them: both UNets, the VAE and CLIP in the "
        "first section; the stock UNet is freed after it, so later peaks count the L-CAD models only)."
        if PeakMemory._hwm_reset_works is not False
        else "Peak memory: RSS sampled every 5 ms by a thread (VmHWM could not be reset here); short spikes may be missed.",
    ]
    if device.type == "cuda":
        notes.append("CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats per call; every timing synchronises.")
    if any(v < E2E_SETTINGS[s]["steps"] for s, per in cfg.e2e_steps.items() for v in per.values()):
        runs = ", ".join(
            f"{s} at {r} px: {v} of {E2E_SETTINGS[s]['steps']} steps"
            for s, per in cfg.e2e_steps.items() for r, v in per.items() if v < E2E_SETTINGS[s]["steps"]
        )
        notes.append(f"Extrapolated end-to-end rows ({runs}): total = fixed cost + real step count x measured median step.")
    if cfg.mode == "quick":
        notes.append("--quick: 256 px only, few repeats, scaled-down end-to-end step counts (extrapolated): a smoke run; "
                     "the committed results come from a full run.")
    if cfg.mode == "tiny":
        notes.append("--tiny: tiny random models for testing the machinery; the numbers mean nothing.")
    return notes


# ==================================================================================================== main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="every row, 256 px, few repeats, scaled-down e2e steps (< 10 min on a 2-core CPU)"
    )
    size.add_argument("--tiny", action="store_true", help="tiny random models: test the machinery in seconds")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help="where the JSON, Markdown and PNG go")
    parser.add_argument("--resolutions", type=int, nargs="+", help="image sizes in px (overrides the mode's)")
    parser.add_argument("--step-repeats", type=int, help="timed calls per case in the per-step sections")
    parser.add_argument("--e2e-repeats", type=int, help="timed pipeline calls per setting and resolution")
    parser.add_argument(
        "--e2e-steps", type=int, help="run this many steps of each e2e setting (capped at its real count) and extrapolate"
    )
    parser.add_argument("--release-512-steps", type=int, default=6,
                        help="full run on a CPU: steps actually run for the 512 px release row, the rest extrapolated "
                        "(the rows of the release settings in this port run 10 steps)")
    parser.add_argument("--sections", nargs="+", default=["unet_step", "instance_step", "end_to_end", "gpu"],
                        choices=["unet_step", "instance_step", "end_to_end", "gpu"], help="sections to run")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--quiet-wait", type=float, default=0.0, metavar="S",
        help="shared machine: before each timed call wait up to S seconds for other processes to use < 0.3 cores",
    )
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode for the GPU row (default: torch's default)")
    parser.add_argument("--gpu-rows-on-cpu", action="store_true", help=argparse.SUPPRESS)  # developer: test the GPU code path
    parser.add_argument("--tag", default="", help="suffix for the output file names")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads is None and args.tiny:
        args.threads = 1  # tiny ops: a second thread only adds synchronisation, badly so on a shared machine
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    cfg = make_config(args, device)
    QUIET.max_wait_s = args.quiet_wait

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    machine = describe_machine(device)
    slug = device_slug(device)
    suffix = "" if cfg.mode == "full" else f"_{cfg.mode}"
    suffix += f"_{_slug(args.tag)}" if args.tag else ""
    log(f"device {slug}, mode {cfg.mode}, resolutions {cfg.resolutions}")
    models = build_models(cfg.mode == "tiny", device)
    log(f"models built ({models.size}): UNet {parameter_count(models.stock_unet) / 1e6:.1f} M, "
        f"L-CAD UNet {parameter_count(models.lcad_unet) / 1e6:.1f} M parameters")

    rows: list[dict] = []
    sections = {
        "unet_step": section_unet_step,
        "instance_step": section_instance_step,
        "end_to_end": section_end_to_end,
        "gpu": section_gpu,
    }
    for name, fn in sections.items():
        if name in args.sections:
            log(f"section {name}")
            rows += fn(models, cfg, device, log)
        if name == "unet_step" and models.stock_unet is not None:
            # Only the first section needs the stock UNet. Freeing it leaves room for the release's two-pass step,
            # whose autograd graph with explicit attention takes ~16 GiB at 512 px on a CPU (with both UNets loaded a
            # 24 GiB machine runs out).
            models.stock_unet = None
            gc.collect()
            _malloc_trim()
            log("stock UNet freed (later sections use the L-CAD models only)")

    load_end = _loadavg()
    report = {
        "schema": SCHEMA_VERSION,
        "mode": cfg.mode,
        "device_slug": slug,
        "command": " ".join(["python benchmarks/speed.py", *(sys.argv[1:] if argv is None else argv)]),
        "models": models.size,
        "machine": machine,
        "config": asdict(cfg),
        "load_average_at_end": load_end,
        "shared_machine": any((r.get("other_cores") or 0) > 0.3 for r in rows if r["section"] != "conv_in"),
        "quiet_wait": {"max_wait_s": QUIET.max_wait_s, "waited_s": round(QUIET.waited_s, 1), "gave_up": QUIET.gave_up},
        "rows": rows,
        "goals": evaluate_goals(rows),
        "method": method_notes(cfg, device),
    }
    report["run_wall_s"] = round(time.perf_counter() - started, 1)
    out_dir = args.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"speed_{slug}{suffix}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    write_markdown(report, stem.with_suffix(".md"))
    write_chart(report, stem.with_suffix(".png"))
    log(f"wrote {stem}.json, .md, .png")
    for goal in report["goals"]:
        log(f"goal {'met' if goal['met'] else 'NOT MET'}: {goal['goal']}: {goal['value']}x ({goal['detail']})")
    return report


if __name__ == "__main__":
    main()
