"""The Ray Serve endpoint on the shared local cluster, over real HTTP on 127.0.0.1, with crops of real photos."""
from __future__ import annotations

import io
import os
import select
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from pfsr.config import ConfigError, ServeConfig
from pfsr.pipeline.serve import DEPLOYMENT_NAME, Engine, Job, RequestError, app_builder, build_app, serve_config
from pfsr.pipeline.batching import SolverSettings, WorkItem
from pfsr.pipeline.proxy import max_body_bytes
from tests.zoo import bomb_png, linear_rgb_icc

pytestmark = pytest.mark.ray

ROOT = Path(__file__).parents[1]
TOKEN = "test-token-7d1f"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAST = {"sampler": "dpmpp_2m", "steps": "2"}
# small enough for 2 CPU cores: 2304 input pixels at most, tiles of 32 LR pixels, 8-pixel size buckets
SERVE = dict(max_batch_size=4, batch_wait_timeout_s=0.5, max_pixels=48 * 48, tile=32, tile_overlap=8, size_bucket=8,
             max_nfe=40, token_env="PFSR_TEST_TOKEN", min_replicas=1, max_replicas=1)


def _png(img: np.ndarray | Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, format=save.pop("format", "PNG"),
                                                                        **save)
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def crops(photos) -> dict[str, np.ndarray]:
    """LR-sized crops of the photos: 16x20 (one tile), and 40x44 (tiled)."""
    out = {}
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        img = photos[name]
        h, w = img.shape[0] // 2, img.shape[1] // 2
        out[name] = np.ascontiguousarray(img[h:h + 16, w:w + 20])
    out["large"] = np.ascontiguousarray(photos["astronaut"][180:220, 200:244])
    return out


@pytest.fixture(scope="module")
def endpoint(ray_cluster, tiny_checkpoint):
    """Two applications on one Serve instance: the main one (bearer token on) and a tiny-queue one for overload."""
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    token_env = {"runtime_env": {"env_vars": {"PFSR_TEST_TOKEN": TOKEN}}}
    serve.run(build_app(str(tiny_checkpoint), ServeConfig(**SERVE), ray_actor_options=token_env),
              name="pfsr-test", route_prefix="/pfsr")
    tight = ServeConfig(**{**SERVE, "max_batch_size": 1, "max_ongoing_requests": 1, "max_queued_requests": 1,
                           "token_env": "PFSR_UNSET_TOKEN"})
    serve.run(build_app(str(tiny_checkpoint), tight), name="pfsr-overload", route_prefix="/overload")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _post(url: str, body: bytes, params: dict | None = None, headers: dict | None = None) -> httpx.Response:
    headers = {**AUTH, "Content-Type": "image/png", **(headers or {})}
    return httpx.post(url, content=body, params=params or FAST, headers=headers, timeout=120)


def test_healthz(endpoint):
    r = httpx.get(f"{endpoint}/pfsr/healthz", timeout=30)
    assert r.status_code == 200 and r.json()["scale"] == 4


def test_upscale_returns_scale_times_the_input(endpoint, crops):
    for name, params in (("astronaut", FAST), ("large", {"sampler": "unipc", "steps": "2"})):
        r = _post(f"{endpoint}/pfsr/upscale", _png(crops[name]), params)
        assert r.status_code == 200, r.text
        out = Image.open(io.BytesIO(r.content))
        h, w = crops[name].shape[:2]
        assert (out.format, out.mode, out.size) == ("PNG", "RGB", (4 * w, 4 * h))
    assert r.headers["X-PFSR-NFE"] == "2"  # the large one: 2 x 2 overlapping tiles, solved as one batch of 4


