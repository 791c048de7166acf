"""Misuse of the public API gets clear exceptions; nothing is mutated."""
import numpy as np
import pytest

import ibp


@pytest.fixture
def ct():
    return ibp.compress(np.arange(60, dtype=np.float32).reshape(12, 5))


def test_compress_rejects_bad_arguments():
    x = np.zeros((4, 4), np.float32)
    with pytest.raises(TypeError):
        ibp.compress([1, 2, 3])
    with pytest.raises(TypeError):
        ibp.compress(np.array(["a", "b"]))
    with pytest.raises(TypeError):
        ibp.compress(np.zeros(3, dtype=[("a", "i4")]))
    with pytest.raises(ValueError):
        ibp.compress(x, layout="diagonal")
    with pytest.raises(ValueError):
        ibp.compress(x, word_bits=12)
    with pytest.raises(ValueError):
        ibp.compress(np.zeros((4, 3), np.uint8), word_bits=16)
    with pytest.raises(TypeError):
        ibp.compress(x, model="model")
    with pytest.raises(ValueError):
        ibp.compress(x, model=ibp.analyze(x), word_bits=8)
    with pytest.raises(ValueError):
        ibp.compress(np.zeros((4, 6), np.float32), model=ibp.Model.empty(32, period=5))


def test_decompress_rejects_bad_arguments(ct):
    with pytest.raises(TypeError):
        ibp.decompress(b"bytes")
    with pytest.raises(IndexError):
        ibp.decompress(ct, index=[12])
    with pytest.raises(IndexError):
        ibp.decompress(ct, index=[-13])
    with pytest.raises(IndexError):
        ibp.decompress(ct, index=np.array([2**63 + 5], np.uint64))
    with pytest.raises(TypeError):
        ibp.decompress(ct, index=[1.0])
    with pytest.raises(TypeError):
        ibp.decompress(ct, index=np.ones(12, bool))
    with pytest.raises(ValueError):
        ibp.decompress(ct, out=np.empty((12, 5), np.float64))
    with pytest.raises(ValueError):
        ibp.decompress(ct, out=np.empty((12, 6), np.float32))
    with pytest.raises(ValueError):
        ibp.decompress(ct, out=np.empty((5, 12), np.float32).T)
    with pytest.raises(TypeError):
        ibp.decompress(ct, out=[0] * 60)
    with pytest.raises(IndexError):
        ibp.decompress(ibp.compress(np.float32(1.0) * np.ones(())), index=[0])
    with pytest.raises(ValueError, match="GPU paths"):
        ibp.decompress(ct, path="stream")                # a GPU choice, on the CPU


def test_scalar_index_drops_the_row_axis(ct):
    x = np.arange(60, dtype=np.float32).reshape(12, 5)
    assert np.array_equal(ibp.decompress(ct, index=3), x[3])
    assert np.array_equal(ibp.decompress(ct, index=np.int8(-1)), x[-1])
    assert ibp.decompress(ct, index=[]).shape == (0, 5)


def test_properties(ct):
    assert ct.shape == (12, 5) and ct.nrows == 12 and ct.dtype == np.float32
    assert ct.raw_nbytes == 240
    assert ct.ratio == pytest.approx(240 / ct.nbytes)
    assert "CompressedTensor" in repr(ct) and "Model" in repr(ct.model)


def test_model_validation():
    with pytest.raises(ValueError):
        ibp.Model(12, np.zeros((2, 1)), np.zeros((2, 1)), np.zeros((2, 1)))
    with pytest.raises(ValueError):
        ibp.Model(8, np.zeros((2, 1)), np.full((2, 1), 9), np.zeros((2, 1)))
    with pytest.raises(ValueError):
        ibp.Model(8, np.zeros((2, 1)), np.full((2, 1), 4), np.full((2, 1), 16))
    with pytest.raises(ValueError):
        ibp.Model(8, np.ones((2, 1)), np.ones((2, 1)), np.zeros((2, 1)))


def test_compress_bytes_checks_the_bytes_against_the_shape():
    from ibp.api import compress_bytes
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    data = x.reshape(-1).view(np.uint8)
    assert np.array_equal(ibp.decompress(compress_bytes(data, "float32", (3, 4), "numpy")), x)
    for bad in (data[:-4], np.zeros(48, np.int8), data.reshape(6, 8), data[::2]):
        with pytest.raises(ValueError, match="bytes"):
            compress_bytes(bad, "float32", (3, 4), "numpy")
    with pytest.raises(TypeError, match="dtype"):
        compress_bytes(data, "float31", (3, 4), "numpy")


