"""Ray Serve endpoint: `POST /upscale` (PNG or JPEG bytes -> the upscaled PNG), `GET /healthz`, and `GET /`: a
public web page (pfsr/assets/index.html) that uploads an image to /upscale and shows the result beside bicubic.

Query parameters of /upscale: `sampler` (a key of pfsr.sampling.SAMPLERS, default serve.default_sampler),
`steps` (fixed-step samplers; default serve.default_steps for the default sampler, else the sampler's own default,
pfsr.sampling.DEFAULT_STEPS; pf_ode without steps is adaptive dopri5; invsr takes 1-5 and a checkpoint with an
inverter), `order` (mrs_sde only: 1 or 2, default 2), `rtol` and `atol` (adaptive pf_ode only), `seed` (default 0).
The response carries X-PFSR-NFE, X-PFSR-Seconds (solver time of its batch) and X-PFSR-Batch (how many requests
shared the solve).

Batching: requests meet in `@serve.batch` (serve.max_batch_size, serve.batch_wait_timeout_s) and are grouped by
(sampler settings, size bucket) in `pfsr.pipeline.batching`: each request keeps its own seed and padding, adaptive
and stochastic solvers run item by item, so a caller's result does not depend on who else is in the batch.
Inputs larger than serve.tile LR pixels go through overlapping tiles with blended seams.

Status codes: 400 undecodable body, unknown or out-of-range parameters, or a solve that needs more than
serve.max_nfe network evaluations; 401 missing or wrong bearer token when the environment variable named by
serve.token_env is set on the replica (also for /docs, /redoc and /openapi.json); 413 more than serve.max_pixels
input pixels; 415 a content type or image format other than PNG/JPEG; 503 overload (Serve's max_queued_requests
backpressure, with Retry-After) or a solve longer than serve.max_seconds. In front of the replicas, Serve's proxies
run pfsr.pipeline.proxy (body cap, replay after a lost replica, JSON 503s with Retry-After, token on /-/routes).
"""
# No `from __future__ import annotations`: FastAPI must see the real `Request` class in the handlers' signatures.
import asyncio
import dataclasses
import hmac
import io
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import yaml
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from .. import storage
from ..checkpoint import load_model
from ..config import ConfigError, ServeConfig, load_config
from ..errors import InputError
from ..images import ImageRejected, decode_image, read_header
from ..inference import check_sampler, resolve_device, to_image
from ..sampling import DEFAULT_STEPS, SAMPLERS
from .batching import SolverSettings, WorkItem, effective_bucket, plan_groups, run_group
from .proxy import max_body_bytes, proxy_env

log = logging.getLogger("pfsr.serve")

DEPLOYMENT_NAME = "PFSRUpscaler"  # cluster/serve.yaml's deployments: entry overrides its options by this name
ACCEPTED_TYPES = {"image/png", "image/jpeg", "image/jpg"}
SNIFFED_TYPES = {"", "application/octet-stream"}  # no declared type: the image header decides
ACCEPTED_FORMATS = {"PNG", "JPEG"}
QUERY_PARAMS = ("sampler", "steps", "rtol", "atol", "seed", "order")
# dopri5 in float32 fails below ~1e-6 ("underflow in dt") and is meaningless above 1e-1.
TOLERANCE_RANGE = (1e-5, 1e-1)
MAX_SEED = 2**63 - 1
RETRY_AFTER_S = 1

# the docs routes are the replica's own (below), behind the bearer token like /upscale
api = FastAPI(title="PF-SR", description="Diffusion super-resolution (probability-flow sampling)", docs_url=None,
              redoc_url=None, openapi_url=None)


def page_html(cfg: ServeConfig, scale: int) -> str:
    """The web page (pfsr/assets/index.html) with this application's samplers, default sampler and steps, scale."""
    from html import escape
    from importlib import resources

    options = "".join(f'<option value="{escape(name)}"{" selected" if name == cfg.default_sampler else ""}>'
                      f"{escape(name)}</option>" for name in SAMPLERS)
    page = resources.files("pfsr").joinpath("assets", "index.html").read_text(encoding="utf-8")
    return (page.replace("__SAMPLER_OPTIONS__", options).replace("__DEFAULT_STEPS__", str(cfg.default_steps))
            .replace("__SCALE__", str(scale)))


class RequestError(Exception):
    """A request that gets a 4xx/5xx answer with a one-line message (never a 500)."""

    def __init__(self, status: int, message: str, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message}, status_code=self.status, headers=self.headers)


@dataclass
class Budget:
    """Per-request caps, checked at every network evaluation of its solve."""

    max_nfe: int
    deadline: float
    max_seconds: float
    nfe: int = 0


@dataclass
class Job:
    item: WorkItem
    alpha: Any  # h x w uint8 or None


