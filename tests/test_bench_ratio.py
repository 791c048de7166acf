"""The ratio benchmark on the small Cora dataset: structure, exact round
trips of every codec, and a table that says what the JSON says."""
import json
import os
from pathlib import Path
import re
import subprocess
import sys

import numpy as np
import pytest

import ibp.datasets

from ibp.bench import codecs, plot, ratio


@pytest.fixture(scope="module")
def results():
    return ratio.run(["cora"], repeats=1, scaling_min_bytes=1 << 20)  # Cora's 15.5 MB table is timed on two threads


def test_structure(results):
    assert set(results) == {"machine", "settings", "datasets", "checkpoints", "threads", "summary"}
    m = results["machine"]
    assert m["cpu"] and m["cores"] >= 1 and m["date"]
    assert {"python", "numpy", "numba", "torch"} <= set(m["versions"])
    assert list(results["datasets"]) == ["cora"]
    cora = results["datasets"]["cora"]
    assert cora["tensors"] == 1 and cora["raw_bytes"] == 2708 * 1433 * 4
    assert list(cora["codecs"]) == list(codecs.NAMES)
    for name, e in cora["codecs"].items():
        assert e["bytes"] > 0, name
        assert e["ratio"] == round(cora["raw_bytes"] / e["bytes"], 4), name
        assert e["compress_mb_s"] > 0 and e["decompress_mb_s"] > 0, name
    json.dumps(results)  # JSON-ready


def test_every_codec_round_trips_exactly(results):
    assert all(e["exact"] is True for e in results["datasets"]["cora"]["codecs"].values())
    assert all(e["exact"] is True for e in results["checkpoints"]["cora"]["codecs"].values())


def test_checkpoint_file_is_converted_by_every_codec(results):
    f = results["checkpoints"]["cora"]
    assert f["tensors"] == 1 and f["dtype"] == "float32"
    assert f["file_bytes"] > 2708 * 1433 * 4   # the tensor's bytes and the safetensors header
    assert list(f["codecs"]) == ["ibp"] + [n for n in codecs.NAMES if n not in ("ibp", "ibp-model-reuse",
                                                                              "reference")]
    for name, e in f["codecs"].items():
        assert e["ratio"] == round(f["file_bytes"] / e["bytes"], 4), name
        assert e["compress_mb_s"] > 0 and e["decompress_mb_s"] > 0, name
    mine = f["codecs"]["ibp"]["bytes"]
    tensor = results["datasets"]["cora"]["codecs"]["ibp"]["bytes"]
    assert tensor < mine < tensor + 4096   # the same tensor, plus the recorded safetensors header
    if "zstd-3" in f["codecs"]:
        z = f["codecs"]["zstd-3"]
        assert results["summary"]["checkpoint_ibp_over_zstd3"]["cora"] == {
            k: round(f["codecs"]["ibp"][f"{k}_mb_s"] / z[f"{k}_mb_s"], 3) for k in ("compress", "decompress")}


def test_two_thread_scaling_is_measured_on_big_tensors(results):
    if not results["settings"]["scaling"]["threads"]:
        pytest.skip("fewer than two cores")
    e = results["threads"]["cora/features"]
    assert e["bytes"] == 2708 * 1433 * 4
    for k in ("compress", "decompress", "fill_fresh"):
        assert e["speedup"][k] == round(e["threads_2"][f"{k}_mb_s"] / e["threads_1"][f"{k}_mb_s"], 3)
    assert e["threads_1"]["exact"] and e["threads_2"]["exact"]
    assert "| fill fresh memory speedup |" in ratio.format_table(results)
    cora = ibp.datasets.load("cora")
    assert ratio._scaling_tensors("cora", cora, ratio.SCALING_MIN_BYTES) == []   # 15.5 MB: under the default 64 MB


def test_the_fresh_memory_ceiling_writes_a_new_array_of_every_byte():
    src = np.arange(1 << 20, dtype=np.uint32).view(np.uint8)
    kept = src.copy()
    out = ratio._fill_fresh(src)
    assert out is not src and not np.shares_memory(out, src)
    np.testing.assert_array_equal(out, kept ^ 1)   # every byte written, from its own byte
    np.testing.assert_array_equal(src, kept)


def test_stacked_tensors_of_one_shape_are_timed_together():
    xs = {f"l{i}": np.zeros((4, 8), np.float32) for i in range(3)}
    got = ratio._scaling_tensors("kv", xs, 3 * 4 * 8 * 4)
    assert [label for label, _ in got] == ["kv (all 3 stacked)"] and got[0][1].shape == (3, 4, 8)
    assert ratio._scaling_tensors("kv", dict(xs, odd=np.zeros(3, np.float32)), 1)[-1][0] == "kv/odd"


