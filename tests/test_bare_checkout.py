"""The checkout works uninstalled, with only the GPU machine's packages
(tests/gpu_machine_site): the GPU run imports it with PYTHONPATH=.  That
the GPU tests collect there is checked by the device run's dry run
(tests/test_device_run.py)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "gpu_machine_site"), str(ROOT)]))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_mapped_packages_and_kernel_source_import_from_the_checkout():
    code = (
        "import ibp, ibp.integrations, ibp.bench, ibp.kernels, ibp.cuda\n"
        "from importlib import resources\n"
        "import ibp.integrations.dataloader, ibp.integrations.embedding, ibp.integrations.gnn, ibp.integrations.llm\n"
        "src = resources.files('ibp.kernels').joinpath('ibp_decode.cu').read_text()\n"
        "assert '__global__' in src\n"
        "for name in ('zstandard', 'lz4', 'blosc2'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ImportError:\n"
        "        pass\n"
        "    else:\n"
        "        raise SystemExit(name + ' should be missing here')\n"
        "print(ibp.__file__, ibp.integrations.__file__, ibp.bench.__file__, ibp.kernels.__file__)\n")
    r = _run("-c", code)
    assert r.returncode == 0, r.stderr
    files = r.stdout.split()
    assert [Path(f).parent.name for f in files] == ["ibp", "integrations", "bench", "cuda"]
    assert all(Path(f).is_relative_to(ROOT) for f in files)

