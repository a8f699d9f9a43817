"""One training step and the loop around it, shared by local runs and the Ray Train job (no Ray here)."""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .config import Config, LossConfig
from .degradation import degrade, to_uint8
from .losses import TrainingObjective
from .models.sr import PFSRModel

log = logging.getLogger("pfsr.train")


def set_trainable(model: PFSRModel, stage: str, loss: Optional[LossConfig] = None) -> None:
    """Encoder stage: only the RRDB (trunk and regression head). Inversion stage: only the inverter.
    Diffusion/quality stages: the U-Net and the RRDB trunk unless frozen; the RRDB's regression head stays as it
    was (it is the baseline, unused by the U-Net). A quality stage whose `loss` gives the encoder no gradient
    (dsm_weight 0, quality_train_encoder off: the reference code's fine-tuning) keeps the RRDB frozen too."""
    model.requires_grad_(False)
    if stage == "encoder":
        model.rrdb.requires_grad_(True)
        return
    if stage == "inversion":  # seed 001: the noise predictor alone, the PF-SR model frozen
        model.inverter.requires_grad_(True)
        return
    model.unet.requires_grad_(True)
    no_encoder_gradient = loss is not None and loss.dsm_weight == 0 and not loss.quality_train_encoder
    if not model.freeze_encoder and not no_encoder_gradient:
        model.rrdb.conv_first.requires_grad_(True)
        for i, block in enumerate(model.rrdb.body):
            block.requires_grad_(i <= max(model.rrdb.feature_blocks))


def lr_lambda(config: Config) -> Callable[[int], float]:
    """Linear warm-up over train.warmup_steps, then x lr_decay_factor at each of train.lr_decay_steps."""
    tc = config.train

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / tc.warmup_steps) if tc.warmup_steps > 0 else 1.0
        return warm * tc.lr_decay_factor ** sum(step >= s for s in tc.lr_decay_steps)

    return factor


@dataclass
class TrainState:
    """What a checkpoint holds besides the config: model, EMA, optimizer, scheduler, step, data position."""

    model: PFSRModel
    ema: PFSRModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    data_position: dict[str, Any] = field(default_factory=dict)
    best_val: Optional[float] = None


def make_state(model: PFSRModel, config: Config) -> TrainState:
    set_trainable(model, config.train.stage, config.loss)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.train.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    return TrainState(model=model, ema=ema, optimizer=optimizer, scheduler=scheduler)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def ema_decay_at(step: int, config: Config) -> float:
    """The EMA decay of optimizer step `step` (0-based): train.ema_decay, warmed up by train.ema_warmup."""
    tc = config.train
    return min(tc.ema_decay, (1 + step) / (10 + step)) if tc.ema_warmup else tc.ema_decay


def train_step(objective: nn.Module, hr: Tensor, state: TrainState, config: Config,
               generator: Optional[torch.Generator] = None, mask: Optional[Tensor] = None) -> dict[str, float]:
    """One optimizer step on a batch of HR crops [N x C x H x W] in [0, 1] (on the training device).

    `objective` is a TrainingObjective over state.model, possibly wrapped in DistributedDataParallel. The LR
    input is made here, on the device. mask: the crops' label masks [N x H x W] (seed 002's structure noise).
    Returns train/* metrics (losses, lr, grad_norm).
    """
    tc, lc = config.train, config.loss
    # 8-bit LR, as the LR files of the data sets (and every LR input at inference) are.
    lr_img = to_uint8(degrade(hr, config.model.scale, config.data.degradation, generator)).float() / 255
    with_quality = (tc.stage == "quality" or lc.quality_weight > 0) and state.step % lc.quality_every == 0
    use_bf16 = tc.bf16 and hr.device.type == "cuda"
    with torch.autocast(device_type=hr.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        losses = objective(hr, lr_img, with_quality=with_quality, generator=generator, mask=mask)
    code = losses.pop("code", None)  # seed 004: this batch's adaptive-condition codes
    state.optimizer.zero_grad(set_to_none=True)
    losses["total"].backward()
    params = [p for g in state.optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
    state.optimizer.step()
    state.scheduler.step()
    if code is not None:
        state.model.adaptive.update_histogram(code, tc.ema_decay)
    ema_update(state.ema, state.model, ema_decay_at(state.step, config))
    state.step += 1
    metrics = {f"train/{k}": v.item() for k, v in losses.items() if k != "total"}
    metrics["train/lr"] = state.optimizer.param_groups[0]["lr"]
    metrics["train/grad_norm"] = grad_norm.item()
    return metrics


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of torch's RNG for one training step of one rank (numpy's SeedSequence mixes the three)."""
    return int(np.random.SeedSequence((seed, rank, step)).generate_state(1, np.uint64)[0] >> 1)


def train_loop(state: TrainState, config: Config, batches: Iterable[Tensor], *,
               objective: Optional[nn.Module] = None, device: torch.device | str = "cpu",
               on_log: Optional[Callable[[int, dict[str, float]], None]] = None,
               until_step: Optional[int] = None, generator: Optional[torch.Generator] = None,
               noise_seed: Optional[tuple[int, int]] = None) -> TrainState:
    """Run train_step over `batches` until `until_step` (default train.steps); calls on_log every log_every steps
    with the metrics averaged since the last call, plus train/samples_per_s.

    `noise_seed` (seed, rank): torch's RNG is seeded with step_seed(seed, rank, step) before every step, so the
    step's noise (DSM t and eps, degradation, dropout) depends on the step alone and a run resumed from a
    checkpoint draws what an uninterrupted run does (with `generator` None)."""
    objective = objective if objective is not None else TrainingObjective(state.model, config.loss, config.train.stage)
    until_step = config.train.steps if until_step is None else until_step
    state.model.train()
    acc: dict[str, float] = {}
    count, samples, t0 = 0, 0, time.perf_counter()
    batch_iter: Iterator[Tensor] = iter(batches)
    while state.step < until_step:
        batch = next(batch_iter)
        hr, mask = batch if isinstance(batch, (tuple, list)) else (batch, None)  # (hr, mask): with_masks loaders
        hr = hr.to(device, non_blocking=True)
        if noise_seed is not None:
            torch.manual_seed(step_seed(*noise_seed, state.step))
        metrics = train_step(objective, hr, state, config, generator, mask=mask)
        for k, v in metrics.items():
            acc[k] = acc.get(k, 0.0) + v
        count, samples = count + 1, samples + hr.shape[0]
        if not all(math.isfinite(v) for v in metrics.values()):
            raise FloatingPointError(f"non-finite metrics at step {state.step}: {metrics}")
        if state.step % config.train.log_every == 0 or state.step == until_step:
            avg = {k: v / count for k, v in acc.items()}
            avg["train/samples_per_s"] = samples / (time.perf_counter() - t0)
            if on_log is not None:
                on_log(state.step, avg)
            acc, count, samples, t0 = {}, 0, 0, time.perf_counter()
    return state


def format_metrics(step: int, total: int, metrics: dict[str, float]) -> str:
    """The progress line: step, losses and samples/s."""
    parts = [f"step {step}/{total}"]
    for k, v in metrics.items():
        name = k.split("/", 1)[-1]
        parts.append(f"{name} {v:.3g}" if name != "samples_per_s" else f"{v:.1f} samples/s")
    return " | ".join(parts)
