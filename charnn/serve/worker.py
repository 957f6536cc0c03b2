"""charnn serve's batch worker process: one model's batching engine in a child
process, so that the batched steps run on one core while HTTP runs on another.

In one process the batch thread and the HTTP thread share one interpreter
lock: at 32 clients the server used about one core in all, the batch waiting
for the lock between its torch calls. Here the parent (the HTTP process) keeps
the request side -- the queue limit, the channels of the streams -- and a
:class:`ProcessEngine` with :class:`Engine`'s interface; the child runs an
unchanged :class:`Engine`, its batch loop on its main thread.

- The model goes to the child in memory, as the parent loaded it (the weights
  as bytes read with ``weights_only``); the child opens no file, so what is
  served is exactly what was loaded at start.
- Parent -> child, one pipe: ``("submit", id, spec)``, ``("cancel", id)``,
  ``("close", message)``, ``("reset_stats",)``.
- Child -> parent, another pipe: after each batched step, one message with
  every item the step made, ``[(id, kind, payload), ...]``, and the engine's
  figures (streams, largest batch, steps, primes read). ``kind`` is a
  :class:`Channel` item (``text``, ``done``, ``error``) or ``dequeued`` (the
  request left the queue: the parent's queue count goes down).
- The child ignores Ctrl-C (the terminal sends it to the whole process group;
  the parent decides how to stop) and exits when its pipe closes, so it never
  outlives the parent, even one killed with SIGKILL.
- If the child dies (the out-of-memory killer, a kill by hand), its streams
  end with an ``error`` event and later requests get 503 with a message that
  says to restart the server.
- A watchdog: while the child has work, the parent pings it every second; a
  child that answers nothing for ``Limits.batch_timeout`` seconds (stopped
  with SIGSTOP, stuck) is killed, and the same happens as when it dies.

Library code: it prints nothing.
"""

from __future__ import annotations

import asyncio
import io
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from .api import ApiError, Busy, GenerateSpec, Limits, ServedModel, ServeError
from .engine import Channel, Engine, Group

START_TIMEOUT = 300.0  # seconds the child may take to start (import torch, build the model), even on a busy machine
WATCH_INTERVAL = 1.0  # seconds between two pings of a child with work


# ---------------------------------------------------------------------------
# The child
# ---------------------------------------------------------------------------

@dataclass
class _ModelParcel:
    """What the child needs to serve one model, picklable."""

    name: str
    model_config: Any  # ModelConfig
    weights: bytes  # torch.save of the state dict
    chars: list[str]  # the tokenizer's vocabulary
    threads: int
    copy_text: str | None = None  # the training text and its suffix array, for max_copy
    copy_sa: bytes | None = None


class _Outbox:
    """The child's side of every stream: items gathered until the batch loop
    sends them, one message per step."""

    def __init__(self, conn: Any):
        self.conn = conn
        self.on_end: Any = lambda gid: None  # called when a stream's group ends (done or error)
        self.items: list[tuple[int, str, Any]] = []
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.sent_stats: tuple | None = None

    def channel(self, gid: int) -> "_RemoteChannel":
        return _RemoteChannel(self, gid)

    def flush(self, stats: tuple[int, int, int, int], force: bool = False) -> None:
        with self.lock:
            items, self.items = self.items, []
        if items or stats != self.sent_stats or force:  # stats alone: a cancelled stream left, say, or a batch emptied
            with self.send_lock:
                self.sent_stats = stats
                try:  # pickle.dumps + send_bytes: cheaper than send()'s ForkingPickler per step
                    self.conn.send_bytes(pickle.dumps((items, stats), pickle.HIGHEST_PROTOCOL))
                except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
                    pass  # the parent is gone; the pipe's reader ends the child


class _RemoteChannel:
    """Stands in for :class:`Channel` in the child: puts go to the outbox."""

    def __init__(self, outbox: _Outbox, gid: int):
        self.outbox = outbox
        self.gid = gid

    def put(self, item: tuple[str, Any]) -> None:
        with self.outbox.lock:
            self.outbox.items.append((self.gid, item[0], item[1]))
        if item[0] in ("done", "error"):
            self.outbox.on_end(self.gid)


