"""The L-CAD models: exact equivalence to the stock models at initialisation, feature shapes, loading."""

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module

from lcad_pipeline import LCADUNet2DConditionModel, LuminanceAutoencoderKL
from tiny_models import LUMINANCE_CHANNELS, VAE_CHANNELS, make_stock_unet, make_stock_vae


def _unet_inputs(batch=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, size, size, generator=g)
    text = torch.randn(batch, 7, 32, generator=g)
    luminance = torch.randn(batch, LUMINANCE_CHANNELS, size, size, generator=g) * 3
    return sample, torch.tensor([10, 700][:batch]), text, luminance


@pytest.mark.parametrize("injection", ["conv_in", "down_blocks"])
def test_unet_from_unet_equals_stock_for_any_luminance(injection):
    stock = make_stock_unet()
    unet = LCADUNet2DConditionModel.from_unet(stock, luminance_channels=LUMINANCE_CHANNELS, luminance_injection=injection)
    sample, t, text, luminance = _unet_inputs()
    with torch.no_grad():
        expected = stock(sample, t, text).sample
        assert torch.equal(unet(sample, t, text, luminance=luminance).sample, expected)
        assert torch.equal(unet(sample, t, text, luminance=-luminance).sample, expected)
    assert unet.conv_in.weight.shape[1] == 4 + LUMINANCE_CHANNELS
    assert torch.count_nonzero(unet.conv_in.weight[:, 4:]) == 0
    assert torch.equal(unet.conv_in.weight[:, :4], stock.conv_in.weight)


@pytest.mark.parametrize("injection", ["conv_in", "down_blocks"])
def test_unet_reads_luminance_once_trained(injection):
    unet = LCADUNet2DConditionModel.from_unet(make_stock_unet(), luminance_channels=LUMINANCE_CHANNELS, luminance_injection=injection)
    with torch.no_grad():
        if injection == "conv_in":
            unet.conv_in.weight[:, 4:].normal_(std=0.1)
        else:
            for conv in unet.luminance_down_convs:
                conv.weight.normal_(std=0.1)
    sample, t, text, luminance = _unet_inputs()
    with torch.no_grad():
        a = unet(sample, t, text, luminance=luminance).sample
        b = unet(sample, t, text, luminance=torch.zeros_like(luminance)).sample
    assert not torch.allclose(a, b)


def test_unet_rejects_missing_or_misshapen_luminance():
    unet = LCADUNet2DConditionModel.from_unet(make_stock_unet(), luminance_channels=LUMINANCE_CHANNELS)
    sample, t, text, luminance = _unet_inputs()
    with pytest.raises(ValueError, match="luminance"):
        unet(sample, t, text)
    with pytest.raises(ValueError, match="luminance"):
        unet(sample, t, text, luminance=luminance[:, :3])
    with pytest.raises(ValueError, match="luminance_injection"):
        LCADUNet2DConditionModel.from_unet(make_stock_unet(), luminance_injection="everywhere")


def test_luminance_encoder_features_and_initialisation():
    stock = make_stock_vae()
    vae = LuminanceAutoencoderKL.from_vae(stock)
    features = vae.encode_luminance(torch.randn(2, 3, 32, 32))
    levels = len(VAE_CHANNELS)
    assert len(features) == 2 * levels + 2
    expected = []
    for level, channels in enumerate(VAE_CHANNELS):
        expected += [(2, channels, 32 >> level, 32 >> level)] * 2
    expected += [(2, VAE_CHANNELS[-1], 32 >> (levels - 1), 32 >> (levels - 1))] * 2
    assert [tuple(f.shape) for f in features] == expected
    assert all(torch.count_nonzero(f) == 0 for f in features)  # zero convolutions at zero
    assert not vae.is_luminance_encoder_trained()
    encoder_state = stock.encoder.state_dict()
    for name, tensor in vae.luminance_encoder.state_dict().items():
        if name in encoder_state:
            assert torch.equal(tensor, encoder_state[name]), name
        else:
            assert name.startswith(("down_zero_convs.", "mid_zero_convs.")), name


