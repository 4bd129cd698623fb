# Copyright 2026 The L-CAD diffusers port authors. Licensed under the Apache License, Version 2.0.
"""Masks from SAM (Segment Anything) for instance-aware sampling. Package only; needs `segment-anything`.

`SamSegmenter` wraps a SAM model (checkpoint supplied by the user: `sam_vit_b_01ec64.pth`, `sam_vit_l_0b3195.pth`,
`sam_vit_h_4b8939.pth`) and does two things the pipeline asks for through its `segmenter` argument:

- `segment(image, prompts)`: one mask per box and/or points prompt (what `instance_masks={"the cup": (x0, y0, x1,
  y1)}` turns into when a segmenter is given);
- `propose_regions(image)`: SAM's automatic mask generation (a grid of point prompts, quality and stability filters,
  box non-maximum suppression) for phrases given without masks; each phrase then gets the proposal where its own
  cross-attention from an early denoising step concentrates (`instance_masks.assign_regions_to_phrases`). The
  release has no such path: its authors pick SAM's masks by hand.

segment-anything's package `__init__` imports its `SamPredictor` and `SamAutomaticMaskGenerator`, which import
torchvision; the torchvision wheels that match torch 2.13 on this project's index are CUDA builds whose operators do
not load on CPU torch. So this module loads only segment-anything's `modeling` and `utils.amg` (torch and numpy
only), under a private package name so that the real `segment_anything` entry in `sys.modules` is left alone, and does
the predictor's resize and the generator's non-maximum suppression itself (PIL bilinear resize, as torchvision does on
a PIL image; a torch-only greedy NMS). Crop layers and small-region post-processing (which needs OpenCV) of SAM's
generator are not reproduced.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from functools import partial
from typing import Any, Mapping, Sequence

import numpy as np
import PIL.Image
import torch

_PRIVATE_PACKAGE = "_lcad_segment_anything"

# Architecture of the released SAM models (segment-anything's build_sam.py); tests pass smaller dicts.
_SAM_COMMON = dict(
    image_size=1024,
    patch_size=16,
    prompt_embed_dim=256,
    window_size=14,
    use_rel_pos=True,
    mlp_ratio=4,
    mask_in_chans=16,
    decoder_depth=2,
    decoder_mlp_dim=2048,
    decoder_num_heads=8,
    iou_head_depth=3,
    iou_head_hidden_dim=256,
)
SAM_CONFIGS: dict[str, dict] = {
    "vit_b": dict(_SAM_COMMON, encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, encoder_global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(_SAM_COMMON, encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16, encoder_global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(_SAM_COMMON, encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16, encoder_global_attn_indexes=(7, 15, 23, 31)),
}


def segment_anything_modules() -> types.SimpleNamespace:
    """segment-anything's `modeling` and `utils.amg` modules, loaded without its torchvision-importing `__init__`."""
    package = sys.modules.get(_PRIVATE_PACKAGE)
    if package is None:
        spec = importlib.util.find_spec("segment_anything")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("SAM masks need the `segment-anything` package: pip install segment-anything")
        package = types.ModuleType(_PRIVATE_PACKAGE)
        package.__path__ = list(spec.submodule_search_locations)
        package.__package__ = _PRIVATE_PACKAGE
        sys.modules[_PRIVATE_PACKAGE] = package
    return types.SimpleNamespace(
        modeling=importlib.import_module(f"{_PRIVATE_PACKAGE}.modeling"),
        amg=importlib.import_module(f"{_PRIVATE_PACKAGE}.utils.amg"),
    )


def _sam_config(model_type: str | Mapping[str, Any]) -> dict:
    if isinstance(model_type, Mapping):
        unknown = set(model_type) - set(SAM_CONFIGS["vit_b"])
        if unknown:
            raise ValueError(f"`sam_model_type`: unknown SAM config keys {sorted(unknown)}.")
        return dict(SAM_CONFIGS["vit_b"], **model_type)
    if model_type not in SAM_CONFIGS:
        raise ValueError(f"`sam_model_type` must be one of {sorted(SAM_CONFIGS)} (or a config dict), got {model_type!r}.")
    return SAM_CONFIGS[model_type]


