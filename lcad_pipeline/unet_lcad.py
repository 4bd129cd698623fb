# Copyright 2026 The L-CAD diffusers port authors. Licensed under the Apache License, Version 2.0.
"""The L-CAD noise prediction network (paper Sec. 3.3): an SD UNet that also reads the grey image.

The luminance feature at latent resolution (the last output of `LuminanceAutoencoderKL.encode_luminance`) enters the
first convolution as extra, zero-initialised input channels, as the released checkpoints do. The paper's Eq. 5
variant additionally adds zero-initialised convolutions of the resized luminance feature into every down block
(T2I-Adapter style). Zero initialisation makes an untrained model compute exactly the stock UNet.

This file is Hub remote code: it imports only torch, diffusers and its sibling `loading_lcad`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel, UNet2DConditionOutput
from diffusers.utils import logging

from .loading_lcad import check_materialized, materialize_as_zeros


logger = logging.get_logger(__name__)

LUMINANCE_INJECTIONS = ("conv_in", "down_blocks")


class LCADUNet2DConditionModel(UNet2DConditionModel):
    r"""
    `UNet2DConditionModel` conditioned on a luminance feature map as well as on text.

    Args (in addition to `UNet2DConditionModel`'s, which keep their meaning; `in_channels` stays the latent channels):
        luminance_channels (`int`, defaults to 512):
            Channels of the luminance feature (the SD VAE's deepest width).
        luminance_injection (`str`, defaults to `"conv_in"`):
            `"conv_in"`: the feature is concatenated to the latent before the first convolution (the released layout,
            `conv_in` has `in_channels + luminance_channels` inputs). `"down_blocks"`: additionally, the paper's Eq. 5
            channel-extended convolutions: per down block a zero-initialised 3x3 convolution of the feature, resized to
            the block's resolution, is added inside the block (through diffusers' `down_intrablock_additional_residuals`,
            i.e. after the block's last layer, before its downsampler).
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        up_block_types: tuple[str, ...] = (
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        only_cross_attention: bool | tuple[bool] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int | tuple[int] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        dropout: float = 0.0,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int | tuple[int] = 1280,
        transformer_layers_per_block: int | tuple[int] | tuple[tuple] = 1,
        reverse_transformer_layers_per_block: tuple[tuple[int]] | None = None,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | tuple[int] = 8,
        num_attention_heads: int | tuple[int] | None = None,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        resnet_skip_time_act: bool = False,
        resnet_out_scale_factor: float = 1.0,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        time_embedding_act_fn: str | None = None,
        timestep_post_act: str | None = None,
        time_cond_proj_dim: int | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        projection_class_embeddings_input_dim: int | None = None,
        attention_type: str = "default",
        class_embeddings_concat: bool = False,
        mid_block_only_cross_attention: bool | None = None,
        cross_attention_norm: str | None = None,
        addition_embed_type_num_heads: int = 64,
        luminance_channels: int = 512,
        luminance_injection: str = "conv_in",
    ):
        super().__init__(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            center_input_sample=center_input_sample,
            flip_sin_to_cos=flip_sin_to_cos,
            freq_shift=freq_shift,
            down_block_types=down_block_types,
            mid_block_type=mid_block_type,
            up_block_types=up_block_types,
            only_cross_attention=only_cross_attention,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            downsample_padding=downsample_padding,
            mid_block_scale_factor=mid_block_scale_factor,
            dropout=dropout,
            act_fn=act_fn,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            cross_attention_dim=cross_attention_dim,
            transformer_layers_per_block=transformer_layers_per_block,
            reverse_transformer_layers_per_block=reverse_transformer_layers_per_block,
            encoder_hid_dim=encoder_hid_dim,
            encoder_hid_dim_type=encoder_hid_dim_type,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            dual_cross_attention=dual_cross_attention,
            use_linear_projection=use_linear_projection,
            class_embed_type=class_embed_type,
            addition_embed_type=addition_embed_type,
            addition_time_embed_dim=addition_time_embed_dim,
            num_class_embeds=num_class_embeds,
            upcast_attention=upcast_attention,
            resnet_time_scale_shift=resnet_time_scale_shift,
            resnet_skip_time_act=resnet_skip_time_act,
            resnet_out_scale_factor=resnet_out_scale_factor,
            time_embedding_type=time_embedding_type,
            time_embedding_dim=time_embedding_dim,
            time_embedding_act_fn=time_embedding_act_fn,
            timestep_post_act=timestep_post_act,
            time_cond_proj_dim=time_cond_proj_dim,
            conv_in_kernel=conv_in_kernel,
            conv_out_kernel=conv_out_kernel,
            projection_class_embeddings_input_dim=projection_class_embeddings_input_dim,
            attention_type=attention_type,
            class_embeddings_concat=class_embeddings_concat,
            mid_block_only_cross_attention=mid_block_only_cross_attention,
            cross_attention_norm=cross_attention_norm,
            addition_embed_type_num_heads=addition_embed_type_num_heads,
        )
        if luminance_injection not in LUMINANCE_INJECTIONS:
            raise ValueError(f"`luminance_injection` must be one of {LUMINANCE_INJECTIONS}, got {luminance_injection!r}.")
        if luminance_channels < 1:
            raise ValueError(f"`luminance_channels` must be positive, got {luminance_channels}.")

        stock = self.conv_in
        self.conv_in = nn.Conv2d(
            stock.in_channels + luminance_channels,
            stock.out_channels,
            kernel_size=stock.kernel_size,
            padding=stock.padding,
        )
        with torch.no_grad():
            self.conv_in.weight[:, stock.in_channels :].zero_()

        self.luminance_down_convs = None
        if luminance_injection == "down_blocks":
            self.luminance_down_convs = nn.ModuleList(
                [nn.Conv2d(luminance_channels, channels, kernel_size=3, padding=1) for channels in self._residual_channels()]
            )
            for conv in self.luminance_down_convs:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)

    def _residual_channels(self) -> list[int]:
        return [block.resnets[-1].out_channels for block in self.down_blocks]

    def _residual_scales(self) -> list[int]:
        """Downsampling factor, relative to the latent, at which each down block adds its intra-block residual."""
        scales, scale = [], 1
        for block in self.down_blocks:
            has_downsampler = block.downsamplers is not None
            # Cross-attention blocks add the residual before downsampling, plain blocks after (diffusers' UNet).
            if getattr(block, "has_cross_attention", False):
                scales.append(scale)
            else:
                scales.append(scale * 2 if has_downsampler else scale)
            scale *= 2 if has_downsampler else 1
        return scales

    def luminance_residuals(self, luminance: torch.Tensor, size: tuple[int, int]) -> list[torch.Tensor]:
        """The Eq. 5 contributions of the luminance feature to each down block, for a latent of spatial `size`."""
        residuals = []
        for conv, scale in zip(self.luminance_down_convs, self._residual_scales()):
            target = (max(size[0] // scale, 1), max(size[1] // scale, 1))
            resized = luminance if tuple(luminance.shape[-2:]) == target else F.interpolate(luminance, size=target, mode="area")
            residuals.append(conv(resized))
        return residuals

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        luminance: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple[torch.Tensor] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DConditionOutput | tuple:
        r"""
        Predict the noise of `sample` given the text and the luminance feature.

        Args:
            luminance (`torch.Tensor` of shape `(batch, luminance_channels, height, width)`):
                The luminance feature at the latent's resolution: the last tensor returned by
                `LuminanceAutoencoderKL.encode_luminance`. Other arguments: see `UNet2DConditionModel.forward`.
        """
        if luminance is None:
            raise ValueError(
                "`luminance` is required: pass the last tensor of `LuminanceAutoencoderKL.encode_luminance(...)`."
            )
        expected = (sample.shape[0], self.config.luminance_channels, *sample.shape[-2:])
        if tuple(luminance.shape) != expected:
            raise ValueError(f"`luminance` must have shape {expected} to match `sample`, got {tuple(luminance.shape)}.")
        luminance = luminance.to(dtype=sample.dtype)

        if self.luminance_down_convs is not None:
            residuals = self.luminance_residuals(luminance, tuple(sample.shape[-2:]))
            if down_intrablock_additional_residuals is not None:
                residuals = [r + extra for r, extra in zip(residuals, down_intrablock_additional_residuals)] + list(
                    down_intrablock_additional_residuals[len(residuals) :]
                )
            down_intrablock_additional_residuals = residuals

        return super().forward(
            torch.cat([sample, luminance], dim=1),
            timestep,
            encoder_hidden_states,
            class_labels=class_labels,
            timestep_cond=timestep_cond,
            attention_mask=attention_mask,
            cross_attention_kwargs=cross_attention_kwargs,
            added_cond_kwargs=added_cond_kwargs,
            down_block_additional_residuals=down_block_additional_residuals,
            mid_block_additional_residual=mid_block_additional_residual,
            down_intrablock_additional_residuals=down_intrablock_additional_residuals,
            encoder_attention_mask=encoder_attention_mask,
            return_dict=return_dict,
        )

    def luminance_parameters(self) -> list[nn.Parameter]:
        """Parameters that read the luminance: all of `conv_in` and, for `down_blocks`, the Eq. 5 convolutions."""
        params = list(self.conv_in.parameters())
        if self.luminance_down_convs is not None:
            params += list(self.luminance_down_convs.parameters())
        return params

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel | str,
        luminance_channels: int = 512,
        luminance_injection: str = "conv_in",
    ) -> "LCADUNet2DConditionModel":
        r"""
        Build an untrained L-CAD UNet from a stock SD `UNet2DConditionModel` (an instance, or a path / Hub id).

        Every stock weight is copied; the luminance input channels of `conv_in` and the Eq. 5 convolutions start at
        zero, so the result computes exactly the stock UNet for any luminance input.
        """
        if isinstance(unet, (str, bytes)) or hasattr(unet, "__fspath__"):
            unet = UNet2DConditionModel.from_pretrained(unet)
        if not isinstance(unet, UNet2DConditionModel):
            raise TypeError(f"`unet` must be a `UNet2DConditionModel` or a path to one, got {type(unet).__name__}.")
        if isinstance(unet, cls):
            raise TypeError("`unet` is already an LCADUNet2DConditionModel.")
        config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        model = cls.from_config(config, luminance_channels=luminance_channels, luminance_injection=luminance_injection)
        reference = next(unet.parameters())
        if reference.dtype != next(model.parameters()).dtype:
            model.to(dtype=reference.dtype)
        model.to(reference.device).train(unet.training)
        state = dict(unet.state_dict())
        stock_conv_in = state.pop("conv_in.weight")
        model.load_state_dict(state, strict=False)
        with torch.no_grad():
            model.conv_in.weight.zero_()
            model.conv_in.weight[:, : stock_conv_in.shape[1]].copy_(stock_conv_in)
            for conv in model.luminance_down_convs or []:
                conv.weight.zero_()
                conv.bias.zero_()
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        r"""
        Load like `UNet2DConditionModel.from_pretrained`. A stock SD UNet folder loads too (through
        [`~LCADUNet2DConditionModel.from_unet`]); zero-initialised modules missing from an L-CAD checkpoint (e.g. the
        Eq. 5 convolutions when switching `luminance_injection`) start at zero; any other missing weight is an error.
        """
        config_kwargs = {
            k: kwargs[k] for k in ("subfolder", "cache_dir", "revision", "token", "local_files_only") if k in kwargs
        }
        config = cls.load_config(pretrained_model_name_or_path, **config_kwargs)
        if "luminance_channels" not in config:
            luminance_kwargs = {k: kwargs.pop(k) for k in ("luminance_channels", "luminance_injection") if k in kwargs}
            logger.info("%s is a stock UNet: adding zero-initialised luminance inputs.", pretrained_model_name_or_path)
            stock = UNet2DConditionModel.from_pretrained(pretrained_model_name_or_path, **kwargs)
            return cls.from_unet(stock, **luminance_kwargs)

        output_loading_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        missing = set(info["missing_keys"])
        zero_init = {k for k in missing if k.startswith("luminance_down_convs.")}
        if missing - zero_init:
            raise ValueError(f"{pretrained_model_name_or_path} lacks weights of {cls.__name__}: {sorted(missing - zero_init)}")
        materialize_as_zeros(model, zero_init)
        check_materialized(model)
        return (model, info) if output_loading_info else model
