"""Mutation check of the core maths (not part of `make test`): each mutant is a textual replacement in
platform/pfsr (diffusion, losses, sampling, train, features, models); the core test files must fail on every one.

The checkout's platform/, tests/, configs/, models/ and pyproject.toml are copied to a temporary folder; each mutant
is applied to the copy (the checkout is never changed) and the tests run there with `pytest -x` (pytest's
`pythonpath` puts the copy's platform/ first). Reports which mutants survive; exit code 1 when any does.

    python scripts/mutants.py                 # all mutants
    python scripts/mutants.py --list          # their names
    python scripts/mutants.py --only ema_decay_swapped dsm_targets_swapped
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("platform", "tests", "configs", "models", "pyproject.toml")
# Fastest killers first: `-x` stops at the first failure.
CORE_TESTS = ("tests/test_pinned_maths.py", "tests/test_diffusion.py", "tests/test_sampling.py",
              "tests/test_models.py", "tests/test_features.py", "tests/test_losses.py")

# (name, file under platform/pfsr, old text, new text); old must occur exactly once.
MUTANTS: list[tuple[str, str, str, str]] = [
    # the six of issue 13
    ("dsm_targets_swapped", "losses.py",
     "F.mse_loss(e.float(), eps.float()) + cfg.x0_weight * F.mse_loss(d.float(), r0.float())",
     "F.mse_loss(e.float(), r0.float()) + cfg.x0_weight * F.mse_loss(d.float(), eps.float())"),
    ("data_head_onto_x_t", "losses.py",
     "cfg.x0_weight * F.mse_loss(d.float(), r0.float())", "cfg.x0_weight * F.mse_loss(d.float(), x_t.float())"),
    ("dsm_t_narrow_low_noise", "losses.py", "t = sde.t_min + (sde.t_max - sde.t_min) * torch.rand(",
     "t = sde.t_min + 0.1 * (sde.t_max - sde.t_min) * torch.rand("),
    ("quality_on_residual", "losses.py",
     "return distance(model.from_diffused(r, cond_ode), hr.to(dtype))", "return distance(r, hr.to(dtype))"),
    ("multistep_ratio_inverted", "sampling.py", "r = grid.h(i - 1) / grid.h(i)", "r = grid.h(i) / grid.h(i - 1)"),
    ("unipc_warmup_corrector_coefficient", "sampling.py", "return [], [0.5]", "return [], [0.6]"),
    # VP SDE and the hybrid parametrization
    ("log_alpha_quadratic_coefficient", "diffusion.py", "return -0.25 * t**2 *", "return -0.5 * t**2 *"),
    ("sigma_from_alpha_not_alpha_squared", "diffusion.py",
     "return torch.sqrt(-torch.expm1(2 * self.log_alpha(t)))", "return torch.sqrt(-torch.expm1(self.log_alpha(t)))"),
    ("marginal_sigma_squared", "diffusion.py",
     "append_dims(self.sigma(t), x0.ndim) * noise", "append_dims(self.sigma(t) ** 2, x0.ndim) * noise"),
    ("pf_ode_drift_sign", "diffusion.py",
     "return -0.5 * beta * (x - eps / append_dims", "return -0.5 * beta * (x + eps / append_dims"),
    ("lambda_exponent_alpha_not_abar", "diffusion.py",
     "lam = append_dims(sde.abar(t) ** c, x_t.ndim)", "lam = append_dims(sde.alpha(t) ** c, x_t.ndim)"),
    ("one_minus_lambda_exponent", "diffusion.py",
     "-torch.expm1(c * 2 * sde.log_alpha(t))", "-torch.expm1(c * sde.log_alpha(t))"),
    ("hybrid_data_head_unscaled", "diffusion.py",
     "one_minus_lam * (x_t - alpha * d) / sigma", "one_minus_lam * (x_t - d) / sigma"),
    ("t_from_log_snr_beta_min", "diffusion.py",
     "(0.5 * self.beta_min + torch.sqrt(", "(self.beta_min + torch.sqrt("),
    # samplers
    ("first_order_step_alpha_ratio", "sampling.py",
     "ratio = (self.sigma[i + 1] / self.sigma[i]).item()", "ratio = (self.alpha[i + 1] / self.alpha[i]).item()"),
    ("lower_order_final_at_10", "sampling.py",
     "if self.steps < LOWER_ORDER_FINAL_BELOW:", "if self.steps <= LOWER_ORDER_FINAL_BELOW:"),
    ("unipc_b_without_factorial", "sampling.py",
     "b.append(h_phi_k * factorial / b_h)", "b.append(h_phi_k / b_h)"),
    ("quadratic_schedule_cubic", "sampling.py",
     "steps + 1, dtype=torch.float64) ** 2", "steps + 1, dtype=torch.float64) ** 3"),
    ("sde_pf_ode_drift", "sampling.py",
     "x = x + (sde.drift(x, tt) - g**2 * score) * dt", "x = x + (sde.drift(x, tt) - 0.5 * g**2 * score) * dt"),
    ("sde_noise_dt_not_sqrt", "sampling.py", "x = x + g * (-dt) ** 0.5 * noise", "x = x + g * (-dt) * noise"),
    # residual parametrization
    ("residual_decoded_times_k", "models/sr.py",
     "return cond.upsampled + r / self.residual_scale", "return cond.upsampled + r * self.residual_scale"),
    ("residual_unscaled", "models/sr.py",
     "return self.residual_scale * (hr - cond.upsampled)", "return (hr - cond.upsampled)"),
    # losses and training stages
    ("vgg19_after_relu", "features.py", "vgg_features(VGG19_CFG, VGG19_CONV5_4 + 1)",
     "vgg_features(VGG19_CFG, VGG19_CONV5_4 + 2)"),
    ("vgg19_no_imagenet_std", "features.py",
     "return self.features((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))",
     "return self.features(x - self.mean.to(x.dtype))"),
    ("dsm_weight_ignored", "losses.py", '"total": self.cfg.dsm_weight * dsm}', '"total": dsm}'),
    ("quality_weight_ignored", "losses.py",
     'out["total"] = out["total"] + self.cfg.quality_weight * q', 'out["total"] = out["total"] + q'),
    ("quality_encoder_switch_ignored", "losses.py",
     "cond = Condition(features=cond.features.detach(), upsampled=cond.upsampled)",
     "cond = Condition(features=cond.features, upsampled=cond.upsampled)"),
    # training step
    ("ema_decay_swapped", "train.py", "e.lerp_(p.detach(), 1 - decay)", "e.lerp_(p.detach(), decay)"),
    ("warmup_off_by_one", "train.py", "min(1.0, (step + 1) / tc.warmup_steps)", "min(1.0, step / tc.warmup_steps)"),
    ("decay_off_by_one", "train.py", "sum(step >= s for s in tc.lr_decay_steps)",
     "sum(step > s for s in tc.lr_decay_steps)"),
]


def copy_checkout(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)


def run_tests(copy: Path, tests: list[str], timeout_s: float) -> tuple[str, str]:
    """('passed' | 'failed' | 'timeout', the last line of pytest's output) of the tests in `copy`."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *tests]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return "timeout", f"over {timeout_s:.0f} s"
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    return ("passed" if proc.returncode == 0 else "failed"), (lines[-1] if lines else proc.stderr[-200:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", default=None, help="mutant names (default: all)")
    ap.add_argument("--list", action="store_true", help="print the mutants' names and exit")
    ap.add_argument("--tests", nargs="+", default=list(CORE_TESTS))
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per mutant; a timeout counts as killed")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(name for name, *_ in MUTANTS))
        return 0
    chosen = [m for m in MUTANTS if args.only is None or m[0] in args.only]
    unknown = set(args.only or ()) - {m[0] for m in MUTANTS}
    if unknown:
        ap.error(f"unknown mutants: {', '.join(sorted(unknown))}; see --list")

    results = []
    with tempfile.TemporaryDirectory(prefix="pfsr-mutants-") as tmp:
        copy = Path(tmp)
        copy_checkout(copy)
        status, detail = run_tests(copy, args.tests, args.timeout)
        print(f"unmutated: {status} ({detail})", flush=True)
        if status != "passed":
            print("the unmutated tests must pass first", file=sys.stderr)
            return 2
        for name, rel, old, new in chosen:
            path = copy / "platform" / "pfsr" / rel
            original = (ROOT / "platform" / "pfsr" / rel).read_text()
            if original.count(old) != 1:
                print(f"{name}: {rel} has the text to mutate {original.count(old)} times, not once: {old!r}",
                      file=sys.stderr)
                return 2
            path.write_text(original.replace(old, new))
            t0 = time.perf_counter()
            try:
                status, detail = run_tests(copy, args.tests, args.timeout)
            finally:
                path.write_text(original)
            verdict = "SURVIVED" if status == "passed" else "killed"
            results.append({"mutant": name, "file": rel, "verdict": verdict, "tests": detail,
                            "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{name:40s} {verdict:8s} {detail}", flush=True)
    survivors = [r["mutant"] for r in results if r["verdict"] == "SURVIVED"]
    print(f"\n{len(results) - len(survivors)} of {len(results)} mutants killed"
          + (f"; survivors: {', '.join(survivors)}" if survivors else ""))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
