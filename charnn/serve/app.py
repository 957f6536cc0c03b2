"""charnn serve's ASGI app: the page, ``/v1/models``, ``/v1/generate`` (JSON
or server-sent events) and ``/v1/score``, over one :class:`Engine` per model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import CharnnError
from .api import (DEFAULTS, ApiError, GenerateSpec, Limits, ServedModel, parse_generate, parse_score,
                  require_extra, score_text)
from .engine import Channel, Engine
from .worker import ProcessEngine

PAGE_FILE = "serve_page.html"
FLUSH_INTERVAL = 0.05  # seconds between two sends of one stream (the first character goes at once)


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


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


def create_app(models: list[ServedModel], limits: Limits | None = None, batch_process: bool = True) -> Any:
    """The Starlette app serving ``models``; its lifespan starts (unless started
    already: ``app.state.server.start()``) and stops the engines."""
    require_extra()
    import contextlib

    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    server = Server(models, limits, batch_process)
    page = page_html()

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.to_dict(), status_code=e.status, headers=e.headers)

    async def read_json(request: Request) -> Any:
        if request.headers.get("content-type", "application/json").split(";")[0].strip() not in (
                "application/json", ""):
            raise ApiError(415, "send the request body as JSON with Content-Type: application/json")
        size = 0
        chunks = []
        async for chunk in request.stream():
            size += len(chunk)
            if size > server.limits.max_body:
                raise ApiError(413, f"the request body is over {server.limits.max_body:,} bytes; send less text")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks) or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None

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
        return wrapped

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    async def list_models(request: Request) -> Response:
        return JSONResponse({"models": [{**m.describe(), "streams": server.engines[m.name].rows,
                                          "queued": server.engines[m.name].queued()}
                                         for m in server.models.values()],
                             "limits": server.limits.to_dict(), "defaults": DEFAULTS})

    async def generate(request: Request) -> Response:
        spec = parse_generate(await read_json(request), server.models, server.limits)
        engine = server.engines[spec.model]
        channel = Channel(asyncio.get_running_loop(), ("text", "done", "error") if spec.stream else ("done", "error"))
        group = await engine.submit(spec, channel)
        if spec.stream:
            return StreamingResponse(_events(spec, group, channel), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(request, spec, group, channel)

    async def _events(spec: GenerateSpec, group: Any, channel: Channel):
        try:
            yield _sse("start", {"model": spec.model, "seed": spec.seed, "seeds": group.seeds, "prime": spec.prime,
                                 "num_samples": spec.num_samples, "dropped": spec.dropped})
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
                for b, parts in texts.items():  # one event per sample
                    data: dict[str, Any] = {"sample": b, "text": "".join(parts)}
                    if spec.top:
                        data["probs"] = [p for p, _ in infos[b]]
                        data["top"] = [t for _, t in infos[b]]
                    yield _sse("text", data)
                if end is not None:
                    kind, payload = end
                    if kind == "done":
                        yield _sse("done", {"model": spec.model, "seed": spec.seed, "samples": payload})
                    else:
                        yield _sse("error", {"error": {"message": payload[1], "status": payload[0]}})
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
                        return JSONResponse({"model": spec.model, "seed": spec.seed, "samples": payload})
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
    app.state.server = server
    return app
