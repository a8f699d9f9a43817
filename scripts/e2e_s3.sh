#!/usr/bin/env bash
# The whole pipeline through S3 and `ray job submit`, on one machine: a local S3 endpoint (infra/local-s3), a
# local Ray head (`ray start --head`), then the stages of the README's "Run on a cluster" as Ray jobs with
# cluster/runtime_env.yaml: data prep from local photos (scikit-image's) to s3://, training that reads the
# shards from S3 and checkpoints to S3, export, and evaluation of the S3 checkpoint. Every job must end
# SUCCEEDED; the script prints the metrics.json it reads back from S3 and exits 0. Its `e2e: job ID: STATUS (N s)`
# lines and the one-line `e2e: metrics.json {...}` are what tests/test_e2e_s3.py reads.
#
#   . .venv/bin/activate && scripts/e2e_s3.sh
#
# STEPS (training steps, default 20) and WORKERS (training workers, default 2) size the run; KEEP=1 keeps the
# work directory (logs, Ray session) for a look afterwards. Ray and the S3 endpoint are stopped on exit. The
# validation photos are cut into 192x192 sub-images and evaluation takes two of them with a 4-step sampler: whole
# photos through the U-Net's attention take GBs and many minutes per image on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-20}
WORKERS=${WORKERS:-2}
BUCKET=pfsr-e2e
WORK=$(mktemp -d /tmp/pfsr-e2e.XXXXXX)
PIDS=()

cleanup() {
  # The S3 endpoint and `ray start --block` both stop what they started on SIGTERM.
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ "${KEEP:-0}" == 1 ]]; then echo "e2e: work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_for() {  # wait_for PID WHAT COMMAND...: until COMMAND succeeds, failing if PID dies first
  local pid=$1 what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || { echo "e2e: $what exited before it was ready; see $WORK" >&2; KEEP=1; exit 1; }
    sleep 0.5
  done
}

echo "e2e: work directory $WORK"
echo "e2e: local S3 endpoint"
python infra/local-s3/run.py --port 0 --bucket "$BUCKET" > "$WORK/s3.env" 2> "$WORK/s3.log" &
PIDS+=($!)
wait_for "${PIDS[-1]}" "the S3 endpoint" grep -q '^# ready' "$WORK/s3.env"
# shellcheck disable=SC1090
source <(grep '^export ' "$WORK/s3.env")

echo "e2e: Ray head (its workers inherit the AWS_* settings above)"
# Token authentication with a token of this run's own: the head and every client here read these two.
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')
export RAY_AUTH_TOKEN
DASHBOARD_PORT=$(free_port)
ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
# Own ports throughout, so that another Ray on this machine is neither joined nor disturbed. On exit every job has
# ended: no 30 s drain before the head stops.
RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 ray start --head --block --num-cpus 4 --temp-dir "$WORK/ray" --port "$(free_port)" \
    --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --ray-client-server-port "$(free_port)" \
    --dashboard-agent-listen-port "$(free_port)" > "$WORK/ray.log" 2>&1 &
PIDS+=($!)
wait_for "${PIDS[-1]}" "ray start" ray job list --address "$ADDRESS"

submit() {  # submit ID COMMAND...: one stage as a Ray job, which must end SUCCEEDED
  local id=$1 start=$SECONDS; shift
  echo "e2e: job $id: $*"
  ray job submit --address "$ADDRESS" --submission-id "$id" \
      --runtime-env cluster/runtime_env.yaml --working-dir . -- "$@" > "$WORK/$id.log" 2>&1 \
    || { tail -n 40 "$WORK/$id.log" >&2; }
  local status
  status=$(python -c 'import sys; from ray.job_submission import JobSubmissionClient as C
print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)' "$ADDRESS" "$id")
  echo "e2e: job $id: $status ($((SECONDS - start)) s)"
  [[ "$status" == SUCCEEDED ]] || { echo "e2e: job $id did not succeed; its log: $WORK/$id.log" >&2; KEEP=1; exit 1; }
}

echo "e2e: photos"
python - "$WORK/photos" <<'EOF'
import sys
from pathlib import Path

from PIL import Image
from skimage import data

# Disjoint splits: the prep job reports HR content shared between splits.
splits = {"train": ["astronaut", "retina", "rocket", "hubble_deep_field", "immunohistochemistry"],
          "val": ["chelsea", "coffee"]}
for split, names in splits.items():
    (Path(sys.argv[1]) / split).mkdir(parents=True)
    for name in names:
        Image.fromarray(getattr(data, name)()).save(Path(sys.argv[1]) / split / f"{name}.png")
EOF

S3=s3://$BUCKET
submit prep-train python data_prep/shard.py --source "$WORK/photos/train" --out "$S3/shards/train" \
    --layout folder --split train --patch 128 --step 128
submit prep-val python data_prep/shard.py --source "$WORK/photos/val" --out "$S3/shards/val" \
    --layout folder --split val --patch 192 --step 192
submit train python jobs/train.py --config configs/tiny.yaml --data "$S3/shards/train" --val-data "$S3/shards/val" \
    --workers "$WORKERS" --steps "$STEPS" --storage "$S3/runs" --name e2e
submit export pfsr export --run "$S3/runs/e2e" --out "$S3/models/e2e.pt"
submit evaluate python jobs/evaluate.py --checkpoint "$S3/models/e2e.pt" --data "$S3/shards/val" \
    --out "$S3/results/e2e" --sampler dpmpp_2m --steps 4 --limit 2

echo "e2e: $S3/results/e2e/metrics.json"
python - "$BUCKET" <<'EOF'
import json
import math
import sys

import boto3

metrics = json.loads(boto3.client("s3").get_object(Bucket=sys.argv[1], Key="results/e2e/metrics.json")["Body"].read())
print("e2e: metrics.json", json.dumps(metrics))
assert metrics["n_images"] >= 1 and math.isfinite(metrics["model"]["psnr_y"]), "metrics.json without results"
EOF
echo "e2e: all jobs SUCCEEDED"
