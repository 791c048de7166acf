"""The CUDA sources build, and the kernels decode exactly like the CPU codec.

None of this needs a GPU:

* nvcc compiles every cuda/*.cu for sm_80 and sm_90, every kernel shape;
* NVRTC, which ibp.cuda and ibp.cuda_encode use at run time, compiles them
  (when its library is found: the nvidia-cuda-nvrtc wheel, or IBP_NVRTC
  naming the library);
* the kernels, built for the CPU against cuda/host_emulation.cuh and driven
  by ibp.cuda's own launch plans, decode bit for bit like ``ibp.decompress``
  on the CPU, report the same error for the same corrupted unit, and never
  load or store outside the buffers they are given (the emulator checks
  every global access and every warp collective, and fails the launch).
"""
import collections
import contextlib
import ctypes
import ctypes.util
import glob
import os
import re
import shutil
import subprocess
import types
import weakref
from importlib import resources

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ibp
from host_memory import RecordingRegistrar
from ibp import codec, cuda, memory, rotation
from kernel_cases import compress_case, sample, tensor_cases

KERNELS = resources.files("ibp.kernels")
SOURCES = sorted(p.name for p in KERNELS.iterdir() if p.name.endswith(".cu"))
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")


def kernel_path(name):
    path = KERNELS.joinpath(name)
    assert os.path.exists(str(path)), "tests need the kernels as files (an unzipped install)"
    return str(path)


# -- building ---------------------------------------------------------------------

