"""GPU decompression: the kernels of cuda/ibp_decode.cu, compiled at run time
by NVRTC through CuPy and launched on torch's current stream.

Where the compressed bytes come from decides the path:

* **zero-copy** -- a pinned payload (``ct.pin_memory()``) is read by the
  kernel straight from host memory (unified addressing), so only the
  compressed bits of the rows asked for cross PCIe.  Gathers (``index=``)
  from a pinned tensor always go this way; whole small tensors too.
* **stream** -- a whole tensor is cut into chunks of whole units; a side
  stream DMA-copies chunk i+1 into a ring of device buffers while the
  current stream decodes chunk i.  The copy engine outruns a kernel reading
  host memory (on Hopper about 55 against 35 GB/s), so ``path="auto"``
  streams every whole tensor of at least STREAM_MIN_BYTES whose copy
  (its payload at DMA_RATE) beats reading its encoded bytes in place (at
  ZERO_COPY_RATE: a slotted tensor's slots are only partly read), and every
  whole-tensor decode of an unpinned one (whose copies then go through the
  driver's staging buffers, which can block the host).  The chunks and
  their kernel arguments are planned once per tensor, and the first copies
  start before anything else of the call.
* **device** -- ``to_device(ct)`` keeps a copy of the payload in GPU
  memory; decodes are then device to device.

The kernels read a slotted tensor's units only up to the end of their
encodings, never the rest of their slots (which a DMA copy would move), so
whole pinned slotted tensors are read in place too.

A gather from an unpinned, non-resident tensor copies its whole payload to
the device for that call: pin it (or use ``to_device``) for fast gathers.
The small metadata (unit kinds, row index, model columns) is copied to each
device once per tensor and cached.

Errors.  The host checks what it can before launching: shapes, dtypes,
devices, section sizes, and every index that is not already on the GPU
(IndexError at once, like the CPU).  The kernel checks what only it can
see -- each unit's encoding against its span, and the row numbers of an
index on the GPU -- skips the job that fails (reading and writing nothing
out of bounds) and records the first failure in a status word.  The host
never waits for it: the word is copied back asynchronously, and a failure
is raised as FormatError or IndexError (the output of that call being
unspecified) by the first of

* ``decompress(..., sync=True)``, which waits for its own call;
* ``ibp.cuda.check()``, which waits for every call on the device;
* the next ``ibp.cuda`` call on the device, once the GPU has finished the
  failed one (it does not wait for it).
"""
import collections
import threading
import warnings
import weakref
from importlib import resources

import numpy as np

from . import codec, dtypes
from .decode import decode_into, normalize_index
from .encode import blocked_index, unit_start_bits
from .errors import FormatError
from .files import check_mapped_file
from .model import LOW_MASK
from .tensor import CompressedTensor

__all__ = ["decompress", "to_device", "check"]

# The kernel's arguments, all uint64, in the order of IBP_KERNEL_PARAMS.
KERNEL_ARGS = ("payload", "lim_lo", "lim_hi", "kinds", "nunits", "index_base", "index_rel", "rel_bits",
               "log2_block", "payload_bits", "slotted", "slot_words", "columns", "period", "fbits", "ptot",
               "U", "R", "split", "group", "total_words", "first_job", "njobs", "index", "index_code",
               "nrows", "out", "out_words", "status", "stage")
BLOCK = 256                      # threads per block (IBP_BLOCK)
SHAPES = ((8, 1), (16, 1), (32, 1), (32, 2), (32, 4), (32, 8))   # (lanes, warps) per job
MAX_GRID = (1 << 31) - 1
MAX_UNIT_WORDS = 1 << 31
PATHS = ("auto", "zero-copy", "stream")
STAGE = 1                        # kernel "stage" argument (see Params::stage in cuda/ibp_decode.cu)
STREAM_MIN_BYTES = 8 << 20       # whole pinned tensors at least this big may stream
ZERO_COPY_RATE = 35e9            # bytes/s a kernel reads from pinned host memory (H100, nvbandwidth)
DMA_RATE = 55e9                  # bytes/s of the copy engine (H100, nvbandwidth); bench/gpu.py measures both
CHUNK_BYTES = 16 << 20           # payload bytes per streamed chunk
RING_SLOTS = 3                   # device buffers the streamed chunks rotate through
INDEX_CODES = {"int8": 1, "int16": 2, "int32": 3, "int64": 4, "uint8": 5, "uint16": 6, "uint32": 7, "uint64": 8}
ST_INDEX = 4                     # status code of an out-of-range row (the others are codec.ERRORS)
NO_ERROR = (1 << 64) - 1


