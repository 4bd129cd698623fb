#!/usr/bin/env python
# Copyright 2026 The L-CAD diffusers port authors. Licensed under the Apache License, Version 2.0.
"""Stage 1 of L-CAD training: the luminance encoder in pixel space (paper Sec. 3.2, Eq. 3-4).

A colour image x is encoded by the frozen SD VAE encoder; its grey version (Lab lightness) goes through the luminance
encoder, whose multi-scale features are added into the VAE decoder; the reconstruction x~ should be x. Loss:

    L_pix = L_rec + alpha * L_dis + beta * L_per

with L_rec the artifact-map-weighted L1 (N_win = 7, computed as released), L_dis a 3-layer PatchGAN hinge loss with
taming-transformers' adaptive weight (from `--discriminator_start_step` on), L_per LPIPS (the backbone weights must be
given with `--lpips_weights`; without them the term is left out after a warning; the release had it off). As
released, only the luminance encoder is trained (`--train_decoder` also trains the decoder).

The adaptive weight compares the gradient norms of the two terms at the last trained layer: the decoder's `conv_out`
with `--train_decoder`, otherwise the luminance encoder's first zero convolution, whose feature is the last one the
decoder adds (right before its output layers).

The output folder holds the trained `LuminanceAutoencoderKL` (`save_pretrained`), to pass to
`training/train_latent.py --luminance_vae_path`.

    accelerate launch training/train_pixel.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --train_data_dir data/coco/images --output_dir out/stage1 \
        --num_train_epochs 10 --checkpointing_steps 5000 --validation_steps 1000
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

import numpy as np
import PIL.Image
import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import training_common as common  # noqa: E402  (training/training_common.py, beside this script)

from lcad_pipeline import LuminanceAutoencoderKL  # noqa: E402
from lcad_pipeline.image_processor_lcad import (  # noqa: E402
    LUMINANCE_NORMALIZATIONS,
    LCADImageProcessor,
    lightness_to_gray_rgb,
    rgb_to_lightness,
)
from lcad_pipeline.losses import (  # noqa: E402
    ARTIFACT_WINDOW,
    NLayerDiscriminator,
    PerceptualLoss,
    adaptive_discriminator_weight,
    artifact_weighted_l1,
    hinge_discriminator_loss,
    hinge_generator_loss,
    load_lpips,
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


logger = logging.getLogger("train_pixel")


# ------------------------------------------------------------------------------------------------ arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="L-CAD stage 1: train the luminance encoder with L_rec + alpha L_dis + beta L_per (run with "
        "accelerate launch)."
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Where the VAE comes from: a Stable Diffusion 1.x pipeline (folder or Hub id; its vae/ is used), an "
        "L-CAD pipeline folder, or a VAE / LuminanceAutoencoderKL folder (config.json at its top).",
    )
    model.add_argument(
        "--vae_subfolder", type=str, default="vae", help="Subfolder of the VAE in a pipeline (ignored for a VAE folder)."
    )
    model.add_argument(
        "--train_decoder", action="store_true", help="Also train the VAE decoder (frozen as released)."
    )
    model.add_argument(
        "--luminance_normalization",
        type=str,
        default="official",
        choices=sorted(LUMINANCE_NORMALIZATIONS),
        help='How the lightness is normalised for the luminance encoder ("official": L/127.5 - 1, as released); '
        "stage 2 must use the same.",
    )

    loss = parser.add_argument_group("loss (Eq. 4)")
    loss.add_argument(
        "--rec_window", type=int, default=ARTIFACT_WINDOW, help="N_win, the artifact map's window (7 as released)."
    )
    loss.add_argument("--discriminator_weight", type=float, default=1.0, help="alpha, the weight of L_dis (1.0).")
    loss.add_argument(
        "--discriminator_start_step",
        type=int,
        default=0,
        help="Step from which the discriminator is trained and L_dis is used (not published; 0: from the start).",
    )
    loss.add_argument(
        "--discriminator_learning_rate",
        type=float,
        default=None,
        help="Adam learning rate of the discriminator (default: --learning_rate).",
    )
    loss.add_argument("--discriminator_layers", type=int, default=3, help="PatchGAN layers (3 as released).")
    loss.add_argument("--discriminator_channels", type=int, default=64, help="PatchGAN base channels.")
    loss.add_argument("--perceptual_weight", type=float, default=0.5, help="beta, the weight of L_per (0.5).")
    loss.add_argument(
        "--lpips_weights",
        type=str,
        default=None,
        help="torchvision AlexNet or VGG16 state dict (alexnet-owt-7be5be79.pth, vgg16-397923af.pth) for LPIPS; "
        "without it L_per is left out (with a warning).",
    )

    add_data_arguments(parser, captions=False)
    common.add_common_arguments(parser, learning_rate=1e-6, train_batch_size=8)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags; a bad flag stops here with an argparse error naming it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_data_arguments(args)
        common.check_common_arguments(args)
        if args.rec_window < 3 or args.rec_window % 2 == 0:
            raise ValueError(f"--rec_window must be an odd number >= 3, got {args.rec_window}.")
        for flag in ("discriminator_weight", "perceptual_weight"):
            if getattr(args, flag) < 0:
                raise ValueError(f"--{flag} must be >= 0, got {getattr(args, flag)}.")
        if args.discriminator_start_step < 0:
            raise ValueError(f"--discriminator_start_step must be >= 0, got {args.discriminator_start_step}.")
        if args.discriminator_learning_rate is not None and args.discriminator_learning_rate <= 0:
            raise ValueError(f"--discriminator_learning_rate must be positive, got {args.discriminator_learning_rate}.")
        if args.discriminator_layers < 1 or args.discriminator_channels < 1:
            raise ValueError("--discriminator_layers and --discriminator_channels must be positive.")
        if args.lpips_weights is not None and not os.path.isfile(args.lpips_weights):
            raise ValueError(f"--lpips_weights {args.lpips_weights!r} is not a file.")
    except ValueError as error:
        parser.error(str(error))
    return args


# ------------------------------------------------------------------------------------------------ models


def load_vae(args: argparse.Namespace) -> LuminanceAutoencoderKL:
    """The `LuminanceAutoencoderKL` to train (a stock SD VAE gets a luminance encoder copied from its encoder)."""
    path = args.pretrained_model_name_or_path
    subfolder = None if os.path.isfile(os.path.join(path, "config.json")) else args.vae_subfolder
    try:
        return LuminanceAutoencoderKL.from_pretrained(path, subfolder=subfolder, revision=args.revision, variant=args.variant)
    except (OSError, ValueError) as error:
        raise ValueError(f"--pretrained_model_name_or_path {path!r}: no VAE could be loaded ({error})") from None


class LuminanceReconstruction(nn.Module):
    """
    The computation stage 1 trains, as one module so that DistributedDataParallel sees it as a forward: encode the
    colour image (frozen encoder), extract the grey image's features, decode guided by them.
    """

    def __init__(self, vae: LuminanceAutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(
        self, pixel_values: torch.Tensor, luminance: torch.Tensor, generator: torch.Generator | None = None,
        sample_posterior: bool = True,
    ) -> torch.Tensor:
        with torch.no_grad():
            posterior = self.vae.encode(pixel_values).latent_dist
            latents = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        features = self.vae.encode_luminance(luminance)
        return self.vae.decode(latents, luminance_features=features).sample


def trainable_parameters(vae: LuminanceAutoencoderKL, train_decoder: bool) -> tuple[list[nn.Parameter], torch.Tensor]:
    """Freeze all but the luminance encoder (and the decoder); returns (trained parameters, adaptive-weight layer)."""
    vae.requires_grad_(False)
    vae.luminance_encoder.requires_grad_(True)
    if train_decoder:
        vae.decoder.requires_grad_(True)
        last_layer = vae.decoder.conv_out.weight
    else:
        # The decoder adds the luminance features last-first: the first zero convolution's feature is added last.
        last_layer = vae.luminance_encoder.down_zero_convs[0].weight
    return [p for p in vae.parameters() if p.requires_grad], last_layer


# ------------------------------------------------------------------------------------------------ data


def build_datasets(args: argparse.Namespace):
    """(training dataset, validation images); ValueErrors name the flag."""
    dataset = load_image_caption_dataset(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_data_dir=args.train_data_dir,
        caption_file=args.caption_file,
        image_column=args.image_column,
        caption_column=None,
        cache_dir=args.cache_dir,
        max_samples=args.max_train_samples,
        seed=args.seed,
    )
    validation = []
    if args.validation_steps is not None:
        if args.validation_image:
            validation = load_validation_images(args.validation_image, args.resolution)
        elif args.num_validation_images > 0:
            dataset, held_out = split_validation(dataset, args.num_validation_images)
            validation = [square_image(image, args.resolution) for image, _ in held_out]
    train_dataset = LCADTrainingDataset(
        dataset,
        resolution=args.resolution,
        seed=args.seed,
        center_crop=args.center_crop,
        crop_min_scale=args.crop_min_scale,
        random_flip=args.random_flip,
    )
    return train_dataset, validation


def _to_model_inputs(images: list[PIL.Image.Image], normalization: str, channels: int):
    rgb = torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images])).permute(0, 3, 1, 2)
    lightness = rgb_to_lightness(rgb)
    return rgb * 2 - 1, LCADImageProcessor.normalize_luminance(lightness, normalization, channels), lightness


@torch.no_grad()
def run_validation(vae: LuminanceAutoencoderKL, images, args, accelerator, name: str) -> str | None:
    """Reconstruct the validation images from their latents guided by their grey version; grid: grey | result | original."""
    if not images:
        return None
    pixel_values, luminance, lightness = _to_model_inputs(
        images, args.luminance_normalization, vae.config.luminance_in_channels
    )
    model = LuminanceReconstruction(vae)
    with accelerator.autocast():
        reconstruction = model(
            pixel_values.to(accelerator.device, vae.dtype), luminance.to(accelerator.device, vae.dtype),
            sample_posterior=False,
        )
    results = LCADImageProcessor.to_output(
        [((r[None].float().cpu() + 1) / 2).clamp(0, 1) for r in reconstruction], "pil"
    )
    greys = LCADImageProcessor.to_output([lightness_to_gray_rgb(l[None]) for l in lightness], "pil")
    path = common.save_validation_grid(accelerator, args, [list(row) for row in zip(greys, results, images)], name)
    logger.info("Validation images saved to %s", path)
    return path


# ------------------------------------------------------------------------------------------------ training


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    accelerator = common.make_accelerator(args)
    common.configure_logging(accelerator)
    logger.info(accelerator.state)

    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    repo_id = common.create_hub_repo(args) if args.push_to_hub and accelerator.is_main_process else None

    with accelerator.main_process_first():
        train_dataset, validation_images = build_datasets(args)
    vae = load_vae(args)
    params, last_layer = trainable_parameters(vae, args.train_decoder)
    logger.info(
        "Training %s of the VAE's %s parameters (luminance encoder%s).",
        f"{sum(p.numel() for p in params):,}", f"{sum(p.numel() for p in vae.parameters()):,}",
        " and decoder" if args.train_decoder else "",
    )
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    vae.train()
    model = LuminanceReconstruction(vae).to(accelerator.device)

    use_gan = args.discriminator_weight > 0
    discriminator = NLayerDiscriminator(3, args.discriminator_channels, args.discriminator_layers).to(accelerator.device)
    lpips_network = load_lpips(args.lpips_weights) if args.perceptual_weight > 0 else None
    perceptual = PerceptualLoss(lpips_network).to(accelerator.device) if lpips_network is not None else None

    if args.scale_lr:
        scale = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        args.learning_rate *= scale
        if args.discriminator_learning_rate is not None:
            args.discriminator_learning_rate *= scale
    adam = dict(betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, **adam)
    optimizer_d = torch.optim.AdamW(
        discriminator.parameters(), lr=args.discriminator_learning_rate or args.learning_rate, **adam
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
    model, discriminator, optimizer, optimizer_d, train_dataloader, lr_scheduler = accelerator.prepare(
        model, discriminator, optimizer, optimizer_d, train_dataloader, lr_scheduler
    )
    steps_per_epoch, num_train_epochs = common.epochs_and_steps(args, len(train_dataloader), steps_from_epochs)
    raw_discriminator = accelerator.unwrap_model(discriminator)

    ema = common.make_ema(args, params)
    train_state = common.TrainState()
    accelerator.register_for_checkpointing(train_state)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name or "lcad-pixel", config=config)
    metrics = common.MetricsLog(accelerator, args.output_dir)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training (L-CAD stage 1) *****")
    logger.info("  Num examples = %d", len(train_dataset))
    logger.info("  Num epochs = %d", num_train_epochs)
    logger.info("  Batch size per device = %d, total (parallel, accumulation) = %d", args.train_batch_size, total_batch_size)
    logger.info("  Total optimisation steps = %d", args.max_train_steps)
    logger.info(
        "  Loss: L_rec%s%s", f" + {args.discriminator_weight} L_dis (from step {args.discriminator_start_step})" if use_gan else "",
        f" + {args.perceptual_weight} L_per" if perceptual is not None else "",
    )

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

    def validate(name: str) -> None:
        if not validation_images or not accelerator.is_main_process:
            return
        vae.eval()
        with common.ema_weights(ema, params):
            run_validation(vae, validation_images, args, accelerator, name)
        vae.train()

    fixed_batch = None
    logs: dict[str, float] = {}
    micro_step, unreadable = 0, 0
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
            gan_active = use_gan and global_step >= args.discriminator_start_step
            with accelerator.accumulate(model, discriminator):
                generator = common.step_generator(
                    args.seed, 0 if args.overfit_one_batch else global_step,
                    micro_step, accelerator.process_index, accelerator.device,
                )
                pixel_values = batch["pixel_values"].to(accelerator.device)
                luminance = LCADImageProcessor.normalize_luminance(
                    batch["lightness"], args.luminance_normalization, channels=vae.config.luminance_in_channels
                ).to(accelerator.device)
                reconstruction = model(pixel_values, luminance, generator=generator)

                # Generator: L_rec + beta L_per + alpha * adaptive weight * L_dis.
                loss_rec = artifact_weighted_l1(pixel_values, reconstruction, args.rec_window)
                nll = loss_rec
                values = {"loss_rec": loss_rec.detach()}
                if perceptual is not None:
                    loss_per = perceptual(reconstruction, pixel_values)
                    nll = nll + args.perceptual_weight * loss_per
                    values["loss_per"] = loss_per.detach()
                loss = nll
                if gan_active:
                    raw_discriminator.requires_grad_(False)  # no discriminator gradients from the generator's loss
                    loss_g = hinge_generator_loss(raw_discriminator(reconstruction.float()))
                    raw_discriminator.requires_grad_(True)
                    d_weight = adaptive_discriminator_weight(nll, loss_g, last_layer)
                    loss = nll + args.discriminator_weight * d_weight * loss_g
                    values.update(loss_g=loss_g.detach(), d_weight=d_weight)
                values["loss"] = loss.detach()
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.unscale_gradients(optimizer=optimizer)
                    torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                # Discriminator: hinge loss on real and (detached) reconstructed images, in one forward.
                if gan_active:
                    logits = discriminator(torch.cat([pixel_values, reconstruction.detach()]).float())
                    logits_real, logits_fake = logits.chunk(2)
                    loss_d = hinge_discriminator_loss(logits_real, logits_fake)
                    accelerator.backward(loss_d)
                    optimizer_d.step()
                    optimizer_d.zero_grad(set_to_none=True)
                    values["loss_d"] = loss_d.detach()
                for key, value in values.items():
                    mean = accelerator.gather(value.reshape(1).float()).mean().item()
                    logs[key] = logs.get(key, 0.0) + mean
            micro_step += 1

            if accelerator.sync_gradients:
                # Means over the step's micro-batches (fewer than --gradient_accumulation_steps at an epoch's end).
                logs = {key: value / micro_step for key, value in logs.items()}
                micro_step = 0
                if ema is not None:
                    ema.step(params)
                global_step += 1
                train_state.global_step = global_step
                train_state.unreadable_images += unreadable
                unreadable = 0
                progress_bar.update(1)
                logs.update(lr=lr_scheduler.get_last_lr()[0], unreadable_images=train_state.unreadable_images, epoch=epoch)
                metrics.log(logs, step=global_step)
                progress_bar.set_postfix(loss=logs["loss"], rec=logs["loss_rec"])
                logs = {}
                if global_step % args.checkpointing_steps == 0:
                    common.save_checkpoint(accelerator, args, global_step)
                if args.validation_steps and global_step % args.validation_steps == 0:
                    validate(f"step-{global_step:06d}")
                if global_step >= args.max_train_steps:
                    done = True
                    break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(params)
        vae.eval()
        vae.save_pretrained(args.output_dir)
        logger.info("Saved the LuminanceAutoencoderKL to %s (step %d)", args.output_dir, global_step)
        if not vae.is_luminance_encoder_trained():
            logger.warning("The luminance encoder's zero convolutions are still zero: train longer or with a larger lr.")
        if validation_images:
            run_validation(vae, validation_images, args, accelerator, "final")
        write_model_card(args, repo_id, global_step)
        if args.push_to_hub:
            common.upload_output(args, repo_id, commit_message=f"L-CAD stage 1, step {global_step}")
    accelerator.end_training()


def write_model_card(args: argparse.Namespace, repo_id: str | None, global_step: int) -> None:
    """README.md of the output folder: what this LuminanceAutoencoderKL is and how it was trained."""
    from huggingface_hub import ModelCard, ModelCardData

    summary = common.training_summary(
        args,
        ["pretrained_model_name_or_path", "dataset_name", "train_data_dir", "caption_file", "resolution",
         "train_batch_size", "gradient_accumulation_steps", "learning_rate", "max_train_steps", "train_decoder",
         "discriminator_weight", "discriminator_start_step", "perceptual_weight", "luminance_normalization",
         "use_ema", "seed"],
    )
    data = ModelCardData(library_name="diffusers", tags=["lcad", "colorization", "lcad-training", "autoencoder"])
    name = repo_id or os.path.basename(os.path.abspath(args.output_dir))
    text = (
        f"---\n{data.to_yaml()}\n---\n\n# {name}: L-CAD luminance autoencoder (stage 1)\n\n"
        "The Stable Diffusion VAE with L-CAD's luminance encoder (Chang, Weng et al., NeurIPS 2023), trained with "
        "`training/train_pixel.py`: the grey image's multi-scale features guide the decoder so the colour result "
        "keeps the grey input's structure. Use it as `--luminance_vae_path` of `training/train_latent.py` (stage 2), "
        "or load it with `lcad_pipeline.LuminanceAutoencoderKL.from_pretrained`.\n\n"
        f"## Training\n\n{global_step} steps:\n\n{summary}\n"
    )
    ModelCard(text).save(os.path.join(args.output_dir, "README.md"))


if __name__ == "__main__":
    main()
