"""Hugging Face models whose weights stay IBP-compressed: ``from_pretrained``
of a compressed model directory, and the buffers no checkpoint holds.

transformers builds a model on the meta device and then materialises what
the checkpoint lacks: non-persistent buffers (rotary ``inv_freq``,
``position_ids``, ``token_type_ids``...) come from the modules' own code
(``__init__``, and from version 5 ``_init_weights``).  Here a model is built
with only its *parameters* on meta, the way accelerate's
``init_empty_weights(include_buffers=False)`` does: that same code computes
the buffers for real, on the host, while the weights cost nothing.  The same
build rebuilds the buffers of a model made wholly on meta for ``offload``.
"""
import contextlib
import copy
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

import ibp
from ibp import checkpoints, dtypes
from ibp.analysis import Reuse
from ibp.api import compress_bytes
from ibp.tensor import CompressedTensor

from ._torch_io import checked_device, decode_whole

__all__ = ["from_pretrained", "rebuilt_buffers"]


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device as it is
    registered (so its initialisation runs on meta too); buffers stay real.
    Like accelerate's, the patch is process-wide while it lasts."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        p = module._parameters[name]
        if p is not None and p.device.type != "meta":
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _is_auto_class(model_class: type) -> bool:
    return hasattr(model_class, "_model_mapping")  # AutoModel, AutoModelForCausalLM, ...


def _build(model_class: type, config: Any, **kwargs: Any) -> torch.nn.Module:
    """``model_class`` (an Auto class or a model class) built from ``config``
    with its parameters on meta and its buffers computed on the host."""
    with _parameters_on_meta():
        if _is_auto_class(model_class):
            return model_class.from_config(config, **kwargs)
        return model_class._from_config(config, **kwargs)