def test_model_pickles():
    import pickle
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    m = ibp.analyze(x)
    assert pickle.loads(pickle.dumps(m)) == m
    rotated = ibp.analyze(np.random.default_rng(0).choice(np.array([0, 2, 6], np.int32), (64, 8)))
    assert rotated.rotate == 1 and pickle.loads(pickle.dumps(rotated)) == rotated and rotated != m
    with pytest.raises(ValueError):
        ibp.Model(8, np.zeros((2, 1)), np.zeros((2, 1)), np.zeros((2, 1)), rotate=8)
    assert ibp.Model(8, np.zeros((2, 1)), np.zeros((2, 1)), np.zeros((2, 1)), rotate=np.int64(3)).rotate == 3
    with pytest.raises(AttributeError):
        rotated.rotate = 0   # a model is immutable: tensors that share it decode by it
    gathered = ibp.analyze(np.random.default_rng(0).choice(np.array([4, 13, 37], np.int32), (64, 8)))
    assert gathered.gather and pickle.loads(pickle.dumps(gathered)) == gathered and gathered != rotated
    z = np.zeros((2, 1))
    assert ibp.Model(8, z, z, z, gather=0xF0).gather == 0xF0
    for bad in (dict(gather=256), dict(gather=-1), dict(gather=1.5), dict(rotate=1, gather=2)):
        with pytest.raises(ValueError):
            ibp.Model(8, z, z, z, **bad)


def test_a_rotated_tensor_pickles_with_its_rotation():
    import pickle
    x = np.random.default_rng(2).choice(np.array([-9, -5, -1], np.int16), (40, 24))
    ct = ibp.compress(x)
    back = pickle.loads(pickle.dumps(ct))
    assert back.model.rotate == ct.model.rotate == 2 and np.array_equal(ibp.decompress(back), x)


@pytest.mark.parametrize("layout", ["packed", "slotted"])
def test_torch_save_of_a_compressed_tensor_costs_its_compressed_size(tmp_path, layout):
    """torch.save pickles with protocol 2, which spells numpy's bytes as
    latin-1 text (half again as long): the arrays go as torch storages."""
    torch = pytest.importorskip("torch")
    import io
    import pickle
    from ibp import datasets
    x = datasets.load("glove-50d")["glove.6B.50d"][:20000] if "glove-50d" in datasets.available() else cora()
    ct = ibp.compress(x, layout=layout)
    ibp.save(ct, tmp_path / "t.ibp")
    mapped = ibp.load(tmp_path / "t.ibp", mmap=True)
    for obj in (ct, mapped):
        buf = io.BytesIO()
        torch.save({"table": obj}, buf)
        assert buf.tell() < ct.nbytes * 1.01 + 4096
        buf.seek(0)
        back = torch.load(buf, weights_only=False)["table"]
        assert ibp.decompress(back).tobytes() == x.tobytes() and back.model == ct.model
        for protocol in (2, pickle.HIGHEST_PROTOCOL):   # plain pickle's protocol 2 spells any bytes as text
            data = pickle.dumps(obj, protocol=protocol)
            assert protocol == 2 or len(data) < ct.nbytes * 1.01 + 4096
            assert ibp.decompress(pickle.loads(data), index=[5, -1]).tobytes() == x[[5, -1]].tobytes()
    if layout == "slotted":
        back.update_rows([0], x[[1]])       # what comes back is an ordinary tensor
        assert ibp.decompress(back, index=0).tobytes() == x[1].tobytes()


def test_a_compressed_tensor_is_truthy():
    for x in (np.array(3.0), np.zeros((0, 4), np.float32), cora()[:3]):
        ct = ibp.compress(x)
        assert bool(ct) and (ct or None) is ct          # an object, not a truth value (len 0, or no len)


def test_compress_on_gpu_tensor_is_refused():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    with pytest.raises(ValueError):
        ibp.compress(torch.zeros(3, device="cuda"))


# -- save / load with file objects ---------------------------------------------
def cora():
    from ibp import datasets
    return datasets.load("cora")["features"]


def test_save_and_load_file_objects_one_after_another():
    import io
    x = cora()
    buf = io.BytesIO()
    ibp.save(ibp.compress(x), buf)
    ibp.save({"a": x[:100], "b": x[100:103]}, buf, metadata={"k": "v"})
    end = buf.tell()
    buf.write(b"what follows is not ibp's")
    buf.seek(0)
    one, two = ibp.load(buf), ibp.load(buf)
    assert buf.tell() == end                                  # each load reads exactly its file
    assert ibp.decompress(one).tobytes() == x.tobytes()
    assert list(two) == ["a", "b"] and ibp.decompress(two["b"]).tobytes() == x[100:103].tobytes()


def test_file_objects_match_paths_and_map(tmp_path):
    x = cora()
    ibp.save({"x": x}, tmp_path / "p.ibp")
    with open(tmp_path / "f.ibp", "wb") as f:
        ibp.save({"x": x}, f)
    assert (tmp_path / "p.ibp").read_bytes() == (tmp_path / "f.ibp").read_bytes()
    with open(tmp_path / "two.ibp", "wb") as f:
        ibp.save({"x": x[:7]}, f)
        ibp.save({"x": x}, f)
    with open(tmp_path / "two.ibp", "rb") as f:
        first = ibp.load(f, mmap=True)["x"]
        second = ibp.load(f, mmap=True)["x"]
        assert f.read() == b""
    assert isinstance(first.payload.base, memoryview)        # a view of the map, not a copy
    assert ibp.decompress(first).tobytes() == x[:7].tobytes()
    assert ibp.decompress(second, index=[-1]).tobytes() == x[[-1]].tobytes()