@dataclass
class Outcome:
    png: bytes
    nfe: int
    seconds: float
    batch: int


def parse_params(query: dict[str, str], cfg: ServeConfig, *, has_inverter: bool = False
                 ) -> tuple[SolverSettings, int]:
    """Query parameters -> (SolverSettings, seed); RequestError(400) names the parameter that is wrong.
    has_inverter: whether the served model can run sampler invsr."""
    unknown = sorted(set(query) - set(QUERY_PARAMS))
    if unknown:
        raise RequestError(400, f"unknown query parameter {unknown[0]!r}; known: {', '.join(QUERY_PARAMS)}")

    def number(name: str, kind: type, lo: float, hi: float) -> Any:
        try:
            value = kind(query[name])
        except ValueError:
            raise RequestError(400, f"{name}={query[name]!r} is not {'an integer' if kind is int else 'a number'}")
        if not lo <= value <= hi:
            raise RequestError(400, f"{name}={value} is out of range [{lo:g}, {hi:g}]")
        return value

    method = query.get("sampler", cfg.default_sampler)
    if method not in SAMPLERS:
        raise RequestError(400, f"sampler={method!r} is unknown; choose one of {', '.join(sorted(SAMPLERS))}")
    steps = number("steps", int, 1, cfg.max_nfe) if "steps" in query else None
    tolerances = [name for name in ("rtol", "atol") if name in query]
    if tolerances and (method != "pf_ode" or steps is not None):
        raise RequestError(400, f"{tolerances[0]} applies to the adaptive pf_ode sampler only (without steps)")
    rtol = number("rtol", float, *TOLERANCE_RANGE) if "rtol" in query else 1e-4
    atol = number("atol", float, *TOLERANCE_RANGE) if "atol" in query else 1e-4
    if steps is None and method != "pf_ode":
        steps = cfg.default_steps if method == cfg.default_sampler else DEFAULT_STEPS[method]
    order = number("order", int, -MAX_SEED, MAX_SEED) if "order" in query else None
    try:
        check_sampler(method, steps, order, has_inverter=has_inverter)
    except InputError as e:
        raise RequestError(400, str(e)) from None
    seed = number("seed", int, 0, MAX_SEED) if "seed" in query else 0
    return SolverSettings(method=method, steps=steps, rtol=rtol, atol=atol, order=order), seed


def decode_upload(body: bytes, content_type: str, cfg: ServeConfig):
    """Request body -> DecodedImage (sRGB, alpha split off); RequestError 400/413/415."""
    ctype = content_type.split(";")[0].strip().lower()
    if ctype not in ACCEPTED_TYPES | SNIFFED_TYPES:
        raise RequestError(415, f"unsupported content type {ctype!r}: send PNG or JPEG bytes "
                                "(Content-Type image/png or image/jpeg)")
    if not body:
        raise RequestError(400, "empty body: send PNG or JPEG bytes")
    try:
        # header only (sizes before any pixel is decoded); the pixel cap below gives 413, not this guard
        header = read_header(body, "upload", max_pixels=sys.maxsize)
    except ImageRejected as e:
        status = 413 if e.reason.startswith(("too many pixels", "decompression bomb")) else 400
        raise RequestError(status, f"cannot decode the body: {e.reason}") from None
    if header.format not in ACCEPTED_FORMATS:
        raise RequestError(415, f"the body is a {header.format or 'unknown'} image: send PNG or JPEG")
    pixels = header.width * header.height
    if pixels > cfg.max_pixels:
        raise RequestError(413, f"{header.width}x{header.height} = {pixels} pixels is more than the maximum "
                                f"{cfg.max_pixels} (serve.max_pixels)")
    try:
        return decode_image(body, "upload", max_pixels=cfg.max_pixels)
    except ImageRejected as e:
        raise RequestError(400, f"cannot decode the body: {e.reason}") from None


