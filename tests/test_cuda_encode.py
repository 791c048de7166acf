"""The GPU encoder (cuda/ibp_encode.cu, ibp/cuda_encode.py) writes exactly the
CPU encoder's bytes, checked without a GPU:

* the kernels, built for the CPU against cuda/host_emulation.cuh (which
  checks every global load, store and atomic, and every warp collective),
  run the packed passes (classify, device prefix sum, write) and the
  slotted pass with the CPU's model, and give ``ibp.compress``'s unit kinds,
  payload bits and row index, on generated and real tables, every word
  width, unit kind and layout, touching only the buffers they are given;
* ibp.cuda_encode's launcher runs on the CPU with CPU tensors standing for
  CUDA ones and the emulator for the GPU: ``compress`` (given and learned
  models, pinned and device payloads, the host waits it makes) and
  ``update_rows`` from "CUDA" values.
NVRTC and nvcc builds are in tests/test_cuda_build.py (every cuda/*.cu).
"""
import contextlib
import ctypes
import re
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import ibp
from ibp import cuda, cuda_encode, rotation
from ibp.encode import unpack_kinds
from kernel_cases import compress_case, sample, tensor_cases
from test_cuda_build import GXX, _Torch, kernel_path

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parent.parent


class Encoder:
    """cuda/ibp_encode.cu on the CPU, driven pass by pass as ibp.cuda_encode does."""

    def __init__(self, path):
        lib = ctypes.CDLL(path)
        lib.ibp_emu_error.restype = ctypes.c_char_p
        lib.ibp_emu_allow.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong, ctypes.c_int]
        lib.ibp_emu_launch_encode.argtypes = [ctypes.c_int, ctypes.c_ulonglong, ctypes.c_void_p]
        self.lib = lib

    def allow(self, array, writable=False):
        if array.nbytes:
            self.lib.ibp_emu_allow(array.ctypes.data, array.nbytes, int(writable))

    def launch(self, W, **args):
        for grid, vector in cuda_encode.launches(**args):
            if self.lib.ibp_emu_launch_encode(W, grid, vector.ctypes.data):
                raise AssertionError(f"encoder W={W}: {self.lib.ibp_emu_error().decode()}")

    def encode(self, x, model, layout, unit_rows=None, spare=0):
        """(packed kinds, payload words, payload bits, status) of ``x`` under
        ``model``; the kernels may touch only its words, the model table and
        the pass's own arrays (the payload ``spare`` words shorter)."""
        data, name, shape, _ = ibp.dtypes.as_bytes(x)
        W = model.word_bits
        g = ibp.geometry.Geometry.choose(shape, ibp.dtypes.ITEMSIZE[name], W, unit_rows)
        # the kernel encodes the words the model sees: rotated or gathered ones for such a model (ibp.rotation),
        # which ibp.cuda_encode refuses, so only the CPU makes them; here they show the kernel encodes them alike
        words = np.ascontiguousarray(rotation.transformed(np.ascontiguousarray(data).view(f"<u{W // 8}"),
                                                          model.rotate, model.gather))
        table = cuda_encode.encode_table(torch, *cuda_encode.model_tensors(torch, model), W).numpy()
        n = g.nunits
        kinds8 = np.full(n, 0xEE, np.uint8)
        sizes = np.zeros(n, np.int64)
        status = np.zeros(1, np.uint64)
        self.lib.ibp_emu_forbid_all()
        self.allow(words)
        self.allow(table)
        self.allow(kinds8, True)
        self.allow(status, True)
        common = dict(W=W, words=words.ctypes.data, total_words=g.total_words, U=g.unit_words, nunits=n,
                      period=model.period, model=table.ctypes.data, kinds=kinds8.ctypes.data,
                      slot_words=g.slot_words, status=status.ctypes.data)
        if layout == "slotted":
            payload = np.full(n * g.slot_words + 1 - spare, 0xAB, np.uint64)
            payload[-1] = 0
            self.allow(payload, True)
            self.launch(njobs=n, sizes=0, starts=0, payload=payload.ctypes.data, payload_words=payload.size,
                        mode=cuda_encode.SLOTTED, **common)
            return ibp.encode.pack_kinds(kinds8), payload, None, int(status[0])
        self.allow(sizes, True)
        self.launch(njobs=n, sizes=sizes.ctypes.data, starts=0, payload=0, payload_words=0,
                    mode=cuda_encode.CLASSIFY, **common)
        starts = np.cumsum(sizes) - sizes
        total = int(sizes.sum())
        payload = np.zeros(-(-total // 64) + 1 - spare, np.uint64)
        self.allow(starts)
        self.allow(payload, True)
        for u0, u1, _, _ in cuda_encode.write_chunks(starts, total, 64):   # several launches, as on the GPU
            self.launch(njobs=u1 - u0, first_unit=u0, sizes=0, starts=starts.ctypes.data,
                        payload=payload.ctypes.data, payload_words=payload.size, mode=cuda_encode.PACKED, **common)
        return ibp.encode.pack_kinds(kinds8), payload, total, int(status[0])


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    if GXX is None:
        pytest.skip("g++ is not on PATH")
    lib = tmp_path_factory.mktemp("emu") / "libibp_encode_emu.so"
    run = subprocess.run([GXX, "-std=c++17", "-O1", "-U_FORTIFY_SOURCE", "-shared", "-fPIC", "-DIBP_HOST_EMULATION",
                          "-x", "c++", kernel_path("ibp_encode.cu"), "-o", str(lib)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return Encoder(str(lib))


def assert_encodes_like_cpu(encoder, x, layout="packed", word_bits=None, unit_rows=None, ct=None):
    """Kernel output == ibp.compress(x) for its model; returns the unit kinds."""
    if ct is None:
        ct = ibp.compress(x, layout=layout, word_bits=word_bits, unit_rows=unit_rows)
    kinds, payload, bits, status = encoder.encode(x, ct.model, ct.layout, unit_rows)
    assert status == 0
    np.testing.assert_array_equal(kinds, ct.kinds)
    np.testing.assert_array_equal(payload, ct.payload)
    if ct.layout == "packed" and ct.geometry.nunits:    # (an empty tensor never reaches the GPU)
        assert bits == ct.payload_bits
        starts = np.concatenate(([0], np.cumsum(ibp.decode.unit_bits(ct))[:-1])).astype(np.int64)
        block, rel_bits, base, rel = ibp.encode.build_index(starts, bits)
        assert (block, rel_bits) == ct.index[:2]
        np.testing.assert_array_equal(base, ct.index[2])
        np.testing.assert_array_equal(rel, ct.index[3])
    return unpack_kinds(ct.kinds, np.arange(ct.geometry.nunits))


CASES = [((40, 24), np.float32, 0.05), ((6, 2500), np.float32, 0.2), ((700,), np.int16, 0.02),
         ((3, 5, 7), np.uint8, 0.3), ((2, 5000), np.float64, 0.1), ((64, 3), np.int64, 0.5), ((9, 16), np.float32, 0.0),
         ((33, 10), np.float16, 0.01), ((5, 7), np.float32, 1.0)]


@pytest.mark.parametrize("layout", ["packed", "slotted"])
@pytest.mark.parametrize("shape,dtype,noise", CASES)
def test_emulated_encode_matches_cpu(encoder, shape, dtype, noise, layout):
    rng = np.random.default_rng(abs(hash((shape, noise))) % 2**32)
    x = sample(rng, shape, dtype, noise)
    for word_bits in [W for W in (8, 16, 32, 64) if W <= 8 * np.dtype(dtype).itemsize]:
        try:
            ibp.compress(x[:1], word_bits=word_bits)
        except ValueError:
            continue   # this width does not fit the rows
        assert_encodes_like_cpu(encoder, x, layout, word_bits)
    assert_encodes_like_cpu(encoder, x, layout, unit_rows=1)


def test_every_unit_kind_and_width_is_written(encoder):
    """Tables chosen so that RAW, ALL, SPARSE and BITMAP units all occur at
    every word width, with and without secondary levels (a row per unit:
    grouped, their rows make too few units for every kind)."""
    rng = np.random.default_rng(4)
    seen = {}
    for dtype, W in ((np.uint8, 8), (np.float16, 16), (np.float32, 32), (np.float64, 64)):
        for noise in (0.0, 0.005, 0.3, 1.0):
            x = sample(rng, (96, 64), dtype, noise)
            kinds = assert_encodes_like_cpu(encoder, x, "packed", W, unit_rows=1)
            seen.setdefault(W, set()).update(kinds.tolist())
            assert_encodes_like_cpu(encoder, x, "packed", W)
            assert_encodes_like_cpu(encoder, x, "slotted", W)
    assert all(kinds == {0, 1, 2, 3} for kinds in seen.values()), seen


def test_secondary_levels_and_periods(encoder):
    """Two value clusters per column (secondary levels) and a per-column period."""
    rng = np.random.default_rng(8)
    cols = rng.integers(0, 2**20, 12).astype(np.int64)
    x = (cols + rng.integers(0, 4, (200, 12))).astype(np.int64)
    x[rng.random(x.shape) < 0.2] = -rng.integers(0, 2**40, 1)
    for layout in ("packed", "slotted"):
        ct = ibp.compress(x, layout=layout)
        assert ct.model.has_secondary
        assert_encodes_like_cpu(encoder, x, layout, ct=ct)
        lo = np.zeros((2, 12), np.uint8)
        hi = np.zeros((2, 12), np.uint8)
        base = np.zeros((2, 12), np.uint64)
        hi[0], base[0] = 64, cols.view(np.uint64) & ~np.uint64(3)
        lo[0] = 2
        model = ibp.Model(64, lo, hi, base)          # period 12: one column per element of a row
        assert_encodes_like_cpu(encoder, x, layout, ct=ibp.compress(x, model=model, layout=layout))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensor_cases(24, 16))
def test_emulated_encode_matches_cpu_property(encoder, case):
    x, ct = compress_case(case)
    assert_encodes_like_cpu(encoder, x, ct=ct)


def test_real_tables(encoder):
    from ibp import datasets
    available = datasets.available()
    tensors = []
    if "cora" in available:
        tensors.append(datasets.load("cora")["features"][:64])
    if "glove-50d" in available:
        tensors.append(datasets.load("glove-50d")["glove.6B.50d"][:400])
    if "minilm-bf16" in available:
        w = datasets.load("minilm-bf16")
        tensors += [w["encoder.layer.0.attention.self.query.weight"][:32], w["embeddings.LayerNorm.bias"]]
    if "minilm-fp32" in available:
        tensors.append(datasets.load("minilm-fp32")["encoder.layer.1.output.dense.weight"][:16])
    if not tensors:
        pytest.skip("no dataset packages installed")
    for x in tensors:
        for layout in ("packed", "slotted"):
            assert_encodes_like_cpu(encoder, x, layout)
        assert_encodes_like_cpu(encoder, x, "packed", unit_rows=1)


@pytest.mark.parametrize("layout", ["packed", "slotted"])
def test_a_payload_one_word_short_is_caught(encoder, layout):
    """Keeping the emulator honest: a payload buffer one word short makes the
    kernel flag it (status) rather than write past it; a region the
    emulator does not know is an error."""
    x = sample(np.random.default_rng(9), (40, 24), np.float32, 1.0)     # every unit raw: it fills its space
    ct = ibp.compress(x, layout=layout)
    _, _, _, status = encoder.encode(x, ct.model, layout, spare=2)
    assert status == 1
    W = ct.model.word_bits
    words = np.ascontiguousarray(x).reshape(-1).view(np.uint32)
    table = cuda_encode.encode_table(torch, *cuda_encode.model_tensors(torch, ct.model), W).numpy()
    kinds8, status = np.zeros(ct.geometry.nunits, np.uint8), np.zeros(1, np.uint64)
    encoder.lib.ibp_emu_forbid_all()
    for a, w in ((words[:-1], False), (table, False), (kinds8, True), (status, True)):   # the last word withheld
        encoder.allow(a, w)
    sizes = np.zeros(ct.geometry.nunits, np.int64)
    encoder.allow(sizes, True)
    with pytest.raises(AssertionError, match="load of 4 bytes .* outside every allowed region"):
        encoder.launch(W, words=words.ctypes.data, total_words=words.size, U=ct.geometry.unit_words,
                       nunits=ct.geometry.nunits, period=1, model=table.ctypes.data, kinds=kinds8.ctypes.data,
                       sizes=sizes.ctypes.data, starts=0, payload=0, payload_words=0,
                       slot_words=ct.geometry.slot_words, mode=cuda_encode.CLASSIFY, status=status.ctypes.data,
                       njobs=ct.geometry.nunits)


def test_encoder_arguments_match_the_launcher():
    src = open(kernel_path("ibp_encode.cu")).read()
    block = re.search(r"#define IBP_ENCODE_PARAMS(.*?)\n\n", src, re.S).group(1)
    assert tuple(re.findall(r"u64 (\w+)", block)) == cuda_encode.ENCODE_ARGS
    assert int(re.search(r"#define IBP_ENCODE_BLOCK (\d+)", src).group(1)) == cuda_encode.BLOCK
    assert int(re.search(r"#define IBP_COLUMN_WORDS (\d+)", src).group(1)) == cuda_encode.COLUMN_WORDS
    assert f"return {len(cuda_encode.ENCODE_ARGS)};" in src


def test_encode_table_matches_the_cpu_tables():
    """The kernel's model fields are Model.tables' (the CPU codec's), reordered."""
    rng = np.random.default_rng(3)
    for dtype in (np.uint8, np.float16, np.float32, np.float64):
        ct = ibp.compress(sample(rng, (50, 16), dtype, 0.2))
        m = ct.model
        t0, t1, fbits, ptot = m.tables
        table = cuda_encode.encode_table(torch, *cuda_encode.model_tensors(torch, m), m.word_bits).numpy()
        assert table[:2].tolist() == [fbits, ptot]
        cols = table[2:].reshape(m.period, cuda_encode.COLUMN_WORDS).view(np.uint64)
        for level, t in enumerate((t0, t1)):
            np.testing.assert_array_equal(cols[:, 0 + level], t[:, 0])    # base
            np.testing.assert_array_equal(cols[:, 2 + level], t[:, 1])    # fixed bits
            np.testing.assert_array_equal(cols[:, 4 + level], t[:, 2])    # low
            np.testing.assert_array_equal(cols[:, 6 + level], t[:, 3])    # high
            np.testing.assert_array_equal(cols[:, 8 + level], t[:, 4] + t[:, 5])   # shift
            np.testing.assert_array_equal(cols[:, 10 + level], t[:, 6])   # width
        np.testing.assert_array_equal(cols[:, 12], np.cumsum(t0[:, 6]) - t0[:, 6])


def test_write_chunks_cover_the_payload_once():
    rng = np.random.default_rng(6)
    sizes = rng.integers(0, 900, 500)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    total = int(sizes.sum())
    chunks = cuda_encode.write_chunks(starts, total, 1024)
    assert len(chunks) > 10
    assert [c[0] for c in chunks[1:]] == [c[1] for c in chunks[:-1]] and chunks[0][0] == 0 and chunks[-1][1] == 500
    assert [c[2] for c in chunks[1:]] == [c[3] for c in chunks[:-1]] and chunks[0][2] == 0
    assert chunks[-1][3] == -(-total // 64) + 1
    for u0, u1, w0, w1 in chunks[:-1]:    # a word a later unit writes is never copied early
        assert w1 * 64 <= starts[u1]


# -- the device learner ---------------------------------------------------------------

def test_learned_models_are_valid_and_fit():
    """The learner (torch ops, run here on the CPU) makes valid models that
    fix the bits the data shares: exponents of normal weights, the top
    bits of small integers, the zero low bits of bf16-in-fp32."""
    rng = np.random.default_rng(12)
    weights = (rng.standard_normal((300, 64)) * 0.02).astype(np.float32)
    ints = rng.integers(-5, 6, (300, 8)).astype(np.int64)
    padded = (weights.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    for x, W, P, expect in ((weights, 32, 1, 4), (ints, 64, 1, 50), (padded, 32, 1, 16)):
        words = torch.from_numpy(x.reshape(-1).view(cuda_encode.NUMPY_WORDS[W]).astype(np.int64))
        if W < 64:
            words &= (1 << W) - 1
        lo, hi, base = cuda_encode.learn(torch, words, W, P)
        model = ibp.Model(W, lo.numpy().astype(np.uint8), hi.numpy().astype(np.uint8), base.numpy().view(np.uint64))
        assert model.invariant_bits.min() >= expect, model
        ct = ibp.compress(x, model=model)
        assert ct.ratio > 1.05
        np.testing.assert_array_equal(ibp.decompress(ct), x)
    empty = cuda_encode.learn(torch, torch.from_numpy(rng.integers(0, 2**16, 4000)), 16, 1)
    assert all(int(t.abs().sum()) == 0 for t in empty)      # random words: nothing fixed, the empty level


# -- the launcher on the CPU ------------------------------------------------------------

class _Event:
    def __init__(self, log):
        self.log = log

    def query(self):
        return True

    def synchronize(self):
        self.log.append("event")


class _Stream:
    cuda_stream = 0

    def __init__(self, log):
        self.log = log

    def record_event(self):
        return _Event(self.log)

    def wait_event(self, event):
        assert isinstance(event, _Event)

    def wait_stream(self, stream):
        assert isinstance(stream, _Stream)

    def synchronize(self):
        self.log.append("stream")


class _Cuda:
    def __init__(self, log):
        self.log = log

    def is_available(self):
        return True

    def current_device(self):
        return 0

    def device(self, dev):
        return contextlib.nullcontext()

    def current_stream(self, dev=None):
        return _Stream(self.log)

    def Stream(self, dev=None):  # noqa: N802  (torch's name)
        return _Stream(self.log)

    def stream(self, stream):
        return contextlib.nullcontext()

    def synchronize(self, dev=None):
        self.log.append("device")

    def set_sync_debug_mode(self, mode):
        pass


class _CuPy:
    def __init__(self, encoder):
        class Module:
            def __init__(self, code, options, name_expressions):
                assert "--std=c++17" in options and "__global__" in code

            def get_function(self, name):
                W = int(re.match(r"ibp_encode<(\d+)>", name).group(1))

                def launch(grid, block, args):
                    assert block == (cuda_encode.BLOCK,) and all(isinstance(a, np.uint64) for a in args)
                    vector = np.array(args, dtype=np.uint64)
                    if encoder.lib.ibp_emu_launch_encode(W, grid[0], vector.ctypes.data):
                        raise AssertionError(encoder.lib.ibp_emu_error().decode())
                return launch

        self.RawModule = Module
        self.cuda = types.SimpleNamespace(
            Device=lambda index: contextlib.nullcontext(),
            Stream=types.SimpleNamespace(from_external=lambda handle: contextlib.nullcontext()))


class _Log(list):
    """The host's waits for the "GPU" (event, stream, or "upload": a copy to
    a device from pageable memory, which on CUDA waits for its stream), and
    the element counts of every conversion to int64."""
    int64_elements = ()


@pytest.fixture
def cpu_as_gpu(encoder, monkeypatch):
    """ibp.cuda_encode on the CPU: CPU tensors stand for CUDA ones, the
    emulator (every address allowed) for the GPU; ``log`` records each time
    the host waits (explicitly, or in a blocking upload)."""
    log = _Log()
    log.int64_elements = []
    fake = _Torch(torch)
    fake.cuda = _Cuda(log)
    real_empty, real_as_tensor, real_to = torch.empty, torch.as_tensor, torch.Tensor.to

    def as_tensor(data, *a, device=None, **k):
        if device is not None and not isinstance(data, torch.Tensor):
            log.append("upload")
        return real_as_tensor(data, *a, device=device, **k)

    def to(self, *a, non_blocking=False, **k):
        targets = a + tuple(k.values())
        if not non_blocking and any(isinstance(t, (torch.device, str)) for t in targets):
            log.append("upload")
        if torch.int64 in targets and self.dtype != torch.int64:
            log.int64_elements.append(self.numel())
        return real_to(self, *a, non_blocking=non_blocking, **k)

    fake.as_tensor = as_tensor
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: real_empty(*a, **k))
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self.clone())
    monkeypatch.setattr(cuda, "_imports", lambda: (fake, _CuPy(encoder)))
    monkeypatch.setattr(cuda, "_device", lambda torch, device: torch.device("cpu"))
    for name, value in (("_kernels", {}), ("_side_streams", {}), ("CHUNK_BYTES", 256)):
        monkeypatch.setattr(cuda_encode, name, value)
    monkeypatch.setattr(cuda_encode, "_tables", {})
    encoder.lib.ibp_emu_forbid_all()
    encoder.lib.ibp_emu_allow(None, 2**64 - 1, 1)
    yield log
    encoder.lib.ibp_emu_forbid_all()


@pytest.mark.parametrize("layout", ["packed", "slotted"])
def test_launcher_compresses_like_the_cpu(cpu_as_gpu, layout):
    log = cpu_as_gpu
    rng = np.random.default_rng(21)
    for x in (sample(rng, (300, 45), np.float32, 0.05), sample(rng, (70, 33), np.float16, 0.2),
              sample(rng, (1000,), np.int64, 0.1), sample(rng, (9, 3), np.uint8, 0.0)):
        t = torch.from_numpy(x)
        model = ibp.analyze(x)
        for payload in ("pinned", "device"):
            del log[:]
            ct = cuda_encode.compress(t, model=model, layout=layout, payload=payload)
            assert isinstance(ct, cuda_encode.GpuEncoded)
            assert log == (["event"] if layout == "packed" else [])       # the one wait: the packed size
            assert (ct.device_payload is None) == (payload == "pinned")
            assert ct.is_pinned() == (payload == "pinned")
            cpu = ibp.compress(t, model=model, layout=layout)
            assert ct.nbytes == cpu.nbytes
            assert ct.to_bytes() == cpu.to_bytes()
            np.testing.assert_array_equal(ibp.decompress(ct).numpy(), x)
        del log[:]
        learned = cuda_encode.compress(t, layout=layout)             # the model learned on the "device"
        assert log == (["event"] if layout == "packed" else [])       # learning waits for nothing
        assert learned.to_bytes() == ibp.compress(t, model=learned.model, layout=layout).to_bytes()
        np.testing.assert_array_equal(ibp.decompress(learned).numpy(), x)


@pytest.mark.parametrize("values", [[0, 2, 6], [4, 13, 37]])
def test_a_rotated_or_gathered_model_is_refused(cpu_as_gpu, values):
    x = np.random.default_rng(23).choice(np.array(values, np.int32), (100, 8))
    model = ibp.analyze(x)
    assert model.transforms_words   # see ibp.rotation: the GPU encoder does not rotate words or gather bits
    with pytest.raises(ValueError, match="rotate"):
        cuda_encode.compress(torch.from_numpy(x), model=model)
    assert not cuda_encode.compress(torch.from_numpy(x)).model.transforms_words   # its own learner never does


def test_launcher_odd_inputs(cpu_as_gpu):
    rng = np.random.default_rng(22)
    x = torch.from_numpy(sample(rng, (40, 64), np.float32, 0.1))
    view = x[:, 1:63]                                                 # not contiguous: read through a copy
    assert cuda_encode.compress(view).to_bytes() == ibp.compress(view, model=cuda_encode.compress(view).model).to_bytes()
    for shape in ((0, 5), (4, 0), ()):
        z = torch.zeros(shape)
        ct = cuda_encode.compress(z)
        assert ibp.decompress(ct).shape == shape
    with pytest.raises(ValueError, match="payload must be one of"):
        cuda_encode.compress(x, payload="pageable")
    with pytest.raises(ValueError, match="layout must be one of"):
        cuda_encode.compress(x, layout="slot")
    with pytest.raises(ValueError, match="contradicts"):
        cuda_encode.compress(x, model=ibp.analyze(x.numpy()), word_bits=16)
    with pytest.raises(TypeError):
        cuda_encode.compress(x, model="model")
    with pytest.raises(ValueError, match="not on a GPU"):
        ibp.compress(x, payload="device")
    wide = torch.from_numpy(sample(rng, (30, 64), np.float16, 0.1))
    m = ibp.compress(wide.numpy().view(np.uint64), word_bits=64).model   # 64-bit words over float16 rows
    assert cuda_encode.compress(wide, model=m).to_bytes() == ibp.compress(wide, model=m).to_bytes()


def _held_tensor_bytes(ct):
    """Bytes of the distinct tensor storages ``ct`` refers to (one level into
    lists and tuples)."""
    seen = {}
    for v in vars(ct).values():
        for t in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(t, torch.Tensor):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("payload", ["pinned", "device"])
@pytest.mark.parametrize("layout", ["packed", "slotted"])
def test_encoded_tensor_holds_only_its_compressed_bytes(cpu_as_gpu, layout, payload):
    """Once compress returns, the GPU's work is ordered on its stream, so the
    result keeps no scratch: not the input (or its contiguous copy), not the
    device payload of a pinned result.  A KV cache of compressed blocks must
    not hold each block's raw copy on the GPU."""
    x = torch.from_numpy(sample(np.random.default_rng(27), (400, 66), np.float32, 0.05))[:, 1:65]
    for model in (ibp.analyze(x.numpy()), None):
        ct = cuda_encode.compress(x, model=model, layout=layout, payload=payload)
        learned_copy = 3 * 2 * ct.geometry.unit_words * 8 if model is None else 0   # (lo, hi, base), int64
        assert _held_tensor_bytes(ct) <= ct.nbytes + 8 + learned_copy


@pytest.mark.parametrize("layout", ["packed", "slotted"])
def test_model_and_size_of_a_given_model_need_no_wait(cpu_as_gpu, layout):
    """A KV cache reads ``ct.model`` and sizes after every block: with the
    model given, neither waits for the GPU (the payload's copy goes on)."""
    log = cpu_as_gpu
    x = torch.from_numpy(sample(np.random.default_rng(28), (200, 40), np.float32, 0.05))
    model = ibp.analyze(x.numpy())
    for payload in ("pinned", "device"):
        ct = cuda_encode.compress(x, model=model, layout=layout, payload=payload)
        del log[:]
        assert ct.model is model and ct.is_pinned() == (payload == "pinned")
        size, ratio = ct.nbytes, ct.ratio
        assert log == []
        assert (size, ratio) == (ibp.compress(x, model=model, layout=layout).nbytes, ct.ratio)
        ct.kinds
        assert log == ["event"]


def test_learner_widens_only_its_sample(cpu_as_gpu):
    """The learned model is fitted on a sample of units: only those are
    widened to int64, not the whole tensor (8 times its size for 8-bit
    words, which a big tensor on a GPU has no room for)."""
    log = cpu_as_gpu
    x = torch.from_numpy(sample(np.random.default_rng(24), (4096, 256), np.uint8, 0.05))   # 1 MiB
    del log.int64_elements[:]
    ct = cuda_encode.compress(x)
    assert ct.to_bytes() == ibp.compress(x, model=ct.model).to_bytes()
    assert max(log.int64_elements) <= x.numel() // cuda_encode.SAMPLE_SHARE


def test_learner_helpers_are_exact():
    """The masks the learner makes on the device equal Model's table; bit
    lengths of W-bit words (64-bit ones negative as int64) are exact."""
    from ibp.model import LOW_MASK
    np.testing.assert_array_equal(cuda_encode._low_masks(torch, "cpu").numpy(), LOW_MASK.view(np.int64))
    rng = np.random.default_rng(26)
    words = rng.integers(0, 2**64, 3000, dtype=np.uint64) >> rng.integers(0, 65, 3000).astype(np.uint64)
    got = cuda_encode._bit_length(torch, torch.from_numpy(words.view(np.int64)).reshape(100, 30), 64)
    assert got.reshape(-1).tolist() == [int(w).bit_length() for w in words]


def test_units_too_long_for_the_kernel_are_refused(cpu_as_gpu):
    """The kernel counts a unit's words in 32 bits: a unit of 2**31 words or
    more (one whole row that no piece divides) is refused before anything is
    copied, never truncated."""
    args = dict.fromkeys(cuda_encode.ENCODE_ARGS, 1)
    cuda_encode.encode_args(**dict(args, U=(1 << 31) - 1))
    with pytest.raises(ValueError, match="words per unit"):
        cuda_encode.encode_args(**dict(args, U=1 << 31))
    row = torch.zeros(1, dtype=torch.uint8).expand(1, 4294967311)   # a prime number of bytes: one unit
    with pytest.raises(ValueError, match="too long for the GPU encoder"):
        cuda_encode.compress(row)


def test_device_payload_stays_on_the_device(cpu_as_gpu):
    """payload="device": kinds, model and size arrive without the payload
    crossing to the host; only reading ``payload`` copies it.  Host-side
    updates reach the device copy."""
    rng = np.random.default_rng(25)
    x = torch.from_numpy(sample(rng, (300, 45), np.float32, 0.05))
    for layout in ("packed", "slotted"):
        ct = cuda_encode.compress(x, layout=layout, payload="device")
        ct.kinds, ct.model, ct.nbytes, ct.ratio
        assert ct.__dict__["_payload"] is None
        expect = ibp.compress(x, model=ct.model, layout=layout)
        assert ct.to_bytes() == expect.to_bytes()
        assert ct.__dict__["_payload"] is not None
    rows, new = np.array([5, 0, 299, 5]), sample(rng, (4, 45), np.float32, 0.5)
    ct.update_rows(rows, new)
    expect.update_rows(rows, new)
    np.testing.assert_array_equal(ct.device_payload.numpy().view(np.uint64), expect.payload)


class _OnGpu(torch.Tensor):
    """A CPU tensor that ibp.compress and update_rows take for a CUDA one;
    what torch makes from it is a plain CPU tensor."""

    @property
    def device(self):
        return types.SimpleNamespace(type="cuda", index=0)

    def cpu(self):   # a copy on the host, as from a real CUDA tensor
        return self.as_subclass(torch.Tensor).clone()

    @classmethod
    def __torch_function__(cls, func, types=(), args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def test_device_smoke_encode_checks_pass_on_the_emulator(cpu_as_gpu, monkeypatch):
    """bench/device/smoke.py's encoder checks, run here with the emulator for
    the GPU, so the first GPU run meets no broken check."""
    import importlib.util
    path = ROOT / "bench" / "device" / "smoke.py"
    spec = importlib.util.spec_from_file_location("device_smoke", path)
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: torch.Tensor._make_subclass(_OnGpu, self.clone()))
    fake = cuda._imports()[0]
    got = smoke.encode_extras(fake)
    for label, ct, _, expect, _ in smoke.cases(40, 24)[::3]:
        got.update({f"{label} {k}": v for k, v in smoke.encode_paths(fake, expect, ct).items()})
    assert got and all(got.values()), [k for k, v in got.items() if not v]


@pytest.mark.parametrize("shape,unit_rows", [((60, 24), None), ((60, 24), 1), ((8, 40000), None), ((61, 10), None)])
def test_update_rows_from_cuda_values(cpu_as_gpu, shape, unit_rows):
    """Rows grouped in units (their unit's other rows decoded on the host),
    one row per unit, rows split in units, a short last unit; repeated rows."""
    log = cpu_as_gpu
    rng = np.random.default_rng(23)
    x = sample(rng, shape, np.float32, 0.05)
    host = ibp.compress(x, layout="slotted", unit_rows=unit_rows)
    gpu_made = cuda_encode.compress(torch.from_numpy(x), model=host.model, layout="slotted", unit_rows=unit_rows,
                                    payload="device")
    rows = np.array([3, shape[0] - 1, 0, 3, 7])
    new = sample(rng, (rows.size,) + shape[1:], np.float32, 0.5)
    expect = ibp.compress(x, layout="slotted", unit_rows=unit_rows)
    expect.update_rows(rows, new)
    for ct in (host, gpu_made):
        ct.kinds                                  # its arrival wait, if any, out of the count
        del log[:]
        ct.update_rows(rows, torch.Tensor._make_subclass(_OnGpu, torch.from_numpy(new)))
        assert log == ["stream"]
        np.testing.assert_array_equal(ct.payload, expect.payload)
        np.testing.assert_array_equal(ct.kinds, expect.kinds)
    np.testing.assert_array_equal(gpu_made.device_payload.numpy().view(np.uint64), expect.payload)


@pytest.mark.parametrize("values", [[0, 2, 6], [4, 13, 37]])
def test_update_rows_of_a_rotated_or_gathered_model_from_cuda_values(cpu_as_gpu, values):
    """The GPU encoder does not rotate words or gather bits: such rows are encoded on the host."""
    rng = np.random.default_rng(23)
    x = rng.choice(np.array(values, np.int32), (100, 8))
    ct = ibp.compress(x, layout="slotted")
    assert ct.model.transforms_words
    rows, new = np.array([3, 50, 3]), rng.choice(np.array(values + [7], np.int32), (3, 8))
    ct.update_rows(rows, torch.Tensor._make_subclass(_OnGpu, torch.from_numpy(new)))
    x[rows] = new
    np.testing.assert_array_equal(ibp.decompress(ct), x)
