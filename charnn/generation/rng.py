"""The sampler's random numbers: Philox4x32-10, a counter-based generator.

A counter-based generator computes draw ``t`` of seed ``s`` directly as a
function of ``(s, t)`` -- no hidden state to carry, so any program that
implements the same function draws the same numbers: ``charnn sample``,
``charnn serve`` and the JavaScript of an exported web page all do.

Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC 2011; the generator of cuRAND and Random123) uses only 32-bit
multiplications, additions and xors, so it is exact in any language. Here:

- key = the seed as two 32-bit words ``(seed mod 2^32, seed >> 32)``;
- counter = ``(t mod 2^32, t >> 32, 0, 0)`` for step ``t`` (0, 1, 2, ...);
- the uniform of that step is ``(x0 >> 5) * 2^26 + (x1 >> 6)`` over ``2^53``
  (x0, x1: the first two output words), a float64 in [0, 1) with 53 random bits.
"""

from __future__ import annotations

import numpy as np

M0, M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85  # key increments (golden ratio, sqrt(3) - 1)
ROUNDS = 10
_MASK = np.uint64(0xFFFFFFFF)


def philox4x32(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Philox4x32-10 of ``counter`` (..., 4) under ``key`` (..., 2), both
    uint32 (broadcast against each other): the four output words (..., 4)."""
    c = np.asarray(counter, dtype=np.uint64)
    k = np.asarray(key, dtype=np.uint64)
    c0, c1, c2, c3 = (c[..., i] for i in range(4))
    k0, k1 = k[..., 0], k[..., 1]
    for r in range(ROUNDS):
        p0 = c0 * np.uint64(M0)  # exact: a 32 x 32-bit product fits 64 bits
        p1 = c2 * np.uint64(M1)
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _MASK,
                          (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _MASK)
        if r + 1 < ROUNDS:
            k0 = (k0 + np.uint64(W0)) & _MASK
            k1 = (k1 + np.uint64(W1)) & _MASK
    return np.stack(np.broadcast_arrays(c0, c1, c2, c3), -1).astype(np.uint32)


def uniforms(seeds, start: int, count: int) -> np.ndarray:
    """The uniforms of steps ``start .. start + count - 1`` for each seed:
    float64 (len(seeds), count), each in [0, 1)."""
    seeds = np.asarray([int(s) for s in seeds], dtype=np.uint64).reshape(-1, 1)  # (B, 1)
    key = np.stack([seeds & _MASK, seeds >> np.uint64(32)], -1)  # (B, 1, 2)
    t = np.arange(start, start + count, dtype=np.uint64).reshape(1, -1)  # (1, n)
    zero = np.zeros_like(t)
    counter = np.stack([t & _MASK, t >> np.uint64(32), zero, zero], -1)  # (1, n, 4)
    out = philox4x32(counter, key).astype(np.uint64)  # (B, n, 4)
    bits = (out[..., 0] >> np.uint64(5)) * np.uint64(1 << 26) + (out[..., 1] >> np.uint64(6))
    return bits.astype(np.float64) * 2.0 ** -53
