"""`pfsr demo`: the whole pipeline on one machine, each stage a `pfsr` subprocess on one local Ray cluster.

    data       the photos scikit-image ships (or --data: your images, split deterministically) -> data/{train,val}
    prep       `pfsr prep` (Ray Data) -> WebDataset shards/{train,val}
    train      `pfsr train --workers 2` (Ray Train, DDP): the RRDB encoder (L1 regression), then the diffusion
               model from it (--init, encoder frozen) -> runs/demo-{encoder,diffusion}. By default both stages
               fine-tune the shipped model (the encoder stage starts from models/pfsr_x4_small.pt with --init, so
               the demo model has its architecture, configs/pfsr_x4_small*.yaml); --from-scratch trains
               configs/tiny*.yaml from random weights instead.
    export     `pfsr export` -> models/pfsr_demo.pt
    evaluate   `pfsr evaluate` (Ray Data batch inference): the shipped model models/pfsr_x4_small.pt (when it
               exists) and the demo model, PF-ODE and DPM-Solver++(2M) -> eval/<model>-<setting>/
    serve      `pfsr serve` (Ray Serve) on a free port (its web page's address printed); a held-back photo
               upscaled over HTTP -> serve_*.png
    check      fine-tuning: the demo model against the model it started from at DPM-Solver++(2M) 10 steps; more
               than FINE_TUNE_TOLERANCE_DB worse fails the demo -> fine_tuning.json
    report     report.html (pfsr.report) from the raw files beside it: timings.json, loss_curves.json, ...

The cluster is the demo's own `ray start --head` (free ports, its own temp dir, its own auth token); its address
goes to every stage as --ray-address, and it is shut down at the end, on failure and on Ctrl-C or SIGTERM by
stopping that one process and its session (never `ray stop`, which would kill every Ray on the machine). A
failing stage stops the demo with its name, exit code and log, and the demo exits non-zero; report.html still
shows what finished.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Iterator, Optional

import numpy as np
import yaml

from .. import storage
from ..checkpoint import load
from ..config import ServeConfig
from ..errors import InputError
from ..inference import DEFAULT_CHECKPOINT, IMAGE_SUFFIXES
from .proxy import proxy_env

REPO = Path(__file__).resolve().parents[3]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"  # the diffusion stage
TINY_ENCODER_CONFIG = REPO / "configs" / "tiny_encoder.yaml"  # its encoder stage
# Fine-tuning the shipped model: its configs, with the demo's crops, batches and a lower learning rate; the EMA
# starts from the shipped weights without warm-up (a warmed-up EMA of a few dozen steps on 64 px crops follows
# the noisy fine-tuned weights: -1.5 dB measured).
SHIPPED_ENCODER_CONFIG = REPO / "configs" / "pfsr_x4_small_encoder.yaml"
# The shipped model's last weight-changing stage: DSM plus the image-quality loss through the adjoint PF-ODE. The
# demo's diffusion stage fine-tunes with the same loss: DSM alone pulls the model back from where that stage took
# it (160 DSM steps lost 1.1 dB on the validation crops; 1.5 dB at lr 1e-5 in a trial).
SHIPPED_QUALITY_CONFIG = REPO / "configs" / "pfsr_x4_small_quality.yaml"
FINE_TUNE = {"data": {"crop": 64, "batch_size": 8, "shuffle_buffer": 64, "num_workers": 1},
             "train": {"lr": 5.0e-5, "warmup_steps": 10, "ema_decay": 0.99, "ema_warmup": False}}
FINE_TUNE_SETTING = "dpmpp_2m-10"  # the setting the fine-tuning check compares (the serving default)
FINE_TUNE_TOLERANCE_DB = 0.3  # the demo fails when fine-tuning loses more PSNR-Y than this
# skimage.data's RGB photos (sources and licences in the README); VAL_PHOTOS are held back for validation.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle")
VAL_PHOTOS = ("chelsea", "coffee")
OWN_DATA_VAL_FRACTION, OWN_DATA_MAX_VAL = 0.1, 32
# What the demo writes under --out; a new run removes these first (and nothing else there).
OUTPUTS = ("data", "shards", "configs", "runs", "models", "eval", "logs", "report.html", "timings.json",
           "loss_curves.json", "serve.json", "serve_lr.png", "serve_sr.png", "serve_hr.png", "serve_comparison.png",
           "quality_vs_nfe.png", "loss_curves.png", "timings.png", "fine_tuning.json")
HEALTH_TIMEOUT_S = 300


@dataclass(frozen=True)
class Plan:
    """How much the demo does. Validation uses crops because the U-Net's self-attention costs grow with the
    square of the pixels: whole photos would take minutes per sample on a CPU."""

    encoder_steps: int
    diffusion_steps: int
    log_every: int  # training curves' resolution
    val_every: int  # diffusion-stage validation (a multiple of log_every)
    val_patch: int  # HR side of the validation crops
    eval_limit: int  # images per evaluation
    few_steps: tuple[int, ...]  # DPM-Solver++(2M) step counts evaluated besides PF-ODE
    serve_lr: int  # LR side of the image upscaled over HTTP
    workers: int = 2
    shipped_pf_ode: bool = True  # evaluate the shipped model with PF-ODE too (besides FINE_TUNE_SETTING)
    # fine-tuning the shipped model: the diffusion stage's steps (each with the quality loss, ~20x a DSM step)
    fine_tune_diffusion_steps: int = 20
    fine_tune_val_every: int = 20

    def fine_tuning(self) -> "Plan":
        """The plan when the demo fine-tunes the shipped model."""
        return replace(self, diffusion_steps=self.fine_tune_diffusion_steps, val_every=self.fine_tune_val_every)


# FULL on a quiet 2-core machine without a GPU: 9 min 40 s fine-tuning the shipped model, about 8.5 from scratch,
# most of it training; on a machine shared with other jobs (load average 7 to 13) up to 15.
FULL = Plan(encoder_steps=150, diffusion_steps=160, log_every=10, val_every=40, val_patch=128, eval_limit=3,
            few_steps=(4, 10), serve_lr=48)
QUICK = Plan(encoder_steps=10, diffusion_steps=10, log_every=2, val_every=10, val_patch=64, eval_limit=1,
             few_steps=(10,), serve_lr=16, shipped_pf_ode=False, fine_tune_diffusion_steps=2, fine_tune_val_every=2)


class StageFailed(RuntimeError):
    def __init__(self, stage: str, message: str):
        self.stage = stage
        super().__init__(f"stage {stage!r} failed: {message}")


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, sig: int = signal.SIGINT, grace_s: float = 30) -> None:
    """Stop a child with `sig` (SIGINT: it cleans up as on Ctrl-C), then SIGKILL when it does not exit."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _pump(stream: IO[str], log: IO[str], t0: float, ready: Optional[threading.Event] = None) -> None:
    """Copy a child's output to its log and to stdout, each line prefixed with the stage's elapsed time (a line
    equal to the one before, as Ray sometimes forwards a worker's line twice, is only logged). With `ready`: set
    it at the line with which `ray start` says the cluster is up, and only log from there on (its hints, such as
    `ray stop`, are not for this cluster)."""
    shown = None
    with log:
        for line in stream:
            log.write(line)
            log.flush()
            line = line.rstrip()
            if ready is not None and "Ray runtime started" in line:
                ready.set()
            if line and line != shown and not (ready is not None and ready.is_set()):
                print(f"  {_clock(time.perf_counter() - t0)} │ {line}", flush=True)
                shown = line


