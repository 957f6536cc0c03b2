"""What a sample copies from its training text (charnn.text.copyindex,
charnn.generation.copies): the index and the report against brute force on
random and real texts, the --max-copy guard checked by brute force over many
seeds, and the index cache against real damaged and crafted files."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charnn.generation.copies import CopyGuard, copy_report, maximal_spans
from charnn.generation.sample import generate, generate_samples
from charnn.storage.checkpoint import load_model
from charnn.text import copyindex
from charnn.text.copyindex import CopyIndex, is_suffix_array, load_or_build, suffix_array, text_codes
from conftest import make_text, train_tiny

WAR_AND_PEACE = Path("/work/shared/data/war-and-peace.txt")
if not WAR_AND_PEACE.is_file():
    WAR_AND_PEACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "war-and-peace.txt"

small_text = st.text(alphabet="ab", min_size=0, max_size=60) | st.text(alphabet="ab\u00e9\U0001F600\n", max_size=60)


def index_of(text: str) -> CopyIndex:
    return CopyIndex(text, suffix_array(text_codes(text)))


# ---------------------------------------------------------------------------
# Brute-force references
# ---------------------------------------------------------------------------

def brute_lengths(text: str, s: str) -> list[int]:
    out = []
    for i in range(len(s)):
        k = 0
        while i + k < len(s) and s[i : i + k + 1] in text:
            k += 1
        out.append(k)
    return out


def brute_report(text: str, s: str, prime_len: int, min_span: int) -> dict:
    """Every copied span by enumeration: (a, b) such that s[a:b] is in text
    and neither s[a-1:b] nor s[a:b+1] is."""
    n = len(s)
    spans = [(a, b) for a in range(n) for b in range(a + 1, n + 1)
             if s[a:b] in text and (a == 0 or s[a - 1 : b] not in text) and (b == n or s[a : b + 1] not in text)]
    longest = max((b - a for a, b in spans if b > prime_len), default=0)
    prime_longest = max((min(b, prime_len) - a for a, b in spans if a < prime_len), default=0)
    covered = {i for a, b in spans if b - a >= min_span for i in range(max(a, prime_len), b)}
    gen = n - prime_len
    return dict(longest=longest, prime_longest=prime_longest, share=len(covered) / gen if gen else 0.0,
                spans=[[a, b] for a, b in spans if b - a >= min_span])


def longest_copy_with_generated(text: str, s: str, prime_len: int, limit: int) -> int:
    """The longest span of ``s`` holding a generated character that occurs in
    ``text``, looking only for spans up to ``limit + 1`` long (enough to see
    one over the limit)."""
    best = 0
    for end in range(prime_len + 1, len(s) + 1):
        for k in range(1, limit + 2):
            if end - k < 0 or s[end - k : end] not in text:
                break
            best = max(best, k)
    return best


# ---------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(small_text)
def test_suffix_array_is_the_sorted_suffixes_and_the_checker_agrees(text):
    sa = suffix_array(text_codes(text))
    assert sa.dtype == np.int32 and sa.tolist() == sorted(range(len(text)), key=lambda i: text[i:])
    assert is_suffix_array(text_codes(text), sa)
    if len(text) >= 2:  # any other permutation (two neighbours swapped) is refused
        bad = sa.copy()
        bad[[0, -1]] = bad[[-1, 0]]
        assert not is_suffix_array(text_codes(text), bad)
        dup = sa.copy()
        dup[0] = dup[1]
        assert not is_suffix_array(text_codes(text), dup)


@settings(max_examples=300, deadline=None)
@given(small_text, st.text(alphabet="abc\u00e9", max_size=80), st.text(alphabet="ab\u00e9", max_size=5))
def test_match_lengths_and_followers_agree_with_brute_force(text, s, w):
    index = index_of(text)
    assert index.match_lengths(s) == brute_lengths(text, s)
    assert sorted(index.followers(w)) == sorted({text[i + len(w)] for i in range(len(text) - len(w))
                                                 if text.startswith(w, i)})


@settings(max_examples=200, deadline=None)
@given(small_text, st.text(alphabet="abc", max_size=40), st.integers(0, 45), st.integers(1, 6))
def test_report_agrees_with_brute_force_on_random_texts(text, s, prime_len, min_span):
    prime_len = min(prime_len, len(s))
    got = copy_report(index_of(text), s, prime_len, min_span).to_dict()
    want = brute_report(text, s, prime_len, min_span)
    assert {k: got[k] for k in want} == pytest.approx(want)


@pytest.fixture(scope="module")
def real_text() -> str:
    if not WAR_AND_PEACE.is_file():
        pytest.skip("War and Peace is not in ../shared/data")
    return WAR_AND_PEACE.read_text(encoding="utf-8")[:200_000]


def test_report_agrees_with_brute_force_on_a_real_text(real_text):
    """Samples pieced from the text itself (long copies) and from elsewhere in
    the book (short ones), checked position by position by plain search."""
    rng = random.Random(0)
    index = index_of(real_text)
    book = WAR_AND_PEACE.read_text(encoding="utf-8")
    for trial in range(6):
        pieces = []
        for _ in range(6):
            source = real_text if rng.random() < 0.5 else book[1_000_000:1_400_000]
            at = rng.randrange(len(source) - 80)
            pieces.append(source[at : at + rng.randint(5, 60)])
        s = "".join(pieces)
        lengths = index.match_lengths(s)
        assert lengths == brute_lengths(real_text, s)
        report = copy_report(index, s, prime_len=trial, min_span=20)
        spans = maximal_spans(lengths)
        for a, b in spans:  # each is a copy, and neither end can grow
            assert s[a:b] in real_text
            assert a == 0 or s[a - 1 : b] not in real_text
            assert b == len(s) or s[a : b + 1] not in real_text
        assert report.longest == max(b - a for a, b in spans if b > trial)
        assert report.spans == [(a, b) for a, b in spans if b - a >= 20]


# ---------------------------------------------------------------------------
# The guard, by brute force over many seeds
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def copier(tmp_path_factory):
    """A model trained until its samples copy whole phrases of its text."""
    corpus = tmp_path_factory.mktemp("copier") / "corpus.txt"
    corpus.write_text(make_text(3000, seed=1), encoding="utf-8")
    run = train_tiny(corpus, tmp_path_factory.mktemp("copier-run"), model={"hidden_size": 64}, max_steps=150,
                     eval_every=1000, lr=2e-2)
    model, tok, _ = load_model(run.last)
    return model, tok, run.text, index_of(run.text)


@pytest.mark.parametrize("max_copy, options", [
    (20, dict(temperature=0.6)),
    (20, dict(temperature=0)),
    (8, dict(temperature=1.0, top_k=5, prime="She sells sea shells")),
    (5, dict(temperature=0.8, top_p=0.9, stop=".")),
    (1, dict(temperature=0.7)),
])
def test_max_copy_is_never_exceeded_over_many_seeds(copier, max_copy, options):
    model, tok, text, index = copier
    prime = options.pop("prime", "")
    guard = CopyGuard(index, tok, max_copy)
    redirected = free_longest = 0
    for seed in range(0, 48, 8):
        samples = generate_samples(model, tok, prime, 150, num_samples=8, seed=seed, guard=guard, **options)
        free = generate_samples(model, tok, prime, 150, num_samples=8, seed=seed, **options)
        for s, f in zip(samples, free):
            assert longest_copy_with_generated(text, s.text, len(prime), max_copy) <= max_copy
            assert s.max_copy == max_copy and s.redirected is not None and s.redirected >= 0
            assert s.redirected == 0 or s.text != f.text or s.copy_ended
            redirected += s.redirected
            free_longest = max(free_longest, longest_copy_with_generated(text, f.text, len(prime), max_copy))
            if s.copy_ended:  # ended early: every character would have copied more
                assert all(s.text[-max_copy:] + c in text for c in tok.chars)
        again = generate_samples(model, tok, prime, 150, num_samples=8, seed=seed, guard=guard, **options)
        assert [s.text for s in again] == [s.text for s in samples]  # deterministic for a seed
    assert free_longest > max_copy  # without the guard these samples do copy more
    assert redirected > 0


def test_one_streamed_sample_equals_its_row_of_a_batch_with_the_guard(copier):
    model, tok, text, index = copier
    batch = generate_samples(model, tok, "The ", 200, num_samples=3, seed=5, temperature=0.7,
                             guard=CopyGuard(index, tok, 10))
    for i, s in enumerate(batch):
        guard = CopyGuard(index, tok, 10)
        one = "".join(generate(model, tok, "The ", 200, seed=5 + i, temperature=0.7, guard=guard))
        assert "The " + one == s.text
        assert guard.redirected_before(0, len(one)) == s.redirected


def test_every_character_masked_ends_the_sample_early():
    """A training text in which every character follows every other: with
    max_copy 1, no second character may follow, so the sample ends there."""
    from charnn.model.config import ModelConfig
    from charnn.model.rnn import CharRNN
    from charnn.text.tokenizer import CharTokenizer

    tok = CharTokenizer(list("ab"))
    model = CharRNN(ModelConfig(vocab_size=2, embedding_dim=4, hidden_size=8, num_layers=1, dropout=0.0))
    guard = CopyGuard(index_of("aabba"), tok, 1)
    s = generate_samples(model, tok, "", 50, num_samples=2, seed=0, guard=guard)
    assert [len(x.text) for x in s] == [1, 1] and all(x.copy_ended for x in s)
    assert list(generate(model, tok, "b", 50, seed=0, guard=CopyGuard(index_of("aabba"), tok, 1))) == []


def test_max_copy_zero_is_refused_with_what_to_use(copier):
    from charnn.errors import ConfigError

    _, tok, _, index = copier
    with pytest.raises(ConfigError, match="at least 1.*leave it out"):
        CopyGuard(index, tok, 0)


# ---------------------------------------------------------------------------
# The cache: real damaged and crafted files
# ---------------------------------------------------------------------------

def cache_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / ".cache" / "copies").glob("*.npy"))


def test_the_index_is_cached_and_a_truncated_entry_is_rebuilt(data_dir, real_text):
    sha = "ab" * 32
    first = load_or_build(real_text, sha)
    [entry] = cache_files(data_dir)
    assert np.array_equal(np.load(entry), first.sa)
    size = entry.stat().st_size
    os.truncate(entry, size // 2)
    messages = []
    again = load_or_build(real_text, sha, progress=messages.append)
    assert np.array_equal(again.sa, first.sa)
    [entry] = cache_files(data_dir)
    assert entry.stat().st_size == size  # rebuilt and stored whole


def test_a_crafted_entry_with_a_valid_checksum_is_refused_never_used(data_dir):
    """A permutation that is not the suffix array, saved under the name its own
    checksum gives: the checksum passes, the full check does not."""
    text = make_text(3000)
    sha = "cd" * 32
    truth = load_or_build(text, sha, cache=False).sa
    wrong = truth[::-1].copy()
    folder = data_dir / ".cache" / "copies"
    folder.mkdir(parents=True)
    np.save(folder / f"{sha[:24]}-{copyindex._digest(wrong)}.npy", wrong)
    got = load_or_build(text, sha)
    assert np.array_equal(got.sa, truth)
    assert copy_report(got, text[100:300], 0).longest == 200


@pytest.mark.parametrize("content", [b"", b"\x93NUMPY garbage", b"\x93NUMPY\x01\x00" + b"v" * 100])
def test_garbage_and_fifos_in_the_cache_are_misses(data_dir, content):
    text = make_text(2000)
    sha = "ef" * 32
    folder = data_dir / ".cache" / "copies"
    folder.mkdir(parents=True)
    (folder / f"{sha[:24]}-0000000000000000.npy").write_bytes(content)
    os.mkfifo(folder / f"{sha[:24]}-1111111111111111.npy")
    got = load_or_build(text, sha)
    assert got.sa.tolist() == sorted(range(len(text)), key=lambda i: text[i:])


def test_the_cache_keeps_its_bound(data_dir):
    for i in range(copyindex.CACHE_MAX_ENTRIES + 3):
        load_or_build(make_text(500, seed=i), f"{i:02x}" * 32)
    assert len(cache_files(data_dir)) == copyindex.CACHE_MAX_ENTRIES
