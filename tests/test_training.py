"""Both training stages, run as users run them: `accelerate launch` (a CPU config written here) on tiny models and a
folder of scikit-image photos (plus one unreadable file).

- Stage 1 then stage 2 on its output: the loss of a fixed batch falls, checkpoints and validation grids are written,
  and the saved models load and colourise (stage 2's folder also as Hub remote code in a fresh process).
- LoRA training saves a plain pipeline with the adapters merged.
- Resume: a run stopped after a checkpoint and resumed with `--resume_from_checkpoint latest` ends with the weights
  of an uninterrupted run (mid-epoch resume, warm-up scheduler, EMA, gradient accumulation, discriminator).
- Bad flags and bad data stop before training with a message naming the flag; an untrained luminance encoder is
  refused; the data pipeline's grey input, augmentation, description ratios and skipping of unreadable images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file
from skimage import data as skdata

from tiny_models import make_stock_unet, make_stock_vae, make_text_encoder, make_tokenizer

from lcad_pipeline import LCADPipeline, LuminanceAutoencoderKL
from lcad_pipeline.descriptions import is_colour_token
from lcad_pipeline.image_processor_lcad import rgb_to_lightness
from lcad_pipeline.training_data import (
    LCADTrainingDataset,
    load_image_caption_dataset,
    random_resized_crop_box,
)


REPO = Path(__file__).resolve().parents[1]
TRAINING = REPO / "training"
sys.path.insert(0, str(TRAINING))

import train_latent  # noqa: E402
import train_pixel  # noqa: E402


PHOTOS = {
    "astronaut": "an astronaut in a white suit in front of a red and blue flag",
    "chelsea": "an orange cat with green eyes",
    "coffee": "a white cup of brown coffee on a red saucer",
    "colorwheel": "a colorful wheel",
    "hubble_deep_field": "yellow and red galaxies in a black sky",
    "immunohistochemistry": "brown cells on a blue background",
    "rocket": "a white rocket under a blue sky",
}
CPU_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: 'NO'
downcast_bf16: 'no'
machine_rank: 0
main_training_function: main
mixed_precision: 'no'
num_machines: 1
num_processes: 1
use_cpu: true
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny stock SD folder, a photo folder with metadata.jsonl (and one broken file), an accelerate CPU config."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    root = tmp_path_factory.mktemp("training")
    tokenizer = make_tokenizer()
    StableDiffusionPipeline(
        vae=make_stock_vae(),
        unet=make_stock_unet(),
        text_encoder=make_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**LCADPipeline.default_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(root / "sd")

    images = root / "photos"
    images.mkdir()
    with open(images / "metadata.jsonl", "w", encoding="utf-8") as handle:
        for name, caption in PHOTOS.items():
            photo = PIL.Image.fromarray(getattr(skdata, name)())
            photo.thumbnail((56, 56))
            photo.save(images / f"{name}.jpg")
            handle.write(json.dumps({"file_name": f"{name}.jpg", "text": caption}) + "\n")
        handle.write(json.dumps({"file_name": "broken.jpg", "text": "a red thing"}) + "\n")
    (images / "broken.jpg").write_text("not an image")

    (root / "accelerate_cpu.yaml").write_text(CPU_CONFIG)
    untrained = LuminanceAutoencoderKL.from_vae(make_stock_vae())
    untrained.save_pretrained(root / "untrained_vae")
    return root


def launch(workspace: Path, script: str, args: list[str], wait: bool = True):
    """`accelerate launch --config_file <cpu config> training/<script> ...` in a subprocess (offline, one thread)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(workspace / "datasets_cache"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO),
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(workspace / "accelerate_cpu.yaml"),
        str(TRAINING / script), *args,
    ]
    process = subprocess.Popen(command, cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return finish(process) if wait else process


def finish(process) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=600)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "training_log.jsonl").read_text().splitlines()]


def assert_loss_falls(log: list[dict], key: str) -> tuple[float, float]:
    values = [entry[key] for entry in log]
    first, last = float(np.mean(values[:5])), float(np.mean(values[-5:]))
    assert last < first, (key, values)
    return first, last


