"""demo_out/report.html: one self-contained page (plots and grids embedded as base64 PNG) built from the raw files
that `pfsr demo` leaves beside it. No Ray here: the report can be rebuilt from a finished (or failed) demo's
folder with `python -m pfsr.report demo_out`.

Inputs, all optional (a section whose files are missing says so):
    timings.json               {"stages": [{"name", "seconds", "status", "command"}], "total_seconds", "status",
                                "failed_stage", "machine", "data", "quick", "started", "from_scratch",
                                "models": {"shipped", "demo": what each model is, in words}}
    fine_tuning.json           the demo model against the shipped model it started from (pfsr.pipeline.demo)
    eval/<model>-<setting>/    `pfsr evaluate` outputs: metrics.json, grids/*.png (<model> is "demo", "shipped")
    loss_curves.json           {stage: {tag: [[step, value], ...]}} (read from the runs' TensorBoard files)
    serve.json                 the HTTP request of the Serve stage, with serve_lr.png, serve_sr.png, serve_hr.png
Writes report.html and the plots it embeds (quality_vs_nfe.png, loss_curves.png, timings.png,
serve_comparison.png) next to them.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

QUALITY_COLUMNS = (("psnr_y", "PSNR-Y dB"), ("ssim_y", "SSIM-Y"), ("psnr_rgb", "PSNR-RGB dB"),
                   ("ssim_rgb", "SSIM-RGB"), ("lpips", "LPIPS"))
MODEL_LABELS = {"demo": "demo model (trained just now)", "shipped": "shipped model (models/pfsr_x4_small.pt)"}
MODEL_ORDER = ("shipped", "demo")  # the shipped model first, then the demo's
CURVE_TAGS = ("train/loss_l1", "train/loss_dsm", "train/loss_quality", "train/loss_l2", "val/psnr_y")
GRIDS_PER_EVAL = 2


# ---------------------------------------------------------------------------------------------------------------
# Raw inputs

def machine_info() -> dict[str, Any]:
    """The machine in words: CPU model, cores, GPU (when torch sees one), OS, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    if "torch" in sys.modules or _installed("torch"):
        import torch

        if torch.cuda.is_available():
            gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    versions = {name: _installed(name) for name in ("torch", "ray", "pfsr")}
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "os": platform.platform(terse=True),
            "python": platform.python_version(), **{k: v for k, v in versions.items() if v}}


def describe_machine(info: dict[str, Any]) -> str:
    """'2 cores of Intel Xeon ..., no GPU' style one-liner."""
    gpu = f"GPU {info['gpu']}" if info.get("gpu") else "no GPU"
    return f"{info.get('cores', '?')} cores of {info.get('cpu', 'unknown CPU')}, {gpu}"


