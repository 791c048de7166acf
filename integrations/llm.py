"""LLM weights and KV caches kept IBP-compressed in host memory.

A model bigger than the GPU runs by streaming each module's weights in just
before the module runs.  Streaming compressed weights moves fewer bytes over
PCIe, and the GPU decoder reads them straight from pinned host memory.

* ``offload(model, device)``: every large weight lives compressed on the host;
  a forward pre-hook decodes a module's weights on ``device`` (the next
  module's are decoded ahead, on a side stream with CUDA) and a post-hook
  drops them, so the device holds about two modules' weights at a time.
  The hooks follow accelerate's ``ModelHook`` shape (``pre_forward`` /
  ``post_forward``) without needing accelerate.
* ``CompressedKVCache``: a transformers ``DynamicCache`` whose layers keep
  their older tokens' keys and values compressed on the host and restore
  them when the layer runs.
* ``compress_checkpoint(src, path)``: a safetensors file or state dict to an
  ``.ibp`` file that ``offload(model, device, state=ibp.load(path))`` reads.

Outputs are bit-identical to the uncompressed model: the codec is lossless.
"""
import functools
import inspect
import math
from collections.abc import Mapping

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

import ibp
from ibp import dtypes
from ibp.tensor import CompressedTensor

__all__ = ["offload", "WeightOffloader", "WeightOffloadHook", "CompressedKVCache", "CompressedKVLayer",
           "cache_kwargs", "compress_checkpoint"]