def test_luminance_guided_decode_equals_stock_at_initialisation():
    stock = make_stock_vae()
    vae = LuminanceAutoencoderKL.from_vae(stock)
    z = torch.randn(2, 4, 16, 16)
    features = vae.encode_luminance(torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        expected = stock.decode(z).sample
        assert torch.equal(vae.decode(z, luminance_features=features).sample, expected)
        assert torch.equal(vae.decode(z).sample, expected)
        vae.enable_slicing()
        assert torch.allclose(vae.decode(z, luminance_features=features).sample, expected, atol=1e-5)


def test_luminance_guided_decode_uses_features_once_trained():
    vae = LuminanceAutoencoderKL.from_vae(make_stock_vae())
    with torch.no_grad():
        for conv in vae.zero_convolutions():
            conv.weight.normal_(std=0.1)
    assert vae.is_luminance_encoder_trained()
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        a = vae.decode(z, luminance_features=vae.encode_luminance(torch.full((1, 3, 32, 32), -1.0))).sample
        b = vae.decode(z, luminance_features=vae.encode_luminance(torch.full((1, 3, 32, 32), 0.5))).sample
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="luminance_features"):
        vae.decode(z, luminance_features=[torch.zeros(1)])
    with pytest.raises(ValueError, match="luminance"):
        vae.encode_luminance(torch.zeros(1, 1, 32, 32))


def test_encode_luminance_and_decode_run_offload_hooks():
    """`encode_luminance` and the guided `decode` trigger accelerate hooks, like the parent's encode/decode."""

    class CountingHook(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            CountingHook.calls += 1
            return args, kwargs

    vae = LuminanceAutoencoderKL.from_vae(make_stock_vae())
    add_hook_to_module(vae, CountingHook())
    features = vae.encode_luminance(torch.zeros(1, 3, 32, 32))
    vae.decode(torch.zeros(1, 4, 16, 16), luminance_features=features)
    assert CountingHook.calls == 2


def _assert_fully_loaded(model):
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        assert tensor.device.type != "meta", name
        assert not torch.isnan(tensor).any(), name


def test_config_round_trip_keeps_new_arguments(tmp_path):
    unet = LCADUNet2DConditionModel.from_unet(make_stock_unet(), luminance_channels=LUMINANCE_CHANNELS, luminance_injection="down_blocks")
    with torch.no_grad():
        for p in unet.luminance_parameters():
            p.normal_()
    unet.save_pretrained(tmp_path / "unet")
    loaded = LCADUNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert loaded.config.luminance_channels == LUMINANCE_CHANNELS
    assert loaded.config.luminance_injection == "down_blocks"
    _assert_fully_loaded(loaded)
    for (name, a), (_, b) in zip(unet.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name

    vae = LuminanceAutoencoderKL.from_vae(make_stock_vae(), luminance_in_channels=1)
    vae.save_pretrained(tmp_path / "vae")
    loaded_vae = LuminanceAutoencoderKL.from_pretrained(tmp_path / "vae")
    assert loaded_vae.config.luminance_in_channels == 1
    _assert_fully_loaded(loaded_vae)
    for (name, a), (_, b) in zip(vae.state_dict().items(), loaded_vae.state_dict().items()):
        assert torch.equal(a, b), name


def test_new_modules_missing_from_checkpoint_are_materialised(tmp_path):
    """diffusers leaves weights absent from the checkpoint on the meta device: switching injection must not."""
    unet = LCADUNet2DConditionModel.from_unet(make_stock_unet(), luminance_channels=LUMINANCE_CHANNELS)
    unet.save_pretrained(tmp_path)
    loaded = LCADUNet2DConditionModel.from_pretrained(tmp_path, luminance_injection="down_blocks")
    _assert_fully_loaded(loaded)
    assert all(torch.count_nonzero(p) == 0 for p in loaded.luminance_down_convs.parameters())
    sample, t, text, luminance = _unet_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(sample, t, text, luminance=luminance).sample, unet(sample, t, text, luminance=luminance).sample)


def test_stock_folders_load_as_untrained_lcad_models(tmp_path):
    stock_unet, stock_vae = make_stock_unet(), make_stock_vae()
    stock_unet.save_pretrained(tmp_path / "unet")
    stock_vae.save_pretrained(tmp_path / "vae")

    unet = LCADUNet2DConditionModel.from_pretrained(tmp_path / "unet", luminance_channels=LUMINANCE_CHANNELS)
    vae = LuminanceAutoencoderKL.from_pretrained(tmp_path / "vae")
    _assert_fully_loaded(unet)
    _assert_fully_loaded(vae)
    sample, t, text, luminance = _unet_inputs()
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(unet(sample, t, text, luminance=luminance).sample, stock_unet(sample, t, text).sample)
        features = vae.encode_luminance(torch.randn(1, 3, 32, 32))
        assert torch.equal(vae.decode(z, luminance_features=features).sample, stock_vae.decode(z).sample)
    assert torch.equal(vae.luminance_encoder.conv_in.weight, stock_vae.encoder.conv_in.weight)