# -- what the kernels are told (pure: numpy only, no GPU) ----------------------

def column_table(model):
    """The model as the kernels' ``Column`` structs, one per column, as bytes."""
    W = model.word_bits
    word = "<u8" if W == 64 else "<u4"
    layout = np.dtype([("base", word, 2), ("low", word, 2), ("shift_width", "<u4"), ("pad", "<u4"),
                       ("off0", "<u8")])
    lo = model.lo.astype(np.int64)
    shift = model.hi.astype(np.int64) - lo
    width = W - shift
    table = np.zeros(model.period, layout)
    table["base"] = model.base.T.astype(word)
    table["low"] = LOW_MASK[lo].T.astype(word)
    table["shift_width"] = (shift[0] | width[0] << 8 | shift[1] << 16 | width[1] << 24).astype(np.uint32)
    table["off0"] = np.concatenate(([0], np.cumsum(width[0])[:-1])).astype(np.uint64)
    return table.view(np.uint8)


def team_shape(unit_words, job_words):
    """(lanes, warps) per job: sub-warp teams for short jobs, several warps
    for long units (each warp then owns a segment of the unit)."""
    if job_words <= 8:
        return 8, 1
    if job_words <= 16:
        return 16, 1
    for warps, most in ((1, 2048), (2, 4096), (4, 8192)):
        if unit_words <= most:
            return 32, warps
    return 32, 8


def kernel_args(**values):
    """The kernel's argument vector (uint64, KERNEL_ARGS order)."""
    if set(values) != set(KERNEL_ARGS):
        raise TypeError(f"kernel arguments differ: {sorted(set(values) ^ set(KERNEL_ARGS))}")
    return np.array([int(values[k]) % (1 << 64) for k in KERNEL_ARGS], dtype=np.uint64)


