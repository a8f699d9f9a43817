"""Seeds 001 (invsr) and 003 (mrs_sde) through `pfsr upscale`, `pfsr evaluate` (Ray Data) and an HTTP request to
the Serve endpoint, on the shared local cluster. The checkpoint is configs/tiny_inversion.yaml at its seeded
initialization (the inverter starts at mean 0, logvar 0): its samples test plumbing, not quality; the trained
inverter goes through `pfsr train` in tests/test_train_ray.py."""
from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from pfsr import cli
from pfsr.checkpoint import load_model, save, serving_checkpoint, training_checkpoint
from pfsr.config import ServeConfig, load_config
from pfsr.inference import super_resolve_tiled
from pfsr.models.sr import build_model
from pfsr.pipeline.evaluate import image_seed
from pfsr.pipeline.serve import RequestError, build_app, parse_params
from pfsr.train import make_state

pytestmark = pytest.mark.ray

ROOT = Path(__file__).parents[1]
SERVE = dict(max_batch_size=4, batch_wait_timeout_s=0.2, max_pixels=48 * 48, tile=32, tile_overlap=8, size_bucket=8,
             max_nfe=40, token_env="PFSR_UNSET_TOKEN", min_replicas=1, max_replicas=1)


@pytest.fixture(scope="module")
def inversion_checkpoint(tmp_path_factory) -> Path:
    config = load_config(ROOT / "configs" / "tiny_inversion.yaml")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inv") / "tiny_inversion.pt"
    save(serving_checkpoint(training_checkpoint(make_state(build_model(config), config), config)), path)
    return path


