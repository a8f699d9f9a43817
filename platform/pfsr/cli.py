"""`pfsr`: one command, one subcommand per stage. Flags are parsed here; the work is imported only when run
(so `pfsr --help` does not import Ray or torch)."""
from __future__ import annotations

import argparse
import importlib
import sys

from .config import ConfigError
from .errors import InputError

SAMPLER_HELP = ("pf_ode (adaptive dopri5), sde (Euler-Maruyama), dpmpp_2m (log-SNR steps), dpmpp_2m_quadratic "
                "(time-quadratic steps), unipc (few-step data-prediction solvers), mrs_sde (MR Sampler SDE, seed "
                "003), invsr (1-5 steps from the inverter's start, seed 001; needs an inversion-stage checkpoint)")
ORDER_HELP = "mrs_sde's order, 1 or 2 (default 2); for mrs_sde only"


def _upscale(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN", help="image file or folder of images")
    p.add_argument("output", metavar="OUT", help="output PNG file, or folder for a batch")
    p.add_argument("--checkpoint", help="exported checkpoint (default: the shipped models/pfsr_x4_small.pt)")
    p.add_argument("--sampler", default=None, help=SAMPLER_HELP + " (default: the checkpoint's config)")
    p.add_argument("--steps", type=int, default=None, help="solver steps (fixed-step samplers)")
    p.add_argument("--order", type=int, default=None, help=ORDER_HELP)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile", type=int, default=None, help="LR tile size for large images (default: config)")
    p.add_argument("--memory-budget-mb", type=float, default=None,
                   help="peak memory of this process, MB: tiles solved together follow (default: serve.memory_budget_mb)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")


def _prep(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, help="raw data set: local path or s3://bucket/prefix")
    p.add_argument("--out", required=True, help="shard output: local path or s3://bucket/prefix")
    p.add_argument("--layout", default="auto", choices=["auto", "div2k", "imagenet", "celeba", "folder"])
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument("--patch", type=int, default=480,
                   help="sub-image size (BasicSR extract_subimages); 0 keeps images whole")
    p.add_argument("--step", type=int, default=240, help="sub-image stride")
    p.add_argument("--min-size", type=int, default=64, help="smaller images are rejected")
    p.add_argument("--max-pixels", type=int, default=64_000_000, help="larger images are rejected before decoding")
    p.add_argument("--shard-size-mb", type=float, default=256)
    p.add_argument("--min-shards", type=int, default=8)
    p.add_argument("--format", default="png", choices=["png", "webp"], help="lossless encoding of the HR samples")
    p.add_argument("--concurrency", type=int, default=None,
                   help="at most this many parallel tasks (default: all CPUs); the output is the same for any value")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: local or RAY_ADDRESS)")
    p.add_argument("--masks", default="none", choices=["none", "felzenszwalb", "slic"],
                   help="seed 002: segment each whole image (scikit-image) and store its label mask per sample")
    p.add_argument("--masks-from", default=None, metavar="DIR",
                   help="seed 002: your own (e.g. SAM) masks, DIR/<image path without extension>.png|.npy|.json")


def _train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    p.add_argument("--data", default=None, help="train shards URI (overrides data.train); val from data.val")
    p.add_argument("--val-data", default=None, help="validation shards URI (overrides data.val)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, nccl")
    p.add_argument("--steps", type=int, default=None, help="overrides train.steps")
    p.add_argument("--storage", default="runs", help="run storage: local path or s3://bucket/prefix")
    p.add_argument("--name", default=None, help="run name (default: config name and time)")
    p.add_argument("--resume", action="store_true", help="continue the named run from its latest checkpoint")
    p.add_argument("--init", default=None, help="checkpoint of the previous stage to start from")
    p.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs Ray reserves per training worker")
    p.add_argument("--ray-address", default=None)


def _export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory or checkpoint (local or s3://)")
    p.add_argument("--out", required=True, help="serving checkpoint file to write")
    p.add_argument("--which", default="best", choices=["best", "latest"])


def _evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="exported checkpoint (local or s3://)")
    p.add_argument("--data", required=True, help="shard prefix or folder of HR images (local or s3://)")
    p.add_argument("--out", required=True, help="output directory (local or s3://)")
    p.add_argument("--split", default="val")
    p.add_argument("--scale", type=int, default=None, help="must match the checkpoint's scale (default: it)")
    p.add_argument("--sampler", default="pf_ode", help=SAMPLER_HELP)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--order", type=int, default=None, help=ORDER_HELP)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N images")
    p.add_argument("--replicas", type=int, default=1, help="model replicas in the Ray Data actor pool")
    p.add_argument("--gpus-per-replica", type=float, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--memory-budget-mb", type=float, default=None,
                   help="peak memory per replica, MB: tiles solved together follow (default: serve.memory_budget_mb)")
    p.add_argument("--max-restarts", type=int, default=2,
                   help="a replica that dies (killed for memory) is restarted this often, then the run fails")
    p.add_argument("--lpips-weights", default=None, help="VGG16 backbone (torchvision's vgg16-397923af.pth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", nargs="+", default=None, metavar="DIR",
                   help="earlier evaluate outputs: also write OUT/quality_vs_nfe.png (PSNR and LPIPS against NFE)")
    p.add_argument("--ray-address", default=None)


