"""charnn serve's batching engine: one worker thread per model steps every
active stream together (see the package docstring)."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any

import torch
from torch import Tensor

from ..generation.copies import CopyGuard
from ..generation.sample import NOISE_BLOCK, Sampler, pick_ids
from ..model.fastrnn import PackedRNN
from .api import ApiError, Busy, GenerateSpec, Limits, ServedModel
from .channel import Channel
from .primes import PRIME_CACHE, PrimeCache, PrimeQueue

__all__ = ["PRIME_CACHE", "Channel", "Engine", "Group", "PrimeCache", "stop_table"]


class _GroupSampler(Sampler):
    """Sampler's uniforms (``_uniforms``) and pick (``_pick``) -- the exact arithmetic
    ``charnn sample`` runs -- without packing the model again: the batch
    shares one PackedRNN, and Sampler.__init__ would pack a copy per request."""

    def __init__(self, tokenizer: Any, temperature: float, top_k: int, top_p: float, device: torch.device):
        self._set_options(tokenizer, temperature, top_k, top_p, device)


def stop_table(stop: str) -> list[int]:
    """Knuth-Morris-Pratt failure table of ``stop``: entry j is the length of
    the longest proper prefix of ``stop[:j + 1]`` that is also its suffix."""
    table = [0] * len(stop)
    k = 0
    for j in range(1, len(stop)):
        while k and stop[j] != stop[k]:
            k = table[k - 1]
        if stop[j] == stop[k]:
            k += 1
        table[j] = k
    return table


class _StreamText:
    """One sample's generated text, and how much of it is safe to send: with a
    stop string, characters that might begin it are held back (as
    ``sample.generate`` does), and the text ends before its first occurrence.

    The stop string is matched as a Knuth-Morris-Pratt automaton: its state is
    the longest end of the text that is a beginning of ``stop`` -- exactly what
    must be held back -- so each character costs O(1) amortised, whatever the
    stop string's length."""

    def __init__(self, stop: str | None, table: list[int] | None = None):
        self.stop = stop
        self.table = table if table is not None or not stop else stop_table(stop)
        self.matched = 0  # the text ends with stop[:matched]
        self.chars: list[str] = []
        self.sent = 0
        self.cut = -1  # where stop was found (or the copy guard ended the text)
        self.copy_ended = False

    def add(self, ch: str) -> tuple[int, int]:
        """Append one character; the span (start, end) of the text now safe to send."""
        if self.cut >= 0:
            return self.sent, self.sent
        chars, stop = self.chars, self.stop
        chars.append(ch)
        end = len(chars)
        if stop:
            k, table = self.matched, self.table
            while k and stop[k] != ch:
                k = table[k - 1]
            if stop[k] == ch:
                k += 1
            if k == len(stop):
                self.cut = end = end - k
            else:  # hold back the longest end that could still grow into stop
                end -= k
            self.matched = k
        start, self.sent = self.sent, max(self.sent, end)
        return start, self.sent

    def end_copy(self) -> None:
        """The copy guard masked every character: the text ends here, held-back characters included."""
        self.cut = len(self.chars)
        self.copy_ended = True

    def flush(self) -> tuple[int, int]:
        """At the end: everything not cut off."""
        start, self.sent = self.sent, (self.cut if self.cut >= 0 else len(self.chars))
        return start, max(start, self.sent)

    def piece(self, start: int, end: int) -> str:
        return "".join(self.chars[start:end])

    @property
    def final(self) -> str:
        return "".join(self.chars[: self.cut] if self.cut >= 0 else self.chars)