def _device(device):
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, not {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is cuda but torch sees no CUDA GPU")
    return device


def _decode(ct, device):
    """The whole of ``ct`` as a torch tensor on ``device`` (GPU decoder for CUDA)."""
    if device.type == "cuda":
        return ibp.decompress(ct, device=device)
    out = torch.empty(ct.shape, dtype=dtypes.torch_dtype(ct.dtype_name))
    return ibp.decompress(ct, out=out)


def _compress(tensor, device):
    """``tensor`` (torch or numpy) compressed from host memory; pinned when it
    will feed a GPU."""
    ct = ibp.compress(tensor.detach().cpu() if torch.is_tensor(tensor) else tensor)
    return ct.pin_memory() if device.type == "cuda" else ct


# -- weight offload ------------------------------------------------------------
class _Entry:
    """One module's offloaded tensors and the placeholders that stand in for
    them between forwards."""

    def __init__(self, number, module, items, device):
        self.number = number
        self.module = module
        self.slots = [(kind, attr) for kind, attr, _, _ in items]
        self.tensors = [ct for _, _, ct, _ in items]
        self.nbytes = sum(ct.raw_nbytes for ct in self.tensors)
        self.placeholders = [_placeholder(t, kind, device) for kind, _, _, t in items]

    def install(self, values):
        for (kind, attr), value in zip(self.slots, values):
            getattr(self.module, kind)[attr] = value

    def release(self):
        self.install(self.placeholders)


def _placeholder(tensor, kind, device):
    """A broadcast zero of ``tensor``'s shape and dtype on ``device``: it owns
    one element, yet ``model.device`` and ``model.dtype`` still answer right."""
    zero = torch.zeros((), dtype=tensor.dtype, device=device).expand(tensor.shape)
    return torch.nn.Parameter(zero, requires_grad=False) if kind == "_parameters" else zero


class WeightOffloader:
    """The shared state of one offloaded model: the compressed weights, the
    order modules ran in (learned on the first forward) and the weights
    decoded ahead of time.  ``peak_bytes`` is the most weight bytes ever
    resident on the device at once (installed plus prefetched)."""

    def __init__(self, entries, device):
        self.entries = entries
        self.device = device
        self.order = None
        self._recording = []
        self._in_pass = False
        self._position = 0
        self._prefetched = {}
        self._resident = 0
        self.peak_bytes = 0
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _unique(self):
        return {id(ct): ct for e in self.entries for ct in e.tensors}.values()

    @property
    def nbytes(self):
        """Host bytes of the compressed weights (tied ones counted once)."""
        return sum(ct.nbytes for ct in self._unique())

    @property
    def raw_nbytes(self):
        """Bytes the offloaded weights would take uncompressed."""
        return sum(ct.raw_nbytes for ct in self._unique())

    # -- one forward pass ---------------------------------------------------
    def begin(self):
        self._in_pass, self._position = True, 0
        if self.order is None:
            self._recording = []

    def end(self):
        self._in_pass = False
        if self.order is None:
            self.order = self._recording
        keep = self.order[0].number if self.order else None
        for number in [n for n in self._prefetched if n != keep]:
            self._drop(number)

    def load(self, entry):
        """Put ``entry``'s weights on the device, then start decoding the
        module expected to run next."""
        ready = self._prefetched.pop(entry.number, None)
        if ready is None:
            values = [_decode(ct, self.device) for ct in entry.tensors]
            self._account(entry.nbytes)
        else:
            values, event = ready
            if event is not None:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(event)
                for v in values:
                    v.record_stream(stream)
        entry.install(values)
        nxt = self._next(entry)
        if nxt is not None and nxt.number not in self._prefetched and nxt is not entry:
            self._prefetch(nxt)

    def release(self, entry):
        entry.release()
        self._account(-entry.nbytes)

    def _next(self, entry):
        """The entry expected after ``entry`` (None while the first pass
        records the order, or when a module runs outside the model's forward)."""
        if not self._in_pass:
            return None
        if self.order is None:
            self._recording.append(entry)
            return None
        try:
            at = self.order.index(entry, self._position)
        except ValueError:
            return None
        self._position = at + 1
        return self.order[(at + 1) % len(self.order)]

    def _prefetch(self, entry):
        if self._stream is None:
            values, event = [_decode(ct, self.device) for ct in entry.tensors], None
        else:
            with torch.cuda.stream(self._stream):
                values = [_decode(ct, self.device) for ct in entry.tensors]
                event = torch.cuda.Event()
                event.record(self._stream)
        self._prefetched[entry.number] = (values, event)
        self._account(entry.nbytes)

    def _drop(self, number):
        del self._prefetched[number]
        self._account(-self.entries[number].nbytes)

    def _account(self, nbytes):
        self._resident += nbytes
        self.peak_bytes = max(self.peak_bytes, self._resident)


class WeightOffloadHook:
    """accelerate ``ModelHook``-shaped: ``pre_forward`` decodes the module's
    weights onto the device, ``post_forward`` drops them."""

    def __init__(self, offloader, entry):
        self.offloader = offloader
        self.entry = entry

    def init_hook(self, module):
        return module

    def pre_forward(self, module, *args, **kwargs):
        self.offloader.load(self.entry)
        return args, kwargs

    def post_forward(self, module, output):
        self.offloader.release(self.entry)
        return output

    def detach_hook(self, module):
        return module


class _ModelHook(WeightOffloadHook):
    """The root's hook: moves inputs to the device and brackets the pass."""

    def pre_forward(self, module, *args, **kwargs):
        self.offloader.begin()
        move = functools.partial(_to_device, device=self.offloader.device)
        return move(args), move(kwargs)

    def post_forward(self, module, output):
        self.offloader.end()
        return output


def _to_device(obj, device):
    """Tensors, also inside plain lists, tuples and dicts, moved to ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if type(obj) in (list, tuple):
        return type(obj)(_to_device(o, device) for o in obj)
    if type(obj) is dict:
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _register(module, hook):
    module.register_forward_pre_hook(lambda m, args, kwargs: hook.pre_forward(m, *args, **kwargs),
                                     with_kwargs=True)
    module.register_forward_hook(lambda m, args, output: hook.post_forward(m, output))


def _slots(model):
    """Every parameter and buffer as (module, kind, attribute, full name),
    grouped by tensor so tied weights are handled once."""
    groups = {}
    for prefix, module in model.named_modules():
        for kind in ("_parameters", "_buffers"):
            for attr, t in getattr(module, kind).items():
                if t is not None:
                    name = f"{prefix}.{attr}" if prefix else attr
                    groups.setdefault(id(t), (t, []))[1].append((module, kind, attr, name))
    return list(groups.values())


def _kind(value):
    """(dtype name, shape) of a CompressedTensor, torch tensor or numpy array."""
    if isinstance(value, CompressedTensor):
        return value.dtype_name, tuple(value.shape)
    if torch.is_tensor(value):
        return dtypes.name_of_torch(value.dtype), tuple(value.shape)
    return dtypes.name_of_numpy(value.dtype), tuple(value.shape)


def _source(tensor, names, state, used):
    """Where a tensor's values come from: the state (CompressedTensor or
    tensor) if it holds any of the tensor's names (tied weights have several),
    else the model's own tensor."""
    present = [name for name in names if state is not None and name in state]
    used.update(present)
    if present:
        value = state[present[0]]
        got, want = _kind(value), _kind(tensor)
        if got != want:
            raise ValueError(f"state[{present[0]!r}] is {got[0]}{list(got[1])}, "
                             f"the model needs {want[0]}{list(want[1])}")
        return value
    if tensor.device.type == "meta":
        raise ValueError(f"{names[0]} is on the meta device and the state does not hold it")
    return tensor