class _ChildEngine(Engine):
    """The unchanged batch loop, reporting through the outbox."""

    def __init__(self, served: ServedModel, limits: Limits, outbox: _Outbox):
        super().__init__(served, limits)
        self.outbox = outbox
        self.groups: dict[int, Group] = {}  # id -> group, until it ends or is cancelled
        self._groups_lock = threading.Lock()
        outbox.on_end = self._forget

    def _forget(self, gid: int) -> None:
        with self._groups_lock:
            self.groups.pop(gid, None)

    def stats(self) -> tuple[int, int, int, int]:
        return self.rows, self.max_rows, self.steps, self.primes.reads

    def dequeued(self, group: Group) -> None:
        group.channel.put(("dequeued", None))

    def after_step(self) -> None:
        self.outbox.flush(self.stats())

    def accept(self, gid: int, spec: GenerateSpec) -> None:
        """A request from the parent (which already counted it against the queue)."""
        group = Group(spec, self.served, self.outbox.channel(gid))
        with self._groups_lock:
            self.groups[gid] = group
        if spec.n == 0:
            group.finish()
            self.dequeued(group)
            self.after_step()
            return
        self._prep.submit(self.primes.cost(spec.prime), self._prime_and_queue, group)

    def _prime_and_queue(self, group: Group) -> None:
        try:
            group.prime(self.primes)
        except Exception as e:  # a bug must not take the worker down
            group.fail(f"internal error while reading the prime ({type(e).__name__}: {e}); this is a bug in "
                       "charnn", 500)
            self.dequeued(group)
            self.after_step()
            return
        with self._cond:
            self._waiting += 1  # queue() counts it out again when it leaves
        self.queue(group)
        if group.finished:  # refused while closing
            self.after_step()

    def cancel(self, gid: int) -> None:
        with self._groups_lock:
            group = self.groups.pop(gid, None)
        if group is not None:  # it leaves the batch (or the queue) at the next step, unannounced
            group.cancelled = True


def _child_main(conn_in: Connection, conn_out: Connection) -> None:
    """The child process: receive the model, start reading commands, run the batch loop."""
    import torch

    from ..model.rnn import CharRNN
    from ..text.copyindex import CopyIndex
    from ..text.tokenizer import CharTokenizer

    parcel, limits = conn_in.recv()  # the parent sends the model first
    torch.set_num_threads(parcel.threads)
    model = CharRNN(parcel.model_config)
    model.load_state_dict(torch.load(io.BytesIO(parcel.weights), map_location="cpu", weights_only=True))
    served = ServedModel(parcel.name, None, model.eval(), CharTokenizer.from_list(parcel.chars), None)
    if parcel.copy_text is not None and parcel.copy_sa is not None:
        served.copy_index = CopyIndex.from_bytes(parcel.copy_text, parcel.copy_sa)
    outbox = _Outbox(conn_out)
    engine = _ChildEngine(served, limits, outbox)
    conn_out.send_bytes(pickle.dumps(("ready", None)))

    def read_commands() -> None:
        try:
            while True:
                msg = conn_in.recv()
                if msg[0] == "submit":
                    engine.accept(msg[1], msg[2])
                elif msg[0] == "cancel":
                    engine.cancel(msg[1])
                elif msg[0] == "reset_stats":
                    engine.reset_stats()
                elif msg[0] == "ping":  # the parent's watchdog: any message back says this process runs
                    outbox.flush(engine.stats(), force=True)
                elif msg[0] == "close":
                    engine.cancel_all(msg[1])
                    return
        except (EOFError, OSError):  # the parent is gone
            engine.cancel_all("the server stopped")

    reader = threading.Thread(target=read_commands, name="charnn-commands", daemon=True)
    reader.start()
    engine._run()  # returns once cancel_all was called, after the last streams were ended and sent


# ---------------------------------------------------------------------------
# The parent
# ---------------------------------------------------------------------------

class _RemoteGroup:
    """The parent's handle on a request running in the child: what the app
    reads of a :class:`Group` (``seeds``), and ``cancelled``, which tells the
    child to free the request's rows."""

    def __init__(self, engine: "ProcessEngine", gid: int, spec: GenerateSpec, channel: Channel):
        self.engine = engine
        self.gid = gid
        self.seeds = [spec.seed + i for i in range(spec.num_samples)]
        self.channel = channel
        self.queued = True  # counted against the queue until the child says it left
        self.ended = False
        self._cancelled = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @cancelled.setter
    def cancelled(self, value: bool) -> None:
        if value and not self._cancelled:
            self._cancelled = True
            if not self.ended:  # the child drops it without a word: forget it here now
                self.engine._cancel(self)
                self.engine._end(self)


