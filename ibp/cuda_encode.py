"""GPU compression: the kernels of cuda/ibp_encode.cu, compiled at run time by
NVRTC through CuPy and launched on torch's current stream.

``ibp.compress(x)`` comes here when ``x`` is a CUDA tensor.  The bytes equal
the CPU encoder's for the same model (tests/test_cuda_encode.py checks the
kernels through the host emulation, bench/device/smoke.py on a GPU).

* **packed**: a classify pass writes every unit's kind and size, a device
  prefix sum (``torch.cumsum``) turns the sizes into start bits, and the
  host waits once, for those start bits (it needs the payload size, and
  builds the row index from them exactly as the CPU encoder does).  The
  write pass then runs in chunks of units; each chunk's finished payload
  words are DMA-copied to pinned host memory on a side stream while the
  next chunk is written.
* **slotted**: one pass classifies and writes every unit into its slot;
  the host never waits.

The returned tensor's host arrays are filled by copies still in flight
(like ``copy_(..., non_blocking=True)``): its first host-side use of them
waits, once, for the GPU (``GpuEncoded``).  Work queued afterwards on the
same stream (a GPU decode) is ordered after the copies and waits for nothing.

Models.  ``model=`` (an ibp.Model, e.g. ``ibp.analyze`` of a sample, or one
learned once per layer) gives bytes identical to ``ibp.compress(x_cpu,
model=model)``.  Without one, ``learn`` fits a model on the device from a
sample of units with torch ops: per column, the best of three fixed runs
(the top bits, the top bits below the sign, the low bits) around the
per-bit majority, scored like the CPU analysis (fixed bits x matches -
price x misses), and a secondary level on the primary's exceptions.  It is
not the CPU analysis (which also searches range tests over sorted words and
several word widths and periods, choosing by trial encodings that would
cost host round trips), so its ratio can be lower; the bytes still equal
the CPU encoder's given that model (``ct.model``).
"""
import threading
import weakref
from importlib import resources

import numpy as np

from . import dtypes
from .api import LAYOUTS
from .encode import build_index
from .geometry import Geometry, word_widths
from .model import LOW_MASK, Model
from .tensor import CompressedTensor

__all__ = ["compress", "learn", "GpuEncoded"]

# The kernel's arguments, all uint64, in the order of IBP_ENCODE_PARAMS.
ENCODE_ARGS = ("words", "total_words", "U", "nunits", "first_unit", "njobs", "period", "model", "kinds", "sizes",
               "starts", "payload", "payload_words", "slot_words", "mode", "status")
BLOCK = 256                      # threads per block (IBP_ENCODE_BLOCK)
UNITS_PER_BLOCK = BLOCK // 32    # one warp per unit
MAX_GRID = (1 << 31) - 1
MAX_UNIT_WORDS = (1 << 31) - 1   # the kernel counts a unit's words in 32 bits
CLASSIFY, PACKED, SLOTTED = 0, 1, 2
COLUMN_WORDS = 14                # uint64 fields per column (IBP_COLUMN_WORDS)
PAYLOADS = ("pinned", "device")
CHUNK_BYTES = 16 << 20           # packed payload bytes written (and copied) per chunk
SAMPLE_BYTES = (1 << 14, 1 << 18)  # bytes of units the learner samples: at least, at most ...
SAMPLE_SHARE = 32                # ... and otherwise 1/32 of the tensor (as ibp.analysis)
PRICE = 8.0                      # bits an exception costs the learner's score (ibp.analysis tries 3 and 8)


# -- what the kernels are told (pure: no GPU) -------------------------------------

def encode_table(torch, lo, hi, base, word_bits):
    """The model as the kernel reads it, an int64 tensor on the device of the
    int64 ``[2, period]`` tensors lo, hi and base (uint64 bits): a header
    (fbits, ptot), then per column base, fixed mask, low and high residual
    masks, shift and width of both levels, and the column's bit offset in an
    all-matching period (the fields of Model.tables, in the kernel's order)."""
    masks = _low_masks(torch, lo.device)
    low, upto = masks[lo], masks[hi]
    fix = upto & ~low
    high = masks[word_bits] & ~upto
    shift = hi - lo
    width = word_bits - shift
    off0 = torch.cumsum(width[0], 0) - width[0]
    cols = torch.stack([base[0], base[1], fix[0], fix[1], low[0], low[1], high[0], high[1], shift[0], shift[1],
                        width[0], width[1], off0, torch.zeros_like(off0)], dim=1)
    header = torch.stack([(hi[1] > lo[1]).any().to(torch.int64), width[0].sum()])
    return torch.cat([header, cols.reshape(-1)])


