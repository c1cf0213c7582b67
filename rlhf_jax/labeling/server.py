"""The labeling HTTP server: a FastAPI app over a :class:`~rlhf_jax.labeling.store.LabelStore`.

Pages (plain HTML/CSS/JS from ``static/``, no build step):

* ``GET /`` — the ranking page; ``GET /agreement`` — the agreement view.

JSON API (every answer is JSON; errors are ``{"detail": "<what was wrong>"}``):

=========================  ==================================================================
``GET /api/health``        ``{"ok": true, "items": N}`` (no authentication)
``GET /api/config``        how to authenticate (``"auth": "name"`` or ``"token"``), limits
``GET /api/next``          ``{"item", "progress", "last"}`` (see :meth:`LabelStore.state`)
``POST /api/submit``       ``{"item", "ranks", "submission_id"}`` -> ``{"result", "state"}``
``POST /api/skip``         ``{"item"}`` -> ``{"result", "state"}``
``POST /api/undo``         ``{"submission_id"}`` -> ``{"result", "state"}``
``GET /api/agreement``     :func:`~rlhf_jax.labeling.agreement.agreement_report`
=========================  ==================================================================

Who is asking: with a tokens file, ``Authorization: Bearer <token>`` (the page takes it from its
``?token=`` link); without one (loopback only), the labeler's name in an ``X-Labeler`` header.
Either header makes browsers send a CORS pre-flight, which this server never approves, so another
web site open in the labeler's browser cannot post rankings; on a loopback address the ``Host``
header must name a loopback host too (no DNS rebinding).

Status codes: 401 unknown labeler/token, 400 malformed header or id, 404 no such item/ranking,
409 the request does not fit the state (item not leased to you, lease lost, already ranked),
413 body over ``max_body_bytes`` (64 KiB), 422 invalid body or ranking. Every answer carries a
Content-Security-Policy that allows only this server's own scripts and styles.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import os
import pathlib
import re
from typing import Any, Awaitable, Callable, Iterable, Mapping

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from rlhf_jax.labeling.agreement import agreement_report
from rlhf_jax.labeling.store import check_labeler, LabelingError, LabelStore, SUBMISSION_ID_RE

STATIC = pathlib.Path(__file__).resolve().with_name("static")
MAX_BODY_BYTES = 64 * 1024
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
TOKEN_RE = re.compile(r"[A-Za-z0-9_.~+/=-]{16,256}")

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


# ----------------------------------------------------------------------------------------------
# Request bodies.

class SubmitBody(BaseModel):
    """A ranking of the responses in the order they were shown (0 = best, ties share a rank)."""
    model_config = ConfigDict(extra="forbid")
    item: StrictInt = Field(ge=1, description="the item key from /api/next")
    ranks: list[StrictInt] = Field(min_length=2, max_length=256)
    submission_id: str = Field(pattern=SUBMISSION_ID_RE.pattern,
                               description="client-chosen, reused when retrying")


class SkipBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item: StrictInt = Field(ge=1)


class UndoBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    submission_id: str = Field(pattern=SUBMISSION_ID_RE.pattern)


# ----------------------------------------------------------------------------------------------
# Configuration helpers.

def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (``127.0.0.0/8``, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_tokens(path: str | os.PathLike) -> dict[str, str]:
    """Reads a tokens file: one ``<labeler> <token>`` per line (``#`` comments, blank lines).

    Returns:
      ``{token: labeler}``.

    Raises:
      ValueError: naming ``path:line`` for a malformed line, a bad name or token (16-256
        characters of ``A-Z a-z 0-9 _ . ~ + / = -``), or a repeated name or token.
    """
    tokens: dict[str, str] = {}
    names: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            where = f"{path}:{lineno}"
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{where}: expected '<labeler> <token>', got {len(parts)} fields")
            name, token = parts
            try:
                check_labeler(name)
            except LabelingError as e:
                raise ValueError(f"{where}: {e.message}") from None
            if not TOKEN_RE.fullmatch(token):
                raise ValueError(f"{where}: token of {name}: expected 16-256 characters from "
                                 f"A-Z a-z 0-9 _ . ~ + / = -")
            if name in names:
                raise ValueError(f"{where}: labeler {name!r} already has a token (line "
                                 f"{names[name]})")
            if token in tokens:
                raise ValueError(f"{where}: token of {name} repeats the token of "
                                 f"{tokens[token]}")
            tokens[token] = name
            names[name] = lineno
    if not tokens:
        raise ValueError(f"{path}: no tokens (expected lines '<labeler> <token>')")
    return tokens


# ----------------------------------------------------------------------------------------------
# ASGI middleware.

def _json_bytes(status: int, body: dict) -> tuple[dict, dict]:
    data = json.dumps(body).encode()
    return ({"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(data)).encode())]},
            {"type": "http.response.body", "body": data})


class GuardMiddleware:
    """Body size limit, ``Host`` check and security headers, in front of the app.

    Bodies are read (at most ``max_body_bytes``) before the app sees them, whether the client
    sent a ``Content-Length`` or chunks, so an oversized body is a 413 and never reaches
    parsing.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, allowed_hosts: set[str] | None):
        self.app, self.max_body_bytes, self.allowed_hosts = app, max_body_bytes, allowed_hosts

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        if self.allowed_hosts is not None:
            host = headers.get("host", "")
            name = host[:host.index("]") + 1] if host.startswith("[") and "]" in host \
                else host.split(":", 1)[0]
            if name.lower() not in self.allowed_hosts:
                return await self._reply(send, 400, f"Host header {host[:80]!r} is not a "
                                                    f"loopback name this server answers to")
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            return await self._reply(send, 400, f"Content-Length {length[:40]!r} is not a "
                                                f"number of bytes")
        if length is not None and int(length) > self.max_body_bytes:
            return await self._reply(send, 413, f"request body of {length} bytes is over the "
                                                f"limit of {self.max_body_bytes} bytes")
        chunks, size = [], 0
        if scope.get("method") in ("POST", "PUT", "PATCH", "DELETE"):
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                size += len(msg.get("body", b""))
                if size > self.max_body_bytes:
                    return await self._reply(send, 413, f"request body is over the limit of "
                                                        f"{self.max_body_bytes} bytes")
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body", False):
                    break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed and chunks:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        is_api = scope.get("path", "").startswith("/api/")

        async def send_with_headers(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                extra = [(b"content-security-policy", CSP.encode()),
                         (b"x-content-type-options", b"nosniff"),
                         (b"x-frame-options", b"DENY"),
                         (b"referrer-policy", b"no-referrer")]
                if is_api:
                    extra.append((b"cache-control", b"no-store"))
                msg = dict(msg, headers=list(msg.get("headers", [])) + extra)
            await send(msg)

        await self.app(scope, replay, send_with_headers)

    @staticmethod
    async def _reply(send: Callable, status: int, detail: str) -> None:
        start, body = _json_bytes(status, {"detail": detail})
        start["headers"].append((b"content-security-policy", CSP.encode()))
        await send(start)
        await send(body)


def _describe(errors: list[dict]) -> str:
    """Pydantic errors as one line: ``ranks[1]: Input should be a valid integer (got 'x')``."""
    parts = []
    for e in errors[:5]:
        loc = list(e.get("loc", ()))
        if loc and loc[0] == "body":
            loc = loc[1:]
        path = ""
        for x in loc:
            path += f"[{x}]" if isinstance(x, int) else (f".{x}" if path else str(x))
        text = f"{path or 'body'}: {e.get('msg', 'invalid')}"
        if e.get("type") not in ("missing", "json_invalid") and "input" in e:
            text += f" (got {repr(e['input'])[:60]})"
        parts.append(text)
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


# ----------------------------------------------------------------------------------------------
# The app.

class _Unauthorized(LabelingError):
    status = 401


def create_app(store: LabelStore, *, tokens: Mapping[str, str] | None = None,
               max_body_bytes: int = MAX_BODY_BYTES,
               allowed_hosts: Iterable[str] | None = LOOPBACK_NAMES) -> Any:
    """The ASGI app (FastAPI wrapped in :class:`GuardMiddleware`) serving ``store``.

    Args:
      store: the labeling database.
      tokens: ``{token: labeler}`` (see :func:`read_tokens`); ``None`` lets labelers name
        themselves in an ``X-Labeler`` header (only for servers bound to loopback).
      max_body_bytes: request bodies above this get 413.
      allowed_hosts: host names the ``Host`` header may carry (400 otherwise); ``None`` accepts
        any (a server bound to a network address, protected by tokens).
    """
    tokens = dict(tokens) if tokens else None
    app = FastAPI(title="rlhf_jax labeling", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(LabelingError)
    async def _labeling_error(request: Request, exc: LabelingError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _describe(list(exc.errors()))}, status_code=422)

    def labeler(request: Request) -> str:
        if tokens is not None:
            auth = request.headers.get("authorization", "")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            for token, name in tokens.items():
                if given and hmac.compare_digest(given.encode(), token.encode()):
                    return name
            raise _Unauthorized("missing or unknown token: open the link with your token "
                                "(Authorization: Bearer <token>)")
        name = request.headers.get("x-labeler")
        if not name:
            raise _Unauthorized("who are you? send your labeler name in the X-Labeler header")
        return check_labeler(name)

    @app.get("/api/health")
    def health() -> dict:
        return {"ok": True, "items": sum(store.splits().values())}

    @app.get("/api/config")
    def config() -> dict:
        return {"auth": "token" if tokens is not None else "name",
                "labels_per_item": store.labels_per_item, "lease_seconds": store.lease_seconds,
                "max_body_bytes": max_body_bytes}

    @app.get("/api/next")
    def next_item(who: str = Depends(labeler)) -> dict:
        return store.state(who)

    @app.post("/api/submit")
    def submit(body: SubmitBody, who: str = Depends(labeler)) -> dict:
        return store.submit(who, body.item, body.ranks, body.submission_id, then_state=True)

    @app.post("/api/skip")
    def skip(body: SkipBody, who: str = Depends(labeler)) -> dict:
        return store.skip(who, body.item, then_state=True)

    @app.post("/api/undo")
    def undo(body: UndoBody, who: str = Depends(labeler)) -> dict:
        return store.undo(who, body.submission_id, then_state=True)

    @app.get("/api/agreement")
    def agreement(who: str = Depends(labeler)) -> dict:
        return agreement_report(store.labels(), store.skip_counts())

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/agreement", include_in_schema=False)
    def agreement_page() -> FileResponse:
        return FileResponse(STATIC / "agreement.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
    return GuardMiddleware(app, max_body_bytes=max_body_bytes, allowed_hosts=hosts)


def serve(store: LabelStore, *, host: str = "127.0.0.1", port: int = 8765,
          tokens_file: str | os.PathLike | None = None,
          max_body_bytes: int = MAX_BODY_BYTES) -> None:
    """Runs the server with uvicorn until interrupted.

    Raises:
      ValueError: ``host`` is not a loopback address and no ``tokens_file`` was given (anyone on
        the network could otherwise rank as anyone), or the tokens file is malformed.
    """
    import uvicorn

    if not is_loopback(host) and tokens_file is None:
        raise ValueError(f"--host {host} is reachable from other machines: pass --tokens-file "
                         f"with one '<labeler> <token>' line per labeler (python -m "
                         f"rlhf_jax.labeling tokens NAME... --out FILE writes one)")
    tokens = read_tokens(tokens_file) if tokens_file is not None else None
    hosts = (*LOOPBACK_NAMES, host) if is_loopback(host) else None
    app = create_app(store, tokens=tokens, max_body_bytes=max_body_bytes, allowed_hosts=hosts)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
