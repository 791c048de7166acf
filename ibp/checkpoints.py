"""Safetensors checkpoints and Hugging Face model directories, converted to
ibp and back one tensor at a time.

A model is bigger than the memory people have to spare, so nothing here
holds a checkpoint: a tensor is read (a few MB of a safetensors file at a
time, or one ibp tensor's sections), converted and written out before the
next one is read, so memory holds a few tensors at a time.

A compressed model directory keeps every file of the original except the
weights: each ``X.safetensors`` becomes ``X.ibp`` (one ibp file per shard),
and a shard index ``X.safetensors.index.json`` becomes ``X.ibp.index.json``
(the same ``weight_map`` pointing at the .ibp shards, plus the original
index text so ``decompress_dir`` writes it back byte for byte).  Each .ibp
file records the safetensors header it came from under ``ibp.source``, so a
round trip gives back the very same safetensors files.
"""
import json
import os
import shutil
import struct

import numba
import numpy as np

from . import _bits, container, dtypes
from .analysis import Reuse
from .api import compress_bytes
from .container import MAGIC
from .decode import decode_span, spans
from .errors import FormatError
from .stream import Reader, Writer, scratch

SOURCE_KEY = "ibp.source"
DECODE_CHUNK_BYTES = 4 << 20   # see _decode_chunk_bytes
ST_SUFFIX, ST_INDEX_SUFFIX = ".safetensors", ".safetensors.index.json"
IBP_SUFFIX, IBP_INDEX_SUFFIX = ".ibp", ".ibp.index.json"
ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
             "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "uint64": "U64",
             "uint32": "U32", "uint16": "U16", "complex64": "C64", "float8_e4m3fn": "F8_E4M3",
             "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2": "F8_E5M2", "float8_e5m2fnuz": "F8_E5M2FNUZ",
             "float8_e8m0fnu": "F8_E8M0"}


class CheckpointError(ValueError):
    """A checkpoint or model directory that cannot be converted, and why."""


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


# -- safetensors files ---------------------------------------------------------

def safetensors_header(path):
    """(header text, parsed header) of a safetensors file, reading only them."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if head == MAGIC:
            raise CheckpointError(f"{path}: an ibp file, not a safetensors file (rename it X.ibp)")
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file "
                                  f"({'an empty file' if not size else f'{size} bytes, too short'})")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated, or not a safetensors file "
                                  f"(it announces a {n}-byte header in {size} bytes)")
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=container.unique_keys)
    except FormatError as e:   # a key given twice: json keeps the last, safetensors refuses the file
        raise CheckpointError(f"{path}: not a valid safetensors file: its {e}") from None
    except ValueError:  # UnicodeDecodeError included
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a UTF-8 JSON object)")
    return text, header


def _check_tiling(path, specs, data_bytes):
    """safetensors' own rule: the tensors' bytes follow one another from the
    start of the data to the end of the file, with no gap, overlap or
    trailing byte; only then is what ``decompress`` writes back the very
    file that came in."""
    end = 0
    for name, (_, _, (start, stop), _) in sorted(specs.items(), key=lambda kv: kv[1][2]):
        if start != end:
            raise CheckpointError(f"{path}: not a valid safetensors file: tensor {name!r} starts at byte {start} "
                                  f"of the data, where the one before it ends at {end} (a gap or an overlap)")
        end = stop
    if end != data_bytes:
        raise CheckpointError(f"{path}: not a valid safetensors file: {data_bytes - end} bytes after its last tensor")


def _tensor_entries(header):
    """Tensor names of a parsed safetensors header, in the order of their data."""
    names = [k for k in header if k != "__metadata__"]
    try:
        return sorted(names, key=lambda k: header[k]["data_offsets"][0])
    except (TypeError, KeyError, IndexError):
        raise CheckpointError("a safetensors header entry has no data_offsets") from None


ST_NAMES = {code: name for name, code in ST_DTYPES.items()}


def _spec(path, data_start, size, name, entry):
    """(dtype name, shape, data_offsets, bytes) of a tensor of a safetensors
    header, checked against the file's ``size``."""
    code, shape, offsets = (entry.get(k) for k in ("dtype", "shape", "data_offsets")) \
        if isinstance(entry, dict) else (None, None, None)
    if code not in ST_NAMES:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {code!r}, which ibp does not read")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed shape {shape!r}")
    nbytes = dtypes.ITEMSIZE[ST_NAMES[code]]
    for s in shape:
        nbytes *= s
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] and offsets[1] - offsets[0] == nbytes):
        raise CheckpointError(f"{path}: tensor {name!r}: data_offsets {offsets!r} do not hold "
                              f"its {nbytes} bytes")
    if data_start + offsets[1] > size:
        raise CheckpointError(f"{path}: truncated: tensor {name!r} runs past the end of the file")
    return ST_NAMES[code], tuple(shape), offsets, nbytes