class Group:
    """One generation request: its ``num_samples`` streams, stepped together."""

    def __init__(self, spec: GenerateSpec, served: ServedModel, channel: Channel):
        self.spec = spec
        self.k = spec.num_samples
        self.vocab = served.tokenizer.chars
        self.sampler = _GroupSampler(served.tokenizer, spec.temperature, spec.top_k, spec.top_p,
                                     served.model.head.weight.device)
        self.seeds = [spec.seed + i for i in range(self.k)]
        self.block: tuple[Tensor, ...] = ()  # this block's uniforms, one (k,) column per step
        self.t = 0
        self.logits: Tensor | None = None  # (k, V) after the prime, until the group joins the batch
        self.state: list[Tensor] | None = None
        table = stop_table(spec.stop) if spec.stop else None  # one table for the group's streams
        self.streams = [_StreamText(spec.stop, table) for _ in range(self.k)]
        self.infos: list[list[Any]] = [[] for _ in range(self.k)]  # per character: (prob, top) when top > 0
        self.guard = (CopyGuard(served.copy_index, served.tokenizer, spec.max_copy).start(spec.prime, self.k)
                      if spec.max_copy is not None else None)
        self.channel = channel
        self.cancelled = False
        self.finished = False
        # Picks in the batch-wide add with its temperature's other groups, and needs no rows of
        # its own afterwards (no top alternatives to report): see Engine._run's common case.
        self.batchable = self.plain and not spec.top

    def prime(self, primes: PrimeCache) -> None:
        """Read the prime (off the worker thread): what ``Sampler.ids`` does first."""
        self.logits, self.state = primes.get(self.spec.prime, self.k)  # (k, V), state (k, H) per part

    @property
    def plain(self) -> bool:
        """One sampled stream without top-k/top-p: its pick can share a batched call (see _pick_plain)."""
        return self.k == 1 and not self.sampler.greedy and not self.sampler.filtered and self.guard is None

    def step_uniforms(self) -> Tensor | None:
        """This step's uniforms (k,), drawing the next block every NOISE_BLOCK steps."""
        if self.sampler.greedy:
            return None
        at = self.t % NOISE_BLOCK
        if at == 0:  # one tuple of column views per block: a step's lookup costs no tensor indexing
            self.block = self.sampler._uniforms(self.seeds, self.t).unbind(1)  # NOISE_BLOCK x (k,)
        return self.block[at]

    def pick(self, logits: Tensor) -> Tensor:
        """Next ids (k,) from this group's rows (k, V): Sampler.ids's loop body."""
        if self.guard is not None:
            return self.guard.pick(logits, self.step_uniforms(), self.sampler._pick)
        return self.sampler._pick(logits, self.step_uniforms())

    def advance(self, ids: list[int], nxt: Tensor, logits: Tensor) -> bool:
        """Record the picked ids (``nxt`` as a list); send what is safe to send.
        True when the group is done."""
        self.t += 1
        if not self.spec.top and self.spec.stop is None and self.guard is None:  # the common case, kept short: every character goes out
            pieces = {}
            for b, i in enumerate(ids):
                s = self.streams[b]
                s.chars.append(self.vocab[i])
                s.sent = len(s.chars)
                pieces[b] = (self.vocab[i], ())
            self.channel.put(("text", pieces))
            if self.t >= self.spec.n:
                self.finish()
                return True
            return False
        info = None
        if self.spec.top:
            probs = torch.softmax(logits.float(), dim=-1)  # (k, V): the model's own distribution
            tp, ti = probs.topk(min(self.spec.top, probs.shape[-1]), dim=-1)
            chosen = probs.gather(1, nxt[:, None])[:, 0].tolist()
            info = [(chosen[b], [[self.vocab[i], p] for i, p in zip(ti[b].tolist(), tp[b].tolist())])
                    for b in range(self.k)]
        pieces: dict[int, tuple[str, list]] = {}
        for b, i in enumerate(ids):
            s = self.streams[b]
            if s.cut >= 0:
                continue
            if self.guard is not None and self.guard.ended[b] >= 0:
                s.end_copy()
                continue
            if info is not None:
                self.infos[b].append(info[b])
            start, end = s.add(self.vocab[i])
            if end > start:
                pieces[b] = (s.piece(start, end), self.infos[b][start:end] if info is not None else [])
        if pieces:
            self.channel.put(("text", pieces))
        stopped = all(s.cut >= 0 for s in self.streams)
        if self.t >= self.spec.n or stopped:
            self.finish()
            return True
        return False

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        pieces = {}
        for b, s in enumerate(self.streams):
            start, end = s.flush()
            if end > start:
                pieces[b] = (s.piece(start, end), self.infos[b][start:end] if self.spec.top else [])
        if pieces:
            self.channel.put(("text", pieces))
        samples = [{"text": self.spec.prime + s.final, "prime": self.spec.prime, "seed": seed,
                    "finish_reason": "copy" if s.copy_ended else "stop" if s.cut >= 0 else "length"}
                   for s, seed in zip(self.streams, self.seeds)]
        if self.guard is not None:
            for b, (sample, s) in enumerate(zip(samples, self.streams)):
                sample.update(max_copy=self.guard.max_copy, redirected=self.guard.redirected_before(b, len(s.final)))
        self.channel.put(("done", samples))

    def fail(self, message: str, status: int = 503) -> None:
        if not self.finished:
            self.finished = True
            self.channel.put(("error", (status, message)))