def offload(model, device, *, min_bytes=1 << 20, state=None):
    """Keep ``model``'s large weights compressed in host memory and decode
    each module's weights on ``device`` only while the module runs.

    Tensors of at least ``min_bytes`` are compressed (pinned when ``device``
    is CUDA); smaller ones move to ``device`` once.  ``state`` (a mapping of
    state-dict names to CompressedTensors or tensors, e.g. ``ibp.load(path)``)
    supplies the weights instead of the model's own, so the model may be
    built on the meta device except for non-persistent buffers.  The model is
    changed in place and returned, with the controller as
    ``model.ibp_offloader``; between forwards its offloaded weights read as
    broadcast zeros.  For inference: decoded weights do not require grad.
    """
    device = _device(device)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"offload takes a torch.nn.Module, not {type(model).__name__}")
    if hasattr(model, "ibp_offloader"):
        raise ValueError("this model is already offloaded")
    if state is not None and not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping of names to tensors, not {type(state).__name__}")
    if not isinstance(min_bytes, int) or min_bytes < 0:
        raise ValueError(f"min_bytes must be a non-negative int, got {min_bytes!r}")
    used, plan, per_module = set(), [], {}
    for tensor, slots in _slots(model):
        plan.append((tensor, slots, _source(tensor, [name for *_, name in slots], state, used)))
    if state is not None and set(state) - used:
        raise ValueError(f"state holds tensors the model does not have: {sorted(set(state) - used)[:5]}")
    for tensor, slots, value in plan:
        nbytes = math.prod(tensor.shape) * tensor.element_size()
        if nbytes >= min_bytes and nbytes > 0:
            ct = value if isinstance(value, CompressedTensor) else _compress(value, device)
            if device.type == "cuda" and not ct.is_pinned():
                ct = ct.pin_memory()
            for module, kind, attr, _ in slots:
                per_module.setdefault(id(module), (module, []))[1].append((kind, attr, ct, tensor))
        else:
            if isinstance(value, CompressedTensor):
                resident = _decode(value, device)
            else:
                resident = (value if torch.is_tensor(value) else torch.from_numpy(value)).to(device)
            if isinstance(tensor, torch.nn.Parameter):
                resident = torch.nn.Parameter(resident, requires_grad=tensor.requires_grad)
            for module, kind, attr, _ in slots:
                getattr(module, kind)[attr] = resident
    entries = [_Entry(number, module, items, device) for number, (module, items) in enumerate(per_module.values())]
    for entry in entries:
        entry.release()
    offloader = WeightOffloader(entries, device)
    _register(model, _ModelHook(offloader, None))
    for entry in entries:
        _register(entry.module, WeightOffloadHook(offloader, entry))
    model.ibp_offloader = offloader
    return model


# -- checkpoints ---------------------------------------------------------------
def compress_checkpoint(src, path, *, metadata=None):
    """Write a checkpoint (a ``.safetensors`` path or a mapping of names to
    tensors) to ``path`` as an ibp file and return its CompressedTensors."""
    if isinstance(src, Mapping):
        tensors = dict(src)
    else:
        from safetensors.torch import load_file
        tensors = load_file(str(src))
    compressed = {name: t if isinstance(t, CompressedTensor) else ibp.compress(t) for name, t in tensors.items()}
    ibp.save(compressed, path, metadata=metadata)
    return compressed


