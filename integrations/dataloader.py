"""Ship DataLoader batches compressed: encode in the workers, decode on the GPU.

A batch crosses two slow links on its way to the GPU: the worker-to-main
process queue and PCIe.  Compressing it in the worker shrinks both, and the
GPU decodes it straight from pinned host memory.  Three pieces:

* ``CompressingCollate`` wraps a collate function.  Its per-leaf models are
  learned once, in the main process, from a sample batch, and travel to the
  workers with it (a Model pickles), so workers only encode.
* ``CompressedBatch`` is what the workers return.  The DataLoader's pin
  thread calls its ``pin_memory()``, which pins the compressed payloads.
* ``DeviceLoader`` wraps the DataLoader.  It decodes each batch on a side
  CUDA stream while the previous one is in use, or on the CPU when there is
  no GPU; either way the batches it yields equal the uncompressed ones.

Usage::

    collate = CompressingCollate()             # floating tensors >= 16 KiB
    loader = DataLoader(ds, batch_size=256, num_workers=4, pin_memory=True,
                        collate_fn=collate)
    for batch in DeviceLoader(loader):         # learns the models first
        ...

ibp makes numba pick a fork-safe threading layer, so forked workers are
fine.  If you force GNU OpenMP (``NUMBA_THREADING_LAYER=omp``), which kills
processes forked after it ran, ``DeviceLoader`` asks for
``multiprocessing_context="forkserver"`` instead of letting the workers die.
"""
import collections.abc
import copy
import itertools
import multiprocessing

import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

import ibp

DEFAULT_MIN_BYTES = 16 * 1024
FIT_SAMPLES = 64  # samples to learn from when the loader's batch size is unknown


class CompressingCollate:
    """Collate samples, then compress the chosen tensors of the batch.

    collate_fn: the collate function to wrap (torch's default_collate).
    which:      which tensor leaves to compress.  None: floating-point
                tensors of at least ``min_bytes``; a callable
                ``(path, tensor) -> bool``; or a collection of names: a leaf
                is compressed when its whole path, or a key, field name or
                position on it, is in the collection.  The path of
                ``batch["x"][1]`` is ``("x", 1)``.
    sample:     a collated batch to learn the models from now; otherwise
                call ``fit`` (``DeviceLoader`` does it from the first batch).
    word_bits:  passed to ``ibp.analyze``.
    """

    def __init__(self, collate_fn=default_collate, *, which=None, min_bytes=DEFAULT_MIN_BYTES, sample=None,
                 word_bits=None):
        if not callable(collate_fn):
            raise TypeError("collate_fn must be callable")
        if which is not None and not callable(which):
            if isinstance(which, (str, bytes)) or not isinstance(which, collections.abc.Iterable):
                raise TypeError("which must be None, a callable (path, tensor) -> bool, "
                                "or a collection of key names")
            which = frozenset(which)
        self.collate_fn = collate_fn
        self.which = which
        self.min_bytes = int(min_bytes)
        self.word_bits = word_bits
        self.models = None
        if sample is not None:
            self.fit(sample)

    @property
    def fitted(self):
        return self.models is not None

    def chooses(self, path, leaf):
        """Whether the leaf at ``path`` gets compressed."""
        if not isinstance(leaf, torch.Tensor) or leaf.layout != torch.strided or leaf.device.type != "cpu" \
                or leaf.dim() == 0 or leaf.numel() == 0:
            return False
        if self.which is None:
            return leaf.is_floating_point() and leaf.numel() * leaf.element_size() >= self.min_bytes
        if callable(self.which):
            return bool(self.which(path, leaf))
        return path in self.which or any(p in self.which for p in path)

    def fit(self, batch):
        """Learn one model per chosen leaf of a collated batch, so that the
        workers never have to.  Returns self."""
        models = {}

        def learn(path, leaf):
            if self.chooses(path, leaf):
                models[path] = ibp.analyze(leaf, word_bits=self.word_bits)
            return leaf

        _map_leaves(batch, learn)
        self.models = models
        return self

    def __call__(self, samples):
        batch = self.collate_fn(samples)
        if not self.fitted:
            if get_worker_info() is not None:
                raise RuntimeError("CompressingCollate has no models in this worker: call fit(sample_batch) "
                                   "in the main process before iterating, or iterate through DeviceLoader")
            self.fit(batch)
        _limit_numba_threads_in_worker()
        return CompressedBatch(_map_leaves(batch, self._compress_leaf))

    def _compress_leaf(self, path, leaf):
        if not self.chooses(path, leaf):
            return leaf
        model = self.models.get(path)
        if model is not None:
            try:
                return _Packed(ibp.compress(leaf, model=model))
            except ValueError:
                pass  # the leaf's row shape changed since fit: learn this batch's own model
        return _Packed(ibp.compress(leaf, word_bits=self.word_bits))