READ_AHEAD_BYTES = 4 << 20   # data read at once: one read covers many small tensors


def _tensor_bytes(f, path, data_start, names, specs):
    """(name, its bytes) for each tensor of a safetensors file, in data
    order: a read-only view of one buffer that the next tensors reuse,
    filled with plain file reads of READ_AHEAD_BYTES or one tensor,
    whichever is more.  A read per small tensor cost more than encoding it;
    fresh memory for each costs more to touch than to encode; and a memory
    map (safetensors' ``safe_open``) would leave every page read so far
    resident in this process, so memory would grow to the whole checkpoint."""
    data_bytes = max((specs[n][2][1] for n in names), default=0)   # the tensors tile the data (_check_tiling)
    buf = np.zeros(0, np.uint8)
    lo = hi = 0   # the data offsets buf holds
    for name in names:
        start, stop = specs[name][2]
        if not lo <= start <= stop <= hi:
            lo, hi = start, max(stop, min(start + READ_AHEAD_BYTES, data_bytes))
            if hi - lo > buf.size:  # the file holds them: no header can make this allocate more than the file
                buf = np.frombuffer(scratch(hi - lo), np.uint8)
            f.seek(data_start + lo)
            if _read_into(f, memoryview(buf[:hi - lo])) != hi - lo:
                raise CheckpointError(f"{path}: truncated: tensor {name!r} runs past the end of the file")
        yield name, _bits.frozen(buf[start - lo:stop - lo])


def _read_into(f, view):
    """Fill ``view`` from the raw file ``f``; returns the bytes read (fewer
    only where the file ends).  One read returns at most about 2 GiB on
    Linux, less than one embedding table of a big model."""
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            break
        done += n
    return done


def compress_safetensors(path, stream, *, scratch_dir=None, progress=None, **options):
    """Compress a safetensors file into an ibp file written to ``stream``,
    tensor by tensor; ``options`` go to ``ibp.compress``.  Returns (number of
    tensors, raw bytes).  The sections go where they belong at once when
    ``stream`` is seekable and the tensors are big enough that the room
    left for the header wastes little (Writer); else they pass through a
    scratch file in ``scratch_dir``."""
    text, header = safetensors_header(path)
    names = _tensor_entries(header)
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: its __metadata__ must map strings to strings")
    framework = "torch" if _torch() is not None else "numpy"
    data_start = 8 + len(text.encode())
    size = os.path.getsize(path)
    specs = {name: _spec(path, data_start, size, name, header[name]) for name in names}
    _check_tiling(path, specs, size - data_start)
    source = {SOURCE_KEY: json.dumps({"format": "safetensors", "metadata": metadata, "header": text})}
    raw = sum(s[3] for s in specs.values())
    # each tensor's sections take less than 64 bits a byte, and 8 KiB more
    room = container.header_bound([(n, s[0], s[1], framework) for n, s in specs.items()], source,
                                  8 * (64 * raw + 8192 * len(names) + 2 * len(source[SOURCE_KEY])))
    if _seekable(stream) and room * 64 <= raw and room <= container.MAX_HEADER:
        # what the room wastes is small, and the padded header stays one readers take
        writer = Writer(out=stream, header_room=room)
    else:
        writer = Writer(scratch_dir)
    reuse = Reuse()   # a network's layers repeat the same tensors: see Reuse
    with open(path, "rb", buffering=0) as f, writer:
        for name, data in _tensor_bytes(f, path, data_start, names, specs):
            dtype, shape = specs[name][:2]
            try:
                writer.add(name, compress_bytes(data, dtype, shape, framework, learn=reuse.role(name), **options))
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{path}: tensor {name!r}: {e}") from None
            if progress is not None:
                progress(specs[name][3])
        writer.finish(stream, source)
    return len(names), raw


