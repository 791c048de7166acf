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
* ``from_pretrained(path, device)``: a transformers model from a compressed
  model directory (``ibp compress MODEL_DIR OUT``), weights offloaded.

Outputs are bit-identical to the uncompressed model: the codec is lossless.
"""
import functools
import math
import os
import weakref
from collections.abc import Mapping
from typing import Any

import torch

import ibp
from ibp import dtypes
from ibp.api import compress_tensors
from ibp.tensor import CompressedTensor

from ._torch_io import checked_device, compress_on_host, decode_whole
from .kv_cache import CompressedKVCache, CompressedKVLayer, cache_kwargs
from .pretrained import from_pretrained, rebuilt_buffers

__all__ = ["offload", "from_pretrained", "WeightOffloader", "WeightOffloadHook", "CompressedKVCache",
           "CompressedKVLayer", "cache_kwargs", "compress_checkpoint"]


# -- weight offload ------------------------------------------------------------
class _Entry:
    """One module's offloaded tensors and the placeholders that stand in for
    them between forwards (one per tensor, shared by its tied slots, so tied
    weights stay one object)."""

    def __init__(self, number, module, items, placeholders):
        self.number = number
        self.module = module
        self.slots = [(kind, attr) for kind, attr, _, _ in items]
        self.tensors = [ct for _, _, ct, _ in items]
        self.nbytes = sum(ct.raw_nbytes for ct in self.tensors)
        self.placeholders = [placeholders[id(ct)] for _, _, ct, _ in items]

    def install(self, values):
        for (kind, attr), value in zip(self.slots, values):
            getattr(self.module, kind)[attr] = value

    def release(self):
        self.install(self.placeholders)


def _placeholder(tensor, ct, kind, device):
    """What stands in for ``tensor`` (compressed as ``ct``) between its
    module's forwards: a broadcast zero of its shape and dtype on
    ``device``, which owns one element, yet ``model.device`` and
    ``model.dtype`` still answer right; put to any use beyond such questions
    (a model that reads a weight without calling its module: DeBERTa's
    relative embeddings, CLIP's position table when interpolating), it
    gives the weight, decoded for that use."""
    zero = torch.zeros((), dtype=tensor.dtype, device=device).expand(tensor.shape)
    return _standing_in(zero, (ct, device), _PlaceholderParameter if kind == "_parameters" else _Placeholder)


def _standing_in(zero, source, cls):
    """``zero`` as a placeholder of class ``cls`` for the weight ``source`` (ct, device) decodes to."""
    placeholder = cls._make_subclass(cls, zero, False)
    placeholder.ibp_source = source
    return placeholder


def _decoded_for_use(cls, func, types, args=(), kwargs=None):
    """``func`` run on the weights its placeholders stand for (see ``_placeholder``)."""
    kwargs = kwargs or {}
    if func in _ASKED or func is torch.Tensor.detach:
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        if func is torch.Tensor.detach:   # state_dict detaches every weight, then gives the host values instead
            return _standing_in(result, args[0].ibp_source, _Placeholder)
        return result
    if func is torch.Tensor.to and _already(args[0], *args[1:], **kwargs):   # model.to() where the weights are
        return args[0]
    if func == _SET_DATA:   # (each access makes a new method-wrapper: equal, not the same)
        if args[1] is args[0]:   # model.to() where the weights already are
            return None
        raise TypeError("an offloaded weight is not converted in place (model.to(), .half(), weight.data = ...): "
                        "convert the model before offload")

    def value(x):
        return decode_whole(*x.ibp_source) if isinstance(x, (_Placeholder, _PlaceholderParameter)) else x
    args, kwargs = torch.utils._pytree.tree_map(value, (args, kwargs))
    return func(*args, **kwargs)


class _Placeholder(torch.Tensor):
    __torch_function__ = classmethod(_decoded_for_use)

    def __deepcopy__(self, memo):
        raise TypeError("an offloaded model is not copied (its hooks would drive the original's weights): "
                        "copy the model, then offload the copy")


class _PlaceholderParameter(torch.nn.Parameter):
    __torch_function__ = classmethod(_decoded_for_use)
    __deepcopy__ = _Placeholder.__deepcopy__


def _already(tensor, *args, copy=False, **kwargs):
    """Whether ``tensor.to(*args, **kwargs)`` would give ``tensor`` itself."""
    device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    device = tensor.device if device is None else torch.device(device)
    return not copy and memory_format is None and (dtype is None or dtype == tensor.dtype) \
        and device.type == tensor.device.type and device.index in (None, tensor.device.index)


def _questions(*names):
    """The torch functions of ``names`` (an attribute as its getter, as
    ``__torch_function__`` is handed it)."""
    found = set()
    for name in names:
        attr = getattr(torch.Tensor, name)
        found.add(attr.__get__ if isinstance(attr, property) or type(attr).__name__ == "getset_descriptor" else attr)
    return found


# What a placeholder answers itself: questions about the weight, not its values.
_ASKED = _questions("shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "is_meta", "layout", "is_sparse",
                    "is_quantized", "grad", "size", "dim", "numel", "element_size", "is_floating_point", "is_complex",
                    "stride", "is_contiguous", "data_ptr", "__hash__", "nelement", "requires_grad_", "__reduce_ex__",
                    "_is_view", "untyped_storage", "storage_offset", "is_pinned", "nbytes", "itemsize", "is_leaf",
                    "is_shared", "get_device", "__len__") | {torch._has_compatible_shallow_copy_type}
_SET_DATA = torch.Tensor.data.__set__


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
            values = [decode_whole(ct, self.device) for ct in entry.tensors]
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
            values, event = [decode_whole(ct, self.device) for ct in entry.tensors], None
        else:
            with torch.cuda.stream(self._stream):
                values = [decode_whole(ct, self.device) for ct in entry.tensors]
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


def _state_of(entry, decoded, module, state_dict, prefix, local_metadata):
    """state_dict post-hook: the module's offloaded weights as their values,
    decoded on the host (between forwards the module holds placeholders), so
    ``save_pretrained`` writes the weights.  ``decoded`` (id of a
    CompressedTensor -> its values while a state dict holds them) gives tied
    weights one tensor, as they are in the model."""
    for (kind, attr), ct in zip(entry.slots, entry.tensors):
        if prefix + attr in state_dict:
            value = decoded.get(id(ct))
            if value is None:
                value = decoded[id(ct)] = decode_whole(ct, torch.device("cpu"))
            state_dict[prefix + attr] = value


def _refuse_load(entry, module, state_dict, prefix, *args):
    """load_state_dict pre-hook: an offloaded weight is a placeholder that
    cannot be copied into (torch would say 'more than one element of the
    written-to tensor refers to a single memory location')."""
    names = [prefix + attr for _, attr in entry.slots if prefix + attr in state_dict]
    if names:
        raise ValueError(f"{', '.join(names[:3])} {'is' if len(names) == 1 else 'are'} offloaded (kept compressed "
                         "on the host): load_state_dict cannot write there; give the weights to "
                         "offload(model, device, state=...) on a model built on meta, or to from_pretrained")


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


def _held(names: list[str], state: Mapping[str, Any] | None) -> list[str]:
    """The names of a tensor (tied weights have several) that ``state`` holds."""
    return [name for name in names if state is not None and name in state]


def _source(tensor: torch.Tensor, names: list[str], state: Mapping[str, Any] | None, used: set[str],
            rebuilt: Mapping[str, torch.Tensor]) -> Any:
    """Where a tensor's values come from: the state (CompressedTensor or
    tensor) if it holds any of the tensor's names, else a rebuilt buffer,
    else the model's own tensor."""
    present = _held(names, state)
    used.update(present)
    if present:
        value = state[present[0]]
        got, want = _kind(value), _kind(tensor)
        if got != want:
            raise ValueError(f"state[{present[0]!r}] is {got[0]}{list(got[1])}, "
                             f"the model needs {want[0]}{list(want[1])}")
        return value
    return rebuilt.get(names[0], tensor)


def offload(model: torch.nn.Module, device: str | torch.device, *, min_bytes: int = 1 << 20,
            state: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """Keep ``model``'s large weights compressed in host memory and decode
    each module's weights on ``device`` only while the module runs.

    Tensors of at least ``min_bytes`` are compressed (pinned when ``device``
    is CUDA); smaller ones move to ``device`` once.  ``state`` (a mapping of
    state-dict names to CompressedTensors or tensors, e.g. ``ibp.load(path)``)
    supplies the weights instead of the model's own, so the model may be
    built on the meta device; the non-persistent buffers of a transformers
    model built so are rebuilt as transformers builds them (anything else on
    meta that the state lacks is an error).  The model is
    changed in place and returned, with the controller as
    ``model.ibp_offloader``; between forwards placeholders stand in for its
    offloaded weights: they answer questions about a weight (shape, dtype,
    device) themselves and give its values, decoded, to any other use (a
    model that reads a weight without calling its module decodes it there,
    each time), while ``state_dict()`` (and so ``save_pretrained``) gives
    the values decoded on the host.  For inference: decoded weights do not
    require grad.
    """
    device = checked_device(device)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"offload takes a torch.nn.Module, not {type(model).__name__}")
    if hasattr(model, "ibp_offloader"):
        raise ValueError("this model is already offloaded")
    if state is not None and not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping of names to tensors, not {type(state).__name__}")
    if not isinstance(min_bytes, int) or min_bytes < 0:
        raise ValueError(f"min_bytes must be a non-negative int, got {min_bytes!r}")
    groups = [(tensor, slots, [name for *_, name in slots]) for tensor, slots in _slots(model)]
    on_meta = [names[0] for tensor, _, names in groups if tensor.device.type == "meta" and not _held(names, state)]
    rebuilt = rebuilt_buffers(model, on_meta) if on_meta else {}
    used, plan, per_module = set(), [], {}
    for tensor, slots, names in groups:
        plan.append((tensor, slots, _source(tensor, names, state, used, rebuilt)))
    if state is not None and set(state) - used:
        raise ValueError(f"state holds tensors the model does not have: {sorted(set(state) - used)[:5]}")
    for tensor, slots, value in plan:
        nbytes = math.prod(tensor.shape) * tensor.element_size()
        if nbytes >= min_bytes and nbytes > 0:
            ct = value if isinstance(value, CompressedTensor) else compress_on_host(value, device)
            if device.type == "cuda" and not ct.is_pinned():
                ct = ct.pin_memory()
            for module, kind, attr, _ in slots:
                per_module.setdefault(id(module), (module, []))[1].append((kind, attr, ct, tensor))
        else:
            if isinstance(value, CompressedTensor):
                resident = decode_whole(value, device)
            else:
                resident = (value if torch.is_tensor(value) else torch.from_numpy(value)).to(device)
            if isinstance(tensor, torch.nn.Parameter):
                resident = torch.nn.Parameter(resident, requires_grad=tensor.requires_grad)
            for module, kind, attr, _ in slots:
                getattr(module, kind)[attr] = resident
    placeholders = {id(ct): _placeholder(t, ct, kind, device)
                    for _, items in per_module.values() for kind, _, ct, t in items}
    entries = [_Entry(number, module, items, placeholders)
               for number, (module, items) in enumerate(per_module.values())]
    for entry in entries:
        entry.release()
    offloader = WeightOffloader(entries, device)
    _register(model, _ModelHook(offloader, None))
    decoded = weakref.WeakValueDictionary()
    for entry in entries:
        _register(entry.module, WeightOffloadHook(offloader, entry))
        entry.module.register_state_dict_post_hook(functools.partial(_state_of, entry, decoded))
        entry.module.register_load_state_dict_pre_hook(functools.partial(_refuse_load, entry))
    model.ibp_offloader = offloader
    return model


# -- checkpoints ---------------------------------------------------------------
def compress_checkpoint(src: str | os.PathLike | Mapping[str, Any], path: str | os.PathLike, *,
                        metadata: Mapping[str, str] | None = None) -> dict[str, CompressedTensor]:
    """Write a checkpoint (a ``.safetensors`` path or a mapping of names to
    tensors) to ``path`` as an ibp file and return its CompressedTensors."""
    if isinstance(src, Mapping):
        tensors = dict(src)
    else:
        from safetensors.torch import load_file
        tensors = load_file(str(src))
    compressed = compress_tensors(tensors)
    ibp.save(compressed, path, metadata=metadata)
    return compressed
