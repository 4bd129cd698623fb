"""`lcad convert`: released checkpoints (reduced widths, every key of the released layout) to LCADPipeline folders."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from ldm_reference import FULL, SCHEDULE_KEYS, SMALL, random_checkpoint, released_layout_shapes
from tiny_models import make_tokenizer

from lcad_pipeline import LCADPipeline
from lcad_pipeline.cli import main as lcad_main
from lcad_pipeline.convert import ConversionError, convert_checkpoint, load_checkpoint, split_and_map

HERE = Path(__file__).resolve().parent
DROPPED = {
    *SCHEDULE_KEYS,
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "first_stage_model.g_encoder.norm_out.weight",
    "first_stage_model.g_encoder.norm_out.bias",
    "first_stage_model.g_encoder.conv_out.weight",
    "first_stage_model.g_encoder.conv_out.bias",
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    make_tokenizer().save_pretrained(root / "tokenizer")
    state = random_checkpoint(SMALL, seed=0)
    torch.save(state, root / "small.ckpt")
    return root, state


@pytest.fixture(scope="module")
def converted(workdir):
    root, state = workdir
    pipe = convert_checkpoint(root / "small.ckpt", root / "pipeline", tokenizer=root / "tokenizer", progress=False)
    return root / "pipeline", pipe


def _fingerprint(tensor: torch.Tensor) -> tuple:
    flat = tensor.detach().flatten().float()
    return (flat.numel(), *flat[:6].tolist())


def _run_cli(*args: str, capsys) -> tuple[int, str]:
    status = lcad_main(["convert", *map(str, args), "--quiet"])
    return status, capsys.readouterr().err


def test_layout_generator_reproduces_the_released_key_list():
    """The test checkpoints' generator, at full size, gives exactly the released keys and shapes."""
    lines = (HERE / "ldm_reference_checkpoint_keys.tsv").read_text().splitlines()
    released = {
        key: tuple(int(n) for n in shape.split("x")) for key, shape in (line.split("\t") for line in lines[1:])
    }
    assert len(released) == 1270
    assert released_layout_shapes(FULL) == released


def test_reduced_widths_are_inferred(converted):
    _, pipe = converted
    unet, vae, text = pipe.unet.config, pipe.vae.config, pipe.text_encoder.config
    assert list(unet.block_out_channels) == [32, 64, 128, 128]
    assert unet.layers_per_block == 2 and unet.attention_head_dim == 8 and unet.cross_attention_dim == 64
    assert unet.luminance_channels == 128 and unet.luminance_injection == "conv_in" and unet.in_channels == 4
    assert list(unet.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet.use_linear_projection is False and unet.sample_size == 32
    assert list(vae.block_out_channels) == [32, 64, 128, 128] and vae.layers_per_block == 2
    assert vae.scaling_factor == pytest.approx(0.18215) and vae.luminance_in_channels == 3
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.vocab_size) == (64, 128, 2, 1000)
    assert text.hidden_act == "quick_gelu" and text.max_position_embeddings == 77
    assert pipe.unet.conv_in.weight.shape == (32, 4 + 128, 3, 3)


def test_every_parameter_comes_from_the_checkpoint(workdir, converted):
    """Each parameter of the saved folder equals exactly one checkpoint tensor, and every weight is used once."""
    _, state = workdir
    folder, in_memory = converted
    loaded = LCADPipeline.from_pretrained(folder)
    by_fingerprint: dict[tuple, str] = {}
    for key, tensor in state.items():
        if key in DROPPED:
            continue
        assert _fingerprint(tensor) not in by_fingerprint, key  # distinct random values identify the source
        by_fingerprint[_fingerprint(tensor)] = key

    used: dict[str, str] = {}
    for component in ("unet", "vae", "text_encoder"):
        model = getattr(loaded, component)
        memory = dict(getattr(in_memory, component).state_dict())
        for name, value in model.state_dict().items():
            target = f"{component}.{name}"
            assert value.device.type == "cpu", target
            source = by_fingerprint.get(_fingerprint(value))
            assert source is not None, f"{target} does not come from the checkpoint (left at initialisation?)"
            assert source not in used, f"{source} feeds both {used[source]} and {target}"
            used[source] = target
            original = state[source]
            assert torch.equal(value, original.reshape(value.shape)), target  # attention 1x1 convs become linear
            assert torch.equal(value, memory[name]), target  # the returned pipeline is the saved one
    unused = set(by_fingerprint.values()) - set(used)
    assert not unused, f"checkpoint weights not used: {sorted(unused)}"
    assert set(state) == set(used) | DROPPED


