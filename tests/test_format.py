"""The container format: bytes, files, checkpoints, and hostile input."""
import io
import json
import math
import struct
import zlib

import numpy as np
import pytest

import ibp
from ibp import container


def sample_tensor(layout="packed"):
    """A small tensor whose units (of four rows) use every kind."""
    rng = np.random.default_rng(7)
    x = np.full((48, 40), 3, np.uint16)
    x[4:8] = rng.integers(0, 65535, (4, 40), dtype=np.uint16)
    x[8:12, ::20] = 65535
    x[12:16, ::2] = 65000
    model = ibp.analyze(x[16:])
    return x, ibp.compress(x, model=model, layout=layout, unit_rows=4)


def rebuild(blob, mutate):
    """Re-serialise a file after ``mutate(header)``, with a valid header CRC,
    so only the lie itself can be caught."""
    magic, version, hlen, _, _ = container.PREAMBLE.unpack_from(blob, 0)
    header = json.loads(blob[24:24 + hlen])
    data_start = -(-(24 + hlen) // 64) * 64
    mutate(header)
    raw = json.dumps(header).encode()
    start = -(-(24 + len(raw)) // 64) * 64
    out = container.PREAMBLE.pack(magic, version, len(raw), zlib.crc32(raw), 0) + raw
    return out + b"\0" * (start - len(out)) + blob[data_start:]


@pytest.mark.parametrize("layout", ["packed", "slotted"])
def test_bytes_roundtrip(layout):
    x, ct = sample_tensor(layout)
    back = ibp.CompressedTensor.from_bytes(ct.to_bytes())
    assert back.layout == layout and back.shape == x.shape
    assert np.array_equal(ibp.decompress(back), x)
    assert np.array_equal(ibp.decompress(back, index=[5, -1, 9]), x[[5, -1, 9]])
    assert back.model == ct.model


def test_loaded_arrays_are_read_only_and_buffer_untouched():
    x, ct = sample_tensor("slotted")
    blob = bytearray(ct.to_bytes())
    before = bytes(blob)
    back = ibp.CompressedTensor.from_bytes(blob)
    assert not back.payload.flags.writeable
    back.update_rows([0], x[[1]] + 1)
    assert bytes(blob) == before
    assert np.array_equal(ibp.decompress(back, index=[0])[0], x[1] + 1)


def test_empty_sections_read_as_arrays_no_one_can_write():
    """The row index of equal units is two empty sections: each load gets
    arrays of its own that cannot be made writeable (a shared one could,
    and reshaped, broke every later load's decode)."""
    blob = ibp.compress(np.arange(256, dtype=np.uint32).reshape(16, 16)).to_bytes()
    a, b = (ibp.CompressedTensor.from_bytes(blob) for _ in range(2))
    assert a.index[1] == 0 and a.index[2].size == a.index[3].size == 0
    for arr in (a.index[2], a.index[3]):
        assert arr is not b.index[2] and arr is not b.index[3]
        with pytest.raises(ValueError):
            arr.flags.writeable = True


def test_every_truncation_is_a_format_error():
    _, ct = sample_tensor()
    blob = ct.to_bytes()
    for n in range(len(blob)):
        with pytest.raises(ibp.FormatError):
            ibp.CompressedTensor.from_bytes(blob[:n])


def test_ten_thousand_bit_flips_raise_only_format_error():
    x, ct = sample_tensor()
    blob = ct.to_bytes()
    rng = np.random.default_rng(0)
    for trial in range(10_000):
        b = bytearray(blob)
        for pos in rng.integers(0, len(b), 1 + trial % 3):
            b[pos] ^= 1 << int(rng.integers(8))
        if bytes(b) == blob:
            continue
        with pytest.raises(ibp.FormatError):
            ibp.decompress(ibp.CompressedTensor.from_bytes(bytes(b)))


def test_unverified_corruption_never_crashes():
    """With checksums off, structural checks and the decoder's own bounds
    checks must still turn any corruption into FormatError or a result."""
    _, ct = sample_tensor()
    blob = ct.to_bytes()
    rng = np.random.default_rng(1)
    outcomes = {"error": 0, "decoded": 0}
    for trial in range(3000):
        b = bytearray(blob)
        for pos in rng.integers(len(blob) - ct.payload.nbytes - 200, len(b), 1 + trial % 4):
            b[pos] ^= 1 << int(rng.integers(8))
        try:
            ibp.decompress(ibp.CompressedTensor.from_bytes(bytes(b), verify=False))
            outcomes["decoded"] += 1
        except ibp.FormatError:
            outcomes["error"] += 1
    assert outcomes["error"] > 0


@pytest.mark.parametrize("lie", [
    lambda h: h["tensors"][0].update(shape=[48, 41]),
    lambda h: h["tensors"][0].update(shape=[480, 40]),
    lambda h: h["tensors"][0].update(shape=[-1, 40]),
    lambda h: h["tensors"][0].update(shape=[48.0, 40]),
    lambda h: h["tensors"][0].update(dtype="float128"),
    lambda h: h["tensors"][0].update(dtype="int32"),
    lambda h: h["tensors"][0].update(word_bits=24),
    lambda h: h["tensors"][0].update(word_bits=True),
    lambda h: h["tensors"][0].update(unit_words=7),
    lambda h: h["tensors"][0].update(unit_words=2**40),
    lambda h: h["tensors"][0].update(period=3),
    lambda h: h["tensors"][0].update(layout="diagonal"),
    lambda h: h["tensors"][0].update(payload_bits=h["tensors"][0]["payload_bits"] + 64),
    lambda h: h["tensors"][0].update(payload_bits=10**30),
    lambda h: h["tensors"][0].update(index_block=3),
    lambda h: h["tensors"][0].update(index_rel_bits=8),
    lambda h: h["tensors"][0]["sections"]["payload"].__setitem__(0, 1),
    lambda h: h["tensors"][0]["sections"]["payload"].__setitem__(1, 10**12),
    lambda h: h["tensors"][0]["sections"]["kinds"].__setitem__(0, h["tensors"][0]["sections"]["payload"][0]),
    lambda h: h["tensors"][0]["sections"].pop("kinds"),
    lambda h: h["tensors"][0].update(extra=1),
    lambda h: h["tensors"].append(dict(h["tensors"][0])),
    lambda h: h.update(metadata={"a": 1}),
    lambda h: h.update(tensors={}),
])
def test_lying_headers_are_rejected(lie):
    _, ct = sample_tensor()
    with pytest.raises(ibp.FormatError):
        bad = rebuild(ct.to_bytes(), lie)
        ibp.decompress(ibp.CompressedTensor.from_bytes(bad, verify=False))


def rotated_tensor(layout="packed"):
    """A tensor whose model rotates its words (format version 3): values
    that agree on their low bit and their high bits, 0, 2 and 6."""
    x = np.random.default_rng(5).choice(np.array([0, 2, 6], np.int16), (50, 30))
    ct = ibp.compress(x, layout=layout)
    assert ct.model.rotate == 1
    return x, ct


def _version(blob):
    return container.PREAMBLE.unpack_from(blob, 0)[1]


@pytest.mark.parametrize("layout", ["packed", "slotted"])
def test_a_rotated_model_is_written_as_version_3_and_only_then(layout, tmp_path):
    x, ct = rotated_tensor(layout)
    blob = ct.to_bytes()
    assert _version(blob) == 3 and _version(sample_tensor(layout)[1].to_bytes()) == 2
    back = ibp.CompressedTensor.from_bytes(blob)
    assert back.model == ct.model and back.model.rotate == 1
    assert np.array_equal(ibp.decompress(back), x)
    assert np.array_equal(ibp.decompress(back, index=[7, -1, 7, 0]), x[[7, -1, 7, 0]])
    ibp.save({"rotated": ct, "plain": sample_tensor(layout)[1]}, tmp_path / "both.ibp")
    assert _version((tmp_path / "both.ibp").read_bytes()) == 3
    assert np.array_equal(ibp.decompress(ibp.load(tmp_path / "both.ibp")["rotated"]), x)
    assert np.array_equal(ibp.decompress(ibp.load(tmp_path / "both.ibp", mmap=True)["rotated"]), x)


def gathered_tensor(layout="packed"):
    """A tensor whose model gathers bits (format version 4): 4, 13 and 37
    share bits in three places."""
    x = np.random.default_rng(6).choice(np.array([4, 13, 37], np.int16), (50, 30))
    ct = ibp.compress(x, layout=layout)
    assert ct.model.gather and not ct.model.rotate
    return x, ct


@pytest.mark.parametrize("layout", ["packed", "slotted"])
def test_a_gathered_model_is_written_as_version_4_and_only_then(layout, tmp_path):
    x, ct = gathered_tensor(layout)
    blob = ct.to_bytes()
    assert _version(blob) == 4 and _version(rotated_tensor(layout)[1].to_bytes()) == 3
    assert json.loads(blob[24:24 + container.PREAMBLE.unpack_from(blob, 0)[2]])["tensors"][0]["gather"] == \
        ct.model.gather
    back = ibp.CompressedTensor.from_bytes(blob)
    assert back.model == ct.model
    assert np.array_equal(ibp.decompress(back), x)
    assert np.array_equal(ibp.decompress(back, index=[7, -1, 7, 0]), x[[7, -1, 7, 0]])
    ibp.save({"gathered": ct, "rotated": rotated_tensor(layout)[1]}, tmp_path / "both.ibp")
    assert _version((tmp_path / "both.ibp").read_bytes()) == 4
    loaded = ibp.load(tmp_path / "both.ibp", mmap=True)
    assert np.array_equal(ibp.decompress(loaded["gathered"]), x) and loaded["rotated"].model.rotate == 1


@pytest.mark.parametrize("make,lie", [
    (rotated_tensor, lambda h: h["tensors"][0].update(rotate=0)),      # written only when it rotates
    (rotated_tensor, lambda h: h["tensors"][0].update(rotate=16)),     # 16-bit words rotate by 1..15
    (rotated_tensor, lambda h: h["tensors"][0].update(rotate=-1)),
    (rotated_tensor, lambda h: h["tensors"][0].update(rotate=True)),
    (rotated_tensor, lambda h: h["tensors"][0].update(rotate="1")),
    (gathered_tensor, lambda h: h["tensors"][0].update(gather=0)),     # written only when it gathers
    (gathered_tensor, lambda h: h["tensors"][0].update(gather=1 << 16)),   # a 16-bit mask
    (gathered_tensor, lambda h: h["tensors"][0].update(gather=-1)),
    (gathered_tensor, lambda h: h["tensors"][0].update(gather=True)),
    (gathered_tensor, lambda h: h["tensors"][0].update(gather="0x1")),
    (gathered_tensor, lambda h: h["tensors"][0].update(rotate=1)),     # one transform, not both
])
def test_lying_transforms_are_rejected(make, lie):
    _, ct = make()
    with pytest.raises(ibp.FormatError):
        ibp.CompressedTensor.from_bytes(rebuild(ct.to_bytes(), lie))


@pytest.mark.parametrize("make,older", [(rotated_tensor, 2), (gathered_tensor, 3)])
def test_a_transform_in_an_older_version_is_rejected(make, older):
    blob = make()[1].to_bytes()
    with pytest.raises(ibp.FormatError, match="keys"):
        ibp.CompressedTensor.from_bytes(blob[:8] + struct.pack("<I", older) + blob[12:])


def test_the_checksum_is_zlibs_crc32():
    from ibp.checksum import crc32
    rng = np.random.default_rng(9)
    for n in (0, 1, 7, 64, 4097, 1 << 20):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        assert crc32(memoryview(data).cast("B")) == zlib.crc32(data.tobytes()) == crc32(data.tobytes())
        assert crc32(memoryview(data)[1:]) == zlib.crc32(data[1:].tobytes())


def test_preamble_checks():
    _, ct = sample_tensor()
    blob = ct.to_bytes()
    for bad in (b"NOTIBP00" + blob[8:], blob[:8] + struct.pack("<I", 5) + blob[12:],
                blob[:12] + struct.pack("<I", 1 << 30) + blob[16:], blob[:16] + b"\0\0\0\0" + blob[20:]):
        with pytest.raises(ibp.FormatError):
            ibp.CompressedTensor.from_bytes(bad)
    with pytest.raises(TypeError):
        ibp.CompressedTensor.from_bytes("not bytes")


def with_version(blob, version):
    magic, _, hlen, hcrc, reserved = container.PREAMBLE.unpack_from(blob, 0)
    return container.PREAMBLE.pack(magic, version, hlen, hcrc, reserved) + blob[container.PREAMBLE.size:]


def test_version_1_files_are_read():
    x, ct = sample_tensor()
    assert ct.index[1] in (16, 32)
    assert np.array_equal(ibp.decompress(ibp.CompressedTensor.from_bytes(with_version(ct.to_bytes(), 1))), x)


@pytest.mark.parametrize("make", [
    lambda rng: rng.integers(0, 2**32, (300, 64), dtype=np.uint64).astype(np.uint32),  # every unit raw
    lambda rng: np.full((300, 64), 7, np.int32),                                         # every word matches
])
def test_equal_size_units_take_the_uniform_index(make):
    x = make(np.random.default_rng(3))
    ct = ibp.compress(x)
    assert ct.index[1] == 0 and ct.index[2].size == ct.index[3].size == 0
    blob = ct.to_bytes()
    assert len(blob) < max(x.nbytes, 4096) + 2048  # a header, the model, the kinds: no row index
    back = ibp.CompressedTensor.from_bytes(blob)
    assert np.array_equal(ibp.decompress(back), x)
    assert np.array_equal(ibp.decompress(back, index=[299, 0, 17, 17]), x[[299, 0, 17, 17]])
    lies = [lambda h: h["tensors"][0].update(payload_bits=h["tensors"][0]["payload_bits"] + 1),
            lambda h: h["tensors"][0].update(index_block=2),
            lambda h: h["tensors"][0]["sections"]["index_rel"].__setitem__(1, 8)]
    for lie in lies:
        with pytest.raises(ibp.FormatError):
            ibp.decompress(ibp.CompressedTensor.from_bytes(rebuild(blob, lie), verify=False))
    with pytest.raises(ibp.FormatError, match="index_rel_bits"):
        ibp.CompressedTensor.from_bytes(with_version(blob, 1))


@pytest.mark.parametrize("kind", [2, 3])
def test_lying_unit_headers_with_valid_checksums(kind):
    """A sparse count or bitmap bit that disagrees with the row index is
    caught at decode time, even though every checksum is valid."""
    from ibp.decode import unit_spans
    x, ct = sample_tensor()
    units = np.flatnonzero(ct.unit_kinds() == kind)
    start = int(unit_spans(ct, units[:1])[0][0])
    forged = ct._replace(payload=ct.payload.copy())
    forged.payload[start // 64] ^= np.uint64(1 << (start % 64))
    with pytest.raises(ibp.FormatError, match=f"unit {units[0]}"):
        ibp.decompress(ibp.CompressedTensor.from_bytes(forged.to_bytes()))
    with pytest.raises(ibp.FormatError):
        ibp.decompress(forged, index=[units[0] * ct.geometry.unit_words // ct.geometry.row_words])


def test_save_load_single_and_checkpoint(tmp_path):
    x, ct = sample_tensor()
    ibp.save(ct, tmp_path / "one.ibp")
    one = ibp.load(tmp_path / "one.ibp")
    assert isinstance(one, ibp.CompressedTensor)
    assert np.array_equal(ibp.decompress(one), x)
    rng = np.random.default_rng(0)
    ckpt = {"w": rng.standard_normal((30, 20)).astype(np.float32), "b": np.arange(7, dtype=np.int64),
            "scalar": np.float64(3.5) * np.ones(()), "c": ct}
    ibp.save(ckpt, tmp_path / "ckpt.ibp", metadata={"source": "test"})
    for mmap in (False, True):
        back = ibp.load(tmp_path / "ckpt.ibp", mmap=mmap)
        assert sorted(back) == sorted(ckpt)
        for k, v in ckpt.items():
            want = x if k == "c" else v
            got = ibp.decompress(back[k])
            assert got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()


def test_save_rejects_misuse(tmp_path):
    with pytest.raises(TypeError):
        ibp.save([1, 2], tmp_path / "x.ibp")
    with pytest.raises(TypeError):
        ibp.save({1: np.zeros(3)}, tmp_path / "x.ibp")
    with pytest.raises(TypeError):
        ibp.save({"a": np.zeros(3)}, tmp_path / "x.ibp", metadata={"k": 1})
    assert not (tmp_path / "x.ibp").exists()


@pytest.mark.parametrize("shape", [(0,), (0, 7), (0, 2, 3), (5, 0), ()])
def test_empty_and_scalar_tensors_survive_bytes(shape):
    x = np.ones(shape, np.float32)
    back = ibp.CompressedTensor.from_bytes(ibp.compress(x).to_bytes())
    assert ibp.decompress(back).shape == shape
    assert ibp.decompress(back).tobytes() == x.tobytes()


def test_metadata_is_read_from_the_header(tmp_path):
    ibp.save({"a": np.zeros(3)}, tmp_path / "m.ibp", metadata={"format": "pt", "note": "é"})
    assert ibp.load_metadata(tmp_path / "m.ibp") == {"format": "pt", "note": "é"}
    (tmp_path / "bad.ibp").write_bytes(b"\x89IBP\r\n\x1a\n" + b"\0" * 4)
    with pytest.raises(ibp.FormatError):
        ibp.load_metadata(tmp_path / "bad.ibp")


def test_header_bound_counts_what_the_widest_entries_would_write():
    """header_bound counts bytes instead of writing the entries: it must
    equal the JSON of every tensor's widest entry (packed, gathered, every
    number as wide as the bound) and hold a real header of the same tensors."""
    rng = np.random.default_rng(0)
    names = ["w", "layer.0.attn", 'quo"te\\', "naïve ünïcode", "\n\t", "", "emoji 🚀"]
    tensors = [(names[i % len(names)] + str(i), ["float32", "bfloat16", "int8", "complex128"][i % 4],
                tuple(int(s) for s in rng.integers(0, 10 ** int(rng.integers(1, 9)), int(rng.integers(0, 5)))),
                ["numpy", "torch"][i % 2]) for i in range(40)]
    for metadata in (None, {}, {"k": "v", "ü": "\"x\""}):
        for largest in (0, 1 << 40, 10 ** 30):
            n = max(largest, 0xFFFFFFFF)
            entries = [container._entry(name, dtype, shape, fw, n, n, "packed", n, 0, max(n, (1 << 64) - 1),
                                        {k: [n, n, n] for k in container.SECTIONS["packed"]}, (n, n, n))
                       for name, dtype, shape, fw in tensors]
            written = json.dumps({"metadata": dict(metadata or {}), "tensors": entries}, separators=(",", ":"))
            assert container.header_bound(tensors, metadata, largest) == len(written.encode())
            assert container.header_bound(tensors[:1], metadata, largest) < len(written.encode())
            assert container.header_bound([], metadata, largest) == len(json.dumps(
                {"metadata": dict(metadata or {}), "tensors": []}, separators=(",", ":")))
    x = {name: np.zeros(shape, np.float32) for name, _, shape, _ in tensors if math.prod(shape) < 10 ** 5}
    buf = io.BytesIO()
    ibp.save(x, buf)
    blob = buf.getvalue()
    assert len(x) > 3
    hlen = container.PREAMBLE.unpack_from(blob, 0)[2]
    assert hlen <= container.header_bound([(k, "float32", v.shape, "numpy") for k, v in x.items()], None, 8 * len(blob))


def test_tensors_of_one_model_share_it_once_read(tmp_path):
    """A checkpoint's layers mostly share their roles' models: every reader
    checks a model once and hands the same object to each tensor that has
    its bytes, and a tensor with other model bytes gets its own."""
    from ibp import lazy, stream
    rng = np.random.default_rng(0)
    x = [(rng.standard_normal((50, 24)) * 0.01).astype(np.float32) for _ in range(3)]
    model = ibp.analyze(x[0])
    other = ibp.analyze(x[2].astype(np.float64).astype(np.float32) + 7)
    assert other != model
    cts = {"a": ibp.compress(x[0], model=model), "b": ibp.compress(x[1], model=model),
           "c": ibp.compress(x[2], model=other)}
    path = tmp_path / "m.ibp"
    ibp.save(cts, path)
    with stream.Reader(path) as r:
        streamed = {name: r.tensor(name) for name in r}
    with lazy.open(path) as f:
        mapped = {name: f.get_compressed(name) for name in f.keys()}
        for loaded in (ibp.load(path), ibp.load(path, mmap=True), streamed, mapped):
            assert loaded["a"].model is loaded["b"].model and loaded["a"].model == model
            assert loaded["c"].model is not loaded["a"].model and loaded["c"].model == other
            for name, want in zip("abc", x):
                assert np.array_equal(ibp.decompress(loaded[name]), want)