def test_reference_and_summary(results):
    c = results["datasets"]["cora"]["codecs"]
    assert c["ibp"]["bytes"] == c["ibp-model-reuse"]["bytes"]
    assert c["reference"]["bytes"] == c["reference"]["int32_bytes"]  # 1433-word rows: int64 does not fit
    assert 21.5 < c["reference"]["ratio"] < 22.7
    s = results["summary"]
    assert s["per_dataset"]["cora"] == {
        "ibp_bytes": c["ibp"]["bytes"], "reference_bytes": c["reference"]["bytes"],
        "reference_over_ibp": round(c["reference"]["bytes"] / c["ibp"]["bytes"], 4)}
    assert s["geomean_reference_over_ibp"] == s["per_dataset"]["cora"]["reference_over_ibp"]


def test_table_numbers_equal_json(results):
    table = ratio.format_table(results)
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| cora |")]
    assert [r[1].strip() for r in rows] == list(codecs.NAMES)
    for r in rows:
        e = results["datasets"]["cora"]["codecs"][r[1].strip()]
        assert float(r[2]) == e["ratio"]
        assert float(r[3]) == e["compress_mb_s"] and float(r[4]) == e["decompress_mb_s"]
        assert r[5].strip() == "yes"
    p = results["summary"]["per_dataset"]["cora"]
    line = next(line for line in table.splitlines() if line.startswith("- cora:"))
    numbers = [float(n.replace(",", "")) for n in re.findall(r"[\d,]+(?:\.\d+)?", line)]
    assert numbers == [p["ibp_bytes"], p["reference_bytes"], p["reference_over_ibp"]]
    files = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| cora.safetensors |")]
    assert [r[1].strip() for r in files] == list(results["checkpoints"]["cora"]["codecs"])
    for r in files:
        e = results["checkpoints"]["cora"]["codecs"][r[1].strip()]
        assert [float(r[2]), float(r[3]), float(r[4])] == [e["ratio"], e["compress_mb_s"], e["decompress_mb_s"]]
    assert results["machine"]["cpu"] in table.splitlines()[0]


def test_plot_writes_a_png(results, tmp_path):
    path = plot.plot_ratio_speed(results, tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_users_own_file(tmp_path):
    x = np.arange(96, dtype=np.float32).reshape(8, 12)
    np.savez(tmp_path / "mine.npz", a=x, b=x[:, :3].astype(np.float16))
    r = ratio.run(data=tmp_path / "mine.npz", repeats=1)
    d = r["datasets"]["mine.npz"]
    assert d["tensors"] == 2 and d["raw_bytes"] == x.nbytes + 8 * 3 * 2
    assert all(e["exact"] for e in d["codecs"].values())
    with pytest.raises(ValueError):
        ratio.load_file(tmp_path / "mine.txt")


@pytest.mark.parametrize("cls, args", codecs.BYTE_CODECS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_byte_codec_round_trips_when_installed(cls, args):
    pytest.importorskip(cls.module, reason=f"{cls.module} is not installed")
    codec = cls(*args)
    assert codec.name in codecs.NAMES
    x = np.tile(np.arange(10, dtype=np.float32), (300, 1))
    obj = codec.compress(codec.inputs([x])[0])
    y = codec.decompress(obj)
    assert y.dtype == x.dtype and y.shape == x.shape and np.array_equal(y, x)
    assert 0 < codec.size(obj) < x.nbytes


BLOCK_BYTE_CODECS = """
import sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("zstandard", "lz4", "blosc2", "zipnn"):
            raise ImportError(f"No module named {name!r} (blocked)")
sys.meta_path.insert(0, Missing())
"""


def test_benchmark_runs_and_its_tests_collect_without_the_byte_codecs():
    root = Path(__file__).resolve().parent.parent
    code = BLOCK_BYTE_CODECS + (
        "from ibp.bench import codecs, ratio\n"
        "assert codecs.MISSING == ('zstandard', 'lz4.frame', 'blosc2', 'zipnn'), codecs.MISSING\n"
        "assert codecs.NAMES == ('ibp', 'ibp-model-reuse', 'reference'), codecs.NAMES\n"
        "import pytest\n"
        "sys.exit(pytest.main(['-q', '--collect-only', '-p', 'no:cacheprovider', '-p', 'no:xdist',\n"
        "                      'tests/test_bench_ratio.py', 'tests/test_reference.py']))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(root)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "error" not in r.stdout.lower()