@dataclass
class Pipeline:
    """Runs stages in order with a banner and elapsed times, one log per stage under out/logs, and a record of
    each for timings.json."""

    out: Path
    total: int
    env: dict[str, str]  # on top of os.environ for every stage (the cluster's address and token, once it runs)
    stages: list[dict[str, Any]] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)

    @contextlib.contextmanager
    def stage(self, name: str, argv: Optional[list[str]] = None) -> Iterator[Path]:
        """Banner, timing and status around a block; yields the stage's log path. `argv` of a `pfsr` command
        (or of another program, with its name first) is shown and recorded."""
        shown = shlex.join(argv if argv and argv[0] == "ray" else ["pfsr", *argv]) if argv else None
        at = _clock(time.perf_counter() - self.t0)
        print(f"\n━━ [{len(self.stages) + 1}/{self.total}] {name} ━━ (demo at {at})"
              + (f"\n   $ {shown}" if shown else ""), flush=True)
        record: dict[str, Any] = {"name": name, "command": shown, "status": "running", "seconds": 0.0}
        self.stages.append(record)
        log = self.out / "logs" / f"{len(self.stages):02d}-{name.replace(' ', '-')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        try:
            yield log
        except BaseException:
            record["status"] = "failed"
            raise
        finally:
            record["seconds"] = round(time.perf_counter() - start, 1)
        record["status"] = "ok"
        print(f"✓ {name} done in {_clock(record['seconds'])}", flush=True)

    def popen(self, argv: list[str], log_path: Path) -> tuple[subprocess.Popen, threading.Thread]:
        """`pfsr ARGV` started with its output streamed (by a thread) to the console and log_path."""
        proc = subprocess.Popen([sys.executable, "-m", "pfsr", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, **self.env}, cwd=REPO)
        thread = threading.Thread(target=_pump, args=(proc.stdout, open(log_path, "w"), time.perf_counter()),
                                  daemon=True)
        thread.start()
        return proc, thread

    def run(self, name: str, argv: list[str]) -> None:
        """`pfsr ARGV` to completion as one stage; StageFailed when it exits non-zero."""
        with self.stage(name, argv) as log:
            proc, pump = self.popen(argv, log)
            try:
                code = proc.wait()
                pump.join()
            except BaseException:
                _stop(proc)
                raise
            if code != 0:
                raise StageFailed(name, f"`pfsr {argv[0]}` exited with code {code}; its log: {log}")

    def timings(self, status: str, **extra: Any) -> dict[str, Any]:
        return {"status": status, "total_seconds": round(time.perf_counter() - self.t0, 1), "stages": self.stages,
                **extra}


