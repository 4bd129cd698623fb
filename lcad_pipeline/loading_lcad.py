# Copyright 2026 The L-CAD diffusers port authors. Licensed under the Apache License, Version 2.0.
"""Checks run after `from_pretrained` of the L-CAD models.

diffusers builds models on the meta device and loads the checkpoint into them; a weight the checkpoint lacks stays
on the meta device (or random, with `low_cpu_mem_usage=False`). L-CAD adds zero-initialised modules to stock models,
so a missing weight of those has a known right value (zero); anything else missing is an error, never a silently
unusable model. Hub remote code: imports only torch.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def materialize_as_zeros(model: nn.Module, keys: Iterable[str]) -> None:
    """Replace the named parameters/buffers (wherever they are, the meta device included) by zeros on the model's device."""
    keys = set(keys)
    reference = next((p for n, p in model.named_parameters() if n not in keys and p.device.type != "meta"), None)
    device = reference.device if reference is not None else torch.device("cpu")
    for key in keys:
        module_name, _, name = key.rpartition(".")
        module = model.get_submodule(module_name)
        old = getattr(module, name)
        new = torch.zeros(old.shape, device=device, dtype=old.dtype)
        if isinstance(old, nn.Parameter):
            module._parameters[name] = nn.Parameter(new, requires_grad=old.requires_grad)
        else:
            module._buffers[name] = new


def check_materialized(model: nn.Module) -> None:
    """Raise if any weight of `model` is still on the meta device or holds NaN."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.device.type == "meta":
            raise ValueError(f"Weight {name} of {type(model).__name__} was not loaded (still on the meta device).")
        if tensor.is_floating_point() and torch.isnan(tensor).any():
            raise ValueError(f"Weight {name} of {type(model).__name__} holds NaN.")
