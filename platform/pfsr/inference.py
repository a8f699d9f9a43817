"""Super-resolution of whole images: sampling, padding to the U-Net multiple, overlapping tiles with blended seams,
alpha re-attached. Used by `pfsr upscale`, `pfsr.upscale`, evaluation and the Serve endpoint."""
from __future__ import annotations

import logging
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .config import ServeConfig
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


def _tiles_along(size: int, tile: int, overlap: int, multiple: int) -> tuple[int, list[int]]:
    """(tile length, starts) along one side of `size` (a multiple of `multiple`, as is `tile`): the fewest tiles of
    at most `tile` that overlap by at least `overlap`, made as small as that allows and spread evenly (a 256-pixel
    side takes three tiles of 96, not three of 128)."""
    if size <= tile:
        return size, [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    length = min(tile, multiple * math.ceil(math.ceil((size + (n - 1) * overlap) / n) / multiple))
    return length, [round(i * (size - length) / (n - 1)) for i in range(n)]


def _blend_window(tile_h: int, tile_w: int, ramp: int, device) -> Tensor:
    """Weights that rise linearly over `ramp` pixels at each tile edge (seams blend, interiors stay 1)."""

    def axis(n: int) -> Tensor:
        i = torch.arange(n, device=device, dtype=torch.float32)
        edge = torch.minimum(i + 1, n - i) / max(ramp, 1)
        return edge.clamp(max=1.0)

    return axis(tile_h)[:, None] * axis(tile_w)[None, :]


# What a CPU process holds before it solves anything (Python, torch, the model; about 0.4 GB for `pfsr upscale`,
# 0.6 GB for a Ray worker): serve.memory_budget_mb minus this bounds one tile.
RUNTIME_MB = 768
# The whole image's own buffers per output pixel (the blended sum and weights, the crop, the 8-bit image, the
# evaluation's HR and baselines): they grow with the image, so they count against the budget before any tile.
IMAGE_BYTES_PER_PIXEL = 96
MARGIN = 1.5  # of the estimate below over the measured peak RSS (tests/test_inference.py holds it)


def tile_bytes(model: PFSRModel, hr_h: int, hr_w: int) -> int:
    """Estimated peak working memory of one network evaluation of one [hr_h x hr_w] tile, float32: the U-Net's
    skip activations, the LR features resized to every level, the widest residual block's tensors (an upsampling
    block at level l works at level l-1's resolution with level l's channels) and the solver's state. Linear in the
    pixels: the attention runs in a fused kernel that never holds the HW x HW matrix."""
    m = model.config.model
    widths = [m.unet_base_channels * k for k in m.unet_channel_mult]
    area = [4.0 ** -level for level in range(len(widths))]  # a level's pixels per HR pixel
    skips = m.unet_base_channels + sum(m.unet_num_res_blocks * c * a + (c * a / 4 if level < len(widths) - 1 else 0)
                                       for level, (c, a) in enumerate(zip(widths, area)))
    features = model.rrdb.feature_channels * sum(area)
    widest = max(c * area[max(level - 1, 0)] for level, c in enumerate(widths))
    state = 12 * m.in_channels  # x, the U-Net input and output, the solver's history
    return int(MARGIN * 4 * (skips + features + 6 * widest + state) * hr_h * hr_w)


def memory_in_use(device: torch.device) -> int:
    """Bytes this process holds where `device` computes: the CUDA allocator's on a GPU, else the resident memory."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else process_rss_bytes()


def process_rss_bytes() -> int:
    """The resident memory of this process now (Linux /proc), else its peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def process_peak_rss_bytes() -> int:
    """The peak resident memory of this process (Linux /proc VmHWM, which execve resets; getrusage's ru_maxrss
    keeps the peak of the process before exec, such as a large parent's), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


@dataclass(frozen=True)
class TilePlan:
    tile: int  # LR tile side
    batch: int  # tiles solved together


def plan_tiles(model: PFSRModel, lr_h: int, lr_w: int, *, tile: int, memory_budget_mb: float) -> TilePlan:
    """The tile side and the tiles per batch for an LR image of lr_h x lr_w under a per-process memory budget.

    The tile is `tile` (a multiple of the model's LR multiple), halved while one tile needs more than the budget
    less RUNTIME_MB: it depends on the model and the budget only, so every process tiles (and samples) an image
    alike. The batch is as many tiles as fit in what the budget leaves above this process's resident memory and the
    image's buffers (on a GPU: above what its allocator holds, the budget being of the GPU's memory); InputError
    when the image's buffers alone do not fit."""
    multiple, s = model.lr_multiple, model.scale
    budget = memory_budget_mb * 2**20
    tile = max(multiple, tile - tile % multiple)
    while tile > multiple and tile_bytes(model, tile * s, tile * s) > budget - RUNTIME_MB * 2**20:
        tile = max(multiple, (tile // 2) - (tile // 2) % multiple)
    th, tw = min(tile, math.ceil(lr_h / multiple) * multiple), min(tile, math.ceil(lr_w / multiple) * multiple)
    image = IMAGE_BYTES_PER_PIXEL * lr_h * lr_w * s * s
    if image > budget - RUNTIME_MB * 2**20 - tile_bytes(model, th * s, tw * s):
        raise InputError(f"a {lr_w * s}x{lr_h * s} output needs about {image / 2**20:.0f} MB for its own buffers: "
                         f"more than serve.memory_budget_mb = {memory_budget_mb:g} MB allows beside one tile; raise "
                         "it or split the image")
    free = budget - max(memory_in_use(next(model.parameters()).device), RUNTIME_MB * 2**20) - image
    return TilePlan(tile=tile, batch=max(1, int(free // tile_bytes(model, th * s, tw * s))))


Progress = Callable[[int, int], None]  # (tiles done, tiles in all) after each batch of tiles


@torch.no_grad()
def _over_tiles(lr: Tensor, solve: Callable[[Tensor, int], tuple[Tensor, int]], *, scale: int, multiple: int,
                tile: int, overlap: int, batch: int, progress: Optional[Progress]) -> tuple[Tensor, int]:
    """LR [1 x C x h x w] -> (solve's output [1 x C x sh x sw], its summed NFE): padded to `multiple`, cut into
    overlapping tiles, `batch` tiles per call of solve(tiles, index of the first), outputs blended linearly over
    the overlap into one float32 image."""
    if lr.ndim != 4 or lr.shape[0] != 1:
        raise ValueError(f"expected one image [1, C, h, w], got {tuple(lr.shape)}")
    tile = max(multiple, tile - tile % multiple)
    overlap = min(overlap, tile // 2)
    lr, h, w = _pad_to_multiple(lr, multiple)
    (tile_h, ys), (tile_w, xs) = (_tiles_along(n, tile, overlap, multiple) for n in lr.shape[-2:])
    boxes = [(y, x) for y in ys for x in xs]
    ph, pw, s = lr.shape[-2], lr.shape[-1], scale
    out = torch.zeros(1, lr.shape[1], ph * s, pw * s, device=lr.device)
    weight = torch.zeros(1, 1, ph * s, pw * s, device=lr.device)
    window = _blend_window(tile_h * s, tile_w * s, overlap * s, lr.device) if len(boxes) > 1 else \
        torch.ones(tile_h * s, tile_w * s, device=lr.device)
    nfe = 0
    for start in range(0, len(boxes), batch):
        chunk = boxes[start:start + batch]
        sr, n = solve(torch.cat([lr[..., y:y + tile_h, x:x + tile_w] for y, x in chunk]), start)
        nfe += n
        for (y, x), piece in zip(chunk, sr):
            out[..., y * s:(y + tile_h) * s, x * s:(x + tile_w) * s] += piece.float() * window
            weight[..., y * s:(y + tile_h) * s, x * s:(x + tile_w) * s] += window
        del sr
        if progress is not None:
            progress(start + len(chunk), len(boxes))
    return out.div_(weight)[..., : h * s, : w * s].clamp_(0, 1), nfe


@torch.no_grad()
def super_resolve_tiled(model: PFSRModel, lr: Tensor, *, tile: int = ServeConfig.tile,
                        overlap: int = ServeConfig.tile_overlap, method: str = "pf_ode", steps: Optional[int] = None,
                        rtol: float = 1e-4, atol: float = 1e-4, seed: int = 0,
                        memory_budget_mb: float = ServeConfig.memory_budget_mb, tile_batch: Optional[int] = None,
                        progress: Optional[Progress] = None, order: Optional[int] = None) -> tuple[Tensor, int]:
    """One LR image [1 x C x h x w] of any size -> (SR [1 x C x sh x sw], NFE): padded to the U-Net multiple and,
    when larger than a tile, cut into overlapping tiles whose outputs are blended linearly over the overlap. Tile i
    uses seed + i; every tile draws its adaptive-condition code (histogram prior) with `seed`. The tile side and the tiles solved together (unless `tile_batch` says) follow from
    `memory_budget_mb` (`plan_tiles`); the result does not depend on how many tiles share a solve."""
    plan = plan_tiles(model, lr.shape[-2], lr.shape[-1], tile=tile, memory_budget_mb=memory_budget_mb)

    def solve(tiles: Tensor, first: int) -> tuple[Tensor, int]:
        return super_resolve(model, tiles, method=method, steps=steps, rtol=rtol, atol=atol,
                             seeds=[seed + first + i for i in range(tiles.shape[0])], order=order,
                             code_seeds=[seed] * tiles.shape[0])

    return _over_tiles(lr, solve, scale=model.scale, multiple=model.lr_multiple, tile=plan.tile, overlap=overlap,
                       batch=tile_batch or plan.batch, progress=progress)


@torch.no_grad()
def regress_tiled(model: PFSRModel, lr: Tensor, *, tile: int = ServeConfig.tile,
                  overlap: int = ServeConfig.tile_overlap,
                  memory_budget_mb: float = ServeConfig.memory_budget_mb) -> Tensor:
    """The RRDB regression head (`model.regress`) of one LR image [1 x C x h x w] over the tiles of
    `super_resolve_tiled`, so that its memory is bounded alike -> [1 x C x sh x sw] in [0, 1]."""
    plan = plan_tiles(model, lr.shape[-2], lr.shape[-1], tile=tile, memory_budget_mb=memory_budget_mb)
    sr, _ = _over_tiles(lr, lambda tiles, first: (model.regress(tiles), 0), scale=model.scale,
                        multiple=model.lr_multiple, tile=plan.tile, overlap=overlap, batch=plan.batch, progress=None)
    return sr


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
                  steps: Optional[int], rtol: float = 1e-4, atol: float = 1e-4, seed: int = 0,
                  tile: int = ServeConfig.tile, overlap: int = ServeConfig.tile_overlap,
                  memory_budget_mb: float = ServeConfig.memory_budget_mb, device: torch.device | str = "cpu",
                  progress: Optional[Progress] = None, order: Optional[int] = None) -> UpscaleResult:
    """HxWx3 uint8 RGB (and optional HxW uint8 alpha) -> UpscaleResult with an RGB or RGBA PIL image."""
    t0 = time.perf_counter()
    lr = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float().div(255).to(device)
    sr, nfe = super_resolve_tiled(model, lr, tile=tile, overlap=overlap, method=method, steps=steps, rtol=rtol,
                                  atol=atol, seed=seed, memory_budget_mb=memory_budget_mb, progress=progress,
                                  order=order)
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
            memory_budget_mb: Optional[float] = None, progress: Optional[Progress] = None,
            order: Optional[int] = None) -> Image.Image:
    """Super-resolve a PIL image, a path, or image bytes; returns a PIL image `scale` times larger.

    `checkpoint`: an exported checkpoint (default: the shipped models/pfsr_x4_small.pt); `sampler`: one of
    pfsr.sampling.SAMPLERS (default: the checkpoint config's sampler); `order`: mrs_sde's (1 or 2, default 2);
    `tile`, `memory_budget_mb`: default the config's serve.tile and serve.memory_budget_mb; `progress(tiles done,
    tiles)` after each batch of tiles.
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
                         seed=seed, tile=tile or cfg.serve.tile, overlap=cfg.serve.tile_overlap,
                         memory_budget_mb=memory_budget_mb or cfg.serve.memory_budget_mb, device=dev,
                         progress=progress, order=order).image


def run_cli(args) -> int:
    """`pfsr upscale IN OUT`: a file to a file, or a folder to a folder (PNG outputs); a progress bar of the
    tiles on stderr."""
    from tqdm import tqdm

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
        with tqdm(desc=f"[{i}/{len(inputs)}] {p.name}", unit="tile", leave=False, file=sys.stderr) as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            image = upscale(p, sampler=method, steps=steps, rtol=args.rtol, atol=args.atol, seed=args.seed,
                            tile=args.tile, device=str(device), model=model, memory_budget_mb=args.memory_budget_mb,
                            progress=progress, order=args.order)
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