# ---------------------------------------------------------------------------------------------------------------
# Data

def write_photos(dest: Path) -> dict[str, int]:
    """The skimage.data RGB photos as PNG into dest/{train,val} (VAL_PHOTOS held back); counts per split."""
    try:
        from skimage import data
    except ImportError:
        raise InputError("the bundled photos come from scikit-image: `pip install scikit-image` (or `make install`), "
                         "or pass --data with your own images") from None
    from PIL import Image

    counts = {"train": 0, "val": 0}
    for name in PHOTOS:
        image = getattr(data, name)()
        image = image[0] if name == "stereo_motorcycle" else image  # (left, right, disparity): the left view
        split = "val" if name in VAL_PHOTOS else "train"
        (dest / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(dest / split / f"{name}.png")
        counts[split] += 1
    return counts


def split_own_images(uri: str, dest: Path) -> dict[str, int]:
    """Copy the images under a local folder or s3:// prefix into dest/{train,val}: ordered by a hash of their
    relative path (stable when images are added), the first OWN_DATA_VAL_FRACTION (at least one, at most
    OWN_DATA_MAX_VAL) go to val. The files are copied as they are; `pfsr prep` decodes and rejects bad ones."""
    if not storage.exists(uri):
        raise InputError(f"--data {uri} does not exist")
    images = [e.path for e in storage.list_files(uri) if Path(e.path).suffix.lower() in IMAGE_SUFFIXES]
    if len(images) < 2:
        raise InputError(f"--data {uri}: found {len(images)} image(s) ({', '.join(sorted(IMAGE_SUFFIXES))}); the "
                         "demo needs at least 2, for training and validation")
    ranked = sorted(images, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    n_val = min(OWN_DATA_MAX_VAL, max(1, round(OWN_DATA_VAL_FRACTION * len(ranked))))
    for i, rel in enumerate(ranked):
        target = dest / ("val" if i < n_val else "train") / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(storage.join(uri, rel)))
    return {"train": len(ranked) - n_val, "val": n_val}


def stage_configs(out: Path, plan: Plan, shipped: Optional[Path] = None) -> tuple[Path, Path]:
    """The two training stages with the demo's step counts (written to out/configs for the record): fine-tuning
    the `shipped` checkpoint, its configs/pfsr_x4_small_encoder.yaml and, for the diffusion stage, the loss of its
    last stage (configs/pfsr_x4_small_quality.yaml: DSM plus the image-quality loss) with the checkpoint's own
    diffusion section (schedule, hybrid c, mean: the process its U-Net learned), both with FINE_TUNE's settings;
    without one, from scratch, configs/tiny{_encoder,}.yaml (DSM alone)."""
    from_scratch = shipped is None
    folder = out / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    tune = {} if from_scratch else FINE_TUNE
    encoder = {"base": str(TINY_ENCODER_CONFIG if from_scratch else SHIPPED_ENCODER_CONFIG), **tune,
               "train": {**tune.get("train", {}), "steps": plan.encoder_steps, "log_every": plan.log_every,
                         "checkpoint_every": plan.encoder_steps}}
    # Frozen encoder: the RRDB keeps its L1 regression (the baseline in the report) and each step is cheaper.
    diffusion = {"base": str(TINY_CONFIG if from_scratch else SHIPPED_QUALITY_CONFIG),
                 "model": {"freeze_encoder": True},
                 **({} if from_scratch else {"data": FINE_TUNE["data"],
                                             "diffusion": load(shipped, kind="serving")["config"]["diffusion"]}),
                 "train": {**tune.get("train", {}), "stage": "diffusion", "steps": plan.diffusion_steps,
                           "log_every": plan.log_every, "val_every": plan.val_every,
                           "checkpoint_every": plan.val_every}}
    paths = folder / "encoder.yaml", folder / "diffusion.yaml"
    for path, cfg in zip(paths, (encoder, diffusion)):
        path.write_text("# written by `pfsr demo`\n" + yaml.safe_dump(cfg, sort_keys=False))
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Serve

def _http(url: str, data: Optional[bytes] = None, timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "image/png"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StageFailed("serve", f"`pfsr serve` exited with code {proc.returncode} before {url} answered")
        with contextlib.suppress(OSError):
            if _http(url, timeout=2)[0] == 200:
                return
        time.sleep(1)
    raise StageFailed("serve", f"{url} did not answer 200 within {timeout_s:.0f} s")


def _first_photo(folder: Path) -> np.ndarray:
    """The first image under `folder` (sorted) that decodes, as HxWx3 uint8 RGB (your own data may hold files
    that `pfsr prep` rejected)."""
    from PIL import Image, UnidentifiedImageError

    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))
        except (OSError, UnidentifiedImageError):
            continue
    raise StageFailed("serve", f"no image in {folder} decodes")