class ProcessEngine:
    """One model's batch in a child process; the same interface as :class:`Engine`."""

    def __init__(self, served: ServedModel, limits: Limits, threads: int | None = None):
        import torch

        self.served = served
        self.limits = limits
        self.threads = threads if threads is not None else torch.get_num_threads()
        self._lock = threading.Lock()
        self._groups: dict[int, _RemoteGroup] = {}
        self._next_id = 0
        self._waiting = 0
        self._closing = False
        self._dead: str | None = None  # why the child is gone, once it is
        self._ready = threading.Event()
        self._send_lock = threading.Lock()
        self.rows = self.max_rows = self.steps = self.prime_reads = 0
        self._proc: Any = None
        self._conn_cmd: Any = None
        self._reader: threading.Thread | None = None
        self._heard = time.monotonic()  # when the child last sent anything
        self._stalled: str | None = None  # why the watchdog stopped the child, if it did

    # -- starting and stopping --------------------------------------------------
    def start(self) -> None:
        import torch

        buf = io.BytesIO()
        torch.save(self.served.model.state_dict(), buf)
        index = self.served.copy_index
        parcel = _ModelParcel(self.served.name, self.served.model.config, buf.getvalue(),
                              self.served.tokenizer.to_list(), self.threads,
                              index.text if index is not None else None,
                              index.sa.tobytes() if index is not None else None)
        # A plain ``python -c`` (not multiprocessing's spawn,
        # which would run the caller's main script again in the child), talking
        # over two pipes it inherits.
        cmd_r, cmd_w = os.pipe()
        out_r, out_w = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "from charnn.serve.worker import child; child()", str(cmd_r), str(out_w),
                 self.served.name], pass_fds=(cmd_r, out_w), stdin=subprocess.DEVNULL, close_fds=True,
                env=_child_env())
        except OSError as e:
            for fd in (cmd_r, cmd_w, out_r, out_w):
                os.close(fd)
            raise ServeError(f"cannot start the batch process for {self.served.name} ({e.strerror})") from None
        os.close(cmd_r)
        os.close(out_w)
        self._conn_cmd = Connection(cmd_w, readable=False)
        self._send((parcel, self.limits))
        self._reader = threading.Thread(target=self._read, args=(Connection(out_r, writable=False),),
                                        name=f"charnn-results-{self.served.name}", daemon=True)
        self._reader.start()
        threading.Thread(target=self._watch, name=f"charnn-watchdog-{self.served.name}", daemon=True).start()

    def _watch(self) -> None:
        """Ping a child that has work; kill one that stays silent for ``batch_timeout`` seconds."""
        last = time.monotonic()
        while self._dead is None and not self._closing:
            time.sleep(WATCH_INTERVAL)
            now = time.monotonic()
            slept, last = now - last, now
            if not self._ready.is_set() or not self._groups:
                self._heard = now  # idle: silence is expected
                continue
            if slept > WATCH_INTERVAL + 1:
                # This process was stopped (Ctrl-Z, SIGSTOP) or starved, not the child: what the
                # child sent meanwhile is still in the pipe. Count its silence from now.
                self._heard = now
                continue
            silent = time.monotonic() - self._heard
            if silent > self.limits.batch_timeout:
                self._stalled = (f"it answered nothing for {silent:.0f} s while it had work (stopped, or "
                                 "stuck), so the server stopped it")
                try:
                    self._proc.kill()  # the pipe closes; the reader ends the streams
                except OSError:
                    pass
                return
            try:
                self._send(("ping",))
            except ApiError:
                return

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Block until the child serves (or raise :class:`ServeError` saying why not)."""
        if not self._ready.wait(timeout):
            raise ServeError(f"the batch process for {self.served.name} did not start within {timeout:.0f} s; "
                             "is the machine out of memory or processes?")
        if self._dead is not None:
            raise ServeError(f"the batch process for {self.served.name} could not start: {self._dead}")

    def cancel_all(self, message: str) -> None:
        """End every queued and active stream with ``message`` (shutdown)."""
        with self._lock:
            self._closing = True
        try:
            self._send(("close", message))
        except ApiError:
            pass  # the child is gone already; its reader ended the streams

    def close(self) -> None:
        self.cancel_all("the server is shutting down")
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        if self._conn_cmd is not None:
            self._conn_cmd.close()
        if self._reader is not None:
            self._reader.join(timeout=5)

    # -- the request side (event loop thread) ---------------------------------
    def _check_alive(self) -> None:
        if self._dead is not None:
            raise ApiError(503, f"the batch process for model {self.served.name!r} stopped ({self._dead}); "
                                "restart charnn serve")

    def reserve(self) -> None:
        with self._lock:
            if self._closing:
                raise ApiError(503, "the server is shutting down; retry against a running server",
                               headers={"Retry-After": "1"})
            self._check_alive()
            if self._waiting >= self.limits.max_queue:
                raise Busy(self.served.name, self.limits.max_queue)
            self._waiting += 1

    def queued(self) -> int:
        with self._lock:
            return self._waiting

    async def submit(self, spec: GenerateSpec, channel: Channel) -> _RemoteGroup:
        """Reserve a place (503 when the queue is full) and hand the request to the child."""
        self.reserve()
        if not self._ready.is_set():  # the first requests after start wait for the child
            await asyncio.get_running_loop().run_in_executor(None, self._ready.wait, START_TIMEOUT)
        with self._lock:
            self._next_id += 1
            group = _RemoteGroup(self, self._next_id, spec, channel)
            self._groups[group.gid] = group
        try:
            self._send(("submit", group.gid, spec))
        except ApiError:
            self._end(group)
            raise
        return group

    def reset_stats(self) -> None:
        self.max_rows = 0
        self._send(("reset_stats",))

    def _cancel(self, group: _RemoteGroup) -> None:
        try:
            self._send(("cancel", group.gid))
        except ApiError:
            pass  # the child is gone: nothing to free

    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            try:
                self._conn_cmd.send(msg)
            except (BrokenPipeError, ConnectionResetError, EOFError, OSError, AttributeError):
                self._check_alive()
                raise ApiError(503, f"the batch process for model {self.served.name!r} is not running; "
                                    "restart charnn serve") from None

    def _end(self, group: _RemoteGroup) -> None:
        """Forget a request: it ended, or never reached the child."""
        with self._lock:
            if self._groups.pop(group.gid, None) is not None and group.queued:
                group.queued = False
                self._waiting -= 1
            group.ended = True

    # -- the results reader (its own thread) -------------------------------------
    def _read(self, conn: Any) -> None:
        try:
            if pickle.loads(conn.recv_bytes())[0] != "ready":  # not a batch process: treat it as gone
                return
            self._ready.set()
            while True:
                items, stats = pickle.loads(conn.recv_bytes())
                self._heard = time.monotonic()
                self.rows, self.max_rows, self.steps, self.prime_reads = stats
                for gid, kind, payload in items:
                    group = self._groups.get(gid)
                    if group is None:
                        continue
                    if kind == "dequeued":
                        with self._lock:
                            if group.queued:
                                group.queued = False
                                self._waiting -= 1
                        continue
                    group.channel.put((kind, payload))
                    if kind in ("done", "error"):
                        self._end(group)
        except (EOFError, OSError):
            pass
        finally:
            conn.close()
            self._child_gone()

    def _child_gone(self) -> None:
        """The child's pipe closed: end what is still open with an error."""
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        closing = self._closing
        reason = ("it stopped with the server" if closing else
                  self._stalled if self._stalled is not None else
                  f"it was killed by signal {-code}" if code is not None and code < 0 else
                  f"it exited with code {code}" if code is not None else "it stopped answering")
        with self._lock:
            self._dead = reason
            groups = list(self._groups.values())
        self._ready.set()
        for group in groups:
            message = ("the server is shutting down; this stream was cut short" if closing else
                       f"the batch process for model {self.served.name!r} stopped ({reason}); restart charnn serve")
            group.channel.put(("error", (503, message)))
            self._end(group)



def child() -> None:
    """The batch process's entry point: ``python -c "from charnn.serve.worker
    import child; child()" CMD_FD OUT_FD NAME``, started by :class:`ProcessEngine`
    (NAME is only there to tell the processes apart in ``ps``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the server decides
    try:
        _child_main(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False))
    except (EOFError, OSError, KeyboardInterrupt):
        pass  # the server went away before or while starting this process: nothing left to serve
    except Exception as e:  # the server reports that this process stopped; say why here, in one line
        sys.stderr.write(f"charnn serve: the batch process for {sys.argv[3]} failed ({type(e).__name__}: {e}); "
                         "this is a bug in charnn\n")
        sys.exit(1)


def _child_env() -> dict[str, str]:
    """This environment, with the folder charnn was imported from first on
    PYTHONPATH: the child imports the same charnn as the server."""
    import charnn

    root = os.path.dirname(os.path.dirname(os.path.abspath(charnn.__file__)))
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=root + (os.pathsep + path if path else ""))
