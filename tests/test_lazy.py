"""ibp.open: one tensor, or rows of it, of a file without reading the rest,
checked as strictly as ibp.load checks what it touches."""
import json
import os
import zlib

import numpy as np
import pytest

import ibp
from ibp import container, datasets, stream


def header(path):
    """(entries by name, where the sections start) of an ibp file."""
    with open(path, "rb") as f:
        data = f.read(1 << 20)
    _, entries, start, _ = container._header(data)
    return {e["name"]: e for e in entries}, start


def poke(path, offset, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes([value]))


def section_offset(path, name, section):
    entries, start = header(path)
    return start + entries[name]["sections"][section][0]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A checkpoint of real tensors: Cora's features, GloVe rows (numpy) and
    MiniLM bf16 weights (torch), as many of them as are installed."""
    tensors = {"cora": datasets.load("cora")["features"]}
    if "glove-50d" in datasets.available():
        tensors["glove"] = datasets.load("glove-50d")["glove.6B.50d"][:20000]
    if "minilm-bf16" in datasets.available():
        w = datasets.load("minilm-bf16")
        for k in ("encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.query.bias"):
            tensors[k] = w[k]
    path = tmp_path_factory.mktemp("lazy") / "real.ibp"
    ibp.save(tensors, path, metadata={"step": "1200"})
    return path, tensors


def same(a, b):
    assert type(a) is type(b) and a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)
    if isinstance(a, np.ndarray):
        assert a.tobytes() == b.tobytes()
    else:
        import torch
        assert torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def test_lists_describes_and_decodes_like_load(real):
    path, tensors = real
    loaded = ibp.load(path)
    with ibp.open(path) as f:
        assert f.keys() == list(tensors) == list(loaded)
        assert f.metadata() == {"step": "1200"}
        for name, x in tensors.items():
            info, ct = f.info(name), loaded[name]
            assert (info.name, info.shape, info.dtype, info.dtype_name, info.layout, info.word_bits) == \
                   (name, tuple(x.shape), x.dtype, ct.dtype_name, ct.layout, ct.word_bits)
            assert ct.nbytes <= info.nbytes < ct.nbytes + 64 * 7     # its sections, each padded to 64 bytes
            same(f.get_tensor(name), x)
            same(f.get_rows(name, [0, -1, 3]), x[[0, -1, 3]])
            same(f.get_rows(name, np.array([[1, 2], [2, 1]])), x[np.array([[1, 2], [2, 1]])])
            assert f.get_compressed(name) is f.get_compressed(name)         # read and checked once


def test_a_corrupted_tensor_fails_only_when_touched(real, tmp_path):
    path, tensors = real
    bad = tmp_path / "bad.ibp"
    bad.write_bytes(path.read_bytes())
    poke(bad, section_offset(bad, "cora", "payload") + 100, 0x5A)
    with pytest.raises(ibp.FormatError, match="checksum"):
        ibp.load(bad)                                       # the corruption is real
    with ibp.open(bad) as f:
        for name in list(tensors)[1:]:
            same(f.get_tensor(name), tensors[name])
        for _ in range(2):                                  # and is not forgotten on a second touch
            with pytest.raises(ibp.FormatError, match="cora/payload checksum"):
                f.get_rows("cora", [0])
        assert f.info("cora").shape == tensors["cora"].shape


def test_padding_between_a_tensors_sections_is_checked_with_them(real, tmp_path):
    """A byte set after a tensor's model (the zeros up to its next section),
    as ibp.load and stream.Reader find it; the other tensors still read."""
    path, tensors = real
    bad = tmp_path / "bad.ibp"
    bad.write_bytes(path.read_bytes())
    entries, start = header(bad)
    lo = entries["cora"]["sections"]["lo"]
    poke(bad, start + lo[0] + lo[1], 1)                   # the byte after the model's low bounds
    with pytest.raises(ibp.FormatError, match="padding"):
        ibp.load(bad)
    with stream.Reader(bad) as r, pytest.raises(ibp.FormatError, match="padding"):
        r.tensor("cora")
    with ibp.open(bad) as f:
        with pytest.raises(ibp.FormatError, match="padding"):
            f.get_tensor("cora")
        same(f.get_tensor(list(tensors)[-1]), tensors[list(tensors)[-1]])


def test_contents_are_validated_beyond_checksums(real, tmp_path):
    path, tensors = real
    bad = tmp_path / "bad.ibp"
    bad.write_bytes(path.read_bytes())
    poke(bad, section_offset(bad, "cora", "lo"), 200)     # a model level past the word width
    with ibp.open(bad, verify=False) as f:
        with pytest.raises(ibp.FormatError, match="cora: model level"):
            f.get_tensor("cora")
        same(f.get_tensor(list(tensors)[-1]), tensors[list(tensors)[-1]])


def test_header_problems_are_found_at_open(real, tmp_path):
    path, _ = real
    data = path.read_bytes()
    cases = {"empty.ibp": (b"", "too short"), "text.ibp": (b"hello, world\n" * 10, "bad magic"),
             "cut.ibp": (data[:-100], "truncated"), "long.ibp": (data + b"\0" * 64, "file is")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ibp.FormatError, match=message):
            ibp.open(tmp_path / name)
    entries, start = header(path)
    entries["cora"]["shape"] = [2709, 1433]                 # a lying header, with its CRC made right
    raw = json.dumps({"metadata": {"step": "1200"}, "tensors": list(entries.values())},
                     separators=(",", ":")).encode()
    old_len = container.PREAMBLE.unpack_from(data, 0)[2]
    assert len(raw) == old_len
    lying = tmp_path / "lying.ibp"
    lying.write_bytes(container.PREAMBLE.pack(container.MAGIC, container.VERSION, len(raw), zlib.crc32(raw), 0)
                      + raw + data[container.PREAMBLE.size + old_len:])
    with pytest.raises(ibp.FormatError, match="cora"):
        ibp.open(lying)


def test_a_truncated_file_says_so_wherever_it_is_cut(real, tmp_path):
    path, _ = real
    data = path.read_bytes()
    header_end = container.PREAMBLE.size + container.PREAMBLE.unpack_from(data, 0)[2]
    cut = tmp_path / "cut.ibp"
    for keep in np.linspace(header_end, len(data) - 1, 9).astype(int):
        cut.write_bytes(data[:keep])
        for read in (ibp.open, ibp.load, lambda p: ibp.load(p, mmap=True, verify=False)):
            with pytest.raises(ibp.FormatError, match=f"truncated: {keep} bytes of the {len(data)}"):
                read(cut)


def test_get_rows_takes_a_slice(real):
    path, tensors = real
    x = tensors["cora"]
    with ibp.open(path, verify=False) as f:
        for s in (slice(0, 3), slice(None, None, 7), slice(-5, None), slice(10, 2, -3), slice(5, 5)):
            same(f.get_rows("cora", s), x[s])


def test_pickles_as_its_path_for_worker_processes(real):
    """A Dataset holding an open file goes to DataLoader workers by pickle
    (spawn, forkserver): the receiver opens the file again, as its own map."""
    import pickle
    path, tensors = real
    with ibp.open(path, verify=False) as f:
        f.get_compressed("cora")
        again = pickle.loads(pickle.dumps(f))
        assert again.path == os.path.abspath(f.path) and again.keys() == f.keys() and again._map is not f._map
        same(again.get_rows("cora", [3, -1]), tensors["cora"][[3, -1]])
        assert again._verify is False
        again.close()
    with pytest.raises(ValueError, match="closed"):
        pickle.dumps(f)


def test_misuse(real, tmp_path):
    path, tensors = real
    with pytest.raises(TypeError, match="takes a path"):
        ibp.open(open(path, "rb"))
    with pytest.raises(FileNotFoundError):
        ibp.open(tmp_path / "missing.ibp")
    f = ibp.open(path)
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        f.get_tensor("nope")
    ct = f.get_compressed("cora")
    f.close()
    assert f.closed and "closed" in repr(f)
    with pytest.raises(ValueError, match="closed"):
        f.keys()
    with pytest.raises(ValueError, match="closed"):
        f.get_tensor("cora")
    same(ibp.decompress(ct, index=[5]), tensors["cora"][[5]])   # a tensor it gave stays valid
    f.close()                                                       # closing twice is harmless


def test_a_lone_tensor_has_the_name_none(tmp_path):
    x = datasets.load("cora")["features"][:300]
    ibp.save(ibp.compress(x), tmp_path / "one.ibp")
    with ibp.open(tmp_path / "one.ibp") as f:
        assert f.keys() == [None] and repr(f).endswith(": 1 tensor>")
        same(f.get_tensor(None), x)
        same(f.get_rows(None, -1), x[-1])


def mapped_rss_kib(path):
    """Resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    target, total, inside = os.path.realpath(path), 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                inside = len(head) >= 6 and head[-1] == target
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_only_the_tensor_touched_is_read(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.standard_normal((4096, 1024)).astype(np.float32)           # 16 MiB, 4 KiB rows
    small = datasets.load("cora")["features"][:64]
    path = tmp_path / "two.ibp"
    ibp.save({"big": ibp.compress(big, unit_rows=1), "small": small}, path)
    with ibp.open(path) as f:
        assert mapped_rss_kib(path) < 256                                 # the header only
        same(f.get_tensor("small"), small)
        assert mapped_rss_kib(path) < 1024
    with ibp.open(path, verify=False) as f:
        same(f.get_rows("big", [5, 4000]), big[[5, 4000]])                # index, kinds, model, two rows
        assert mapped_rss_kib(path) < 2048
        same(f.get_tensor("big"), big)
        assert mapped_rss_kib(path) > 12 * 1024                           # the measure sees reads
