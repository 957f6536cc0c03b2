"""charnn serve: a page for people and a small HTTP API for programs, over
models loaded once at start. An optional extra: ``pip install 'charnn[serve]'``
(Starlette on uvicorn); nothing else in charnn needs it.

Seven modules:

- :mod:`.api` -- the limits, the models loaded at start, each request checked
  with an error that says what to change, and scoring (``charnn eval``'s
  numbers).

- :mod:`.engine`, :class:`Engine` -- one worker thread per model that steps every active
  stream together. A request's streams (its ``num_samples``) are a *group*:
  the group's prime is read off the worker thread (or copied from a recent
  request with the same prime: :class:`PrimeCache`), then it joins the batch
  between two steps and leaves when its last stream ends::

      step:      1   2   3   4   5   6   7 ...
      request A  a0  a1  a2  a3                   (n=4)
      request B      b0  b1  b2  b3  b4  b5 ...   (joins at step 2)
      request C              c0  c1  ...          (joins when it was primed)

  Each step is one :meth:`PackedRNN.step` over all rows; each group then picks
  its next characters with exactly the arithmetic of :class:`charnn.generation.sample.Sampler`
  (same seeds ``seed + i``, same uniforms, same float64 pick on the same
  (k, V) rows), so a request's text is ``charnn sample``'s text. One caveat,
  below the text: MKL multiplies a batch of 1-3 rows by other kernels than a
  bigger batch (1 row: a matrix-vector product), so for a request of 1-3
  samples the logits may differ from ``charnn sample``'s in the last bit; a
  character changes only if its two best candidates tie to within ~1e-6
  (none in 38,400 characters measured). From 4 samples on, with one thread,
  the rows are bit-for-bit ``charnn sample``'s.
- :mod:`.worker`, :class:`ProcessEngine` -- the same engine in a child process per
  model (the default), so that the batched steps and HTTP do not share one
  interpreter lock: the batch runs on one core, HTTP on another. The model
  goes to the child in memory; the child ignores Ctrl-C (the server decides
  how to stop) and exits when the server's pipe closes.
- :mod:`.app`, :func:`create_app` -- the ASGI app: ``GET /`` (the page), ``GET /v1/models``,
  ``POST /v1/generate`` (JSON, or server-sent events with ``"stream": true``),
  ``POST /v1/score`` (the numbers of ``charnn eval``).
- :mod:`.primes` -- the prime cache and the queue that reads waiting primes
  shortest first.
- :mod:`.guard`, :class:`Guard` -- the Host allow-list, the Origin check on
  POSTs and the security headers (docs/serve-security.md).
- :mod:`.listen`, :func:`run` -- uvicorn on a bound socket, with bounds on open
  connections and on how long a client may take; Ctrl-C or SIGTERM stop
  accepting, let in-flight streams finish for ``grace`` seconds, end the rest
  with an ``error`` event, and return normally.

Library code: it prints nothing (uvicorn logs warnings through ``logging``).
"""

from .api import (DEFAULTS, INSTALL_HINT, MAX_TOP, ApiError, Busy, GenerateSpec, Limits, ServedModel, ServeError,
                  load_models, parse_generate, parse_score, require_extra, score_text)
from .app import FLUSH_INTERVAL, PAGE_FILE, Server, create_app, page_html
from .engine import PRIME_CACHE, Channel, Engine, Group, PrimeCache
from .guard import Guard, HostRules
from .listen import bind, is_loopback, run, url_of
from .worker import ProcessEngine

__all__ = ["DEFAULTS", "FLUSH_INTERVAL", "INSTALL_HINT", "MAX_TOP", "PAGE_FILE", "PRIME_CACHE", "ApiError", "Busy",
           "Channel", "Engine", "GenerateSpec", "Group", "Guard", "HostRules", "Limits", "PrimeCache", "ProcessEngine", "ServeError", "ServedModel",
           "Server", "bind", "create_app", "is_loopback", "load_models", "page_html",
           "parse_generate", "parse_score", "require_extra", "run", "score_text", "url_of"]
