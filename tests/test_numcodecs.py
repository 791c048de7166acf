"""The numcodecs codec, alone and as a zarr (v2 format) compressor, on real data."""
import numpy as np
import pytest

numcodecs = pytest.importorskip("numcodecs")

import ibp  # noqa: E402
from ibp import datasets  # noqa: E402
from ibp.numcodecs_codec import IBP  # noqa: E402


@pytest.fixture(scope="module")
def cora():
    return datasets.load("cora")["features"]


def test_codec_round_trips_and_is_found_by_its_id(cora):
    codec = numcodecs.get_codec({"id": "ibp"})
    assert isinstance(codec, IBP) and codec.get_config() == {"id": "ibp", "word_bits": None}
    assert numcodecs.get_codec(IBP(word_bits=32).get_config()).word_bits == 32
    chunk = cora[:500]
    encoded = codec.encode(chunk)
    assert len(encoded) * 20 < chunk.nbytes
    back = codec.decode(encoded)
    assert back.dtype == chunk.dtype and back.shape == chunk.shape and back.tobytes() == chunk.tobytes()
    out = np.empty(chunk.nbytes, np.uint8)
    codec.decode(encoded, out=out)
    assert out.tobytes() == chunk.tobytes()
    with pytest.raises(ibp.FormatError):
        codec.decode(encoded[:-5])
    with pytest.raises(ValueError):
        IBP(word_bits=12)


def test_zarr_v2_array_with_the_ibp_compressor(tmp_path, cora):
    zarr = pytest.importorskip("zarr")
    path = str(tmp_path / "cora.zarr")
    z = zarr.create_array(store=path, shape=cora.shape, chunks=(512, 1433), dtype=cora.dtype,
                          compressors=IBP(), zarr_format=2)
    z[:] = cora
    again = zarr.open_array(path, mode="r")
    assert again[:].tobytes() == cora.tobytes()
    assert again[100:700:3].tobytes() == cora[100:700:3].tobytes()
    stored = sum(f.stat().st_size for f in (tmp_path / "cora.zarr").rglob("*") if f.is_file())
    assert stored * 20 < cora.nbytes