def test_converted_pipeline_runs(converted, coffee_gray):
    folder, _ = converted
    pipe = LCADPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.luminance_normalization == "official"
    assert pipe.config.default_denoising_steps == 50 and pipe.config.default_processing_resolution == 256
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.scheduler.config.steps_offset == 1
    gray = coffee_gray.resize((48, 32))
    image = pipe(gray, "a red cup", num_inference_steps=2, processing_resolution=64).images[0]
    assert image.size == gray.size


def test_output_folder_contents(converted):
    folder, _ = converted
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "LCADPipeline"
    assert index["unet"] == ["lcad_pipeline", "LCADUNet2DConditionModel"]
    assert index["vae"] == ["lcad_pipeline", "LuminanceAutoencoderKL"]
    for path in (
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "pipeline.py",
        "unet/lcad_pipeline.py",
        "vae/lcad_pipeline.py",
        "tokenizer/tokenizer_config.json",
        "scheduler/scheduler_config.json",
        "README.md",
    ):
        assert (folder / path).is_file(), path
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.ckpt"))
    card = (folder / "README.md").read_text()
    assert "license: cc-by-nc-4.0" in card and "library_name: diffusers" in card
    assert "small.ckpt" in card


def test_fp16_checkpoint_converts(workdir, tmp_path):
    root, state = workdir
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    torch.save(half, tmp_path / "half.ckpt")
    pipe = convert_checkpoint(tmp_path / "half.ckpt", tmp_path / "out", tokenizer=root / "tokenizer", progress=False)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float16
    assert torch.equal(pipe.unet.conv_in.weight, half["model.diffusion_model.input_blocks.0.0.weight"])
    upcast = convert_checkpoint(
        tmp_path / "half.ckpt", tmp_path / "out32", tokenizer=root / "tokenizer", dtype="float32", progress=False
    )
    assert upcast.unet.dtype == torch.float32
    assert torch.equal(upcast.unet.conv_in.weight, half["model.diffusion_model.input_blocks.0.0.weight"].float())


def test_state_dict_wrapped_and_safetensors_checkpoints_convert(workdir, tmp_path):
    root, state = workdir
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1200}, tmp_path / "wrapped.ckpt")
    wrapped = convert_checkpoint(
        tmp_path / "wrapped.ckpt", tmp_path / "a", tokenizer=root / "tokenizer", progress=False
    )
    assert torch.equal(
        wrapped.vae.luminance_encoder.mid_zero_convs[1].weight[:, :, 0, 0],
        state["first_stage_model.g_encoder.zero_conv_mid2.weight"][:, :, 0, 0],
    )

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "weights.safetensors"))
    assert load_checkpoint(tmp_path / "weights.safetensors").keys() == state.keys()
    pipe = convert_checkpoint(
        tmp_path / "weights.safetensors", tmp_path / "b", tokenizer=root / "tokenizer", progress=False
    )
    assert torch.equal(pipe.unet.conv_out.weight, state["model.diffusion_model.out.2.weight"])