@pytest.fixture(scope="module")
def lr_png(photos, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lr") / "coffee.png"
    Image.fromarray(np.ascontiguousarray(photos["coffee"][200:220, 300:324])).save(path)
    return path


def test_upscale_cli_runs_both_samplers_and_refuses_bad_settings(inversion_checkpoint, tiny_checkpoint, lr_png,
                                                                 tmp_path, capsys):
    model = load_model(inversion_checkpoint)
    lr = torch.from_numpy(np.asarray(Image.open(lr_png))).permute(2, 0, 1)[None].float() / 255
    for name, flags, method, steps, order in (("invsr", ["--sampler", "invsr"], "invsr", None, None),
                                              ("mrs", ["--sampler", "mrs_sde", "--steps", "3", "--order", "1"],
                                               "mrs_sde", 3, 1)):
        out = tmp_path / f"{name}.png"
        assert cli.main(["upscale", str(lr_png), str(out), "--checkpoint", str(inversion_checkpoint), *flags]) == 0
        got = np.asarray(Image.open(out))
        sr, _ = super_resolve_tiled(model, lr, method=method, steps=steps, order=order, seed=0)
        expect = (sr[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert got.shape == (80, 96, 3) and np.abs(got.astype(int) - expect).max() <= 1
    bad = [(["--checkpoint", str(tiny_checkpoint), "--sampler", "invsr"], "train.stage: inversion"),
           (["--checkpoint", str(inversion_checkpoint), "--sampler", "invsr", "--steps", "6"], "1 to 5 steps"),
           (["--checkpoint", str(inversion_checkpoint), "--sampler", "mrs_sde", "--order", "3"],
            "order must be 1 or 2"),
           (["--checkpoint", str(inversion_checkpoint), "--sampler", "dpmpp_2m", "--order", "2"], "mrs_sde")]
    for flags, message in bad:
        out = tmp_path / "bad.png"
        assert cli.main(["upscale", str(lr_png), str(out), *flags]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_evaluate_reports_the_sampler_order_and_mean(ray_cluster, inversion_checkpoint, tiny_checkpoint, photos,
                                                     tmp_path, capsys):
    hr = tmp_path / "hr"
    hr.mkdir()
    Image.fromarray(np.ascontiguousarray(photos["chelsea"][100:164, 150:214])).save(hr / "chelsea.png")
    out = tmp_path / "mrs"
    assert cli.main(["evaluate", "--checkpoint", str(inversion_checkpoint), "--data", str(hr), "--out", str(out),
                     "--sampler", "mrs_sde", "--steps", "2", "--order", "1"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert (report["sampler"], report["steps"], report["order"], report["diffusion_mean"]) == ("mrs_sde", 2, 1,
                                                                                                "bicubic")
    assert report["model"]["nfe"] == 2
    out = tmp_path / "invsr"
    assert cli.main(["evaluate", "--checkpoint", str(inversion_checkpoint), "--data", str(hr), "--out", str(out),
                     "--sampler", "invsr"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["sampler"] == "invsr" and report["model"]["nfe"] == 1
    # the replica's sample is `pfsr upscale`'s of the same seed
    model = load_model(inversion_checkpoint)
    from pfsr.degradation import degrade, to_uint8
    from pfsr.metrics import psnr

    img = np.asarray(Image.open(hr / "chelsea.png"))
    lr = degrade(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255, 4)
    sr, _ = super_resolve_tiled(model, lr, method="invsr", seed=image_seed(0, "chelsea"))
    expect = psnr(to_uint8(sr[0]).permute(1, 2, 0).numpy(), img, 4, test_y_channel=True)
    assert report["model"]["psnr_y"] == pytest.approx(expect, abs=0.02)
    assert cli.main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(hr), "--out",
                     str(tmp_path / "no"), "--sampler", "invsr"]) == 2
    assert "train.stage: inversion" in capsys.readouterr().err


def test_parse_params_order_and_invsr_rules():
    cfg = ServeConfig(**SERVE)
    settings, _ = parse_params({"sampler": "mrs_sde", "order": "1"}, cfg)
    assert (settings.method, settings.steps, settings.order) == ("mrs_sde", 10, 1)
    settings, _ = parse_params({"sampler": "invsr"}, cfg, has_inverter=True)
    assert settings.steps == 1  # invsr's own default, not serve.default_steps
    for query, has_inverter, message in (({"sampler": "invsr"}, False, "train.stage: inversion"),
                                         ({"sampler": "invsr", "steps": "6"}, True, "1 to 5 steps"),
                                         ({"sampler": "mrs_sde", "order": "3"}, True, "order must be 1 or 2"),
                                         ({"sampler": "unipc", "order": "2"}, True, "mrs_sde sampler only")):
        with pytest.raises(RequestError, match=message) as info:
            parse_params(query, cfg, has_inverter=has_inverter)
        assert info.value.status == 400


def test_http_requests_to_serve(ray_cluster, inversion_checkpoint, photos):
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(str(inversion_checkpoint), ServeConfig(**SERVE)), name="pfsr-seeds", route_prefix="/seeds")
    url = f"http://127.0.0.1:{port}/seeds/upscale"
    try:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(photos["rocket"][200:216, 200:220])).save(buf, format="PNG")
        body = buf.getvalue()

        def post(params):
            return httpx.post(url, content=body, params=params, headers={"Content-Type": "image/png"}, timeout=120)

        r = post({"sampler": "invsr"})
        assert r.status_code == 200 and r.headers["X-PFSR-NFE"] == "1", r.text
        assert Image.open(io.BytesIO(r.content)).size == (80, 64)
        r = post({"sampler": "mrs_sde", "steps": "3", "order": "1", "seed": "4"})
        assert r.status_code == 200 and r.headers["X-PFSR-NFE"] == "3", r.text
        again = post({"sampler": "mrs_sde", "steps": "3", "order": "1", "seed": "4"})
        assert again.content == r.content  # noise from the request's seed
        for params, message in (({"sampler": "invsr", "steps": "6"}, "1 to 5 steps"),
                                ({"sampler": "mrs_sde", "order": "5"}, "order must be 1 or 2"),
                                ({"sampler": "dpmpp_2m", "order": "2"}, "mrs_sde sampler only")):
            r = post(params)
            assert r.status_code == 400 and message in r.json()["error"], r.text
    finally:
        serve.shutdown()  # the next module starts Serve on a port of its own
