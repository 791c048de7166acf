"""The first use of a kernel numba must compile says so on stderr, once;
a run that finds it in the disk cache says nothing."""
import os
import pty
import subprocess
import sys
import textwrap


def test_notice_on_first_compile_only(tmp_path):
    (tmp_path / "tiny_kernels.py").write_text(textwrap.dedent("""
        import numpy as np
        from ibp._bits import Kernel

        @Kernel
        def double(x):
            for i in range(x.size):
                x[i] *= 2

        @Kernel
        def triple(x):
            for i in range(x.size):
                x[i] *= 3

        x = np.ones(4)
        double(x.size, x)
        triple(x.size, x)
        double(x.size, x)
        assert x.tolist() == [12.0] * 4
    """))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(tmp_path))

    def run(on_terminal):
        """stderr of a run, written to a pseudo-terminal or a pipe."""
        leader, follower = pty.openpty() if on_terminal else os.pipe()
        r = subprocess.run([sys.executable, "-c", "import tiny_kernels"], env=env, stderr=follower,
                           stdout=subprocess.DEVNULL, timeout=240)
        os.close(follower)
        err = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:   # a pty whose other end closed
                break
            if not chunk:
                break
            err += chunk
        os.close(leader)
        assert r.returncode == 0, err
        return err.decode()

    assert "ibp: compiling" not in run(on_terminal=False)     # piped: quiet (compiles and caches)
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "cache2")
    first = run(on_terminal=True)
    assert first.count("ibp: compiling the CPU codec") == 1, first
    assert "ibp: compiling" not in run(on_terminal=True)      # cached now
