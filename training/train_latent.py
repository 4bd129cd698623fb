#!/usr/bin/env python
# Copyright 2026 The L-CAD diffusers port authors. Licensed under the Apache License, Version 2.0.
"""Stage 2 of L-CAD training: the noise predictor in latent space (paper Sec. 3.3, Eq. 6 and Sec. 3.5).

Trains an `LCADUNet2DConditionModel` with the epsilon-MSE of latent diffusion, conditioned on any-level descriptions
(complete / partial / scarce, plus empty prompts for classifier-free guidance) and on the grey image's luminance
feature from the stage-1 luminance encoder, which stays frozen with the rest of the VAE and CLIP.

Starting points:
- a stock Stable Diffusion 1.x folder or Hub id (`--pretrained_model_name_or_path`) plus the stage-1 output
  (`--luminance_vae_path`): the UNet gets zero-initialised luminance input channels (`LCADPipeline.from_stable_diffusion`);
- an L-CAD pipeline folder (e.g. a converted release checkpoint or an earlier run) to fine-tune; `--luminance_vae_path`
  optionally replaces its VAE.

The UNet's luminance channels start at zero and receive gradients only through the luminance feature; if the
luminance encoder is untrained (its zero convolutions still zero), that feature is zero and they would never learn:
the script refuses to start and says to run stage 1 (`training/train_pixel.py`) first.

Trained parts (`--trainable`): `released`, the release's set (first convolution, all up blocks, the output norm and
convolution, plus the Eq. 5 convolutions when `luminance_injection="down_blocks"`); `all`; or `lora`, peft LoRA
adapters on the attention projections plus the luminance input layers (which are zero in a fresh model), merged into
the weights of the saved pipeline.

Usage (one GPU; see training/README.md for multi-GPU):

    accelerate launch training/train_latent.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --luminance_vae_path out/stage1 \
        --train_data_dir data/coco --caption_file data/coco/captions.json \
        --output_dir out/stage2 --max_train_steps 100000 --checkpointing_steps 5000 \
        --validation_steps 2000 --mixed_precision fp16
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import sys

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import training_common as common  # noqa: E402  (training/training_common.py, beside this script)

from lcad_pipeline import LCADPipeline, LCADUNet2DConditionModel, LuminanceAutoencoderKL  # noqa: E402
from lcad_pipeline.descriptions import (  # noqa: E402
    GENERIC_SCARCE_DESCRIPTION,
    SCARCE_MODES,
    check_ratio,
    sample_description,
)
from lcad_pipeline.image_processor_lcad import (  # noqa: E402
    LUMINANCE_NORMALIZATIONS,
    LCADImageProcessor,
    lightness_to_gray_rgb,
)
from lcad_pipeline.training_data import (  # noqa: E402
    LCADTrainingDataset,
    add_data_arguments,
    check_data_arguments,
    collate_fn,
    load_image_caption_dataset,
    load_validation_images,
    split_validation,
    square_image,
)
from lcad_pipeline.unet_lcad import LUMINANCE_INJECTIONS  # noqa: E402


logger = logging.getLogger("train_latent")

TRAINABLE_SETS = ("released", "all", "lora")
LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]


# ------------------------------------------------------------------------------------------------ arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="L-CAD stage 2: train the noise predictor on any-level descriptions (run with accelerate launch)."
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="A stock Stable Diffusion 1.x pipeline (folder or Hub id) or an L-CAD pipeline folder to fine-tune.",
    )
    model.add_argument(
        "--luminance_vae_path",
        type=str,
        default=None,
        help="The stage-1 output (a LuminanceAutoencoderKL folder, or an L-CAD pipeline folder whose vae/ is used). "
        "Required when starting from stock Stable Diffusion.",
    )
    model.add_argument(
        "--luminance_injection",
        type=str,
        default="conv_in",
        choices=LUMINANCE_INJECTIONS,
        help='Where a fresh UNet reads the luminance: "conv_in" as released, or "down_blocks" (the paper\'s Eq. 5). '
        "Ignored for an L-CAD folder, which keeps its own.",
    )
    model.add_argument(
        "--luminance_normalization",
        type=str,
        default=None,
        choices=sorted(LUMINANCE_NORMALIZATIONS),
        help='How the lightness is normalised for the luminance encoder; must match stage 1. Default: the L-CAD '
        'folder\'s, else "official" (L/127.5 - 1, as released).',
    )
    model.add_argument(
        "--trainable",
        type=str,
        default="released",
        choices=TRAINABLE_SETS,
        help='UNet parameters to train: "released" (first conv, up blocks, output layers), "all", or "lora".',
    )
    model.add_argument("--lora_rank", type=int, default=4, help="LoRA rank (with --trainable lora).")
    model.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha (default: the rank).")
    model.add_argument(
        "--snr_gamma",
        type=float,
        default=None,
        help="Min-SNR loss weighting gamma (5.0 is usual); default: the plain epsilon-MSE of the paper.",
    )

    text = parser.add_argument_group("any-level descriptions")
    text.add_argument(
        "--partial_ratio",
        type=float,
        default=0.5,
        help="Probability that a caption with two or more colour phrases becomes a partial description (not published).",
    )
    text.add_argument(
        "--scarce_ratio",
        type=float,
        default=0.3,
        help="Probability that a complete/partial description is replaced by a scarce one (0.3 in the paper).",
    )
    text.add_argument(
        "--text_dropout",
        type=float,
        default=0.1,
        help='Probability of the empty prompt "", for classifier-free guidance (not published; 0.1 as in SD).',
    )
    text.add_argument(
        "--scarce_mode",
        type=str,
        default="remove",
        choices=SCARCE_MODES,
        help='Scarce descriptions: "remove" the colour words of the caption, or the "generic" --scarce_text.',
    )
    text.add_argument(
        "--scarce_text", type=str, default=GENERIC_SCARCE_DESCRIPTION, help="The generic scarce description."
    )

    validation = parser.add_argument_group("validation")
    validation.add_argument(
        "--validation_prompt",
        type=str,
        nargs="+",
        default=None,
        help="Descriptions for --validation_image (one for all, or one per image); default: the held-out images' "
        'captions, or "" (automatic).',
    )
    validation.add_argument("--validation_inference_steps", type=int, default=20, help="DDIM steps at validation.")
    validation.add_argument("--validation_guidance_scale", type=float, default=5.0, help="CFG scale at validation.")

    add_data_arguments(parser, captions=True)
    common.add_common_arguments(parser, learning_rate=5e-5, train_batch_size=16)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags; a bad flag stops here with an argparse error naming it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        for flag in ("partial_ratio", "scarce_ratio", "text_dropout"):
            check_ratio(getattr(args, flag), f"--{flag}")
        check_data_arguments(args)
        common.check_common_arguments(args)
        if args.luminance_vae_path is not None and not os.path.isdir(args.luminance_vae_path):
            raise ValueError(
                f"--luminance_vae_path {args.luminance_vae_path!r} is not a folder: give the output folder of "
                "training/train_pixel.py (stage 1)."
            )
        if args.lora_rank < 1:
            raise ValueError(f"--lora_rank must be a positive integer, got {args.lora_rank}.")
        if args.validation_inference_steps < 1:
            raise ValueError(f"--validation_inference_steps must be positive, got {args.validation_inference_steps}.")
        if args.snr_gamma is not None and args.snr_gamma <= 0:
            raise ValueError(f"--snr_gamma must be positive, got {args.snr_gamma}.")
        if args.validation_prompt and args.validation_image:
            if len(args.validation_prompt) not in (1, len(args.validation_image)):
                raise ValueError(
                    f"--validation_prompt needs one description or one per --validation_image "
                    f"({len(args.validation_image)}), got {len(args.validation_prompt)}."
                )
    except ValueError as error:
        parser.error(str(error))
    return args


# ------------------------------------------------------------------------------------------------ models


def _is_lcad_folder(path: str, revision: str | None) -> bool:
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(path, revision=revision)
    except Exception as error:  # not found, offline, not a pipeline: a message naming the flag
        raise ValueError(
            f"--pretrained_model_name_or_path {path!r} is not a diffusers pipeline (folder or Hub id): {error}"
        ) from None
    return config.get("_class_name") == "LCADPipeline"


def _load_luminance_vae(path: str) -> LuminanceAutoencoderKL:
    subfolder = None if os.path.isfile(os.path.join(path, "config.json")) else "vae"
    try:
        return LuminanceAutoencoderKL.from_pretrained(path, subfolder=subfolder)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--luminance_vae_path {path!r} holds no LuminanceAutoencoderKL (the output of train_pixel.py): {error}"
        ) from None


def load_pipeline(args: argparse.Namespace) -> LCADPipeline:
    """
    The L-CAD pipeline training starts from, with the stage-1 VAE; a ValueError when the luminance encoder is
    untrained (its zero convolutions all zero), since the UNet's luminance channels would then never learn.
    """
    load_kwargs = {"revision": args.revision, "variant": args.variant}
    if _is_lcad_folder(args.pretrained_model_name_or_path, args.revision):
        pipe = LCADPipeline.from_pretrained(args.pretrained_model_name_or_path, **load_kwargs)
        normalization = args.luminance_normalization or pipe.config.luminance_normalization
    else:
        from diffusers import DiffusionPipeline

        if args.luminance_vae_path is None:
            raise ValueError(
                f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path!r} is a stock Stable Diffusion "
                "pipeline: pass the stage-1 output as --luminance_vae_path (run training/train_pixel.py first)."
            )
        stock = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, **load_kwargs)
        if args.luminance_injection != "conv_in":
            stock.unet = LCADUNet2DConditionModel.from_unet(
                stock.unet,
                luminance_channels=stock.vae.config.block_out_channels[-1],
                luminance_injection=args.luminance_injection,
            )
        normalization = args.luminance_normalization or "official"
        pipe = LCADPipeline.from_stable_diffusion(stock, luminance_normalization=normalization)

    vae = _load_luminance_vae(args.luminance_vae_path) if args.luminance_vae_path is not None else pipe.vae
    if not vae.is_luminance_encoder_trained():
        source = args.luminance_vae_path or args.pretrained_model_name_or_path
        raise ValueError(
            f"The luminance encoder of {source!r} is untrained (its zero-initialised convolutions are all zero), so "
            "the UNet's luminance input would stay zero and never learn. Run stage 1 first "
            "(accelerate launch training/train_pixel.py ...) and pass its output folder as --luminance_vae_path."
        )
    if vae.luminance_feature_channels != pipe.unet.config.luminance_channels:
        raise ValueError(
            f"--luminance_vae_path: its luminance features have {vae.luminance_feature_channels} channels, the UNet "
            f"expects {pipe.unet.config.luminance_channels}; stage 1 must start from the same Stable Diffusion."
        )
    return LCADPipeline(
        vae=vae,
        unet=pipe.unet,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=pipe.scheduler,
        default_denoising_steps=pipe.config.default_denoising_steps,
        default_processing_resolution=args.resolution,
        luminance_normalization=normalization,
    )


def load_frozen_models(args: argparse.Namespace) -> tuple[LuminanceAutoencoderKL, torch.nn.Module]:
    """The VAE and text encoder as `load_pipeline` gives them, in float32, without loading the UNet again."""
    from transformers import CLIPTextModel

    load_kwargs = {"revision": args.revision, "variant": args.variant}
    text_encoder = CLIPTextModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="text_encoder", **load_kwargs)
    if args.luminance_vae_path is not None:
        vae = _load_luminance_vae(args.luminance_vae_path)
    else:
        vae = LuminanceAutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", **load_kwargs)
    return vae.eval(), text_encoder.eval()


def select_trainable(unet: LCADUNet2DConditionModel, args: argparse.Namespace) -> list[torch.nn.Parameter]:
    """Freeze the UNet except the `--trainable` set (adding LoRA adapters for "lora"); returns the trained parameters."""
    unet.requires_grad_(False)
    if args.trainable == "all":
        unet.requires_grad_(True)
    elif args.trainable == "released":
        modules = [unet.conv_in, unet.up_blocks, unet.conv_norm_out, unet.conv_out]
        for module in modules:
            if module is not None:
                module.requires_grad_(True)
    else:
        from peft import LoraConfig

        unet.add_adapter(
            LoraConfig(
                r=args.lora_rank,
                lora_alpha=args.lora_alpha or args.lora_rank,
                init_lora_weights="gaussian",
                target_modules=LORA_TARGET_MODULES,
            )
        )
    # The luminance input layers start at zero in a fresh model: they are always trained.
    for parameter in unet.luminance_parameters():
        parameter.requires_grad_(True)
    return [p for p in unet.parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------------ data


def build_datasets(args: argparse.Namespace):
    """(training dataset, validation items [(image, prompt, show original)]); ValueErrors name the flag."""
    dataset = load_image_caption_dataset(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_data_dir=args.train_data_dir,
        caption_file=args.caption_file,
        image_column=args.image_column,
        caption_column=args.caption_column,
        cache_dir=args.cache_dir,
        max_samples=args.max_train_samples,
        seed=args.seed,
    )
    validation = []
    if args.validation_steps is not None:
        prompts = args.validation_prompt
        if args.validation_image:
            images = load_validation_images(args.validation_image, args.resolution)
            prompts = prompts or [""]
            prompts = prompts * len(images) if len(prompts) == 1 else prompts
            validation = [(image, prompt, False) for image, prompt in zip(images, prompts)]
        elif args.num_validation_images > 0:
            dataset, held_out = split_validation(dataset, args.num_validation_images)
            validation = [
                (square_image(image, args.resolution), prompts[0] if prompts else caption or "", True)
                for image, caption in held_out
            ]
    describe = functools.partial(
        sample_description,
        partial_ratio=args.partial_ratio,
        scarce_ratio=args.scarce_ratio,
        text_dropout=args.text_dropout,
        scarce_mode=args.scarce_mode,
        generic_scarce=args.scarce_text,
    )
    train_dataset = LCADTrainingDataset(
        dataset,
        resolution=args.resolution,
        describe=describe,
        seed=args.seed,
        center_crop=args.center_crop,
        crop_min_scale=args.crop_min_scale,
        random_flip=args.random_flip,
    )
    return train_dataset, validation


# ------------------------------------------------------------------------------------------------ validation


def run_validation(pipeline: LCADPipeline, items, args, accelerator, name: str) -> str | None:
    """Colourise the validation images with `pipeline`; save a grid (grey | result | original) and log it."""
    if not items:
        return None
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
    rows = []
    for image, prompt, show_original in items:
        result = pipeline(
            image,
            prompt,
            num_inference_steps=args.validation_inference_steps,
            guidance_scale=args.validation_guidance_scale,
            processing_resolution=args.resolution,
            generator=generator,
        ).images[0]
        lightness = LCADImageProcessor().lightness(image)[0]
        grey = LCADImageProcessor.to_output([lightness_to_gray_rgb(lightness)], "pil")[0]
        rows.append([grey, result] + ([image] if show_original else []))
    path = common.save_validation_grid(accelerator, args, rows, name)
    logger.info("Validation images saved to %s", path)
    return path


# ------------------------------------------------------------------------------------------------ training


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    accelerator = common.make_accelerator(args)
    common.configure_logging(accelerator)
    logger.info(accelerator.state)

    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr

    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    repo_id = common.create_hub_repo(args) if args.push_to_hub and accelerator.is_main_process else None

    # Data first (cheap), then models: every bad flag stops before any training.
    with accelerator.main_process_first():
        train_dataset, validation_items = build_datasets(args)
    pipe = load_pipeline(args)
    vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
    normalization = pipe.config.luminance_normalization
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    luminance_channels = vae.config.luminance_in_channels

    weight_dtype = common.weight_dtype_of(accelerator)
    vae.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    for model, dtype in ((vae, weight_dtype), (text_encoder, weight_dtype), (unet, torch.float32)):
        model.to(accelerator.device)
        if model.dtype != dtype:
            model.to(dtype=dtype)

    params = select_trainable(unet, args)
    logger.info(
        "Training %s UNet parameters of %s (%s).",
        f"{sum(p.numel() for p in params):,}", f"{sum(p.numel() for p in unet.parameters()):,}", args.trainable,
    )
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = torch.optim.AdamW(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        shuffle=True,
        collate_fn=collate_fn,
        batch_size=args.train_batch_size,
        num_workers=args.dataloader_num_workers,
    )
    steps_from_epochs = args.max_train_steps is None
    common.epochs_and_steps(args, math.ceil(len(train_dataloader) / accelerator.num_processes))
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        unet, optimizer, train_dataloader, lr_scheduler
    )
    steps_per_epoch, num_train_epochs = common.epochs_and_steps(args, len(train_dataloader), steps_from_epochs)

    ema = common.make_ema(args, params)
    train_state = common.TrainState()
    accelerator.register_for_checkpointing(train_state)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name or "lcad-latent", config=config)
    metrics = common.MetricsLog(accelerator, args.output_dir)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training (L-CAD stage 2) *****")
    logger.info("  Num examples = %d", len(train_dataset))
    logger.info("  Num epochs = %d", num_train_epochs)
    logger.info("  Batch size per device = %d, total (parallel, accumulation) = %d", args.train_batch_size, total_batch_size)
    logger.info("  Total optimisation steps = %d", args.max_train_steps)

    resumed_from = common.resume(accelerator, args)
    if resumed_from is not None:
        if ema is not None:
            ema.to(accelerator.device)
        accelerator.print(f"Resuming from checkpoint {resumed_from} (global step {train_state.global_step})")
    global_step = train_state.global_step
    first_epoch, step_in_epoch = divmod(global_step, steps_per_epoch)
    skip_batches = step_in_epoch * args.gradient_accumulation_steps

    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )

    def compute_loss(batch, generator):
        pixel_values = batch["pixel_values"].to(accelerator.device, dtype=weight_dtype)
        luminance_input = LCADImageProcessor.normalize_luminance(
            batch["lightness"], normalization, channels=luminance_channels
        ).to(accelerator.device, dtype=weight_dtype)
        with torch.no_grad():
            latents = vae.encode(pixel_values).latent_dist.sample(generator=generator) * vae.config.scaling_factor
            luminance = vae.encode_luminance(luminance_input)[-1]
            input_ids = tokenizer(
                batch["text"],
                max_length=tokenizer.model_max_length,
                padding="max_length",
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(accelerator.device)
            encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
        latents = latents.float()
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
            device=latents.device,
        ).long()
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        if noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        elif noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, luminance=luminance, return_dict=False)[0]
        if args.snr_gamma is None:
            return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.stack([snr, args.snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
        weights = weights / snr if noise_scheduler.config.prediction_type == "epsilon" else weights / (snr + 1)
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (loss * weights).mean()

    def validate(name: str) -> None:
        if not validation_items or not accelerator.is_main_process:
            return
        model = accelerator.unwrap_model(unet)
        model.eval()
        # The pipeline runs in one dtype: the frozen half-precision models go to float32 for the validation (exact
        # both ways: half-precision values are float32 values). nn.Module.to: diffusers' `to` warns on every cast.
        for frozen in (vae, text_encoder):
            torch.nn.Module.to(frozen, dtype=torch.float32)
        with common.ema_weights(ema, params):
            pipeline = LCADPipeline(
                vae=vae, unet=model, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=pipe.scheduler, default_processing_resolution=args.resolution,
                luminance_normalization=normalization,
            )
            run_validation(pipeline, validation_items, args, accelerator, name)
        for frozen in (vae, text_encoder):
            torch.nn.Module.to(frozen, dtype=weight_dtype)
        model.train()

    fixed_batch = None
    train_loss, micro_step, unreadable = 0.0, 0, 0
    done = global_step >= args.max_train_steps
    for epoch in range(first_epoch, num_train_epochs):
        if done:
            break
        train_dataset.set_epoch(epoch)
        train_dataloader.set_epoch(epoch)
        loader = train_dataloader
        if epoch == first_epoch and skip_batches:
            loader = accelerator.skip_first_batches(train_dataloader, skip_batches)
            loader.set_epoch(epoch)
        for batch in loader:
            unreadable += int(accelerator.gather(batch["unreadable"].to(accelerator.device)).sum())
            if args.overfit_one_batch:
                fixed_batch = batch if fixed_batch is None else fixed_batch
                batch = fixed_batch
            with accelerator.accumulate(unet):
                generator = common.step_generator(
                    args.seed, 0 if args.overfit_one_batch else global_step,
                    micro_step, accelerator.process_index, accelerator.device,
                )
                loss = compute_loss(batch, generator)
                gathered = accelerator.gather(loss.detach().repeat(args.train_batch_size)).mean()
                train_loss += gathered.item()
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro_step += 1

            if accelerator.sync_gradients:
                # The mean over the step's micro-batches (fewer than --gradient_accumulation_steps at an epoch's end).
                train_loss /= micro_step
                micro_step = 0
                if ema is not None:
                    ema.step(params)
                global_step += 1
                train_state.global_step = global_step
                train_state.unreadable_images += unreadable
                unreadable = 0
                progress_bar.update(1)
                metrics.log(
                    {"loss": train_loss, "lr": lr_scheduler.get_last_lr()[0],
                     "unreadable_images": train_state.unreadable_images, "epoch": epoch},
                    step=global_step,
                )
                progress_bar.set_postfix(loss=train_loss)
                train_loss = 0.0
                if global_step % args.checkpointing_steps == 0:
                    common.save_checkpoint(accelerator, args, global_step)
                if args.validation_steps and global_step % args.validation_steps == 0:
                    validate(f"step-{global_step:06d}")
                if global_step >= args.max_train_steps:
                    done = True
                    break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to(params)
        if args.trainable == "lora":
            model.fuse_lora()
            model.unload_lora()
        model.eval()
        if weight_dtype != torch.float32:
            # The frozen models ran in half precision: save the float32 originals.
            vae, text_encoder = load_frozen_models(args)
        pipeline = LCADPipeline(
            vae=vae, unet=model, text_encoder=text_encoder,
            tokenizer=tokenizer, scheduler=pipe.scheduler, default_denoising_steps=pipe.config.default_denoising_steps,
            default_processing_resolution=args.resolution, luminance_normalization=normalization,
        )
        pipeline.save_pretrained(args.output_dir)
        logger.info("Saved the L-CAD pipeline to %s (step %d)", args.output_dir, global_step)
        if validation_items:
            run_validation(pipeline.to(accelerator.device), validation_items, args, accelerator, "final")
        write_model_card(args, repo_id, global_step)
        if args.push_to_hub:
            common.upload_output(args, repo_id, commit_message=f"L-CAD stage 2, step {global_step}")
    accelerator.end_training()


def write_model_card(args: argparse.Namespace, repo_id: str | None, global_step: int) -> None:
    """README.md of the output folder: the project's card (lcad_pipeline.hub) plus how this model was trained."""
    summary = common.training_summary(
        args,
        ["pretrained_model_name_or_path", "luminance_vae_path", "dataset_name", "train_data_dir", "caption_file",
         "resolution", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "max_train_steps",
         "trainable", "partial_ratio", "scarce_ratio", "text_dropout", "scarce_mode", "use_ema", "seed"],
    )
    training = (
        f"\n\n## Training\n\nTrained with `training/train_latent.py` (L-CAD stage 2) for {global_step} steps:\n\n"
        f"{summary}\n"
    )
    try:
        from lcad_pipeline.hub import render_model_card

        card = render_model_card(
            base_model=args.pretrained_model_name_or_path if not os.path.isdir(args.pretrained_model_name_or_path) else None,
            repo_id=repo_id,
            model_name=f"L-CAD ({os.path.basename(os.path.abspath(args.output_dir))})",
            tags=["lcad-training"],
        )
        text = str(card)
    except (ImportError, AttributeError):
        from huggingface_hub import ModelCard, ModelCardData

        data = ModelCardData(library_name="diffusers", pipeline_tag="image-to-image", tags=["lcad", "colorization"])
        text = str(ModelCard.from_template(data, model_id=repo_id or "L-CAD"))
    with open(os.path.join(args.output_dir, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(text.rstrip() + training)


if __name__ == "__main__":
    main()
