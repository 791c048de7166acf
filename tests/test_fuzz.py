"""Structure-aware fuzzing of ibp files (bench/fuzz.py) as a CI test: a
fixed seed and a few thousand mutated files, in a subprocess so that a crash
is a failure rather than the end of the test run.  Longer runs:
``python bench/fuzz.py --trials 1000000 --seed N``."""
import json
import subprocess
import sys
from pathlib import Path

FUZZ = Path(__file__).resolve().parent.parent / "bench" / "fuzz.py"


def test_mutated_files_read_or_raise_format_error():
    r = subprocess.run([sys.executable, str(FUZZ), "--trials", "3000", "--seed", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode in (0, 1), r.stderr[-3000:]  # anything else: the process crashed
    report = json.loads(r.stdout)
    assert report["trials"] == 3000
    assert report["failures"] == [], report["failures"][:10]
    assert r.returncode == 0
