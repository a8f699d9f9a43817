"""Checkpoint formats: a training checkpoint (everything to resume) and a serving checkpoint (EMA weights and
config), both plain dicts of tensors and primitives that load with torch.load(weights_only=True)."""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
import time
from pathlib import Path
from typing import Any, BinaryIO, Optional

import torch

from .config import Config, config_from_dict
from .errors import InputError
from .models.sr import PFSRModel, build_model
from .train import TrainState, make_state

FORMAT = "pfsr"
FORMAT_VERSION = 1
# Inside a run directory (storage/name/): one folder per checkpoint holding the checkpoint and a small sidecar
# with its step and metrics, so that best/latest are found without downloading every checkpoint.
CHECKPOINT_FILE = "checkpoint.pt"
SIDECAR_FILE = "metrics.json"
REQUIRED_KEYS = {"serving": ("config", "model"),
                 "training": ("config", "model", "ema", "optimizer", "scheduler", "step")}
CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")
BEST_METRIC = "val/psnr_y"


def training_checkpoint(state: TrainState, config: Config, metrics: Optional[dict[str, float]] = None) -> dict:
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "kind": "training", "config": config.to_dict(),
        "step": state.step, "model": state.model.state_dict(), "ema": state.ema.state_dict(),
        "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
        "data_position": dict(state.data_position), "best_val": state.best_val, "metrics": dict(metrics or {}),
    }


def state_digest(ckpt: dict) -> str:
    """SHA-256 (hex) of a training checkpoint's model, EMA and optimizer state: every tensor's dtype, shape and
    bytes (on the CPU) and every other value, keys in sorted order. Equal digests mean a bit-exact restore."""
    h = hashlib.sha256()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value, key=repr):
                h.update(repr(key).encode())
                walk(value[key])
        elif isinstance(value, (list, tuple)):
            h.update(f"[{len(value)}".encode())
            for item in value:
                walk(item)
        elif isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())

    walk({key: ckpt[key] for key in ("model", "ema", "optimizer")})
    return h.hexdigest()


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


def load(src: str | Path | bytes | BinaryIO, kind: Optional[str] = None, name: Optional[str] = None) -> dict:
    """Load and check a PF-SR checkpoint (weights_only); `kind` "training" or "serving" to insist on one;
    `name` names bytes or a stream in messages."""
    name = name or (str(src) if isinstance(src, (str, Path)) else "checkpoint")
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
    if obj.get("kind") not in REQUIRED_KEYS:
        raise InputError(f"{name}: 'kind' is {obj.get('kind')!r}, expected 'serving' or 'training'")
    missing = [k for k in REQUIRED_KEYS[obj["kind"]] if k not in obj]
    if missing:
        raise InputError(f"{name}: this {obj['kind']} checkpoint has no {', '.join(repr(k) for k in missing)} "
                         "entry (damaged or hand-made?)")
    return obj


def model_from_checkpoint(ckpt: dict, *, use_ema: bool = True, name: str = "checkpoint") -> PFSRModel:
    """Model with the checkpoint's weights (EMA for training checkpoints unless use_ema=False), in eval mode;
    InputError naming `name` when the weights do not fit the checkpoint's config."""
    config = config_from_dict(ckpt["config"])
    model = build_model(config)
    entry = "model" if ckpt["kind"] == "serving" or not use_ema else "ema"
    try:
        model.load_state_dict(ckpt[entry])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise InputError(f"{name}: its {entry!r} weights do not fit its config: {' '.join(str(e).split())[:400]}") \
            from None
    return model.eval()


