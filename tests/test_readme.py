"""The README's promises: CI runs its test command, and its tour runs."""
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def code_blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_ci_runs_the_readme_test_command():
    bash = code_blocks("bash")
    assert len(bash) == 2 and "ibp bench" in bash[0] and "pytest" in bash[1]
    assert bash[1].strip() in (ROOT / ".ci" / "run").read_text()


def test_tour_runs(tmp_path):
    tour = code_blocks("python")[0]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(tour, "README tour", "exec"), {})
    finally:
        os.chdir(cwd)
    assert (tmp_path / "ckpt.ibp").exists()
