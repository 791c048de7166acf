"""Tensors for the kernel tests (tests/test_cuda_build.py on the CPU
emulator, tests/test_gpu.py on a GPU): values that share most bits, with a
chosen share of random bit patterns, so every unit kind shows up."""
import numpy as np
from hypothesis import strategies as st


def sample(rng, shape, dtype, noise):
    """A constant plus small steps, with a fraction ``noise`` of random bit patterns."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    if dtype.kind == "f":
        base = (1.5 + rng.standard_normal(n) * 0.01).astype(dtype)
    else:
        base = (7 + rng.integers(-3, 4, n)).astype(dtype)
    bits = rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8).view(dtype)
    return np.where(rng.random(n) < noise, bits, base).reshape(shape)


@st.composite
def tensor_cases(draw, max_dim, wide):
    """(tensor, layout, word width or None): 0-3 dims of up to ``max_dim``,
    trailing dims sometimes ``wide`` times longer."""
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16, np.int8, np.uint16, np.int32, np.uint64]))
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.integers(0, max_dim), min_size=ndim, max_size=ndim)))
    if ndim:
        shape = (shape[0],) + tuple(s * draw(st.sampled_from([1, 1, wide])) for s in shape[1:])
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = sample(rng, shape, dtype, draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0])))
    return x, draw(st.sampled_from(["packed", "slotted"])), draw(st.sampled_from([None, 8, 16, 32, 64]))


def compress_case(case):
    """(x, compressed x) for a tensor_cases draw; a word width that does not
    fit x (wider than its rows allow) falls back to ibp's choice."""
    import ibp
    x, layout, word_bits = case
    try:
        return x, ibp.compress(x, word_bits=word_bits, layout=layout)
    except ValueError:
        return x, ibp.compress(x, layout=layout)