def _seekable(stream):
    """Whether the sections can be written in place: a stream that seeks
    and is not in append mode (which writes at the end wherever it seeks)."""
    return getattr(stream, "seekable", lambda: False)() and "a" not in str(getattr(stream, "mode", ""))


def source_of(reader):
    """The ``ibp.source`` record of an open ibp file, or {}."""
    try:
        source = json.loads(reader.metadata.get(SOURCE_KEY, "{}"))
    except ValueError:
        source = None
    if not isinstance(source, dict):
        raise FormatError(f"its {SOURCE_KEY} metadata is not a JSON object")
    metadata = source.get("metadata") if source.get("format") == "safetensors" else None
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise FormatError(f"its {SOURCE_KEY} metadata records safetensors metadata that is not strings by name")
    return source


def _recorded_header(source, specs):
    """The recorded safetensors header text, if it describes exactly these
    tensors with back-to-back data; else None (a new header is written)."""
    text = source.get("header")
    if source.get("format") != "safetensors" or not isinstance(text, str):
        return None
    try:
        header = json.loads(text)
        names = _tensor_entries(header)
    except (ValueError, CheckpointError):
        return None
    if set(names) != set(specs):
        return None
    end = 0
    for name in names:
        entry, (code, shape, nbytes) = header[name], specs[name]
        if not isinstance(entry, dict) or entry.get("dtype") != code or entry.get("shape") != shape \
                or entry.get("data_offsets") != [end, end + nbytes]:
            return None
        end += nbytes
    return text, names


def _new_header(specs, metadata):
    header, end = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, (code, shape, nbytes) in specs.items():
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [end, end + nbytes]}
        end += nbytes
    text = json.dumps(header, separators=(",", ":"))
    return text + " " * (-len(text.encode()) % 8), list(specs)


def decompress_to_safetensors(reader, stream, *, progress=None):
    """Write the tensors of an open ibp file (a ``stream.Reader``) to
    ``stream`` as a safetensors file, decoding one tensor at a time.  The
    safetensors header the tensors came from is written back when it still
    describes them, so the original file comes back byte for byte."""
    if None in reader.entries:
        raise CheckpointError("a .safetensors file holds named tensors and this ibp file holds one unnamed "
                              "tensor: write .npy or .pt")
    specs = {}
    for name, entry in reader.entries.items():
        dtype, shape = entry.get("dtype"), entry.get("shape")
        if dtype not in ST_DTYPES:
            raise CheckpointError(f"tensor {name!r} is {dtype}, which safetensors cannot hold: write .pt or .npz")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise FormatError(f"tensor {name!r} has a malformed shape {shape!r}")
        n = dtypes.ITEMSIZE[dtype]
        for s in shape:
            n *= s
        specs[name] = (ST_DTYPES[dtype], shape, n)
    source = source_of(reader)
    metadata = source.get("metadata") if source.get("format") == "safetensors" else None
    text, order = _recorded_header(source, specs) or _new_header(specs, metadata)
    data = text.encode()
    stream.write(struct.pack("<Q", len(data)))
    stream.write(data)
    # One buffer for every piece (fresh memory costs more to touch than to
    # decode into), holding several small tensors before they are written
    # (a write each cost more than decoding them).  A piece starts at a
    # multiple of 8 bytes, or the buffer is written first: the decoder
    # takes its words aligned.
    buf, fill = np.zeros(0, np.uint8), 0
    for name, ct in reader.tensors(order):
        for first, last, nbytes in spans(ct, _decode_chunk_bytes()):
            if fill and (fill % 8 or fill + nbytes > buf.size):
                container.write_all(stream, buf[:fill])
                fill = 0
            if nbytes > buf.size:
                buf = np.frombuffer(scratch(max(nbytes, _decode_chunk_bytes())), np.uint8)
            decode_span(ct, first, last, buf[fill:fill + nbytes])
            fill += nbytes
            if progress is not None:
                progress(nbytes)
    container.write_all(stream, buf[:fill])