# -- KV cache ------------------------------------------------------------------
class _CompressedSequence:
    """One of a layer's keys or values, [batch, heads, tokens, head_dim]: the
    older tokens as compressed blocks on the host (rows = tokens), the most
    recent ones as a plain tensor on the device."""

    def __init__(self):
        self.set(None)

    def set(self, tensor):
        self.blocks, self.compressed, self.tail = [], 0, tensor

    def __len__(self):
        if self.tail is None:
            return 0
        return self.compressed + (self.tail.shape[-2] if self.tail.dim() >= 2 else 0)

    def full(self, device):
        if not self.blocks:
            return self.tail
        return torch.cat([self._restore(ct, device) for ct in self.blocks] + [self.tail], dim=-2)

    def append(self, new, device, block_tokens):
        """The whole sequence with ``new`` appended; full blocks of
        ``block_tokens`` not yet compressed are compressed and leave the device."""
        tail = [self.tail] if self.tail is not None and self.tail.shape[-2] else []
        full = torch.cat([self._restore(ct, device) for ct in self.blocks] + tail + [new], dim=-2)
        n = (full.shape[-2] - self.compressed) // block_tokens * block_tokens
        if n:
            block = full[..., self.compressed:self.compressed + n, :]
            self.blocks.append(_compress(block.permute(2, 0, 1, 3), device))
            self.compressed += n
        self.tail = full if self.compressed == 0 else full[..., self.compressed:, :].clone()
        return full

    @staticmethod
    def _restore(ct, device):
        return _decode(ct, device).permute(1, 2, 0, 3)


class CompressedKVLayer(DynamicLayer):
    """A ``DynamicLayer`` that keeps all but the last ``block_tokens``-odd
    tokens compressed on the host.  ``keys`` / ``values`` read as the whole
    restored sequence and assigning them replaces it, so every inherited
    operation (crop, reorder, batch select, reset) stays correct."""

    def __init__(self, block_tokens=64, **kwargs):
        if not isinstance(block_tokens, int) or block_tokens < 1:
            raise ValueError(f"block_tokens must be a positive int, got {block_tokens!r}")
        self.block_tokens = block_tokens
        self._k, self._v = _CompressedSequence(), _CompressedSequence()
        super().__init__(**kwargs)

    @property
    def keys(self):
        return self._k.full(getattr(self, "device", None))

    @keys.setter
    def keys(self, value):
        self._k.set(value)

    @property
    def values(self):
        return self._v.full(getattr(self, "device", None))

    @values.setter
    def values(self, value):
        self._v.set(value)

    def lazy_initialization(self, key_states, value_states=None):
        """Before transformers 5, this is called with the keys only."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self._k.set(key_states[..., :0, :])
        self._v.set((key_states if value_states is None else value_states)[..., :0, :])
        self.is_initialized = True

    def reset(self):
        """Drop every token (the base class would zero a restored copy)."""
        self._k.set(None)
        self._v.set(None)
        self.is_initialized = False

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = self._k.append(key_states, self.device, self.block_tokens)
        values = self._v.append(value_states, self.device, self.block_tokens)
        return keys, values

    def get_seq_length(self):
        return len(self._k) if self.is_initialized else 0

    def offload(self):
        """Nothing to move: the bulk already lives compressed on the host."""

    def prefetch(self):
        """Nothing to move: restoring happens in ``update``."""

    @property
    def compressed_nbytes(self):
        return sum(ct.nbytes for seq in (self._k, self._v) for ct in seq.blocks)


class CompressedKVCache(DynamicCache):
    """A ``DynamicCache`` (pass it to ``generate`` or to a forward with
    ``**cache_kwargs(model, cache)``) whose layers keep their K/V compressed on the host in blocks
    of ``block_tokens`` tokens, and restore them (on the GPU when the cache
    lives there) each time the layer runs.  Full-attention layers only."""

    def __init__(self, *, block_tokens=64):
        if not isinstance(block_tokens, int) or block_tokens < 1:
            raise ValueError(f"block_tokens must be a positive int, got {block_tokens!r}")
        Cache.__init__(self, layer_class_to_replicate=functools.partial(CompressedKVLayer, block_tokens=block_tokens))

    @property
    def compressed_nbytes(self):
        """Host bytes held by the compressed blocks of every layer."""
        return sum(layer.compressed_nbytes for layer in self.layers)


def cache_kwargs(model, cache):
    """``{name: cache}`` for the keyword ``model`` takes its KV cache by:
    ``cache`` since transformers 5 renamed it, ``past_key_values`` before."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}
