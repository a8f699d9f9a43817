"""`pfsr evaluate`: Ray Data batch inference of one sampler setting over HR images, with per-image metrics.

    read (tasks)           decode HR, crop to a multiple of the scale          {"key", "hr", "grid"}
    map_batches (actors)   ActorPoolStrategy(size=--replicas), --gpus-per-replica each: LR = the training
                           degradation of HR on the replica's device, PF-SR / bicubic / RRDB, BasicSR metrics
    driver                 DIR/metrics.json, DIR/per_image.parquet, DIR/grids/*.png (local or s3://, atomic)

--data is a `pfsr prep` shard prefix (its `{split}-NNNNNN.tar`) or a folder of HR images, local or S3. Image i
uses the seed --seed + crc32(key), so its sample does not depend on batching, replicas or order. Metrics follow
BasicSR: PSNR/SSIM on Y (BT.601) and on RGB of 8-bit outputs with `scale` border pixels cropped; LPIPS (VGG16)
when torchvision's vgg16-397923af.pth is found (--lpips-weights, else torch hub's checkpoints folder), else null
with the reason in metrics.json's "lpips_backbone". The "rrdb" section is the checkpoint's RRDB regression head
(meaningful when an encoder stage trained it; see the three-stage configs).

Several settings are compared by several calls: `plot_quality_vs_nfe([DIR, ...], out_png)`, or
`pfsr evaluate ... --compare DIR [DIR ...]`, which writes DIR/quality_vs_nfe.png for this run and the others.
"""
from __future__ import annotations

import io
import json
import logging
import math
import time
import zlib
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from .. import storage
from ..checkpoint import load, model_from_checkpoint
from ..config import config_from_dict
from ..data import iter_shard_samples, list_shards, sample_image
from ..degradation import degrade, to_uint8, upsample
from ..errors import InputError
from ..features import LPIPS, VGG16_FILE, find_backbone_weights
from ..images import decode_image, is_image_name
from ..inference import check_sampler, process_peak_rss_bytes, regress_tiled, resolve_device
from ..metrics import gradient_energy, image_metrics
from ..models.adaptive import describe_config
from ..sampling import SAMPLERS
from .batching import SolverSettings, WorkItem, plan_groups, run_group

log = logging.getLogger("pfsr.evaluate")

SECTIONS = ("model", "bicubic", "rrdb")
QUALITY_KEYS = ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb", "lpips")
GRID_IMAGES = 4  # the first images in data order get a PNG grid
MAX_RESTARTS = 2  # a replica that dies (killed for memory) is restarted this often, then the run fails
ZOOM = 4  # zoomed crops show 1/ZOOM of the shorter side


# ---------------------------------------------------------------------------------------------------------------
# Reading


def list_units(data: str, split: str) -> tuple[str, list[str]]:
    """--data -> ("shards", shard URIs) or ("images", image URIs), each sorted; InputError when it holds neither."""
    shards = list_shards(data, split)
    if shards:
        return "shards", shards
    if storage.is_file(data):
        if is_image_name(data):
            return "images", [data]
        raise InputError(f"--data {data}: a file that is neither a .tar shard nor an image")
    names = [e.path for e in storage.list_files(data) if is_image_name(e.path)]
    if not names:
        others = sorted({e.path.rsplit("-", 1)[0] for e in storage.list_files(data, recursive=False)
                         if e.path.endswith(".tar")})
        hint = f" (it has shards of {', '.join(others)}: pass --split)" if others else ""
        raise InputError(f"--data {data}: no {split}-NNNNNN.tar shards and no images{hint}")
    return "images", [storage.join(data, n) for n in names]


def _image_key(uri: str, root: str) -> str:
    rel = uri[len(root.rstrip("/")) + 1:] if uri.startswith(root.rstrip("/") + "/") else uri.rsplit("/", 1)[-1]
    return rel.rsplit(".", 1)[0]