def test_other_layouts_convert():
    """Widths, levels and depths are read from the shapes, not assumed."""
    layout = replace(
        SMALL,
        model_channels=64,
        channel_mult=(1, 2, 2),
        attention_levels=(1, 2),
        num_res_blocks=1,
        vae_ch=64,
        vae_ch_mult=(1, 2, 4),
        vae_num_res_blocks=1,
        text_hidden=128,
        text_layers=3,
    )
    result = split_and_map(random_checkpoint(layout, seed=5))
    unet, vae = result.unet_config, result.vae_config
    assert unet["block_out_channels"] == [64, 128, 128] and unet["layers_per_block"] == 1
    assert unet["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert unet["up_block_types"] == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert unet["luminance_channels"] == 256 and unet["sample_size"] == 64
    assert vae["block_out_channels"] == [64, 128, 256] and vae["layers_per_block"] == 1
    assert result.text_encoder_config.num_hidden_layers == 3 and result.text_encoder_config.num_attention_heads == 2
    from lcad_pipeline.convert import build_models

    models = build_models(result)
    assert models["vae"].luminance_feature_channels == 256


def test_text_encoder_config_option(workdir, tmp_path):
    _, state = workdir
    config = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 1000,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    from lcad_pipeline.convert import load_text_encoder_config

    result = split_and_map(dict(state), text_encoder_config=load_text_encoder_config(tmp_path / "config.json"))
    assert result.text_encoder_config.num_attention_heads == 4
    (tmp_path / "wrong.json").write_text(json.dumps({**config, "num_hidden_layers": 12}))
    with pytest.raises(ConversionError, match="num_hidden_layers"):
        split_and_map(dict(state), text_encoder_config=load_text_encoder_config(tmp_path / "wrong.json"))


@pytest.mark.parametrize(
    "extra",
    [
        "model.diffusion_model.label_emb.0.0.weight",  # would be dropped silently by diffusers' UNet converter
        "first_stage_model.g_encoder.down.0.zero_conv.2.weight",
        "first_stage_model.loss.discriminator.main.0.weight",
        "control_model.input_hint_block.0.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.extra.weight",
    ],
)
def test_unknown_weight_fails_naming_it(workdir, extra):
    _, state = workdir
    broken = dict(state)
    broken[extra] = torch.randn(8, 8)
    with pytest.raises(ConversionError, match="unknown keys") as error:
        _build(broken)
    assert extra in str(error.value)


def _build(state):
    from lcad_pipeline.convert import build_models

    return build_models(split_and_map(state))


@pytest.mark.parametrize(
    "removed",
    [
        "first_stage_model.g_encoder.zero_conv_mid2.weight",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.3.0.op.bias",
        "first_stage_model.decoder.up.2.block.1.norm1.bias",
        "cond_stage_model.transformer.encoder.layers.1.mlp.fc2.weight",
        "first_stage_model.post_quant_conv.weight",
        "first_stage_model.decoder.up.1.upsample.conv.bias",  # indexed directly by diffusers' VAE converter
        "model.diffusion_model.output_blocks.2.1.conv.bias",  # likewise in the UNet converter
    ],
)
def test_missing_weight_fails_naming_it(workdir, removed):
    _, state = workdir
    broken = dict(state)
    del broken[removed]
    with pytest.raises(ConversionError, match="missing") as error:
        _build(broken)
    assert removed in str(error.value)


def test_schedule_mismatch_fails(workdir):
    _, state = workdir
    broken = dict(state)
    broken["betas"] = torch.linspace(1e-4, 2e-2, 1000)
    with pytest.raises(ConversionError, match="betas"):
        split_and_map(broken)


def test_unreadable_checkpoints_fail_clearly(workdir, tmp_path, capsys):
    root, _ = workdir
    data = (root / "small.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    status, err = _run_cli(
        tmp_path / "truncated.ckpt", tmp_path / "o1", "--tokenizer", root / "tokenizer", capsys=capsys
    )
    assert status == 2 and "truncated or corrupt" in err and "Traceback" not in err
    assert not (tmp_path / "o1").exists()

    status, err = _run_cli(tmp_path / "absent.ckpt", tmp_path / "o2", "--tokenizer", root / "tokenizer", capsys=capsys)
    assert status == 2 and "does not exist" in err

    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 100)
    status, err = _run_cli(
        tmp_path / "garbage.safetensors", tmp_path / "o3", "--tokenizer", root / "tokenizer", capsys=capsys
    )
    assert status == 2 and "safetensors" in err