class CompressedBatch:
    """A collated batch whose chosen tensors are CompressedTensors.

    ``decompress(device)`` gives back the batch itself; the DataLoader's
    pin thread calls ``pin_memory()``.
    """

    def __init__(self, tree):
        self.tree = tree

    def pin_memory(self):
        """This batch with compressed payloads and plain tensors in pinned
        memory (unchanged when there is no GPU to pin for)."""
        if not torch.cuda.is_available():
            return self
        return CompressedBatch(_map_leaves(self.tree, _pin_leaf))

    def decompress(self, device=None):
        """The original batch, decoded on ``device`` (None: the CPU).  Plain
        tensors are moved there without blocking."""
        device = torch.device("cpu" if device is None else device)
        return _map_leaves(self.tree, lambda path, leaf: _decode_leaf(leaf, device))

    @property
    def nbytes(self):
        """Bytes of the batch as shipped: compressed leaves plus plain tensors."""
        return sum(_leaf_sizes(self.tree, compressed=True))

    @property
    def raw_nbytes(self):
        """Bytes of the batch uncompressed."""
        return sum(_leaf_sizes(self.tree, compressed=False))

    def __repr__(self):
        packed = sum(isinstance(leaf, _Packed) for leaf in _leaves(self.tree))
        return f"CompressedBatch({packed} compressed tensors, {self.raw_nbytes} -> {self.nbytes} bytes)"


class DeviceLoader:
    """Iterate a DataLoader and yield its batches decoded on ``device``.

    With CUDA, batch i+1 is decoded on a side stream while batch i is in
    use, and the current stream waits for a batch only when it is handed
    out.  Without CUDA (or with ``device="cpu"``) batches are decoded on the
    CPU.  Batches that are not CompressedBatch are moved to the device as
    they are.  If the loader's collate is an unfitted CompressingCollate,
    its models are learned first from the dataset's first batch.
    """

    def __init__(self, loader, device=None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.loader = loader
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"DeviceLoader decodes on 'cpu' or 'cuda', not {self.device}")

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        collate = getattr(self.loader, "collate_fn", None)
        if isinstance(collate, CompressingCollate) and not collate.fitted:
            batch = _first_batch(self.loader, collate.collate_fn)
            if batch is not None:
                collate.fit(batch)
        _refuse_fatal_fork(self.loader)
        if self.device.type == "cuda":
            return self._iter_cuda()
        return (_to_device(batch, self.device) for batch in self.loader)

    def _iter_cuda(self):
        stream = torch.cuda.Stream(self.device)
        batches = iter(self.loader)
        ahead = self._launch(batches, stream)
        try:
            while ahead is not None:
                current = ahead  # holds the source batch: the GPU reads its pinned payload in place
                ahead = self._launch(batches, stream)
                out, done, _ = current
                consumer = torch.cuda.current_stream(self.device)
                consumer.wait_event(done)
                for t in _leaves(out):
                    if isinstance(t, torch.Tensor) and t.is_cuda:
                        t.record_stream(consumer)
                yield out
                done.synchronize()
        finally:
            stream.synchronize()  # no decode may outlive the sources it reads

    def _launch(self, batches, stream):
        """(decoded batch, event marking its decode, source batch), or None."""
        batch = next(batches, _END)
        if batch is _END:
            return None
        with torch.cuda.stream(stream):
            out = _to_device(batch, self.device)
            done = torch.cuda.Event()
            done.record(stream)
        return out, done, batch


_END = object()


class _Packed:
    """A compressed leaf: distinguishes ibp's work from the user's objects."""
    __slots__ = ("ct",)

    def __init__(self, ct):
        self.ct = ct