class KernelTables:
    """What the kernels need to know about one CompressedTensor: scalar
    arguments and the small arrays, built and checked on the host so that a
    tensor whose parts disagree is refused before anything is launched."""

    def __init__(self, ct):
        g, m = ct.geometry, ct.model
        U, R, N = g.unit_words, g.row_words, g.nunits
        if U >= MAX_UNIT_WORDS or R >= MAX_UNIT_WORDS:
            raise ValueError(f"units of {U} words and rows of {R} words are too long for the GPU decoder")
        payload = ct.payload
        if not (isinstance(payload, np.ndarray) and payload.dtype == np.uint64 and payload.ndim == 1
                and payload.flags.c_contiguous):
            raise FormatError("payload must be a contiguous uint64 array")
        packed = ct.layout == "packed"
        self.payload_words = (-(-ct.payload_bits // 64) + 1) if packed else N * g.slot_words + 1
        if payload.size != self.payload_words:
            raise FormatError(f"payload holds {payload.size} words, expected {self.payload_words}")
        if ct.kinds.dtype != np.uint8 or ct.kinds.size != -(-N // 4):
            raise FormatError(f"kinds hold {ct.kinds.size} bytes, expected {-(-N // 4)}")
        _, _, fbits, ptot = m.tables
        self.word_bits = g.word_bits
        self.unit_words = U
        self.row_words = R
        self.nunits = N
        self.layout = ct.layout
        self.columns = column_table(m)
        self.scalars = dict(nunits=N, rel_bits=16, log2_block=0, payload_bits=0, slotted=int(not packed),
                            slot_words=g.slot_words, period=m.period, fbits=fbits, ptot=ptot, U=U, R=R,
                            split=R // U if R > U else 1, group=U // R if 0 < R <= U else 1,
                            total_words=g.total_words, nrows=g.nrows)
        self.index_base = np.zeros(1, np.uint64)
        self.index_rel = np.zeros(1, np.uint32)
        self._starts = None
        self._plans = {}
        if packed:
            block, rel_bits, base, rel = ct.index
            if rel_bits == 0:  # uniform units: the kernel reads them through a blocked index made here
                if N == 0 or ct.payload_bits % N or block != 1 or base.size or rel.size:
                    raise FormatError("uniform row index does not fit the unit count")
                block, rel_bits, base, rel = blocked_index(np.arange(N, dtype=np.int64) * (ct.payload_bits // N))
            if block < 1 or block & (block - 1) or rel_bits not in (16, 32) or rel.dtype.itemsize * 8 != rel_bits:
                raise FormatError("row index block or offset width is invalid")
            if base.size != -(-N // block) or rel.size != N:
                raise FormatError("row index sizes do not match the unit count")
            self.index_base = np.ascontiguousarray(base, dtype=np.uint64)
            self.index_rel = np.ascontiguousarray(rel)
            self.scalars.update(rel_bits=rel_bits, log2_block=block.bit_length() - 1, payload_bits=ct.payload_bits)

    @property
    def limit_bits(self):
        """The highest bit a unit span may end at (before the spare word)."""
        return 64 * (self.payload_words - 1)

    def unit_starts(self):
        """Start bit of every unit (packed layout), computed once."""
        if self._starts is None:
            s = self.scalars
            index = (1 << s["log2_block"], s["rel_bits"], self.index_base, self.index_rel)
            self._starts = unit_start_bits(index, np.arange(self.nunits, dtype=np.int64), s["payload_bits"], self.nunits)
        return self._starts

    def stream_plan(self, chunk_bytes):
        """The StreamPlan of this tensor for chunks of about chunk_bytes, made once."""
        plan = self._plans.get(chunk_bytes)
        if plan is None:
            plan = self._plans[chunk_bytes] = StreamPlan(self, chunk_bytes)
        return plan

    def chunks(self, chunk_bytes):
        """[(u0, u1, w0, w1)]: units [u0, u1) lie in payload words [w0, w1),
        which include one word past their end, about chunk_bytes each."""
        N = self.nunits
        if self.layout == "slotted":
            S = self.scalars["slot_words"]
            per = max(1, chunk_bytes // (8 * S))
            return [(u0, min(N, u0 + per), u0 * S, min(N, u0 + per) * S + 1) for u0 in range(0, N, per)]
        starts = self.unit_starts()
        bits = self.scalars["payload_bits"]
        marks = np.arange(1, -(-bits // (8 * chunk_bytes))) * (8 * chunk_bytes)
        cuts = np.unique(np.concatenate(([0], np.searchsorted(starts, marks), [N])))
        out = []
        for u0, u1 in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
            end = int(starts[u1]) if u1 < N else bits
            out.append((u0, u1, int(starts[u0]) >> 6, -(-end // 64) + 1))
        return out

    def launches(self, *, njobs, job_words, first_job=0, shape=None, stage=None, **pointers):
        """[(W, L, G, grid, args)] that run ``njobs`` jobs; ``pointers`` gives
        the remaining kernel arguments (payload, tables, index, out, status).
        ``shape`` forces a (lanes, warps) team shape from SHAPES, ``stage`` a
        staging mode (default STAGE)."""
        L, G = team_shape(self.unit_words, job_words) if shape is None else shape
        per_block = BLOCK // (L * G)
        step = MAX_GRID * per_block
        out = []
        for j0 in range(0, njobs, step):
            n = min(step, njobs - j0)
            args = kernel_args(first_job=first_job + j0, njobs=n, stage=STAGE if stage is None else stage,
                               **self.scalars, **pointers)
            out.append((self.word_bits, L, G, -(-n // per_block), args))
        return out


# Per-call kernel arguments: pointers the launch plan cannot know in advance.
CALL_ARGS = ("payload", "kinds", "index_base", "index_rel", "columns", "out", "out_words", "status")
_ARG_POS = {name: i for i, name in enumerate(KERNEL_ARGS)}


class StreamPlan:
    """A streamed decode of one tensor, planned once: the chunks, the ring of
    device buffers they rotate through, and each chunk's kernel arguments
    with the per-call pointers (CALL_ARGS) left to ``chunk_args``."""

    def __init__(self, tables, chunk_bytes):
        self.chunks = tables.chunks(chunk_bytes)
        self.slots = min(RING_SLOTS, len(self.chunks))
        self.slot_words = max(w1 - w0 for _, _, w0, w1 in self.chunks)
        self.launches = [tables.launches(njobs=u1 - u0, job_words=tables.unit_words, first_job=u0, lim_lo=w0 * 64,
                                         lim_hi=(w1 - 1) * 64, index=0, index_code=0, **dict.fromkeys(CALL_ARGS, 0))
                         for u0, u1, w0, w1 in self.chunks]

    def slot_offset(self, i):
        """Byte offset of chunk i's slot in the ring."""
        return (i % self.slots) * self.slot_words * 8

    def chunk_args(self, i, ring_address, pointers):
        """Chunk i's launches with this call's pointers (the payload pointer
        is biased so that stream word w0 lands at the start of its slot)."""
        w0 = self.chunks[i][2]
        out = []
        for W, L, G, grid, args in self.launches[i]:
            args = args.copy()
            for name, value in pointers.items():
                args[_ARG_POS[name]] = value % (1 << 64)
            args[_ARG_POS["payload"]] = (ring_address + self.slot_offset(i) - w0 * 8) % (1 << 64)
            out.append((W, L, G, grid, args))
        return out


def whole_tensor_path(ct, pinned):
    """The path ``path="auto"`` takes for a whole host tensor: "stream"
    unless it is pinned and reading its encoded bytes in place is faster
    than copying its payload (small tensors; sparsely filled slots)."""
    if not pinned:
        return "stream"
    if ct.payload.nbytes < STREAM_MIN_BYTES:
        return "zero-copy"
    return "stream" if ct.payload.nbytes / DMA_RATE < ct.transfer_nbytes / ZERO_COPY_RATE else "zero-copy"


# -- the GPU side ---------------------------------------------------------------

_lock = threading.Lock()
_kernels = {}                                # (device, W, L, G) -> cupy function
_copy_streams = {}                           # device -> side stream of the stream path
_pending = collections.defaultdict(collections.deque)   # device -> deque of _Check
_host_tables = weakref.WeakKeyDictionary()   # ct -> KernelTables
_device_tables = weakref.WeakKeyDictionary()  # ct -> {device: _DeviceTables}
_resident = weakref.WeakKeyDictionary()      # ct -> _Resident (to_device)


def _imports():
    try:
        import cupy
        import torch
    except ImportError as e:
        raise ImportError(f"ibp's GPU decoder needs torch and cupy (pip install ibp[gpu]): {e}") from None
    if not torch.cuda.is_available():
        raise RuntimeError("ibp.cuda: torch sees no CUDA device")
    return torch, cupy


def _device(torch, device):
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"ibp.cuda decodes on CUDA devices, not {dev}")
    return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)


def _kernel(cupy, device_index, W, L, G):
    key = (device_index, W, L, G)
    fn = _kernels.get(key)
    if fn is None:
        name = f"ibp_decode<{W}, {L}, {G}>"
        source = resources.files("ibp.kernels").joinpath("ibp_decode.cu").read_text()
        module = cupy.RawModule(code=source, options=("--std=c++17",), name_expressions=(name,))
        fn = _kernels[key] = module.get_function(name)
    return fn


def _tables_of(ct):
    with _lock:
        tables = _host_tables.get(ct)
        if tables is None:
            tables = _host_tables[ct] = KernelTables(ct)
    return tables


def _as_torch_bytes(torch, array):
    """A CPU uint8 tensor over a numpy array's bytes (never written)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # read-only arrays: we only read
        return torch.from_numpy(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def _upload(torch, array, dev):
    """A device copy of a host array, made without blocking the host."""
    if array.nbytes == 0:
        return torch.zeros(8, dtype=torch.uint8, device=dev)
    return _as_torch_bytes(torch, array).pin_memory().to(dev, non_blocking=True)


def _ready_event(torch, dev):
    """An event on the current stream, for other streams to wait on."""
    return torch.cuda.current_stream(dev).record_event()


class _DeviceTables:
    """KernelTables' arrays on one device, uploaded on the stream of the
    first call; ``ready`` marks the upload's end for calls on other streams.
    A slotted tensor's kinds change with update_rows, so they are compared
    with what was uploaded."""

    def __init__(self, torch, ct, tables, dev):
        self.columns = _upload(torch, tables.columns, dev)
        self.index_base = _upload(torch, tables.index_base, dev)
        self.index_rel = _upload(torch, tables.index_rel, dev)
        self.kinds_uploaded = ct.kinds.copy()
        self.kinds = _upload(torch, ct.kinds, dev)
        self.ready = _ready_event(torch, dev)

    def refresh(self, torch, ct, dev):
        if not np.array_equal(self.kinds_uploaded, ct.kinds):
            self.kinds_uploaded = ct.kinds.copy()
            self.kinds = _upload(torch, ct.kinds, dev)
            self.ready = _ready_event(torch, dev)

    def arrays(self):
        return [self.kinds, self.columns, self.index_base, self.index_rel]


def _device_tables_of(torch, ct, tables, dev):
    with _lock:
        per_device = _device_tables.setdefault(ct, {})
        dt = per_device.get(dev.index)
        if dt is None:
            dt = per_device[dev.index] = _DeviceTables(torch, ct, tables, dev)
        elif ct.layout == "slotted":
            dt.refresh(torch, ct, dev)
    return dt


class _Resident:
    def __init__(self, device_index, data, host_payload, ready):
        self.device_index = device_index
        self.data = data
        self.host_payload = host_payload
        self.ready = ready


class _Payload:
    """Where the kernels find a tensor's payload: kind "device" or "pinned"
    (``address`` readable by the GPU) or "pageable" (host only); ``host`` is
    a CPU uint8 tensor over it for copies; ``ready`` an event to wait for."""

    def __init__(self, kind, address, host, keep, ready=None):
        self.kind = kind
        self.address = address
        self.host = host
        self.keep = keep
        self.ready = ready


def _payload_of(torch, cupy, ct, dev):
    res = _resident.get(ct)
    if res is not None and res.device_index == dev.index and res.host_payload is ct.payload:
        return _Payload("device", res.data.data_ptr(), None, res.data, res.ready)
    host = _as_torch_bytes(torch, ct.payload)
    if ct.is_pinned() and ct.payload.nbytes:
        address = cupy.cuda.runtime.pointerGetAttributes(ct.payload.ctypes.data).devicePointer
        if address:   # 0 when the payload was replaced by unpinned memory
            return _Payload("pinned", address, host, (ct._pinned, ct.payload))
    return _Payload("pageable", 0, host, ct.payload)


class GpuUses:
    """The last GPU work that reads a tensor's host memory, one event per
    stream: ``CompressedTensor.update_rows`` waits for it (``synchronize``)
    before it rewrites a payload a kernel or a copy may still be reading."""

    def __init__(self):
        self._events = {}

    def record(self, stream):
        event = stream.record_event()
        with _lock:
            self._events[stream.cuda_stream] = event

    def synchronize(self):
        with _lock:
            events = list(self._events.values())
        for event in events:
            event.synchronize()


def _record_host_use(ct, stream):
    with _lock:
        uses = ct._gpu_last_use
        if uses is None:
            uses = ct._gpu_last_use = GpuUses()
    uses.record(stream)


def _copy_stream(torch, dev):
    with _lock:
        s = _copy_streams.get(dev.index)
        if s is None:
            s = _copy_streams[dev.index] = torch.cuda.Stream(dev)
    return s


class _Check:
    """One call's status word on its way back, with what it takes to explain a failure."""

    def __init__(self, event, status, index, tables, keep):
        self.event = event
        self.status = status
        self.index = index
        self.tables = tables
        self.keep = keep

    def error(self):
        key = int(self.status[0]) % (1 << 64)
        if key == NO_ERROR:
            return None
        code, job = key & 0xFF, key >> 8
        s = self.tables.scalars
        if self.index is None:
            return FormatError(f"unit {job}: {codec.ERRORS.get(code, f'status {code}')}")
        item, piece = divmod(job, s["split"])
        value = int(self.index[item:item + 1].cpu().numpy()[0])   # exact for uint64 too
        if code == ST_INDEX:
            return IndexError(f"index {value} is out of range for {s['nrows']} rows")
        row = value + s["nrows"] if value < 0 else value
        unit = row * s["split"] + piece if s["split"] > 1 else row // s["group"]
        return FormatError(f"unit {unit}: {codec.ERRORS.get(code, f'status {code}')}")


def _raise_own(device_index, check):
    """Wait for one call and raise its failure."""
    check.event.synchronize()
    with _lock:
        if check in _pending[device_index]:
            _pending[device_index].remove(check)
    err = check.error()
    if err is not None:
        raise err


def _raise_finished(device_index, wait):
    """Raise the first failure among this device's finished calls (all
    calls, waiting for them, when ``wait``)."""
    with _lock:
        queue = _pending[device_index]
        done = []
        while queue and (wait or queue[0].event.query()):
            check = queue.popleft()
            if wait:
                check.event.synchronize()
            done.append(check)
    for i, check in enumerate(done):
        err = check.error()
        if err is not None:
            with _lock:
                _pending[device_index].extendleft(reversed(done[i + 1:]))
            raise err


def check(device=None):
    """Wait for every ibp decode queued on ``device`` (default: the current
    CUDA device) and raise the first failure (FormatError, IndexError)."""
    torch, _ = _imports()
    _raise_finished(_device(torch, "cuda" if device is None else device).index, wait=True)


def _index_on_device(torch, index, nrows, dev):
    """(flat row numbers on the device, kernel index code, index shape)."""
    if torch.is_tensor(index) and index.is_cuda:
        if index.device != dev:
            raise ValueError(f"index is on {index.device}, decoding on {dev}")
        name = str(index.dtype).removeprefix("torch.")
        if name not in INDEX_CODES:
            raise TypeError(f"index must hold integers, not {index.dtype}")
        if index.numel() and nrows == 0:
            raise IndexError("index out of range for 0 rows")
        return index.reshape(-1).contiguous(), INDEX_CODES[name], tuple(index.shape)
    if torch.is_tensor(index):
        index = index.numpy()
    rows, shape = normalize_index(index, nrows)
    flat = _upload(torch, rows, dev).view(torch.int64)[:rows.size]
    return flat, INDEX_CODES["int64"], tuple(shape)


def _output(torch, ct, shape, out, dev):
    """(the tensor to return, the tensor the kernel writes)."""
    dtype = dtypes.torch_dtype(ct.dtype_name)
    if out is None:
        t = torch.empty(shape, dtype=dtype, device=dev)
        return t, t
    if not torch.is_tensor(out):
        raise TypeError(f"out must be a torch tensor, not {type(out).__name__}")
    if out.device != dev:
        raise ValueError(f"out is on {out.device}, decoding on {dev}")
    if out.dtype != dtype or tuple(out.shape) != tuple(shape):
        raise ValueError(f"out is {out.dtype}{list(out.shape)}, need {dtype}{list(shape)}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    dtypes.claim_torch_output(out)
    if out.data_ptr() % (ct.word_bits // 8):
        return out, torch.empty(shape, dtype=dtype, device=dev)
    return out, out


class _StreamHandle:
    """A raw CUDA stream in the CUDA stream protocol, for CuPy."""

    def __init__(self, handle):
        self.handle = handle

    def __cuda_stream__(self):
        return 0, self.handle


def _launch(torch, cupy, dev, launches):
    """Run kernel launches on torch's current stream."""
    handle = torch.cuda.current_stream(dev).cuda_stream
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    stream = from_external(_StreamHandle(handle)) if from_external else cupy.cuda.ExternalStream(handle, dev.index)
    with cupy.cuda.Device(dev.index), stream:
        for W, L, G, grid, args in launches:
            _kernel(cupy, dev.index, W, L, G)((grid,), (BLOCK,), tuple(np.uint64(a) for a in args))


def decompress(ct, *, index=None, out=None, device="cuda", path="auto", sync=False):
    """Decode ``ct`` (or its rows ``index``) on a CUDA device into a torch
    tensor; ``ibp.decompress(ct, device="cuda", ...)`` comes here.

    index: rows to gather, any integer dtype and shape, negative counting
           from the end; on the GPU it is checked there (see module doc).
    out:   a contiguous CUDA tensor of the result's dtype and shape.
    path:  "auto", or force "zero-copy" (needs a pinned tensor) or "stream"
           (whole tensors only).
    sync:  wait for this call and raise its failure before returning.
    """
    torch, cupy = _imports()
    if not isinstance(ct, CompressedTensor):
        raise TypeError(f"decompress takes a CompressedTensor, not {type(ct).__name__}")
    check_mapped_file(ct.payload)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    dev = _device(torch, device)
    with torch.cuda.device(dev):
        _raise_finished(dev.index, wait=False)
        if ct.model.transforms_words:
            return _decoded_on_host(torch, ct, index, out, dev, path)
        tables = _tables_of(ct)
        flat_index = None
        shape = ct.shape
        if index is not None:
            if path == "stream":
                raise ValueError("path='stream' decodes whole tensors; a gather reads rows in place")
            if len(ct.shape) == 0:
                raise IndexError("a 0-d tensor has no rows to index")
            flat_index, code, ishape = _index_on_device(torch, index, ct.nrows, dev)
            shape = ishape + ct.shape[1:]
        njobs = flat_index.numel() * tables.scalars["split"] if index is not None else tables.nunits
        if njobs == 0 or (index is None and tables.row_words == 0):
            return _output(torch, ct, shape, out, dev)[0]
        payload = _payload_of(torch, cupy, ct, dev)
        if payload.kind == "device" and path != "auto":
            raise ValueError(f"path={path!r} applies to host payloads; this tensor is on the device")
        if path == "zero-copy" and payload.kind != "pinned":
            raise ValueError("path='zero-copy' needs a pinned tensor: use ct.pin_memory()")
        if index is None and payload.kind != "device" and path == "auto":
            path = whole_tensor_path(ct, payload.kind == "pinned")
        result, target = _output(torch, ct, shape, out, dev)
        streamer = None
        if index is None and path == "stream":   # the first copies go out before the rest of the set-up
            streamer = _Streamer(torch, tables.stream_plan(CHUNK_BYTES), payload.host, dev)
        dt = _device_tables_of(torch, ct, tables, dev)
        current = torch.cuda.current_stream(dev)
        for event in (dt.ready, payload.ready):
            if event is not None:
                current.wait_event(event)
        status = torch.full((1,), -1, dtype=torch.int64, device=dev)
        common = dict(kinds=dt.kinds.data_ptr(), index_base=dt.index_base.data_ptr(),
                      index_rel=dt.index_rel.data_ptr(), columns=dt.columns.data_ptr(),
                      out=target.data_ptr(), out_words=target.numel() * target.element_size() * 8 // ct.word_bits,
                      status=status.data_ptr())
        keep = [payload.keep, target] + dt.arrays()
        whole = dict(payload=payload.address, lim_lo=0, lim_hi=tables.limit_bits, **common)
        if index is not None:
            if payload.kind == "pageable":
                data = _upload(torch, ct.payload, dev)
                keep.append(data)
                whole["payload"] = data.data_ptr()
            keep.append(flat_index)
            job_words = min(tables.unit_words, tables.row_words)
            launches = tables.launches(njobs=njobs, job_words=job_words, index=flat_index.data_ptr(),
                                       index_code=code, **whole)
            _launch(torch, cupy, dev, launches)
        elif streamer is None:
            launches = tables.launches(njobs=njobs, job_words=tables.unit_words, index=0, index_code=0, **whole)
            _launch(torch, cupy, dev, launches)
        else:
            keep.append(streamer.decode(cupy, common))
        if payload.kind != "device":
            _record_host_use(ct, current)
        if target is not result:
            result.copy_(target)
        host_status = torch.empty(1, dtype=torch.int64, pin_memory=True)
        host_status.copy_(status, non_blocking=True)
        done = _Check(current.record_event(), host_status, flat_index, tables, keep)
        with _lock:
            _pending[dev.index].append(done)
        if sync:
            _raise_own(dev.index, done)
    return result


def _decoded_on_host(torch, ct, index, out, dev, path):
    """A rotated or gathered model's tensor (``ibp.rotation``; format
    versions 3 and 4), which the kernels do not transform back yet: decoded
    on the CPU, then copied to the device on torch's current stream
    (``path`` is checked as for any tensor, but there is only one)."""
    rows, shape = None, ct.shape
    if index is not None:
        if path == "stream":
            raise ValueError("path='stream' decodes whole tensors; a gather reads rows in place")
        if len(ct.shape) == 0:
            raise IndexError("a 0-d tensor has no rows to index")
        rows, ishape = normalize_index(index.cpu() if torch.is_tensor(index) else index, ct.nrows)
        shape = tuple(ishape) + ct.shape[1:]
    if ct in _resident and path != "auto":
        raise ValueError(f"path={path!r} applies to host payloads; this tensor is on the device")
    if path == "zero-copy" and not ct.is_pinned():
        raise ValueError("path='zero-copy' needs a pinned tensor: use ct.pin_memory()")
    host, flat = dtypes.empty(shape, ct.dtype_name, "torch")
    decode_into(ct, flat, rows)
    with torch.cuda.device(dev):
        result, _ = _output(torch, ct, shape, out, dev)
        result.copy_(host)
    return result


class _Streamer:
    """One streamed decode: a side stream copies chunks of the payload into
    a device ring while the current stream decodes the previous ones.  Made
    before the rest of the call, so that the first copies (as many as the
    ring holds) are already under way."""

    def __init__(self, torch, plan, host, dev):
        self.torch, self.plan, self.host = torch, plan, host
        self.ring = torch.empty(plan.slots * plan.slot_words * 8, dtype=torch.uint8, device=dev)
        self.current, self.side = torch.cuda.current_stream(dev), _copy_stream(torch, dev)
        self.dev = dev
        self.side.wait_stream(self.current)
        self.copied = [self._copy(i) for i in range(plan.slots)]

    def _copy(self, i):
        """Start chunk i's copy into its slot; returns the event of its end."""
        _, _, w0, w1 = self.plan.chunks[i]
        slot = self.ring[self.plan.slot_offset(i):][:(w1 - w0) * 8]
        with self.torch.cuda.stream(self.side):
            slot.copy_(self.host[w0 * 8:w1 * 8], non_blocking=True)
        return self.side.record_event()

    def decode(self, cupy, pointers):
        """Decode every chunk as it arrives; returns the ring (to keep alive)."""
        plan = self.plan
        ring_address = self.ring.data_ptr()
        for i in range(len(plan.chunks)):
            self.current.wait_event(self.copied[i])
            _launch(self.torch, cupy, self.dev, plan.chunk_args(i, ring_address, pointers))
            if i + plan.slots < len(plan.chunks):
                self.side.wait_event(self.current.record_event())
                self.copied.append(self._copy(i + plan.slots))
        return self.ring


def to_device(ct, device="cuda"):
    """A copy of ``ct`` whose payload also lives in GPU memory, so decoding
    it there (``decompress(..., device=...)``) reads device memory only.

    A snapshot: its host arrays are read-only views, so ``update_rows`` on
    it copies them and later decodes fall back to the host payload; changes
    made through ``ct`` are not seen by the device copy.
    """
    torch, cupy = _imports()
    if not isinstance(ct, CompressedTensor):
        raise TypeError(f"to_device takes a CompressedTensor, not {type(ct).__name__}")
    check_mapped_file(ct.payload)
    dev = _device(torch, device)
    payload, kinds = ct.payload.view(), ct.kinds.view()
    payload.flags.writeable = False
    kinds.flags.writeable = False
    resident = ct._replace(payload=payload, kinds=kinds)
    with torch.cuda.device(dev):
        _raise_finished(dev.index, wait=False)
        tables = _tables_of(resident)
        source = _payload_of(torch, cupy, ct, dev)
        if source.kind == "device":
            data = source.keep
            torch.cuda.current_stream(dev).wait_event(source.ready)
        elif source.kind == "pinned":
            data = source.host.to(dev, non_blocking=True)
            _record_host_use(ct, torch.cuda.current_stream(dev))
        else:
            data = _upload(torch, ct.payload, dev)
        _device_tables_of(torch, resident, tables, dev)
        _resident[resident] = _Resident(dev.index, data, payload, _ready_event(torch, dev))
    return resident