def _decode_chunk_bytes():
    """Bytes of a tensor decoded at a time to be written out: a few MB, so
    converting a model holds no buffer the size of its largest tensor (an
    embedding table can take gigabytes); with several threads enough
    words that the decoder runs them in parallel."""
    if numba.get_num_threads() == 1:
        return DECODE_CHUNK_BYTES
    return max(DECODE_CHUNK_BYTES, 16 * _bits.PARALLEL_MIN_WORDS)


def raw_nbytes_of(reader):
    """Bytes of the tensors of an open ibp file, from its header."""
    total = 0
    for entry in reader.entries.values():
        n = dtypes.ITEMSIZE.get(entry.get("dtype"), 0) if isinstance(entry, dict) else 0
        for s in (entry.get("shape") if n else None) or []:
            n *= s if type(s) is int else 0
        total += n
    return total


def raw_nbytes(path):
    """Bytes of the tensors a safetensors or ibp file (or a directory of
    them) holds, from the headers alone: the size of a progress bar."""
    if os.path.isdir(path):
        return sum(raw_nbytes(os.path.join(path, n)) for n in sorted(os.listdir(path))
                   if n.endswith((ST_SUFFIX, IBP_SUFFIX)) and os.path.isfile(os.path.join(path, n)))
    if path.endswith(IBP_SUFFIX):
        with Reader(path) as r:
            return raw_nbytes_of(r)
    _, header = safetensors_header(path)
    return sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items()
               if k != "__metadata__" and isinstance(e, dict) and isinstance(e.get("data_offsets"), list))


# -- model directories ---------------------------------------------------------

def _shard_map(index_path, old, new):
    """The shard index at ``index_path``, its weight_map's files renamed from
    suffix ``old`` to ``new``."""
    try:
        with open(index_path, encoding="utf-8") as f:
            text = f.read()
        index = json.loads(text)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v.endswith(old)
                                                       for v in weight_map.values()):
            raise ValueError(f"its weight_map must map names to {old} files")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a shard index ({e})") from None
    index["weight_map"] = {k: v[:-len(old)] + new for k, v in weight_map.items()}
    return text, index


def _check_shards(src, index_name, old):
    _, index = _shard_map(os.path.join(src, index_name), old, old)
    missing = sorted({f for f in index["weight_map"].values() if not os.path.isfile(os.path.join(src, f))})
    if missing:
        raise CheckpointError(f"{os.path.join(src, index_name)} names shards that are not there: "
                              f"{', '.join(missing[:3])}")


def _copy(src, dst):
    (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, dst)


def _entries(src):
    return sorted(os.listdir(src))


def compress_dir(src, dst, *, progress=None, **options):
    """Write the compressed twin of model directory ``src`` into the (empty,
    existing) directory ``dst``.  Returns (files, tensors, raw bytes)."""
    names = _entries(src)
    if any(n.endswith(IBP_SUFFIX) or n.endswith(IBP_INDEX_SUFFIX) for n in names):
        raise CheckpointError(f"{src}: already compressed (it holds .ibp weights): decompress it instead")
    weights = [n for n in names if n.endswith(ST_SUFFIX) and os.path.isfile(os.path.join(src, n))]
    if not weights:
        raise CheckpointError(f"{src}: a directory without .safetensors weights; ibp compresses model "
                              "directories with safetensors weights (one file, or shards with their index)")
    files = tensors = raw = 0
    for name in names:
        path = os.path.join(src, name)
        if name in weights:
            with open(os.path.join(dst, twin_name(name)), "wb") as out:
                n, r = compress_safetensors(path, out, scratch_dir=dst, progress=progress, **options)
            files, tensors, raw = files + 1, tensors + n, raw + r
        elif name.endswith(ST_INDEX_SUFFIX):
            _check_shards(src, name, ST_SUFFIX)
            text, index = _shard_map(path, ST_SUFFIX, IBP_SUFFIX)
            index[SOURCE_KEY] = text
            with open(os.path.join(dst, twin_name(name)), "w",
                      encoding="utf-8") as f:
                json.dump(index, f, indent=2)
        else:
            _copy(path, os.path.join(dst, name))
    return files, tensors, raw