def assert_checkpoint(folder: Path) -> None:
    assert folder.is_dir(), folder
    for name in ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"):
        assert (folder / name).is_file(), (folder, name)


def max_difference(a: Path, b: Path) -> float:
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    return max((first[k].double() - second[k].double()).abs().max().item() for k in first)


def data_args(workspace: Path) -> list[str]:
    return ["--train_data_dir", str(workspace / "photos"), "--resolution", "32", "--train_batch_size", "2"]


# ------------------------------------------------------------------------------------------------ stage 1


@pytest.fixture(scope="module")
def lpips_weights(workspace):
    from torch import nn

    torch.manual_seed(0)
    features = nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, 1, 2), nn.ReLU(),
        nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, 1, 1), nn.ReLU(), nn.Conv2d(384, 256, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(3, 2),
    )
    path = workspace / "alexnet_random.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def stage1(workspace, lpips_weights):
    """Stage 1 on one fixed batch: 12 steps, discriminator from step 4, LPIPS, checkpoints and validation every 6."""
    output = workspace / "stage1"
    result = launch(
        workspace,
        "train_pixel.py",
        [
            "--pretrained_model_name_or_path", str(workspace / "sd"), *data_args(workspace),
            "--output_dir", str(output), "--max_train_steps", "12", "--learning_rate", "1e-3",
            "--overfit_one_batch", "--discriminator_start_step", "4", "--lpips_weights", str(lpips_weights),
            "--checkpointing_steps", "6", "--validation_steps", "6",
            "--validation_image", str(workspace / "photos" / "coffee.jpg"), str(workspace / "photos" / "chelsea.jpg"),
        ],
    )
    return output, result


