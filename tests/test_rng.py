"""The sampler's generator is Philox4x32-10 exactly as published (the web
page's JavaScript implements the same function; docs/export.md), and its
uniforms are what charnn.generation.rng documents."""

from __future__ import annotations

import numpy as np
import pytest

from charnn.generation.rng import philox4x32, uniforms

# Known-answer vectors of the Random123 library (kat_vectors, philox4x32_10).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_matches_the_published_known_answers(counter, key, expected):
    out = philox4x32(np.array(counter, dtype=np.uint32), np.array(key, dtype=np.uint32))
    assert tuple(int(v) for v in out) == expected


def test_uniforms_are_the_documented_function_of_seed_and_step():
    seeds = [0, 7, 2**32 + 5, 2**64 - 1]
    u = uniforms(seeds, 1000, 5)
    assert u.shape == (4, 5) and u.dtype == np.float64 and ((0 <= u) & (u < 1)).all()
    for i, seed in enumerate(seeds):
        for j, t in enumerate(range(1000, 1005)):
            x = philox4x32(np.array([t & 0xFFFFFFFF, t >> 32, 0, 0], dtype=np.uint32),
                           np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint32))
            assert u[i, j] == ((int(x[0]) >> 5) * 2**26 + (int(x[1]) >> 6)) / 2**53
    # Counter-based: any stretch of steps is the same numbers as the whole run's.
    assert np.array_equal(uniforms([7], 0, 70)[:, 64:], uniforms([7], 64, 6))