def _pick_plain(logits: Tensor, rows: list[int] | None, uniforms: list[Tensor], temperature: float) -> Tensor:
    """Next ids (G,) for G one-stream groups with the same temperature and no
    top-k/top-p, in one call: :func:`pick_ids` computes each row on its own,
    so each group gets the id it would get alone. ``rows`` None: every row
    of ``logits``, in order."""
    picked = logits if rows is None else logits.index_select(0, torch.tensor(rows))
    return pick_ids(picked, torch.cat(uniforms), temperature)  # (G,)


class Engine:
    """One model's worker: a thread that steps every active group together."""

    def __init__(self, served: ServedModel, limits: Limits):
        self.served = served
        self.limits = limits
        self.packed = PackedRNN(served.model)  # fp32: the numbers charnn sample uses below 16 samples
        self._cond = threading.Condition()
        self._pending: deque[Group] = deque()
        self._waiting = 0  # accepted, not yet in the batch (priming or queued)
        self._closing = False
        self._cancel_message: str | None = None
        self._prep = PrimeQueue(f"charnn-prime-{served.name}")
        self.primes = PrimeCache(self.packed, served.tokenizer)
        self._thread = threading.Thread(target=self._run, name=f"charnn-batch-{served.name}", daemon=True)
        self.steps = 0  # batched steps run (for tests and the benchmark)
        self.rows = 0  # streams in the batch now
        self.max_rows = 0  # the largest batch seen

    def start(self) -> None:
        self._thread.start()

    # -- the request side (event loop thread) ---------------------------------
    def reserve(self) -> None:
        with self._cond:
            if self._closing:
                raise ApiError(503, "the server is shutting down; retry against a running server",
                               headers={"Retry-After": "1"})
            if self._waiting >= self.limits.max_queue:
                raise Busy(self.served.name, self.limits.max_queue)
            self._waiting += 1

    def unreserve(self) -> None:
        with self._cond:
            self._waiting -= 1

    async def submit(self, spec: GenerateSpec, channel: Channel) -> Group:
        """Reserve a place (503 when the queue is full), read the prime on the
        priming thread, queue the group for the batch."""
        self.reserve()
        group = Group(spec, self.served, channel)
        if spec.n == 0:  # nothing to generate: charnn sample prints the prime alone
            self.unreserve()
            group.finish()
            return group
        try:  # the prime is read on its own thread, so a long one does not stall the batch
            await asyncio.wrap_future(self._prep.submit(self.primes.cost(spec.prime), group.prime, self.primes))
        except BaseException:
            self.unreserve()
            raise
        self.queue(group)
        return group

    def queue(self, group: Group) -> None:
        """Put a primed group in line for the batch (or end it if the server is closing)."""
        with self._cond:
            if self._closing:
                self._waiting -= 1
                group.fail(self._cancel_message or "the server is shutting down")
                self.dequeued(group)
                return
            self._pending.append(group)
            self._cond.notify()

    def dequeued(self, group: Group) -> None:
        """Called as a group leaves the queue (joins the batch, or is dropped).
        A hook for the batch worker process (:mod:`.worker`), which reports it."""

    def after_step(self) -> None:
        """Called after each batched step has handed out its characters. A hook
        for the batch worker process, which sends them to the HTTP process."""

    @property
    def prime_reads(self) -> int:
        """Primes read by the model so far (the rest were copies from the cache)."""
        return self.primes.reads

    def reset_stats(self) -> None:
        self.max_rows = 0

    def queued(self) -> int:
        with self._cond:
            return self._waiting

    def cancel_all(self, message: str) -> None:
        """End every queued and active stream with ``message`` (shutdown)."""
        with self._cond:
            self._closing = True
            self._cancel_message = message
            self._cond.notify()

    def close(self) -> None:
        self.cancel_all("the server is shutting down")
        self._thread.join(timeout=10)
        self._prep.shutdown()

    # -- the worker thread ----------------------------------------------------
    def _admit(self, active: list[Group]) -> list[Group]:
        """Wait for work; take queued groups while the batch has room."""
        with self._cond:
            while not self._pending and not active and not self._closing:
                self._cond.wait()
            if self._closing:
                for g in list(self._pending) + active:
                    g.fail(self._cancel_message or "the server is shutting down")
                for g in self._pending:
                    self.dequeued(g)
                self._waiting -= len(self._pending)
                self._pending.clear()
                return []
            rows = sum(g.k for g in active)
            joining = []
            while self._pending and rows + self._pending[0].k <= self.limits.max_batch:
                g = self._pending.popleft()
                self._waiting -= 1
                self.dequeued(g)
                if g.cancelled:
                    continue
                joining.append(g)
                rows += g.k
            return joining

    @staticmethod
    def _pick_each(active: list[Group], logits: Tensor) -> tuple[Tensor | None, list[tuple]]:
        """Next ids (B',) of the groups not cancelled, each picked from its own
        rows; and (group, first row, rows, ids) per such group."""
        live, plain, lo = [], {}, 0
        for g in active:
            if not g.cancelled:
                rows = logits[lo : lo + g.k]  # (k, V)
                if g.plain:
                    plain.setdefault(g.sampler.temperature, []).append(len(live))
                    live.append([g, lo, rows, None])
                else:
                    live.append([g, lo, rows, g.pick(rows)])  # (k,)
            lo += g.k
        for temperature, members in plain.items():
            picked = _pick_plain(logits, [live[i][1] for i in members],
                                 [live[i][0].step_uniforms() for i in members], temperature)
            for j, i in enumerate(members):
                live[i][3] = picked[j : j + 1]
        nxts = [x[3] for x in live]
        return (torch.cat(nxts) if nxts else None), live  # (B',)

    def _run(self) -> None:
        active: list[Group] = []
        state: list[Tensor] = []
        logits: Tensor | None = None
        while True:
            joining = self._admit(active)
            if self._closing:
                self.after_step()
                return
            try:
                with torch.inference_mode():
                    if joining:
                        parts = ([logits] if active else []) + [g.logits for g in joining]
                        logits = torch.cat(parts)  # (B, V)
                        state = [torch.cat(([state[i]] if active else []) + [g.state[i] for g in joining])
                                 for i in range(len(joining[0].state))]
                        for g in joining:
                            g.logits = g.state = None
                        active = active + joining
                    if not active:
                        continue
                    self.max_rows = max(self.max_rows, logits.shape[0])
                    # Each group picks from its own rows, exactly as charnn sample's batch of k would...
                    temperature = active[0].sampler.temperature
                    if all(g.batchable and not g.cancelled and g.sampler.temperature == temperature for g in active):
                        # The common case (one stream per request, the same temperature): one pick
                        # for the whole batch, no per-group tensors.
                        ids = _pick_plain(logits, None, [g.step_uniforms() for g in active], temperature)
                        live = [(g, b, None, None) for b, g in enumerate(active)]
                    else:
                        ids, live = self._pick_each(active, logits)
                    ids_list = ids.tolist() if ids is not None else []
                    # ...then takes its characters; finished and cancelled groups leave the batch.
                    keep_groups, keep_rows, at = [], [], 0
                    for g, lo, rows, nxt in live:
                        if not g.advance(ids_list[at : at + g.k], nxt, rows):
                            keep_groups.append(g)
                            keep_rows.append((lo, at))
                        at += g.k
                    if len(keep_groups) != len(active):
                        rows_at = [torch.arange(lo, lo + g.k) for g, (lo, _) in zip(keep_groups, keep_rows)]
                        ids_at = [torch.arange(a, a + g.k) for g, (_, a) in zip(keep_groups, keep_rows)]
                        if keep_groups:
                            index = torch.cat(rows_at)
                            state = [s.index_select(0, index) for s in state]
                            ids = ids.index_select(0, torch.cat(ids_at))
                        active = keep_groups
                    self.rows = sum(g.k for g in active)
                    self.after_step()  # the characters go out before the next step is computed
                    if active:
                        logits = self.packed.step(ids, state)  # (B, V); state updated in place
                        self.steps += 1
            except Exception as e:  # a bug must not take the server down: end these streams, go on
                for g in active + joining:
                    g.fail(f"internal error while generating ({type(e).__name__}: {e}); this is a bug in charnn", 500)
                active, state, logits = [], [], None
                self.rows = 0
                self.after_step()