def test_pixel_stage_learns_checkpoints_validates_and_saves(stage1, coffee_gray):
    output, result = stage1
    log = read_log(output)
    assert [entry["step"] for entry in log] == list(range(1, 13))
    first, last = assert_loss_falls(log, "loss_rec")
    print(f"stage 1 loss_rec on a fixed batch: first 5 steps {first:.4f}, last 5 {last:.4f}")
    assert all("loss_per" in entry for entry in log)  # LPIPS from the given weights
    assert "loss_d" not in log[3] and all("loss_d" in entry and "d_weight" in entry for entry in log[4:])
    assert log[-1]["unreadable_images"] > 0 and "Skipping unreadable image" in result.stderr
    assert_checkpoint(output / "checkpoint-6")
    assert_checkpoint(output / "checkpoint-12")
    for name in ("step-000006.png", "step-000012.png", "final.png"):
        grid = PIL.Image.open(output / "validation" / name)
        assert grid.size == (3 * 32, 2 * 32)  # grey | reconstruction | original, one row per image
    assert (output / "README.md").is_file()

    vae = LuminanceAutoencoderKL.from_pretrained(output)
    assert vae.is_luminance_encoder_trained()
    stock = LuminanceAutoencoderKL.from_pretrained(output.parent / "sd", subfolder="vae")
    assert torch.equal(vae.decoder.conv_out.weight, stock.decoder.conv_out.weight)  # decoder frozen as released

    # The stage-1 VAE colourises inside an L-CAD pipeline.
    pipe = LCADPipeline.from_stable_diffusion(output.parent / "sd", default_processing_resolution=32)
    pipe = LCADPipeline(vae=vae, unet=pipe.unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                        scheduler=pipe.scheduler, default_processing_resolution=32)
    pipe.set_progress_bar_config(disable=True)
    image = coffee_gray.resize((48, 32))
    result_image = pipe(image, "a red cup", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert result_image.size == image.size and result_image.mode == "RGB"


# ------------------------------------------------------------------------------------------------ stage 2


@pytest.fixture(scope="module")
def stage2(workspace, stage1):
    """Stage 2 on stage 1's VAE, one fixed batch: 12 steps, EMA, checkpoints every 6, validation on a held-out photo."""
    output = workspace / "stage2"
    result = launch(
        workspace,
        "train_latent.py",
        [
            "--pretrained_model_name_or_path", str(workspace / "sd"), "--luminance_vae_path", str(stage1[0]),
            *data_args(workspace), "--output_dir", str(output), "--max_train_steps", "12",
            "--learning_rate", "2e-3", "--overfit_one_batch", "--use_ema", "--ema_decay", "0.5",
            "--checkpointing_steps", "6", "--checkpoints_total_limit", "1",
            "--validation_steps", "6", "--num_validation_images", "1", "--validation_inference_steps", "2",
        ],
    )
    return output, result


def test_latent_stage_learns_checkpoints_validates_and_saves(stage2, coffee_gray):
    output, result = stage2
    log = read_log(output)
    assert [entry["step"] for entry in log] == list(range(1, 13))
    first, last = assert_loss_falls(log, "loss")
    print(f"stage 2 eps-MSE on a fixed batch: first 5 steps {first:.4f}, last 5 {last:.4f}")
    assert not (output / "checkpoint-6").exists()  # --checkpoints_total_limit 1
    assert_checkpoint(output / "checkpoint-12")
    assert (output / "checkpoint-12" / "custom_checkpoint_1.pkl").is_file()  # the EMA
    for name in ("step-000006.png", "step-000012.png", "final.png"):
        grid = PIL.Image.open(output / "validation" / name)
        assert grid.size == (3 * 32, 32)  # grey | colourised | original of the held-out photo
    assert "Num examples = 7" in result.stderr  # 8 rows, one held out for validation
    card = (output / "README.md").read_text()
    assert "train_latent.py" in card and "--scarce_ratio" in card

    pipe = LCADPipeline.from_pretrained(output)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.default_processing_resolution == 32
    # Trained: the luminance input channels of the first convolution left zero; frozen down blocks unchanged.
    stock = load_file(output.parent / "sd" / "unet" / "diffusion_pytorch_model.safetensors")
    assert pipe.unet.conv_in.weight[:, 4:].abs().max() > 0
    assert torch.equal(pipe.unet.down_blocks[0].resnets[0].conv1.weight, stock["down_blocks.0.resnets.0.conv1.weight"])
    assert not torch.equal(pipe.unet.conv_out.weight, stock["conv_out.weight"])
    image = coffee_gray.resize((48, 32))
    colourised = pipe(image, "a red cup", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert colourised.size == image.size


FRESH_PROCESS = r"""
import importlib.abc, sys
class RefuseLCAD(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "lcad_pipeline":
            raise ImportError("lcad_pipeline is not installed here")
sys.meta_path.insert(0, RefuseLCAD())
import PIL.Image, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], custom_pipeline=sys.argv[1], trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
assert type(pipe).__name__ == "LCADPipeline", type(pipe)
image = pipe(PIL.Image.open(sys.argv[2]), "a red cup", num_inference_steps=2).images[0]
assert image.size == PIL.Image.open(sys.argv[2]).size
print("ok")
"""


def test_latent_stage_output_loads_as_remote_code(stage2, workspace):
    output, _ = stage2
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(workspace / "modules"), "PYTHONPATH": "",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(output), str(workspace / "photos" / "coffee.jpg")],
        cwd=workspace, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_lora_training_saves_a_plain_pipeline_with_merged_adapters(workspace, stage1):
    output = workspace / "lora"
    launch(
        workspace,
        "train_latent.py",
        [
            "--pretrained_model_name_or_path", str(workspace / "sd"), "--luminance_vae_path", str(stage1[0]),
            *data_args(workspace), "--output_dir", str(output), "--max_train_steps", "3",
            "--learning_rate", "1e-2", "--trainable", "lora", "--lora_rank", "2",
        ],
    )
    saved = load_file(output / "unet" / "diffusion_pytorch_model.safetensors")
    stock = load_file(workspace / "sd" / "unet" / "diffusion_pytorch_model.safetensors")
    assert not any("lora" in key for key in saved)
    assert set(saved) == set(stock)
    query = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight"
    assert not torch.equal(saved[query], stock[query])  # the adapter, merged
    assert torch.equal(saved["conv_out.weight"], stock["conv_out.weight"])  # not in the LoRA set
    assert saved["conv_in.weight"][:, 4:].abs().max() > 0  # the luminance input is trained with LoRA too
    pipe = LCADPipeline.from_pretrained(output)
    assert pipe.unet.conv_in.weight.shape[1] == 4 + pipe.vae.luminance_feature_channels


# ------------------------------------------------------------------------------------------------ resume


def _resume_runs(workspace: Path, script: str, name: str, args: list[str], stop: int, total: int):
    reference, interrupted = workspace / f"{name}_reference", workspace / f"{name}_resumed"
    runs = [
        launch(workspace, script, [*args, "--output_dir", str(reference), "--max_train_steps", str(total)], wait=False),
        launch(workspace, script, [*args, "--output_dir", str(interrupted), "--max_train_steps", str(stop)], wait=False),
    ]
    for run in runs:
        finish(run)
    resumed = launch(
        workspace, script,
        [*args, "--output_dir", str(interrupted), "--max_train_steps", str(total), "--resume_from_checkpoint", "latest"],
    )
    return reference, interrupted, resumed


def test_latent_stage_resumes_to_the_uninterrupted_weights(workspace, stage1):
    args = [
        "--pretrained_model_name_or_path", str(workspace / "sd"), "--luminance_vae_path", str(stage1[0]),
        *data_args(workspace), "--learning_rate", "1e-3", "--checkpointing_steps", "2",
        "--use_ema", "--ema_decay", "0.9", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "3",
    ]
    reference, resumed_dir, resumed = _resume_runs(workspace, "train_latent.py", "latent", args, stop=3, total=5)
    assert "Resuming from checkpoint" in resumed.stdout and "(global step 2)" in resumed.stdout
    reference_log, resumed_log = read_log(reference), read_log(resumed_dir)
    # The interrupted run logged steps 1-3; resumed from checkpoint-2, it continues at step 3.
    assert [entry["step"] for entry in resumed_log] == [1, 2, 3, 3, 4, 5]
    assert resumed_log[3:] == reference_log[2:]  # same losses, learning rates (warm-up restored), data
    difference = max_difference(
        reference / "unet" / "diffusion_pytorch_model.safetensors",
        resumed_dir / "unet" / "diffusion_pytorch_model.safetensors",
    )
    print(f"stage 2 resumed vs uninterrupted: max |weight difference| = {difference:.3g}")
    assert difference <= 1e-6


def test_pixel_stage_resumes_to_the_uninterrupted_weights(workspace):
    args = [
        "--pretrained_model_name_or_path", str(workspace / "sd"), *data_args(workspace), "--learning_rate", "1e-3",
        "--gradient_accumulation_steps", "2", "--checkpointing_steps", "3", "--discriminator_start_step", "1",
    ]
    reference, resumed_dir, resumed = _resume_runs(workspace, "train_pixel.py", "pixel", args, stop=3, total=4)
    # No --lpips_weights: a warning, and training without the perceptual term.
    assert "No --lpips_weights given" in resumed.stderr
    assert "(global step 3)" in resumed.stdout
    reference_log, resumed_log = read_log(reference), read_log(resumed_dir)
    assert [entry["step"] for entry in resumed_log] == [1, 2, 3, 4]
    assert "loss_per" not in reference_log[0]
    assert resumed_log[3] == reference_log[3]
    difference = max_difference(
        reference / "diffusion_pytorch_model.safetensors", resumed_dir / "diffusion_pytorch_model.safetensors"
    )
    print(f"stage 1 resumed vs uninterrupted: max |weight difference| = {difference:.3g}")
    assert difference <= 1e-6


# ------------------------------------------------------------------------------------------------ refusals


def _latent_args(workspace: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(workspace / "sd"), "--train_data_dir", str(workspace / "photos"),
        "--output_dir", str(workspace / "unused"), "--cache_dir", str(workspace / "datasets_cache"), *extra,
    ]


def test_untrained_luminance_encoder_is_refused(workspace):
    args = train_latent.parse_args(_latent_args(workspace, "--luminance_vae_path", str(workspace / "untrained_vae")))
    with pytest.raises(ValueError, match="untrained.*Run stage 1 first.*train_pixel.py"):
        train_latent.load_pipeline(args)
    without = train_latent.parse_args(_latent_args(workspace))
    with pytest.raises(ValueError, match="--luminance_vae_path"):
        train_latent.load_pipeline(without)


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--scarce_ratio", "1.5"], "--scarce_ratio"),
        (["--partial_ratio", "-0.1"], "--partial_ratio"),
        (["--text_dropout", "2"], "--text_dropout"),
        (["--luminance_vae_path", "/nonexistent/stage1"], "--luminance_vae_path"),
        (["--resolution", "30"], "--resolution"),
        (["--validation_image", "/nonexistent.png"], "--validation_image"),
        (["--resume_from_checkpoint", "checkpoint-99"], "--resume_from_checkpoint"),
        (["--push_to_hub"], "--push_to_hub"),
    ],
)
def test_bad_latent_flags_stop_with_a_message_naming_the_flag(workspace, capsys, extra, flag):
    with pytest.raises(SystemExit) as stopped:
        train_latent.parse_args(_latent_args(workspace, *extra))
    assert stopped.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--train_data_dir", "/nonexistent"], "--train_data_dir"),
        (["--rec_window", "4"], "--rec_window"),
        (["--lpips_weights", "/nonexistent.pth"], "--lpips_weights"),
        (["--discriminator_start_step", "-1"], "--discriminator_start_step"),
    ],
)
def test_bad_pixel_flags_stop_with_a_message_naming_the_flag(workspace, capsys, extra, flag):
    base = ["--pretrained_model_name_or_path", str(workspace / "sd"), "--train_data_dir", str(workspace / "photos"),
            "--output_dir", str(workspace / "unused")]
    with pytest.raises(SystemExit):
        train_pixel.parse_args(base + extra)
    assert flag in capsys.readouterr().err


