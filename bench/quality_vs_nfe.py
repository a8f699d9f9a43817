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

Seeds 001 and 003 (issue 14): "stochastic" gives mrs_sde at --mrs-steps (5, 10, 20) beside the SDE at
--seeded-sde-steps (100, 1000), each with --seeds (4) seeds per image and the spread (sample SD over seeds of the
mean PSNR(Y) and gradient energy); goal (seed 003's 10-20x claim): mrs_sde at 20 NFE within 0.1 dB PSNR(Y) and 5%
gradient energy of the 1000-step SDE. "inversion" (a checkpoint of the inversion stage only) gives invsr at
--invsr-steps (1, 2, 3, 5) beside dpmpp_2m at the same NFE and at 10, and beside random start noise at t* (the
seed's ablation: x_t* = sigma(t*) xi, then the same solver); goal (seed 001): invsr at 1 NFE at least as good as
dpmpp_2m at 10 in PSNR(Y) and gradient energy (closer to the HR's). A CPU-sized run:

    python bench/quality_vs_nfe.py --crop 64 --max-images 2 --tolerances 1e-3 --few-steps 10 --sde-steps

Prints one JSON object and writes bench/results/quality_vs_nfe.json and the plot quality_vs_nfe.png beside it.
"""
from __future__ import annotations

import argparse
import logging
import math
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
from pfsr.metrics import gradient_energy, image_metrics, psnr
from pfsr.sampling import sample

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


def _tensor(rgb: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float().div(255).to(device)


@torch.no_grad()
def random_start(model, lr: torch.Tensor, steps: int, seed: int) -> tuple[torch.Tensor, int]:
    """Seed 001's ablation: the invsr solve from random start noise x_t* = sigma(t*) xi instead of the inverter's."""
    cond = model.condition(lr)
    eps_fn, x0_fn = model.denoiser_fns(cond)
    xi = torch.randn(cond.upsampled.shape[1:], generator=torch.Generator().manual_seed(seed))[None].to(lr)
    t_star = torch.tensor(model.t_star, dtype=torch.float64)
    res = sample(eps_fn, None, model.sde, method="invsr", steps=steps, x0_fn=x0_fn, t_start=model.t_star,
                 x_start=model.sde.sigma(t_star).item() * xi)
    return model.from_diffused(res.x, cond).clamp(0, 1), res.nfe


def figures(model, photos: dict[str, np.ndarray], device, run: dict, seed: int) -> dict:
    """Mean NFE, PSNR(Y) and gradient energy of one setting over the photos; image i uses seed + i."""
    nfes, psnrs, energies = [], [], []
    for i, hr_rgb in enumerate(photos.values()):
        lr = degrade(_tensor(hr_rgb, device), model.scale)
        if run["method"] == "random_start":
            sr, nfe = random_start(model, lr, run["steps"], seed + i)
        else:
            sr, nfe = super_resolve(model, lr, method=run["method"], steps=run["steps"], seeds=[seed + i],
                                    order=run.get("order"))
        sr_rgb = to_uint8(sr)[0].permute(1, 2, 0).cpu().numpy()
        nfes.append(nfe)
        psnrs.append(psnr(sr_rgb, hr_rgb, model.scale, test_y_channel=True))
        energies.append(gradient_energy(sr_rgb, model.scale))
    return {"nfe": float(np.mean(nfes)), "psnr_y": float(np.mean(psnrs)), "gradient_energy": float(np.mean(energies))}


@torch.no_grad()
def stochastic_figures(model, photos: dict[str, np.ndarray], device, run: dict, seeds: int) -> list[dict]:
    """A stochastic sampler on every (seed, photo) pair as one batch (the photos share one crop size): the noise
    streams of one generator, so the pairs are independent draws; per seed the photo-mean figures."""
    hrs = list(photos.values())
    lr = torch.cat([degrade(_tensor(hr, device), model.scale) for hr in hrs]).repeat(seeds, 1, 1, 1)
    cond = model.condition(lr)
    eps_fn, x0_fn = model.denoiser_fns(cond)
    generator = torch.Generator(device=device).manual_seed(1234)
    x_T = torch.randn(cond.upsampled.shape, generator=generator, device=device)
    res = sample(eps_fn, x_T, model.sde, method=run["method"], steps=run["steps"], generator=generator, x0_fn=x0_fn,
                 order=run.get("order"))
    srs = to_uint8(model.from_diffused(res.x, cond).clamp(0, 1)).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for k in range(seeds):
        pairs = list(zip(srs[k * len(hrs):(k + 1) * len(hrs)], hrs))
        out.append({"nfe": float(res.nfe),
                    "psnr_y": float(np.mean([psnr(sr, hr, model.scale, test_y_channel=True) for sr, hr in pairs])),
                    "gradient_energy": float(np.mean([gradient_energy(sr, model.scale) for sr, _ in pairs]))})
    return out


def seeded(model, photos, device, run: dict, seeds: int) -> dict:
    """One setting over `seeds` seeds: mean and sample SD over seeds of the photo-mean figures."""
    t0 = time.perf_counter()
    per_seed = stochastic_figures(model, photos, device, run, seeds) if run["method"] in ("sde", "mrs_sde") else \
        [figures(model, photos, device, run, 1000 * k) for k in range(seeds)]
    out = {**run, "nfe": per_seed[0]["nfe"], "seeds": seeds, "wall_s": round(time.perf_counter() - t0, 2)}
    for key in ("psnr_y", "gradient_energy"):
        values = [f[key] for f in per_seed]
        out[key] = round(float(np.mean(values)), 4)
        out[f"{key}_sd"] = round(float(np.std(values, ddof=1)) if seeds > 1 else 0.0, 4)
        out[f"{key}_per_seed"] = [round(v, 4) for v in values]
    log.info("%s: NFE %.0f, PSNR(Y) %.3f +- %.3f dB, gradient energy %.3f, %.1f s", run, out["nfe"], out["psnr_y"],
             out["psnr_y_sd"], out["gradient_energy"], out["wall_s"])
    return out


def stochastic_section(model, photos, device, args) -> dict:
    curves = {"mrs_sde": [seeded(model, photos, device, {"method": "mrs_sde", "steps": n, "order": 2}, args.seeds)
                          for n in args.mrs_steps],
              "sde": [seeded(model, photos, device, {"method": "sde", "steps": n}, args.seeds)
                      for n in args.seeded_sde_steps]}
    return stochastic_summary(curves)


def stochastic_summary(curves: dict[str, list[dict]]) -> dict:
    """mrs_sde at its most NFE against the SDE at its most steps: differences and their spread over seeds."""
    ref, best = max(curves["sde"], key=lambda r: r["nfe"]), max(curves["mrs_sde"], key=lambda r: r["nfe"])
    return {"curves": curves, "reference": f"sde {ref['steps']} steps", "mrs_sde_nfe": best["nfe"],
            "mrs_sde_minus_sde_psnr_y_db": round(best["psnr_y"] - ref["psnr_y"], 4),
            "goal_mrs_sde_minus_sde_psnr_y_db": "within +-0.1 at 20 NFE vs 1000 steps (seed 003)",
            "spread_of_the_difference_db": round(math.hypot(best["psnr_y_sd"], ref["psnr_y_sd"]), 4),
            "mrs_sde_over_sde_gradient_energy": round(best["gradient_energy"] / ref["gradient_energy"], 4),
            "goal_mrs_sde_over_sde_gradient_energy": "0.95-1.05"}


def inversion_section(model, photos, device, args) -> dict:
    if model.inverter is None:
        return {"measured": False, "reason": "the checkpoint has no inverter (train.stage: inversion not run)"}
    curves = {"invsr": [seeded(model, photos, device, {"method": "invsr", "steps": n}, 1) for n in args.invsr_steps],
              "dpmpp_2m": [seeded(model, photos, device, {"method": "dpmpp_2m", "steps": n}, 1)
                           for n in sorted(set(args.invsr_steps) | {10})],
              "random_start": [seeded(model, photos, device, {"method": "random_start", "steps": n}, 1)
                               for n in args.invsr_steps]}
    hr_energy = float(np.mean([gradient_energy(p, model.scale) for p in photos.values()]))
    one = next(r for r in curves["invsr"] if r["steps"] == 1) if 1 in args.invsr_steps else curves["invsr"][0]
    ten = next(r for r in curves["dpmpp_2m"] if r["steps"] == 10)
    return {"measured": True, "t_star": model.t_star, "curves": curves, "hr_gradient_energy": round(hr_energy, 4),
            "invsr_1_minus_dpmpp_2m_10_psnr_y_db": round(one["psnr_y"] - ten["psnr_y"], 4),
            "goal_invsr_1_minus_dpmpp_2m_10_psnr_y_db": ">= 0 (seed 001)",
            "invsr_1_gradient_energy_vs_hr": round(one["gradient_energy"] / hr_energy, 4),
            "dpmpp_2m_10_gradient_energy_vs_hr": round(ten["gradient_energy"] / hr_energy, 4),
            "goal_invsr_1_gradient_energy_vs_hr": "at least as close to 1 as dpmpp_2m_10_gradient_energy_vs_hr"}


def plot_seeds(result: dict, path: Path) -> None:
    """The stochastic curves (mean +- SD over seeds) and the invsr comparison, PSNR(Y) and gradient energy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [("stochastic", "mrs_sde vs SDE (mean ± SD over seeds)")] if "curves" in result["stochastic"] else []
    if result["inversion"].get("measured"):
        sections.append(("inversion", f"from t* = {result['inversion']['t_star']:g} (invsr) vs dpmpp_2m"))
    if not sections:
        return
    fig, axes = plt.subplots(len(sections), 2, figsize=(12, 4.2 * len(sections)), squeeze=False)
    for row, (key, title) in zip(axes, sections):
        for ax, metric, label in zip(row, ("psnr_y", "gradient_energy"), ("PSNR(Y) [dB]", "gradient energy (Y)")):
            for method, curve in result[key]["curves"].items():
                curve = sorted(curve, key=lambda r: r["nfe"])
                ax.errorbar([r["nfe"] for r in curve], [r[metric] for r in curve],
                            yerr=[r[f"{metric}_sd"] for r in curve], fmt="o-", capsize=3, label=method)
            if key == "inversion" and metric == "gradient_energy":
                ax.axhline(result["inversion"]["hr_gradient_energy"], color="k", ls=":", label="HR")
            ax.set_xscale("log")
            ax.set_xlabel("network evaluations (NFE)")
            ax.set_ylabel(label)
            ax.set_title(title, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    ap.add_argument("--sde-steps", type=int, nargs="*", default=[100, 1000], help="single-seed SDE runs")
    ap.add_argument("--seeds", type=int, default=4, help="seeds of the stochastic section")
    ap.add_argument("--mrs-steps", type=int, nargs="+", default=[5, 10, 20], help="mrs_sde (order 2)")
    ap.add_argument("--seeded-sde-steps", type=int, nargs="+", default=[100, 1000], help="SDE beside mrs_sde")
    ap.add_argument("--invsr-steps", type=int, nargs="+", default=[1, 2, 3, 5])
    ap.add_argument("--sections", nargs="*", choices=["stochastic", "inversion"], default=["stochastic", "inversion"],
                    help="the seed sections to run (each is long on a CPU)")
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
    skipped = {"measured": False, "reason": "not run (--sections)"}
    stochastic = stochastic_section(model, photos, device, args) if "stochastic" in args.sections else skipped
    inversion = inversion_section(model, photos, device, args) if "inversion" in args.sections else skipped
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
        "stochastic": stochastic,
        "inversion": inversion,
        "plot": str(args.out.with_suffix(".png")),
        "plot_seeds": str(args.out.with_name(args.out.stem + "_seeds.png")),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(result, args.out.with_suffix(".png"))
    plot_seeds(result, Path(result["plot_seeds"]))
    return write_result(result, args.out)


if __name__ == "__main__":
    try:
        run_benchmark(main)
    except InputError as e:  # exit code 2, as the CLI's for bad input
        print(f"quality_vs_nfe: {e}", file=sys.stderr)
        sys.exit(2)