def read_unit(row: dict[str, Any], *, kind: str, root: str, scale: int) -> Iterator[dict[str, Any]]:
    """One shard or image URI -> rows {"key", "hr" [H x W x 3] uint8 cropped to a multiple of scale, "grid"}."""
    if kind == "shards":
        samples = ((s["__key__"], sample_image(s)) for s in iter_shard_samples([row["uri"]]))
    else:
        samples = iter([(_image_key(row["uri"], root), decode_image(storage.read_bytes(row["uri"]), row["uri"]).rgb)])
    for i, (key, hr) in enumerate(samples):
        h, w = hr.shape[0] - hr.shape[0] % scale, hr.shape[1] - hr.shape[1] % scale
        if min(h, w) < 2 * scale + 11:
            raise InputError(f"{key}: {hr.shape[1]}x{hr.shape[0]} is too small to evaluate at x{scale} (SSIM needs "
                             f"11 pixels after cropping {scale} on each side)")
        yield {"key": key, "hr": np.ascontiguousarray(hr[:h, :w]), "grid": row["index"] + i < GRID_IMAGES}


EVAL_BLOCK_BYTES = 1 << 20


def build_dataset(kind: str, units: list[str], *, data: str, scale: int, limit: Optional[int]):
    import ray

    if kind == "images" and limit is not None:
        units = units[:limit]
    # a shard's index in grid terms: only the first shard's first samples get grids
    items = [{"uri": u, "index": i if kind == "images" else (0 if i == 0 else GRID_IMAGES)}
             for i, u in enumerate(units)]
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 200))
    ds = ds.flat_map(read_unit, fn_kwargs={"kind": kind, "root": data, "scale": scale})
    return ds.limit(limit) if limit is not None else ds


# ---------------------------------------------------------------------------------------------------------------
# The replicas


def image_seed(seed: int, key: str) -> int:
    return (seed + zlib.crc32(key.encode())) % 2**31


class SRReplica:
    """A model replica of the actor pool: batch {"key", "hr", "grid"} -> one row of metrics per image."""

    def __init__(self, checkpoint: str, settings: SolverSettings, seed: int, lpips_weights: Optional[str],
                 use_gpu: bool, tile: int, overlap: int, memory_budget_mb: float):
        import ray

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # the job log's lines
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        self.device = resolve_device("cuda" if use_gpu else "cpu")
        self.model = model_from_checkpoint(load(storage.read_bytes(checkpoint))).to(self.device)
        self.settings, self.seed, self.tile, self.overlap = settings, seed, tile, overlap
        self.memory_budget_mb = memory_budget_mb
        self.lpips = LPIPS(lpips_weights).to(self.device) if lpips_weights else None

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        s, keys = self.model.scale, [str(k) for k in batch["key"]]
        hrs = [torch.tensor(h, device=self.device).permute(2, 0, 1).float().div(255) for h in batch["hr"]]
        lrs = [degrade(hr[None], s)[0] for hr in hrs]  # the training degradation, on this device
        items = [WorkItem(lr, image_seed(self.seed, k), self.settings) for lr, k in zip(lrs, keys)]
        srs: list[Any] = [None] * len(items)
        nfes, seconds = [0] * len(items), [0.0] * len(items)
        # bucket = the U-Net multiple: exactly the padding of `pfsr upscale`, so results match it
        for group in plan_groups(items, bucket=self.model.lr_multiple, tile=self.tile):
            t0 = time.perf_counter()
            outs = run_group(self.model, [items[i] for i in group], bucket=self.model.lr_multiple, tile=self.tile,
                             overlap=self.overlap, memory_budget_mb=self.memory_budget_mb)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / len(group)
            for i, (sr, nfe) in zip(group, outs):
                srs[i], nfes[i], seconds[i] = sr, nfe, dt
        rows: dict[str, list] = {"key": keys, "height": [], "width": [], "nfe": nfes, "seconds": seconds,
                                 "hr_gradient_energy": [], "peak_rss_mb": [], "grid_png": []}
        for i, (hr, lr) in enumerate(zip(hrs, lrs)):
            rrdb = regress_tiled(self.model, lr[None], tile=self.tile, overlap=self.overlap,
                                 memory_budget_mb=self.memory_budget_mb)[0]
            outputs = {"model": srs[i], "bicubic": upsample(lr[None], s)[0], "rrdb": rrdb}
            hr_u8 = to_uint8(hr).permute(1, 2, 0).cpu().numpy()
            as_u8 = {name: to_uint8(x).permute(1, 2, 0).cpu().numpy() for name, x in outputs.items()}
            rows["height"].append(hr_u8.shape[0])
            rows["width"].append(hr_u8.shape[1])
            rows["hr_gradient_energy"].append(gradient_energy(hr_u8, s))
            found = {}
            for name, img in as_u8.items():
                found[name] = image_metrics(img, hr_u8, s, self.lpips)
                for metric, value in found[name].items():
                    rows.setdefault(f"{name}_{metric}", []).append(value)
            rows["grid_png"].append(render_grid(keys[i], as_u8, hr_u8, found, self.settings, nfes[i], s)
                                    if batch["grid"][i] else b"")
            rows["peak_rss_mb"].append(process_peak_rss_bytes() / 2**20)
            log.info("%s: %dx%d, %s %d NFE, %.1f s, PSNR(Y) %.2f dB, peak RSS %.0f MB", keys[i], hr_u8.shape[1],
                     hr_u8.shape[0], self.settings.method, nfes[i], seconds[i], found["model"]["psnr_y"],
                     rows["peak_rss_mb"][-1])
        return rows