def test_file_object_misuse(tmp_path):
    import io
    x = np.arange(60, dtype=np.float32).reshape(12, 5)
    data = ibp.compress(x).to_bytes()
    with pytest.raises(ValueError, match="mmap=True maps a path or a file opened with open"):
        ibp.load(io.BytesIO(data), mmap=True)
    with pytest.raises(ibp.FormatError, match="truncated"):
        ibp.load(io.BytesIO(data[:-8]))
    with pytest.raises(ibp.FormatError, match="bad magic"):
        ibp.load(io.BytesIO(b"x" * 100))
    (tmp_path / "t.ibp").write_bytes(data)
    with open(tmp_path / "t.ibp", encoding="latin-1") as f, pytest.raises(TypeError, match="binary mode"):
        ibp.load(f)
    with pytest.raises(TypeError, match="path or a binary file object"):
        ibp.save(ibp.compress(x), 3)
    with pytest.raises(TypeError, match="path or a binary file object"):
        ibp.load(3)
    with open(tmp_path / "t.ibp", "w") as f, pytest.raises(TypeError):
        ibp.save(ibp.compress(x), f)                        # a text file cannot take bytes


def test_save_errors_name_the_path_not_the_temporary_file(tmp_path):
    ct = ibp.compress(cora()[:10])
    for path, error in ((tmp_path / "missing" / "x.ibp", FileNotFoundError), (tmp_path, IsADirectoryError)):
        with pytest.raises(error) as e:
            ibp.save(ct, path)
        assert e.value.filename == str(path) and ".tmp" not in str(e.value), e.value
    assert sorted(p.name for p in tmp_path.iterdir()) == []     # and nothing is left behind


def test_text_files_pipes_and_bytes_are_refused_with_the_fix(tmp_path):
    import os
    import threading
    ct = ibp.compress(cora()[:300])
    data = ct.to_bytes()
    (tmp_path / "t.ibp").write_bytes(data)
    with open(tmp_path / "t.ibp") as f, pytest.raises(TypeError, match="binary mode"):
        ibp.load(f)                                           # utf-8 text mode: the bytes do not even decode
    with open(tmp_path / "u.ibp", "w") as f, pytest.raises(TypeError, match="binary mode"):
        ibp.save(ct, f)
    with pytest.raises(TypeError, match="io.BytesIO"):
        ibp.load(data)                                        # an ibp file's bytes, not a path
    r, w = os.pipe()
    feeder = threading.Thread(target=lambda: (os.write(w, data), os.close(w)))
    feeder.start()
    with os.fdopen(r, "rb") as pipe:
        with pytest.raises(ValueError, match="pass mmap=False"):
            ibp.load(pipe, mmap=True)
        assert ibp.decompress(ibp.load(pipe)).tobytes() == cora()[:300].tobytes()   # nothing was consumed
    feeder.join()


def test_a_stream_that_takes_part_of_each_write_gets_all_of_it():
    import io

    class Trickle(io.RawIOBase):
        def __init__(self):
            self.data = bytearray()

        def writable(self):
            return True

        def write(self, b):
            self.data += bytes(b[:7])
            return min(len(b), 7)

    x = cora()[:50]
    out = Trickle()
    ibp.save({"x": x}, out)
    whole = io.BytesIO()
    ibp.save({"x": x}, whole)
    assert bytes(out.data) == whole.getvalue()


# -- type hints ------------------------------------------------------------------
def public_functions():
    """Every function and method of ibp's exports a user calls, by name."""
    import inspect
    for name in ibp.__all__:
        obj = getattr(ibp, name)
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") and attr not in ("__init__", "__len__", "__enter__", "__exit__"):
                    continue
                fn = member.fget if isinstance(member, property) else getattr(member, "func", None) \
                    or getattr(member, "__func__", member)
                if inspect.isfunction(fn):
                    yield f"{name}.{attr}", fn


def test_public_api_is_fully_annotated():
    import inspect
    import typing
    torch = pytest.importorskip("torch")
    from ibp.geometry import Geometry
    names = dict(public_functions())
    assert {"compress", "open", "CompressedTensor.update_rows", "CompressedTensor.ratio", "LazyFile.get_rows",
            "TensorInfo.dtype", "Model.empty"} <= set(names)
    for name, fn in names.items():
        sig = inspect.signature(fn)
        missing = [p for p in sig.parameters.values() if p.name not in ("self", "cls")
                   and p.annotation is inspect.Parameter.empty]
        assert not missing, f"{name}: {missing} not annotated"
        assert fn.__name__ == "__init__" or sig.return_annotation is not inspect.Signature.empty, name
        typing.get_type_hints(fn, localns={"torch": torch, "Geometry": Geometry, "Model": ibp.Model})  # they resolve


def test_py_typed_is_shipped():
    import pathlib
    import tomllib
    root = pathlib.Path(__file__).resolve().parent.parent
    config = tomllib.loads((root / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["ibp"]
    assert (root / "ibp" / "py.typed").is_file()
