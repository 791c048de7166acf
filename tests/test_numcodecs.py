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
