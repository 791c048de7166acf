"""The reference baseline (bench/reference.py) against the algorithm as
DESIGN.md states it: an independent pure-Python model on small inputs,
hand-computed sizes, round trips, and the published Cora figure."""
import numpy as np
import pytest

import ibp.datasets
from ibp.bench import reference as R


def _bytes(x):
    return np.ascontiguousarray(x).reshape(-1).view(np.uint8)


def _oracle(words):
    """Mask, value, row flags, slots and bytes moved, bit by bit in Python."""
    N, n = words.shape
    W = words.dtype.itemsize * 8
    s = W // 8
    x = [[int(v) for v in row] for row in words]
    c = [[sum((x[i][j] >> b) & 1 for i in range(N)) for b in range(W)] for j in range(n)]
    best, mask, value = 0, [0] * n, [0] * n
    for t in R.THRESHOLDS:
        m, v = [0] * n, [0] * n
        for j in range(n):
            for b in range(W):
                if np.float32(c[j][b]) > t * np.float32(N):
                    m[j] |= 1 << b
                    v[j] |= 1 << b
                elif float(c[j][b]) < (1.0 - float(t)) * N:
                    m[j] |= 1 << b
        score = 0
        for i in range(N):
            saved = sum(bin(m[j]).count("1") for j in range(n) if x[i][j] & m[j] == v[j])
            score += saved - n if saved > n else 0
        if score > best:
            best, mask, value = score, m, v
    flags, slots, total = [], [], 0
    meta = -(-(-(-n // 8)) // s) * s
    for i in range(N):
        hit = [x[i][j] & mask[j] == value[j] for j in range(n)]
        saved = sum(bin(mask[j]).count("1") for j in range(n) if hit[j])
        data = -(-(n * s - saved // 8) // s) * s
        compressed = meta + data < n * s
        flags.append(compressed)
        total += meta + data if compressed else n * s
        if not compressed:
            slots.append(list(x[i]))
            continue
        slot = [0] * n
        for j in range(n):
            slot[j // W] |= hit[j] << (j % W)
        stream = []
        for j in range(n):
            for b in range(W - 1, -1, -1):
                if not hit[j] or not (mask[j] >> b) & 1:
                    stream.append((x[i][j] >> b) & 1)
        first = meta // s
        for k, bit in enumerate(stream):
            slot[first + k // W] |= bit << (W - 1 - k % W)
        slots.append(slot)
    total += 4 * -(-N // 32) + 2 * n * s
    return mask, value, flags, slots, total


def _structured(rng, rows, n, W, noisy_rows):
    """Words with per-column invariant bits (holes and all), a few exceptions,
    and some wholly random rows, so both row kinds and multi-run masks occur."""
    dt = np.dtype(f"<u{W // 8}")
    fixed = rng.random((n, W)) < 0.6
    weights = np.uint64(1) << np.arange(W, dtype=np.uint64)
    F = np.bitwise_or.reduce(np.where(fixed, weights, np.uint64(0)), axis=1).astype(dt)
    V = rng.integers(0, np.iinfo(dt).max, n, dtype=dt, endpoint=True) & F
    words = (V & F) | (rng.integers(0, np.iinfo(dt).max, (rows, n), dtype=dt, endpoint=True) & ~F)
    flip = rng.random((rows, n)) < 0.1
    words[flip] ^= F[np.nonzero(flip)[1]]
    words[:noisy_rows] = rng.integers(0, np.iinfo(dt).max, (noisy_rows, n), dtype=dt, endpoint=True)
    return words


@pytest.mark.parametrize("W, n", [(32, 5), (32, 40), (64, 4), (64, 9)])
def test_kernels_match_the_bit_level_model(W, n):
    rng = np.random.default_rng(W * 100 + n)
    words = _structured(rng, 48, n, W, noisy_rows=6)
    mask, value, flags, slots, total = _oracle(words)
    rt = R.compress(words, word_bits=W)
    assert any(flags) and not all(flags)  # the data exercises both row kinds
    assert rt.word_bits == W
    assert rt.mask.tolist() == mask and rt.value.tolist() == value
    got_flags = np.unpackbits(rt.flags.view(np.uint8), bitorder="little")[:len(flags)].astype(bool)
    assert got_flags.tolist() == flags
    assert rt.slots.tolist() == slots
    assert rt.nbytes == total == R.reference_size(words, W)
    assert np.array_equal(R.decompress(rt), words)


def test_sizes_by_hand_raw_and_compressed_rows():
    # 32-bit words, n = 8: a row is 32 bytes, meta = roundup(1, 4) = 4 bytes.
    # Every word's top 16 bits are rare (set in 2 of 102 rows): masked to 0.
    # Low 16 bits are set in exactly half the rows: they vary at every t.
    low = np.where(np.arange(102) % 2 == 0, 0x5555, 0xAAAA).astype(np.uint32)
    words = np.repeat(low[:, None], 8, axis=1)
    words[100, 4:] |= 0xFFFF0000  # 4 words match: saved 64 -> data 24, 4 + 24 < 32: compressed
    words[101, 3:] |= 0xFFFF0000  # 3 words match: saved 48 -> data 28, 4 + 28 = 32: raw
    rt = R.compress(words, word_bits=32)
    assert rt.mask.tolist() == [0xFFFF0000] * 8 and rt.value.tolist() == [0] * 8
    flags = np.unpackbits(rt.flags.view(np.uint8), bitorder="little")[:102]
    assert flags[:101].all() and not flags[101]
    # 100 rows of 4 + 16, one of 4 + 24, one raw 32; flags 4 words; mask + value 64
    assert rt.nbytes == R.reference_size(words, 32) == 100 * 20 + 28 + 32 + 16 + 64
    assert rt.slots[0, 0] == 0xFF  # participation bitmap, LSB first
    assert rt.slots[0, 1] == 0x55555555 and rt.slots[0, 4] == 0x55555555  # 16-bit residuals, MSB first
    assert rt.slots[0, 5:].tolist() == [0, 0, 0]
    # row 100: words 0-3 match (bitmap 0x0F, residuals in slot words 1-2), words 4-7 whole
    assert rt.slots[100, :7].tolist() == [0x0F] + [0x55555555] * 2 + [0xFFFF5555] * 4
    assert np.array_equal(rt.slots[101], words[101])
    assert np.array_equal(R.decompress(rt), words)


def test_nothing_saved_keeps_an_empty_mask_and_raw_rows():
    words = np.array([[0x0F0F0F0F, 0x00000000], [0xF0F0F0F0, 0xFFFFFFFF]], np.uint32)
    rt = R.compress(words, word_bits=32)
    assert rt.mask.tolist() == [0, 0] and rt.value.tolist() == [0, 0]
    assert rt.flags.tolist() == [0]
    assert rt.nbytes == 2 * 8 + 4 + 16
    assert np.array_equal(R.decompress(rt), words)


def test_threshold_sweep_and_ties_keep_the_lower_threshold():
    assert len(R.THRESHOLDS) == 7 and R.THRESHOLDS[0] == np.float32(0.7) and R.THRESHOLDS[-1] == 1.0
    # t = 1.0 masks nothing
    masks, values = R._masks(np.array([[0] * 16 + [5] * 16]), 5)
    assert masks[0].tolist() == [0xFFFFFFFF] and values[0].tolist() == [0xFFFF0000]
    assert masks[-1].tolist() == [0] and values[-1].tolist() == [0]
    # One word per row, 20 rows.  Bits 0-3 always 0; bit 16 set in 5 rows (masked at
    # t = 0.70 since 5 < 0.3*20, not at 0.75); other bits set in 10 rows.  Score at 0.70:
    # 15 rows x (5 - 1) = 60; at 0.75 .. 0.95: 20 rows x (4 - 1) = 60.  A tie: 0.70 wins.
    words = np.where(np.arange(20) < 10, 0xFFFEFFF0, 0).astype(np.uint32)[:, None]
    words[[0, 1, 2, 10, 11]] |= 1 << 16
    rt = R.compress(words, word_bits=32)
    assert rt.mask.tolist() == [0x1000F]
    assert rt.nbytes == 20 * 4 + 4 + 8  # meta 4 + data roundup(4 - 0, 4) = 8, not < 4: raw


@pytest.mark.parametrize("make", [
    lambda rng: rng.standard_normal((64, 48)).astype(np.float32),
    lambda rng: (rng.standard_normal((3, 10, 16)) * 0.01).astype(np.float16),
    lambda rng: rng.standard_normal(7).astype(np.float16),          # 14 bytes: raw
    lambda rng: rng.standard_normal((5, 3)).astype(np.float16),     # 6-byte rows: raw
    lambda rng: np.array(-0.0),                                     # 0-d
    lambda rng: np.zeros((0, 8), np.float32),
    lambda rng: np.full((4, 6), np.nan, np.float32),
    lambda rng: rng.integers(-(1 << 40), 1 << 40, (33, 4)),
])
def test_round_trip_any_tensor(make):
    x = make(np.random.default_rng(7))
    rt = R.compress(x)
    y = R.decompress(rt)
    assert y.dtype == x.dtype and y.shape == x.shape and np.array_equal(_bytes(y), _bytes(x))
    if rt.word_bits is None:
        assert rt.nbytes == x.nbytes
    else:
        assert rt.nbytes == min(rt.candidates.values())


def test_torch_bfloat16_and_word_choice():
    torch = pytest.importorskip("torch")
    x = torch.randn(64, 32).to(torch.bfloat16)
    rt = R.compress(x)
    assert set(rt.candidates) == {32, 64}
    assert rt.nbytes == min(rt.candidates.values()) == R.reference_size(x, rt.word_bits)
    assert np.array_equal(_bytes(R.decompress(rt)), x.view(torch.int16).numpy().reshape(-1).view(np.uint8))


def test_bad_word_bits():
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError):
        R.reference_size(x, 64)  # 12-byte rows are not whole 64-bit words
    with pytest.raises(ValueError):
        R.compress(x, word_bits=16)


def test_cora_ratio_is_about_22x():
    x = ibp.datasets.load("cora")["features"]
    rt = R.compress(x)
    assert rt.word_bits == 32 and set(rt.candidates) == {32}  # 1433 words: int64 does not fit
    assert 21.5 < x.nbytes / rt.nbytes < 22.7
    assert np.array_equal(R.decompress(rt), x)
