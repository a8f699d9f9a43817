"""Batches of super-resolution work items of mixed sizes and solver settings (no Ray): shared by the Serve
endpoint and the Ray Data evaluation replicas.

Items that fit one tile are grouped by (solver settings, size bucket): each is padded to its bucket (sides rounded
up to a multiple of `bucket` LR pixels, as `super_resolve_tiled` pads to the U-Net multiple), the group is solved
as one batch (or as few as serve.memory_budget_mb allows) with one seed per item, and each output is cropped
back. An item's result depends only on itself:
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

from ..config import ServeConfig
from ..inference import (_pad_to_multiple, is_deterministic_batchable, plan_tiles, super_resolve,
                         super_resolve_tiled)
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
def run_group(model: PFSRModel, items: Sequence[WorkItem], *, bucket: int, tile: int, overlap: int,
              memory_budget_mb: float = ServeConfig.memory_budget_mb) -> list[tuple[Tensor, int]]:
    """One group of `plan_groups` -> per item (SR [C x sh x sw] in [0, 1], NFE of its solve). A group is solved
    in as many batches as `memory_budget_mb` needs; an item larger than the tile that the budget allows goes
    through tiles."""
    settings, s = items[0].settings, model.scale
    h, w = items[0].lr.shape[-2:]
    ph, pw = padded_size(h, w, bucket)
    plan = plan_tiles(model, ph, pw, tile=tile, memory_budget_mb=memory_budget_mb)
    if max(ph, pw) > plan.tile:
        tiled = [super_resolve_tiled(model, item.lr[None], tile=tile, overlap=overlap, seed=item.seed,
                                     memory_budget_mb=memory_budget_mb, **settings.kwargs()) for item in items]
        return [(sr[0], nfe) for sr, nfe in tiled]
    outs = []
    for start in range(0, len(items), plan.batch):
        chunk = items[start:start + plan.batch]
        padded = torch.stack([_pad_to_multiple(item.lr[None], bucket)[0][0] for item in chunk])
        sr, nfe = super_resolve(model, padded, seeds=[item.seed for item in chunk], **settings.kwargs())
        outs += [(out[:, : item.lr.shape[-2] * s, : item.lr.shape[-1] * s], nfe) for out, item in zip(sr, chunk)]
    return outs