def _installed(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def read_scalars(run_dir: str | Path) -> dict[str, list[list[float]]]:
    """TensorBoard scalars under a run directory (every events file below it, in file order; a step written again
    after a restart keeps its last value) -> {tag: [[step, value], ...]} sorted by step."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    series: dict[str, dict[int, float]] = {}
    for events in sorted(Path(run_dir).rglob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime, p.name)):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    number = value.simple_value
                elif value.HasField("tensor") and value.tensor.float_val:
                    number = value.tensor.float_val[0]
                else:
                    continue
                series.setdefault(value.tag, {})[int(event.step)] = float(number)
    return {tag: [[step, v] for step, v in sorted(points.items())] for tag, points in sorted(series.items())}


def _read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_evaluations(out: Path) -> list[dict[str, Any]]:
    """eval/<model>-<setting>/metrics.json, each with "name", "model" label key and "dir" added; sorted by model
    (MODEL_ORDER), then NFE."""
    evals = []
    for metrics in sorted((out / "eval").glob("*/metrics.json")):
        report = _read_json(metrics)
        if not isinstance(report, dict) or "model" not in report:
            continue
        name = metrics.parent.name
        evals.append({**report, "name": name, "owner": name.split("-", 1)[0], "dir": metrics.parent})
    rank = {owner: i for i, owner in enumerate(MODEL_ORDER)}
    return sorted(evals, key=lambda e: (rank.get(e["owner"], len(rank)), e["owner"], e["model"].get("nfe") or 0))


def setting_label(report: dict[str, Any]) -> str:
    if report.get("sampler") == "pf_ode" and report.get("steps") is None:
        return f"PF-ODE dopri5 (rtol {report.get('rtol', 1e-4):g})"
    order = f" order {report['order']}" if report.get("order") is not None else ""
    mean = ", rrdb mean" if report.get("diffusion_mean") == "rrdb" else ""
    return f"{report.get('sampler')}{order} {report.get('steps')} steps{mean}"


# ---------------------------------------------------------------------------------------------------------------
# Figures

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _plt().close(fig)
    return buf.getvalue()


def plot_quality_vs_nfe(evals: Sequence[dict[str, Any]]) -> Optional[bytes]:
    """PSNR(Y) (and LPIPS when measured) against NFE: one marker style per model, one colour per sampler,
    bicubic and RRDB dashed."""
    if not evals:
        return None
    plt = _plt()
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    has_lpips = any(e["model"].get("lpips") is not None for e in evals)
    fig, axes = plt.subplots(1, 2 if has_lpips else 1, figsize=(11 if has_lpips else 6.5, 4.2), squeeze=False)
    markers = {"demo": "o", "shipped": "s"}
    colors = {}
    for ax, key, label in zip(axes[0], ("psnr_y", "lpips"), ("PSNR-Y [dB]", "LPIPS (VGG), lower is better")):
        for e in evals:
            value, nfe = e["model"].get(key), e["model"].get("nfe")
            if value is None or nfe is None:
                continue
            color = colors.setdefault(e["sampler"], f"C{len(colors)}")
            ax.plot([nfe], [value], markers.get(e["owner"], "^"), color=color, markersize=8)
            ax.annotate(f"{e['owner']} {setting_label(e)}", (nfe, value), textcoords="offset points",
                        xytext=(5, 4), fontsize=7)
        bicubic = [e["bicubic"][key] for e in evals if e["bicubic"].get(key) is not None]
        if bicubic:
            ax.axhline(bicubic[0], color="gray", linestyle="--", linewidth=1, label="bicubic")
        for owner, style in zip(dict.fromkeys(e["owner"] for e in evals), (":", "-.", (0, (1, 3)))):
            rrdb = [e["rrdb"][key] for e in evals if e["owner"] == owner and (e.get("rrdb") or {}).get(key) is not None]
            if rrdb:
                ax.axhline(rrdb[0], color="gray", linestyle=style, linewidth=1, label=f"RRDB ({owner})")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        handles = [plt.Line2D([], [], marker=markers.get(o, "^"), linestyle="", color="black", label=o)
                   for o in sorted({e["owner"] for e in evals})]
        handles += [plt.Line2D([], [], marker="o", linestyle="", color=c, label=s) for s, c in colors.items()]
        ax.legend(handles=handles + ax.get_legend_handles_labels()[0], fontsize=7)
    n = evals[0].get("n_images")
    fig.suptitle(f"Quality against NFE (x{evals[0].get('scale')}, {n} validation image{'' if n == 1 else 's'})")
    fig.tight_layout()
    return _png(fig)


def plot_loss_curves(curves: dict[str, dict[str, list[list[float]]]]) -> Optional[bytes]:
    """One panel per tag found (training losses and validation PSNR), one line per training stage."""
    tags = [t for t in CURVE_TAGS if any(t in stage for stage in curves.values())]
    if not tags:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(tags), figsize=(4.2 * len(tags), 3.6), squeeze=False)
    for ax, tag in zip(axes[0], tags):
        for stage, series in curves.items():
            if tag in series:
                steps, values = zip(*series[tag])
                ax.plot(steps, values, "o-" if tag.startswith("val/") else "-", label=stage, markersize=3)
        ax.set_title(tag)
        ax.set_xlabel("step")
        if tag.startswith("train/loss"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_timings(stages: Sequence[dict[str, Any]]) -> Optional[bytes]:
    if not stages:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(stages) + 1.0))
    names = [s["name"] for s in stages][::-1]
    seconds = [s["seconds"] for s in stages][::-1]
    colors = ["C3" if s.get("status") == "failed" else "C0" for s in stages][::-1]
    ax.barh(names, seconds, color=colors)
    for y, s in enumerate(seconds):
        ax.text(s, y, f" {s:.0f} s", va="center", fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_xlim(0, max(seconds) * 1.15 + 1)
    fig.tight_layout()
    return _png(fig)


def comparison_grid(panels: Sequence[tuple[str, np.ndarray]], box: tuple[int, int, int]) -> bytes:
    """PNG of same-sized HxWx3 uint8 images side by side with the square `box` (top, left, size) outlined, and
    below each the box zoomed (nearest neighbour)."""
    plt = _plt()
    from matplotlib.patches import Rectangle

    top, left, size = box
    h, w = panels[0][1].shape[:2]
    fig, axes = plt.subplots(2, len(panels), figsize=(3.6 * len(panels), 3.6 * (h / w) + 3.8),
                             gridspec_kw={"height_ratios": [h / w, 1]}, squeeze=False)
    for col, (title, img) in enumerate(panels):
        axes[0, col].imshow(img)
        axes[0, col].add_patch(Rectangle((left, top), size, size, fill=False, edgecolor="yellow", linewidth=1.5))
        axes[0, col].set_title(title, fontsize=9)
        axes[1, col].imshow(img[top:top + size, left:left + size], interpolation="nearest")
        for ax in axes[:, col]:
            ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def detail_box(img: np.ndarray, fraction: int = 3) -> tuple[int, int, int]:
    """(top, left, size): the square of side min(H, W) / fraction with the most gradient energy (coarse grid)."""
    h, w = img.shape[:2]
    size = max(8, min(h, w) // fraction)
    y = img.astype(np.float32).mean(axis=2)
    energy = np.abs(np.diff(y, axis=0))[:, :-1] + np.abs(np.diff(y, axis=1))[:-1, :]
    integral = np.pad(energy, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    stride = max(1, size // 4)
    best, box = -1.0, (0, 0)
    for top in range(0, h - size, stride):
        for left in range(0, w - size, stride):
            b, r = top + size - 1, left + size - 1
            e = integral[b, r] - integral[top, r] - integral[b, left] + integral[top, left]
            if e > best:
                best, box = e, (top, left)
    return box[0], box[1], size


# ---------------------------------------------------------------------------------------------------------------
# HTML

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1180px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #ddd;padding:.3em .6em;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
tr.base td{color:#555;background:#fafafa}img{max-width:100%;border:1px solid #eee}
.note{color:#666;font-size:.9em}.bad{color:#b00020;font-weight:600}.ok{color:#1b7f3b;font-weight:600}
code{background:#f4f4f4;padding:0 .25em;border-radius:3px}figure{margin:1em 0}figcaption{color:#555;font-size:.9em}
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s" if seconds >= 60 else f"{seconds:.1f} s"


def metrics_table(evals: Sequence[dict[str, Any]]) -> str:
    """Bicubic, each model's RRDB regression head, then every evaluated sampler setting; PSNR-Y also as the
    difference to bicubic; gradient energy as a ratio to the HR images' (1.0 = as much detail as HR)."""
    if not evals:
        return '<p class="bad">No evaluation finished (no eval/*/metrics.json).</p>'
    base = evals[0]
    ref_psnr = base["bicubic"].get("psnr_y")
    head = ("<tr><th>method</th><th>setting</th>" + "".join(f"<th>{h}</th>" for _, h in QUALITY_COLUMNS)
            + "<th>&Delta; PSNR-Y vs bicubic</th><th>gradient energy / HR</th><th>NFE</th><th>s / image</th></tr>")

    def row(label: str, setting: str, m: dict[str, Any], energy: Optional[float], hr_energy: Optional[float],
            css: str = "") -> str:
        delta = None if m.get("psnr_y") is None or ref_psnr is None else m["psnr_y"] - ref_psnr
        ratio = energy / hr_energy if energy is not None and hr_energy else None
        cells = [label, setting] + [_fmt(m.get(k), 4 if k.startswith("ssim") or k == "lpips" else 2)
                                    for k, _ in QUALITY_COLUMNS]
        cells += [("+" if delta and delta > 0 else "") + _fmt(delta), _fmt(ratio), _fmt(m.get("nfe"), 1),
                  _fmt(m.get("seconds_per_image"))]
        return f'<tr class="{css}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"

    def energies(e: dict[str, Any], section: str) -> tuple[Optional[float], Optional[float]]:
        ge = e.get("gradient_energy") or {}
        return ge.get(section), ge.get("hr")

    rows = [row("bicubic", "&ndash;", base["bicubic"], *energies(base, "bicubic"), css="base")]
    for owner in dict.fromkeys(e["owner"] for e in evals):
        first = next(e for e in evals if e["owner"] == owner)
        if first.get("rrdb") and first["rrdb"].get("psnr_y") is not None:
            rows.append(row(f"RRDB L1 regression ({owner})", "1 forward pass", first["rrdb"],
                            *energies(first, "rrdb"), css="base"))
    for e in evals:
        rows.append(row(MODEL_LABELS.get(e["owner"], e["owner"]), setting_label(e), e["model"],
                        *energies(e, "model")))
    lpips = base.get("lpips_backbone") or {}
    note = ("LPIPS measured with " + html.escape(str(lpips.get("source")))) if lpips.get("path") else \
        ("LPIPS not measured: " + html.escape(str(lpips.get("reason") or "no VGG16 weights"))
         + " (see README, Known limits).")
    return (f"<table>{head}{''.join(rows)}</table><p class='note'>{base.get('n_images')} validation images, "
            f"x{base.get('scale')}; PSNR/SSIM on 8-bit outputs with {base.get('scale')} border pixels cropped "
            f"(BasicSR). {note}</p>")


def models_html(timings: dict[str, Any], evals: Sequence[dict[str, Any]]) -> str:
    """What each model is (timings.json "models"), and the before/after of the demo's fine-tuning
    (fine_tuning.json) when there is one."""
    models = timings.get("models") or {o: MODEL_LABELS.get(o, o) for o in dict.fromkeys(e["owner"] for e in evals)}
    items = "".join(f"<li><b>{html.escape(owner)}</b>: {html.escape(text)}</li>" for owner, text in models.items())
    if timings.get("from_scratch"):
        items += ("<li><b>before the demo's training</b>: random weights (<code>--from-scratch</code>; not "
                  "evaluated: noise)</li>")
    return f"<ul>{items}</ul>" if items else '<p class="bad">No model was evaluated.</p>'


def fine_tuning_html(check: Optional[dict[str, Any]]) -> str:
    if not check:
        return ""
    verdict = (f"<span class='{'ok' if check['ok'] else 'bad'}'>{'kept' if check['ok'] else 'lost'}</span>")
    n = check["n_images"]
    return (f"<p>Fine-tuning, {html.escape(check['setting'])} on {n} validation crop{'' if n == 1 else 's'}: PSNR-Y "
            f"{check['before_psnr_y']:.2f} dB before (the shipped model), {check['after_psnr_y']:.2f} dB after "
            f"({check['delta_db']:+.2f} dB): quality {verdict} (the demo fails when fine-tuning loses more than "
            f"{check['tolerance_db']:g} dB).</p>")


def _grids_html(evals: Sequence[dict[str, Any]], models: Optional[dict[str, str]] = None) -> str:
    parts = []
    for i, e in enumerate(evals):
        if i == 0 or e["owner"] != evals[i - 1]["owner"]:
            text = (models or {}).get(e["owner"]) or MODEL_LABELS.get(e["owner"], e["owner"])
            parts.append(f"<h3>{html.escape(text[:1].upper() + text[1:])}</h3>")
        for png in sorted(Path(e["dir"]).glob("grids/*.png"))[:GRIDS_PER_EVAL]:
            parts.append(f"<figure>{_img(png.read_bytes(), png.stem)}<figcaption>{html.escape(e['owner'])} model, "
                         f"{html.escape(setting_label(e))}: {html.escape(png.stem)} "
                         f"(<code>{html.escape(str(png.relative_to(e['dir'].parents[1])))}</code>)</figcaption>"
                         "</figure>")
    return "".join(parts) or '<p class="bad">No comparison grids (eval/*/grids/*.png missing).</p>'


def _serve_html(out: Path) -> str:
    info = _read_json(out / "serve.json")
    if not info:
        return '<p class="bad">The Serve stage did not complete (no serve.json).</p>'
    from PIL import Image

    parts = [f"<p><code>POST {html.escape(info.get('url', ''))}</code> with a {info.get('input_size')} PNG "
             f"answered {info.get('status')} in {_fmt(info.get('seconds'))} s with a {info.get('output_size')} PNG "
             f"({html.escape(str(info.get('nfe')))} NFE, batch of {html.escape(str(info.get('batch')))}).</p>"]
    files = {k: out / info[k] for k in ("lr", "sr", "hr") if info.get(k) and (out / info[k]).is_file()}
    if {"lr", "sr", "hr"} <= files.keys():
        from .degradation import upsample
        import torch

        sr, hr, lr = (np.array(Image.open(files[k]).convert("RGB")) for k in ("sr", "hr", "lr"))
        scale = sr.shape[0] // lr.shape[0]
        bicubic = upsample(torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255, scale)
        bicubic = (bicubic[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        png = comparison_grid([("bicubic", bicubic), ("PF-SR over HTTP", sr), ("HR", hr)], detail_box(hr))
        (out / "serve_comparison.png").write_bytes(png)
        parts.append(f"<figure>{_img(png, 'served upscale')}<figcaption>LR input {lr.shape[1]}x{lr.shape[0]} "
                     f"(bicubic x{scale} of the HR crop), the endpoint's answer, and the HR crop; zoomed below."
                     "</figcaption></figure>")
    return "".join(parts)


def _timings_html(timings: Optional[dict[str, Any]]) -> tuple[str, Optional[bytes]]:
    if not timings:
        return '<p class="bad">No timings.json.</p>', None
    stages = timings.get("stages", [])
    rows = "".join(f"<tr><td>{html.escape(s['name'])}</td><td>{_duration(s['seconds'])}</td>"
                   f"<td class='{'bad' if s.get('status') == 'failed' else 'ok'}'>{html.escape(s.get('status', ''))}"
                   f"</td><td style='text-align:left'><code>{html.escape(s.get('command') or '(in process)')}</code>"
                   "</td></tr>" for s in stages)
    table = (f"<table><tr><th>stage</th><th>wall time</th><th>status</th><th>command</th></tr>{rows}"
             f"<tr><th>total</th><th>{_duration(timings.get('total_seconds', 0))}</th><th></th><th></th></tr>"
             "</table>")
    png = plot_timings(stages)
    return table + (_img(png, "timings") if png else ""), png


def build_report(out: str | Path) -> Path:
    """Read the raw files under `out`, write the plots and out/report.html; returns its path."""
    out = Path(out)
    timings = _read_json(out / "timings.json") or {}
    evals = load_evaluations(out)
    curves = _read_json(out / "loss_curves.json") or {}
    machine = timings.get("machine") or machine_info()

    nfe_png = plot_quality_vs_nfe(evals)
    loss_png = plot_loss_curves(curves)
    timings_html, timings_png = _timings_html(timings)
    for name, png in (("quality_vs_nfe.png", nfe_png), ("loss_curves.png", loss_png), ("timings.png", timings_png)):
        if png:
            (out / name).write_bytes(png)

    status = timings.get("status", "unknown")
    status_html = ("<span class='ok'>completed</span>" if status == "ok" else
                   f"<span class='bad'>{html.escape(status)}"
                   + (f" in stage {html.escape(timings['failed_stage'])}" if timings.get("failed_stage") else "")
                   + "</span>")
    final_losses = "".join(
        f"<li>{html.escape(stage)}: " + ", ".join(f"{html.escape(tag)} {series[-1][1]:.4g} at step {series[-1][0]}"
                                                 for tag, series in tags.items() if tag in CURVE_TAGS) + "</li>"
        for stage, tags in curves.items())
    sections = [
        f"<h1>PF-SR demo report</h1><p>Status: {status_html}. Total wall time "
        f"{_duration(timings.get('total_seconds', 0))}{' (quick run)' if timings.get('quick') else ''}, started "
        f"{html.escape(str(timings.get('started', '?')))}. Data: {html.escape(str(timings.get('data', '?')))}.<br>"
        f"Machine: {html.escape(describe_machine(machine))}; {html.escape(str(machine.get('os')))}, Python "
        f"{html.escape(str(machine.get('python')))}, torch {html.escape(str(machine.get('torch')))}, Ray "
        f"{html.escape(str(machine.get('ray')))}.</p>",
        "<h2>The models</h2>" + models_html(timings, evals) + fine_tuning_html(_read_json(out / "fine_tuning.json")),
        "<h2>Metrics on held-out images</h2>" + metrics_table(evals),
        "<h2>Quality against network evaluations</h2>"
        + (_img(nfe_png, "quality against NFE") if nfe_png else "<p class='bad'>No evaluations to plot.</p>")
        + "<p class='note'>Adaptive PF-ODE (dopri5) chooses its own NFE; the few-step solvers use exactly their "
          "step count. A model trained from scratch for minutes is far from converged: compare the shipped "
          "model.</p>",
        "<h2>Comparison grids</h2><p class='note'>bicubic | PF-SR | HR with the most detailed region zoomed "
        "below (from <code>pfsr evaluate</code>).</p>" + _grids_html(evals, timings.get("models")),
        "<h2>Upscaled over HTTP by the Serve endpoint</h2>" + _serve_html(out),
        "<h2>Training curves</h2>" + (_img(loss_png, "loss curves") + f"<ul>{final_losses}</ul>" if loss_png else
                                      "<p class='bad'>No training curves (loss_curves.json missing).</p>"),
        "<h2>Time per stage</h2>" + timings_html,
        "<h2>Raw files</h2><p class='note'>Everything above comes from files in this folder: "
        "<code>timings.json</code>, <code>loss_curves.json</code>, <code>eval/*/metrics.json</code>, "
        "<code>eval/*/per_image.parquet</code>, <code>eval/*/grids/</code>, <code>serve.json</code> with "
        "<code>serve_*.png</code>, the exported models in <code>models/</code>, the Ray Train runs in "
        "<code>runs/</code> and every stage's log in <code>logs/</code>.</p>",
    ]
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>PF-SR demo report</title>"
            f"<style>{CSS}</style></head><body>{''.join(sections)}<p class='note'>Generated "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} by pfsr.report.</p></body></html>\n")
    path = out / "report.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "demo_out"
    print(build_report(target))