class Engine:
    """The model side of a replica, without Serve: jobs -> outcomes under the per-request caps. A forward
    pre-hook on the U-Net charges every network evaluation to the running solve's Budget."""

    def __init__(self, checkpoint: str, cfg: ServeConfig, device: Optional[str] = None):
        self.cfg = cfg
        self.device = resolve_device(device)
        self.model = load_model(storage.read_bytes(checkpoint), self.device, name=checkpoint)
        self.bucket = effective_bucket(self.model, cfg.size_bucket)
        self.budget: Optional[Budget] = None
        self.model.unet.register_forward_pre_hook(self._charge)

    def run(self, jobs: list[Job]) -> list[Outcome | RequestError]:
        outcomes: list[Outcome | RequestError | None] = [None] * len(jobs)
        for group in plan_groups([j.item for j in jobs], bucket=self.bucket, tile=self.cfg.tile):
            t0 = time.perf_counter()
            self.budget = Budget(self.cfg.max_nfe, t0 + self.cfg.max_seconds, self.cfg.max_seconds)
            try:
                results = run_group(self.model, [jobs[i].item for i in group], bucket=self.bucket,
                                    tile=self.cfg.tile, overlap=self.cfg.tile_overlap,
                                    memory_budget_mb=self.cfg.memory_budget_mb)
            except RequestError as e:
                for i in group:
                    outcomes[i] = e
                continue
            finally:
                self.budget = None
            seconds = time.perf_counter() - t0
            for i, (sr, nfe) in zip(group, results):
                buf = io.BytesIO()
                to_image(sr, jobs[i].alpha, self.model.scale).save(buf, format="PNG", compress_level=1)
                outcomes[i] = Outcome(buf.getvalue(), nfe, seconds, len(group))
        return outcomes

    def _charge(self, module, args) -> None:
        budget = self.budget
        if budget is None:
            return
        budget.nfe += 1
        if budget.nfe > budget.max_nfe:
            raise RequestError(400, f"the solve needs more than serve.max_nfe = {budget.max_nfe} network "
                                    "evaluations; use fewer steps, a looser rtol/atol or a smaller image")
        if time.perf_counter() > budget.deadline:
            raise RequestError(503, f"the solve took longer than serve.max_seconds = {budget.max_seconds:g} s",
                               {"Retry-After": str(RETRY_AFTER_S)})


@serve.deployment(name=DEPLOYMENT_NAME, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class Upscaler:
    """One model replica. `serve_config`: ServeConfig fields as a dict; `checkpoint`: local path or s3:// URI."""

    def __init__(self, checkpoint: str, serve_config: dict[str, Any], device: Optional[str] = None):
        import ray

        self.cfg = ServeConfig(**serve_config)
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))  # the replica's share, not every core of the node
        self.engine = Engine(checkpoint, self.cfg, device)
        self.token = os.environ.get(self.cfg.token_env) or None
        self.page_html = page_html(self.cfg, self.engine.model.scale)
        self._solve.set_max_batch_size(self.cfg.max_batch_size)
        self._solve.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        log.info("PF-SR replica: %s on %s, x%d, batches of <= %d, bucket %d, auth %s", checkpoint,
                 self.engine.device, self.engine.model.scale, self.cfg.max_batch_size, self.engine.bucket,
                 "on" if self.token else "off")

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(self) -> HTMLResponse:
        return HTMLResponse(self.page_html)  # public: no token (the page asks for one and sends it to /upscale)

    @api.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "scale": self.engine.model.scale, "device": str(self.engine.device),
                "default_sampler": self.cfg.default_sampler, "default_steps": self.cfg.default_steps,
                "inverter": self.engine.model.inverter is not None}

    @api.get("/openapi.json", include_in_schema=False)
    def openapi(self, request: Request) -> Response:
        return self._guarded(request, lambda: JSONResponse(api.openapi()))

    @api.get("/docs", include_in_schema=False)
    def docs(self, request: Request) -> Response:
        url = request.scope.get("root_path", "").rstrip("/") + "/openapi.json"
        return self._guarded(request, lambda: get_swagger_ui_html(openapi_url=url, title=api.title))

    @api.get("/redoc", include_in_schema=False)
    def redoc(self, request: Request) -> Response:
        url = request.scope.get("root_path", "").rstrip("/") + "/openapi.json"
        return self._guarded(request, lambda: get_redoc_html(openapi_url=url, title=api.title))

    @api.post("/upscale")
    async def upscale(self, request: Request) -> Response:
        try:
            self._authorize(request.headers.get("authorization", ""))
            settings, seed = parse_params(dict(request.query_params), self.cfg,
                                          has_inverter=self.engine.model.inverter is not None)
            length = int(request.headers.get("content-length") or 0)
            if length > self._max_body_bytes():
                raise RequestError(413, f"body of {length} bytes is larger than {self._max_body_bytes()} bytes")
            decoded = decode_upload(await request.body(), request.headers.get("content-type", ""), self.cfg)
            lr = torch.from_numpy(decoded.rgb).permute(2, 0, 1).float().div(255).to(self.engine.device)
            outcome = await self._solve(Job(WorkItem(lr, seed, settings), decoded.alpha))
        except RequestError as e:
            return e.response()
        if isinstance(outcome, RequestError):
            return outcome.response()
        headers = {"X-PFSR-NFE": str(outcome.nfe), "X-PFSR-Seconds": f"{outcome.seconds:.3f}",
                   "X-PFSR-Batch": str(outcome.batch), "X-PFSR-Sampler": settings.method}
        notes = decoded.notes + ([self.engine.model.adaptive.describe()] if self.engine.model.adaptive else [])
        if notes:
            headers["X-PFSR-Notes"] = "; ".join(notes).encode("ascii", "replace").decode()
        return Response(outcome.png, media_type="image/png", headers=headers)

    def _max_body_bytes(self) -> int:
        return max_body_bytes(self.cfg.max_pixels)

    def _guarded(self, request: Request, page) -> Response:
        try:
            self._authorize(request.headers.get("authorization", ""))
        except RequestError as e:
            return e.response()
        return page()

    def _authorize(self, header: str) -> None:
        if self.token is None:
            return
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise RequestError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                               {"WWW-Authenticate": "Bearer"})

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def _solve(self, jobs: list[Job]) -> list[Outcome | RequestError]:
        # the solve runs in a thread, so the replica keeps answering /healthz and filling the next batch
        return await asyncio.to_thread(self.engine.run, jobs)


