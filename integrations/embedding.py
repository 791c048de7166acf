"""Embedding tables that live compressed in host memory: drop-in
replacements for ``torch.nn.Embedding`` and ``torch.nn.EmbeddingBag``.

A lookup gathers only the rows it needs, decoded in one fused pass
(``ibp.decompress(table, index=unique_ids, device=...)``: on the GPU the
rows are read compressed straight from pinned host memory), then hands the
small gathered table to torch's own ``F.embedding`` / ``F.embedding_bag``
with the indices renumbered.  The arithmetic is torch's, in torch's order,
so results are bit-identical to the uncompressed modules.

The table uses the slotted layout, so rows can be rewritten in place
(``update_rows``, and ``max_norm`` renormalisation).  ``torch.save`` of a
module stores the table compressed (packed), ``state_dict()`` the decoded
weight under torch's ``"weight"`` key.  It is frozen: the
modules have no parameters and produce no gradients.  Outputs are computed
on the device of the indices; ``.to()`` moves nothing, since the table
stays in host memory (pinned when CUDA is available).
"""
import torch
import torch.nn.functional as F
from torch import nn

import ibp

MODES = ("sum", "mean", "max")


class _CompressedTable(nn.Module):
    """The compressed weight and the row gather shared by both modules."""

    def __init__(self, num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                 sparse, weight, dtype, word_bits, init):
        super().__init__()
        num_embeddings, embedding_dim = int(num_embeddings), int(embedding_dim)
        if num_embeddings < 0 or embedding_dim < 0:
            raise ValueError("num_embeddings and embedding_dim must be >= 0")
        if padding_idx is not None:
            padding_idx = int(padding_idx)
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx {padding_idx} must be within num_embeddings ({num_embeddings})")
            padding_idx %= num_embeddings
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_norm must be positive, got {max_norm}")
        if weight is None:
            weight = torch.empty(num_embeddings, embedding_dim, dtype=dtype)
            init(weight, padding_idx)
        else:
            if not isinstance(weight, torch.Tensor):
                raise TypeError(f"the weight must be a torch.Tensor, not {type(weight).__name__}")
            if tuple(weight.shape) != (num_embeddings, embedding_dim):
                raise ValueError(f"weight has shape {list(weight.shape)}, expected "
                                 f"{[num_embeddings, embedding_dim]}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.scale_grad_by_freq = scale_grad_by_freq
        self.sparse = sparse
        self.word_bits = word_bits
        self._last_gpu_read = None
        self._store(weight)

    # -- the table ----------------------------------------------------------
    def _store(self, weight, model=None):
        self._wait_for_gpu_reads()
        table = ibp.compress(weight.detach().cpu(), layout="slotted", word_bits=self.word_bits, unit_rows=1,
                             model=model)
        self._table = table.pin_memory() if torch.cuda.is_available() else table

    @property
    def table(self):
        """The CompressedTensor holding the weight (slotted layout)."""
        return self._table

    @property
    def dtype(self):
        return self._table.dtype

    def decompress(self):
        """The whole weight, decoded: a new CPU tensor (writing to it does
        not change the table; use ``update_rows``)."""
        return ibp.decompress(self._table)

    def update_rows(self, indices, values):
        """Overwrite the rows ``indices`` with ``values`` (cast to the table's
        dtype, as ``weight[indices] = values`` would); later lookups see them."""
        rows = torch.as_tensor(indices).cpu().reshape(-1)
        if rows.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"indices must be int32 or int64, not {rows.dtype}")
        self._check_range(rows)
        values = torch.as_tensor(values).detach().to("cpu", self._table.dtype)
        values = values.broadcast_to((rows.numel(), self.embedding_dim))
        self._wait_for_gpu_reads()
        self._table.update_rows(rows, values)

    def _wait_for_gpu_reads(self):
        """GPU lookups read the pinned table in place: let them finish
        before its bytes change or go."""
        if getattr(self, "_last_gpu_read", None) is not None:
            self._last_gpu_read.synchronize()

    def _check_range(self, ids):
        if ids.numel():
            lo, hi = torch.aminmax(ids)
            if lo < 0 or hi >= self.num_embeddings:
                bad = lo if lo < 0 else hi
                raise IndexError(f"index {int(bad)} is out of range for {self.num_embeddings} embeddings")

    # -- lookup -------------------------------------------------------------
    def _gather(self, input):
        """(rows ``input`` uses, ``input`` renumbered into them, where the
        padding row is among them).  The padding row is always gathered, so
        torch sees a padding index exactly when the uncompressed module does."""
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, not {type(input).__name__}")
        if input.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input must hold int32 or int64 indices, not {input.dtype}")
        ids = input.reshape(-1)
        self._check_range(ids)
        if self.padding_idx is not None:
            ids = torch.cat([ids, torch.tensor([self.padding_idx], dtype=ids.dtype, device=ids.device)])
        unique, local = torch.unique(ids, sorted=True, return_inverse=True)
        padding = None
        if self.padding_idx is not None:
            padding = int(local[-1])
            local = local[:-1]
        rows = self._decode(unique, input.device)
        return rows, local.reshape(input.shape).to(input.dtype), unique, padding

    def _decode(self, unique, device):
        if device.type == "cpu":
            return ibp.decompress(self._table, index=unique)
        if device.type != "cuda":
            raise ValueError(f"lookups run on the CPU or a CUDA device, not {device}")
        rows = ibp.decompress(self._table, index=unique, device=device)
        self._last_gpu_read = torch.cuda.Event()
        self._last_gpu_read.record(torch.cuda.current_stream(device))
        return rows

    def _write_back(self, rows, unique):
        """After torch renormalised the gathered rows (max_norm), store them."""
        if self.max_norm is not None and unique.numel():
            self.update_rows(unique.cpu(), rows.cpu())

    # -- checkpoints: the same "weight" entry as torch's modules ------------
    # state_dict() holds the decoded weight, so it loads into (and from) the
    # torch modules; torch.save(module) keeps the table compressed instead.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.decompress()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if strict:  # as torch's modules: any other entry under this module's prefix is unexpected
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k != key)
        if key not in state_dict:
            missing_keys.append(key)
            return
        weight = state_dict[key]
        if tuple(weight.shape) != (self.num_embeddings, self.embedding_dim):
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)}, "
                              f"the shape in current model is {(self.num_embeddings, self.embedding_dim)}.")
            return
        self._store(weight.detach().to("cpu", self._table.dtype))

    # -- torch.save / pickle of the module: the table, compressed ------------
    def __getstate__(self):
        """The table as one packed ibp file in a uint8 tensor: about its
        compressed size on disk.  Not the slotted table itself, whose slots
        are raw-sized, nor numpy arrays, whose bytes torch.save's pickle
        protocol (2) spells as latin-1 text, half again as long.  The module
        keeps that tensor until it is pickled again: sent to a spawned
        process (a DataLoader worker with multiprocessing_context="spawn"),
        a tensor goes by the file descriptor of its shared memory, which the
        child inherits only when it starts, after the pickling; dropped at
        once, it had its descriptor closed by then, and the worker died
        ("unable to resize file")."""
        state = super().__getstate__()
        state.pop("_pickled", None)
        packed = ibp.compress(self.decompress(), model=self._table.model)
        state["_table"] = self.__dict__["_pickled"] = torch.frombuffer(bytearray(packed.to_bytes()),
                                                                       dtype=torch.uint8)
        state["_last_gpu_read"] = None
        return state

    def __setstate__(self, state):
        state = dict(state)
        blob = state.pop("_table")
        super().__setstate__(state)
        packed = ibp.CompressedTensor.from_bytes(memoryview(blob.numpy()))
        self._store(ibp.decompress(packed), model=packed.model)   # the same model: the same slots

    def _common_repr(self):
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        for name, default in (("padding_idx", None), ("max_norm", None), ("norm_type", 2.0),
                              ("scale_grad_by_freq", False), ("sparse", False)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s + f", dtype={self._table.dtype_name}"


def _normal_init(weight, padding_idx):
    """torch's default: N(0, 1) with the padding row zeroed."""
    nn.init.normal_(weight)
    if padding_idx is not None:
        weight[padding_idx].zero_()


def _refuse_trainable(freeze):
    if not freeze:
        raise ValueError("a compressed embedding table is frozen (no gradients): use freeze=True, "
                         "and update_rows to change rows")


class CompressedEmbedding(_CompressedTable):
    """``torch.nn.Embedding`` with the weight compressed in host memory.

    Same arguments and results as torch's module.  ``_freeze`` and
    ``device`` are accepted for compatibility: the table is always frozen and
    lives in host memory.  ``word_bits`` is passed to ``ibp.compress``.
    """

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, max_norm=None, norm_type=2.0,
                 scale_grad_by_freq=False, sparse=False, _weight=None, _freeze=False, device=None, dtype=None,
                 *, word_bits=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                         sparse, _weight, dtype, word_bits, _normal_init)

    def forward(self, input):
        rows, local, unique, padding = self._gather(input)
        out = F.embedding(local, rows, padding, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                          self.sparse)
        self._write_back(rows, unique)
        return out

    @classmethod
    def from_pretrained(cls, embeddings, freeze=True, padding_idx=None, max_norm=None, norm_type=2.0,
                        scale_grad_by_freq=False, sparse=False, *, word_bits=None):
        """Compress a 2-D weight, as ``nn.Embedding.from_pretrained``."""
        _refuse_trainable(freeze)
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            raise ValueError("embeddings must be a 2-D torch.Tensor")
        return cls(*embeddings.shape, padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type,
                   scale_grad_by_freq=scale_grad_by_freq, sparse=sparse, _weight=embeddings, word_bits=word_bits)

    @classmethod
    def from_module(cls, module, *, freeze=True, word_bits=None):
        """Compress an ``nn.Embedding``'s weight and copy its settings."""
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"from_module takes an nn.Embedding, not {type(module).__name__}")
        return cls.from_pretrained(module.weight, freeze, module.padding_idx, module.max_norm, module.norm_type,
                                   module.scale_grad_by_freq, module.sparse, word_bits=word_bits)

    def extra_repr(self):
        return self._common_repr()


