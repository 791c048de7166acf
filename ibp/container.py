"""The ibp file format (docs/format.md): a preamble, a JSON header, and
64-byte-aligned, CRC-checked binary sections.

Reading validates every field, length and offset before any array is built,
so untrusted bytes raise FormatError instead of crashing, hanging, or
allocating more than the file holds.  Arrays are views of the buffer (a
memory map stays a memory map) and are read-only.
"""
import functools
import io
import json
import mmap
import os
import secrets
import struct

import numpy as np
from numba import njit

from ._bits import frozen
from .checksum import crc32
from .dtypes import ITEMSIZE
from .errors import FormatError
from .files import keep_mode
from .geometry import Geometry
from .model import Model
from .tensor import CompressedTensor

MAGIC = b"\x89IBP\r\n\x1a\n"
VERSION = 4       # written only by files that need it (a gathered model; 3: a rotated one); others are version 2
READABLE = (1, 2, 3, 4)  # version 2 added the uniform row index (index_rel_bits 0), 3 rotated models, 4 gathered ones
PREAMBLE = struct.Struct("<8sIIII")
ALIGN = 64
MAX_HEADER = 64 << 20
MAX_DIMS = 64
MAX_WORDS = 1 << 60
ENTRY_KEYS = {"name", "dtype", "shape", "framework", "word_bits", "unit_words", "layout", "period", "sections"}
PACKED_KEYS = {"payload_bits", "index_block", "index_rel_bits"}


