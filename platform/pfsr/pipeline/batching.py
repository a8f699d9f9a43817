"""Batches of super-resolution work items of mixed sizes and solver settings (no Ray): shared by the Serve
endpoint and the Ray Data evaluation replicas.

Items that fit one tile are grouped by (solver settings, size bucket): each is padded to its bucket (sides rounded
up to a multiple of `bucket` LR pixels, as `super_resolve_tiled` pads to the U-Net multiple), the group is solved
as one batch with one seed per item, and each output is cropped back. An item's result depends only on itself:
its padding on its own size, its x_T on its own seed. Adaptive dopri5 and the SDE would couple a batch (one step
control, one noise stream), so they are never grouped: each such item is a group of one, as is an item larger
than a tile, which goes through overlapping tiles with blended seams.

With `bucket` equal to the model's LR multiple a grouped item is bit-for-bit what `pfsr upscale` computes
(up to the floating-point order of a batched convolution).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

import torch
from torch import Tensor

from ..inference import _pad_to_multiple, is_deterministic_batchable, super_resolve, super_resolve_tiled
from ..models.sr import PFSRModel


@dataclass(frozen=True)
class SolverSettings:
    """One sampler setting (hashable: part of a group key). steps None with pf_ode = adaptive dopri5; order:
    mrs_sde's (None: its default)."""

    method: str
    steps: Optional[int] = None
    rtol: float = 1e-4
    atol: float = 1e-4
    order: Optional[int] = None

    @property
    def batchable(self) -> bool:
        return is_deterministic_batchable(self.method, self.steps)

    def kwargs(self) -> dict:
        return {"method": self.method, "steps": self.steps, "rtol": self.rtol, "atol": self.atol, "order": self.order}


@dataclass
class WorkItem:
    """lr: [C x h x w] in [0, 1] on the model's device; seed: its x_T seed."""

    lr: Tensor
    seed: int
    settings: SolverSettings


def effective_bucket(model: PFSRModel, bucket: int) -> int:
    """The bucket rounded to a multiple of the model's LR multiple (the U-Net needs that anyway)."""
    m = model.lr_multiple
    return m * math.ceil(max(bucket, 1) / m)


def padded_size(h: int, w: int, bucket: int) -> tuple[int, int]:
    return bucket * math.ceil(h / bucket), bucket * math.ceil(w / bucket)


def group_key(item: WorkItem, index: int, *, bucket: int, tile: int) -> Hashable:
    """Items with equal keys run as one batch; tiled and non-batchable items get a key of their own."""
    ph, pw = padded_size(item.lr.shape[-2], item.lr.shape[-1], bucket)
    if max(ph, pw) > tile or not item.settings.batchable:
        return ("alone", index)
    return (item.settings, ph, pw)


def plan_groups(items: Sequence[WorkItem], *, bucket: int, tile: int) -> list[list[int]]:
    """Indices of `items` in groups that can share one solve, in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(group_key(item, i, bucket=bucket, tile=tile), []).append(i)
    return list(groups.values())


@torch.no_grad()
def run_group(model: PFSRModel, items: Sequence[WorkItem], *, bucket: int, tile: int, overlap: int
              ) -> list[tuple[Tensor, int]]:
    """One group of `plan_groups` -> per item (SR [C x sh x sw] in [0, 1], NFE of its solve)."""
    settings, s = items[0].settings, model.scale
    h, w = items[0].lr.shape[-2:]
    ph, pw = padded_size(h, w, bucket)
    if len(items) == 1 and max(ph, pw) > tile:
        sr, nfe = super_resolve_tiled(model, items[0].lr[None], tile=tile, overlap=overlap, seed=items[0].seed,
                                      **settings.kwargs())
        return [(sr[0], nfe)]
    padded = []
    for item in items:
        x, _, _ = _pad_to_multiple(item.lr[None], bucket)
        padded.append(x[0])
    sr, nfe = super_resolve(model, torch.stack(padded), seeds=[item.seed for item in items], **settings.kwargs())
    return [(out[:, : item.lr.shape[-2] * s, : item.lr.shape[-1] * s], nfe) for out, item in zip(sr, items)]