def serve_request_image(val_dir: Path, lr_side: int, scale: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A held-back photo's central HR crop of lr_side * scale pixels and its LR (the training degradation, 8 bit)
    -> (LR PNG bytes, LR uint8 HxWx3, HR uint8 HxWx3)."""
    import torch
    from PIL import Image

    from ..degradation import degrade, to_uint8

    hr = _first_photo(val_dir)
    side = min(lr_side * scale, hr.shape[0] // scale * scale, hr.shape[1] // scale * scale)
    top, left = (hr.shape[0] - side) // 2, (hr.shape[1] - side) // 2
    hr = np.ascontiguousarray(hr[top:top + side, left:left + side])
    lr = to_uint8(degrade(torch.from_numpy(hr).permute(2, 0, 1)[None].float() / 255, scale))[0]
    lr = lr.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(lr).save(buf, format="PNG")
    return buf.getvalue(), lr, hr


def serve_and_upscale(pipe: Pipeline, checkpoint: Path, ray_address: str, val_dir: Path, plan: Plan,
                      scale: int) -> None:
    """Start `pfsr serve` on a free port, wait for /healthz, POST one LR image to /upscale, stop the server."""
    from PIL import Image

    port = _free_port()
    argv = ["serve", "--checkpoint", str(checkpoint), "--host", "127.0.0.1", "--port", str(port),
            "--ray-address", ray_address]
    with pipe.stage("serve", argv) as log:
        proc, pump = pipe.popen(argv, log)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_healthy(f"{base}/healthz", proc, HEALTH_TIMEOUT_S)
            print(f"  web page: {base}/ (open it while this stage runs)", flush=True)
            body, lr, hr = serve_request_image(val_dir, plan.serve_lr, scale)
            url = f"{base}/upscale?sampler=dpmpp_2m&steps=10&seed=0"
            print(f"  POST {url} ({lr.shape[1]}x{lr.shape[0]} PNG)", flush=True)
            t0 = time.perf_counter()
            status, headers, answer = _http(url, body, timeout=600)
            seconds = time.perf_counter() - t0
            if status != 200:
                raise StageFailed("serve", f"POST /upscale answered {status}: {answer[:300]!r}")
            sr = Image.open(io.BytesIO(answer))
            if sr.size != (lr.shape[1] * scale, lr.shape[0] * scale):
                raise StageFailed("serve", f"/upscale returned {sr.size[0]}x{sr.size[1]} for a "
                                           f"{lr.shape[1]}x{lr.shape[0]} input at x{scale}")
            out = pipe.out
            (out / "serve_sr.png").write_bytes(answer)
            Image.fromarray(lr).save(out / "serve_lr.png")
            Image.fromarray(hr).save(out / "serve_hr.png")
            lower = {k.lower(): v for k, v in headers.items()}
            info = {"url": url, "status": status, "seconds": round(seconds, 2),
                    "input_size": f"{lr.shape[1]}x{lr.shape[0]}", "output_size": f"{sr.size[0]}x{sr.size[1]}",
                    "nfe": lower.get("x-pfsr-nfe"), "batch": lower.get("x-pfsr-batch"),
                    "lr": "serve_lr.png", "sr": "serve_sr.png", "hr": "serve_hr.png"}
            (out / "serve.json").write_text(json.dumps(info, indent=2) + "\n")
            print(f"  {status} in {seconds:.1f} s: {info['output_size']} PNG -> {out / 'serve_sr.png'}", flush=True)
        finally:
            _stop(proc)
            pump.join(timeout=10)


# ---------------------------------------------------------------------------------------------------------------
# Cluster

@contextlib.contextmanager
def local_cluster(pipe: Pipeline) -> Iterator[str]:
    """`ray start --head --block` on free ports with its own temp dir; yields its GCS address (on 127.0.0.1).

    Every process of this cluster, and every stage, sees RAY_ADDRESS (Ray's own "auto" lookups, as Ray Train's
    placement-group cleaner does, would otherwise stop at other clusters on the machine) and a token of this
    demo (RAY_AUTH_MODE=token). `ray start` runs in a session of its own, so a Ctrl-C in the terminal reaches
    the stages first; then SIGINT to it stops its Ray processes (it ignores SIGTERM while it blocks), and
    whatever of its session outlives it is killed: this cluster's processes and no others.
    """
    temp_dir = tempfile.mkdtemp(prefix="pfsr-demo-ray-")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    # Serve's proxies on this cluster load PF-SR's layer (body cap, replay of a lost replica's request, JSON 503s).
    cluster_env = {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                   **proxy_env(ServeConfig())}
    # Logical CPUs, not cores: the stages run one after another, and Ray Train's 2 workers plus Ray Data's
    # tasks must fit on a 2-core machine (each worker sets its own torch threads).
    # The dashboard also serves the State API, which Ray Train's placement-group cleaner polls.
    dashboard_port = _free_port()
    argv = ["start", "--head", "--block", "--port", str(port), "--temp-dir",
            temp_dir, "--num-cpus", str(max(4, os.cpu_count() or 1)), "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--disable-usage-stats",
            "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
            "--metrics-export-port", str(_free_port())]
    started = threading.Event()
    with pipe.stage("ray start", ["ray", *argv]) as log:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("ray")), *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, **cluster_env},
                                start_new_session=True)
        pump = threading.Thread(target=_pump, args=(proc.stdout, open(log, "w"), time.perf_counter(), started),
                                daemon=True)
        pump.start()
        try:
            while not started.wait(0.5):
                if proc.poll() is not None:
                    raise StageFailed("ray start", f"exited with code {proc.returncode}; its log: {log}")
        except BaseException:
            _stop_cluster(proc)
            raise
    pipe.env.update(cluster_env)
    print(f"  local Ray cluster at {address}, dashboard http://127.0.0.1:{dashboard_port} (temp dir {temp_dir})",
          flush=True)
    try:
        yield address
    finally:
        _stop_cluster(proc)
        pump.join(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)
        print(f"Ray cluster at {address} shut down", flush=True)


def _stop_cluster(proc: subprocess.Popen) -> None:
    _stop(proc, signal.SIGINT)
    with contextlib.suppress(ProcessLookupError):  # its own session: the group id is its pid
        os.killpg(proc.pid, signal.SIGKILL)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------------------------------------------------------
# The demo

def evaluations(plan: Plan, shipped: bool) -> list[tuple[str, str, list[str]]]:
    """(name, checkpoint key, sampler flags) of every evaluation: the shipped model first, with the few-step
    solver at 10 steps (FINE_TUNE_SETTING) and PF-ODE (not in QUICK), then the demo model with PF-ODE and each few-step setting."""
    runs = []
    if shipped:
        runs += [("shipped-dpmpp_2m-10", "shipped", ["--sampler", "dpmpp_2m", "--steps", "10"])]
        runs += [("shipped-pf_ode", "shipped", ["--sampler", "pf_ode"])] if plan.shipped_pf_ode else []
    runs += [("demo-pf_ode", "demo", ["--sampler", "pf_ode"])]
    runs += [(f"demo-dpmpp_2m-{n}", "demo", ["--sampler", "dpmpp_2m", "--steps", str(n)]) for n in plan.few_steps]
    return runs


def model_descriptions(from_scratch: bool, shipped: Optional[Path], plan: Plan) -> dict[str, str]:
    """What each evaluated model is, in words (the report's labels)."""
    trained = (f"{plan.encoder_steps} encoder and {plan.diffusion_steps} diffusion steps"
               + ("" if from_scratch else " (DSM and the image-quality loss)") + " on the demo's training photos")
    shipped_text = ("the shipped model (models/pfsr_x4_small.pt, configs/pfsr_x4_small*.yaml), as distributed"
                    + ("" if from_scratch else ": the demo's model before its training"))
    demo_text = (f"the demo model trained from scratch (random weights, configs/tiny*.yaml) for {trained}"
                 if from_scratch else f"the demo model: the shipped model fine-tuned for {trained}")
    return {**({"shipped": shipped_text} if shipped else {}), "demo": demo_text}


def check_fine_tuning(out: Path, tolerance_db: float = FINE_TUNE_TOLERANCE_DB) -> dict[str, Any]:
    """Compare PSNR-Y of the demo model (after) with the shipped model it started from (before) at
    FINE_TUNE_SETTING on the same images -> fine_tuning.json; StageFailed when after < before - tolerance_db."""
    before, after = (json.loads((out / "eval" / f"{owner}-{FINE_TUNE_SETTING}" / "metrics.json").read_text())
                     for owner in ("shipped", "demo"))
    result = {"setting": FINE_TUNE_SETTING, "n_images": after["n_images"],
              "before_psnr_y": before["model"]["psnr_y"], "after_psnr_y": after["model"]["psnr_y"],
              "tolerance_db": tolerance_db}
    result["delta_db"] = result["after_psnr_y"] - result["before_psnr_y"]
    result["ok"] = result["delta_db"] >= -tolerance_db
    (out / "fine_tuning.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"  PSNR-Y {result['before_psnr_y']:.2f} dB before, {result['after_psnr_y']:.2f} dB after fine-tuning "
          f"({result['delta_db']:+.2f} dB; the demo fails below -{tolerance_db} dB)", flush=True)
    if not result["ok"]:
        raise StageFailed("check fine-tuning", f"fine-tuning lost {-result['delta_db']:.2f} dB PSNR-Y at "
                                               f"{FINE_TUNE_SETTING} (more than {tolerance_db} dB)")
    return result


def run_demo(out: Path, plan: Plan, data: Optional[str] = None, from_scratch: bool = False) -> int:
    import torch

    from ..config import load_config
    from ..report import machine_info

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    workers = min(plan.workers, gpus) if gpus else plan.workers  # one GPU per worker
    shipped = DEFAULT_CHECKPOINT if DEFAULT_CHECKPOINT.is_file() else None
    if shipped is None and not from_scratch:
        raise InputError(f"the demo fine-tunes the shipped model {DEFAULT_CHECKPOINT}, which is missing: restore it "
                         "(git checkout models/) or run `pfsr demo --from-scratch`")
    quick = plan is QUICK
    plan = plan if from_scratch else plan.fine_tuning()
    for name in OUTPUTS:  # only what an earlier demo wrote here
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    evals = evaluations(plan, shipped is not None)
    # Ray Data's progress bars redraw in place, which in a pipe makes a line per redraw; the stages log progress.
    env = {"PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "5", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    pipe = Pipeline(out=out, total=8 + len(evals) + (not from_scratch), env=env)
    info = {"data": data or "scikit-image photos (" + ", ".join(PHOTOS) + f"; val: {', '.join(VAL_PHOTOS)})",
            "quick": quick, "plan": asdict(plan), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": machine_info(), "gpus": gpus, "workers": workers, "from_scratch": from_scratch,
            "models": model_descriptions(from_scratch, shipped, plan)}
    print(f"PF-SR demo -> {out} ({'quick' if quick else 'full'} run, {f'{gpus} GPU' if gpus else 'CPU'}; "
          f"{'from scratch' if from_scratch else 'fine-tuning'} the shipped model: {shipped or 'not found'})",
          flush=True)
    status, failed = "failed", None
    previous = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM,)}
    try:
        with pipe.stage("data"):
            counts = split_own_images(data, out / "data") if data else write_photos(out / "data")
            print(f"  {counts['train']} training and {counts['val']} validation images in {out / 'data'}", flush=True)
        encoder_cfg, diffusion_cfg = stage_configs(out, plan, None if from_scratch else shipped)
        scale = load_config(diffusion_cfg).model.scale
        with local_cluster(pipe) as address:
            ray_flag = ["--ray-address", address]
            shards = out / "shards"
            pipe.run("prep train", ["prep", "--source", str(out / "data" / "train"), "--out", str(shards / "train"),
                                    "--layout", "folder", "--split", "train", "--min-shards", str(2 * workers),
                                    *ray_flag])
            pipe.run("prep val", ["prep", "--source", str(out / "data" / "val"), "--out", str(shards / "val"),
                                  "--layout", "folder", "--split", "val", "--patch", str(plan.val_patch),
                                  "--step", str(plan.val_patch), "--min-shards", "1", *ray_flag])
            runs = out / "runs"
            train_flags = ["--data", str(shards / "train"), "--workers", str(workers), "--storage", str(runs),
                           *(["--gpu"] if gpus else []), *ray_flag]
            pipe.run("train encoder", ["train", "--config", str(encoder_cfg), "--name", "demo-encoder",
                                       *([] if from_scratch else ["--init", str(shipped)]), *train_flags])
            pipe.run("train diffusion", ["train", "--config", str(diffusion_cfg), "--name", "demo-diffusion",
                                         "--val-data", str(shards / "val"), "--init", str(runs / "demo-encoder"),
                                         *train_flags])
            model = out / "models" / "pfsr_demo.pt"
            # The model after its whole step budget: a validation on a few crops is too noisy to pick a best one.
            pipe.run("export", ["export", "--run", str(runs / "demo-diffusion"), "--out", str(model),
                                "--which", "latest"])
            checkpoints = {"demo": model, "shipped": shipped}
            for name, key, sampler in evals:
                pipe.run(f"evaluate {name}", ["evaluate", "--checkpoint", str(checkpoints[key]), "--data",
                                              str(shards / "val"), "--out", str(out / "eval" / name),
                                              "--limit", str(plan.eval_limit), *sampler,
                                              *(["--gpus-per-replica", "1"] if gpus else []), *ray_flag])
            serve_and_upscale(pipe, model, address, out / "data" / "val", plan, scale)
        if not from_scratch:
            with pipe.stage("check fine-tuning"):
                check_fine_tuning(out)
        status = "ok"
    except StageFailed as e:
        failed = e.stage
        print(f"\n✗ {e}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        status, failed = "interrupted", next((s["name"] for s in pipe.stages if s["status"] != "ok"), None)
        print("\n✗ interrupted; stages stopped and the Ray cluster shut down", file=sys.stderr, flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if status != "ok" and failed is None:
            failed = next((s["name"] for s in pipe.stages if s["status"] != "ok"), None)
        report = write_report(out, pipe.timings(status, failed_stage=failed, **info))
    print(f"\n{'done' if status == 'ok' else status} in {_clock(time.perf_counter() - pipe.t0)}"
          + (f": open {report}" if report else ""), flush=True)
    return 0 if status == "ok" and report else (130 if status == "interrupted" else 1)


def write_report(out: Path, timings: dict[str, Any]) -> Optional[Path]:
    """loss_curves.json from the runs' TensorBoard files, timings.json, then report.html; None when that fails."""
    from ..report import build_report, read_scalars

    t0 = time.perf_counter()
    print("\n━━ report ━━", flush=True)
    try:
        curves = {stage: read_scalars(out / "runs" / f"demo-{stage}") for stage in ("encoder", "diffusion")
                  if (out / "runs" / f"demo-{stage}").is_dir()}
        (out / "loss_curves.json").write_text(json.dumps(curves) + "\n")
        (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
        path = build_report(out)
    except Exception as e:  # the report must not hide the stage that failed; say what broke it
        print(f"✗ report.html could not be built: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return None
    print(f"✓ {path} written in {_clock(time.perf_counter() - t0)}", flush=True)
    return path


def run_cli(args) -> int:
    return run_demo(Path(args.out).resolve(), QUICK if args.quick else FULL, args.data, args.from_scratch)
