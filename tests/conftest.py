"""Shared fixtures: one local S3 endpoint (moto server on 127.0.0.1) and one local Ray cluster per session,
and the photos that scikit-image ships."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest

RGB_PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
              "retina", "stereo_motorcycle"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module of small tensors: more only spin against each other on 2 shared
    cores (modules opt in with pytestmark = pytest.mark.usefixtures("one_torch_thread"))."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint; the AWS_* variables point boto3, pyarrow and Ray workers at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket per test; returns its name."""
    import boto3

    name = "pfsr-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One local Ray cluster for the whole session (started after the S3 endpoint, so workers see AWS_*)."""
    import ray

    # Serve's proxies load PF-SR's proxy layer from their node's environment, as under `pfsr serve`
    saved = os.environ.get("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH")
    os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = "pfsr.pipeline.proxy.proxy_middlewares"
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "platform")}})
    if saved is None:
        os.environ.pop("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH")
    else:
        os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = saved
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """name -> HxWx3 uint8 RGB photo from skimage.data."""
    from skimage import data

    loaded = {name: getattr(data, name)() for name in RGB_PHOTOS}
    # stereo_motorcycle() returns (left, right, disparity): keep the left view
    return {name: img[0] if isinstance(img, tuple) else img for name, img in loaded.items()}


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory, photos) -> Path:
    """A folder of the RGB photos as PNG (the bundled demo data)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    for name, img in photos.items():
        Image.fromarray(img).save(root / f"{name}.png")
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A serving checkpoint of configs/tiny.yaml at its seeded initialization (loads in a second; its samples
    test plumbing, not quality)."""
    import torch

    from pfsr.checkpoint import save, serving_checkpoint, training_checkpoint
    from pfsr.config import load_config
    from pfsr.models.sr import build_model
    from pfsr.train import make_state

    config = load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("checkpoint") / "tiny_x4.pt"
    save(serving_checkpoint(training_checkpoint(make_state(build_model(config), config), config)), path)
    return path


@pytest.fixture(scope="session")
def s3_fault_proxy(s3_endpoint):
    """A reverse proxy in front of the S3 endpoint that injects faults on a seeded schedule once its
    `schedule.enabled` is set (tests/s3_faults.py); the multi-node cluster reaches S3 only through it."""
    from tests.s3_faults import FaultSchedule, S3FaultProxy

    proxy = S3FaultProxy(s3_endpoint, FaultSchedule(seed=16, rate=0.1))
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def multinode_cluster(s3_fault_proxy, tmp_path_factory):
    """A head (no CPUs: drivers and controllers) and 3 worker nodes of 1 CPU, each its own Ray node with its own
    ports (tests/multinode.py), shared by the fault tests; its nodes and drivers reach S3 through s3_fault_proxy."""
    from tests.multinode import LocalCluster

    cluster = LocalCluster(tmp_path_factory.mktemp("multinode"), workers=3,
                           extra_env={"AWS_ENDPOINT_URL": s3_fault_proxy.url})
    yield cluster
    cluster.shutdown()