def test_bad_data_stops_before_training_naming_the_flag(workspace, tmp_path):
    cache = str(workspace / "datasets_cache")
    plain = tmp_path / "plain"
    plain.mkdir()
    PIL.Image.fromarray(skdata.coffee()).resize((40, 30)).save(plain / "coffee.png")
    with pytest.raises(ValueError, match="--caption_column 'text'.*metadata.jsonl"):
        load_image_caption_dataset(train_data_dir=str(plain), cache_dir=cache)
    assert len(load_image_caption_dataset(train_data_dir=str(plain), caption_column=None, cache_dir=cache)) == 1
    with pytest.raises(ValueError, match="--caption_column 'caption'.*'text'"):
        load_image_caption_dataset(train_data_dir=str(workspace / "photos"), caption_column="caption", cache_dir=cache)
    with pytest.raises(ValueError, match="--image_column 'picture'"):
        load_image_caption_dataset(train_data_dir=str(workspace / "photos"), image_column="picture", cache_dir=cache)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="No images found in --train_data_dir"):
        load_image_caption_dataset(train_data_dir=str(empty), cache_dir=cache)

    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"coffee.png": ["a red cup"], "missing.jpg": ["a blue car"]}))
    dataset = load_image_caption_dataset(train_data_dir=str(plain), caption_file=str(captions))
    assert len(dataset) == 1 and list(dataset[0]["text"]) == ["a red cup"]
    captions.write_text(json.dumps({"missing.jpg": ["a blue car"]}))
    with pytest.raises(ValueError, match="No images found.*--caption_file"):
        load_image_caption_dataset(train_data_dir=str(plain), caption_file=str(captions))
    captions.write_text(json.dumps(["not", "a", "map"]))
    with pytest.raises(ValueError, match="--caption_file.*JSON object"):
        load_image_caption_dataset(train_data_dir=str(plain), caption_file=str(captions))