def _align(n):
    return -(-n // ALIGN) * ALIGN


def _sections(ct):
    """Name -> little-endian array of each binary section of a tensor."""
    m = ct.model
    out = {"lo": m.lo.reshape(-1), "hi": m.hi.reshape(-1),
           "base": m.base.reshape(-1).astype(f"<u{m.word_bits // 8}"),
           "kinds": ct.kinds, "payload": ct.payload}
    if ct.layout == "packed":
        out["index_base"] = ct.index[2]
        out["index_rel"] = ct.index[3]
    return out


SECTIONS = {"packed": ("lo", "hi", "base", "kinds", "payload", "index_base", "index_rel"),
            "slotted": ("lo", "hi", "base", "kinds", "payload")}
SECTIONS_SET = {layout: frozenset(keys) for layout, keys in SECTIONS.items()}


def _entry(name, dtype, shape, framework, word_bits, unit_words, layout, period, rotate, gather, secs, packed):
    """A tensor's header entry; ``packed`` is (payload_bits, index_block,
    index_rel_bits) for the packed layout; ``rotate`` and ``gather`` are
    written only when they are not 0 (and make the file version 3 and 4)."""
    entry = {"name": name, "dtype": dtype, "shape": list(shape), "framework": framework,
             "word_bits": word_bits, "unit_words": unit_words, "layout": layout, "period": period,
             "sections": secs}
    if rotate:
        entry["rotate"] = rotate
    if gather:
        entry["gather"] = gather
    if layout == "packed":
        entry.update(payload_bits=packed[0], index_block=packed[1], index_rel_bits=packed[2])
    return entry


def version_of(entries):
    """The format version a file of these header entries is written as: the
    oldest that can hold them, so older readers read what they can."""
    return 4 if any("gather" in e for e in entries) else 3 if any("rotate" in e for e in entries) else 2


def _entries(tensors, offset=0):
    """(header entries, [(offset, array)]) of a mapping of tensors whose
    sections start at ``offset`` (an aligned offset from data_start)."""
    entries, chunks = [], []
    for name, ct in tensors.items():
        secs = {}
        for key, arr in _sections(ct).items():
            arr = np.ascontiguousarray(arr)
            secs[key] = [offset, arr.nbytes, crc32(arr)]
            chunks.append((offset, arr))
            offset += -(-arr.nbytes // ALIGN) * ALIGN
        g = ct.geometry
        packed = (int(ct.payload_bits), int(ct.index[0]), int(ct.index[1])) if ct.layout == "packed" else None
        entries.append(_entry(name, ct.dtype_name, ct.shape, ct.framework, g.word_bits, g.unit_words, ct.layout,
                              ct.model.period, ct.model.rotate, ct.model.gather, secs, packed))
    return entries, chunks


# Sections up to this size are joined with their neighbours into writes of
# about this size: writing the 4 MB of minilm-small-bf16's sections took
# 1.39 ms joined up to 4 KiB (a write per bigger section), 1.00 ms up to 1 MiB.
JOINED_BYTES = 1 << 20


def write_sections(stream, chunks, pos):
    """Write ``chunks`` ([(offset, array)] in order, from ``pos``) with
    zeros between them; returns where they end.  Sections up to
    JOINED_BYTES and the padding go out joined: a write costs more than
    copying a few hundred kilobytes."""
    joined, size = [], 0
    for off, arr in chunks:
        if off > pos:
            joined.append(bytes(off - pos))
            size += off - pos
        if joined and size + arr.nbytes > JOINED_BYTES:
            write_all(stream, b"".join(joined))
            joined, size = [], 0
        if arr.nbytes > JOINED_BYTES:
            write_all(stream, arr)
        else:
            joined.append(arr)
            size += arr.nbytes
        pos = off + arr.nbytes
    if joined:
        write_all(stream, b"".join(joined))
    return pos


def _plan(tensors, metadata):
    """(version, header bytes, [(absolute offset, array)]) for a mapping of tensors."""
    entries, chunks = _entries(tensors)
    header = json.dumps({"metadata": dict(metadata or {}), "tensors": entries},
                        separators=(",", ":")).encode()
    start = _align(PREAMBLE.size + len(header))
    return version_of(entries), header, [(start + off, arr) for off, arr in chunks]


def header_bound(tensors, metadata, largest):
    """The most bytes a header can take for ``tensors`` (name, dtype,
    shape, framework), given ``metadata`` and no number in their entries
    over ``largest`` (bits of the whole file bound them all).  Counted, not
    written: an entry's JSON is that of its dtype and framework's widest
    entry, with its name and shape in place of empty ones (writing every
    entry out cost a millisecond per hundred tensors)."""
    total = len(json.dumps({"metadata": dict(metadata or {}), "tensors": []}, separators=(",", ":")).encode())
    total += max(len(tensors) - 1, 0)   # the commas between entries
    n = max(largest, 0xFFFFFFFF)   # a CRC-32, and so every smaller field, is below 2**32
    for name, dtype, shape, framework in tensors:
        total += _widest_entry(dtype, framework, n) + len(json.dumps(name)) - 2 + \
            sum(len(str(s)) for s in shape) + max(len(shape) - 1, 0)
    return total


@functools.lru_cache(maxsize=64)
def _widest_entry(dtype, framework, n):
    """Bytes of the JSON of the longest entry with an empty name and shape:
    packed and gathered, every number ``n`` (the gather mask up to 2**64 - 1)."""
    entry = _entry("", dtype, (), framework, n, n, "packed", n, 0, max(n, (1 << 64) - 1),
                   {k: [n, n, n] for k in SECTIONS["packed"]}, (n, n, n))
    return len(json.dumps(entry, separators=(",", ":")).encode())


def write_all(stream, data):
    """Write all of ``data``: a raw stream may take fewer bytes than it is
    given (and say how many), so the rest goes in again."""
    data = memoryview(data).cast("B")
    while data:
        n = stream.write(data)
        data = data[len(data) if n is None else n:]


def _write(stream, tensors, metadata):
    version, header, chunks = _plan(tensors, metadata)
    write_all(stream, PREAMBLE.pack(MAGIC, version, len(header), crc32(header), 0))
    write_all(stream, header)
    write_sections(stream, chunks, PREAMBLE.size + len(header))


def dumps(tensors, metadata=None):
    """Bytes of a file holding ``tensors`` (name -> CompressedTensor; the
    single name None marks a lone tensor)."""
    buf = io.BytesIO()
    _write(buf, tensors, metadata)
    return buf.getvalue()


def save_file(path, tensors, metadata=None):
    """Write atomically: a crash leaves either the old file or the new one.

    The temporary file has a name no other writer (thread or process) can
    pick, so concurrent saves to one path each replace it with a whole file.
    As writing the file in place would: a symlink stays one (the file it
    names is replaced), and a file replaced keeps its permissions."""
    path = os.fsdecode(path)
    target = os.path.realpath(path) if os.path.islink(path) else path
    tmp = f"{target}.{secrets.token_hex(8)}.tmp"
    try:
        with open(tmp, "xb") as f:
            _write(f, tensors, metadata)
        keep_mode(target, tmp)
        os.replace(tmp, target)
    except OSError as e:  # named by the path asked for: the temporary name means nothing to the caller
        if e.errno is None:
            raise
        raise type(e)(e.errno, e.strerror, path) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _binary(stream):
    if isinstance(stream, io.TextIOBase):
        raise TypeError(f"{type(stream).__name__} is a text-mode file: open it in binary mode ('rb' or 'wb')")


def write_stream(stream, tensors, metadata=None):
    """Write the file to a binary stream (anything with ``write``) at its
    position; several files can follow one another in one stream."""
    _binary(stream)
    _write(stream, tensors, metadata)


def declared_size(entries, start, header_end):
    """The file size a checked header describes: where its last section
    ends.  Malformed entries are skipped here; parsing the file refuses them."""
    ends = [s[0] + s[1] for e in entries if isinstance(e, dict) and isinstance(e.get("sections"), dict)
            for s in e["sections"].values()
            if isinstance(s, list) and len(s) == 3 and type(s[0]) is int and type(s[1]) is int]
    return start + max(ends) if ends else header_end


def _stream_header(read):
    """(preamble + header bytes, declared file size) through ``read(n)``."""
    head = read(PREAMBLE.size)
    if len(head) < PREAMBLE.size or head[:len(MAGIC)] != MAGIC:
        _header(head)                       # raises: too short, or not an ibp file
    hlen = PREAMBLE.unpack_from(head, 0)[2]
    if hlen > MAX_HEADER:
        raise FormatError(f"header length {hlen} is over the {MAX_HEADER}-byte limit")
    head += read(hlen)
    _, entries, start, _ = _header(head)
    return head, declared_size(entries, start, len(head))


def read_stream(stream):
    """The bytes of one ibp file read from a binary stream at its position:
    exactly as many as its header declares, so the stream is left just after
    it.  Read in bounded chunks, so a lying header cannot make this allocate
    more than the stream holds."""
    _binary(stream)

    def read(n, into=None):
        into = bytearray() if into is None else into
        want = len(into) + n
        while len(into) < want:
            chunk = stream.read(min(want - len(into), 1 << 24))
            if not chunk:
                break
            if not isinstance(chunk, (bytes, bytearray, memoryview)):
                raise TypeError(f"the stream's read() gave {type(chunk).__name__}, not bytes: "
                                "open the file in binary mode ('rb')")
            into += chunk
        return into

    head, size = _stream_header(read)
    data = read(size - len(head), bytearray(head))
    if len(data) < size:
        raise FormatError(f"the stream ends {len(data)} bytes into an ibp file its header says is "
                          f"{size} bytes: it is truncated")
    return data


def is_disk_file(stream):
    """Whether ``stream`` is a file opened with ``open()`` (which can be mapped)."""
    raw = stream.raw if isinstance(stream, (io.BufferedReader, io.BufferedRandom)) else stream
    return isinstance(raw, io.FileIO)


def map_stream(stream):
    """Like ``read_stream`` for a file opened with ``open()``, as a read-only
    view of a memory map of that file; the stream is moved past the file."""
    if not is_disk_file(stream):
        raise ValueError(f"mmap=True maps a path or a file opened with open(), not a {type(stream).__name__}: "
                         "pass mmap=False to read it")
    if not stream.seekable():
        raise ValueError("mmap=True cannot map a pipe or other stream without a position: pass mmap=False to read it")
    pos = stream.tell()
    try:
        size = os.fstat(stream.fileno()).st_size
        whole = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) if size > pos else b""
    except (OSError, ValueError) as e:
        raise ValueError(f"mmap=True cannot map this file ({e}): pass mmap=False to read it") from None
    view = memoryview(whole)[pos:]
    taken = 0

    def read(n):
        nonlocal taken
        out = bytes(view[taken:taken + n])
        taken += len(out)
        return out

    _, size = _stream_header(read)
    stream.seek(pos + min(size, len(view)))
    return view[:size]


def read_header(path):
    """(metadata, format version) of a file, reading (and checking) only
    its preamble and header."""
    with open(path, "rb") as f:
        head = f.read(PREAMBLE.size)
        hlen = PREAMBLE.unpack_from(head, 0)[2] if len(head) == PREAMBLE.size else 0
        meta, _, _, version = _header(head + f.read(min(hlen, MAX_HEADER)))
        return meta, version


def read_metadata(path):
    """The header's metadata mapping, reading only the preamble and header."""
    return read_header(path)[0]


def header_metadata(buf):
    """The metadata mapping of a whole file held in ``buf``."""
    return _header(buf)[0]


def load_file(path, *, mmap_mode=False, verify=True):
    if isinstance(path, bytes) and (path.startswith(MAGIC) or b"\0" in path):
        raise TypeError("these bytes are a file's contents, not its path: load them with "
                        "ibp.load(io.BytesIO(data)) or CompressedTensor.from_bytes(data)")
    with open(path, "rb") as f:
        if mmap_mode and os.fstat(f.fileno()).st_size > 0:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        else:
            data = f.read()
    return loads(data, verify=verify)


# -- reading ------------------------------------------------------------------

def _int(value, what, lo=0, hi=MAX_WORDS):
    if type(value) is not int or not lo <= value <= hi:
        raise FormatError(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def unique_keys(pairs):
    """A JSON object as a dict, refusing a key given twice (json keeps the last)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise FormatError(f"header repeats the key {dup!r}")
    return obj


def _header(buf):
    if len(buf) < PREAMBLE.size:
        raise FormatError(f"{len(buf)} bytes is too short for an ibp file")
    magic, version, hlen, hcrc, reserved = PREAMBLE.unpack_from(buf, 0)
    if magic != MAGIC:
        raise FormatError("not an ibp file (bad magic)")
    if reserved:
        raise FormatError("reserved preamble bytes are not zero")
    if version not in READABLE:
        raise FormatError(f"unsupported ibp format version {version} (this reads {', '.join(map(str, READABLE))})")
    if hlen > MAX_HEADER or PREAMBLE.size + hlen > len(buf):
        raise FormatError(f"header length {hlen} runs past the end of the data")
    raw = bytes(buf[PREAMBLE.size:PREAMBLE.size + hlen])
    if crc32(raw) != hcrc:
        raise FormatError("header checksum mismatch")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys)
    except FormatError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict) or set(header) != {"metadata", "tensors"}:
        raise FormatError("header must be an object with 'metadata' and 'tensors'")
    meta, entries = header["metadata"], header["tensors"]
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError("metadata must map strings to strings")
    if not isinstance(entries, list):
        raise FormatError("tensors must be a list")
    return meta, entries, _align(PREAMBLE.size + hlen), version


def _bad_span(buflen, start, spec, want_len, label, key):
    """FormatError saying what is wrong with section ``key`` of tensor
    ``label``: ``spec`` is not [offset, length, crc32] of small ints, or
    not aligned, not ``want_len`` long or past the end of the data
    (``_plan_entry`` checks the common case inline)."""
    name = f"{label}/{key}"
    if not (isinstance(spec, list) and len(spec) == 3):
        raise FormatError(f"section {name} must be [offset, length, crc32]")
    off = _int(spec[0], f"{name} offset", 0, buflen)
    length = _int(spec[1], f"{name} length", 0, buflen)
    _int(spec[2], f"{name} crc32", 0, 0xFFFFFFFF)
    if off % ALIGN:
        raise FormatError(f"section {name} is not {ALIGN}-byte aligned")
    if length != want_len:
        raise FormatError(f"section {name} holds {length} bytes, expected {want_len}")
    raise FormatError(f"section {name} runs past the end of the data")


def _array(buf, start, span, dtype, verify, label, key, own):
    """A read-only array of a section of the memoryview ``buf``, CRC-checked when ``verify``.

    ``own`` copies it: the decoder trusts the small sections (model, kinds,
    row index) once validated, so they must not be left where someone else
    can rewrite them (a bytearray, a file mapped from disk)."""
    off, length, crc = span
    if not length and not crc:   # an empty section (the row index of equal units): nothing to read
        return np.frombuffer(b"", dtype)   # its own: read-only for good, as a shared one would not be
    if own:   # a bytes copy: its array is read-only and aligned
        return np.frombuffer(_section_bytes(buf, start, span, verify, label, key), dtype=dtype)
    view = buf[start + off:start + off + length]
    if verify and crc32(view) != crc:
        raise FormatError(f"section {label}/{key} checksum mismatch")
    arr = np.frombuffer(view, dtype=dtype)
    if not arr.flags.aligned:
        arr = arr.copy()
    arr.flags.writeable = False
    return arr


def _section_bytes(buf, start, span, verify, label, key):
    """A section's bytes, copied from the memoryview ``buf``, then CRC-checked when ``verify`` (the
    copy is what is checked: a buffer someone else can write may change
    under the check); the model's are also the key it is shared by (see
    ``_build_entry``)."""
    off, length, crc = span
    data = bytes(buf[start + off:start + off + length])
    if verify and crc32(data) != crc:
        raise FormatError(f"section {label}/{key} checksum mismatch")
    return data


@njit(cache=True)
def _first_bad_start(block_base, rel, block, payload_bits):
    """First unit whose start is out of order or range, or -1."""
    prev = 0
    for u in range(rel.shape[0]):
        b = block_base[u // block]
        if b > np.uint64(payload_bits) or (u % block == 0 and rel[u] != 0):
            return u
        s = np.int64(b) + np.int64(rel[u])
        if s < prev or s > payload_bits or (u == 0 and s != 0):
            return u
        prev = s
    return -1


_ENTRY_KEYS = {(layout, transform): ENTRY_KEYS | (PACKED_KEYS if layout == "packed" else set())
               | ({transform} if transform else set())
               for layout in ("packed", "slotted") for transform in (None, "rotate", "gather")}
_SECTION_ORDER = {layout: tuple(sorted(keys)) for layout, keys in SECTIONS.items()}


def _plan_entry(buflen, start, entry, version):
    """Check one tensor entry's fields and its sections' bounds, reading no
    section bytes: (fields, geometry, name -> (offset, length, crc32))."""
    if not isinstance(entry, dict):
        raise FormatError("tensor entry must be an object")
    layout = entry.get("layout")
    if layout not in ("packed", "slotted"):
        raise FormatError(f"layout must be 'packed' or 'slotted', got {layout!r}")
    transform = "rotate" if version >= 3 and "rotate" in entry else "gather" if version >= 4 and "gather" in entry \
        else None
    keys = _ENTRY_KEYS[layout, transform]
    if entry.keys() != keys:
        raise FormatError(f"tensor entry keys {sorted(entry)} != {sorted(keys)}")
    name = entry["name"]
    if name is not None and not (isinstance(name, str) and name):
        raise FormatError("tensor name must be a non-empty string or null")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise FormatError(f"unknown dtype {dtype!r}")
    shape = entry["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise FormatError("shape must be a list of at most 64 dimensions")
    shape = tuple(shape)
    for s in shape:
        _int(s, "dimension")
    if entry["framework"] not in ("numpy", "torch"):
        raise FormatError("framework must be 'numpy' or 'torch'")
    W = _int(entry["word_bits"], "word_bits", 8, 64)
    U = _int(entry["unit_words"], "unit_words", 1)
    p = _int(entry["period"], "period", 1)
    rotate = _int(entry["rotate"], "rotate", 1, W - 1) if transform == "rotate" else 0
    gather = _int(entry["gather"], "gather", 1, (1 << W) - 1) if transform == "gather" else 0
    geom = _checked_geometry(shape, ITEMSIZE[dtype], W, U, p)
    secs = entry["sections"]
    order = _SECTION_ORDER[layout]
    if not isinstance(secs, dict) or secs.keys() != SECTIONS_SET[layout]:
        raise FormatError(f"sections must be {list(order)}")
    n = geom.nunits
    want = {"lo": 2 * p, "hi": 2 * p, "base": 2 * p * W // 8, "kinds": -(-n // 4)}
    label = "tensor" if name is None else name
    fields = dict(name=name, label=label, dtype=dtype, shape=shape,
                  framework=entry["framework"], layout=layout, period=p, rotate=rotate, gather=gather)
    if layout == "slotted":
        want["payload"] = (n * geom.slot_words + 1) * 8
    else:
        bits = _int(entry["payload_bits"], "payload_bits", 0, 8 * buflen)
        block = _int(entry["index_block"], "index_block", 1, 1 << 16)
        rel_bits = entry["index_rel_bits"]
        if block & (block - 1) or type(rel_bits) is not int \
                or rel_bits not in ((0, 16, 32) if version >= 2 else (16, 32)):
            raise FormatError("index_block must be a power of two and index_rel_bits 16 or 32 (or 0 from version 2)")
        if rel_bits == 0 and (block != 1 or n == 0 or bits % n):
            raise FormatError(f"{label}: a uniform row index needs index_block 1 and units of equal size")
        want.update(index_base=0 if rel_bits == 0 else -(-n // block) * 8, index_rel=n * rel_bits // 8,
                    payload=(-(-bits // 64) + 1) * 8)
        fields.update(payload_bits=bits, index_block=block, index_rel_bits=rel_bits)
    spans = {}   # name -> (offset, length, crc32), each checked against the data's bounds
    for key in order:
        spec = secs[key]
        if type(spec) is list and len(spec) == 3:
            off, length, crc = spec
            if type(off) is int and type(length) is int and type(crc) is int and 0 <= off and not off % ALIGN \
                    and length == want[key] and start + off + length <= buflen and 0 <= crc <= 0xFFFFFFFF:
                spans[key] = (off, length, crc)
                continue
        _bad_span(buflen, start, spec, want[key], label, key)
    return fields, geom, spans


@functools.lru_cache(maxsize=4096)
def _checked_geometry(shape, itemsize, W, U, p):
    """The Geometry of an entry's fields, after the reader's checks on it
    (cached: a checkpoint's tensors share a few shapes)."""
    geom = Geometry(shape, itemsize, W, U)
    if geom.total_words > MAX_WORDS:
        raise FormatError(f"{geom.total_words} words is more than a file can describe")
    try:
        geom.check()
    except ValueError as e:
        raise FormatError(str(e)) from None
    if U % p:
        raise FormatError(f"period {p} does not divide the {U}-word units")
    return geom


def _build_entry(buf, start, fields, geom, spans, verify, own, models=None):
    """The CompressedTensor of a planned entry: read, CRC-check and validate
    its sections' contents.  ``models`` (a dict) maps the model sections'
    bytes to a model already checked: a checkpoint's layers mostly share
    their roles' models, whose checks and tables then are made once."""
    label, p, W, n = fields["label"], fields["period"], geom.word_bits, geom.nunits
    buf = memoryview(buf)
    lo = _section_bytes(buf, start, spans["lo"], verify, label, "lo")
    hi = _section_bytes(buf, start, spans["hi"], verify, label, "hi")
    base = _section_bytes(buf, start, spans["base"], verify, label, "base")
    key = (W, fields["rotate"], fields["gather"], lo, hi, base)
    model = None if models is None else models.get(key)
    if model is None:
        try:
            model = Model._checked(W, np.frombuffer(lo, np.uint8).reshape(2, p),
                                   np.frombuffer(hi, np.uint8).reshape(2, p),
                                   np.frombuffer(base, f"<u{W // 8}").reshape(2, p).astype(np.uint64),
                                   fields["rotate"], fields["gather"])
        except FormatError as e:
            raise FormatError(f"{label}: {e}") from None
        if models is not None:
            models[key] = model
    kinds = _array(buf, start, spans["kinds"], np.uint8, verify, label, "kinds", own)
    if n % 4 and kinds[-1] >> (2 * (n % 4)):
        raise FormatError(f"{label}: unused kind bits are not zero")
    common = dict(dtype=fields["dtype"], shape=fields["shape"], framework=fields["framework"], geometry=geom,
                  layout=fields["layout"], model=model, kinds=kinds)
    payload = _array(buf, start, spans["payload"], "<u8", verify, label, "payload", False)
    if fields["layout"] == "slotted":
        if payload[-1]:
            raise FormatError(f"{label}: the spare payload word is not zero")
        ct = CompressedTensor(payload=payload, **common)
        if verify:
            _check_slot_padding(ct, label)
        return ct
    bits, block, rel_bits = fields["payload_bits"], fields["index_block"], fields["index_rel_bits"]
    block_base = _array(buf, start, spans["index_base"], "<u8", verify, label, "index_base", own)
    rel = _array(buf, start, spans["index_rel"], f"<u{max(rel_bits, 16) // 8}", verify, label, "index_rel", own)
    if payload[-1] or (bits % 64 and payload[-2] >> np.uint64(bits % 64)):
        raise FormatError(f"{label}: payload padding bits are not zero")
    bad = -1 if rel_bits == 0 else _first_bad_start(frozen(block_base), frozen(rel), block, bits)
    if bad >= 0:
        raise FormatError(f"{label}: row index entry {bad} is out of order or out of range")
    return CompressedTensor(payload=payload, payload_bits=bits, index=(block, rel_bits, block_base, rel), **common)


@njit(cache=True)
def _first_dirty_slot(payload, sizes, slot_words):
    """First slotted unit with a set bit after its encoding, or -1."""
    for u in range(sizes.shape[0]):
        w0 = u * slot_words
        used = sizes[u]
        first = w0 + used // 64
        if used % 64:
            if payload[first] >> np.uint64(used % 64):
                return u
            first += 1
        for w in range(first, w0 + slot_words):
            if payload[w]:
                return u
    return -1


def _check_slot_padding(ct, label):
    """docs/format.md section 6: the bits after a slotted unit's encoding are
    zero (this parses every unit, so only ``verify`` does it)."""
    from .decode import unit_bits
    bad = _first_dirty_slot(frozen(ct.payload), unit_bits(ct), ct.geometry.slot_words)
    if bad >= 0:
        raise FormatError(f"{label}: unit {bad} has non-zero bits after its encoding")


def _plan_file(buf):
    """Check a whole file's structure against its length, reading only its
    preamble and header: every entry, every section's bounds, no two
    sections overlapping, the file ending where the last one does.
    (metadata, start, [(fields, geometry, spans)], padding ranges)."""
    meta, entries, start, version = _header(buf)
    need = declared_size(entries, start, PREAMBLE.size + PREAMBLE.unpack_from(buf, 0)[2])
    if need > len(buf):  # said first: the field that would run past the end says less
        raise FormatError(f"truncated: {len(buf)} bytes of the {need} its header describes")
    plans, names, taken = [], set(), []
    for entry in entries:
        fields, geom, spans = _plan_entry(len(buf), start, entry, version)
        name = fields["name"]
        if name in names or (name is None and len(entries) != 1):
            raise FormatError(f"duplicate or missing tensor name {name!r}")
        names.add(name)
        taken += [(off, off + length, fields["label"], key) for key, (off, length, _) in spans.items()]
        plans.append((fields, geom, spans))
    return meta, start, plans, _padding(buf, start, taken)


def loads(buf, *, verify=True):
    """Parse a whole file from a bytes-like object: name -> CompressedTensor.

    The whole structure (every entry, every section's bounds, overlaps and
    padding) is checked before any section is read or checksummed."""
    if not isinstance(buf, (bytes, bytearray, memoryview, mmap.mmap)):
        raise TypeError(f"expected bytes, not {type(buf).__name__}")
    own = not isinstance(buf, bytes) and not (isinstance(buf, memoryview) and buf.readonly
                                              and isinstance(buf.obj, bytes))
    if isinstance(buf, memoryview):
        buf = buf.cast("B")
    _, start, plans, padding = _plan_file(buf)
    _check_zeros(memoryview(buf), padding)
    models = {}
    return {fields["name"]: _build_entry(buf, start, fields, geom, spans, verify, own, models)
            for fields, geom, spans in plans}


def _gaps(taken, pos=0):
    """(the non-empty byte ranges between sections ``taken``, (offset, end,
    label, key) from data_start, after ``pos``, and where the last one
    ends), after checking that no two sections overlap."""
    taken.sort()
    gaps = []
    for off, end, label, key in taken:
        if off < pos:
            raise FormatError(f"section {label}/{key} overlaps the one before it")
        if off > pos:
            gaps.append((pos, off))
        pos = end   # sections have no negative lengths
    return gaps, pos


def _check_zeros(view, ranges):
    """FormatError unless the bytes of ``view`` in every (start, end) range are zero."""
    for a, b in ranges:
        if b > a and int.from_bytes(view[a:b], "little"):
            raise FormatError("padding bytes are not zero")


def _padding(buf, start, taken):
    """The byte ranges outside the header and the sections (which must be
    zero), after checking that no two sections overlap and that the file
    ends where the last section does: no byte goes unchecked."""
    gaps, end = _gaps(taken)
    header_end = PREAMBLE.unpack_from(buf, 0)[2] + PREAMBLE.size
    size = start + end if taken else header_end
    if len(buf) != size:
        raise FormatError(f"file is {len(buf)} bytes, its sections end at {size}")
    gaps = [(start + a, start + b) for a, b in gaps] + [(header_end, min(start, size))]
    return [(a, b) for a, b in gaps if b > a]


UNBOUNDED = 1 << 62   # the data length to plan an entry against when its bounds are checked later


def plan_entry(entry, version):
    """Check a header ``entry``'s fields, reading nothing (offsets are
    checked against the file when its sections are read): the plan
    ``load_entry`` takes, (fields, geometry, spans, (first byte, end) of
    its sections from data_start, the gaps between them from the first
    byte), made once per tensor however often it is read."""
    fields, geom, spans = _plan_entry(UNBOUNDED, 0, entry, version)
    return fields, geom, spans, *section_gaps(fields, spans)


def section_gaps(fields, spans):
    """((first byte, end) of a planned entry's sections from data_start,
    the byte ranges between them from the first byte), after checking that
    no two overlap: what reading the tensor alone reads and must find zero."""
    label = fields["label"]
    taken = [(off, off + length, label, key) for key, (off, length, _) in spans.items()]
    origin = min(taken)[0]
    gaps, end = _gaps(taken, origin)
    return (origin, end), [(a - origin, b - origin) for a, b in gaps]


def plan_extent(plan):
    """(first byte, end) of a planned entry's sections, from data_start."""
    return plan[3]


def load_entry(buf, plan, *, verify=True, models=None):
    """The CompressedTensor of a planned entry (``plan_entry``) whose
    sections, and the zero bytes between them, are all ``buf`` holds (its
    ``plan_extent``): one tensor of a file read piece by piece
    (``stream.Reader``), checked as ``loads`` checks a whole file.
    ``models`` (a dict) keeps the models read so far, by their bytes, for
    the next tensors to share (see ``_build_entry``)."""
    fields, geom, spans, (origin, end), gaps = plan
    if len(buf) != end - origin:
        raise FormatError(f"{fields['label']}: its sections take {end - origin} bytes, not the {len(buf)} read")
    _check_zeros(memoryview(buf), gaps)
    return _build_entry(buf, -origin, fields, geom, spans, verify, True, models)
