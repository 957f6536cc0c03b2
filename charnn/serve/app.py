"""charnn serve's ASGI app: the page, ``/v1/models``, ``/v1/generate`` (JSON
or server-sent events) and ``/v1/score``, over one :class:`Engine` per model."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import CharnnError
from .api import (DEFAULTS, ApiError, GenerateSpec, Limits, ServedModel, copy_reports, parse_generate, parse_json,
                  parse_score, require_extra, score_text)
from .engine import Channel, Engine
from .guard import Guard, HostRules, csp_for
from .worker import ProcessEngine

PAGE_FILE = "serve_page.html"
FLUSH_INTERVAL = 0.05  # seconds between two sends of one stream (the first character goes at once)


def _dumps(data: Any) -> bytes:
    # ASCII with \u escapes: a lone surrogate (a vocabulary read with
    # surrogateescape, a prime sent as "\ud800") has no UTF-8 form.
    return json.dumps(data, ensure_ascii=True, allow_nan=False).encode()


def _sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _dumps(data) + b"\n\n"


def page_html() -> str:
    from importlib.resources import files

    return files("charnn").joinpath(PAGE_FILE).read_text(encoding="utf-8")


class Server:
    """The engines, limits and scoring pool behind one app. ``batch_process``
    (the default): each model's batch runs in a child process
    (:class:`ProcessEngine`), so it does not share the interpreter lock with
    HTTP; False: a thread of this process (:class:`Engine`)."""

    def __init__(self, models: list[ServedModel], limits: Limits | None = None, batch_process: bool = True):
        self.models = {m.name: m for m in models}
        self.limits = limits or Limits()
        self.engines = {m.name: (ProcessEngine if batch_process else Engine)(m, self.limits) for m in models}
        self._score_pool = ThreadPoolExecutor(1, thread_name_prefix="charnn-score")
        self._copy_pool = ThreadPoolExecutor(1, thread_name_prefix="charnn-copies")
        self._scores_waiting = 0
        self.started = False

    def start(self) -> None:
        """Start every engine and wait until each serves (a child process takes a few seconds)."""
        if not self.started:
            self.started = True
            for e in self.engines.values():
                e.start()
            for e in self.engines.values():
                if isinstance(e, ProcessEngine):
                    e.wait_ready()

    def cancel_streams(self, message: str) -> None:
        for e in self.engines.values():
            e.cancel_all(message)

    def close(self) -> None:
        for e in self.engines.values():
            e.close()
        self._score_pool.shutdown(wait=False, cancel_futures=True)
        self._copy_pool.shutdown(wait=False, cancel_futures=True)

    async def with_copies(self, spec: GenerateSpec, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The finished samples with their copy reports, made off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._copy_pool, copy_reports, self.models[spec.model], samples,
                                          spec.copy_span)

    async def score(self, served: ServedModel, text: str, unknown: str, top: int) -> dict[str, Any]:
        if self._scores_waiting >= self.limits.max_queue:
            raise ApiError(503, f"{self._scores_waiting} scoring requests are waiting already; retry in a second",
                           headers={"Retry-After": "1"})
        self._scores_waiting += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._score_pool, score_text, served, text, unknown, top)
        finally:
            self._scores_waiting -= 1


def json_media_type(value: str | None) -> bool:
    """Content-Type ``application/json`` (any case), with at most a UTF-8 charset parameter."""
    if value is None:
        return False
    kind, *params = [part.strip().lower() for part in value.split(";")]
    for param in params:
        name, _, val = param.partition("=")
        if name.strip() == "charset" and val.strip().strip('"') not in ("utf-8", "utf8"):
            return False
    return kind == "application/json"


def create_app(models: list[ServedModel], limits: Limits | None = None, batch_process: bool = True,
               bound: str | None = None, allow_hosts: tuple[str, ...] = ()) -> Any:
    """The Starlette app serving ``models``; its lifespan starts (unless started
    already: ``app.state.server.start()``) and stops the engines. It answers
    the Host names of :class:`HostRules` (``bound``: the address listened on;
    ``allow_hosts``: more names) and POSTs from its own page or from programs."""
    require_extra()
    import contextlib

    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, Response, StreamingResponse
    from starlette.routing import Route

    server = Server(models, limits, batch_process)
    page = page_html()

    def JSONResponse(data: Any, status_code: int = 200, headers: dict | None = None) -> Response:  # noqa: N802
        return Response(_dumps(data), status_code=status_code, headers=headers, media_type="application/json")

    def error_response(e: ApiError) -> Response:
        return JSONResponse(e.to_dict(), status_code=e.status, headers=e.headers)

    async def read_json(request: Request) -> Any:
        if not json_media_type(request.headers.get("content-type")):
            raise ApiError(415, "send the request body as JSON (UTF-8) with the header Content-Type: application/json")
        limit = server.limits.max_body
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:  # refused before it is sent
            raise ApiError(413, f"the request body is {int(declared):,} bytes; this server reads at most {limit:,}",
                           headers={"Connection": "close"})

        async def body() -> bytes:
            size, chunks = 0, []
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"the request body is over {limit:,} bytes; send less text",
                                   headers={"Connection": "close"})
                chunks.append(chunk)
            return b"".join(chunks)

        timeout = server.limits.client_timeout
        try:
            raw = await asyncio.wait_for(body(), timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {timeout} s; send it at once",
                           headers={"Connection": "close"}) from None
        return parse_json(raw)

    def api(handler: Callable) -> Callable:
        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as e:
                return error_response(e)
            except CharnnError as e:  # a library check (ConfigError, ...): the request asked for it
                return error_response(ApiError(400, str(e)))
            except ClientDisconnect:
                return Response(status_code=499)
            except (RecursionError, ValueError, TypeError) as e:  # never a 500 for what a request sent
                return error_response(ApiError(400, f"the request cannot be read ({type(e).__name__}: "
                                                    f"{str(e)[:200]}); check its JSON"))
        return wrapped

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    async def list_models(request: Request) -> Response:  # noqa: ARG001
        return JSONResponse({"models": [{**m.describe(), "streams": server.engines[m.name].rows,
                                          "queued": server.engines[m.name].queued()}
                                         for m in server.models.values()],
                             "limits": server.limits.to_dict(), "defaults": DEFAULTS})

    async def generate(request: Request) -> Response:
        spec = parse_generate(await read_json(request), server.models, server.limits)
        engine = server.engines[spec.model]
        if spec.stream:  # the text waiting for a client that does not read is bounded
            channel = Channel(asyncio.get_running_loop(), limit=server.limits.stream_buffer, weight=1 + spec.top)
        else:  # a JSON reply needs only the end
            channel = Channel(asyncio.get_running_loop(), ("done", "error"), keep=("done", "error"))
        group = await engine.submit(spec, channel)
        channel.on_overflow = lambda: setattr(group, "cancelled", True)  # frees its rows and queue place now
        if spec.stream:
            return StreamingResponse(_events(spec, group, channel), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(request, spec, group, channel)

    async def _events(spec: GenerateSpec, group: Any, channel: Channel):
        try:
            # sending_since marks each send: the generator resumes once uvicorn's write buffer has room again,
            # so a send that stays open is a client that does not read (see Channel).
            channel.sending_since = time.monotonic()
            yield _sse("start", {"model": spec.model, "seed": spec.seed, "seeds": group.seeds, "prime": spec.prime,
                                 "num_samples": spec.num_samples, "dropped": spec.dropped})
            channel.sending_since = None
            while True:
                texts: dict[int, list[str]] = {}
                infos: dict[int, list[Any]] = {}
                end = None
                for kind, payload in await channel.get_all():  # everything made since the last send
                    if kind == "text":
                        for b, (text, info) in payload.items():
                            texts.setdefault(b, []).append(text)
                            infos.setdefault(b, []).extend(info)
                    else:
                        end = (kind, payload)
                events = []
                for b, parts in texts.items():  # one event per sample
                    data: dict[str, Any] = {"sample": b, "text": "".join(parts)}
                    if spec.top:
                        data["probs"] = [p for p, _ in infos[b]]
                        data["top"] = [t for _, t in infos[b]]
                    events.append(_sse("text", data))
                if end is not None:
                    kind, payload = end
                    if kind == "done":
                        samples = await server.with_copies(spec, payload)
                        events.append(_sse("done", {"model": spec.model, "seed": spec.seed, "samples": samples}))
                    else:
                        events.append(_sse("error", {"error": {"message": payload[1], "status": payload[0]}}))
                channel.sending_since = time.monotonic()
                yield b"".join(events)
                channel.sending_since = None
                if end is not None:
                    return
                # Let characters gather: an event per sample every FLUSH_INTERVAL, not one per step.
                await asyncio.sleep(FLUSH_INTERVAL)
        finally:
            group.cancelled = True  # a client that went away frees its rows at the next step

    async def _collect(request: Request, spec: GenerateSpec, group: Any, channel: Channel) -> Response:
        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(disconnected())
        try:
            while True:
                getter = asyncio.ensure_future(channel.get_all())
                done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    return Response(status_code=499)
                for kind, payload in getter.result():
                    if kind == "done":
                        samples = await server.with_copies(spec, payload)
                        return JSONResponse({"model": spec.model, "seed": spec.seed, "samples": samples})
                    if kind == "error":
                        raise ApiError(payload[0], payload[1], headers={"Retry-After": "1"} if payload[0] == 503 else None)
        finally:
            watcher.cancel()
            group.cancelled = True

    async def score(request: Request) -> Response:
        served, text, unknown, top = parse_score(await read_json(request), server.models, server.limits)
        return JSONResponse(await server.score(served, text, unknown, top))

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        msg = ("no such endpoint; the API is GET /v1/models, POST /v1/generate, POST /v1/score (and the page at /)"
               if status == 404 else f"{request.method} is not allowed here; see GET /v1/models, "
               "POST /v1/generate, POST /v1/score")
        return JSONResponse(ApiError(status, msg).to_dict(), status_code=status)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        server.start()
        try:
            yield
        finally:
            server.close()

    app = Starlette(routes=[
        Route("/", index, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/generate", api(generate), methods=["POST"]),
        Route("/v1/score", api(score), methods=["POST"]),
    ], exception_handlers={404: not_found, 405: not_found}, lifespan=lifespan)
    app.router.redirect_slashes = False  # a redirect would name the Host the request sent: 404 instead
    app.state.server = server
    guarded = Guard(app, HostRules(bound, allow_hosts), csp_for(page))
    guarded.state = app.state  # type: ignore[attr-defined]
    return guarded
