"""Quality against network evaluations (NFE) for every sampler on a trained checkpoint and a set of photos.

PSNR(Y) (BasicSR's, `scale` border pixels cropped) and, with --lpips-weights, LPIPS against NFE for
dpmpp_2m and unipc at 4, 6, 8, 10, 15, 20 steps, pf_ode (dopri5) at rtol = atol = 1e-2 .. 1e-5 and the SDE at
100 and 1000 steps. The reference is the tightest dopri5 (converged); for each solver the JSON gives the PSNR(Y)
difference to it and the RMSE of its SR image's Y against the reference's (0-255: how far the solver is from
the converged solution, apart from how good that solution is). Issue 8's goal: within 0.1 dB of the reference
with 6 evaluations or fewer (dpmpp_2m), 4 with the higher-order solver (unipc).

Each HR photo is centre-cropped to --crop (0: whole, rounded down to the model's size multiple), degraded with
the seed's bicubic x scale, and super-resolved one image at a time, from the same x_T (seed = image index) for
every solver. Needs an exported checkpoint (`pfsr export`); without --checkpoint, the shipped
models/pfsr_x4_small.pt; without --images, the scikit-image photos that `pfsr demo` and the shipped model hold
back from training (chelsea, coffee).

    python bench/quality_vs_nfe.py --checkpoint ckpt.pt --images photos/ [--lpips-weights vgg16-397923af.pth]

Prints one JSON object and writes bench/results/quality_vs_nfe.json and the plot quality_vs_nfe.png beside it.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from _common import load_photos as skimage_photos, run_benchmark, write_result
from pfsr.checkpoint import load_model
from pfsr.degradation import degrade, to_uint8
from pfsr.errors import InputError
from pfsr.inference import DEFAULT_CHECKPOINT, IMAGE_SUFFIXES, resolve_device, super_resolve
from pfsr.metrics import image_metrics, psnr

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.quality_vs_nfe")
SKIMAGE_PHOTOS = ("chelsea", "coffee")  # pfsr.pipeline.demo.VAL_PHOTOS: never trained on
WITHIN_DB = 0.1
GOAL_NFE = {"dpmpp_2m": 6, "unipc": 4}
NFE_TICKS = (4, 6, 10, 20, 50, 100, 200, 500, 1000, 2000)


def load_photos(folder: Optional[Path], limit: int) -> dict[str, np.ndarray]:
    """name -> HxWx3 uint8 RGB: the image files of `folder` (sorted), or scikit-image's photos."""
    if folder is None:
        names = SKIMAGE_PHOTOS[:limit]
        return dict(zip(names, skimage_photos(names)))
    from pfsr.images import decode_image

    if not folder.is_dir():
        raise InputError(f"--images {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise InputError(f"--images {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return {p.stem: decode_image(p.read_bytes(), str(p)).rgb for p in files}


def centre_crop(rgb: np.ndarray, size: int, multiple: int) -> np.ndarray:
    """Centre crop to size x size (0: the whole image), sides rounded down to `multiple`."""
    h, w = rgb.shape[:2]
    ch, cw = (min(size, h), min(size, w)) if size else (h, w)
    ch, cw = ch - ch % multiple, cw - cw % multiple
    if ch == 0 or cw == 0:
        raise InputError(f"an image of {w}x{h} is smaller than the model's size multiple {multiple}")
    top, left = (h - ch) // 2, (w - cw) // 2
    return rgb[top:top + ch, left:left + cw]


def solver_runs(few_steps: list[int], tolerances: list[float], sde_steps: list[int]) -> list[dict]:
    """The (method, steps, rtol) settings of the sweep; the reference (tightest dopri5) first."""
    runs = [dict(method="pf_ode", rtol=tol) for tol in sorted(tolerances)]
    runs += [dict(method=m, steps=n) for m in GOAL_NFE for n in few_steps]
    runs += [dict(method="sde", steps=n) for n in sde_steps]
    return runs


def evaluate(model, photos: dict[str, np.ndarray], run: dict, device, lpips_model, reference=None) -> tuple[dict, list]:
    """Mean figures of one solver setting over the photos, and its SR images (uint8 HWC) for later comparison."""
    rows, srs = [], []
    t0 = time.perf_counter()
    for i, hr_rgb in enumerate(photos.values()):
        hr = torch.from_numpy(np.ascontiguousarray(hr_rgb)).permute(2, 0, 1)[None].float().div(255).to(device)
        tol = run.get("rtol", 1e-4)
        sr, nfe = super_resolve(model, degrade(hr, model.scale), method=run["method"], steps=run.get("steps"),
                                rtol=tol, atol=tol, seeds=[i])
        sr_rgb = to_uint8(sr)[0].permute(1, 2, 0).cpu().numpy()
        figures = image_metrics(sr_rgb, hr_rgb, model.scale, lpips_model)
        row = {"nfe": nfe, "psnr_y": figures["psnr_y"], "lpips": figures["lpips"]}
        if reference is not None:  # RMSE from PSNR (peak 255): 0 rather than PSNR's inf for identical images
            to_ref = psnr(sr_rgb, reference[i], model.scale, test_y_channel=True)
            row["rmse_y_vs_reference"] = 255 * 10 ** (-to_ref / 20)
        rows.append(row)
        srs.append(sr_rgb)
    out = {**run, "wall_s": round(time.perf_counter() - t0, 2)}
    for key in rows[0]:
        values = [r[key] for r in rows]
        out[key] = None if values[0] is None else round(float(np.mean(values)), 4)
    log.info("%s: NFE %.1f, PSNR(Y) %.3f dB, %.1f s", run, out["nfe"], out["psnr_y"], out["wall_s"])
    return out, srs


def min_nfe_within(curve: list[dict], reference_psnr: float, db: float) -> Optional[float]:
    """Fewest evaluations from which on every setting stays within `db` of the reference PSNR(Y)."""
    best = None
    for row in sorted(curve, key=lambda r: r["nfe"], reverse=True):
        if abs(row["psnr_y"] - reference_psnr) > db:
            break
        best = row["nfe"]
    return best


def plot(result: dict, path: Path) -> None:
    """PSNR(Y), distance to the converged solution and (when measured) LPIPS against NFE, one line per solver."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    panels = [("psnr_y", "PSNR(Y) [dB]"), ("rmse_y_vs_reference", "RMSE(Y) to converged dopri5 [0-255]")]
    panels += [("lpips", "LPIPS")] if result["lpips"] else []
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    ref = result["reference"]
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax, (metric, label) in zip(axes[0], panels):
        for method, curve in result["curves"].items():
            points = [(r["nfe"], r[metric]) for r in curve if metric != "rmse_y_vs_reference" or r[metric] > 0]
            ax.plot(*zip(*points), "o-", label=method)
        if metric == "psnr_y":
            ax.axhspan(ref["psnr_y"] - WITHIN_DB, ref["psnr_y"] + WITHIN_DB, color="grey", alpha=0.25,
                       label=f"dopri5 {ref['rtol']:g} ± {WITHIN_DB} dB")
        if metric == "rmse_y_vs_reference":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        ax.set_xscale("log")
        ax.set_xticks([n for n in NFE_TICKS if n <= max(r["nfe"] for c in result["curves"].values() for r in c)])
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    crop = "whole" if result["hr_crop"] == "whole" else f"{result['hr_crop']} px crops"
    fig.suptitle(f"PF-SR x{result['scale']}: quality vs NFE ({result['images']} images, HR {crop})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="exported serving checkpoint")
    ap.add_argument("--images", type=Path, default=None, help="folder of HR photos (default: scikit-image's held-back ones)")
    ap.add_argument("--lpips-weights", default=None, help="VGG16 backbone for LPIPS (torchvision's vgg16-397923af.pth)")
    ap.add_argument("--crop", type=int, default=128, help="HR centre crop side (0: whole images)")
    ap.add_argument("--max-images", type=int, default=4)
    ap.add_argument("--few-steps", type=int, nargs="+", default=[4, 6, 8, 10, 15, 20], help="dpmpp_2m and unipc")
    ap.add_argument("--tolerances", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4, 1e-5], help="pf_ode dopri5")
    ap.add_argument("--sde-steps", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (0: torch's default); one is steadier on a shared machine")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality_vs_nfe.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    if not args.checkpoint.is_file():
        raise InputError(f"checkpoint {args.checkpoint} does not exist: pass --checkpoint FILE (from `pfsr export`)")
    model = load_model(args.checkpoint, device)
    multiple = model.lr_multiple * model.scale
    photos = {k: centre_crop(v, args.crop, multiple) for k, v in load_photos(args.images, args.max_images).items()}
    lpips_model = None
    if args.lpips_weights:
        from pfsr.features import LPIPS

        lpips_model = LPIPS(args.lpips_weights).to(device).eval()

    runs = solver_runs(args.few_steps, args.tolerances, args.sde_steps)
    reference, reference_srs = evaluate(model, photos, runs[0], device, lpips_model)
    reference["rmse_y_vs_reference"] = 0.0
    curves: dict[str, list[dict]] = {"pf_ode": [reference]}
    for run in runs[1:]:
        row, _ = evaluate(model, photos, run, device, lpips_model, reference_srs)
        curves.setdefault(run["method"], []).append(row)
    for curve in curves.values():
        curve.sort(key=lambda r: r["nfe"])
        for row in curve:
            row["delta_psnr_y_db"] = round(row["psnr_y"] - reference["psnr_y"], 4)

    within = {}
    for method, goal in GOAL_NFE.items():
        within[method] = min_nfe_within(curves[method], reference["psnr_y"], WITHIN_DB)
        within[f"goal_{method}"] = f"<= {goal}"
    result = {
        "benchmark": "quality_vs_nfe",
        "checkpoint": str(args.checkpoint),
        "images": len(photos),
        "image_names": list(photos),
        "hr_crop": args.crop or "whole",
        "scale": model.scale,
        "device": str(device),
        "lpips": lpips_model is not None,
        "reference": {"method": "pf_ode", "rtol": reference["rtol"], "psnr_y": reference["psnr_y"],
                      "lpips": reference["lpips"], "nfe": reference["nfe"]},
        "curves": curves,
        "within_db": WITHIN_DB,
        "min_nfe_within_db": within,
        "plot": str(args.out.with_suffix(".png")),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(result, args.out.with_suffix(".png"))
    return write_result(result, args.out)


if __name__ == "__main__":
    try:
        run_benchmark(main)
    except InputError as e:  # exit code 2, as the CLI's for bad input
        print(f"quality_vs_nfe: {e}", file=sys.stderr)
        sys.exit(2)