def test_rgba_keeps_alpha_and_icc_jpeg_becomes_srgb(endpoint, crops):
    rgba = np.dstack([crops["coffee"], np.full(crops["coffee"].shape[:2], 77, np.uint8)])
    r = _post(f"{endpoint}/pfsr/upscale", _png(rgba))
    assert r.status_code == 200, r.text
    out = np.asarray(Image.open(io.BytesIO(r.content)))
    assert out.shape == (64, 80, 4) and np.all(out[..., 3] == 77)  # constant alpha stays constant
    gray = Image.new("RGB", (20, 16), (128, 128, 128))
    jpeg = _png(gray, format="JPEG", quality=95, icc_profile=linear_rgb_icc())
    r = _post(f"{endpoint}/pfsr/upscale", jpeg, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    assert "converted to sRGB" in r.headers["X-PFSR-Notes"]


def test_bad_uploads_get_their_4xx(endpoint, crops):
    url, good = f"{endpoint}/pfsr/upscale", _png(crops["chelsea"])
    truncated = good[: len(good) // 2]
    gif = _png(crops["chelsea"], format="GIF")
    cases = [
        ("garbage", dict(body=b"these bytes are not an image"), 400, "cannot decode"),
        ("truncated", dict(body=truncated), 400, "cannot decode"),
        ("empty", dict(body=b""), 400, "empty body"),
        ("gif", dict(body=gif), 415, "GIF"),
        ("text/plain", dict(body=good, headers={"Content-Type": "text/plain"}), 415, "content type"),
        ("too many pixels", dict(body=_png(np.zeros((64, 64, 3), np.uint8))), 413, "serve.max_pixels"),
        ("bomb header", dict(body=bomb_png(30000, 30000)), 413, "pixels"),
        ("no token", dict(body=good, headers={"Authorization": ""}), 401, "bearer token"),
        ("wrong token", dict(body=good, headers={"Authorization": "Bearer nope"}), 401, "bearer token"),
        ("steps 0", dict(body=good, params={"steps": "0"}), 400, "steps=0 is out of range"),
        ("steps over max_nfe", dict(body=good, params={"steps": "41"}), 400, "out of range"),
        ("steps not int", dict(body=good, params={"steps": "ten"}), 400, "not an integer"),
        ("unknown sampler", dict(body=good, params={"sampler": "euler"}), 400, "unknown"),
        ("rtol with fixed steps", dict(body=good, params={"sampler": "dpmpp_2m", "rtol": "1e-3"}), 400, "pf_ode"),
        ("rtol too tight", dict(body=good, params={"sampler": "pf_ode", "rtol": "1e-9"}), 400, "rtol"),
        ("typo", dict(body=good, params={"step": "2"}), 400, "unknown query parameter 'step'"),
        ("seed negative", dict(body=good, params={**FAST, "seed": "-1"}), 400, "seed"),
        # rk4: 4 evaluations a step, 48 > serve.max_nfe = 40, stopped by the U-Net hook
        ("nfe cap at run time", dict(body=good, params={"sampler": "pf_ode", "steps": "12"}), 400, "max_nfe"),
    ]
    for name, kwargs, status, message in cases:
        r = _post(url, kwargs["body"], kwargs.get("params"), kwargs.get("headers"))
        assert r.status_code == status, (name, r.status_code, r.text)
        assert message in r.json()["error"], (name, r.text)
    assert httpx.post(url, content=good, headers={"Content-Type": "image/png"}, timeout=60).headers[
        "WWW-Authenticate"] == "Bearer"


def test_a_result_does_not_depend_on_its_batch_mates(endpoint, crops):
    url = f"{endpoint}/pfsr/upscale"
    alone = _post(url, _png(crops["rocket"]), {**FAST, "seed": "7"})
    assert alone.status_code == 200 and alone.headers["X-PFSR-Batch"] == "1"
    # the same request among others of the same bucket, with other seeds and images, sent at once
    requests = [(crops["rocket"], "7"), (crops["astronaut"], "7"), (crops["coffee"], "1"), (crops["rocket"], "8")]
    with ThreadPoolExecutor(len(requests)) as pool:
        replies = list(pool.map(lambda rq: _post(url, _png(rq[0]), {**FAST, "seed": rq[1]}), requests))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    assert max(int(r.headers["X-PFSR-Batch"]) for r in replies) > 1, "the requests were never batched"
    a = np.asarray(Image.open(io.BytesIO(alone.content))).astype(int)
    b = np.asarray(Image.open(io.BytesIO(replies[0].content))).astype(int)
    other_seed = np.asarray(Image.open(io.BytesIO(replies[3].content))).astype(int)
    # equal up to the float order of a batched convolution (one 8-bit level); another seed differs visibly
    assert np.abs(a - b).max() <= 1
    assert np.abs(a - other_seed).mean() > 1


def _check_503(r: httpx.Response) -> None:
    """Every 503, the replica's or the proxy's: Retry-After and the JSON error body."""
    assert r.headers.get("Retry-After", "").isdigit() and r.headers["content-type"] == "application/json", r.headers
    assert r.json()["error"], r.text


def test_overload_gives_503_not_500_nor_a_hang(endpoint, crops):
    """40 concurrent requests at one replica that takes one request at a time and queues one more."""
    body = _png(crops["astronaut"])
    with ThreadPoolExecutor(40) as pool:
        replies = list(pool.map(lambda _: _post(f"{endpoint}/overload/upscale", body), range(40)))
    codes = [r.status_code for r in replies]
    counts = {c: codes.count(c) for c in set(codes)}
    assert set(counts) <= {200, 503}, counts
    assert counts.get(503, 0) > 0 and counts.get(200, 0) > 0, counts
    for r in replies:
        if r.status_code == 503:  # Serve's backpressure answer, made JSON by the proxy layer
            _check_503(r)


def _chunked_upload(base: str, path: str, limit: int, headers: dict) -> tuple[int, int, bytes]:
    """POST a chunked body of up to `limit` zero bytes, stopping when an answer comes -> (bytes sent, status,
    answer body)."""
    from http.client import HTTPResponse

    host, port = base[len("http://"):].split(":")
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    chunk, sent = b"\0" * 65536, 0
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n{lines}\r\n".encode())
        while sent < limit and not select.select([s], [], [], 0.002)[0]:
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        answer = HTTPResponse(s)
        answer.begin()
        return sent, answer.status, answer.read()


def test_a_chunked_upload_past_the_cap_gets_413_at_once(endpoint):
    """No Content-Length: the proxy layer counts the streamed bytes and answers 413 as they pass its cap (the
    default, from serve.max_pixels), long before the 64 MiB that a client may send."""
    cap = max_body_bytes(ServeConfig().max_pixels)
    sent, status, body = _chunked_upload(endpoint, "/pfsr/upscale", 64 << 20, {**AUTH, "Content-Type": "image/png"})
    assert status == 413, (status, body[:300])
    assert f"larger than {cap} bytes" in httpx.Response(413, content=body).json()["error"]
    assert cap < sent < cap + (8 << 20), (sent, cap)  # what was in flight when the answer came, not 64 MiB


def test_docs_need_the_token(endpoint):
    for path in ("/pfsr/docs", "/pfsr/redoc", "/pfsr/openapi.json"):
        r = httpx.get(f"{endpoint}{path}", timeout=30)
        assert r.status_code == 401 and "bearer token" in r.json()["error"], (path, r.status_code)
        assert httpx.get(f"{endpoint}{path}", headers=AUTH, timeout=30).status_code == 200, path
    spec = httpx.get(f"{endpoint}/pfsr/openapi.json", headers=AUTH, timeout=30).json()
    assert "/upscale" in spec["paths"] and "/docs" not in spec["paths"]
    assert httpx.get(f"{endpoint}/overload/docs", timeout=30).status_code == 200  # no token set: open


def test_a_lost_replica_never_surfaces_as_500(endpoint, tiny_checkpoint, crops):
    """SIGKILL one of 2 replicas with requests in flight: its requests are replayed on the other replica (the
    same seeded result) or answered 503 with Retry-After, never 500."""
    import ray
    from ray import serve

    two = ServeConfig(**{**SERVE, "max_batch_size": 1, "min_replicas": 2, "max_replicas": 2,
                         "token_env": "PFSR_UNSET_TOKEN"})
    serve.run(build_app(str(tiny_checkpoint), two, ray_actor_options={"num_cpus": 0.5}), name="pfsr-kill",
              route_prefix="/kill")
    url, body, params = f"{endpoint}/kill/upscale", _png(crops["coffee"]), {"sampler": "dpmpp_2m", "steps": "10"}
    alone = _post(url, body, params)
    assert alone.status_code == 200, alone.text
    pids = [a["Pid"] for a in ray._private.state.actors().values()
            if a["ActorClassName"].startswith("ServeReplica:pfsr-kill") and a["State"] == "ALIVE"]
    assert len(pids) == 2, pids
    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(_post, url, body, params) for _ in range(6)]
            time.sleep(1.0)
            os.kill(pids[0], signal.SIGKILL)
            replies = [f.result() for f in futures]
    finally:
        serve.delete("pfsr-kill")
    codes = [r.status_code for r in replies]
    replayed = sum(r.headers.get("X-PFSR-Replayed") == "1" for r in replies)
    assert set(codes) <= {200, 503}, [(r.status_code, r.headers, r.text[:200]) for r in replies if r.status_code != 200]
    print(f"replica killed: {codes.count(200)} x 200 ({replayed} replayed), {codes.count(503)} x 503")
    assert replayed + codes.count(503) > 0, ("the kill hit no request in flight", codes)
    for r in replies:
        if r.status_code == 503:
            _check_503(r)
        else:  # one request at a time per replica: the same bytes as the request alone
            assert r.content == alone.content


def test_caps_on_nfe_and_time_inside_a_replica(tiny_checkpoint, crops):
    """The replica's engine without Serve: a pf_ode solve past max_nfe -> 400, a solve past max_seconds -> 503."""
    import torch

    engine = Engine(str(tiny_checkpoint), ServeConfig(**{**SERVE, "max_nfe": 6, "max_seconds": 600.0}))
    lr = torch.from_numpy(crops["coffee"]).permute(2, 0, 1).float() / 255
    jobs = [Job(WorkItem(lr, 0, SolverSettings("pf_ode", steps=2)), None),  # rk4: 8 evaluations
            Job(WorkItem(lr, 0, SolverSettings("dpmpp_2m", steps=3)), None)]
    over, ok = engine.run(jobs)
    assert isinstance(over, RequestError) and over.status == 400 and "max_nfe = 6" in over.message
    assert ok.nfe == 3 and ok.png.startswith(b"\x89PNG")
    engine.cfg.max_seconds = 0.0
    (late,) = engine.run(jobs[1:])
    assert isinstance(late, RequestError) and late.status == 503 and late.headers["Retry-After"]


def test_cluster_serve_yaml_is_a_valid_serve_config_that_builds():
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    config = yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())
    deploy = ServeDeploySchema.model_validate(config)
    for app in deploy.applications:
        ServeApplicationSchema.model_validate(app.model_dump(exclude_unset=True))
        built = import_attr(app.import_path)(app.args)  # the app builder validates every serve.* arg
        assert built._bound_deployment.name == DEPLOYMENT_NAME
        assert [d.name for d in app.deployments] == [DEPLOYMENT_NAME]
        (d,) = app.deployments
        assert d.autoscaling_config["min_replicas"] <= d.autoscaling_config["max_replicas"]
        assert d.max_ongoing_requests >= serve_config(None, {k: v for k, v in app.args.items()
                                                             if k != "checkpoint"}).max_batch_size