class _NotATensor:
    pass


def test_pickled_code_is_not_executed(workdir, tmp_path, capsys):
    root, state = workdir
    torch.save({"state_dict": state, "hyper_parameters": _NotATensor()}, tmp_path / "lightning.ckpt")
    status, err = _run_cli(
        tmp_path / "lightning.ckpt", tmp_path / "out", "--tokenizer", root / "tokenizer", capsys=capsys
    )
    assert status == 2 and "other than tensors" in err


def test_cli_converts_and_respects_existing_folders(workdir, tmp_path, capsys):
    root, _ = workdir
    out = tmp_path / "pipe"
    status, err = _run_cli(root / "small.ckpt", out, "--tokenizer", root / "tokenizer", capsys=capsys)
    assert status == 0, err
    assert (out / "model_index.json").is_file()

    status, err = _run_cli(root / "small.ckpt", out, "--tokenizer", root / "tokenizer", capsys=capsys)
    assert status == 2 and "--overwrite" in err
    (out / "stale.txt").write_text("old")
    status, err = _run_cli(root / "small.ckpt", out, "--tokenizer", root / "tokenizer", "--overwrite", capsys=capsys)
    assert status == 0, err
    assert not (out / "stale.txt").exists() and (out / "model_index.json").is_file()

    other = tmp_path / "documents"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    status, err = _run_cli(root / "small.ckpt", other, "--tokenizer", root / "tokenizer", "--overwrite", capsys=capsys)
    assert status == 2 and "not a pipeline folder" in err
    assert (other / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["documents", "pipe"]  # no staging folders left


def test_unavailable_tokenizer_fails_clearly(workdir, tmp_path, capsys):
    root, _ = workdir
    status, err = _run_cli(
        root / "small.ckpt", tmp_path / "out", "--tokenizer", "lcad-tests/no-such-tokenizer", capsys=capsys
    )
    assert status == 2 and "tokenizer" in err and "--tokenizer" in err and "Traceback" not in err


def test_memory_mapping_avoids_copies(workdir):
    """Tensors of a zip checkpoint are memory-mapped and reach the models without copies (peak ~2x the file)."""
    root, _ = workdir
    state = load_checkpoint(root / "small.ckpt")
    weight = state["model.diffusion_model.input_blocks.0.0.weight"]
    from lcad_pipeline.convert import build_models

    models = build_models(split_and_map(state))
    assert models["unet"].conv_in.weight.data_ptr() == weight.data_ptr()
    size = (root / "small.ckpt").stat().st_size
    total = sum(t.numel() * t.element_size() for t in state.values())
    assert math.isclose(total, size, rel_tol=0.05)


def test_older_transformers_text_keys_and_bookkeeping_buffers(workdir):
    """CLIP keys saved with transformers 4's `text_model.` level, and ldm's optional buffers, are accepted."""
    _, state = workdir
    prefix = "cond_stage_model.transformer."
    older = {}
    for key, value in state.items():
        if key.startswith(prefix) and not key.startswith(prefix + "text_model."):
            key = prefix + "text_model." + key[len(prefix) :]
        older[key] = value
    older["scale_factor"] = torch.tensor(0.2)
    older["model_ema.decay"] = torch.tensor(0.9999)
    older["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    result = split_and_map(older)
    assert result.vae_config["scaling_factor"] == pytest.approx(0.2)
    assert {"scale_factor", "model_ema.decay", "model_ema.num_updates"} <= set(result.dropped)
    token = state[prefix + "embeddings.token_embedding.weight"]
    assert result.text_encoder["embeddings.token_embedding.weight"] is token

    twice = dict(state)
    twice[prefix + "text_model.embeddings.token_embedding.weight"] = token.clone()
    with pytest.raises(ConversionError, match="appears twice"):
        split_and_map(twice)
