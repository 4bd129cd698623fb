# Copyright 2026 The L-CAD diffusers port authors. Licensed under the Apache License, Version 2.0.
"""Luminance-guided autoencoder of L-CAD (paper Sec. 3.2).

A stock Stable Diffusion `AutoencoderKL` plus a *luminance encoder*: a copy of the VAE encoder that reads the grey
image and returns multi-scale features through zero-initialised 1x1 convolutions. The decoder adds those features
into its own activations, so the colour image keeps the grey input's structure. With no features the model is
exactly the stock VAE.

This file is Hub remote code: it imports only torch, diffusers and its sibling `loading_lcad`.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.autoencoders.vae import Decoder, DecoderOutput, Encoder
from diffusers.utils import logging
from diffusers.utils.accelerate_utils import apply_forward_hook

from .loading_lcad import check_materialized, materialize_as_zeros


logger = logging.get_logger(__name__)


def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class LuminanceEncoder(Encoder):
    r"""
    The SD VAE encoder architecture used as a feature extractor for the grey image.

    After every down-level resnet (before downsampling) and after each of the two mid-block resnets, a zero-initialised
    1x1 convolution taps the activation. `forward` returns these `len(block_out_channels) * layers_per_block + 2`
    features shallowest first, the last one at latent resolution (it also feeds the UNet). The encoder's output head
    (`conv_norm_out`, `conv_out`) is never used, so it is not built.
    """

    def __init__(self, **encoder_kwargs):
        super().__init__(double_z=False, **encoder_kwargs)
        del self.conv_norm_out, self.conv_act, self.conv_out
        self.down_zero_convs = nn.ModuleList(
            [_zero_conv(block.resnets[-1].out_channels) for block in self.down_blocks for _ in block.resnets]
        )
        mid_channels = self.mid_block.resnets[0].out_channels
        self.mid_zero_convs = nn.ModuleList([_zero_conv(mid_channels), _zero_conv(mid_channels)])

    def _run(self, module: nn.Module, *args):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(module, *args)
        return module(*args)

    def forward(self, sample: torch.Tensor) -> list[torch.Tensor]:
        features = []
        zero_convs = iter(self.down_zero_convs)
        sample = self.conv_in(sample)
        for down_block in self.down_blocks:
            for resnet in down_block.resnets:
                sample = self._run(resnet, sample, None)
                features.append(next(zero_convs)(sample))
            for downsampler in down_block.downsamplers or []:
                sample = downsampler(sample)

        mid = self.mid_block
        sample = self._run(mid.resnets[0], sample, None)
        features.append(self.mid_zero_convs[0](sample))
        for attention, resnet in zip(mid.attentions, mid.resnets[1:]):
            if attention is not None:
                sample = attention(sample)
            sample = self._run(resnet, sample, None)
        features.append(self.mid_zero_convs[1](sample))
        return features


class LuminanceGuidedDecoder(Decoder):
    r"""
    The SD VAE decoder that adds luminance features into its activations, as released.

    The features are consumed as a stack (last first): after the first mid resnet (before the mid attention) and after
    the second; then in each up level, deepest first, after each of its first `layers_per_block` resnets, before
    upsampling. Without features it is the stock `Decoder`.
    """

    def _run(self, module: nn.Module, *args):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(module, *args)
        return module(*args)

    def forward(
        self,
        sample: torch.Tensor,
        latent_embeds: torch.Tensor | None = None,
        luminance_features: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if luminance_features is None:
            return super().forward(sample, latent_embeds)

        stack = list(luminance_features)
        sample = self.conv_in(sample)

        mid = self.mid_block
        sample = self._run(mid.resnets[0], sample, latent_embeds) + stack.pop()
        for attention, resnet in zip(mid.attentions, mid.resnets[1:]):
            if attention is not None:
                sample = attention(sample, temb=latent_embeds)
            sample = self._run(resnet, sample, latent_embeds) + stack.pop()

        for up_block in self.up_blocks:
            for index, resnet in enumerate(up_block.resnets):
                sample = self._run(resnet, sample, latent_embeds)
                if index < self.layers_per_block:
                    sample = sample + stack.pop()
            for upsampler in up_block.upsamplers or []:
                sample = upsampler(sample)

        if latent_embeds is None:
            sample = self.conv_norm_out(sample)
        else:
            sample = self.conv_norm_out(sample, latent_embeds)
        sample = self.conv_act(sample)
        return self.conv_out(sample)


class LuminanceAutoencoderKL(AutoencoderKL):
    r"""
    `AutoencoderKL` with L-CAD's luminance encoder and luminance-guided decoding.

    All `AutoencoderKL` arguments keep their meaning; the luminance encoder has the VAE encoder's architecture with
    `luminance_in_channels` input channels (3: the grey image repeated, as released).

    Use [`~LuminanceAutoencoderKL.encode_luminance`] on the normalised grey image, then
    `decode(latents, luminance_features=features)`. `decode(z)` without features is exactly `AutoencoderKL.decode`.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["BasicTransformerBlock", "ResnetBlock2D"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: tuple[float] | None = None,
        latents_std: tuple[float] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
        luminance_in_channels: int = 3,
    ):
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            down_block_types=down_block_types,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            act_fn=act_fn,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            sample_size=sample_size,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            latents_mean=latents_mean,
            latents_std=latents_std,
            force_upcast=force_upcast,
            use_quant_conv=use_quant_conv,
            use_post_quant_conv=use_post_quant_conv,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.decoder = LuminanceGuidedDecoder(
            in_channels=latent_channels,
            out_channels=out_channels,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn=act_fn,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.luminance_encoder = LuminanceEncoder(
            in_channels=luminance_in_channels,
            down_block_types=down_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            act_fn=act_fn,
            norm_num_groups=norm_num_groups,
            mid_block_add_attention=mid_block_add_attention,
        )

    @property
    def luminance_feature_channels(self) -> int:
        """Channels of the last luminance feature, the one at latent resolution that the UNet reads."""
        return self.luminance_encoder.mid_zero_convs[-1].out_channels

    def zero_convolutions(self) -> list[nn.Conv2d]:
        """The zero-initialised taps of the luminance encoder; all zero means it is untrained."""
        return [*self.luminance_encoder.down_zero_convs, *self.luminance_encoder.mid_zero_convs]

    def is_luminance_encoder_trained(self) -> bool:
        """False while every zero-initialised tap is still exactly zero (stage 1 has not run)."""
        return any(bool(p.detach().abs().sum() > 0) for conv in self.zero_convolutions() for p in conv.parameters())

    @apply_forward_hook
    def encode_luminance(self, luminance: torch.Tensor) -> list[torch.Tensor]:
        r"""
        Multi-scale luminance features of a normalised grey image.

        Args:
            luminance (`torch.Tensor` of shape `(batch, luminance_in_channels, height, width)`):
                The normalised lightness, repeated over `luminance_in_channels`; height and width divisible by the
                VAE's downsampling factor.

        Returns:
            `list[torch.Tensor]`: shallowest first; the last one is at latent resolution.
        """
        expected = self.config.luminance_in_channels
        if luminance.ndim != 4 or luminance.shape[1] != expected:
            raise ValueError(
                f"`luminance` must have shape (batch, {expected}, height, width), got {tuple(luminance.shape)}."
            )
        factor = 2 ** (len(self.config.block_out_channels) - 1)
        if luminance.shape[-1] % factor or luminance.shape[-2] % factor:
            raise ValueError(
                f"`luminance` height and width must be divisible by {factor}, got {tuple(luminance.shape[-2:])}."
            )
        return self.luminance_encoder(luminance)

    def _decode(
        self,
        z: torch.Tensor,
        return_dict: bool = True,
        luminance_features: list[torch.Tensor] | None = None,
    ) -> DecoderOutput | tuple[torch.Tensor]:
        if luminance_features is None:
            return super()._decode(z, return_dict=return_dict)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        dec = self.decoder(z, luminance_features=luminance_features)
        return DecoderOutput(sample=dec) if return_dict else (dec,)

    @apply_forward_hook
    def decode(
        self,
        z: torch.Tensor,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
        luminance_features: list[torch.Tensor] | None = None,
    ) -> DecoderOutput | tuple[torch.Tensor]:
        r"""
        Decode latents, guided by luminance features when given.

        Args:
            z (`torch.Tensor`): latents, already divided by `scaling_factor`.
            luminance_features (`list[torch.Tensor]`, *optional*):
                The output of [`~LuminanceAutoencoderKL.encode_luminance`] for the same batch. Without it this is
                exactly `AutoencoderKL.decode`. Tiled decoding cannot be luminance-guided and is not used then.
        """
        if luminance_features is None:
            return super().decode(z, return_dict=return_dict, generator=generator)
        expected = len(self.zero_convolutions())
        if len(luminance_features) != expected:
            raise ValueError(
                f"`luminance_features` must be the {expected} tensors from `encode_luminance`, got "
                f"{len(luminance_features)}."
            )
        if any(feature.shape[0] != z.shape[0] for feature in luminance_features):
            raise ValueError("`luminance_features` must have the same batch size as `z`.")
        if self.use_tiling:
            logger.warning("Luminance-guided decoding does not tile; decoding the whole latent at once.")

        if self.use_slicing and z.shape[0] > 1:
            decoded = torch.cat(
                [
                    self._decode(z[i : i + 1], luminance_features=[f[i : i + 1] for f in luminance_features]).sample
                    for i in range(z.shape[0])
                ]
            )
        else:
            decoded = self._decode(z, luminance_features=luminance_features).sample
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)

    @classmethod
    def from_vae(cls, vae: AutoencoderKL, luminance_in_channels: int = 3) -> "LuminanceAutoencoderKL":
        r"""
        Build an untrained L-CAD autoencoder from a stock SD `AutoencoderKL` (an instance, or a path / Hub id).

        The VAE weights are copied; the luminance encoder starts from the VAE encoder's weights (its first convolution
        too, when `luminance_in_channels` matches) and its zero convolutions at zero, so decoding is unchanged.
        """
        if isinstance(vae, (str, bytes)) or hasattr(vae, "__fspath__"):
            vae = AutoencoderKL.from_pretrained(vae)
        if not isinstance(vae, AutoencoderKL):
            raise TypeError(f"`vae` must be an `AutoencoderKL` or a path to one, got {type(vae).__name__}.")
        config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
        config["luminance_in_channels"] = luminance_in_channels
        model = cls.from_config(config)
        reference = next(vae.parameters())
        if reference.dtype != next(model.parameters()).dtype:
            model.to(dtype=reference.dtype)
        model.to(reference.device).train(vae.training)
        state = vae.state_dict()
        model.load_state_dict(state, strict=False)
        model._init_luminance_encoder_from_vae_encoder()
        return model

    def _init_luminance_encoder_from_vae_encoder(self) -> None:
        """Copy the VAE encoder's weights into the luminance encoder and zero its taps (paper Sec. 3.2)."""
        encoder_state = {
            k: v for k, v in self.encoder.state_dict().items() if not k.startswith(("conv_out.", "conv_norm_out."))
        }
        if encoder_state["conv_in.weight"].shape != self.luminance_encoder.conv_in.weight.shape:
            encoder_state.pop("conv_in.weight")
            encoder_state.pop("conv_in.bias")
        missing, unexpected = self.luminance_encoder.load_state_dict(encoder_state, strict=False)
        untouched = [k for k in missing if not k.startswith(("down_zero_convs.", "mid_zero_convs.", "conv_in."))]
        if unexpected or untouched:
            raise RuntimeError(f"VAE encoder and luminance encoder differ: {sorted(unexpected) + untouched}")
        with torch.no_grad():
            for conv in self.zero_convolutions():
                conv.weight.zero_()
                conv.bias.zero_()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        r"""
        Load like `AutoencoderKL.from_pretrained`; a stock SD VAE folder (without a luminance encoder) loads too, its
        luminance encoder then initialised as in [`~LuminanceAutoencoderKL.from_vae`].

        diffusers creates modules on the meta device and leaves those missing from the checkpoint there; this
        materialises them and refuses any other missing weight instead of returning an unusable model.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        missing = set(info["missing_keys"])
        if missing:
            luminance_keys = {"luminance_encoder." + k for k in model.luminance_encoder.state_dict()}
            if not missing <= luminance_keys:
                raise ValueError(
                    f"{pretrained_model_name_or_path} lacks weights of {cls.__name__}: {sorted(missing - luminance_keys)}"
                )
            if missing != luminance_keys:
                raise ValueError(
                    f"{pretrained_model_name_or_path} has a partial luminance encoder; missing: {sorted(missing)}"
                )
            logger.info("No luminance encoder in the checkpoint: initialising it from the VAE encoder.")
            materialize_as_zeros(model, missing)
            model._init_luminance_encoder_from_vae_encoder()
        check_materialized(model)
        return (model, info) if output_loading_info else model

