"""charnn serve: a page and an HTTP API over one or more checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import app, at_least, between, inference_only, run_command, say


@app.command()
def serve(
    checkpoints: Annotated[list[Path], typer.Argument(
        metavar="CHECKPOINT", show_default=False, help="Checkpoints to serve (loaded once, at start).")],
    host: Annotated[str, typer.Option(
        metavar="HOST", help="Address to listen on; 127.0.0.1 keeps the server to this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(
        metavar="PORT", callback=between(0, 65535), help="Port to listen on; 0 picks a free one (shown at start).")] = 8000,
    max_queue: Annotated[int, typer.Option(
        metavar="N", callback=at_least(1),
        help="Requests per model waiting for a place in the batch; more get 503 with Retry-After.")] = 64,
    max_batch: Annotated[int, typer.Option(
        metavar="N", callback=at_least(1), help="Streams per model generated together in one batched step.")] = 64,
    max_n: Annotated[int, typer.Option(
        metavar="N", callback=at_least(1), help="Most characters a request may generate per sample.")] = 2000,
    max_prime: Annotated[int, typer.Option(
        metavar="N", callback=at_least(1), help="Longest prime (and stop string) a request may send, in characters.")] = 4000,
    max_samples: Annotated[int, typer.Option(
        metavar="N", callback=at_least(1), help="Most samples (num_samples) per request.")] = 8,
    max_text: Annotated[int, typer.Option(
        metavar="N", callback=at_least(2), help="Longest text /v1/score reads, in characters.")] = 100_000,
    threads: Annotated[int, typer.Option(
        metavar="N", callback=at_least(1),
        help="CPU threads for torch. 1 leaves a core for HTTP, and rounds the batched numbers as charnn "
             "sample does (see docs/serve.md).")] = 1,
    batch_in_process: Annotated[bool, typer.Option(
        "--batch-in-process",
        help="Step each model's batch on a thread of the server process instead of a child process of its "
             "own (less memory; on a machine with 2 or more cores, slower under load: HTTP and the batch then "
             "share one interpreter lock).")] = False,
    grace: Annotated[float, typer.Option(
        metavar="SECONDS", callback=at_least(0),
        help="On Ctrl-C or SIGTERM: how long in-flight streams may take to finish before they are ended.")] = 10.0,
    allow_host: Annotated[Optional[list[str]], typer.Option(
        "--allow-host", metavar="NAME", show_default=False,
        help="Another host name to answer besides localhost and the --host address (the name a reverse proxy "
             "or other machines use). Repeat for more.")] = None,
    max_connections: Annotated[int, typer.Option(
        metavar="N", callback=at_least(1),
        help="Open connections; more get 503 at once (fewer if ulimit -n is lower).")] = 512,
    client_timeout: Annotated[int, typer.Option(
        metavar="SECONDS", callback=at_least(1),
        help="How long a client may take to send its request, or leave a reply unread, before it is "
             "cut off.")] = 10,
    batch_timeout: Annotated[int, typer.Option(
        metavar="SECONDS", callback=at_least(1),
        help="How long a model's batch process with work may stay silent before it is stopped and its "
             "streams end with an error.")] = 10,
) -> None:
    """Serve models over HTTP: a page and a JSON API.

    The page at / plays with the models; the API is GET /v1/models, POST
    /v1/generate (optionally streamed as server-sent events) and POST
    /v1/score. Concurrent requests are generated together in one batch."""

    def body() -> None:
        inference_only()  # before torch's first matrix product; the batch processes inherit it
        from ..serve import require_extra

        require_extra()  # before loading anything: say how to install the extra
        from ..model.devices import set_threads
        from ..serve import Limits, bind, create_app, is_loopback, load_models, run, url_of

        limits = Limits(max_queue=max_queue, max_batch=max_batch, max_n=max_n, max_prime=max_prime,
                        max_samples=max_samples, max_text=max_text, max_connections=max_connections,
                        client_timeout=client_timeout, batch_timeout=batch_timeout)
        set_threads(threads)
        models = load_models(checkpoints, progress=say)
        for m in models:
            if m.copy_index is None:
                say(f"{m.name}: copies are not reported and max_copy is refused: {m.copy_note}")
        sock = bind(host, port)
        bound = sock.getsockname()[0]
        application = create_app(models, limits, batch_process=not batch_in_process, bound=bound,
                                 allow_hosts=tuple(allow_host or ()))
        if not is_loopback(bound):
            say(f"Warning: listening on {bound}, not only this machine: anyone who can reach it can use these "
                "models and read their file paths (there is no login). Use --host 127.0.0.1 unless you mean it; "
                "see docs/serve-security.md.")
        try:
            application.state.server.start()  # the batch processes, before the address is announced
        except BaseException:
            application.state.server.close()
            raise
        url = url_of(sock)
        stopped_by = run(application, sock, grace=grace, announce=lambda: say(
            f"Serving {', '.join(m.name for m in models)} at {url} (API under {url}v1/; Ctrl-C to stop)"))
        say(f"Stopped{f' ({stopped_by})' if stopped_by else ''}.")

    run_command(body)
