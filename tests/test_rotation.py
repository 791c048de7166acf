"""Rotated and gathered words (ibp.rotation): exact transforms of every width, a chunk at a time."""
import numpy as np
import pytest

from ibp import rotation


@pytest.mark.parametrize("W", [8, 16, 32, 64])
def test_rotations_match_the_integer_definition_and_undo(W, monkeypatch):
    monkeypatch.setattr(rotation, "CHUNK_WORDS", 7)   # chunk boundaries inside the array
    x = np.random.default_rng(W).integers(0, 2**W - 1, 100, dtype=f"u{W // 8}", endpoint=True)
    keep = x.copy()
    for r in (1, 3, W // 2, W - 1):
        y = rotation.transformed(x, r, 0)
        assert not y.flags.writeable and np.array_equal(x, keep)   # a copy: the input is untouched
        assert [int(v) for v in y] == [((int(v) >> r) | (int(v) << (W - r))) % 2**W for v in x]
        back = y.copy()
        rotation.transform_back(back, r, 0)
        assert np.array_equal(back, x)
    assert rotation.transformed(x, 0, 0) is x


def test_signed_words_rotate_as_their_bits():
    x = np.array([-9, -5, -1, 0, 7], np.int16)
    y = rotation.transformed(x, 2, 0)
    assert y.dtype == np.uint16 and [int(v) for v in y] == [((int(v) & 0xFFFF) >> 2 | (int(v) & 3) << 14) for v in x]
    back = y.view(np.int16).copy()
    rotation.transform_back(back, 2, 0)
    assert np.array_equal(back, x)


@pytest.mark.parametrize("W", [8, 16, 32, 64])
def test_gathers_match_the_bit_definition_and_undo(W, monkeypatch):
    """The bits under the mask move to the top in order, the others to the
    bottom in order (pext of each, docs/format.md section 3)."""
    monkeypatch.setattr(rotation, "CHUNK_WORDS", 7)
    rng = np.random.default_rng(W)
    x = rng.integers(0, 2**W - 1, 60, dtype=f"u{W // 8}", endpoint=True)
    keep = x.copy()
    for g in (1, 0b1010_0110 & (2**W - 1), int(rng.integers(1, 2**W - 1, dtype=np.uint64, endpoint=True)), 2**W - 1):
        y = rotation.transformed(x, 0, g)
        assert not y.flags.writeable and np.array_equal(x, keep)
        order = [b for b in range(W) if not g >> b & 1] + [b for b in range(W) if g >> b & 1]
        assert [int(v) for v in y] == [sum((int(v) >> b & 1) << i for i, b in enumerate(order)) for v in x]
        back = y.copy()
        rotation.transform_back(back, 0, g)
        assert np.array_equal(back, x)


def test_words_of_any_shape_and_layout_move_alike():
    """A 2-d block, and a strided view undone in place, as the flat words."""
    x = np.random.default_rng(5).integers(0, 2**16, (6, 10), dtype=np.uint16)
    y = rotation.transformed(x, 0, 0b0100_1000_0001_0010)
    assert y.shape == x.shape and np.array_equal(y.reshape(-1), rotation.transformed(x.reshape(-1), 0, 0b0100_1000_0001_0010))
    back = np.zeros((6, 20), np.uint16)
    back[:, ::2] = y
    rotation.transform_back(back[:, ::2], 0, 0b0100_1000_0001_0010)
    assert np.array_equal(back[:, ::2], x) and not back[:, 1::2].any()


def test_undoing_into_read_only_words_is_refused():
    y = rotation.transformed(np.arange(10, dtype=np.uint16), 3, 0)
    with pytest.raises(ValueError, match="writeable"):
        rotation.transform_back(y, 3, 0)
