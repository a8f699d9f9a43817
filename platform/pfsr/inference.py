"""Super-resolution of whole images: sampling, padding to the U-Net multiple, overlapping tiles with blended seams,
alpha re-attached. Used by `pfsr upscale`, `pfsr.upscale`, evaluation and the Serve endpoint."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .degradation import upsample
from .errors import InputError
from .models.sr import PFSRModel
from .sampling import INVSR_MAX_STEPS, MRS_ORDERS, SAMPLERS, STOCHASTIC, sample

log = logging.getLogger("pfsr.inference")

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "pfsr_x4_small.pt"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def is_deterministic_batchable(method: str, steps: Optional[int]) -> bool:
    """Fixed-step deterministic solvers run a batch at once; adaptive (dopri5) and stochastic (sde, mrs_sde)
    solvers run item by item, so that one item's step control or noise never depends on the others in its batch."""
    return method not in STOCHASTIC and not (method == "pf_ode" and steps is None)


def check_sampler(method: str, steps: Optional[int], order: Optional[int] = None, *, has_inverter: bool) -> None:
    """InputError for a setting the model or the sampler cannot run: an unknown sampler, `order` with a sampler
    other than mrs_sde or outside 1-2, invsr steps outside 1-5 or a model without an inverter."""
    if method not in SAMPLERS:
        raise InputError(f"unknown sampler {method!r}; choose one of {', '.join(sorted(SAMPLERS))}")
    if order is not None and method != "mrs_sde":
        raise InputError(f"order applies to the mrs_sde sampler only, not {method}")
    if order is not None and order not in MRS_ORDERS:
        raise InputError(f"mrs_sde order must be 1 or 2, got {order}")
    if method == "invsr":
        if steps is not None and not 1 <= steps <= INVSR_MAX_STEPS:
            raise InputError(f"invsr takes 1 to {INVSR_MAX_STEPS} steps, got {steps}")
        if not has_inverter:
            raise InputError("sampler invsr needs a checkpoint with an inverter: this one has none; train it with "
                             "`pfsr train --config configs/<size>_inversion.yaml --init <this model's run>` "
                             "(train.stage: inversion) and export that run")


def _prior(shape: Sequence[int], seeds: Sequence[int], device, dtype) -> Tensor:
    """x_T per item from its own seed (drawn on the CPU: the same on any device)."""
    return torch.stack([torch.randn(tuple(shape[1:]), generator=torch.Generator().manual_seed(s)) for s in seeds]).to(
        device=device, dtype=dtype)


@torch.no_grad()
def super_resolve(model: PFSRModel, lr: Tensor, *, method: str = "pf_ode", steps: Optional[int] = None,
                  rtol: float = 1e-4, atol: float = 1e-4, seeds: Optional[Sequence[int]] = None,
                  order: Optional[int] = None, code_seeds: Optional[Sequence[int]] = None) -> tuple[Tensor, int]:
    """LR [N x C x h x w] in [0, 1] (sides a multiple of model.lr_multiple) -> (SR [N x C x sh x sw] in [0, 1], NFE).

    NFE counts network evaluations of the batch (item-by-item solvers: the sum over items). `order`: mrs_sde's.
    invsr starts at the model's t* from the inverter's prediction, with each item's seed drawing its xi.
    code_seeds: the seeds of the adaptive condition's histogram draws (default: seeds).
    """
    check_sampler(method, steps, order, has_inverter=model.inverter is not None)
    seeds = list(range(lr.shape[0])) if seeds is None else list(seeds)
    if not is_deterministic_batchable(method, steps) and lr.shape[0] > 1:
        code_seeds = seeds if code_seeds is None else list(code_seeds)
        outs = [super_resolve(model, lr[i:i + 1], method=method, steps=steps, rtol=rtol, atol=atol, seeds=[s],
                              order=order, code_seeds=[code_seeds[i]]) for i, s in enumerate(seeds)]
        return torch.cat([o[0] for o in outs]), sum(o[1] for o in outs)
    cond = model.condition(lr, code_seeds=seeds if code_seeds is None else code_seeds)
    eps_fn, x0_fn = model.denoiser_fns(cond)
    x_T = _prior(cond.upsampled.shape, seeds, lr.device, lr.dtype)
    generator = torch.Generator(device=lr.device).manual_seed(seeds[0])
    start = {"x_T": x_T}
    if method == "invsr":
        t_star = torch.full((lr.shape[0],), model.t_star, device=lr.device, dtype=lr.dtype)
        start = {"x_T": None, "t_start": model.t_star, "x_start": model.inversion_start(cond, t_star, x_T)[0]}
    result = sample(eps_fn, sde=model.sde, method=method, steps=steps, rtol=rtol, atol=atol, generator=generator,
                    x0_fn=x0_fn, order=order, **start)
    return model.from_diffused(result.x, cond).clamp(0, 1), result.nfe


