#!/usr/bin/env bash
# Install this project into the current Python of a cluster node or image (cluster/aws.yaml, cluster/kuberay/Dockerfile).
#   cluster/install.sh cpu   torch's CPU build, pinned by constraints/cpu.txt as the Makefile does
#   cluster/install.sh gpu   the same torch version in pip's default build (CUDA), pinned by constraints/gpu.txt
# Both install the package itself (not only a job's runtime_env): Serve's HTTP proxies import its middleware.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  # On PyPI, Linux torch wheels are CUDA builds; the CPU build (torch==X+cpu, which the ==X pin accepts and
  # prefers) lives on PyTorch's own index.
  cpu) pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -c constraints/cpu.txt -e . ;;
  gpu) pip install --no-cache-dir -c constraints/gpu.txt -e . ;;
  *) echo "usage: $0 cpu|gpu" >&2; exit 2 ;;
esac
# lpips only for its released linear-layer weights (LPIPS in `pfsr evaluate`): its metadata requires
# torchvision, which is never installed.
pip install --no-cache-dir --no-deps lpips==0.1.4
