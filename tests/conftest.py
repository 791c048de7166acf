"""Session set-up shared by every test module."""
import os
import subprocess
import sys

WARM = os.path.join(os.path.dirname(__file__), "warm_numba_cache.py")


def pytest_configure(config):
    """With pytest-xdist, fill numba's disk cache once, in two processes,
    before the workers start (see warm_numba_cache.py); each worker then
    loads the kernels instead of compiling them again."""
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    halves = [subprocess.Popen([sys.executable, WARM, *bits]) for bits in (("8", "64"), ("16", "32"))]
    for p in halves:
        p.wait()   # a failure here is the codec's: the tests that follow report it
