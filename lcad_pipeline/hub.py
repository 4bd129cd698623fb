# Copyright 2026 The L-CAD diffusers port authors. Licensed under the Apache License, Version 2.0.
"""Model cards and Hub publishing of L-CAD pipeline folders (`lcad push`).

A pipeline folder (the output of `lcad convert` or `LCADPipeline.save_pretrained`) is uploaded whole: weights,
configs, `model_index.json`, the code files that let it load as Hub remote code, and its model card (`README.md`,
rendered from the repository's `model_card.md` template). Failures (offline, not logged in, an incomplete folder)
are `HubError`s with a message for the user.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from diffusers.utils import logging

logger = logging.get_logger(__name__)

TEMPLATE_NAME = "model_card.md"
CARD_TAGS = ["lcad", "colorization", "image-colorization", "text-guided-colorization", "stable-diffusion", "diffusers"]
# What the released checkpoints are, by file name (the release's README and the paper).
CHECKPOINT_DESCRIPTIONS = {
    "coco_weight.ckpt": "trained on the extended COCO-Stuff dataset",
    "multi_weight.ckpt": "trained on the multi-instance dataset",
    "auto_weight.ckpt": "for automatic colourisation, trained with scarce-level descriptions",
    "init_model.ckpt": "the untrained starting point: Stable Diffusion v1.5 with L-CAD's parts added, not a "
    "colourisation model",
}
LICENSE_TEXTS = {
    "cc-by-nc-4.0": "The authors released these weights under the Creative Commons Attribution-NonCommercial 4.0 "
    "International licence (CC BY-NC 4.0): attribution required, no commercial use. The converted weights keep "
    "that licence. The pipeline code is Apache-2.0.",
}


class HubError(Exception):
    """A publishing failure, with a message meant for the user (no traceback needed)."""


# ---------------------------------------------------------------------------------------------------- model card


def find_model_card_template() -> Path | None:
    """The `model_card.md` template: at the root of a source checkout (editable installs), or where an installed
    wheel puts it (`<prefix>/share/lcad_pipeline/`, setup.cfg's data_files)."""
    package_dir = Path(__file__).resolve().parent
    candidates = [package_dir / TEMPLATE_NAME, package_dir.parent / TEMPLATE_NAME]
    for prefix in dict.fromkeys((sysconfig.get_path("data"), sys.prefix, sys.base_prefix)):
        candidates.append(Path(prefix) / "share" / "lcad_pipeline" / TEMPLATE_NAME)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def render_model_card(
    license: str | None = None,
    base_model: str | None = "stable-diffusion-v1-5/stable-diffusion-v1-5",
    converted_from: str | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    tags: list[str] | None = None,
):
    r"""
    The model card (`huggingface_hub.ModelCard`) of an L-CAD pipeline, rendered from the `model_card.md` template.

    Args:
        license: the weights' licence id (`"cc-by-nc-4.0"` for the authors' weights).
        base_model: the Hub id of the model the weights derive from.
        converted_from: file name of the released checkpoint the weights were converted from, if any.
        repo_id: the Hub repository, used in the card's usage examples.
        model_name: the card's title (default: "L-CAD" plus the checkpoint's stem).
        tags: extra tags.
    """
    from huggingface_hub import ModelCard, ModelCardData

    if model_name is None:
        model_name = "L-CAD" + (f" ({Path(converted_from).stem})" if converted_from else "")
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="image-to-image",
        license=license,
        base_model=base_model,
        tags=list(dict.fromkeys(CARD_TAGS + list(tags or []))),
    )
    template = find_model_card_template()
    kwargs: dict[str, Any] = {
        "model_name": model_name,
        "repo_id": repo_id,
        "converted_from": converted_from,
        "checkpoint_description": CHECKPOINT_DESCRIPTIONS.get(Path(converted_from).name) if converted_from else None,
        "license_text": LICENSE_TEXTS.get(license or ""),
    }
    if template is None:
        logger.warning(
            "The model card template %s was not found; using huggingface_hub's default card.", TEMPLATE_NAME
        )
        return ModelCard.from_template(card_data, model_id=model_name)
    return ModelCard.from_template(card_data, template_path=str(template), **kwargs)


def write_model_card(folder: str | os.PathLike, **card_kwargs) -> Path:
    """Render the model card (see `render_model_card`) into `folder/README.md` and return its path."""
    card = render_model_card(**card_kwargs)
    path = Path(folder) / "README.md"
    card.save(str(path))
    return path


# ---------------------------------------------------------------------------------------------------- folders


def _is_ignored(relative: Path) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in relative.parts) or relative.suffix == ".pyc"