def build_sam(model_type: str | Mapping[str, Any] = "vit_h") -> torch.nn.Module:
    """A randomly initialised SAM of the given architecture (`"vit_b"`, `"vit_l"`, `"vit_h"` or a config dict)."""
    c = _sam_config(model_type)
    m = segment_anything_modules().modeling
    embedding_size = c["image_size"] // c["patch_size"]
    sam = m.Sam(
        image_encoder=m.ImageEncoderViT(
            depth=c["encoder_depth"],
            embed_dim=c["encoder_embed_dim"],
            img_size=c["image_size"],
            mlp_ratio=c["mlp_ratio"],
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=c["encoder_num_heads"],
            patch_size=c["patch_size"],
            qkv_bias=True,
            use_rel_pos=c["use_rel_pos"],
            global_attn_indexes=tuple(c["encoder_global_attn_indexes"]),
            window_size=c["window_size"],
            out_chans=c["prompt_embed_dim"],
        ),
        prompt_encoder=m.PromptEncoder(
            embed_dim=c["prompt_embed_dim"],
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(c["image_size"], c["image_size"]),
            mask_in_chans=c["mask_in_chans"],
        ),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(
                depth=c["decoder_depth"],
                embedding_dim=c["prompt_embed_dim"],
                mlp_dim=c["decoder_mlp_dim"],
                num_heads=c["decoder_num_heads"],
            ),
            transformer_dim=c["prompt_embed_dim"],
            iou_head_depth=c["iou_head_depth"],
            iou_head_hidden_dim=c["iou_head_hidden_dim"],
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def load_sam(checkpoint: str | os.PathLike, model_type: str | Mapping[str, Any] = "vit_h", device: str | torch.device = "cpu"):
    """SAM with the weights of `checkpoint` (a state dict saved by torch, as Meta's release files are)."""
    path = os.fspath(checkpoint)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"`sam_checkpoint`: no file at {path!r}. Download a SAM checkpoint (e.g. sam_vit_h_4b8939.pth for "
            "'vit_h') and pass its path."
        )
    sam = build_sam(model_type)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state_dict, Mapping) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    try:
        sam.load_state_dict(state_dict)
    except RuntimeError as error:
        raise ValueError(
            f"`sam_checkpoint` {path!r} does not fit SAM {model_type!r}; is `sam_model_type` right?\n{error}"
        ) from None
    return sam.to(device)


def _image_to_rgb_array(image: Any) -> np.ndarray:
    """PIL / numpy (H x W or H x W x 3, uint8 or float in [0, 1]) / torch (3 x H x W or H x W, in [0, 1]) -> uint8 RGB."""
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float()
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"`image`: expected a grey or RGB image, got shape {array.shape}.")
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    return array