def _pin_leaf(path, leaf):
    if isinstance(leaf, _Packed):
        return _Packed(leaf.ct.pin_memory())
    if isinstance(leaf, torch.Tensor) and not leaf.is_cuda:
        return leaf.pin_memory()
    return leaf


def _decode_leaf(leaf, device):
    if isinstance(leaf, _Packed):
        return ibp.decompress(leaf.ct, device=None if device.type == "cpu" else device)
    if isinstance(leaf, torch.Tensor):
        return leaf.to(device, non_blocking=True)
    return leaf


def _to_device(batch, device):
    if isinstance(batch, CompressedBatch):
        return batch.decompress(device)
    return _map_leaves(batch, lambda path, leaf: _decode_leaf(leaf, device))


def _leaf_sizes(tree, compressed):
    for leaf in _leaves(tree):
        if isinstance(leaf, _Packed):
            yield leaf.ct.nbytes if compressed else leaf.ct.raw_nbytes
        elif isinstance(leaf, torch.Tensor):
            yield leaf.numel() * leaf.element_size()


def _leaves(tree):
    found = []
    _map_leaves(tree, lambda path, leaf: found.append(leaf))
    return found


def _map_leaves(tree, fn, path=()):
    """Rebuild a nested batch (mappings, namedtuples, tuples, lists) with
    ``fn(path, leaf)`` at every leaf, keeping container types as torch's
    collate and pin_memory do."""
    if isinstance(tree, collections.abc.Mapping):
        items = {k: _map_leaves(v, fn, path + (k,)) for k, v in tree.items()}
        try:
            if isinstance(tree, collections.abc.MutableMapping):
                clone = copy.copy(tree)
                clone.update(items)
                return clone
            return type(tree)(items)
        except TypeError:
            return items
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_map_leaves(v, fn, path + (f,)) for f, v in zip(tree._fields, tree)))
    if isinstance(tree, (tuple, list)):
        items = [_map_leaves(v, fn, path + (i,)) for i, v in enumerate(tree)]
        try:
            return type(tree)(items)
        except TypeError:
            return items
    return fn(path, tree)


def _first_batch(loader, collate_fn):
    """A first batch in dataset order (``dataset[0]``, ``dataset[1]``, ...),
    collated in this process; None if empty.  No sampler is touched: one
    may draw from torch's global generator, or be an iterator used once."""
    dataset = loader.dataset
    batched = loader.batch_sampler is not None
    count = (loader.batch_size or FIT_SAMPLES) if batched else 1
    if isinstance(dataset, IterableDataset):
        samples = list(itertools.islice(iter(dataset), count))
    else:
        if isinstance(dataset, collections.abc.Sized):
            count = min(count, len(dataset))
        try:
            samples = [dataset[i] for i in range(count)]
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"CompressingCollate learns its models from the dataset's first samples, dataset[0] "
                             f"on, and this dataset has no such keys ({type(e).__name__}: {e}): call "
                             "collate.fit(batch) with a batch like the loader's before iterating") from None
    if not samples:
        return None
    return collate_fn(samples if batched else samples[0])


def _refuse_fatal_fork(loader):
    """Raise instead of letting forked workers die: numba's GNU OpenMP layer
    kills any child forked after it ran a parallel region."""
    if getattr(loader, "num_workers", 0) == 0:
        return
    context = getattr(loader, "multiprocessing_context", None)
    method = context.get_start_method() if context is not None else multiprocessing.get_start_method()
    if method != "fork":
        return
    import numba
    try:
        layer = numba.threading_layer()
    except ValueError:
        return  # no parallel region has run in this process yet
    if layer != "omp":
        return
    from numba.np.ufunc import omppool
    if omppool.openmp_vendor == "GNU":
        raise RuntimeError(
            "DataLoader workers started with fork() would be killed: numba's GNU OpenMP threading layer, "
            "which ibp ran in this process, is not fork-safe.  Pass multiprocessing_context='forkserver' "
            "(or 'spawn') to the DataLoader, or set NUMBA_THREADING_LAYER=workqueue (or install tbb) "
            "before importing ibp.")


def _limit_numba_threads_in_worker():
    """Workers run side by side: give numba the single thread torch's
    DataLoader gives each worker, instead of every core each."""
    if get_worker_info() is None:
        return
    import numba
    wanted = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)