def serve_config(config: Optional[str] = None, overrides: Optional[dict[str, Any]] = None) -> ServeConfig:
    """The serve: section of a YAML config (None: defaults) with `overrides` {field: value}; values given as
    strings (`serve run ... max_batch_size=8`) are read as YAML scalars."""
    parsed = {f"serve.{k}": yaml.safe_load(v) if isinstance(v, str) else v for k, v in (overrides or {}).items()}
    cfg = load_config(config, parsed).serve
    if cfg.default_sampler not in SAMPLERS:
        raise ConfigError(f"serve.default_sampler: unknown sampler {cfg.default_sampler!r}")
    if cfg.min_replicas < 1 or cfg.max_replicas < cfg.min_replicas:
        raise ConfigError(f"serve.max_replicas: need 1 <= min_replicas <= max_replicas, got "
                          f"{cfg.min_replicas}, {cfg.max_replicas}")
    return cfg


def build_app(checkpoint: str, cfg: ServeConfig, *, device: Optional[str] = None,
              ray_actor_options: Optional[dict[str, Any]] = None) -> Application:
    """The bound application: replica limits, backpressure and autoscaling from `cfg`."""
    options: dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S),
        # a replica is busy at about one full batch in flight
        "autoscaling_config": {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                               "target_ongoing_requests": max(1, min(cfg.max_batch_size, cfg.max_ongoing_requests))},
    }
    if ray_actor_options is not None:
        options["ray_actor_options"] = {"num_cpus": 1, **ray_actor_options}
    if cfg.max_ongoing_requests < cfg.max_batch_size:
        log.warning("serve.max_ongoing_requests (%d) < serve.max_batch_size (%d): batches never fill",
                    cfg.max_ongoing_requests, cfg.max_batch_size)
    return Upscaler.options(**options).bind(checkpoint, dataclasses.asdict(cfg), device)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point of `serve run` / `serve deploy` (cluster/serve.yaml): args `checkpoint` (local path or s3://,
    required), `config` (a YAML whose serve: section applies), `device`, and any serve.* field as an override."""
    args = dict(args)
    checkpoint = args.pop("checkpoint", None)
    if not checkpoint:
        raise InputError("app_builder: args.checkpoint (an exported checkpoint, local path or s3://) is required")
    config, device = args.pop("config", None), args.pop("device", None)
    return build_app(str(checkpoint), serve_config(config, args), device=device)


def run_cli(args) -> int:
    """`pfsr serve`: start (or join) Ray, run the application at http://HOST:PORT/ and block until Ctrl-C."""
    import ray

    from ..inference import resolve_checkpoint

    cfg = serve_config(args.config)
    checkpoint = args.checkpoint if args.checkpoint and storage.is_s3(args.checkpoint) else \
        str(resolve_checkpoint(args.checkpoint).resolve())
    if not storage.is_file(checkpoint):
        raise InputError(f"checkpoint {checkpoint} does not exist")
    load_model(storage.read_bytes(checkpoint), name=checkpoint)  # a bad checkpoint fails here, not in a replica
    # Serve's proxies read these from their node's environment: the Ray started here inherits them; the nodes
    # of a cluster started elsewhere need them set there (cluster/aws.yaml, the KubeRay manifests).
    os.environ.update(proxy_env(cfg))
    if not ray.is_initialized():
        ray.init(address=args.ray_address)
    token = os.environ.get(cfg.token_env)
    # replicas of a cluster that was already running do not see this shell's environment: pass the token on
    actor_options = {"runtime_env": {"env_vars": {cfg.token_env: token}}} if token else None
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(checkpoint, cfg, ray_actor_options=actor_options), name="pfsr", route_prefix="/")
    print(f"PF-SR serving {checkpoint} at http://{args.host}:{args.port}/upscale (GET /healthz; bearer token "
          f"{'required' if token else 'off'}); web page http://{args.host}:{args.port}/ ; Ctrl-C to stop", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill`, docker stop: shut down as on Ctrl-C
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()