def test_app_builder_checks_its_args():
    with pytest.raises(ConfigError, match="did you mean 'max_batch_size'"):
        app_builder({"checkpoint": "model.pt", "max_batch": "8"})
    with pytest.raises(Exception, match="checkpoint"):
        app_builder({})
    app = app_builder({"checkpoint": "model.pt", "max_batch_size": "8", "max_ongoing_requests": "16"})
    assert app._bound_deployment._deployment_config.max_ongoing_requests == 16


def test_pfsr_serve_loads_the_proxy_layer_into_the_ray_it_starts(tiny_checkpoint, tmp_path):
    """`pfsr serve` on a Ray of its own (a subprocess) sets the proxies' environment: the token guards the proxy's
    /-/routes and the docs, /healthz stays public, and a chunked upload past the cap (serve.max_pixels of the
    config) gets 413."""
    port = _free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"serve": {"max_pixels": 64 * 64, "min_replicas": 1, "max_replicas": 1}}))
    env = {**os.environ, "PFSR_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "serve.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "pfsr", "serve", "--checkpoint", str(tiny_checkpoint),
                                 "--config", str(config), "--port", str(port), "--ray-address", "local"], env=env,
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        while "PF-SR serving" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(1)
        base = f"http://127.0.0.1:{port}"
        for path in ("/-/routes", "/docs", "/openapi.json"):
            r = httpx.get(base + path, timeout=30)
            assert r.status_code == 401 and "bearer token" in r.json()["error"], (path, r.status_code, r.text)
            assert httpx.get(base + path, headers=AUTH, timeout=30).status_code == 200, path
        assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200
        cap = max_body_bytes(64 * 64)
        sent, status, body = _chunked_upload(base, "/upscale", 64 << 20, {**AUTH, "Content-Type": "image/png"})
        assert status == 413 and f"larger than {cap} bytes" in body.decode(), (status, body[:200])
    finally:
        proc.send_signal(signal.SIGTERM)  # pfsr serve shuts Serve and its own Ray down
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
