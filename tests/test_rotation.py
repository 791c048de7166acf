"""Rotated words (ibp.rotation): exact rotations of every width, a chunk at a time."""
import numpy as np
import pytest

from ibp import rotation


@pytest.mark.parametrize("W", [8, 16, 32, 64])
def test_rotations_match_the_integer_definition_and_undo(W, monkeypatch):
    monkeypatch.setattr(rotation, "CHUNK_WORDS", 7)   # chunk boundaries inside the array
    x = np.random.default_rng(W).integers(0, 2**W - 1, 100, dtype=f"u{W // 8}", endpoint=True)
    keep = x.copy()
    for r in (1, 3, W // 2, W - 1):
        y = rotation.rotated(x, r)
        assert not y.flags.writeable and np.array_equal(x, keep)   # a copy: the input is untouched
        assert [int(v) for v in y] == [((int(v) >> r) | (int(v) << (W - r))) % 2**W for v in x]
        back = y.copy()
        rotation.rotate_back(back, r)
        assert np.array_equal(back, x)
    assert rotation.rotated(x, 0) is x


def test_signed_words_rotate_as_their_bits():
    x = np.array([-9, -5, -1, 0, 7], np.int16)
    y = rotation.rotated(x, 2)
    assert y.dtype == np.uint16 and [int(v) for v in y] == [((int(v) & 0xFFFF) >> 2 | (int(v) & 3) << 14) for v in x]
    back = y.view(np.int16).copy()
    rotation.rotate_back(back, 2)
    assert np.array_equal(back, x)