# ---------------------------------------------------------------------------------------------------------------
# Reports


def _crop_box(hr: np.ndarray) -> tuple[int, int, int]:
    """(top, left, size) of the square crop with the most HR detail (gradient energy), on a coarse grid."""
    h, w = hr.shape[:2]
    size = max(8, min(h, w) // ZOOM)
    y = hr.astype(np.float32).mean(axis=2)
    energy = np.abs(np.diff(y, axis=0))[:, :-1] + np.abs(np.diff(y, axis=1))[:-1, :]
    best, box = -1.0, (0, 0)
    for top in range(0, h - size, max(1, size // 2)):
        for left in range(0, w - size, max(1, size // 2)):
            e = float(energy[top:top + size - 1, left:left + size - 1].mean())
            if e > best:
                best, box = e, (top, left)
    return box[0], box[1], size


def render_grid(key: str, outputs: dict[str, np.ndarray], hr: np.ndarray, found: dict[str, dict],
                settings: SolverSettings, nfe: int, scale: int) -> bytes:
    """PNG: bicubic | PF-SR | HR on top, the same crop zoomed (nearest) below, PSNR(Y) in the titles."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import Rectangle

    top, left, size = _crop_box(hr)
    panels = [(f"bicubic {found['bicubic']['psnr_y']:.2f} dB", outputs["bicubic"]),
              (f"PF-SR {settings.method} ({nfe} NFE) {found['model']['psnr_y']:.2f} dB", outputs["model"]),
              ("HR", hr)]
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.5), gridspec_kw={"height_ratios": [hr.shape[0] / hr.shape[1], 1]})
    for col, (title, img) in enumerate(panels):
        axes[0, col].imshow(img)
        axes[0, col].add_patch(Rectangle((left, top), size, size, fill=False, edgecolor="yellow", linewidth=1.5))
        axes[0, col].set_title(title, fontsize=10)
        axes[1, col].imshow(img[top:top + size, left:left + size], interpolation="nearest")
        for ax in axes[:, col]:
            ax.axis("off")
    fig.suptitle(f"{key} (x{scale}; zoomed crop below)", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals and len(vals) == len(values) else None


def summarize(rows: list[dict[str, Any]], *, scale: int, settings: SolverSettings,
              lpips_backbone: dict[str, Any], diffusion_mean: str = "bicubic") -> dict[str, Any]:
    """Per-image rows -> metrics.json (the issue's keys; lpips null when it was not measured). diffusion_mean:
    the checkpoint's diffusion.mean (what its residual is taken against)."""
    report: dict[str, Any] = {"n_images": len(rows), "scale": scale, "sampler": settings.method,
                              "steps": settings.steps, "diffusion_mean": diffusion_mean}
    if settings.order is not None:
        report["order"] = settings.order
    for section in SECTIONS:
        report[section] = {k: _mean([r[f"{section}_{k}"] for r in rows]) for k in QUALITY_KEYS}
    report["model"]["nfe"] = _mean([r["nfe"] for r in rows])
    report["model"]["seconds_per_image"] = _mean([r["seconds"] for r in rows])
    if settings.method == "pf_ode" and settings.steps is None:
        report["rtol"], report["atol"] = settings.rtol, settings.atol
    report["gradient_energy"] = {"hr": _mean([r["hr_gradient_energy"] for r in rows]),
                                 **{s: _mean([r[f"{s}_gradient_energy"] for r in rows]) for s in SECTIONS}}
    report["lpips_backbone"] = lpips_backbone
    return report


def write_reports(out: str, rows: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """metrics.json, per_image.parquet and grids/*.png under `out` (each written atomically); returns the URIs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    written = []
    grids = [(r["key"], r["grid_png"]) for r in rows if len(r["grid_png"])]
    for key, png in grids:
        uri = storage.join(out, "grids", key.replace("/", "__") + ".png")
        storage.write_bytes(uri, bytes(png))
        written.append(uri)
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "grid_png"} for r in rows])
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join(out, "per_image.parquet"), buf.getvalue())
    # written last: a metrics.json means the run finished
    storage.write_bytes(storage.join(out, "metrics.json"), (json.dumps(report, indent=2) + "\n").encode())
    return written + [storage.join(out, "per_image.parquet"), storage.join(out, "metrics.json")]


def _label(report: dict[str, Any]) -> str:
    if report["sampler"] == "pf_ode" and report.get("steps") is None:
        return f"pf_ode dopri5 rtol {report.get('rtol', 1e-4):g}"
    if report["sampler"] == "pf_ode":
        return f"pf_ode rk4 {report['steps']} steps"
    order = f" order {report['order']}" if report.get("order") is not None else ""
    return f"{report['sampler']}{order} {report['steps']} steps"


def plot_quality_vs_nfe(dirs: Sequence[str], out_png: str) -> dict[str, list[dict[str, Any]]]:
    """PSNR(Y) and LPIPS against NFE of several `pfsr evaluate` outputs (local or s3://) -> out_png; one line per
    sampler, bicubic dashed. Returns the plotted points by sampler."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    reports = [json.loads(storage.read_bytes(storage.join(d, "metrics.json"))) for d in dirs]
    by_sampler: dict[str, list[dict[str, Any]]] = {}
    for d, r in zip(dirs, reports):
        by_sampler.setdefault(r["sampler"] + ("" if r["sampler"] != "pf_ode" or r.get("steps") is None else " rk4"),
                              []).append({"dir": d, "label": _label(r), "nfe": r["model"]["nfe"],
                                          "psnr_y": r["model"]["psnr_y"], "lpips": r["model"]["lpips"]})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, name in ((axes[0], "psnr_y", "PSNR (Y) [dB]"), (axes[1], "lpips", "LPIPS (VGG), lower is better")):
        for sampler, points in sorted(by_sampler.items()):
            pts = sorted((p for p in points if p[metric] is not None), key=lambda p: p["nfe"])
            if pts:
                ax.plot([p["nfe"] for p in pts], [p[metric] for p in pts], "o-", label=sampler)
        bicubic = [r["bicubic"][metric] for r in reports if r["bicubic"][metric] is not None]
        if bicubic:
            ax.axhline(float(np.mean(bicubic)), color="gray", linestyle="--", label="bicubic")
        if not ax.lines:
            ax.text(0.5, 0.5, "not measured (no VGG16 weights)", ha="center", va="center", transform=ax.transAxes)
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"PF-SR quality against NFE (x{reports[0]['scale']}, {reports[0]['n_images']} images)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(out_png, buf.getvalue())
    return by_sampler


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def lpips_backbone_report(explicit: Optional[str]) -> dict[str, Any]:
    path, reason = find_backbone_weights(VGG16_FILE, explicit)
    if explicit is not None and path is None:
        raise InputError(f"--lpips-weights: {reason}")
    return {"path": str(path) if path else None, "source": reason if path else None,
            "reason": None if path else reason}


def evaluate(*, checkpoint: str, data: str, out: str, settings: SolverSettings, split: str = "val",
             scale: Optional[int] = None, limit: Optional[int] = None, replicas: int = 1,
             gpus_per_replica: float = 0, batch_size: int = 1, lpips_weights: Optional[str] = None,
             seed: int = 0, memory_budget_mb: Optional[float] = None, max_restarts: int = MAX_RESTARTS
             ) -> dict[str, Any]:
    """Run the evaluation on the current Ray cluster; returns metrics.json's content. `memory_budget_mb`: per
    replica (default: the checkpoint config's serve.memory_budget_mb); a replica that dies (killed for memory) is
    restarted `max_restarts` times, then the run fails with an InputError that says what to lower."""
    import ray

    if settings.method not in SAMPLERS:
        raise InputError(f"--sampler {settings.method!r} is unknown; choose one of {', '.join(sorted(SAMPLERS))}")
    if not storage.is_file(checkpoint):
        raise InputError(f"--checkpoint {checkpoint} does not exist")
    # the whole model once here: a damaged checkpoint fails now with its name, not in every replica
    ckpt = load(storage.read_bytes(checkpoint), name=checkpoint)
    model = model_from_checkpoint(ckpt, name=checkpoint)
    config = ckpt["config"]
    check_sampler(settings.method, settings.steps, settings.order, has_inverter=model.inverter is not None)
    ckpt_scale = config["model"]["scale"]
    if scale is not None and scale != ckpt_scale:
        raise InputError(f"--scale {scale} does not match the checkpoint's scale x{ckpt_scale}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    kind, units = list_units(data, split)
    backbone = lpips_backbone_report(lpips_weights)
    log.info("evaluating %s on %d %s of %s with %s; LPIPS: %s", checkpoint, len(units), kind, data, settings,
             backbone["source"] or f"null ({backbone['reason']})")
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # --limit and the grids take the first images in data order
    # About one image per block: a shard (or a few files) read as one block would feed one replica only, while an
    # image's SR takes seconds, so small blocks cost nothing.
    ctx.target_max_block_size = EVAL_BLOCK_BYTES
    serve_cfg = config_from_dict(config).serve
    budget = memory_budget_mb or serve_cfg.memory_budget_mb
    ds = build_dataset(kind, units, data=data, scale=ckpt_scale, limit=limit)
    # Ray Data restarts a dead replica and retries its batch without end by default: a replica killed for memory
    # would be killed again and again on the same image
    ds = ds.map_batches(
        SRReplica, batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=replicas), num_gpus=gpus_per_replica or None,
        max_restarts=max_restarts, max_task_retries=max_restarts,
        fn_constructor_kwargs={"checkpoint": checkpoint, "settings": settings, "seed": seed,
                               "lpips_weights": backbone["path"], "use_gpu": gpus_per_replica > 0,
                               "tile": serve_cfg.tile, "overlap": serve_cfg.tile_overlap, "memory_budget_mb": budget})
    t0 = time.perf_counter()
    # Ray Data logs a failed task's traceback twice before raising it; the raised error keeps it
    quiet = [logging.getLogger(name) for name in RAY_DATA_ERROR_LOGGERS]
    for logger in quiet:
        logger.addFilter(_below_error)
    try:
        rows = sorted(ds.take_all(), key=lambda r: r["key"])
    except (ray.exceptions.ActorDiedError, ray.exceptions.OutOfMemoryError, ray.exceptions.ActorUnavailableError) as e:
        raise InputError(
            f"a model replica died {max_restarts + 1} times (--max-restarts {max_restarts}), most likely killed for "
            f"memory: lower --memory-budget-mb (now {budget:g} MB per replica), --batch-size ({batch_size}) or "
            f"--replicas ({replicas}), or give each replica more memory. Ray said: {str(e).splitlines()[0]}"
        ) from None
    except Exception as e:
        bad_input = _input_error(e)
        if bad_input is None:
            raise
        raise InputError(str(bad_input).splitlines()[0]) from None  # without what Ray Data appends
    finally:
        for logger in quiet:
            logger.removeFilter(_below_error)
    elapsed = time.perf_counter() - t0
    if not rows:
        raise InputError(f"--data {data}: nothing to evaluate")
    report = summarize(rows, scale=ckpt_scale, settings=settings, lpips_backbone=backbone,
                       diffusion_mean=config["diffusion"].get("mean", "bicubic"))
    report["adaptive_condition"] = describe_config(config["model"])  # seed 004: the prior of the code, or null
    write_reports(out, rows, report)
    log.info("%d images in %.1f s (%.2f images/s)", len(rows), elapsed, len(rows) / elapsed)
    return report


RAY_DATA_ERROR_LOGGERS = ("ray.data._internal.execution.streaming_executor_state", "ray.data.exceptions")


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


def _input_error(e: BaseException) -> Optional[InputError]:
    """The InputError (a bad shard, a too small image) behind a Ray Data failure, if that is what it is."""
    from ray.exceptions import RayError

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, InputError) and not isinstance(e, RayError):  # RayTaskError(InputError) is both
            return e
        cause = getattr(e, "cause", None)
        e = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)
    return None


def format_summary(report: dict[str, Any]) -> str:
    lines = [f"{report['n_images']} images, x{report['scale']}, {_label(report)}, diffusion mean "
             f"{report.get('diffusion_mean', 'bicubic')}"]
    for section in SECTIONS:
        m = report[section]
        lpips = "null" if m["lpips"] is None else f"{m['lpips']:.4f}"
        extra = f", {m['nfe']:.1f} NFE, {m['seconds_per_image']:.2f} s/image" if section == "model" else ""
        lines.append(f"  {section:8s} PSNR(Y) {m['psnr_y']:.2f} dB, SSIM(Y) {m['ssim_y']:.4f}, "
                     f"PSNR(RGB) {m['psnr_rgb']:.2f} dB, LPIPS {lpips}{extra}")
    return "\n".join(lines)


def run_cli(args) -> int:
    import ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = SolverSettings(method=args.sampler, steps=args.steps, rtol=args.rtol, atol=args.atol,
                              order=args.order)
    if not ray.is_initialized():
        ray.init(address=args.ray_address)
    report = evaluate(checkpoint=args.checkpoint, data=args.data, out=args.out, settings=settings,
                      split=args.split, scale=args.scale, limit=args.limit, replicas=args.replicas,
                      gpus_per_replica=args.gpus_per_replica, batch_size=args.batch_size,
                      lpips_weights=args.lpips_weights, seed=args.seed, memory_budget_mb=args.memory_budget_mb,
                      max_restarts=args.max_restarts)
    print(format_summary(report))
    print(f"wrote {storage.join(args.out, 'metrics.json')}, per_image.parquet and grids/")
    if getattr(args, "compare", None):
        png = storage.join(args.out, "quality_vs_nfe.png")
        plot_quality_vs_nfe([args.out, *args.compare], png)
        print(f"wrote {png}")
    return 0
