"""PF-SR's layer in Ray Serve's HTTP proxy: an ASGI middleware that every node's proxy loads through Serve's
callback hook, `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=pfsr.pipeline.proxy.proxy_middlewares`, set in the
environment of every node (`pfsr serve` sets it for the Ray it starts; cluster/aws.yaml and the KubeRay manifests
for theirs). A Serve application's runtime_env does not reach the proxies, so this module comes from the
installed package or image.

Why in the proxy: in Ray 2.60 both the proxy and the replica read the whole request body into memory before the
handler runs, and a request whose replica dies after accepting it ends in a bodiless text/plain 500 written by
the proxy. So, in front of every replica:
  - body cap: a request body (streamed or chunked too) larger than PFSR_MAX_BODY_BYTES gets 413 as soon as the
    bytes read pass the cap; the replica keeps its own checks (serve.max_pixels).
  - a lost replica: the body is buffered (it is within the cap), so `POST .../upscale` (seeded, hence idempotent)
    and GET/HEAD are replayed once when the first try got no answer or a non-JSON 500; otherwise, or when the
    replay fails too, 503 with Retry-After.
  - every 503 the proxy itself writes (backpressure, no replica, unhealthy) is rewritten to the JSON body
    `{"error": ...}` and given Retry-After.
  - with a bearer token in the proxy's environment (the variable named by PFSR_TOKEN_ENV, default PFSR_TOKEN),
    the API's metadata (`/-/routes`, `.../docs`, `.../redoc`, `.../openapi.json`) needs it; `/upscale` is checked
    by the replica, and `GET /`, `/healthz` and the proxy's `/-/healthz` stay public.
Every answer of this layer is JSON `{"error": ...}`, like the replica's.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
from typing import Any, Awaitable, Callable

from starlette.middleware import Middleware

from ..config import ServeConfig

log = logging.getLogger("pfsr.proxy")

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "pfsr.pipeline.proxy.proxy_middlewares"
MAX_BODY_ENV = "PFSR_MAX_BODY_BYTES"
TOKEN_ENV_ENV = "PFSR_TOKEN_ENV"  # the name of the variable that holds the bearer token (serve.token_env)
RETRY_AFTER_S = 1
GUARDED_SUFFIXES = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
PROXY_ROUTES = "/-/routes"

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def max_body_bytes(max_pixels: int) -> int:
    """The largest request body worth reading for an image of `max_pixels`: an encoded image is at most about
    its raw RGBA size."""
    return 4 * max_pixels + (1 << 20)


def proxy_env(cfg: ServeConfig) -> dict[str, str]:
    """The environment that loads this layer into Serve's proxies with `cfg`'s cap and token variable."""
    return {CALLBACK_ENV: CALLBACK, MAX_BODY_ENV: str(max_body_bytes(cfg.max_pixels)), TOKEN_ENV_ENV: cfg.token_env}


def proxy_middlewares() -> list[Middleware]:
    """Serve's proxy callback: the middlewares, configured from the proxy's environment."""
    cap = int(os.environ.get(MAX_BODY_ENV) or max_body_bytes(ServeConfig().max_pixels))
    token = os.environ.get(os.environ.get(TOKEN_ENV_ENV) or ServeConfig().token_env) or None
    log.info("PF-SR proxy layer: body cap %d bytes, token %s", cap, "on" if token else "off")
    return [Middleware(ProxyGuard, max_body=cap, token=token)]


async def send_error(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _header(scope: dict, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


class ProxyGuard:
    """The ASGI middleware (see the module docstring). `max_body`: bytes; `token`: bearer token or None."""

    def __init__(self, app, *, max_body: int, token: str | None = None):
        self.app, self.max_body, self.token = app, max_body, token

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if self.token and (path == PROXY_ROUTES or path.endswith(GUARDED_SUFFIXES)) and not self._authorized(scope):
            await send_error(send, 401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                             {"WWW-Authenticate": "Bearer"})
            return
        too_large = f"request body larger than {self.max_body} bytes: send a smaller image (serve.max_pixels)"
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > self.max_body:
            await send_error(send, 413, too_large)
            return
        body, more = bytearray(), True
        while more:  # chunked uploads too: stop reading as soon as the cap is passed
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                await send_error(send, 413, too_large)
                return
        replayable = method in ("GET", "HEAD") or (method == "POST" and path.endswith("/upscale"))
        for attempt in (1, 2):
            if await self._forward(scope, bytes(body), receive, send, replay=attempt > 1):
                return
            log.warning("%s %s: no answer from the replica (lost?)%s", method, path,
                        "; replaying it once" if replayable and attempt == 1 else "")
            if not replayable:
                break
        await send_error(send, 503, "the replica serving this request was lost; retry",
                         {"Retry-After": str(RETRY_AFTER_S)})

    def _authorized(self, scope: dict) -> bool:
        scheme, _, given = _header(scope, b"authorization").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())

    async def _forward(self, scope: dict, body: bytes, receive: Receive, send: Send, *, replay: bool) -> bool:
        """One try downstream with the buffered body -> whether the client got an answer. A non-JSON 500 (what
        the proxy writes for a lost replica) is held back and counts as none; a non-JSON 503 is rewritten. The
        answer to a replay carries `X-PFSR-Replayed: 1`."""
        pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay_receive() -> Message:
            # the body once, then the client's own messages (its disconnect)
            return pending.pop() if pending else await receive()

        held: dict[str, Any] = {}
        answered = False

        async def guarded_send(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":
                headers = message.get("headers", [])
                json_body = any(k.lower() == b"content-type" and v.startswith(b"application/json") for k, v in headers)
                if message["status"] in (500, 503) and not json_body:
                    held.update(status=message["status"], headers=headers, body=b"")
                    return
                if replay:
                    message = {**message, "headers": [*headers, (b"x-pfsr-replayed", b"1")]}
            if held and message["type"] == "http.response.body":
                held["body"] += message.get("body", b"")
                return
            answered = True
            await send(message)

        try:
            # a copy for each try: Serve's proxy rewrites the scope (root_path, path, request-id header)
            await self.app({**scope, "headers": list(scope.get("headers", []))}, replay_receive, guarded_send)
        except Exception:
            if answered:
                raise
            log.exception("%s %s failed in the proxy", scope["method"], scope["path"])
            return False
        if answered:
            return True
        if held.get("status") == 503:
            retry = next((v.decode() for k, v in held["headers"] if k.lower() == b"retry-after"), str(RETRY_AFTER_S))
            text = held["body"].decode("utf-8", "replace").strip() or "overloaded"
            await send_error(send, 503, text, {"Retry-After": retry})
            return True
        return False
