"""Round trips and ratios on real tensors (ibp.datasets)."""
import numpy as np
import pytest

import ibp
from ibp import datasets

torch = pytest.importorskip("torch")


def as_bytes(t):
    return t.contiguous().view(torch.uint8).numpy().tobytes() if isinstance(t, torch.Tensor) else t.tobytes()


def check(tensors, layouts=("packed", "slotted"), rows=200):
    rng = np.random.default_rng(0)
    for name, x in tensors.items():
        for layout in layouts:
            ct = ibp.compress(x, layout=layout)
            assert as_bytes(ibp.decompress(ct)) == as_bytes(x), (name, layout)
            if x.ndim >= 1 and x.shape[0]:
                idx = rng.integers(-x.shape[0], x.shape[0], rows)
                assert as_bytes(ibp.decompress(ct, index=idx)) == as_bytes(x[idx]), (name, layout)


def test_cora_is_far_below_a_bit_per_word():
    x = datasets.load("cora")["features"]
    check({"cora": x})
    ct = ibp.compress(x)
    assert len(ct.to_bytes()) * 8 < 0.25 * x.size  # far under a bit per word
    assert ct.ratio > 150


def test_glove():
    x = datasets.load("glove-50d")["glove.6B.50d"]
    check({"glove": x[:100_000]})


@pytest.mark.parametrize("name", ["minilm-fp32", "minilm-bf16", "minilm-fp16"])
def test_minilm_weights(name):
    weights = datasets.load(name)
    big = {k: v for k, v in weights.items() if v.shape and v.shape[0] <= 1536}
    check(big, rows=64)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_minilm_small_checkpoints_are_cut_copies(dtype, tmp_path):
    full, small = datasets.load(f"minilm-{dtype}"), datasets.load(f"minilm-small-{dtype}")
    assert list(small) == list(full)
    for k, v in small.items():
        assert v.shape[0] == min(datasets.SMALL_ROWS, full[k].shape[0]) and v.shape[1:] == full[k].shape[1:]
        assert as_bytes(v) == as_bytes(full[k][:datasets.SMALL_ROWS])
        base = v._base if isinstance(v, torch.Tensor) else v.base
        assert base is None, k   # its own memory: a checkpoint writer sees 128 rows, not the whole tensor
    check(small, layouts=("packed",), rows=16)
    ibp.save(small, tmp_path / "small.ibp")
    back = ibp.load(tmp_path / "small.ibp")
    assert all(as_bytes(ibp.decompress(back[k])) == as_bytes(v) for k, v in small.items())


def test_minilm_kv_cache():
    kv = datasets.load("minilm-kv")
    check(dict(list(kv.items())[:4]), rows=3)  # one row per tensor: each gather decodes all of it
    x = kv["layer0.key"]
    flat = torch.from_numpy(x).reshape(-1, x.shape[-1])
    check({"kv-rows": flat}, layouts=("packed",))


def test_checkpoint_file_roundtrip(tmp_path):
    weights = datasets.load("minilm-bf16")
    ibp.save(weights, tmp_path / "minilm.ibp")
    back = ibp.load(tmp_path / "minilm.ibp", mmap=True)
    assert sorted(back) == sorted(weights)
    for k, v in weights.items():
        assert as_bytes(ibp.decompress(back[k])) == as_bytes(v), k
    raw = sum(v.numel() * v.element_size() for v in weights.values())
    assert (tmp_path / "minilm.ibp").stat().st_size < raw / 1.3


@pytest.mark.parametrize("widen", ["float32-as-float64", "bfloat16-as-float32"])
def test_padding_low_bits_beat_the_reference(widen):
    """Tensors whose low bits are padding (weights widened to a larger float)
    need half-width words to fix the exponent bits too."""
    from ibp.bench import reference
    w = datasets.minilm_weights()["encoder.layer.0.intermediate.dense.weight"]
    if widen == "float32-as-float64":
        x = w.astype(np.float64)
    else:
        x = torch.from_numpy(w).to(torch.bfloat16).float().numpy()
    ct = ibp.compress(x)
    assert ibp.decompress(ct).tobytes() == x.tobytes()
    ref = min(reference.reference_size(x, 32), reference.reference_size(x, 64))
    assert len(ct.to_bytes()) < ref
