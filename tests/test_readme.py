"""The README's promises: CI runs its test command, its tour runs, its links resolve."""
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


def test_comparison_table_matches_the_committed_results():
    import json
    results = json.loads((ROOT / "bench" / "results" / "ratio.json").read_text())["datasets"]
    rows = {"MiniLM weights fp32": "minilm-fp32", "MiniLM weights bf16": "minilm-bf16",
            "MiniLM weights fp16": "minilm-fp16", "MiniLM KV cache fp32": "minilm-kv",
            "GloVe 6B 50d": "glove-50d", "Cora features": "cora"}
    header = re.search(r"^\| dataset \|(.*)\|$", README, re.M).group(1)
    codecs = [c.strip().split(" ")[0] for c in header.split("|")]
    seen = 0
    for label, name in rows.items():
        cells = re.search(rf"^\| {label} \|(.*)\|$", README, re.M).group(1).split("|")
        for codec, cell in zip(codecs, cells):
            shown = cell.strip().strip("*")
            digits = len(shown.split(".")[1])
            assert shown == f"{results[name]['codecs'][codec]['ratio']:.{digits}f}", (label, codec)
            seen += 1
    assert seen == 6 * 6


def test_relative_links_in_the_docs_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
