"""Load on the Serve endpoint at 127.0.0.1: throughput, p50/p99 latency and counts by status code, batched
(serve.max_batch_size 8) against unbatched (max_batch_size 1), 16 concurrent clients, the few-step sampler.

Goal (issue 6): on a GPU, batched >= 3x unbatched throughput (the card is named in the result); on CPU the ratio
is reported (a CPU convolution costs about the same per image at any batch size, so expect little). Both
settings are deployed side by side (one replica each) on a local Ray cluster and warmed up; then, in rounds that
alternate between them so that the machine's changing load hits both alike, every client sends `--requests`
requests back to back (bounded: clients x requests x rounds per setting). X-PFSR-Batch gives the mean batch a
request shared. The model is configs/tiny.yaml at seeded init (timing does not depend on the weights) unless
--checkpoint is given; inputs are `--size` x `--size` crops of the astronaut (one size bucket).

    python bench/serve_load.py [--clients 16] [--requests 1] [--rounds 3] [--size 24] [--steps 4] [--checkpoint FILE]

Prints one JSON object and writes it to bench/results/serve_load.json.
"""
from __future__ import annotations

import argparse
import io
import platform
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import ray
import torch
from PIL import Image
from ray import serve

from _common import run_benchmark, write_result
from pfsr.checkpoint import save, serving_checkpoint, training_checkpoint
from pfsr.config import ServeConfig, load_config
from pfsr.models.sr import build_model
from pfsr.pipeline.serve import build_app
from pfsr.train import make_state

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "serve_load.json"
GOAL_RATIO_GPU = 3.0


def tiny_checkpoint(folder: Path) -> Path:
    config = load_config(ROOT / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    path = folder / "tiny_x4.pt"
    save(serving_checkpoint(training_checkpoint(make_state(build_model(config), config), config)), path)
    return path


def inputs(n: int, size: int) -> list[bytes]:
    """n different size x size PNG crops of the astronaut (one size bucket: all can share a batch)."""
    from skimage import data

    img = data.astronaut()
    out = []
    for i in range(n):
        y, x = 40 + 37 * (i % 8), 60 + 41 * (i // 8)
        buf = io.BytesIO()
        Image.fromarray(img[y:y + size, x:x + size]).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_load(url: str, bodies: list[bytes], clients: int, requests: int, params: dict) -> dict:
    """Every client sends `requests` requests back to back; -> throughput, latencies, status counts."""

    def client(i: int) -> list[tuple[int, float, int]]:
        out = []
        with httpx.Client(timeout=600) as http:
            for j in range(requests):
                t0 = time.perf_counter()
                try:
                    r = http.post(url, content=bodies[(i + j) % len(bodies)], params=params,
                                  headers={"Content-Type": "image/png"})
                    code, batch = r.status_code, int(r.headers.get("X-PFSR-Batch", 0))
                except httpx.HTTPError:
                    code, batch = -1, 0  # no answer at all: a hang or a dropped connection
                out.append((code, time.perf_counter() - t0, batch))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    return summarize(results, time.perf_counter() - t0)


def summarize(results: list[tuple[int, float, int]], wall: float) -> dict:
    ok = [s for code, s, _ in results if code == 200]
    batches = [b for code, _, b in results if code == 200]
    codes: dict[str, int] = {}
    for code, _, _ in results:
        codes[str(code)] = codes.get(str(code), 0) + 1
    return {"requests": len(results), "wall_s": round(wall, 3), "throughput_rps": round(len(ok) / wall, 3),
            "latency_p50_s": round(percentile(ok, 50), 3), "latency_p99_s": round(percentile(ok, 99), 3),
            "latency_mean_s": round(statistics.fmean(ok), 3) if ok else None, "status_counts": codes,
            "mean_batch": round(statistics.fmean(batches), 2) if batches else None, "_results": results}


def merge(rounds: list[dict]) -> dict:
    """Rounds of one setting -> one summary over all their requests and wall time."""
    merged = summarize([r for stats in rounds for r in stats["_results"]], sum(s["wall_s"] for s in rounds))
    del merged["_results"]
    return merged


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=1, help="requests per client and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=24, help="input side in LR pixels")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--replica-cpus", type=float, default=1)
    args = p.parse_args()

    gpu = torch.cuda.is_available()
    port = free_port()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    bodies = inputs(args.clients, args.size)
    params = {"sampler": args.sampler, "steps": str(args.steps)}
    result: dict = {"clients": args.clients, "requests_per_client": args.requests * args.rounds,
                    "input": f"{args.size}x{args.size} -> x4", "sampler": args.sampler, "steps": args.steps,
                    "device": torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.processor() or 'cpu'})",
                    "replica_cpus": args.replica_cpus, "settings": {}}
    settings = {"batched": args.max_batch_size, "unbatched": 1}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or str(tiny_checkpoint(Path(tmp)))
        result["checkpoint"] = args.checkpoint or "configs/tiny.yaml at seeded init"
        for name, batch in settings.items():
            cfg = ServeConfig(max_batch_size=batch, batch_wait_timeout_s=0.02, max_ongoing_requests=args.clients,
                              max_queued_requests=-1, max_pixels=max(args.size**2, 64 * 64), min_replicas=1,
                              max_replicas=1, max_nfe=1000, max_seconds=600.0)
            options = {"num_cpus": args.replica_cpus, "num_gpus": 1 if gpu else 0}
            serve.run(build_app(checkpoint, cfg, ray_actor_options=options), name=name, route_prefix=f"/{name}")
            run_load(f"{base}/{name}/upscale", bodies, args.clients, 1, params)  # warm-up: one request per client
        # rounds alternate between the settings, so that a change in the machine's load hits both alike
        rounds: dict[str, list[dict]] = {name: [] for name in settings}
        for r in range(args.rounds):
            for name in settings:
                stats = run_load(f"{base}/{name}/upscale", bodies, args.clients, args.requests, params)
                rounds[name].append(stats)
                print(f"round {r + 1}/{args.rounds} {name}: {stats['throughput_rps']} req/s, "
                      f"p50 {stats['latency_p50_s']} s, p99 {stats['latency_p99_s']} s, {stats['status_counts']}",
                      file=sys.stderr, flush=True)
        for name, batch in settings.items():
            result["settings"][name] = {"max_batch_size": batch, **merge(rounds[name])}
    serve.shutdown()
    ray.shutdown()
    b, u = result["settings"]["batched"], result["settings"]["unbatched"]
    result["batched_over_unbatched"] = round(b["throughput_rps"] / u["throughput_rps"], 3)
    result["goal"] = f">= {GOAL_RATIO_GPU}x on a GPU" + ("" if gpu else "; on CPU the ratio is reported")
    result["goal_met"] = result["batched_over_unbatched"] >= GOAL_RATIO_GPU if gpu else None
    return result


if __name__ == "__main__":
    run_benchmark(lambda: write_result(main(), RESULT))