def load_model(path: str | Path | bytes, device: str | torch.device = "cpu", name: Optional[str] = None) -> PFSRModel:
    """A serving (or training: EMA weights) checkpoint -> model on `device`, eval mode; `name` names bytes in
    messages."""
    name = name or (str(path) if isinstance(path, (str, Path)) else None)
    return model_from_checkpoint(load(path, name=name), name=name or "checkpoint").to(device)


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
    Returns the parameter names not found in the checkpoint (e.g. the U-Net after the encoder stage). The noise
    predictor of an inversion-stage checkpoint is left out when the new stage has none: it was fitted to the
    weights this stage goes on to change."""
    weights = ckpt["model"] if ckpt["kind"] == "serving" else ckpt["ema"]
    if state.model.inverter is None:
        weights = {k: v for k, v in weights.items() if not k.startswith("inverter.")}
    missing, unexpected = state.model.load_state_dict(weights, strict=False)
    if unexpected:
        raise InputError(f"--init checkpoint has weights this model does not: {unexpected[:5]} (different config?)")
    state.ema.load_state_dict(state.model.state_dict())
    return list(missing)


def describe(ckpt: dict) -> dict[str, Any]:
    return {"kind": ckpt["kind"], "step": ckpt["step"], "scale": ckpt["config"]["model"]["scale"],
            "metrics": ckpt.get("metrics", {})}


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:06d}"


def save_checkpoint_dir(folder: str | Path, ckpt: dict) -> Path:
    """Write a training checkpoint into `folder` as a run keeps it: checkpoint.pt and the metrics.json sidecar
    (step, finite metrics and text ones such as a digest, wall-clock time of saving)."""
    folder = Path(folder)
    save(ckpt, folder / CHECKPOINT_FILE)
    metrics = {k: v for k, v in ckpt.get("metrics", {}).items() if isinstance(v, str) or math.isfinite(v)}
    (folder / SIDECAR_FILE).write_text(json.dumps({"step": ckpt["step"], "metrics": metrics,
                                                   "saved_at": time.time()}, indent=1))
    return folder


def find_checkpoint(uri: str, which: str = "best") -> str:
    """A run directory, checkpoint directory or checkpoint file (local or s3://) -> URI of the checkpoint file.

    In a run directory, "latest" is the checkpoint with the highest step and "best" the one with the highest
    val/psnr_y (the latest when none was validated). Reads only the sidecars, never imports Ray.
    """
    from . import storage

    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    if storage.is_file(uri):
        return uri
    if storage.is_file(storage.join(uri, CHECKPOINT_FILE)):
        return storage.join(uri, CHECKPOINT_FILE)
    found = {}  # step -> metrics, for complete checkpoint folders only
    for entry in storage.list_files(uri, recursive=True):
        folder, _, leaf = entry.path.rpartition("/")
        match = CHECKPOINT_DIR.match(folder)
        if match and leaf == SIDECAR_FILE:
            sidecar = storage.join(uri, entry.path)
            try:
                found[folder] = json.loads(storage.read_bytes(sidecar))
            except ValueError as e:
                raise InputError(f"{sidecar} is not JSON ({e}); a checkpoint sidecar holds its 'step' and "
                                 "'metrics'") from None
            if not (isinstance(found[folder], dict) and isinstance(found[folder].get("step"), int)
                    and isinstance(found[folder].get("metrics"), dict)):
                raise InputError(f"{sidecar} lacks an integer 'step' or a 'metrics' object")
    folders = [f for f in found if storage.is_file(storage.join(uri, f, CHECKPOINT_FILE))]
    if not folders:
        what = "does not exist" if not storage.exists(uri) else \
            f"holds no {CHECKPOINT_FILE} and no checkpoint_*/ folders with {CHECKPOINT_FILE} and {SIDECAR_FILE}"
        raise InputError(f"{uri} is not a PF-SR run or checkpoint: it {what}")
    chosen = max(folders, key=lambda f: found[f]["step"])
    if which == "best":
        scored = [f for f in folders if math.isfinite(found[f]["metrics"].get(BEST_METRIC, math.nan))]
        if scored:
            chosen = max(scored, key=lambda f: (found[f]["metrics"][BEST_METRIC], found[f]["step"]))
    return storage.join(uri, chosen, CHECKPOINT_FILE)


def read_checkpoint(uri: str, kind: Optional[str] = None) -> dict:
    """Load a checkpoint file from a local path or s3:// URI (see `load`)."""
    from . import storage

    return load(storage.read_bytes(uri), kind=kind, name=uri)


def run_export_cli(args) -> int:
    """`pfsr export --run URI --out FILE [--which best|latest]`: the serving checkpoint (EMA weights, config)."""
    from . import storage

    if storage.exists(args.out) and not storage.is_file(args.out):
        raise InputError(f"--out {args.out} is a directory; give the checkpoint file to write, e.g. "
                         f"{storage.join(args.out, 'model.pt')}")
    src = find_checkpoint(args.run, args.which)
    ckpt = read_checkpoint(src)
    serving = serving_checkpoint(ckpt) if ckpt["kind"] == "training" else ckpt
    buf = io.BytesIO()
    save(serving, buf)
    storage.write_bytes(args.out, buf.getvalue())
    psnr = serving["metrics"].get(BEST_METRIC)
    print(f"pfsr export: {src} (step {serving['step']}"
          + (f", {BEST_METRIC} {psnr:.2f} dB" if psnr is not None and math.isfinite(psnr) else "")
          + f") -> {args.out}")
    return 0
