"""The analysis's compiled statistics equal their plain numpy definitions."""
import numpy as np
import pytest

import ibp
from ibp import _bits, analysis


def _agreement_by_definition(words, starts, piece, p):
    """``analysis._agreement`` spelled out on a (rows, p) table of the pieces."""
    W = words.itemsize * 8
    full, flip = (1 << W) - 1, 1 << (W - 1)
    rows = np.concatenate([words[s:s + piece].reshape(-1, p) for s in starts]).astype(object)
    n = rows.shape[0]
    r = np.arange(n)[:, None]
    diagonal = rows[r, (np.arange(p) + r) % p]   # word c of row r lands in column (c - r) mod p
    stride = max(1, p // n)
    spread = rows[r, (np.arange(p) + r * stride) % p]

    def agree(t):
        a, o = np.bitwise_and.reduce(t, axis=0), np.bitwise_or.reduce(t, axis=0)
        return np.mean([bin(~(x ^ y) & full).count("1") for x, y in zip(a, o)])

    def span(t):
        views = (t, t ^ flip, t & (full ^ flip))
        return np.median([min(int(v[:, c].max() - v[:, c].min()).bit_length() for v in views) for c in range(p)])

    return agree(rows), agree(diagonal), span(rows), span(spread)


@pytest.mark.parametrize("word_bits", [8, 16, 32, 64])
def test_agreement_is_its_definition(word_bits):
    rng = np.random.default_rng(word_bits)
    dtype = _bits.WORD_DTYPES[word_bits]
    for trial in range(40):
        p = int(rng.integers(1, 40))
        piece = p * int(rng.integers(1, 5))
        pieces = int(rng.integers(1, 6))
        n = pieces * piece + int(rng.integers(0, 9))
        top = 1 << min(word_bits, 63)
        words = (rng.integers(0, top, n, dtype=np.uint64), rng.integers(0, 5, n),     # noise, small values
                 rng.integers(0, 4, n).astype(np.uint64) << np.uint64(word_bits - 2),  # the top bits only
                 np.repeat(rng.integers(0, top, p, dtype=np.uint64)[None], -(-n // p), 0).ravel()[:n]  # per column
                 + rng.integers(0, 3, n).astype(np.uint64))[trial % 4]
        words = _bits.frozen(words.astype(dtype))
        starts = _bits.frozen(np.sort(rng.choice((n - piece) // p + 1, pieces, replace=False)) * p)
        got = analysis._agreement(words, starts, piece, p)
        assert got == pytest.approx(_agreement_by_definition(words, starts, piece, p), abs=1e-12), (trial, p, piece)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "float16", "int32", "uint8"])
def test_unit_size_is_what_the_encoder_writes(dtype):
    """Analysis scores models by ``codec.unit_size``: each unit's counted
    size equals the size of its encoding, one column or several, every
    kind of unit (raw noise, all matching, few and many exceptions)."""
    from ibp import codec, dtypes, encode
    from ibp.decode import unit_bits
    rng = np.random.default_rng(3)
    tables = (rng.standard_normal((300, 64)) * np.geomspace(1e-3, 1e3, 64),        # per-column scales
              np.where(rng.random((300, 64)) < 0.03, rng.standard_normal((300, 64)) * 1e4,
                       rng.standard_normal((300, 64))),                            # outliers: exceptions
              rng.integers(0, 255, (300, 64)).astype(np.float64))
    for x in tables:
        x = x.astype(dtypes.numpy_dtype(dtype))
        for word_bits in sorted({8 * x.itemsize, 8}):
            ct = ibp.compress(x, word_bits=word_bits)
            g, (t0, t1, fbits, ptot) = ct.geometry, ct.model.tables
            words = encode._words(dtypes.as_bytes(x)[0], ct.model)   # rotated or gathered as the model asks
            full = g.total_words // g.unit_words
            counted = [codec.unit_size(words, u * g.unit_words, t0, t1, g.word_bits, ct.model.period, g.unit_words,
                                       fbits, ptot)[1] for u in range(full)]
            assert counted == list(unit_bits(ct)[:full]), (word_bits, ct.model.period)


def test_models_of_equal_size_keep_the_fewer_exceptions():
    """Layer 0's fp16 MLP weights (MiniLM, rows cut to 128) fit a model of
    three fixed bits and 15% exceptions as well as one of two bits and
    1.4%, which encodes 3.7x and decodes 2.6x faster: EXCEPTION_TAX picks
    the latter, as for the other layers."""
    from ibp import codec, datasets, dtypes, encode
    for name, x in datasets.load("minilm-small-fp16").items():
        if not name.endswith("output.dense.weight"):
            continue
        x = np.asarray(x)
        ct = ibp.compress(x)
        g, (t0, t1, fbits, ptot) = ct.geometry, ct.model.tables
        words = encode._words(dtypes.as_bytes(x)[0], ct.model)
        misses = sum(codec.unit_size(words, u * g.unit_words, t0, t1, g.word_bits, ct.model.period, g.unit_words,
                                     fbits, ptot)[2] for u in range(g.total_words // g.unit_words))
        assert misses < 0.03 * g.total_words, name


def test_a_period_whose_model_alone_outweighs_the_best_is_not_learned(monkeypatch):
    """Two rows of 512 position ids: a 512-column model takes 32 kbit
    before any payload, more than the one-column model's whole tensor, so
    it is not learned (it was, at 1.2 ms a tensor of 2 KB)."""
    x = np.tile(np.arange(512, dtype=np.int16), (2, 1))
    data, _, shape, _ = ibp.dtypes.as_bytes(x)
    periods = []
    learn = analysis.learn
    monkeypatch.setattr(analysis, "learn", lambda sample, W, p, *a: periods.append(p) or learn(sample, W, p, *a))
    model = analysis.analyze_bytes(data, shape, 2)
    assert 512 not in periods
    assert model.period == 1
    monkeypatch.setattr(analysis, "_model_bits", lambda p, W: 0)   # no model too heavy: the wide period is tried
    periods.clear()
    analysis.analyze_bytes(data, shape, 2)
    assert 512 in periods


def _best_top_run_score(words, W, price):
    """Brute force: the best score, ``fixed bits * matches - price *
    misses``, of a level fixing bits [lo, W) or [lo, W - 1) of ``x - base``
    (mod 2**W), over every lo and every base among the words (a densest
    window can always start at one of them)."""
    v = words.astype(np.uint64)[None, :]
    best = -np.inf
    for hi, bases in ((W, v.T), (W - 1, v.T & np.uint64((1 << (W - 1)) - 1))):
        d = (v - bases) & np.uint64((1 << W) - 1)   # [base, word]
        for lo in range(hi):
            fixed = np.uint64(((1 << hi) - 1) & ~((1 << lo) - 1))
            matches = ((d & fixed) == 0).sum(axis=1)
            best = max(best, float(((hi - lo) * matches - price * (words.size - matches)).max()))
    return best


@pytest.mark.parametrize("word_bits", [8, 16, 32])
def test_levels_of_narrow_words_are_the_best_top_runs(word_bits):
    """_best_levels, scanning words in their own width, finds a level at
    least as good as every run ending at the top bit or just below it
    with any base, by brute force, for each price: windows that wrap
    around zero (small signed values), around the middle and plain."""
    rng = np.random.default_rng(word_bits)
    top = 1 << word_bits
    cases = [np.where(rng.random(400) < 0.95, rng.integers(-3, 4, 400) % top, rng.integers(0, top, 400)),
             (top // 2 + rng.integers(-40, 40, 300)) % top,
             np.where(rng.random(300) < 0.9, rng.integers(0, 1 << (word_bits // 2), 300), rng.integers(0, top, 300)),
             rng.integers(-9, 9, 300) % top]
    for words in cases:
        words = words.astype(f"u{word_bits // 8}")   # as _fit hands them over
        lo, hi, base = analysis._best_levels(words, word_bits, analysis.PRICES)[:3]
        for e, price in enumerate(analysis.PRICES):
            d = (words.astype(np.uint64) - np.uint64(base[e])) & np.uint64(top - 1)
            fixed = np.uint64(((1 << int(hi[e])) - 1) & ~((1 << int(lo[e])) - 1))
            matches = int(((d & fixed) == 0).sum())
            found = (int(hi[e]) - int(lo[e])) * matches - price * (words.size - matches)
            assert found >= _best_top_run_score(words, word_bits, price)


def _small_tensors():
    """Tensors of 65 B to 8 KiB of every class a checkpoint holds small: bias
    and norm vectors, small integers, constants, sparse, few values."""
    rng = np.random.default_rng(7)
    for n in (33, 100, 128, 384, 1000, 1024, 2048):
        normal = rng.standard_normal(n)
        for dtype in ("float64", "float32", "float16", "int64", "int32", "int16", "uint8"):
            for values in (normal * 0.02, 1 + normal * 0.01, rng.integers(0, 17, n), np.zeros(n),
                           np.where(rng.random(n) < 0.9, 0, normal), rng.choice([0.0, 1.0, 4.0], n),
                           np.arange(n)):
                x = np.asarray(values).astype(dtype)
                if 64 < x.nbytes <= 8192:
                    yield x
                    if n % 4 == 0:
                        yield x.reshape(-1, 1)   # one column: one candidate, as a vector has
    try:
        import torch
    except ImportError:
        return
    for n in (128, 384, 1536):
        for t in (torch.randn(n) * 0.05, torch.ones(n) + torch.randn(n) * 1e-3):
            yield t.to(torch.bfloat16)


def test_a_small_tensor_learned_whole_gets_the_model_the_search_gives(monkeypatch):
    """``_whole_model`` (one candidate learned straight from the kernel) gives
    the very model of the general search, or leaves the tensor to it."""
    from ibp import dtypes
    cases = [dtypes.as_bytes(x) for x in _small_tensors()]
    shortcut = [analysis.analyze_bytes(data, shape, dtypes.ITEMSIZE[name]) for data, name, shape, _ in cases]
    plans = [analysis._whole_plan(shape, dtypes.ITEMSIZE[name], data.size) for data, name, shape, _ in cases]
    taken = sum(plan is not None and analysis._whole_model(data, shape, dtypes.ITEMSIZE[name], *plan) is not None
                for (data, name, shape, _), plan in zip(cases, plans))
    monkeypatch.setattr(analysis, "_whole_plan", lambda *args: None)
    for (data, name, shape, _), fast in zip(cases, shortcut):
        slow = analysis.analyze_bytes(data, shape, dtypes.ITEMSIZE[name])
        assert (fast.word_bits, fast.period, fast.rotate, fast.gather) == \
            (slow.word_bits, slow.period, slow.rotate, slow.gather), (name, shape)
        for part in ("lo", "hi", "base"):
            assert np.array_equal(getattr(fast, part), getattr(slow, part)), (name, shape, part)
        for a, b in zip(fast.tables[:2], slow.tables[:2]):
            assert np.array_equal(a, b), (name, shape)
        assert fast.tables[2:] == slow.tables[2:]
    assert 0.1 * len(cases) < taken < len(cases)   # the shortcut is taken, and left where the search tries more


def test_a_small_tensor_learned_and_encoded_in_one_call_has_the_general_paths_bytes(monkeypatch):
    """``compress`` of a small tensor (``analysis.learned_and_encoded``:
    the model learned and the tensor encoded in one compiled call) gives
    the bytes that learning the model and encoding it apart give, or
    leaves the tensor to them where the model asks for more candidates."""
    import ibp
    from ibp import dtypes
    cases = list(_small_tensors())
    fast = [ibp.compress(x).to_bytes() for x in cases]
    taken = sum(analysis.learned_and_encoded(data, tuple(shape), dtypes.ITEMSIZE[name]) is not None
                for data, name, shape, _ in map(dtypes.as_bytes, cases))
    monkeypatch.setattr(analysis, "learned_and_encoded", lambda *args: None)
    for x, packed in zip(cases, fast):
        assert packed == ibp.compress(x).to_bytes(), (x.dtype, x.shape)
    assert 0.1 * len(cases) < taken < len(cases)