def test_kernel_arguments_match_the_launcher():
    """ibp.cuda packs arguments in KERNEL_ARGS order: the kernel must declare the same."""
    src = open(kernel_path("ibp_decode.cu")).read()
    block = re.search(r"#define IBP_KERNEL_PARAMS(.*?)\n\n", src, re.S).group(1)
    names = re.findall(r"u64 (\w+)", block)
    assert tuple(names) == cuda.KERNEL_ARGS
    emu = open(kernel_path("host_emulation.cuh")).read()
    assert int(re.search(r"#define IBP_EMU_ARG_COUNT (\d+)", emu).group(1)) == len(cuda.KERNEL_ARGS)
    shapes = re.search(r"#define IBP_SHAPES\(X, W\)(.*)", src).group(1)
    assert tuple(tuple(map(int, s)) for s in re.findall(r"X\(W, (\d+), (\d+)\)", shapes)) == cuda.SHAPES


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", SOURCES)
def test_nvcc_builds(name, arch, tmp_path):
    out = tmp_path / f"{name}.{arch}.cubin"
    run = subprocess.run([NVCC, "-std=c++17", f"-arch={arch}", "-cubin", "-DIBP_INSTANTIATE_ALL",
                          "-o", str(out), kernel_path(name)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert out.stat().st_size > 0


def _nvrtc():
    candidates = [os.environ.get("IBP_NVRTC"), ctypes.util.find_library("nvrtc")]
    try:
        import nvidia
        for root in nvidia.__path__:
            candidates += sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    for path in filter(None, candidates):
        try:
            # NVRTC dlopens its builtins by name: load them from beside it first.
            for builtins in glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*")):
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


NVRTC_NAMES = {"ibp_decode.cu": [f"ibp_decode<{W}, {L}, {G}>" for W in (8, 16, 32, 64) for L, G in cuda.SHAPES],
               "ibp_encode.cu": [f"ibp_encode<{W}>" for W in (8, 16, 32, 64)]}   # what ibp.cuda(_encode) asks for


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", sorted(NVRTC_NAMES))
def test_nvrtc_builds(arch, name):
    lib = _nvrtc()
    if lib is None:
        pytest.skip("no NVRTC library (pip install nvidia-cuda-nvrtc, or set IBP_NVRTC)")
    source = KERNELS.joinpath(name).read_text().encode()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source, name.encode(), 0, None, None) == 0
    names = [n.encode() for n in NVRTC_NAMES[name]]
    for n in names:
        assert lib.nvrtcAddNameExpression(prog, n) == 0
    options = [f"-arch={arch}".encode(), b"--std=c++17"]
    rc = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    assert rc == 0, log.value.decode()
    for n in names:
        lowered = ctypes.c_char_p()
        assert lib.nvrtcGetLoweredName(prog, n, ctypes.byref(lowered)) == 0 and lowered.value
    lib.nvrtcDestroyProgram(ctypes.byref(prog))


# -- running on the CPU -------------------------------------------------------------

class Emulator:
    """The kernels built for the CPU, launched the way ibp.cuda launches them."""

    def __init__(self, path):
        lib = ctypes.CDLL(path)
        lib.ibp_emu_error.restype = ctypes.c_char_p
        lib.ibp_emu_allow.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong, ctypes.c_int]
        lib.ibp_emu_launch.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_ulonglong, ctypes.c_void_p]
        self.lib = lib

    def _allow(self, array, writable=False):
        if array.nbytes:
            self.lib.ibp_emu_allow(array.ctypes.data, array.nbytes, int(writable))

    def decode(self, ct, index=None, *, chunk_bytes=None, shape=None, out_words=None, stage=None, readable=None):
        """(output bytes, status word).  The output starts as 0xFF bytes.  The
        kernels may load the tables, the index and the payload words listed
        in ``readable`` as (first, end) pairs (default: all), or, for a
        chunked decode, only each chunk's own copy of exactly its words."""
        t = cuda.KernelTables(ct)
        if index is not None:
            index = np.ascontiguousarray(index).reshape(-1)
            words = index.size * t.row_words
        else:
            words = t.scalars["total_words"]
        out = np.full(words * ct.word_bits // 8, 0xFF, np.uint8)
        status = np.full(1, cuda.NO_ERROR, np.uint64)
        kinds = np.ascontiguousarray(ct.kinds)
        self.lib.ibp_emu_forbid_all()
        for a in (kinds, t.columns, t.index_base, t.index_rel) + (() if index is None else (index,)):
            self._allow(a)
        self._allow(out, True)
        self._allow(status, True)
        pointers = dict(kinds=kinds.ctypes.data, index_base=t.index_base.ctypes.data,
                        index_rel=t.index_rel.ctypes.data, columns=t.columns.ctypes.data, out=out.ctypes.data,
                        out_words=words if out_words is None else out_words, status=status.ctypes.data)
        whole = dict(payload=ct.payload.ctypes.data, lim_lo=0, lim_hi=t.limit_bits, **pointers)
        if chunk_bytes is None:
            for first, end in [(0, ct.payload.size)] if readable is None else readable:
                self._allow(ct.payload[first:end])
        rings = []
        if index is not None:
            launches = t.launches(njobs=index.size * t.scalars["split"], job_words=min(t.unit_words, t.row_words),
                                  shape=shape, stage=stage, index=index.ctypes.data,
                                  index_code=cuda.INDEX_CODES[index.dtype.name], **whole)
        elif chunk_bytes is None:
            launches = t.launches(njobs=t.nunits, job_words=t.unit_words, shape=shape, stage=stage, index=0,
                                  index_code=0, **whole)
        else:
            launches = []
            for u0, u1, w0, w1 in t.chunks(chunk_bytes):
                ring = ct.payload[w0:w1].copy()
                rings.append(ring)
                self._allow(ring)
                launches += t.launches(njobs=u1 - u0, job_words=t.unit_words, first_job=u0, shape=shape, stage=stage,
                                       payload=ring.ctypes.data - w0 * 8, lim_lo=w0 * 64, lim_hi=(w1 - 1) * 64,
                                       index=0, index_code=0, **pointers)
        for W, L, G, grid, args in launches:
            if self.lib.ibp_emu_launch(W, L, G, grid, args.ctypes.data):
                raise AssertionError(f"kernel W={W} L={L} G={G}: {self.lib.ibp_emu_error().decode()}")
        return out, int(status[0])


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if GXX is None:
        pytest.skip("g++ is not on PATH")
    lib = tmp_path_factory.mktemp("emu") / "libibp_emu.so"
    run = subprocess.run([GXX, "-std=c++17", "-O1", "-U_FORTIFY_SOURCE", "-shared", "-fPIC", "-DIBP_HOST_EMULATION",
                          "-x", "c++", kernel_path("ibp_decode.cu"), "-o", str(lib)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return Emulator(str(lib))


def raw_bytes(x):
    if hasattr(x, "numpy"):
        import torch
        return x.contiguous().reshape(-1).view(torch.uint8).numpy()
    return np.ascontiguousarray(x).reshape(-1).view(np.uint8)


def assert_same(emulator, ct, index=None, **kw):
    out, status = emulator.decode(ct, index, **kw)
    assert status == cuda.NO_ERROR, hex(status)
    # the kernels decode the words the model sees: a rotated or gathered model's (ibp.rotation) are turned back after
    rotation.transform_back(out.view(f"<u{ct.word_bits // 8}"), ct.model.rotate, ct.model.gather)
    np.testing.assert_array_equal(out, raw_bytes(ibp.decompress(ct, index=index)))


CASES = [((40, 24), np.float32, 0.05), ((6, 2500), np.float32, 0.2), ((700,), np.int16, 0.02),
         ((3, 5, 7), np.uint8, 0.3), ((2, 5000), np.float64, 0.1), ((64, 3), np.int64, 0.5), ((9, 16), np.float32, 0.0)]


@pytest.mark.parametrize("layout", ["packed", "slotted"])
@pytest.mark.parametrize("shape,dtype,noise", CASES)
def test_emulated_decode_matches_cpu(emulator, shape, dtype, noise, layout):
    rng = np.random.default_rng(abs(hash((shape, noise))) % 2**32)
    x = sample(rng, shape, dtype, noise)
    index = rng.integers(-shape[0], shape[0], (3, 4))
    for word_bits in [W for W in (8, 16, 32, 64) if W <= 8 * np.dtype(dtype).itemsize]:
        ct = ibp.compress(x, word_bits=word_bits, layout=layout)
        assert_same(emulator, ct)
        assert_same(emulator, ct, index.astype(np.int32))
        assert_same(emulator, ct, chunk_bytes=256)


def test_uniform_row_index_decodes(emulator):
    """Units of equal size (all raw, all matching) carry no row index; the
    GPU tables rebuild one."""
    rng = np.random.default_rng(5)
    for x in (rng.integers(0, 2**16, (70, 300)).astype(np.uint16), np.full((70, 300), 9, np.uint16)):
        ct = ibp.compress(x)
        assert ct.index[1] == 0
        assert_same(emulator, ct)
        assert_same(emulator, ct, rng.integers(-70, 70, 11))
        assert_same(emulator, ct, chunk_bytes=256)


@pytest.mark.parametrize("stage", [0, 2])
def test_every_team_shape_decodes_alike(emulator, stage):
    """The same units through every (lanes, warps) shape and staging mode."""
    rng = np.random.default_rng(7)
    for shape, dtype, noise in [((4, 3000), np.float32, 0.1), ((50, 12), np.int16, 0.05), ((5, 900), np.uint8, 0.3)]:
        ct = ibp.compress(sample(rng, shape, dtype, noise))
        index = rng.integers(0, shape[0], 5).astype(np.uint16)
        for team in cuda.SHAPES:
            assert_same(emulator, ct, shape=team, stage=stage)
            assert_same(emulator, ct, index, shape=team, stage=stage)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensor_cases(24, 16), st.integers(0, 2**32 - 1))
def test_emulated_decode_matches_cpu_property(emulator, case, seed):
    x, ct = compress_case(case)
    assert_same(emulator, ct)
    assert_same(emulator, ct, chunk_bytes=512)
    if x.ndim and x.shape[0]:
        rng = np.random.default_rng(seed)
        assert_same(emulator, ct, rng.integers(-x.shape[0], x.shape[0], rng.integers(0, 9)))


def test_real_data_slices(emulator):
    from ibp import datasets
    available = datasets.available()
    tensors = []
    if "cora" in available:
        tensors.append(datasets.load("cora")["features"][:40])
    if "glove-50d" in available:
        tensors.append(datasets.load("glove-50d")["glove.6B.50d"][:300])
    if "minilm-bf16" in available:
        w = datasets.load("minilm-bf16")
        tensors += [w["encoder.layer.0.attention.self.query.weight"][:24], w["embeddings.LayerNorm.bias"]]
    if not tensors:
        pytest.skip("no dataset packages installed")
    rng = np.random.default_rng(3)
    for x in tensors:
        for layout in ("packed", "slotted"):
            ct = ibp.compress(x, layout=layout)
            assert_same(emulator, ct)
            assert_same(emulator, ct, rng.integers(0, x.shape[0], 17))


def test_corrupted_units_fail_like_the_cpu(emulator):
    """Flip bits (mostly in unit headers): the kernels report the first
    failing job with the CPU's status code, or decode what the CPU decodes."""
    rng = np.random.default_rng(11)
    codes = {msg: code for code, msg in codec.ERRORS.items()}
    failures = 0
    for trial in range(60):
        shape, dtype, noise = CASES[trial % len(CASES)]
        ct = ibp.compress(sample(rng, shape, dtype, noise), layout=("packed", "slotted")[trial % 2])
        t = cuda.KernelTables(ct)
        payload = ct.payload.copy()
        starts = t.unit_starts() if ct.layout == "packed" else np.arange(t.nunits) * 64 * t.scalars["slot_words"]
        for _ in range(rng.integers(1, 4)):
            bit = int(rng.choice(starts)) + int(rng.integers(0, 48))
            if bit < t.limit_bits:
                payload[bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
        bad = ct._replace(payload=payload)
        index = rng.integers(0, ct.nrows, 6) if trial % 3 == 0 else None
        out, status = emulator.decode(bad, index)
        rotation.transform_back(out.view(f"<u{ct.word_bits // 8}"), ct.model.rotate, ct.model.gather)
        try:
            expect = raw_bytes(ibp.decompress(bad, index=index))
        except ibp.FormatError as e:
            unit, message = re.match(r"unit (\d+): (.*)", str(e)).groups()
            assert status != cuda.NO_ERROR and status & 0xFF == codes[message]
            job = status >> 8
            if index is None:
                assert job == int(unit)
            else:
                item, piece = divmod(job, t.scalars["split"])
                row = int(index[item])
                got = row * t.scalars["split"] + piece if t.scalars["split"] > 1 else row // t.scalars["group"]
                assert got == int(unit)
            failures += 1
        else:
            assert status == cuda.NO_ERROR
            np.testing.assert_array_equal(out, expect)
    assert failures >= 10


@pytest.mark.parametrize("dtype", list(cuda.INDEX_CODES))
def test_index_checked_in_the_kernel(emulator, dtype):
    rng = np.random.default_rng(5)
    x = sample(rng, (23, 70), np.float32, 0.1)
    ct = ibp.compress(x)
    info = np.iinfo(dtype)
    good = [0, 22, 5] + ([-1, -23] if info.min < 0 else [])
    bad = [23, int(info.max)] + ([-24, int(info.min)] if info.min < 0 else [])
    for b in bad:
        index = np.array(good + [b] + good, dtype=dtype)
        out, status = emulator.decode(ct, index)
        assert status == (len(good) << 8 | cuda.ST_INDEX)
        row = 70 * 4
        expect = raw_bytes(x[np.array(good, np.int64)])
        np.testing.assert_array_equal(out[:len(good) * row], expect)
        np.testing.assert_array_equal(out[len(good) * row:(len(good) + 1) * row], 0xFF)
    assert_same(emulator, ct, np.array(good, dtype=dtype))


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_slotted_units_are_read_only_up_to_their_encoding(emulator, stage):
    """What makes slotted tensors cheap to move: a unit's slot past its
    encoding (and the one word unaligned reads may touch) is never loaded."""
    from ibp.decode import unit_bits
    rng = np.random.default_rng(15)
    ct = ibp.compress(sample(rng, (40, 300), np.float32, 0.05), layout="slotted")
    S = ct.geometry.slot_words
    bits = unit_bits(ct)
    assert bits.sum() < 0.95 * bits.size * S * 64
    readable = [(u * S, -(-(u * S * 64 + int(b)) // 64) + 1) for u, b in enumerate(bits)]
    assert_same(emulator, ct, stage=stage, readable=readable)
    assert_same(emulator, ct, rng.integers(0, 40, 9), stage=stage, readable=readable)


def test_writes_stop_at_the_output_size(emulator):
    """A launch told of a smaller output writes nothing past it."""
    rng = np.random.default_rng(2)
    ct = ibp.compress(sample(rng, (30, 40), np.float32, 0.1))
    words = ct.geometry.total_words // 2
    out, status = emulator.decode(ct, out_words=words)
    assert status == cuda.NO_ERROR
    np.testing.assert_array_equal(out[:words * 4], raw_bytes(ibp.decompress(ct))[:words * 4])
    np.testing.assert_array_equal(out[words * 4:], 0xFF)


# -- the launcher (ibp.cuda) on the CPU ---------------------------------------------------

class _Event:
    def query(self):
        return True

    def synchronize(self):
        pass


class _Stream:
    cuda_stream = 0

    def record_event(self):
        return _Event()

    def wait_event(self, event):
        assert isinstance(event, _Event)

    def wait_stream(self, stream):
        assert isinstance(stream, _Stream)


class _Cuda:
    """torch.cuda with every stream and event already finished."""

    def is_available(self):
        return True

    def current_device(self):
        return 0

    def device(self, dev):
        return contextlib.nullcontext()

    def current_stream(self, dev=None):
        return _Stream()

    def Stream(self, dev=None):  # noqa: N802  (torch's name)
        return _Stream()

    def stream(self, stream):
        return contextlib.nullcontext()


class _Torch:
    """torch whose "CUDA device" is the CPU."""

    def __init__(self, torch):
        self._torch = torch
        self.cuda = _Cuda()

    def __getattr__(self, name):
        return getattr(self._torch, name)


class _CuPy:
    """CuPy whose kernels run in the emulator; pinned memory is addressable as is."""

    def __init__(self, emulator):
        emu = emulator

        class Module:
            def __init__(self, code, options, name_expressions):
                assert "--std=c++17" in options and len(name_expressions) == 1

            def get_function(self, name):
                W, L, G = map(int, re.match(r"ibp_decode<(\d+), (\d+), (\d+)>", name).groups())

                def launch(grid, block, args):
                    assert block == (cuda.BLOCK,) and all(isinstance(a, np.uint64) for a in args)
                    vector = np.array(args, dtype=np.uint64)
                    if emu.lib.ibp_emu_launch(W, L, G, grid[0], vector.ctypes.data):
                        raise AssertionError(emu.lib.ibp_emu_error().decode())
                return launch

        self.RawModule = Module
        self.cuda = types.SimpleNamespace(
            Device=lambda index: contextlib.nullcontext(),
            Stream=types.SimpleNamespace(from_external=lambda handle: contextlib.nullcontext()),
            runtime=types.SimpleNamespace(pointerGetAttributes=lambda p: types.SimpleNamespace(devicePointer=p)))


@pytest.fixture
def cpu_as_gpu(emulator, monkeypatch):
    """ibp.cuda running on the CPU: CPU tensors stand for CUDA ones, the
    emulator for the GPU (with every address allowed), fresh caches."""
    torch = pytest.importorskip("torch")
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: real_empty(*a, **k))
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self.clone())
    monkeypatch.setattr(memory, "registrar", RecordingRegistrar)   # ct.pin_memory() registers nothing
    fake = (_Torch(torch), _CuPy(emulator))
    monkeypatch.setattr(cuda, "_imports", lambda: fake)
    monkeypatch.setattr(cuda, "_device", lambda torch, device: real_torch_device("cpu"))
    for name, value in (("_kernels", {}), ("_copy_streams", {}), ("_host_tables", weakref.WeakKeyDictionary()),
                        ("_device_tables", weakref.WeakKeyDictionary()), ("_resident", weakref.WeakKeyDictionary()),
                        ("_pending", collections.defaultdict(collections.deque)), ("CHUNK_BYTES", 1024)):
        monkeypatch.setattr(cuda, name, value)
    emulator.lib.ibp_emu_forbid_all()
    emulator.lib.ibp_emu_allow(None, 2**64 - 1, 1)
    yield torch
    emulator.lib.ibp_emu_forbid_all()


def real_torch_device(name):
    import torch
    return torch.device(name)


def on_device(torch, values, dtype):
    """A CPU tensor that ibp.cuda takes for an index on the GPU."""
    class Device(torch.Tensor):
        @property
        def is_cuda(self):
            return True
    return torch.Tensor._make_subclass(Device, torch.from_numpy(np.asarray(values, dtype=dtype)))


def test_launcher_paths_on_the_cpu(cpu_as_gpu):
    torch = cpu_as_gpu
    rng = np.random.default_rng(12)
    for layout in ("packed", "slotted"):
        x = sample(rng, (300, 45), np.float32, 0.1)
        ct = ibp.compress(x, layout=layout)
        pinned, resident = ct.pin_memory(), cuda.to_device(ct)
        for source, path in ((ct, "auto"), (ct, "stream"), (pinned, "zero-copy"), (pinned, "stream"),
                             (pinned, "auto"), (resident, "auto")):
            out = torch.full(x.shape, -1.0)
            assert cuda.decompress(source, out=out, path=path, sync=True) is out
            np.testing.assert_array_equal(raw_bytes(out), raw_bytes(x))
        index = rng.integers(-300, 300, (4, 5))
        for source in (ct, pinned, resident):
            np.testing.assert_array_equal(raw_bytes(cuda.decompress(source, index=index)), raw_bytes(x[index]))
            for dtype in cuda.INDEX_CODES:
                values = (index % 300 if np.iinfo(dtype).min == 0 else index).astype(dtype)
                got = cuda.decompress(source, index=on_device(torch, values, dtype), sync=True)
                np.testing.assert_array_equal(raw_bytes(got), raw_bytes(x[values.astype(np.int64)]))
        cuda.check()
    with pytest.raises(ValueError):
        cuda.decompress(resident, path="stream")
    with pytest.raises(ValueError):
        cuda.decompress(ct, path="zero-copy")


def test_launcher_reports_errors_on_the_cpu(cpu_as_gpu):
    torch = cpu_as_gpu
    rng = np.random.default_rng(13)
    x = sample(rng, (40, 30), np.float32, 0.1)
    ct = ibp.compress(x).pin_memory()
    with pytest.raises(IndexError, match="index 40 is out of range for 40 rows"):
        cuda.decompress(ct, index=on_device(torch, [1, 40, 2], np.int32), sync=True)
    with pytest.raises(IndexError):
        cuda.decompress(ct, index=[1, 40])                    # host index: at once
    cuda.decompress(ct, index=on_device(torch, [-41], np.int64))
    with pytest.raises(IndexError, match="index -41"):
        cuda.check()
    cuda.check()
    cuda.decompress(ct, index=on_device(torch, [2**63], np.uint64))
    with pytest.raises(IndexError):
        cuda.decompress(ct)                                   # the next call reports it
    seen = 0
    for trial in range(30):
        y = ibp.compress(sample(rng, (50, 64), np.float32, 0.2), layout=("packed", "slotted")[trial % 2])
        t = cuda.KernelTables(y)
        payload = y.payload.copy()
        starts = t.unit_starts() if y.layout == "packed" else np.arange(t.nunits) * 64 * t.scalars["slot_words"]
        for bit in rng.choice(starts, 2) + rng.integers(0, 40, 2):
            payload[bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
        bad = y._replace(payload=payload)
        try:
            expect = ibp.decompress(bad)
        except ibp.FormatError as e:
            for source in (bad, bad.pin_memory(), cuda.to_device(bad)):
                with pytest.raises(ibp.FormatError, match=re.escape(str(e))):
                    cuda.decompress(source, sync=True)
            seen += 1
        else:
            np.testing.assert_array_equal(cuda.decompress(bad, sync=True).numpy(), expect)
    assert seen


def wide_words(x):
    """float16 ``x`` as 64-bit words, which files may hold (compress picks W <= 16)."""
    from ibp.geometry import Geometry
    ct = ibp.compress(x.view(np.uint64), word_bits=64)
    return ct._replace(dtype="float16", shape=x.shape, geometry=Geometry(x.shape, 2, 64, ct.geometry.unit_words))


def test_launcher_odd_cases_on_the_cpu(cpu_as_gpu):
    torch = cpu_as_gpu
    rng = np.random.default_rng(14)
    x = sample(rng, (30, 64), np.float16, 0.1)
    ct = wide_words(x)
    big = torch.full((30 * 64 + 1,), -1.0, dtype=torch.float16)
    out = big[1:].view(30, 64)                                  # not 8-byte aligned: decoded through a copy
    cuda.decompress(ct, out=out, sync=True)
    np.testing.assert_array_equal(out.numpy(), x)
    slotted = ibp.compress(x, layout="slotted").pin_memory()
    np.testing.assert_array_equal(cuda.decompress(slotted).numpy(), x)
    new = sample(rng, (2, 64), np.float16, 0.9)
    slotted.update_rows([4, 9], new)
    x[[4, 9]] = new
    np.testing.assert_array_equal(cuda.decompress(slotted, sync=True).numpy(), x)
    resident = cuda.to_device(slotted)
    resident.update_rows([0], new[:1])
    x[0] = new[0]
    np.testing.assert_array_equal(cuda.decompress(resident, sync=True).numpy(), x)
    for shape in ((0, 5), (4, 0), ()):
        z = np.zeros(shape, np.float32)
        assert cuda.decompress(ibp.compress(z), sync=True).shape == shape
    assert cuda.decompress(ibp.compress(np.zeros((4, 0), np.int16)), index=on_device(torch, [3, -4], np.int8)).shape \
        == (2, 0)


def test_auto_path_streams_whole_tensors_the_copy_engine_moves_faster(monkeypatch):
    x = np.random.default_rng(15).standard_normal((4000, 64)).astype(np.float32)
    packed, slotted = ibp.compress(x), ibp.compress(x, layout="slotted")
    monkeypatch.setattr(cuda, "STREAM_MIN_BYTES", 0)
    assert cuda.whole_tensor_path(packed, pinned=True) == "stream"       # payload == bytes read: DMA wins
    assert cuda.whole_tensor_path(packed, pinned=False) == "stream"
    sparse = ibp.compress(np.zeros((4000, 64), np.float32), layout="slotted")
    assert sparse.transfer_nbytes * 50 < sparse.payload.nbytes
    assert cuda.whole_tensor_path(sparse, pinned=True) == "zero-copy"     # slots mostly empty: read in place
    rate = slotted.payload.nbytes / slotted.transfer_nbytes                # payload / bytes a kernel reads
    monkeypatch.setattr(cuda, "DMA_RATE", cuda.ZERO_COPY_RATE * rate * 1.01)
    assert cuda.whole_tensor_path(slotted, pinned=True) == "stream"
    monkeypatch.setattr(cuda, "DMA_RATE", cuda.ZERO_COPY_RATE * rate * 0.99)
    assert cuda.whole_tensor_path(slotted, pinned=True) == "zero-copy"
    monkeypatch.setattr(cuda, "STREAM_MIN_BYTES", packed.payload.nbytes + 1)
    assert cuda.whole_tensor_path(packed, pinned=True) == "zero-copy"


def test_stream_plan_is_made_once_and_fills_in_each_calls_pointers():
    x = np.random.default_rng(16).standard_normal((3000, 40)).astype(np.float32)
    tables = cuda.KernelTables(ibp.compress(x))
    plan = tables.stream_plan(4096)
    assert tables.stream_plan(4096) is plan and len(plan.chunks) > plan.slots
    pointers = dict(kinds=11, index_base=12, index_rel=13, columns=14, out=15, out_words=16, status=17)
    for i, (u0, u1, w0, w1) in enumerate(plan.chunks):
        fresh = tables.launches(njobs=u1 - u0, job_words=tables.unit_words, first_job=u0, lim_lo=w0 * 64,
                                lim_hi=(w1 - 1) * 64, index=0, index_code=0,
                                payload=1000 + plan.slot_offset(i) - w0 * 8, **pointers)
        got = plan.chunk_args(i, 1000, pointers)
        assert [g[:4] for g in got] == [f[:4] for f in fresh]
        for g, f in zip(got, fresh):
            np.testing.assert_array_equal(g[4], f[4])


def test_streamed_decode_starts_its_copies_first_and_records_the_host_use(cpu_as_gpu, monkeypatch):
    order = []
    real_copy, real_launch = cuda._Streamer._copy, cuda._launch
    monkeypatch.setattr(cuda._Streamer, "_copy", lambda self, i: order.append(("copy", i)) or real_copy(self, i))
    monkeypatch.setattr(cuda, "_launch", lambda *a: order.append(("launch",)) or real_launch(*a))
    monkeypatch.setattr(cuda, "_device_tables_of", lambda *a, real=cuda._device_tables_of: (
        order.append(("tables",)), real(*a))[1])
    x = sample(np.random.default_rng(17), (600, 45), np.float32, 0.1)
    ct = ibp.compress(x)
    np.testing.assert_array_equal(raw_bytes(cuda.decompress(ct, path="stream", sync=True)), raw_bytes(x))
    slots = cuda.RING_SLOTS
    assert order[:slots] == [("copy", i) for i in range(slots)]            # before the tables and launches
    assert order[slots] == ("tables",)
    assert sorted(i for op, *i in order if op == "copy") == [[i] for i in range(len(cuda._tables_of(ct)
                                                                                     .stream_plan(cuda.CHUNK_BYTES).chunks))]
    assert isinstance(ct._gpu_last_use, cuda.GpuUses)


def test_gpu_uses_wait_for_every_stream():
    synced = []

    class Event:
        def __init__(self, name):
            self.name = name

        def synchronize(self):
            synced.append(self.name)

    class Stream:
        def __init__(self, handle):
            self.cuda_stream, self.n = handle, 0

        def record_event(self):
            self.n += 1
            return Event((self.cuda_stream, self.n))

    uses, a, b = cuda.GpuUses(), Stream(1), Stream(2)
    uses.record(a)
    uses.record(b)
    uses.record(a)
    uses.synchronize()
    assert sorted(synced) == [(1, 2), (2, 1)]       # the latest event of each stream


@pytest.mark.parametrize("values", [[0, 2, 6], [4, 13, 37]])
def test_rotated_and_gathered_models_decode_through_the_host(cpu_as_gpu, values):
    """A rotated or gathered model (ibp.rotation, format versions 3 and 4)
    is decoded on the CPU and copied over: the kernels do not turn words
    back."""
    torch = cpu_as_gpu
    rng = np.random.default_rng(16)
    x = rng.choice(np.array(values, np.int32), (200, 12))
    packed = ibp.compress(x)
    assert packed.model.transforms_words
    for ct in (packed, ibp.compress(x, layout="slotted").pin_memory(), cuda.to_device(packed)):
        np.testing.assert_array_equal(cuda.decompress(ct, sync=True).numpy(), x)
        out = torch.full(x.shape, -1, dtype=torch.int32)
        assert cuda.decompress(ct, out=out) is out
        np.testing.assert_array_equal(out.numpy(), x)
        index = rng.integers(-200, 200, (3, 4))
        np.testing.assert_array_equal(cuda.decompress(ct, index=on_device(torch, index, np.int64)).numpy(), x[index])
        with pytest.raises(IndexError):
            cuda.decompress(ct, index=on_device(torch, [200], np.int64))
        with pytest.raises(ValueError, match="need"):
            cuda.decompress(ct, out=torch.zeros((200, 11), dtype=torch.int32))
        with pytest.raises(ValueError, match="whole tensors"):
            cuda.decompress(ct, index=on_device(torch, [1], np.int64), path="stream")
    with pytest.raises(ValueError, match="pinned"):
        cuda.decompress(packed, path="zero-copy")
    with pytest.raises(ValueError, match="on the device"):
        cuda.decompress(cuda.to_device(packed), path="stream")
    np.testing.assert_array_equal(cuda.decompress(packed.pin_memory(), path="zero-copy").numpy(), x)


@pytest.mark.parametrize("values", [[-9, -5, -1, 7], [4, 13, 37]])
def test_the_kernels_decode_a_rotated_or_gathered_models_words(emulator, values):
    """What a GPU rotate-back would start from: the kernels decode the
    rotated or gathered words as they decode any others."""
    x = np.random.default_rng(17).choice(np.array(values, np.int16), (90, 20))
    for layout in ("packed", "slotted"):
        ct = ibp.compress(x, layout=layout)
        assert ct.model.transforms_words
        assert_same(emulator, ct)
        assert_same(emulator, ct, np.array([3, -1, 3, 0]))
