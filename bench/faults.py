"""Faults on a multi-node local cluster (issue 16): a head and 3 worker nodes of 1 CPU (tests/multinode.py), one
whole worker node SIGKILLed in each scenario of tests/fault_scenarios.py (the scenarios tests/test_faults.py
checks). Per scenario: steps redone, samples lost (goal 0), duplicates (goal 0), requests by status code and
connection resets (the endpoint's scenario), seconds to recover, and the scenario's own checks.

seconds_to_recover: train, from the kill to the first step of the restarted worker group (rank 0's TensorBoard
wall time); prep and evaluate, from the kill to the end of the job (they have no progress signal of their own);
serve, from the kill until 2 replicas run again. S3: every request of the cluster passes a proxy that injects
500 / 503 SlowDown answers, connection resets and latency (tests/s3_faults.py); samples lost there are images
of the evaluation without a score. Serve: capacity over 10 s, then 60 s at twice that rate (the test: 20 s).

    python bench/faults.py        # writes bench/results/faults.json, prints the same JSON
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))  # the scenarios live beside the tests that check them

import torch  # noqa: E402

from _common import PHOTOS, load_photos, run_benchmark, write_result  # noqa: E402
from pfsr.checkpoint import save, serving_checkpoint, training_checkpoint  # noqa: E402
from pfsr.config import load_config  # noqa: E402
from pfsr.models.sr import build_model  # noqa: E402
from pfsr.train import make_state  # noqa: E402
from tests import fault_scenarios as fs  # noqa: E402
from tests.multinode import LocalCluster, free_port  # noqa: E402
from tests.s3_faults import FaultSchedule, S3FaultProxy  # noqa: E402

WORKER_NODES = 3
BUCKET = "pfsr-faults"


def figures(r: dict, *, steps_redone=None, seconds_to_recover: float) -> dict:
    """The common figures of one scenario, its own details after them."""
    return {"steps_redone": steps_redone, "samples_lost": r["samples_lost"], "goal_samples_lost": 0,
            "duplicates": r["duplicates"], "goal_duplicates": 0, "requests_by_status": {},
            "connection_resets": 0, "seconds_to_recover": seconds_to_recover, "details": r}


def serve_figures(r: dict) -> dict:
    """The endpoint's figures: answers by status, resets apart; its goals are no 500 and a JSON body on every
    answer other than 200 (samples lost and duplicates do not apply)."""
    return {"steps_redone": None, "samples_lost": None, "duplicates": None,
            "requests_by_status": r["requests_by_status"], "connection_resets": r["connection_resets"],
            "requests_500": r["requests_by_status"].get("500", 0), "goal_requests_500": 0,
            "answers_without_json_body": r["non_200_without_json"], "goal_answers_without_json_body": 0,
            "seconds_to_recover": r["seconds_to_2_replicas_again"], "details": r}


def s3_endpoint() -> tuple[object, S3FaultProxy]:
    """A moto S3 server on 127.0.0.1 behind the fault proxy; AWS_* of this process point at moto itself."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return server, S3FaultProxy(os.environ["AWS_ENDPOINT_URL"], FaultSchedule(seed=16, rate=0.1))


def main() -> dict:
    photos = dict(zip(PHOTOS, load_photos()))
    scenarios: dict = {}
    server, proxy = s3_endpoint()
    with tempfile.TemporaryDirectory(prefix="pfsr-faults-") as tmp:
        root = Path(tmp)
        logs = root / "logs"
        logs.mkdir()
        t0 = time.perf_counter()
        cluster = LocalCluster(root / "cluster", workers=WORKER_NODES, extra_env={"AWS_ENDPOINT_URL": proxy.url})
        started_s = time.perf_counter() - t0
        print(f"cluster of {WORKER_NODES} worker nodes up in {started_s:.0f} s", file=sys.stderr)

        def run(name: str, scenario) -> None:
            """One scenario on a whole cluster; a failure is recorded and the next scenario still runs."""
            cluster.replace_dead(WORKER_NODES)
            try:
                scenarios[name] = scenario()
            except Exception as e:  # noqa: BLE001 - reported in the result
                scenarios[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print(f"{name}: {json.dumps(scenarios[name])}", file=sys.stderr)

        source = fs.write_photos(photos, fs.TRAIN_PHOTOS, root / "photos")
        config = fs.train_config(root)
        model_config = load_config(BENCH.parent / "configs" / "tiny.yaml")
        torch.manual_seed(0)
        checkpoint = root / "tiny_x4.pt"
        save(serving_checkpoint(training_checkpoint(make_state(build_model(model_config), model_config),
                                                    model_config)), checkpoint)

        def prep() -> dict:
            r = fs.prep_node_death(cluster, source, reference, root / "prep_killed", logs)
            return figures(r, seconds_to_recover=r["seconds_kill_to_done"])

        def train() -> dict:
            whole = fs.train_reference(cluster, config, reference, root / "runs", logs)
            cluster.replace_dead(WORKER_NODES)
            r = fs.train_node_death(cluster, config, reference, root / "runs", whole, logs)
            return figures(r, steps_redone=r["steps_redone_at_least"], seconds_to_recover=r["seconds_to_recover"])

        def evaluate() -> dict:
            r = fs.evaluate_node_death(cluster, checkpoint, fs.write_eval_images(photos["coffee"], root / "eval_in"),
                                       root / "eval", logs)
            return figures(r, seconds_to_recover=r["seconds_kill_to_done"])

        def s3() -> dict:
            r = fs.s3_faults(cluster, proxy.schedule, BUCKET, source, reference, config,
                             fs.write_eval_images(photos["coffee"][:192, :288], root / "s3_images"), logs)
            return figures({"samples_lost": r["images"] - r["scored"], **r}, seconds_to_recover=None)

        def serve() -> dict:
            r = fs.serve_node_death(cluster, checkpoint, root, logs, load_s=60, capacity_s=10)
            return serve_figures(r)

        try:
            reference = fs.prep_reference(cluster, source, root / "prep_whole", logs)
            for name, scenario in [("prep_node", prep), ("train_node", train), ("evaluate_replica_node", evaluate),
                                   ("serve_replica_node", serve), ("s3_faults", s3)]:
                run(name, scenario)
        finally:
            cluster.shutdown()
            proxy.stop()
            server.stop()
    return write_result({"worker_nodes": WORKER_NODES, "cpus_per_worker_node": 1, "cluster_start_s":
                         round(started_s, 1), "scenarios": scenarios}, BENCH / "results" / "faults.json")


if __name__ == "__main__":
    run_benchmark(main)