class CompressedEmbeddingBag(_CompressedTable):
    """``torch.nn.EmbeddingBag`` with the weight compressed in host memory.

    Same arguments and results as torch's module (modes sum, mean and max,
    offsets, include_last_offset, per_sample_weights, padding_idx).
    ``device`` is accepted for compatibility (the table lives in host
    memory); ``word_bits`` is passed to ``ibp.compress``.
    """

    def __init__(self, num_embeddings, embedding_dim, max_norm=None, norm_type=2.0, scale_grad_by_freq=False,
                 mode="mean", sparse=False, _weight=None, include_last_offset=False, padding_idx=None,
                 device=None, dtype=None, *, word_bits=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                         sparse, _weight, dtype, word_bits, _normal_init)
        self.mode = mode
        self.include_last_offset = include_last_offset

    def forward(self, input, offsets=None, per_sample_weights=None):
        rows, local, unique, padding = self._gather(input)
        out = F.embedding_bag(local, rows, offsets, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                              self.mode, self.sparse, per_sample_weights, self.include_last_offset, padding)
        self._write_back(rows, unique)
        return out

    @classmethod
    def from_pretrained(cls, embeddings, freeze=True, max_norm=None, norm_type=2.0, scale_grad_by_freq=False,
                        mode="mean", sparse=False, include_last_offset=False, padding_idx=None, *,
                        word_bits=None):
        """Compress a 2-D weight, as ``nn.EmbeddingBag.from_pretrained``."""
        _refuse_trainable(freeze)
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            raise ValueError("embeddings must be a 2-D torch.Tensor")
        return cls(*embeddings.shape, max_norm=max_norm, norm_type=norm_type,
                   scale_grad_by_freq=scale_grad_by_freq, mode=mode, sparse=sparse, _weight=embeddings,
                   include_last_offset=include_last_offset, padding_idx=padding_idx, word_bits=word_bits)

    @classmethod
    def from_module(cls, module, *, freeze=True, word_bits=None):
        """Compress an ``nn.EmbeddingBag``'s weight and copy its settings."""
        if not isinstance(module, nn.EmbeddingBag):
            raise TypeError(f"from_module takes an nn.EmbeddingBag, not {type(module).__name__}")
        return cls.from_pretrained(module.weight, freeze, module.max_norm, module.norm_type,
                                   module.scale_grad_by_freq, module.mode, module.sparse,
                                   module.include_last_offset, module.padding_idx, word_bits=word_bits)

    def extra_repr(self):
        return self._common_repr() + f", mode={self.mode!r}" + (
            ", include_last_offset=True" if self.include_last_offset else "")