def twin_name(name):
    """The name in a compressed model directory of an original's entry."""
    if name.endswith(ST_INDEX_SUFFIX):
        return name[:-len(ST_INDEX_SUFFIX)] + IBP_INDEX_SUFFIX
    return name[:-len(ST_SUFFIX)] + IBP_SUFFIX if name.endswith(ST_SUFFIX) else name


def original_name(name):
    """The name in the decompressed model directory of a compressed one's entry."""
    if name.endswith(IBP_INDEX_SUFFIX):
        return name[:-len(IBP_INDEX_SUFFIX)] + ST_INDEX_SUFFIX
    return name[:-len(IBP_SUFFIX)] + ST_SUFFIX if name.endswith(IBP_SUFFIX) else name


def is_compressed_dir(path):
    return os.path.isdir(path) and any(n.endswith(IBP_SUFFIX) for n in os.listdir(path))


def decompress_dir(src, dst, *, progress=None):
    """Write model directory ``src`` (made by ``compress_dir``) back with
    safetensors weights into the (empty, existing) directory ``dst``.
    Returns (files, tensors, raw bytes)."""
    names = _entries(src)
    if not any(n.endswith(IBP_SUFFIX) for n in names):
        raise CheckpointError(f"{src}: not a compressed model directory (no .ibp weights in it)")
    files = tensors = 0
    for name in names:
        path = os.path.join(src, name)
        if name.endswith(IBP_SUFFIX) and os.path.isfile(path):
            try:
                with Reader(path) as r, open(os.path.join(dst, original_name(name)), "wb") as out:
                    decompress_to_safetensors(r, out, progress=progress)
                    files, tensors = files + 1, tensors + len(r.entries)
            except FormatError as e:
                raise CheckpointError(f"{path}: not a valid ibp file: {e}") from None
            except CheckpointError as e:  # what safetensors cannot hold
                raise CheckpointError(f"{path}: {e}") from None
        elif name.endswith(IBP_INDEX_SUFFIX):
            _check_shards(src, name, IBP_SUFFIX)
            text, index = _shard_map(path, IBP_SUFFIX, ST_SUFFIX)
            original = index.pop(SOURCE_KEY, None)
            with open(os.path.join(dst, original_name(name)), "w",
                      encoding="utf-8") as f:
                f.write(original if isinstance(original, str) else json.dumps(index, indent=2))
        else:
            _copy(path, os.path.join(dst, name))
    return files, tensors, raw_nbytes(dst)


def weight_files(path, suffix=IBP_SUFFIX):
    """The weight files transformers reads from a model directory, in the
    order it reads them: ``model{suffix}``, else the shards that
    ``model{suffix}.index.json`` names; else (no such names) every
    ``*{suffix}`` file.  Other weight files beside them (Mistral's
    consolidated.safetensors) are not the model's."""
    index_suffix = IBP_INDEX_SUFFIX if suffix == IBP_SUFFIX else ST_INDEX_SUFFIX
    if os.path.isfile(os.path.join(path, "model" + suffix)):
        return ["model" + suffix]
    index = "model" + index_suffix
    if os.path.isfile(os.path.join(path, index)):
        _check_shards(path, index, suffix)
        return sorted(set(_shard_map(os.path.join(path, index), suffix, suffix)[1]["weight_map"].values()))
    return [n for n in _entries(path) if n.endswith(suffix) and os.path.isfile(os.path.join(path, n))]


def load_dir(path, *, mmap=True):
    """name -> CompressedTensor of every weight of a compressed model
    directory (the files ``weight_files`` names): what ``offload(model,
    device, state=...)`` takes."""
    from .api import load
    if not is_compressed_dir(path):
        raise CheckpointError(f"{path}: not a compressed model directory (no .ibp weights in it)")
    state = {}
    for name in weight_files(path):
        try:
            tensors = load(os.path.join(path, name), mmap=mmap)
        except FormatError as e:
            raise CheckpointError(f"{os.path.join(path, name)}: {e}") from None
        if not isinstance(tensors, dict):
            raise CheckpointError(f"{os.path.join(path, name)} holds one unnamed tensor, not named weights")
        overlap = set(tensors) & set(state)
        if overlap:
            raise CheckpointError(f"{path}: tensor {sorted(overlap)[0]!r} is in two shards")
        state.update(tensors)
    return state