def upload_file_list(folder: str | os.PathLike) -> list[str]:
    r"""
    The files of a pipeline folder to upload (relative POSIX paths), after checking the folder is complete.

    Complete means: `model_index.json`; each component it names in its own folder, with its config and, for models,
    weights; the code files (`pipeline.py`, and `<component>/lcad_pipeline.py` for each L-CAD model); `README.md`.
    Hidden files and Python caches are left out. Raises `HubError` listing what is missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{str(folder)!r} is not a folder.")
    files = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not _is_ignored(p.relative_to(folder))
    )
    present = set(files)
    problems = []
    if "model_index.json" not in present:
        raise HubError(f"{str(folder)!r} is not a pipeline folder: it has no model_index.json.")
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise HubError(f"cannot read {folder / 'model_index.json'}: {error}") from None
    if "README.md" not in present:
        problems.append("README.md (the model card)")
    if "pipeline.py" not in present:
        problems.append("pipeline.py (the pipeline's code)")
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        library, _ = spec
        in_component = [f for f in files if f.startswith(component + "/")]
        if not in_component:
            problems.append(f"{component}/ (named in model_index.json)")
            continue
        if f"{component}/config.json" in present:  # a model: it needs weights
            if not any(f.endswith((".safetensors", ".bin")) for f in in_component):
                problems.append(f"{component}/ weights (*.safetensors)")
        if library == "lcad_pipeline" and f"{component}/lcad_pipeline.py" not in present:
            problems.append(f"{component}/lcad_pipeline.py (the model's code)")
    if problems:
        raise HubError(f"{str(folder)!r} is incomplete; missing: {', '.join(problems)}.")
    return files


def _offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "")
    return bool(constants.HF_HUB_OFFLINE) or value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _explain(error: Exception) -> str:
    """A one-line reason for a failed Hub call."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 401:
        return "not authenticated: log in with `hf auth login` or pass --token with a write token"
    if status == 403:
        return "the token may not write to this repository (403 Forbidden)"
    text = str(error).strip().splitlines()
    reason = text[0] if text else type(error).__name__
    if type(error).__name__ in {"ConnectError", "ConnectTimeout", "ConnectionError", "OfflineModeIsEnabled"}:
        return f"cannot reach the Hugging Face Hub (offline?): {reason}"
    return reason


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> str:
    r"""
    Upload a pipeline folder to the Hub repository `repo_id` (created if needed) and return the commit URL.

    The folder is checked first ([`upload_file_list`]); offline (`HF_HUB_OFFLINE=1`) or on any Hub failure this
    raises `HubError` with the reason.
    """
    files = upload_file_list(folder)
    if _offline():
        raise HubError("cannot upload: the Hugging Face Hub is disabled (HF_HUB_OFFLINE is set). Unset it and retry.")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        repo_id = getattr(repo, "repo_id", repo_id)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            allow_patterns=files,
            commit_message=commit_message or "Upload L-CAD pipeline",
            create_pr=create_pr,
        )
    except Exception as error:  # httpx / huggingface_hub errors: report, not a traceback
        raise HubError(f"upload to {repo_id!r} failed: {_explain(error)}") from None
    return str(getattr(commit, "commit_url", commit))


def push_pipeline(
    pipeline,
    repo_id: str,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    create_pr: bool = False,
    safe_serialization: bool = True,
    variant: str | None = None,
    model_card: str | os.PathLike | None = None,
    license: str | None = None,
    **save_kwargs,
) -> str:
    r"""
    Save an `LCADPipeline` and upload it with its code files and model card (what `LCADPipeline.push_to_hub` needs
    beyond `DiffusionPipeline.push_to_hub`, whose card is diffusers' generic one).

    The card is `model_card` (a README path) if given, else the README.md of the folder the pipeline was loaded from
    (e.g. a converted checkpoint's), else the template rendered with `license`. Other keyword arguments go to
    `save_pretrained` (e.g. `max_shard_size`).
    """
    if _offline():
        raise HubError("cannot upload: the Hugging Face Hub is disabled (HF_HUB_OFFLINE is set). Unset it and retry.")
    source = Path(model_card) if model_card else None
    if source is None:
        loaded_from = getattr(getattr(pipeline, "config", None), "_name_or_path", None) or getattr(
            pipeline, "name_or_path", None
        )
        if loaded_from and (Path(loaded_from) / "README.md").is_file():
            source = Path(loaded_from) / "README.md"
    with tempfile.TemporaryDirectory() as tmpdir:
        save_kwargs["safe_serialization"] = safe_serialization
        if variant is not None:
            save_kwargs["variant"] = variant
        pipeline.save_pretrained(tmpdir, **save_kwargs)
        if source is not None:
            (Path(tmpdir) / "README.md").write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
        else:
            write_model_card(tmpdir, license=license, repo_id=repo_id)
        return push_folder(
            tmpdir, repo_id, private=private, token=token, commit_message=commit_message, create_pr=create_pr
        )


# ---------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="OUTPUT_DIR", help="the pipeline folder (e.g. from `lcad convert`)")
    parser.add_argument("repo_id", metavar="REPO_ID", help="the Hub repository, e.g. your-name/lcad-coco")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", default=None, help="Hub token with write access (default: the logged-in one)")
    parser.add_argument("--commit-message", default=None, help="commit message")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")


def run(args: argparse.Namespace) -> int:
    """`lcad push`: 0 on success; 2 with a one-line message on stderr on failure."""
    try:
        url = push_folder(
            args.folder,
            args.repo_id,
            private=True if args.private else None,
            token=args.token,
            commit_message=args.commit_message,
            create_pr=args.create_pr,
        )
    except HubError as error:
        print(f"lcad push: error: {error}", file=sys.stderr)
        return 2
    print(f"lcad push: uploaded {args.folder} to {url}", file=sys.stderr)
    return 0


__all__ = [
    "HubError",
    "find_model_card_template",
    "push_folder",
    "push_pipeline",
    "render_model_card",
    "upload_file_list",
    "write_model_card",
]