def _serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="exported checkpoint (default: the shipped model)")
    p.add_argument("--config", default=None, help="YAML whose serve: section overrides the defaults")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--ray-address", default=None)


def _sweep_c(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--data", required=True, help="train shards URI")
    p.add_argument("--val-data", default=None,
                   help="held-out images for PSNR and the prediction error (default: data.val, else the val split "
                        "of --data when it has one)")
    p.add_argument("--values", type=float, nargs="+", default=[0.5, 0.75, 1.0, 1.25, 1.5],
                   help="the diffusion.hybrid_c values to train, one trial each")
    p.add_argument("--steps", type=int, default=None, help="training steps per trial (overrides train.steps)")
    p.add_argument("--out", required=True, help="output directory for the table and plot")
    p.add_argument("--storage", default=None, help="Ray Tune storage (default: OUT/tune, or a temp dir for s3://)")
    p.add_argument("--bins", type=int, default=8, help="equal-width t bins over [t_min, 1] of the prediction error")
    p.add_argument("--error-crops", type=int, default=16, help="HR crops (data.crop) the prediction error averages")
    p.add_argument("--max-concurrent-trials", type=int, default=1, help="0: as many as the resources allow")
    p.add_argument("--cpus-per-trial", type=float, default=1)
    p.add_argument("--gpus-per-trial", type=float, default=0)
    p.add_argument("--ray-address", default=None)


def _compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", nargs="+", required=True, metavar="METHOD.yaml",
                   help="method files: stages (config and steps each), the same total steps for all")
    p.add_argument("--data", required=True, help="train shards URI, the same for every method")
    p.add_argument("--val-data", required=True, help="validation images (shards or a folder)")
    p.add_argument("--seeds", type=int, default=3, help="trials per method, train.seed = 0 .. seeds - 1")
    p.add_argument("--samplers", nargs="+", default=["dpmpp_2m:1", "dpmpp_2m:2", "dpmpp_2m:4", "dpmpp_2m:10"],
                   metavar="SAMPLER[:STEPS]", help="sampler settings every method is scored at")
    p.add_argument("--out", required=True, help="output directory (compare.json, .csv, .png, .html)")
    p.add_argument("--storage", default=None, help="Ray Tune storage (default: OUT/tune, or a temp dir for s3://)")
    p.add_argument("--max-concurrent-trials", type=int, default=1, help="0: as many as the resources allow")
    p.add_argument("--cpus-per-trial", type=float, default=1)
    p.add_argument("--gpus-per-trial", type=float, default=0)
    p.add_argument("--ray-address", default=None)


def _demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="your own images (local or s3://); default: scikit-image's photos")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--quick", action="store_true", help="a shortened run (tests)")
    p.add_argument("--from-scratch", action="store_true",
                   help="train configs/tiny*.yaml from random weights instead of fine-tuning the shipped model")


# name -> (help, argument builder, "module:function" that runs it)
COMMANDS = {
    "upscale": ("super-resolve an image or a folder", _upscale, "pfsr.inference:run_cli"),
    "prep": ("shard a raw data set into WebDataset tars with Ray Data", _prep, "pfsr.pipeline.prep:run_cli"),
    "train": ("train with Ray Train (DDP)", _train, "pfsr.pipeline.train:run_cli"),
    "export": ("write a serving checkpoint from a run", _export, "pfsr.checkpoint:run_export_cli"),
    "evaluate": ("evaluate with Ray Data batch inference", _evaluate, "pfsr.pipeline.evaluate:run_cli"),
    "serve": ("run the Ray Serve endpoint", _serve, "pfsr.pipeline.serve:run_cli"),
    "sweep-c": ("choose the hybrid constant c with Ray Tune", _sweep_c, "pfsr.pipeline.sweep:run_cli"),
    "compare": ("compare methods on the same budget with Ray Tune", _compare, "pfsr.pipeline.compare:run_cli"),
    "demo": ("the whole pipeline on the bundled photos", _demo, "pfsr.pipeline.demo:run_cli"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfsr", description="PF-SR: diffusion super-resolution on Ray")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, target) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(target=target)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, func_name = args.target.split(":")
    run = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(run(args) or 0)
    except (InputError, ConfigError, FileNotFoundError) as e:
        print(f"pfsr {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pfsr {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