def model_tensors(torch, model):
    """(lo, hi, base) of an ibp.Model as int64 CPU tensors."""
    return tuple(torch.from_numpy(np.ascontiguousarray(a).astype(np.int64) if a.dtype != np.uint64
                                  else a.view(np.int64).copy()) for a in (model.lo, model.hi, model.base))


def encode_args(**values):
    """The kernel's argument vector (uint64, ENCODE_ARGS order)."""
    if set(values) != set(ENCODE_ARGS):
        raise TypeError(f"encoder arguments differ: {sorted(set(values) ^ set(ENCODE_ARGS))}")
    if not 0 < values["U"] <= MAX_UNIT_WORDS:
        raise ValueError(f"{values['U']} words per unit: the kernel takes 1 to {MAX_UNIT_WORDS}")
    return np.array([int(values[k]) % (1 << 64) for k in ENCODE_ARGS], dtype=np.uint64)


def launches(*, njobs, first_unit=0, **args):
    """[(grid, args)] running units [first_unit, first_unit + njobs), one warp each."""
    out = []
    step = MAX_GRID * UNITS_PER_BLOCK
    for j0 in range(0, njobs, step):
        n = min(step, njobs - j0)
        out.append((-(-n // UNITS_PER_BLOCK), encode_args(first_unit=first_unit + j0, njobs=n, **args)))
    return out


def write_chunks(starts, total, chunk_bytes):
    """[(u0, u1, w0, w1)]: the packed write pass in chunks of units; once
    chunks up to this one are written, payload words [w0, w1) are final
    (a word a later unit shares goes with the later chunk; the last chunk
    ends with the spare word)."""
    n = starts.size
    marks = np.arange(1, -(-total // (8 * chunk_bytes))) * (8 * chunk_bytes)
    cuts = np.unique(np.concatenate(([0], np.searchsorted(starts, marks), [n])))
    nwords = -(-total // 64) + 1
    out = []
    for u0, u1 in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
        w0 = int(starts[u0]) >> 6 if u0 else 0
        w1 = int(starts[u1]) >> 6 if u1 < n else nwords
        out.append((u0, u1, w0, w1))
    return out


def sample_units(torch, nunits_full, unit_bytes, nbytes, device):
    """Indices (int64 on ``device``, made there: no upload) of the units the
    learner samples: evenly spread, about as many bytes as ibp.analysis
    samples."""
    budget = min(max(nbytes // SAMPLE_SHARE, SAMPLE_BYTES[0]), SAMPLE_BYTES[1])
    take = max(1, min(nunits_full, budget // unit_bytes))
    return torch.arange(take, device=device) * (nunits_full - 1) // max(take - 1, 1)


def learner_geometry(shape, itemsize, word_bits=None):
    """(word width, period) the device learner uses: the widest word that fits
    (or ``word_bits``), one column per part of an element."""
    fit = word_widths(shape, itemsize)
    if word_bits is not None:
        if word_bits not in fit:
            raise ValueError(f"word_bits={word_bits} does not fit shape {tuple(shape)} with {itemsize}-byte elements")
        fit = [word_bits]
    if not fit:
        raise ValueError(f"no word width fits shape {tuple(shape)} with {itemsize}-byte elements")
    W = fit[-1]
    return W, max(1, itemsize * 8 // W)


# -- the device learner (torch ops: runs on any device) ----------------------------

def _low_masks(torch, device):
    """LOW_MASK (the k low bits set, k = 0..64) as int64, made on ``device``:
    uploading it from the host would make the host wait for the stream."""
    k = torch.arange(65, device=device)
    ones = torch.full_like(k, -1)
    return torch.where(k < 64, ~(ones << k.clamp(max=63)), ones)


def _bit_length(torch, d, W):
    """Bits in use of each W-bit value (int64 tensor; 64-bit words with the
    top bit set are negative and count 64), in one pass over all W shifts."""
    return ((d[..., None] >> torch.arange(W, device=d.device)) != 0).sum(-1)


def _level(torch, v, weight, W, price):
    """Best (lo, hi, base) per column of the words ``v`` [m, P] counted with
    ``weight`` [m, P] (0/1), and whether it pays (score > 0)."""
    m = weight.sum(0)
    bits = torch.arange(W, device=v.device)
    ones = (((v[:, :, None] >> bits) & 1) * weight[:, :, None]).sum(0)     # [P, W]
    majority = ((2 * ones > m[:, None]).to(torch.int64) << bits).sum(1)   # [P]
    masks = _low_masks(torch, v.device)
    d = (v ^ majority) & masks[W]
    P = v.shape[1]

    def hist(key):
        h = torch.zeros(W + 1, P, dtype=torch.int64, device=v.device)
        return h.scatter_add_(0, key, weight)

    top = torch.cumsum(hist(_bit_length(torch, d, W)), 0)                  # [a]: words with d < 2**a
    mid = torch.cumsum(hist(_bit_length(torch, d & masks[W - 1], W)), 0)
    low_d = d & -d
    ctz = torch.where(d == 0, torch.full_like(d, W), _bit_length(torch, low_d, W) - 1)
    agree = torch.flip(torch.cumsum(torch.flip(hist(ctz), [0]), 0), [0])    # [b]: words with ctz >= b
    a = torch.arange(W, device=v.device)[:, None]
    b = torch.arange(1, W + 1, device=v.device)[:, None]
    fixed = torch.cat([W - a, (W - 1 - a)[:W - 1], b]).to(torch.float64)
    count = torch.cat([top[:W], mid[:W - 1], agree[1:W + 1]]).to(torch.float64)
    score = fixed * count - price * (m.to(torch.float64) - count)
    lo = torch.cat([a.expand(W, P), a[:W - 1].expand(W - 1, P), torch.zeros(W, P, dtype=torch.int64,
                                                                           device=v.device)])
    hi = torch.cat([torch.full((W, P), W, device=v.device), torch.full((W - 1, P), W - 1, device=v.device),
                    b.expand(W, P)]).to(torch.int64)
    best = torch.argmax(score, 0, keepdim=True)
    pays = torch.gather(score, 0, best)[0] > 0
    lo, hi = torch.gather(lo, 0, best)[0], torch.gather(hi, 0, best)[0]
    base = majority & masks[hi] & ~masks[lo]
    zero = torch.zeros_like(lo)
    return torch.where(pays, lo, zero), torch.where(pays, hi, zero), torch.where(pays, base, zero)


def learn(torch, words, W, P, price=PRICE):
    """(lo, hi, base), int64 ``[2, P]`` tensors on the words' device, of the
    model learned from ``words`` (a 1-d tensor of W-bit values as int64, a
    whole number of periods): primary and secondary level per column."""
    v = words.reshape(-1, P)
    ones = torch.ones_like(v)
    lo0, hi0, base0 = _level(torch, v, ones, W, price)
    masks = _low_masks(torch, v.device)
    fix = masks[hi0] & ~masks[lo0]
    misses = (((v - base0) & fix) != 0).to(torch.int64)
    lo1, hi1, base1 = _level(torch, v, misses, W, 0.0)
    return torch.stack([lo0, lo1]), torch.stack([hi0, hi1]), torch.stack([base0, base1])


# -- the result -----------------------------------------------------------------

class GpuEncoded(CompressedTensor):
    """A CompressedTensor made on the GPU whose host arrays (payload, kinds,
    and a learned model) are still being copied when compress returns: the
    first host use of any of them waits for the copies, once.  A given
    model, the sizes (``nbytes``, ``ratio``) and the metadata are there at
    once, without waiting.

    With ``payload="device"`` the payload stays in GPU memory
    (``device_payload``, uint64 words as int64): kinds, model and sizes
    arrive without it, and only a host use of ``payload`` (a host or
    ibp.cuda decode, ``to_bytes``) copies it to the host, once.
    ``update_rows`` rewrites the affected slots in both copies.
    """

    def __init__(self, *, ready, status, device_payload=None, host_model=None, **fields):
        self._ready = ready                  # event after the last copy, or None once arrived
        self._status = status                # pinned int64[1]: the kernels' STATUS_* bits
        self._host_model = host_model        # (lo, hi, base) pinned tensors of a learned model
        self.device_payload = device_payload
        self._arrive_lock = threading.Lock()
        super().__init__(**fields)

    def _arrive(self, payload=False):
        """Wait for the copies (kinds, a learned model, a pinned payload);
        with ``payload``, also copy a payload kept on the device to the host."""
        with self._arrive_lock:
            if self._ready is not None:
                self._ready.synchronize()
                self._ready = None
            if int(self._status[0]):
                raise RuntimeError("ibp GPU encoder wrote past its payload (a bug: please report it)")
            if self._host_model is not None:
                lo, hi, base = (t.numpy() for t in self._host_model)
                self.__dict__["_model"] = Model(self.geometry.word_bits, lo.astype(np.uint8), hi.astype(np.uint8),
                                                base.view(np.uint64))
                self._host_model = None
            if payload and self.__dict__["_payload"] is None:
                self.__dict__["_payload"] = self.device_payload.cpu().numpy().view(np.uint64)

    def _field(name, payload=False):
        def get(self):
            if name != "model" or self._host_model is not None:   # a given model is there from the start
                self._arrive(payload)
            return self.__dict__["_" + name]

        def put(self, value):
            self.__dict__["_" + name] = value
        return property(get, put)

    payload = _field("payload", payload=True)
    kinds = _field("kinds")
    model = _field("model")
    del _field

    def arrived(self):
        """Whether the host arrays are complete (never waits)."""
        return self._ready is None or self._ready.query()

    @property
    def nbytes(self):
        """CompressedTensor.nbytes from the arrays' sizes, which are known at
        once: no wait for the GPU (but for a learned model), no payload copy."""
        payload, m = self.__dict__["_payload"], self.model
        words = self.device_payload.numel() if payload is None else payload.size
        index = 0 if self.index is None else self.index[2].nbytes + self.index[3].nbytes
        return int(words * 8 + self.__dict__["_kinds"].nbytes + index
                   + m.lo.nbytes + m.hi.nbytes + m.base.size * m.word_bits // 8)

    def _rewrite_units(self, units, write):
        """... and copy the rewritten slots (only those) to a device payload,
        ordered on the current stream before any later GPU work."""
        super()._rewrite_units(units, write)
        if self.device_payload is not None:
            torch, dev = _torch(), self.device_payload.device
            n, S = self.geometry.nunits, self.geometry.slot_words
            slots = self.payload[:n * S].reshape(n, S)[units].view(np.int64)
            self.device_payload[:n * S].view(n, S).index_copy_(0, _to_device(torch, units.astype(np.int64), dev),
                                                                _to_device(torch, slots, dev))


def _torch():
    import torch
    return torch


# -- launching --------------------------------------------------------------------

_lock = threading.Lock()
_kernels = {}                    # (device, W) -> cupy function
_side_streams = {}               # device -> the stream of the D2H copies
_tables = {}                     # id(Model) -> (weak reference, {device: its encode_table there})


def _kernel(cupy, device_index, W):
    key = (device_index, W)
    with _lock:
        fn = _kernels.get(key)
        if fn is None:
            name = f"ibp_encode<{W}>"
            source = resources.files("ibp.kernels").joinpath("ibp_encode.cu").read_text()
            module = cupy.RawModule(code=source, options=("--std=c++17",), name_expressions=(name,))
            fn = _kernels[key] = module.get_function(name)
    return fn


def _launch(torch, cupy, dev, W, runs):
    """Run encoder launches [(grid, args)] on torch's current stream."""
    from .cuda import _StreamHandle
    if not runs:
        return
    handle = torch.cuda.current_stream(dev).cuda_stream
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    stream = from_external(_StreamHandle(handle)) if from_external else cupy.cuda.ExternalStream(handle, dev.index)
    fn = _kernel(cupy, dev.index, W)
    with cupy.cuda.Device(dev.index), stream:
        for grid, args in runs:
            fn((grid,), (BLOCK,), tuple(np.uint64(a) for a in args))


def _side_stream(torch, dev):
    with _lock:
        s = _side_streams.get(dev.index)
        if s is None:
            s = _side_streams[dev.index] = torch.cuda.Stream(dev)
    return s


def host_wait(event):
    """The one place the host waits for the GPU (the packed size)."""
    event.synchronize()


def _pinned(torch, n, dtype):
    return torch.empty(n, dtype=dtype, pin_memory=True)


def _pack_kinds(torch, kinds8):
    """Four 2-bit kinds per byte, on the device (ibp.encode.pack_kinds)."""
    n = kinds8.numel()
    padded = torch.zeros(-(-n // 4) * 4, dtype=torch.uint8, device=kinds8.device)
    padded[:n] = kinds8
    q = padded.view(-1, 4)
    return q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)


NUMPY_WORDS = {8: np.uint8, 16: np.int16, 32: np.int32, 64: np.int64}   # how torch holds W-bit words


def _int_view(torch, flat_bytes, W):
    return flat_bytes.view({8: torch.uint8, 16: torch.int16, 32: torch.int32, 64: torch.int64}[W])


def _model_table(torch, model, dev):
    """A given model's encode_table on ``dev``, uploaded once per model (on
    the stream current then).  Every use waits on the GPU for that upload and
    marks the table used by its stream, so a model shared by several streams
    is neither read early nor its memory reused too soon."""
    with _lock:
        entry = _tables.get(id(model))
        if entry is None or entry[0]() is not model:   # Models compare by value, so they cannot be weak keys
            entry = _tables[id(model)] = (weakref.ref(model, lambda _, key=id(model): _tables.pop(key, None)), {})
        per_device = entry[1]
        upload = per_device.get(dev.index)
        if upload is None:
            host = encode_table(torch, *model_tensors(torch, model), model.word_bits)
            stream = torch.cuda.current_stream(dev)
            table = host.pin_memory().to(dev, non_blocking=True)
            upload = per_device[dev.index] = (table, stream.record_event(), stream.cuda_stream)
    table, uploaded, upload_stream = upload
    current = torch.cuda.current_stream(dev)
    current.wait_event(uploaded)
    if current.cuda_stream != upload_stream:
        table.record_stream(current)
    return table


def _to_device(torch, array, dev):
    """A numpy array on ``dev``, through pinned memory, so that the host does
    not wait for the stream (as a copy from pageable memory does)."""
    return torch.from_numpy(np.ascontiguousarray(array)).pin_memory().to(dev, non_blocking=True)


class _Job:
    """One tensor on its way through the encoder."""

    def __init__(self, torch, cupy, dev, words, geom, period, table):
        self.torch, self.cupy, self.dev = torch, cupy, dev
        self.words, self.geom, self.period, self.table = words, geom, period, table
        self.current = torch.cuda.current_stream(dev)
        self.status = torch.zeros(1, dtype=torch.int64, device=dev)
        self.kinds8 = torch.empty(geom.nunits, dtype=torch.uint8, device=dev)

    def args(self, **kw):
        g = self.geom
        base = dict(words=self.words.data_ptr(), total_words=g.total_words, U=g.unit_words, nunits=g.nunits,
                    period=self.period, model=self.table.data_ptr(), kinds=self.kinds8.data_ptr(),
                    sizes=0, starts=0, payload=0, payload_words=0, slot_words=g.slot_words,
                    status=self.status.data_ptr())
        base.update(kw)
        return base

    def run(self, **kw):
        _launch(self.torch, self.cupy, self.dev, self.geom.word_bits, launches(**self.args(**kw)))


def _learned_table(torch, words_i, geom, W, P, nbytes):
    """(device table, (lo, hi, base) device tensors) learned from a sample of
    the tensor's whole units (there is at least one: Geometry.check), only
    the sample widened to int64."""
    U = geom.unit_words
    full = geom.total_words // U
    picks = sample_units(torch, full, U * W // 8, nbytes, words_i.device)
    sample = words_i[:full * U].view(full, U).index_select(0, picks).reshape(-1)
    sample = sample.to(torch.int64) & int(LOW_MASK.view(np.int64)[W])
    lo, hi, base = learn(torch, sample, W, P)
    return encode_table(torch, lo, hi, base, W), (lo, hi, base)


def compress(x, *, model=None, word_bits=None, layout="packed", unit_rows=None, payload="pinned"):
    """Compress the CUDA tensor ``x`` on its device (``ibp.compress`` comes
    here for CUDA tensors; arguments as there, plus ``payload``: "pinned"
    (the payload lands in pinned host memory) or "device" (it stays in GPU
    memory: ``ct.device_payload``)).  On torch's current stream; the host
    waits once for a packed layout (its size), never for a slotted one."""
    from .cuda import _device, _imports
    torch, cupy = _imports()
    if payload not in PAYLOADS:
        raise ValueError(f"payload must be one of {PAYLOADS}, got {payload!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if model is not None and not isinstance(model, Model):
        raise TypeError(f"model must be an ibp.Model, not {type(model).__name__}")
    if model is not None and word_bits is not None and word_bits != model.word_bits:
        raise ValueError(f"word_bits={word_bits} contradicts the model's {model.word_bits}-bit words")
    if model is not None and model.transforms_words:
        raise ValueError("the GPU encoder does not rotate words or gather their bits (a model with rotate or "
                         "gather): compress x.cpu() with this model, or let the GPU learn one")
    name = dtypes.name_of_torch(x.dtype)
    itemsize = dtypes.ITEMSIZE[name]
    shape = tuple(x.shape)
    dev = _device(torch, x.device)
    if x.numel() == 0:   # no units to encode: the CPU writes the few bytes of an empty tensor
        from .api import compress as cpu_compress
        return cpu_compress(torch.empty(shape, dtype=x.dtype), model=model, word_bits=word_bits, layout=layout,
                            unit_rows=unit_rows)
    W, P = (model.word_bits, model.period) if model is not None else learner_geometry(shape, itemsize, word_bits)
    geom = Geometry.choose(shape, itemsize, W, unit_rows)
    geom.check()
    if geom.unit_words % P:
        raise ValueError(f"the model's period {P} does not divide this tensor's {geom.unit_words}-word units")
    if geom.unit_words > MAX_UNIT_WORDS:
        raise ValueError(f"units of {geom.unit_words} words (rows no piece divides) are too long for the GPU "
                         f"encoder (at most {MAX_UNIT_WORDS}): compress x.cpu()")
    with torch.cuda.device(dev):
        flat = x.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
        if flat.data_ptr() % (W // 8):   # words wider than the elements, at an odd offset
            flat = flat.clone()
        words = _int_view(torch, flat, W)
        if model is not None:
            table, learned = _model_table(torch, model, dev), None
        else:
            table, learned = _learned_table(torch, words, geom, W, P, flat.numel())
        job = _Job(torch, cupy, dev, words, geom, P, table)
        fields = dict(dtype=name, shape=shape, framework="torch", geometry=geom, layout=layout, model=model)
        if layout == "packed":
            return _packed(job, fields, learned, payload)
        return _slotted(job, fields, learned, payload)


def _copy_small(job, learned):
    """Pinned host copies of the packed kinds, the status and a learned model
    (queued on the current stream)."""
    torch = job.torch
    kinds = _pack_kinds(torch, job.kinds8)
    host_kinds = _pinned(torch, kinds.numel(), torch.uint8)
    host_kinds.copy_(kinds, non_blocking=True)
    host_model = None
    if learned is not None:
        host_model = tuple(_pinned(torch, t.shape, torch.int64) for t in learned)
        for h, t in zip(host_model, learned):
            h.copy_(t, non_blocking=True)
    return host_kinds, host_model


def _result(job, fields, host_kinds, host_model, host_payload, device_payload, **extra):
    """The GpuEncoded, holding only its host arrays (and a device payload):
    the scratch tensors, and the input, may go, since their memory is reused
    only by work queued after this call on the same stream (the side stream's
    copies are joined to it), as torch's caching allocator does."""
    torch = job.torch
    host_status = _pinned(torch, 1, torch.int64)
    host_status.copy_(job.status, non_blocking=True)
    ready = job.current.record_event()
    ct = GpuEncoded(ready=ready, status=host_status, device_payload=device_payload, host_model=host_model,
                    kinds=host_kinds.numpy(), payload=None if host_payload is None else host_payload.numpy().view(np.uint64),
                    **fields, **extra)
    if host_payload is not None:
        ct._pinned = host_payload    # page-locked: GPU decodes read it in place
    return ct


def _slotted(job, fields, learned, payload):
    torch, geom = job.torch, job.geom
    nwords = geom.nunits * geom.slot_words + 1
    data = torch.empty(nwords, dtype=torch.int64, device=job.dev)
    data[-1:].zero_()
    job.run(njobs=geom.nunits, payload=data.data_ptr(), payload_words=nwords, mode=SLOTTED)
    host_kinds, host_model = _copy_small(job, learned)
    host_payload = None
    if payload == "pinned":
        host_payload = _pinned(torch, nwords, torch.int64)
        host_payload.copy_(data, non_blocking=True)
    return _result(job, fields, host_kinds, host_model, host_payload, data if payload == "device" else None)


def _packed(job, fields, learned, payload):
    torch, geom, dev = job.torch, job.geom, job.dev
    n = geom.nunits
    sizes = torch.empty(n, dtype=torch.int64, device=dev)
    job.run(njobs=n, sizes=sizes.data_ptr(), mode=CLASSIFY)
    ends = torch.cumsum(sizes, 0)
    host_ends = _pinned(torch, n, torch.int64)
    host_ends.copy_(ends, non_blocking=True)
    host_wait(job.current.record_event())
    ends_np = host_ends.numpy()
    total = int(ends_np[-1])
    starts = np.zeros(n, np.int64)
    starts[1:] = ends_np[:-1]
    nwords = -(-total // 64) + 1
    data = torch.zeros(nwords, dtype=torch.int64, device=dev)
    dstarts = ends - sizes
    host_payload = _pinned(torch, nwords, torch.int64) if payload == "pinned" else None
    side = _side_stream(torch, dev) if host_payload is not None else None
    for u0, u1, w0, w1 in write_chunks(starts, total, CHUNK_BYTES):
        job.run(njobs=u1 - u0, first_unit=u0, starts=dstarts.data_ptr(), payload=data.data_ptr(),
                payload_words=nwords, mode=PACKED)
        if side is not None and w1 > w0:
            side.wait_event(job.current.record_event())
            with torch.cuda.stream(side):
                host_payload[w0:w1].copy_(data[w0:w1], non_blocking=True)
    if side is not None:
        job.current.wait_stream(side)
    host_kinds, host_model = _copy_small(job, learned)
    index = build_index(starts, total)
    return _result(job, fields, host_kinds, host_model, host_payload, data if payload == "device" else None,
                   payload_bits=total, index=index)


def encode_rows(ct, rows, values):
    """(units, write) for ``CompressedTensor.update_rows`` with CUDA values:
    the affected units encoded on the values' GPU into compact slots (units
    that also hold other rows are decoded on the host first, and their words
    go to the device), copied back; ``write(payload)`` stores them in their
    slots and returns their kinds.  Repeated rows take the last value."""
    from .cuda import _device, _imports
    torch, cupy = _imports()
    dev = _device(torch, values.device)
    g = ct.geometry
    W, U, R = g.word_bits, g.unit_words, g.row_words
    last = np.unique(rows[::-1], return_index=True)[1]
    keep = rows.size - 1 - last                   # each row's last occurrence, rows ascending
    with torch.cuda.device(dev):
        flat = values.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
        if flat.data_ptr() % (W // 8):
            flat = flat.clone()
        new = _int_view(torch, flat, W).view(rows.size, R)
        kept = new.index_select(0, _to_device(torch, keep, dev))
        if U >= R and U // R > 1:
            per = U // R
            units = np.unique(rows // per)
            block = _to_device(torch, ct._decode_units(units).view(NUMPY_WORDS[W]), dev).view(units.size, per, R)
            krows = rows[keep]
            where = _to_device(torch, np.searchsorted(units, krows // per), dev)
            block[where, _to_device(torch, krows % per, dev)] = kept
        else:
            split = R // U if U < R else 1
            units = (rows[keep][:, None] * split + np.arange(split)).reshape(-1)
            block = kept
        block = block.reshape(-1)
        geom = Geometry(g.shape, g.itemsize, W, U)
        n, S = units.size, g.slot_words
        job = _Job(torch, cupy, dev, block, geom, ct.model.period, _model_table(torch, ct.model, dev))
        data = torch.empty(n * S + 1, dtype=torch.int64, device=dev)
        job.run(njobs=n, total_words=block.numel(), nunits=n, payload=data.data_ptr(), payload_words=n * S + 1,
                mode=SLOTTED)
        host = _pinned(torch, n * S + 1, torch.int64)
        host.copy_(data, non_blocking=True)
        host_kinds = _pinned(torch, n, torch.uint8)
        host_kinds.copy_(job.kinds8[:n], non_blocking=True)
        host_status = _pinned(torch, 1, torch.int64)
        host_status.copy_(job.status, non_blocking=True)
        torch.cuda.current_stream(dev).synchronize()   # update_rows returns with the host payload rewritten
    if int(host_status[0]):
        raise RuntimeError("ibp GPU encoder wrote past its slots (a bug: please report it)")
    slots = host.numpy().view(np.uint64)[:n * S].reshape(n, S)

    def write(payload):
        payload[:g.nunits * S].reshape(g.nunits, S)[units] = slots
        return host_kinds.numpy().copy()
    return units, write