# ------------------------------------------------------------------------------------------------ data pipeline


def test_dataset_items_grey_input_augmentation_and_unreadable_images(workspace):
    dataset = load_image_caption_dataset(
        train_data_dir=str(workspace / "photos"), cache_dir=str(workspace / "datasets_cache")
    )
    items = LCADTrainingDataset(dataset, resolution=32, seed=3)
    again = LCADTrainingDataset(dataset, resolution=32, seed=3)
    names = [os.path.basename(row["image"]["path"]) for row in dataset]
    broken = names.index("broken.jpg")
    for index in range(len(items)):
        item = items[index]
        assert item["pixel_values"].shape == (3, 32, 32) and item["lightness"].shape == (1, 32, 32)
        assert -1 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1
        rgb = (item["pixel_values"][None] + 1) / 2
        torch.testing.assert_close(item["lightness"][None], rgb_to_lightness(rgb))  # Lab L of the same crop
        assert torch.equal(item["pixel_values"], again[index]["pixel_values"])  # seeded by (seed, epoch, index)
        assert item["unreadable"] == (1 if index == broken else 0)
    items.set_epoch(1)
    assert not all(torch.equal(items[i]["pixel_values"], again[i]["pixel_values"]) for i in range(len(items)))

    import random

    for seed in range(50):
        left, top, right, bottom = random_resized_crop_box(600, 400, random.Random(seed), scale=(0.8, 1.0))
        assert 0 <= left < right <= 600 and 0 <= top < bottom <= 400
        assert (right - left) * (bottom - top) >= 0.8 * 600 * 400 * 0.98