def _box_iou(boxes: torch.Tensor) -> torch.Tensor:
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    top_left = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (bottom_right - top_left).clamp_min(0).prod(-1)
    return inter / (area[:, None] + area[None, :] - inter).clamp_min(1e-12)


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression (torchvision.ops.nms semantics): kept indices, best score first."""
    order = torch.argsort(scores, descending=True)
    iou = _box_iou(boxes[order].float())
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long)]


class SamSegmenter:
    r"""
    SAM for the pipeline's `segmenter` argument: masks from boxes / points, and region proposals.

    Args:
        sam: a segment-anything `Sam` model (see `SamSegmenter.from_checkpoint`).
        points_per_side, points_per_batch, pred_iou_thresh, stability_score_thresh, stability_score_offset,
        box_nms_thresh: `propose_regions` settings, SAM's automatic mask generator's defaults except
            `points_per_side` (16 instead of 32: the masks end up on 8x8 to 32x32 attention grids).
        min_region_fraction: proposals smaller than this fraction of the image are dropped.
    """

    def __init__(
        self,
        sam: torch.nn.Module,
        points_per_side: int = 16,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        min_region_fraction: float = 0.002,
    ):
        self.sam = sam.eval()
        self.points_per_side = points_per_side
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.min_region_fraction = min_region_fraction
        self._cached_image: np.ndarray | None = None
        self._cached = None

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike,
        model_type: str | Mapping[str, Any] = "vit_h",
        device: str | torch.device = "cpu",
        **kwargs,
    ) -> "SamSegmenter":
        """Load SAM from a checkpoint file (`model_type`: `"vit_b"`, `"vit_l"`, `"vit_h"`)."""
        return cls(load_sam(checkpoint, model_type, device), **kwargs)

    # ---------------------------------------------------------------- SamPredictor's steps, without torchvision

    @torch.no_grad()
    def _embed(self, image: Any):
        """Image embedding, the resized input size and the original size (cached for the last image)."""
        array = _image_to_rgb_array(image)
        if self._cached_image is not None and np.array_equal(array, self._cached_image):
            return self._cached
        height, width = array.shape[:2]
        target = self.sam.image_encoder.img_size
        scale = target / max(height, width)
        new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
        resized = np.array(PIL.Image.fromarray(array).resize((new_w, new_h), PIL.Image.BILINEAR))
        pixels = torch.as_tensor(resized, device=self.sam.device).permute(2, 0, 1)[None].float()
        embedding = self.sam.image_encoder(self.sam.preprocess(pixels))
        self._cached_image, self._cached = array, (embedding, (new_h, new_w), (height, width))
        return self._cached

    @torch.no_grad()
    def _decode(self, embedding, input_size, original_size, points=None, labels=None, boxes=None, multimask=False):
        """Mask logits [B, C, H, W] at the original size and predicted IoUs [B, C]; coordinates in original pixels."""
        scale = torch.tensor([input_size[1] / original_size[1], input_size[0] / original_size[0]], device=self.sam.device)
        point_input = None
        if points is not None:
            point_input = (points.to(self.sam.device) * scale, labels.to(self.sam.device))
        if boxes is not None:
            boxes = (boxes.to(self.sam.device).reshape(-1, 2, 2) * scale).reshape(-1, 4)
        sparse, dense = self.sam.prompt_encoder(points=point_input, boxes=boxes, masks=None)
        low_res, iou = self.sam.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        return self.sam.postprocess_masks(low_res, input_size, original_size), iou

    # ---------------------------------------------------------------- the pipeline's interface

    def segment(self, image: Any, prompts: Sequence[Mapping[str, Any]]) -> list[np.ndarray]:
        """One boolean mask `[H, W]` (the image's size) per prompt `{"box": [4] | None, "points": [N, 2] | None,
        "labels": [N] | None}` (see `instance_masks.parse_prompt_spec`). A lone point is ambiguous, so SAM proposes
        three masks and the one with the best predicted IoU is taken, as SAM's authors advise."""
        embedding, input_size, original_size = self._embed(image)
        masks = []
        for prompt in prompts:
            box, points = prompt.get("box"), prompt.get("points")
            point_tensor = label_tensor = box_tensor = None
            if points is not None:
                point_tensor = torch.as_tensor(np.asarray(points), dtype=torch.float32)[None]
                label_tensor = torch.as_tensor(np.asarray(prompt["labels"]), dtype=torch.int64)[None]
            if box is not None:
                box_tensor = torch.as_tensor(np.asarray(box), dtype=torch.float32)[None]
            multimask = box is None and points is not None and len(points) == 1
            logits, iou = self._decode(embedding, input_size, original_size, point_tensor, label_tensor, box_tensor, multimask)
            best = int(iou[0].argmax())
            masks.append((logits[0, best] > self.sam.mask_threshold).cpu().numpy())
        return masks

    @torch.no_grad()
    def propose_regions(self, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's automatic mask generation: boolean region proposals `[R, H, W]` and their scores `[R]`, best first."""
        embedding, input_size, original_size = self._embed(image)
        height, width = original_size
        amg = segment_anything_modules().amg
        grid = torch.as_tensor(amg.build_point_grid(self.points_per_side), dtype=torch.float32)
        grid = grid * torch.tensor([width, height], dtype=torch.float32)
        all_masks, all_scores = [], []
        for start in range(0, len(grid), self.points_per_batch):
            points = grid[start : start + self.points_per_batch, None, :]
            labels = torch.ones(points.shape[:2], dtype=torch.int64)
            logits, iou = self._decode(embedding, input_size, original_size, points, labels, multimask=True)
            logits, iou = logits.flatten(0, 1), iou.flatten(0, 1)
            keep = iou > self.pred_iou_thresh
            logits, iou = logits[keep], iou[keep]
            stability = amg.calculate_stability_score(logits, self.sam.mask_threshold, self.stability_score_offset)
            keep = stability >= self.stability_score_thresh
            masks = logits[keep] > self.sam.mask_threshold
            area = masks.flatten(1).sum(1)
            keep = area >= max(1.0, self.min_region_fraction * height * width)
            all_masks.append(masks[keep].cpu())
            all_scores.append(iou[keep].cpu())
        masks, scores = torch.cat(all_masks), torch.cat(all_scores)
        if len(masks) == 0:
            return masks, scores
        keep = box_nms(amg.batched_mask_to_box(masks).float(), scores, self.box_nms_thresh)
        return masks[keep], scores[keep]