def test_registered_through_the_entry_point_without_importing_ibp():
    import subprocess
    import sys
    code = ("import sys, numcodecs\n"
            "codec = numcodecs.get_codec({'id': 'ibp'})\n"
            "assert type(codec).__module__ == 'ibp.numcodecs_codec', type(codec)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_byte_order_and_memory_order_are_kept(cora):
    """numcodecs hands a codec a chunk's bytes in memory order and reads
    the decoded bytes the same way: a big-endian or Fortran-ordered chunk
    must come back with those very bytes, not its values in another layout."""
    codec = IBP()
    for chunk in (cora[:300, :200].astype(">f4"), np.asfortranarray(cora[:300, :200]),
                  np.asfortranarray(cora[:64, :50].astype(">f8")), np.asfortranarray(cora[:40, :30].reshape(40, 5, 6))):
        back = codec.decode(codec.encode(chunk))
        assert back.dtype == chunk.dtype and back.shape == chunk.shape and np.array_equal(back, chunk)
        assert back.tobytes(order="A") == chunk.tobytes(order="A")
        out = np.empty(chunk.nbytes, np.uint8)
        codec.decode(codec.encode(chunk), out=out)
        assert out.tobytes() == chunk.tobytes(order="A")
    assert len(codec.encode(cora[:300, :200].astype(">f4"))) * 20 < 300 * 200 * 4  # compressed by value


@pytest.mark.parametrize("order", ["C", "F"])
def test_zarr_v2_chunks_of_odd_shapes_dtypes_and_orders(tmp_path, cora, order):
    zarr = pytest.importorskip("zarr")
    rows = cora[:257, :131]
    arrays = {"f4": rows, "be_f4": rows.astype(">f4"), "f2": rows.astype(np.float16), "i1": (rows * 7).astype(np.int8),
              "bool": rows > 0, "u8": rows.view(np.uint32).astype(np.uint64) << 7, "c8": (rows + 1j * rows[::-1]).astype(np.complex64),
              "be_i4": rows.view(np.int32).astype(">i4"), "3d": rows[:256, :130].reshape(256, 10, 13)}
    for name, a in arrays.items():
        chunks = (37, 19) if a.ndim == 2 else (17, 3, 5)   # edge chunks everywhere
        path = str(tmp_path / f"{name}.zarr")
        z = zarr.create_array(store=path, shape=a.shape, chunks=chunks, dtype=a.dtype, compressors=IBP(),
                              zarr_format=2, order=order)
        z[:] = a
        again = zarr.open_array(path, mode="r")[:]
        assert again.dtype == a.dtype and np.ascontiguousarray(again).tobytes() == np.ascontiguousarray(a).tobytes(), name


def test_numcodecs_own_checks_pass(cora):
    """numcodecs' own codec checks: any buffer in (bytes, bytearray,
    array.array, not only arrays), any buffer out (into an array or a
    bytearray), and object buffers refused both ways."""
    common = pytest.importorskip("numcodecs.tests.common")
    codec = IBP()
    rows = cora[:200, :300]
    for a in (rows, rows.astype(np.float16), rows.reshape(200, 20, 15), np.asfortranarray(rows),
              (rows * 3).astype(">i2"), rows > 0, rows.view(np.int64)[:, :7].view("M8[ns]"),
              rows.view(np.uint32)[:4, :12].view("m8[s]"), np.zeros((0, 3), np.float32), np.array(2.5)):
        common.check_encode_decode(a, codec)
    common.check_config(codec)
    common.check_err_decode_object_buffer(codec)
    common.check_err_encode_object_buffer(codec)
    assert len(codec.encode(rows.tobytes())) * 5 < rows.nbytes        # raw bytes still compress
    assert len(codec.encode(rows.view("m8[s]"))) * 5 < rows.nbytes    # so does a dtype ibp has not


# -- zarr's v3 format: ibp as the array-to-bytes codec ------------------------------------
def test_zarr_v3_array_with_the_ibp_serializer(tmp_path, cora):
    zarr = pytest.importorskip("zarr")
    from ibp.zarr_codec import IBPCodec
    path = str(tmp_path / "cora.zarr")
    z = zarr.create_array(store=path, shape=cora.shape, chunks=(512, 1433), dtype=cora.dtype,
                          serializer=IBPCodec(), compressors=None, zarr_format=3)
    z[:] = cora
    again = zarr.open_array(path, mode="r")
    assert again.metadata.zarr_format == 3 and isinstance(again.metadata.codecs[0], IBPCodec)
    assert again[:].tobytes() == cora.tobytes()
    assert again[100:700:3].tobytes() == cora[100:700:3].tobytes()
    stored = sum(f.stat().st_size for f in (tmp_path / "cora.zarr" / "c").rglob("*") if f.is_file())
    assert stored * 20 < cora.nbytes
    assert IBPCodec.from_dict(IBPCodec(word_bits=16).to_dict()) == IBPCodec(word_bits=16)
    with pytest.raises(ValueError):
        IBPCodec(word_bits=12)


def test_zarr_v3_opens_through_the_entry_point_without_importing_ibp(tmp_path, cora):
    zarr = pytest.importorskip("zarr")
    import subprocess
    import sys
    from ibp.zarr_codec import IBPCodec
    path = str(tmp_path / "a.zarr")
    z = zarr.create_array(store=path, shape=(300, 200), chunks=(64, 64), dtype="f4", serializer=IBPCodec())
    z[:] = cora[:300, :200]
    np.save(tmp_path / "want.npy", cora[:300, :200])
    code = ("import sys, zarr, numpy as np\n"
            f"z = zarr.open_array({path!r}, mode='r')\n"
            "assert type(z.metadata.codecs[0]).__module__ == 'ibp.zarr_codec', z.metadata.codecs\n"
            f"assert np.array_equal(z[:], np.load({str(tmp_path / 'want.npy')!r}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_zarr_v3_chunks_of_odd_shapes_and_dtypes(tmp_path, cora):
    zarr = pytest.importorskip("zarr")
    from ibp.zarr_codec import IBPCodec
    rows = cora[:257, :131]
    arrays = {"f4": rows, "be_f4": rows.astype(">f4"), "f2": rows.astype(np.float16), "i1": (rows * 7).astype(np.int8),
              "bool": rows > 0, "u8": rows.view(np.uint32).astype(np.uint64) << 7,
              "3d": rows[:256, :130].reshape(256, 10, 13)}
    for name, a in arrays.items():
        chunks = (37, 19) if a.ndim == 2 else (17, 3, 5)   # edge chunks everywhere
        path = str(tmp_path / f"{name}.zarr")
        z = zarr.create_array(store=path, shape=a.shape, chunks=chunks, dtype=a.dtype, fill_value=0,
                              serializer=IBPCodec(word_bits=8 if name == "f4" else None))
        z[:] = a
        again = zarr.open_array(path, mode="r")[:]   # v3 arrays read back native-endian, as with its bytes codec
        assert again.dtype == a.dtype.newbyteorder("=") and np.array_equal(again, a), name


def test_zarr_v3_chunk_of_another_shape_is_a_format_error(tmp_path, cora):
    zarr = pytest.importorskip("zarr")
    from ibp.zarr_codec import IBPCodec
    for name, chunks in (("a", (64, 64)), ("b", (32, 64))):
        z = zarr.create_array(store=str(tmp_path / name), shape=(128, 128), chunks=chunks, dtype="f4",
                              serializer=IBPCodec(), compressors=None)
        z[:] = cora[:128, :128]
    (tmp_path / "b" / "c" / "0" / "0").write_bytes((tmp_path / "a" / "c" / "0" / "0").read_bytes())
    with pytest.raises(ibp.FormatError, match="chunks are"):
        zarr.open_array(str(tmp_path / "b"), mode="r")[:]


def test_a_chunk_comes_back_with_its_shape_and_dtype_whatever_they_are():
    # a 0-d chunk came back 1-d, a structured dtype as plain |V12 (bytes right, fields lost)
    codec = IBP()
    pair = np.dtype([("a", "<i4"), ("b", "<f8")])
    nested = np.dtype([("a", "<i4", (2,)), ("b", [("c", "u1")])])
    for a in (np.array(1.5), np.array(7, np.int64), np.zeros((), pair), np.array([(1, 2.0), (3, -0.0)], pair),
              np.zeros((3, 2), nested), np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
              np.zeros(5, np.dtype([("a", "<i4"), ("b", "<f8")], align=True)),
              np.zeros(2, np.dtype({"names": ["a", "b"], "formats": ["<i4", ("<f8", (2,))], "titles": ["A", None]}))):
        back = codec.decode(codec.encode(a))
        assert back.shape == a.shape and back.dtype == a.dtype and back.tobytes() == a.tobytes(), a.dtype