def _pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, int, int]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, h, w


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _blend_window(tile_h: int, tile_w: int, ramp: int, device) -> Tensor:
    """Weights that rise linearly over `ramp` pixels at each tile edge (seams blend, interiors stay 1)."""

    def axis(n: int) -> Tensor:
        i = torch.arange(n, device=device, dtype=torch.float32)
        edge = torch.minimum(i + 1, n - i) / max(ramp, 1)
        return edge.clamp(max=1.0)

    return axis(tile_h)[:, None] * axis(tile_w)[None, :]


@torch.no_grad()
def super_resolve_tiled(model: PFSRModel, lr: Tensor, *, tile: int = 128, overlap: int = 16, method: str = "pf_ode",
                        steps: Optional[int] = None, rtol: float = 1e-4, atol: float = 1e-4, seed: int = 0,
                        tile_batch: int = 4, order: Optional[int] = None) -> tuple[Tensor, int]:
    """One LR image [1 x C x h x w] of any size -> (SR [1 x C x sh x sw], NFE): padded to the U-Net multiple and,
    when larger than `tile` LR pixels, cut into overlapping tiles whose outputs are blended linearly over the
    overlap. Tile i uses seed + i; every tile draws its adaptive-condition code (histogram prior) with `seed`."""
    if lr.ndim != 4 or lr.shape[0] != 1:
        raise ValueError(f"expected one image [1, C, h, w], got {tuple(lr.shape)}")
    multiple = model.lr_multiple
    tile = max(multiple, tile - tile % multiple)
    overlap = min(overlap, tile // 2)
    lr, h, w = _pad_to_multiple(lr, multiple)
    ph, pw = lr.shape[-2:]
    tile_h, tile_w = min(tile, ph), min(tile, pw)
    boxes = [(y, x) for y in _tile_starts(ph, tile_h, overlap) for x in _tile_starts(pw, tile_w, overlap)]
    s = model.scale
    out = torch.zeros(1, lr.shape[1], ph * s, pw * s, device=lr.device)
    weight = torch.zeros(1, 1, ph * s, pw * s, device=lr.device)
    window = _blend_window(tile_h * s, tile_w * s, overlap * s, lr.device) if len(boxes) > 1 else \
        torch.ones(tile_h * s, tile_w * s, device=lr.device)
    nfe = 0
    for start in range(0, len(boxes), tile_batch):
        chunk = boxes[start:start + tile_batch]
        tiles = torch.cat([lr[..., y:y + tile_h, x:x + tile_w] for y, x in chunk])
        sr, n = super_resolve(model, tiles, method=method, steps=steps, rtol=rtol, atol=atol,
                              seeds=[seed + start + i for i in range(len(chunk))], order=order,
                              code_seeds=[seed] * len(chunk))
        nfe += n
        for (y, x), piece in zip(chunk, sr):
            out[..., y * s:(y + tile_h) * s, x * s:(x + tile_w) * s] += piece.float() * window
            weight[..., y * s:(y + tile_h) * s, x * s:(x + tile_w) * s] += window
    return (out / weight)[..., : h * s, : w * s].clamp(0, 1), nfe


@dataclass
class UpscaleResult:
    image: Image.Image
    nfe: int
    seconds: float


def resolve_device(device: Optional[str]) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_checkpoint(checkpoint: Optional[str | Path]) -> Path:
    path = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
    if not path.is_file():
        hint = "" if checkpoint is not None else " (the shipped model is missing: pass --checkpoint FILE)"
        raise InputError(f"checkpoint {path} does not exist{hint}")
    return path


def upscale_array(model: PFSRModel, rgb: np.ndarray, alpha: Optional[np.ndarray] = None, *, method: str,
                  steps: Optional[int], rtol: float = 1e-4, atol: float = 1e-4, seed: int = 0, tile: int = 128,
                  overlap: int = 16, device: torch.device | str = "cpu", order: Optional[int] = None) -> UpscaleResult:
    """HxWx3 uint8 RGB (and optional HxW uint8 alpha) -> UpscaleResult with an RGB or RGBA PIL image."""
    t0 = time.perf_counter()
    lr = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float().div(255).to(device)
    sr, nfe = super_resolve_tiled(model, lr, tile=tile, overlap=overlap, method=method, steps=steps, rtol=rtol,
                                  atol=atol, seed=seed, order=order)
    return UpscaleResult(image=to_image(sr[0], alpha, model.scale), nfe=nfe, seconds=time.perf_counter() - t0)


def to_image(sr: Tensor, alpha: Optional[np.ndarray], scale: int) -> Image.Image:
    """SR [C x H x W] in [0, 1] (and the input's h x w uint8 alpha, or None) -> RGB or RGBA PIL image."""
    out = (sr.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    if alpha is None:
        return Image.fromarray(out, mode="RGB")
    # alpha is not diffused: bicubic upsampling, re-attached
    a = torch.from_numpy(alpha).float().div(255)[None, None]
    a_up = (upsample(a, scale).clamp(0, 1)[0, 0].numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(np.dstack([out, a_up]), mode="RGBA")


def upscale(image, checkpoint: Optional[str | Path] = None, sampler: Optional[str] = None, *,
            steps: Optional[int] = None, rtol: float = 1e-4, atol: float = 1e-4, seed: int = 0,
            tile: Optional[int] = None, device: Optional[str] = None, model: Optional[PFSRModel] = None,
            order: Optional[int] = None) -> Image.Image:
    """Super-resolve a PIL image, a path, or image bytes; returns a PIL image `scale` times larger.

    `checkpoint`: an exported checkpoint (default: the shipped models/pfsr_x4_small.pt); `sampler`: one of
    pfsr.sampling.SAMPLERS (default: the checkpoint config's sampler); `order`: mrs_sde's (1 or 2, default 2).
    """
    from .checkpoint import load_model
    from .images import decode_image

    dev = resolve_device(device)
    model = model if model is not None else load_model(resolve_checkpoint(checkpoint), dev)
    cfg = model.config
    method = sampler or cfg.sampler.method
    steps = steps if steps is not None or sampler is not None else cfg.sampler.steps
    if isinstance(image, Image.Image):
        import io

        buf = io.BytesIO()
        image.save(buf, format="PNG")
        image = buf.getvalue()
    if isinstance(image, (str, Path)):
        name, data = str(image), Path(image).read_bytes()
    else:
        name, data = "image", bytes(image)
    decoded = decode_image(data, name, max_pixels=None)
    return upscale_array(model, decoded.rgb, decoded.alpha, method=method, steps=steps, rtol=rtol, atol=atol,
                         seed=seed, tile=tile or cfg.serve.tile, overlap=cfg.serve.tile_overlap, device=dev,
                         order=order).image


def run_cli(args) -> int:
    """`pfsr upscale IN OUT`: a file to a file, or a folder to a folder (PNG outputs)."""
    from .checkpoint import load_model

    src, dst = Path(args.input), Path(args.output)
    if not src.exists():
        raise InputError(f"input {src} does not exist")
    if src.is_dir():
        inputs = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not inputs:
            raise InputError(f"input folder {src} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        outputs = [dst / p.relative_to(src).with_suffix(".png") for p in inputs]
    else:
        # an existing folder is written into, whatever its name (x.png/)
        inputs, outputs = [src], [dst if dst.suffix and not dst.is_dir() else dst / (src.stem + ".png")]
    taken = [q for q in outputs if q.is_dir()]
    if taken:
        raise InputError(f"output {taken[0]} is an existing folder; choose another OUT")
    device = resolve_device(args.device)
    model = load_model(resolve_checkpoint(args.checkpoint), device)
    method = args.sampler or model.config.sampler.method
    steps = args.steps if args.steps is not None or args.sampler else model.config.sampler.steps
    check_sampler(method, steps, args.order, has_inverter=model.inverter is not None)  # before writing anything
    if model.adaptive is not None:
        print(model.adaptive.describe(), flush=True)
    for i, (p, q) in enumerate(zip(inputs, outputs), 1):
        t0 = time.perf_counter()
        image = upscale(p, sampler=method, steps=steps, rtol=args.rtol, atol=args.atol, seed=args.seed,
                        tile=args.tile, device=str(device), model=model, order=args.order)
        q.parent.mkdir(parents=True, exist_ok=True)
        tmp = q.with_name(q.name + ".tmp")
        try:
            image.save(tmp, format="PNG")
            tmp.replace(q)
        finally:
            tmp.unlink(missing_ok=True)  # nothing half-written is left on failure
        print(f"[{i}/{len(inputs)}] {p} -> {q} ({image.width}x{image.height}, {method}, "
              f"{time.perf_counter() - t0:.1f} s)", flush=True)
    return 0
