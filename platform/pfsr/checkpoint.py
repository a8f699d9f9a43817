"""Checkpoint formats: a training checkpoint (everything to resume) and a serving checkpoint (EMA weights and
config), both plain dicts of tensors and primitives that load with torch.load(weights_only=True)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, BinaryIO, Optional

import torch

from .config import Config, config_from_dict
from .errors import InputError
from .models.sr import PFSRModel, build_model
from .train import TrainState, make_state

FORMAT = "pfsr"
FORMAT_VERSION = 1


def training_checkpoint(state: TrainState, config: Config, metrics: Optional[dict[str, float]] = None) -> dict:
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "kind": "training", "config": config.to_dict(),
        "step": state.step, "model": state.model.state_dict(), "ema": state.ema.state_dict(),
        "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
        "data_position": dict(state.data_position), "best_val": state.best_val, "metrics": dict(metrics or {}),
    }


def serving_checkpoint(ckpt: dict) -> dict:
    """Training checkpoint -> serving checkpoint: EMA weights, config, step, metrics."""
    return {"format": FORMAT, "version": FORMAT_VERSION, "kind": "serving", "config": ckpt["config"],
            "step": ckpt["step"], "model": ckpt["ema"], "metrics": ckpt.get("metrics", {})}


def save(obj: dict, dest: str | Path | BinaryIO) -> None:
    """torch.save to a file object, or atomically to a local path (temp file + rename)."""
    if isinstance(dest, (str, Path)):
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        torch.save(obj, tmp)
        tmp.replace(dest)
    else:
        torch.save(obj, dest)


def load(src: str | Path | bytes | BinaryIO, kind: Optional[str] = None) -> dict:
    """Load and check a PF-SR checkpoint (weights_only); `kind` "training" or "serving" to insist on one."""
    name = str(src) if isinstance(src, (str, Path)) else "checkpoint"
    if isinstance(src, (str, Path)) and not Path(src).is_file():
        raise InputError(f"checkpoint {src} does not exist")
    try:
        obj = torch.load(io.BytesIO(src) if isinstance(src, bytes) else src, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip or weights_only errors all mean: not a checkpoint of ours
        raise InputError(f"{name} is not a PF-SR checkpoint (torch.load failed: {str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise InputError(f"{name} is not a PF-SR checkpoint (no 'format': 'pfsr' entry)")
    if obj.get("version", 0) > FORMAT_VERSION:
        raise InputError(f"{name} has format version {obj['version']}; this PF-SR reads up to {FORMAT_VERSION}")
    if kind is not None and obj.get("kind") != kind:
        raise InputError(f"{name} is a {obj.get('kind')} checkpoint, expected a {kind} checkpoint"
                         + (" (make one with `pfsr export`)" if kind == "serving" else ""))
    return obj


def model_from_checkpoint(ckpt: dict, *, use_ema: bool = True) -> PFSRModel:
    """Model with the checkpoint's weights (EMA for training checkpoints unless use_ema=False), in eval mode."""
    config = config_from_dict(ckpt["config"])
    model = build_model(config)
    weights = ckpt["model"] if ckpt["kind"] == "serving" or not use_ema else ckpt["ema"]
    model.load_state_dict(weights)
    return model.eval()


def load_model(path: str | Path | bytes, device: str | torch.device = "cpu") -> PFSRModel:
    """A serving (or training: EMA weights) checkpoint -> model on `device`, eval mode."""
    return model_from_checkpoint(load(path)).to(device)


def restore_state(ckpt: dict, config: Optional[Config] = None) -> tuple[TrainState, Config]:
    """Training checkpoint -> TrainState ready to continue (same step, optimizer, scheduler, data position)."""
    config = config or config_from_dict(ckpt["config"])
    model = build_model(config)
    model.load_state_dict(ckpt["model"])
    state = make_state(model, config)
    state.ema.load_state_dict(ckpt["ema"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    state.step = ckpt["step"]
    state.data_position = dict(ckpt.get("data_position") or {})
    state.best_val = ckpt.get("best_val")
    return state, config


def init_from(state: TrainState, ckpt: dict) -> list[str]:
    """Start a new stage from a previous stage's weights (`--init`): model and EMA weights only, matching keys.
    Returns the parameter names not found in the checkpoint (e.g. the U-Net after the encoder stage)."""
    weights = ckpt["model"] if ckpt["kind"] == "serving" else ckpt["ema"]
    missing, unexpected = state.model.load_state_dict(weights, strict=False)
    if unexpected:
        raise InputError(f"--init checkpoint has weights this model does not: {unexpected[:5]} (different config?)")
    state.ema.load_state_dict(state.model.state_dict())
    return list(missing)


def describe(ckpt: dict) -> dict[str, Any]:
    return {"kind": ckpt["kind"], "step": ckpt["step"], "scale": ckpt["config"]["model"]["scale"],
            "metrics": ckpt.get("metrics", {})}
