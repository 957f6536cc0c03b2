"""charnn serve's primes: the state after a prime, kept for the next request
with the same prime (:class:`PrimeCache`), and the queue of primes waiting to
be read, shortest first (:class:`PrimeQueue`)."""

from __future__ import annotations

import heapq
import itertools
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any, Callable

from torch import Tensor

from ..model.fastrnn import PackedRNN
from ..generation.sample import start_ids

PRIME_CACHE = 64  # primes per model whose state is kept for the next request with the same prime


class PrimeQueue:
    """One thread reading primes, the cheapest waiting first (ties in order of
    arrival). Reading a 4,000-character prime takes a good part of a second on
    a mid-sized model; in order of arrival, a request with a short prime would
    wait for every long one before it. Shortest first, it waits for at most
    the one being read. Each prime is still read in one piece, as ``charnn
    sample`` reads it, so the text stays the same."""

    def __init__(self, name: str):
        self._heap: list[tuple[int, int, Future, Callable, tuple]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, cost: int, fn: Callable, *args: Any) -> Future:
        """Run ``fn(*args)`` on the reading thread; its result in a future."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                future.cancel()
                return future
            heapq.heappush(self._heap, (cost, next(self._order), future, fn, args))
            self._cond.notify()
        return future

    def shutdown(self) -> None:
        """Cancel what waits; the prime being read finishes on its own."""
        with self._cond:
            self._closed = True
            for _, _, future, _, _ in self._heap:
                future.cancel()
            self._heap.clear()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                _, _, future, fn, args = heapq.heappop(self._heap)
            if not future.set_running_or_notify_cancel():  # its request went away while it waited
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # the caller decides what a failure means
                future.set_exception(e)


class PrimeCache:
    """The state after a prime, read once and reused by later requests with the
    same prime (a page's user trying settings, a program's fixed preamble, the
    benchmark's "The "). Exact: ``forward_prime`` reads the prime as one
    stream and only then repeats the result for the batch's rows, so a copy of
    an earlier read is bit for bit a new one. Used on the priming thread only."""

    def __init__(self, packed: PackedRNN, tokenizer: Any, size: int = PRIME_CACHE):
        self.packed = packed
        self.tokenizer = tokenizer
        self.size = size
        self._items: OrderedDict[str, tuple[Tensor, list[Tensor]]] = OrderedDict()  # prime -> (1, V), [(1, H)]
        self.reads = 0  # primes read by the model (the rest were copies)

    def cost(self, prime: str) -> int:
        """What reading ``prime`` costs, in characters (0: a copy from the cache)."""
        return 0 if prime in self._items else len(prime)

    def get(self, prime: str, k: int) -> tuple[Tensor, list[Tensor]]:
        """Logits (k, V) and state after ``prime``, as new tensors."""
        item = self._items.get(prime)
        if item is None:
            item = self.packed.forward_prime(start_ids(self.tokenizer, prime), 1)  # the whole prime in one pass
            self.reads += 1
            self._items[prime] = item
            if len(self._items) > self.size:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(prime)
        logits, state = item
        return logits.repeat(k, 1), [part.repeat(k, 1) for part in state]