def _is_transformers_model(model: torch.nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def rebuilt_buffers(model: torch.nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The non-persistent buffers ``names`` of a transformers ``model`` built
    on the meta device, computed on the host the way transformers builds
    them (by building the model's class from its config, parameters on
    meta).  Raises ValueError for a name that is not such a buffer."""
    owners = [(name, *name.rpartition(".")[::2]) for name in names]
    wrong = [name for name, parent, attr in owners
             if attr not in getattr(model.get_submodule(parent), "_non_persistent_buffers_set", ())]
    if wrong:
        one = len(wrong) == 1
        raise ValueError(f"{', '.join(wrong[:5])}{'' if len(wrong) <= 5 else f' (of {len(wrong)})'} "
                         f"{'is' if one else 'are'} on the meta device and the state does not hold "
                         f"{'it' if one else 'them'}: the state must give every parameter and persistent buffer")
    if not _is_transformers_model(model):
        raise ValueError(f"non-persistent buffers {', '.join(list(names)[:5])} are on the meta device: ibp "
                         "rebuilds those of transformers models only; build this model with its buffers on a "
                         "real device (only its parameters on meta)")
    built = dict(_build(type(model), copy.deepcopy(model.config)).named_buffers(remove_duplicate=False))
    out = {}
    for name in names:
        want, got = model.get_buffer(name), built.get(name)
        if got is None or got.shape != want.shape:
            raise ValueError(f"buffer {name} is {list(want.shape)}, but the model built from its config has "
                             f"{'none' if got is None else list(got.shape)}: give it in the state")
        out[name] = got.to(want.dtype)
    return out


# -- checkpoint names to the model's ------------------------------------------------
Renamer = Callable[[str], tuple[str, bool]]  # checkpoint name -> (model name, whether transformers converts it)


def _transformers_renamer(model: torch.nn.Module, expected: Mapping[str, Any]) -> Renamer | None:
    """transformers' own key renaming (version 5: legacy names, base-model
    prefix), or None where the installed version has none."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return None
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    prefix = model.base_model_prefix

    def rename(key: str) -> tuple[str, bool]:
        new, converted = rename_source_key(key, renamings, converters, prefix, expected)
        if new not in expected and key in expected:  # as transformers: the key was right, save for the prefix
            new, converted = rename_source_key(key, [], [], prefix, expected)
        return new, converted is not None

    return rename


def _prefix_renamer(model: torch.nn.Module, expected: Mapping[str, Any]) -> Renamer:
    """The base-model prefix added or stripped, as every transformers version does."""
    prefix = model.base_model_prefix

    def rename(key: str) -> tuple[str, bool]:
        if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in expected:
            return key[len(prefix) + 1:], False
        if prefix and f"{prefix}.{key}" in expected:
            return f"{prefix}.{key}", False
        return key, False

    return rename


def _cast(ct: CompressedTensor, dtype: torch.dtype) -> CompressedTensor:
    """``ct`` as the model's ``dtype`` (cast as transformers casts a weight on
    load, then compressed again), or ``ct`` itself when it already is."""
    if dtypes.torch_dtype(ct.dtype_name) == dtype or not dtype.is_floating_point:
        return ct
    return ibp.compress(decode_whole(ct, torch.device("cpu")).to(dtype))


def _ignored_unexpected(model: torch.nn.Module) -> list[re.Pattern]:
    """Patterns of checkpoint names transformers drops without a word: the
    model's own, and old buffers that are now non-persistent."""
    patterns = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    buffers = [name for name, _ in model.named_buffers()]
    if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
        patterns.append(re.compile(r"rotary_emb\.inv_freq"))
    if any(b.endswith("position_ids") for b in buffers):
        patterns.append(re.compile(r"(^|\.)position_ids$"))
    return patterns


def _model_state(model: torch.nn.Module, weights: Mapping[str, Any], path: str) -> dict[str, Any]:
    """``weights`` (checkpoint names) under the model's state-dict names;
    names the model does not use are dropped, as transformers drops them."""
    expected = model.state_dict()
    rename = _transformers_renamer(model, expected) or _prefix_renamer(model, expected)
    try:
        from transformers.core_model_loading import dot_natural_key as order
    except ImportError:
        order = None
    state, unused = {}, []
    for key in sorted(weights, key=order):  # transformers renames in this order (some renamings chain)
        new, converted = rename(key)
        if converted:
            raise ValueError(f"{path}: transformers converts {key!r} on load (it fuses or splits tensors); "
                             "ibp's from_pretrained takes checkpoints whose tensors the model holds as they are")
        if new in expected:
            if new in state:
                raise ValueError(f"{path}: {key!r} and another checkpoint tensor both load into {new!r}")
            state[new] = _cast(weights[key], expected[new].dtype)
        else:
            unused.append(key)
    patterns = _ignored_unexpected(model)
    unexpected = [k for k in unused if not any(p.search(k) for p in patterns)]
    if unexpected:
        warnings.warn(f"{path}: the model does not use {len(unexpected)} checkpoint tensors, ignored "
                      f"(as transformers ignores them): {', '.join(unexpected[:5])}", stacklevel=3)
    return state


# -- the directory's weights --------------------------------------------------------
def _weights(path: str) -> dict[str, CompressedTensor]:
    """name -> CompressedTensor of a compressed model directory (memory-mapped),
    or of a plain safetensors one (compressed here, one tensor at a time)."""
    if not os.path.isdir(path):
        raise ValueError(f"{path}: not a model directory")
    if checkpoints.is_compressed_dir(path):
        return checkpoints.load_dir(path, mmap=True)
    files = checkpoints.weight_files(path, checkpoints.ST_SUFFIX)
    if not files:
        raise ValueError(f"{path}: a directory without .ibp or .safetensors weights (write one with "
                         "`ibp compress MODEL_DIR OUT`)")
    from safetensors import safe_open
    weights = {}
    reuse = Reuse()   # layers share their tensors' models: see ibp.analysis.Reuse
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            for key in f.keys():
                if key in weights:
                    raise ValueError(f"{path}: tensor {key!r} is in two shards")
                weights[key] = compress_bytes(*dtypes.as_bytes(f.get_tensor(key)), learn=reuse.role(key))
    return weights


def _checkpoint_dtype(config: Any, weights: Mapping[str, CompressedTensor]) -> torch.dtype | None:
    """transformers' ``dtype="auto"``: the config's dtype, else the first
    floating-point weight's (in name order)."""
    dtype = getattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", None)
    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    for name in sorted(weights):
        dtype = dtypes.torch_dtype(weights[name].dtype_name)
        if dtype.is_floating_point:
            return dtype
    return None


# -- AutoModel.from_pretrained's own options -----------------------------------------
IGNORED_OPTIONS = ("low_cpu_mem_usage", "offload_state_dict", "_fast_init", "mirror", "from_tf", "from_flax",
                   "use_safetensors", "weights_only", "disable_mmap", "_from_auto", "_from_pipeline")
"""Options transformers ignores too, or that choose how to read safetensors files (ibp reads its own)."""
REFUSED_OPTIONS = ("quantization_config", "max_memory", "offload_folder", "offload_buffers", "tp_plan", "tp_size",
                   "device_mesh", "distributed_config", "gguf_file", "adapter_kwargs", "adapter_name", "key_mapping",
                   "state_dict", "output_loading_info", "ignore_mismatched_sizes", "variant", "use_kernels",
                   "kernel_config", "fusion_config", "transformers_weights")
"""Options that change which weights load or where they live: no compressed directory can honour them."""


def _device(device: Any, device_map: Any) -> torch.device:
    """The one device weights are decoded on: ``device``, or a ``device_map``
    that names one device (``"cuda"``, ``0``, ``{"": "cuda:1"}``)."""
    if device_map is None:
        return checked_device("cpu" if device is None else device)
    one = device_map[""] if isinstance(device_map, Mapping) and list(device_map) == [""] else device_map
    if isinstance(one, int) and not isinstance(one, bool):
        one = torch.device("cuda", one)
    if not isinstance(one, (str, torch.device)) or one in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise ValueError(f"device_map={device_map!r}: ibp keeps every weight compressed in host memory and "
                         "decodes each module's on one device as it runs, so it takes one device "
                         "(device='cuda', or device_map='cuda')")
    if device is not None and torch.device(device) != torch.device(one):
        raise ValueError(f"device={str(device)!r} and device_map={str(one)!r} name two devices: give one")
    return checked_device(one)


def _lacking(model: torch.nn.Module, state: Mapping[str, Any]) -> list[str]:
    """Names of the model's weights still on meta that no name of theirs in
    ``state`` gives (tied weights count once)."""
    names: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if t.device.type == "meta":
            names.setdefault(id(t), []).append(name)
    return [group[0] for group in names.values() if not any(n in state for n in group)]


def from_pretrained(path: str | os.PathLike, device: str | torch.device | None = None, *,
                    model_class: type | None = None, min_bytes: int = 1 << 20, **kwargs: Any) -> torch.nn.Module:
    """A transformers model from a compressed model directory (what
    ``ibp compress MODEL_DIR OUT`` writes), its weights kept compressed in
    host memory and decoded on ``device`` (default cpu) as each module runs
    (``offload``).

    The class comes from config.json as ``AutoModel`` chooses it, unless
    ``model_class`` (an Auto class such as ``AutoModelForCausalLM``, or a
    model class) is given.  ``kwargs`` go where ``AutoModel.from_pretrained``
    sends them: config attributes to the config (or ``config=`` itself),
    the rest (``dtype``, ``attn_implementation``, ...) to the model; ``dtype``
    is "auto" (the config's, else the checkpoint's) unless given, and
    weights of another dtype are cast and compressed again.  ``device_map``
    may name one device; loading options transformers ignores are ignored,
    and those no compressed directory can honour (``quantization_config``,
    ``max_memory``, ...) raise ValueError.  A plain safetensors directory
    also works: its weights are compressed as they load.  Outputs are
    bit-identical to ``AutoModel.from_pretrained`` of the original directory.
    """
    try:
        from transformers import AutoConfig, AutoModel, GenerationConfig, PretrainedConfig
    except ImportError:
        raise ImportError("from_pretrained needs transformers: pip install -e '.[llm]'") from None
    refused = sorted(k for k in kwargs if k in REFUSED_OPTIONS)
    if refused:
        raise ValueError(f"from_pretrained of a compressed directory cannot take {', '.join(refused)}: the "
                         "checkpoint's weights load as they are, kept compressed on the host")
    for key in IGNORED_OPTIONS:
        kwargs.pop(key, None)
    device = _device(device, kwargs.pop("device_map", None))
    path = os.path.join(os.fspath(path), kwargs.pop("subfolder", "") or "")
    weights = _weights(path)
    trust = {"trust_remote_code": kwargs.pop("trust_remote_code")} if "trust_remote_code" in kwargs else {}
    model_class = model_class or AutoModel
    dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", "auto"))
    generation_config = kwargs.pop("generation_config", None)
    config = kwargs.pop("config", None)
    if isinstance(config, PretrainedConfig):   # as transformers: the other kwargs go to the model
        config, model_kwargs = copy.deepcopy(config), kwargs
    else:
        config, model_kwargs = AutoConfig.from_pretrained(config or path, return_unused_kwargs=True, **trust, **kwargs)
    if dtype == "auto":
        dtype = _checkpoint_dtype(config, weights)
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be 'auto', a torch.dtype or its name, not {dtype!r}")
    model = _build(model_class, config, dtype=dtype, **(trust if _is_auto_class(model_class) else {}), **model_kwargs)
    state = _model_state(model, weights, path)
    lacking = _lacking(model, state)
    if lacking:
        raise ValueError(f"{path}: the checkpoint lacks {len(lacking)} weights {type(model).__name__} needs: "
                         f"{', '.join(lacking[:5])}{', ...' if len(lacking) > 5 else ''} (transformers would "
                         "initialise them at random, so no output could match): choose a model class whose "
                         "weights it holds")
    from .llm import offload  # llm re-exports this module's names
    offload(model, device, min_bytes=min_bytes, state=state)
    model.eval()
    if generation_config is not None:
        model.generation_config = generation_config
    elif model.can_generate() and os.path.isfile(os.path.join(path, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model