def test_description_flags_reach_the_training_data(workspace):
    def levels(*extra):
        args = train_latent.parse_args(_latent_args(workspace, "--luminance_vae_path", str(workspace), *extra))
        dataset, _ = train_latent.build_datasets(args)
        return [dataset[i] for i in range(len(dataset))]

    scarce = levels("--scarce_ratio", "1", "--text_dropout", "0")
    assert {item["level"] for item in scarce} == {"scarce"}
    assert not any(is_colour_token(word) for item in scarce for word in item["text"].replace(",", " ").split())
    assert {item["text"] for item in levels("--text_dropout", "1")} == {""}
    complete = levels("--scarce_ratio", "0", "--partial_ratio", "0", "--text_dropout", "0")
    assert {item["text"] for item in complete} <= set(PHOTOS.values()) | {"a red thing"}


def test_own_photos_example_writes_a_caption_file_the_loader_reads(workspace, tmp_path, capsys):
    import runpy

    photos = tmp_path / "my photos"
    (photos / "1950s").mkdir(parents=True)
    PIL.Image.fromarray(skdata.coffee()).resize((60, 40)).save(photos / "cup.jpg")
    (photos / "cup.txt").write_text("a white cup on a red saucer\n")
    PIL.Image.fromarray(skdata.chelsea()).resize((60, 40)).save(photos / "1950s" / "cat.png")
    example = runpy.run_path(str(REPO / "examples" / "train_on_own_photos.py"))
    output = tmp_path / "out"
    assert example["main"]([str(photos), str(output), "--base", "out/lcad-coco", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "2 photos (1 described)" in printed and "--trainable lora" in printed and "train_latent.py" in printed
    captions = json.loads((output / "captions.json").read_text())
    assert captions == {"1950s/cat.png": ["a colorful image"], "cup.jpg": ["a white cup on a red saucer"]}
    dataset = load_image_caption_dataset(train_data_dir=str(photos), caption_file=str(output / "captions.json"))
    assert len(dataset) == 2


def test_dataset_name_loads_a_local_dataset_folder(workspace):
    dataset = load_image_caption_dataset(
        dataset_name=str(workspace / "photos"), cache_dir=str(workspace / "datasets_cache")
    )
    assert len(dataset) == len(PHOTOS) + 1 and set(dataset.column_names) == {"image", "text"}
