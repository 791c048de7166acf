"""ibp files written and read one tensor at a time.

``ibp.save`` and ``ibp.load`` hold a whole checkpoint in memory.  A model
converted tensor by tensor must not: ``Writer`` appends each compressed
tensor's sections to a scratch file as it comes, and ``finish`` puts the
header (which must precede the sections) in front; ``read`` parses the
header and ``tensor`` reads and validates one tensor's sections only.  The
bytes are exactly what ``ibp.save`` writes, and are planned and checked by
the container's own code.
"""
import json
import mmap
import os
import tempfile
import weakref

import numpy as np

from . import container, pages
from .checksum import crc32
from .errors import FormatError


def scratch(nbytes):
    """A new zeroed buffer of ``nbytes`` in its own private anonymous memory
    map, in huge pages where the system grants them (see ``pages``).  A
    large buffer from malloc can stay in the process after it is freed (the
    heap does not shrink around live blocks), so memory would creep up by a
    tensor or two per tensor converted; an unmapped map is gone at once.
    A buffer of a huge page or more starts on a huge-page bound, and the
    map runs on to the bound after its end (a few MB more of address space,
    not of memory): its first and last 2 MiB would otherwise fault in 4 KiB
    pages, 1.2 ms of a 4.4 MB buffer's first touch here, more than reading
    it from the page cache."""
    aligned = nbytes >= pages.HUGE_PAGE
    size = -(-nbytes // pages.HUGE_PAGE) * pages.HUGE_PAGE + pages.HUGE_PAGE if aligned else max(nbytes, 1)
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    buf = mmap.mmap(-1, size, flags=flags) if flags else mmap.mmap(-1, size)
    if not aligned:
        return buf
    whole = np.frombuffer(buf, np.uint8)
    start = -whole.ctypes.data % pages.HUGE_PAGE
    pages.advise(whole[start:])
    return memoryview(buf)[start:start + nbytes]


# Sections of tensors read at once by Reader.tensors.
READ_AHEAD_BYTES = 4 << 20
# Sections are written once this many bytes of them are waiting: a write
# per small tensor cost more than copying it into a joined one.
PENDING_BYTES = 1 << 20
# Without room for the header (a stream that cannot seek, or tensors so
# small that the room would waste much), sections wait in memory up to
# this many bytes before they go to a scratch file: a checkpoint of small
# tensors is then written once, not twice (the 104 tensors of
# minilm-small-bf16 took 6.3 ms to write through a scratch file, 3.6 held).
HELD_BYTES = 16 << 20


class Writer:
    """Append tensors, then ``finish`` writes the whole file.

    The header must precede the sections but is known only once every
    tensor is in.  Given ``header_room``, at least the bytes the header
    will take (``container.header_bound``), the sections go straight to
    ``out`` (a seekable binary file) after that much room, and ``finish()``
    writes the header in front of them, padded with spaces (JSON
    whitespace) to fill the room.  Otherwise they wait in memory, and past
    HELD_BYTES go to a scratch file in ``scratch_dir`` (put it next to the
    output, on the same disk), which ``finish(stream)`` copies behind the
    header: the sections of a big model are then written twice."""

    def __init__(self, scratch_dir=None, *, out=None, header_room=None):
        if (out is None) != (header_room is None):
            raise ValueError("out and header_room go together")
        if header_room is not None and header_room > container.MAX_HEADER:
            raise ValueError(f"a header takes at most {container.MAX_HEADER} bytes, not {header_room}")
        self._direct = out is not None
        if self._direct:
            self._origin = out.tell()
            self._start = container._align(container.PREAMBLE.size + header_room)   # of the sections
            out.seek(self._origin + self._start)
            self._body = out
        else:
            self._body = None   # the scratch file, made once HELD_BYTES of sections wait
            self._scratch_dir = scratch_dir
        self._entries = []
        self._names = set()
        self._end = 0        # where the sections added so far end (from the first section)
        self._pending = []   # [(offset, array)] added but not yet written ...
        self._pending_bytes = 0
        self._written = 0    # ... after those that end here

    def add(self, name, ct):
        """Add one CompressedTensor (name None for a lone tensor).  Its
        sections are checksummed now and written once a megabyte of them
        waits (HELD_BYTES without header room), or at ``finish``: until then
        they must not change (copy a tensor from ``Reader.tensors`` first)."""
        if name in self._names or None in self._names or (name is None and self._names):
            raise ValueError(f"tensor name {name!r} is a duplicate, or a lone tensor shares the file")
        self._names.add(name)
        (entry,), chunks = container._entries({name: ct}, container._align(self._end))
        self._entries.append(entry)
        self._pending += chunks
        self._pending_bytes += sum(arr.nbytes for _, arr in chunks)
        self._end = chunks[-1][0] + chunks[-1][1].nbytes
        if self._pending_bytes >= (PENDING_BYTES if self._direct else HELD_BYTES):
            self._flush()

    def _flush(self):
        if self._body is None:
            self._body = tempfile.TemporaryFile(dir=self._scratch_dir)
        self._written = container.write_sections(self._body, self._pending, self._written)
        self._pending, self._pending_bytes = [], 0

    def finish(self, stream=None, metadata=None):
        """Write the file (preamble, header, then the sections) to ``stream``,
        or, writing to ``out``, the preamble and header in front of the
        sections there."""
        if self._body is not None:
            self._flush()
        header = json.dumps({"metadata": dict(metadata or {}), "tensors": self._entries},
                            separators=(",", ":")).encode()
        p = container.PREAMBLE
        if not self._direct:
            self._head(stream, header, bool(self._entries), container.version_of(self._entries))
            if self._body is None:   # every section still held: written once, here
                container.write_sections(stream, self._pending, 0)
                self._pending, self._pending_bytes = [], 0
                return
            self._body.seek(0)
            while chunk := self._body.read(1 << 20):
                container.write_all(stream, chunk)
            return
        if stream is not None and stream is not self._body:
            raise ValueError("this writer writes its file to out")
        if self._entries:
            if p.size + len(header) > self._start:
                raise RuntimeError(f"the header takes {len(header)} bytes, more than the room left for it")
            header += b" " * (self._start - p.size - len(header))
        self._body.seek(self._origin)
        self._head(self._body, header, bool(self._entries), container.version_of(self._entries))
        self._body.seek(self._origin + (self._start + self._end if self._entries else p.size + len(header)))

    @staticmethod
    def _head(stream, header, sections, version):
        """The preamble, the header and the zeros up to the first section."""
        p = container.PREAMBLE
        container.write_all(stream, p.pack(container.MAGIC, version, len(header), crc32(header), 0))
        container.write_all(stream, header)
        if sections:  # sections start aligned; a file of no tensors ends with its header
            container.write_all(stream, b"\0" * (container._align(p.size + len(header)) - p.size - len(header)))

    def close(self):
        if not self._direct and self._body is not None:
            self._body.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Reader:
    """An ibp file's header, and its tensors decoded one by one on demand
    (``start`` is where the sections begin, ``entries`` the header's,
    ``version`` the file's format version)."""

    def __init__(self, path):
        self._file = open(path, "rb")
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            head = self._file.read(container.PREAMBLE.size)
            hlen = container.PREAMBLE.unpack_from(head, 0)[2] if len(head) == container.PREAMBLE.size else 0
            if hlen > container.MAX_HEADER:
                raise FormatError(f"header length {hlen} is over the {container.MAX_HEADER}-byte limit")
            self._header_len = hlen
            self.metadata, entries, self.start, self.version = container._header(head + self._file.read(hlen))
            self.entries = {}
            self._plans = {}   # name -> its checked entry (container.plan_entry)
            self._models = {}  # model sections' bytes -> the Model every tensor that has them shares
            for entry in entries:
                name = entry.get("name") if isinstance(entry, dict) else None
                if not (name is None or isinstance(name, str) and name):
                    raise FormatError("tensor name must be a non-empty string or null")
                if name in self.entries or (name is None and len(entries) != 1):
                    raise FormatError(f"duplicate or missing tensor name {name!r}")
                self.entries[name] = entry
        except BaseException:
            self._file.close()
            raise

    def __iter__(self):
        return iter(self.entries)

    def expected_size(self):
        """The file size the header describes: where the last section ends."""
        ends = [off + n for e in self.entries.values() for off, n in _spans(e)]
        return self.start + max(ends) if ends else container.PREAMBLE.size + self._header_len

    def _largest_extent(self):
        """The most bytes one entry's sections span, as the header says (a
        size hint: entries are checked when they are read)."""
        largest = 0
        for e in self.entries.values():
            spans = _spans(e)
            if spans:
                largest = max(largest, max(off + n for off, n in spans) - min(off for off, _ in spans))
        return largest

    def tensor(self, name, *, verify=True):
        """The CompressedTensor ``name``, reading only its own sections."""
        lo, hi = self._extent(name)
        view = memoryview(scratch(hi - lo))[:hi - lo]
        self._read_at(lo, view, name)
        return container.load_entry(view, self._plans[name], verify=verify, models=self._models)

    def tensors(self, names=None, *, verify=True):
        """(name, CompressedTensor) for each of ``names`` (every tensor, in
        file order, by default), for a caller converting tensor after
        tensor: the sections of tensors that follow each other in the file
        are read together, up to READ_AHEAD_BYTES at once (or one tensor),
        and all of a read's tensors are checked before the first is given.
        A read per small tensor, and its checks run between decoding others,
        cost more than decoding it.  A read goes into a buffer of this
        call's whose earlier payloads are all gone (fresh memory costs more
        to touch than to decode into; a loop over the tensors takes turns
        with two), else into a new one: tensors kept (``dict(r.tensors())``),
        their copies and their payloads stay whole."""
        names = list(self.entries) if names is None else list(names)
        buffers = []   # [(buffer, weak references to the views of it the tensors' payloads are)]
        size = None    # of a new buffer: the reads to come fit, worked out at the first
        i = 0
        while i < len(names):
            extents = [self._extent(names[i])]
            lo, hi = extents[0]
            j = i + 1
            while j < len(names):
                try:
                    a, b = self._extent(names[j])
                except (FormatError, KeyError):   # said when its turn comes, after the tensors before it
                    break
                if a < hi or b - lo > READ_AHEAD_BYTES:   # not after the last in the file, or too far on
                    break
                extents.append((a, b))
                hi, j = b, j + 1
            buf = _free_buffer(buffers, hi - lo)
            if buf is None:
                if size is None:
                    size = min(max(self._largest_extent(), READ_AHEAD_BYTES), self.size - self.start)
                buf = scratch(max(hi - lo, size))
            view = memoryview(buf)[:hi - lo]
            self._read_at(lo, view, names[i])
            group = [(name, container.load_entry(view[a - lo:b - lo], self._plans[name], verify=verify,
                                                 models=self._models)) for name, (a, b) in zip(names[i:j], extents)]
            buffers.append((buf, [weakref.ref(ct.payload.base) for _, ct in group
                                  if isinstance(ct.payload.base, memoryview)]))   # what any view of it keeps
            yield from group
            group = None   # (its tensors are the caller's now: the buffer is free once they are gone)
            i = j

    def _extent(self, name):
        """(first byte, end) of tensor ``name``'s sections from ``start``,
        after checking its entry and that the file holds them."""
        plan = self._plans.get(name)
        if plan is None:
            plan = self._plans[name] = container.plan_entry(self.entries[name], self.version)
        lo, hi = container.plan_extent(plan)
        if self.start + hi > self.size:
            raise FormatError(f"tensor {name!r} runs past the end of the file "
                              f"({self.size} bytes): the file is truncated")
        return lo, hi

    def _read_at(self, lo, view, name):
        self._file.seek(self.start + lo)
        if self._file.readinto(view) != len(view):
            raise FormatError(f"tensor {name!r} runs past the end of the file: the file is truncated")

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _free_buffer(buffers, nbytes):
    """A buffer of ``buffers`` (``Reader.tensors``') of at least ``nbytes``
    whose payloads are all gone, taken off the list; else None."""
    for k, (buf, refs) in enumerate(buffers):
        if len(buf) >= nbytes and all(r() is None for r in refs):
            del buffers[k]
            return buf
    return None


def _spans(entry):
    """(offset, length) of each section a header entry gives, where it gives
    them as integers (the entry is checked when its tensor is read)."""
    sections = entry.get("sections") if isinstance(entry, dict) else None
    if not isinstance(sections, dict):
        return []
    return [(s[0], s[1]) for s in sections.values()
            if isinstance(s, list) and len(s) == 3 and type(s[0]) is int and type(s[1]) is int]
