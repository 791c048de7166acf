"""The ibp command on real files: every subcommand, every tensor format, and
the ways users get it wrong (one line on stderr, exit status 1)."""
import json
import math
import os
import shutil
import stat
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import ibp
from ibp import datasets
from ibp.cli import main

torch = pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
safetensors_torch = pytest.importorskip("safetensors.torch")


# -- real files ---------------------------------------------------------------

def minilm_slice():
    """A real slice of all-MiniLM-L6-v2: layer 0's attention, the embedding
    norms, the position ids and the first 2000 word embeddings."""
    w = datasets.minilm_weights()
    keep = {k: v for k, v in w.items()
            if k.startswith("encoder.layer.0.attention") or k.startswith("embeddings.LayerNorm")
            or k == "embeddings.position_ids"}
    keep["embeddings.word_embeddings.weight"] = np.ascontiguousarray(w["embeddings.word_embeddings.weight"][:2000])
    return keep


def to_bf16(tensors):
    return {k: torch.from_numpy(v).to(torch.bfloat16) if v.dtype == np.float32 else torch.from_numpy(v)
            for k, v in tensors.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    graph = datasets.cora_graph()
    mini = minilm_slice()
    out = {}
    out["npy"] = d / "cora.npy"
    np.save(out["npy"], graph["features"])
    out["npy-fortran-bigendian"] = d / "cora_f.npy"
    np.save(out["npy-fortran-bigendian"], np.asfortranarray(graph["features"][:300, :200].astype(">f4")))
    out["npz"] = d / "cora.npz"
    np.savez(out["npz"], **graph)
    out["npz-deflated"] = d / "mixed.npz"
    np.savez_compressed(out["npz-deflated"], labels=graph["labels"], edges=graph["edge_index"],
                        query=np.asfortranarray(mini["encoder.layer.0.attention.self.query.weight"]))
    out["safetensors"] = d / "minilm.safetensors"
    safetensors_numpy.save_file(mini, out["safetensors"], metadata={"format": "pt"})
    out["safetensors-bf16"] = d / "minilm_bf16.safetensors"
    safetensors_torch.save_file(to_bf16(mini), out["safetensors-bf16"])
    out["pt"] = d / "checkpoint.pt"
    torch.save({"model": to_bf16(mini), "step": 1200, "lr": 3e-4, "tag": "run-7", "best": None,
                "ema": {"decay": 0.999, "features": torch.from_numpy(graph["features"][:64])}}, out["pt"])
    out["pt-tensor"] = d / "embedding.pt"
    torch.save(to_bf16({"w": mini["embeddings.word_embeddings.weight"]})["w"], out["pt-tensor"])
    return out


def run(*args):
    """(exit status, stdout, stderr) of the ibp command run in this process."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def ok(*args):
    rc, out, err = run(*args)
    assert rc == 0, err
    return out


def fails(*args):
    """The error line of a command that must fail cleanly."""
    rc, out, err = run(*args)
    assert rc == 1, (rc, out, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ibp: error: "), err
    return lines[0]


# -- comparing ----------------------------------------------------------------

def raw_bytes(t):
    if isinstance(t, torch.Tensor):
        return str(t.dtype), tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return str(t.dtype), t.shape, np.ascontiguousarray(t).tobytes()


def assert_same_tree(a, b):
    """Same nesting, key order, plain values and tensor bits."""
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same_tree(a[k], b[k])
    elif isinstance(a, (torch.Tensor, np.ndarray)):
        assert raw_bytes(a) == raw_bytes(b)
    else:
        assert a == b and type(a) is type(b)


def read_any(path):
    path = str(path)
    if path.endswith(".npy"):
        return np.load(path)
    if path.endswith(".npz"):
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    if path.endswith(".safetensors"):
        return safetensors_torch.load_file(path)
    return torch.load(path, weights_only=True)


# -- compress / decompress round trips -----------------------------------------

FORMATS = ["npy", "npy-fortran-bigendian", "npz", "npz-deflated", "safetensors", "safetensors-bf16",
           "pt", "pt-tensor"]


@pytest.mark.parametrize("kind", FORMATS)
def test_roundtrip_is_bit_identical(files, tmp_path, kind):
    src = files[kind]
    packed = tmp_path / (src.name + ".ibp")
    back = tmp_path / src.name
    out = ok("compress", src, packed)
    assert str(packed) in out and "tensor" in out
    ok("decompress", packed, back)
    assert_same_tree(read_any(src), read_any(back))
    if kind.startswith("npy") or kind.startswith("safetensors"):
        # np.save and safetensors are deterministic: the very same file comes back
        assert back.read_bytes() == src.read_bytes()
    if kind.startswith("npz"):
        with zipfile.ZipFile(src) as a, zipfile.ZipFile(back) as b:
            assert [i.compress_type for i in a.infolist()] == [i.compress_type for i in b.infolist()]
            assert a.namelist() == b.namelist()
    if kind == "npy-fortran-bigendian":
        y = np.load(back)
        assert y.dtype == np.dtype(">f4") and y.flags.f_contiguous and not y.flags.c_contiguous


def test_compressed_file_holds_what_went_in(files, tmp_path):
    packed = tmp_path / "m.ibp"
    ok("compress", files["safetensors"], packed)
    loaded = ibp.load(packed)
    mini = minilm_slice()
    assert list(loaded) == sorted(mini) or set(loaded) == set(mini)
    for name, ct in loaded.items():
        assert raw_bytes(ibp.decompress(ct)) == raw_bytes(torch.from_numpy(mini[name]))
    single = tmp_path / "cora.ibp"
    ok("compress", files["npy"], single)
    ct = ibp.load(single)
    assert isinstance(ct, ibp.CompressedTensor) and ct.ratio > 10


def test_default_output_names_and_force(files, tmp_path):
    src = tmp_path / "cora.npy"
    src.write_bytes(files["npy"].read_bytes())
    ok("compress", src)
    assert (tmp_path / "cora.npy.ibp").exists()
    line = fails("decompress", tmp_path / "cora.npy.ibp")  # would overwrite cora.npy
    assert "exists" in line and "--force" in line
    src.rename(tmp_path / "original.npy")
    ok("decompress", tmp_path / "cora.npy.ibp")
    assert src.read_bytes() == (tmp_path / "original.npy").read_bytes()
    fails("compress", tmp_path / "original.npy", tmp_path / "cora.npy.ibp")
    ok("compress", tmp_path / "original.npy", tmp_path / "cora.npy.ibp", "--force")


def test_decompress_converts_by_extension(files, tmp_path):
    packed = tmp_path / "c.ibp"
    ok("compress", files["npz"], packed)
    for ext in (".safetensors", ".pt", ".npz"):
        ok("decompress", packed, tmp_path / ("c" + ext))
        got = read_any(tmp_path / ("c" + ext))
        want = read_any(files["npz"])
        assert list(got) == list(want) or set(got) == set(want)
        for k in want:
            assert raw_bytes(got[k]) == raw_bytes(torch.from_numpy(want[k]) if ext != ".npz" else want[k])
    # no extension: the recorded format, written to that exact name
    ok("decompress", packed, tmp_path / "plain")
    with np.load(tmp_path / "plain") as z:
        assert z.files == list(datasets.cora_graph())


def test_checkpoint_nesting_and_values_come_back(files, tmp_path):
    packed = tmp_path / "ckpt.ibp"
    ok("compress", files["pt"], packed)
    names = list(ibp.load(packed))
    assert "ema.features" in names and all(n.startswith(("model.", "ema.")) for n in names)
    ok("decompress", packed, tmp_path / "ckpt.pt")
    restored = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert restored["step"] == 1200 and restored["tag"] == "run-7" and restored["best"] is None
    assert_same_tree(torch.load(files["pt"], weights_only=True), restored)


# -- options ------------------------------------------------------------------

def info_json(path):
    return json.loads(ok("info", path, "--json"))


@pytest.mark.parametrize("layout", ["packed", "slotted"])
@pytest.mark.parametrize("word_bits", [8, 16, 32])
def test_layout_and_word_bits(files, tmp_path, layout, word_bits):
    packed = tmp_path / "x.ibp"
    ok("compress", files["npz-deflated"], packed, "--layout", layout, "--word-bits", word_bits)
    report = info_json(packed)
    for name, t in report["tensors"].items():
        assert t["layout"] == layout and t["word_bits"] == word_bits, name
    ok("decompress", packed, tmp_path / "x.npz")
    assert_same_tree(read_any(files["npz-deflated"]), read_any(tmp_path / "x.npz"))


def test_model_from_ibp_file_and_tensor_file(files, tmp_path):
    mini = minilm_slice()
    ref = tmp_path / "ref.npy"
    np.save(ref, mini["encoder.layer.0.attention.self.key.weight"])
    target = tmp_path / "q.npy"
    np.save(target, mini["encoder.layer.0.attention.self.query.weight"])
    ok("compress", ref, tmp_path / "ref.ibp")
    ok("compress", target, tmp_path / "a.ibp", "--model-from", tmp_path / "ref.ibp")
    ok("compress", target, tmp_path / "b.ibp", "--model-from", ref)
    ref_model = ibp.load(tmp_path / "ref.ibp").model
    assert ibp.load(tmp_path / "a.ibp").model == ref_model
    assert ibp.load(tmp_path / "b.ibp").model == ibp.analyze(mini["encoder.layer.0.attention.self.key.weight"])
    ok("decompress", tmp_path / "a.ibp", tmp_path / "a.npy")
    assert (tmp_path / "a.npy").read_bytes() == target.read_bytes()


def test_model_from_checkpoint_is_matched_by_name(files, tmp_path):
    ok("compress", files["safetensors"], tmp_path / "ref.ibp")
    ok("compress", files["safetensors"], tmp_path / "again.ibp", "--model-from", tmp_path / "ref.ibp")
    ref, again = ibp.load(tmp_path / "ref.ibp"), ibp.load(tmp_path / "again.ibp")
    assert all(again[k].model == ref[k].model for k in ref)
    line = fails("compress", files["npz"], tmp_path / "c.ibp", "--model-from", tmp_path / "ref.ibp")
    assert "no tensor named" in line


def test_info_reports_the_facts(files, tmp_path):
    packed = tmp_path / "st.ibp"
    ok("compress", files["safetensors"], packed)
    text = ok("info", packed)
    assert "format version 2" in text and "from safetensors" in text and "metadata format: pt" in text
    report = info_json(packed)
    assert report["format_version"] == 2 and report["source"]["format"] == "safetensors"
    loaded = ibp.load(packed)
    assert set(report["tensors"]) == set(loaded)
    for name, ct in loaded.items():
        t = report["tensors"][name]
        assert name in text
        assert (t["dtype"], tuple(t["shape"]), t["word_bits"], t["layout"], t["period"]) == \
            (ct.dtype_name, ct.shape, ct.word_bits, ct.layout, ct.model.period)
        assert t["ratio"] == ct.ratio and f"{ct.ratio:.3f}" in text
        kinds = np.bincount(ct.unit_kinds(), minlength=4)
        assert t["units"] == kinds.sum()
        assert [t["unit_share"][k] for k in ("raw", "all", "sparse", "bitmap")] == list(kinds / kinds.sum())
        assert t["invariant_bits"] == ct.model.invariant_bits.mean()
    assert report["ratio"] == sum(ct.raw_nbytes for ct in loaded.values()) / sum(ct.nbytes for ct in loaded.values())


# -- mistakes ------------------------------------------------------------------

def corrupt(src, dst, position):
    data = bytearray(src.read_bytes())
    data[position] ^= 0x40
    dst.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def cora_ibp(files, tmp_path_factory):
    path = tmp_path_factory.mktemp("ibp") / "cora.ibp"
    ok("compress", files["npy"], path)
    return path


def test_missing_files(tmp_path, cora_ibp):
    for args in (("compress", tmp_path / "nope.npy"), ("decompress", tmp_path / "nope.ibp"),
                 ("info", tmp_path / "nope.ibp"), ("compress", cora_ibp.parent / "x.npy", tmp_path / "y.ibp")):
        assert "no such file" in fails(*args)
    assert "no such directory" in fails("decompress", cora_ibp, tmp_path / "missing" / "x.npy")


def test_unknown_extensions(tmp_path, cora_ibp):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert "unsupported input format (.txt)" in fails("compress", text, tmp_path / "n.ibp")
    assert "already compressed" in fails("compress", cora_ibp, tmp_path / "twice.ibp")
    assert "not an ibp file" in fails("info", text)


def test_corrupted_and_truncated_ibp(tmp_path, cora_ibp):
    size = cora_ibp.stat().st_size
    cases = {"payload": (size - 200, "not a valid ibp file"), "header": (40, "not a valid ibp file"),
             "magic": (2, "not an ibp file")}
    for what, (position, cause) in cases.items():
        bad = tmp_path / f"{what}.ibp"
        corrupt(cora_ibp, bad, position)
        assert cause in fails("info", bad)
        assert cause in fails("decompress", bad, tmp_path / "out.npy")
    for keep in (0, 10, 100, size // 2, size - 1):
        cut = tmp_path / f"cut{keep}.ibp"
        cut.write_bytes(cora_ibp.read_bytes()[:keep])
        cause = "not an ibp file" if keep < 8 else "truncated"
        assert cause in fails("decompress", cut, tmp_path / "out.npy")
        assert cause in fails("info", cut)
    assert not (tmp_path / "out.npy").exists()


def test_corrupted_tensor_files(files, tmp_path):
    for kind in ("npy", "npz", "safetensors", "pt"):
        src = files[kind]
        cut = tmp_path / ("cut" + src.suffix)
        cut.write_bytes(src.read_bytes()[:500])
        cause = "truncated" if kind == "safetensors" else f"cannot read it as {'torch' if kind == 'pt' else kind}"
        assert cause in fails("compress", cut, tmp_path / "c.ibp")
    npz_named_npy = tmp_path / "archive.npy"
    npz_named_npy.write_bytes(files["npz"].read_bytes())
    assert "npz archive" in fails("compress", npz_named_npy, tmp_path / "c.ibp")


def test_unsupported_contents(files, tmp_path):
    strings = tmp_path / "s.npy"
    np.save(strings, np.array(["ab", "c"]))
    assert "cannot compress numpy dtype" in fails("compress", strings, tmp_path / "s.ibp")
    listed = tmp_path / "list.pt"
    torch.save({"model": {"w": torch.ones(3)}, "history": [1, 2]}, listed)
    assert "'history' is a list" in fails("compress", listed, tmp_path / "l.ibp")
    int_keys = tmp_path / "ints.pt"
    torch.save({0: torch.ones(3)}, int_keys)
    assert "not a non-empty string" in fails("compress", int_keys, tmp_path / "i.ibp")
    assert "asked for 64" in fails("compress", files["npy"], tmp_path / "w.ibp", "--word-bits", "64")


def test_formats_that_cannot_hold_the_tensors(files, tmp_path):
    ok("compress", files["pt"], tmp_path / "bf.ibp")
    assert "cannot hold" in fails("decompress", tmp_path / "bf.ibp", tmp_path / "bf.npz")
    assert "holds one array" in fails("decompress", tmp_path / "bf.ibp", tmp_path / "bf.npy")
    ok("compress", files["npy"], tmp_path / "one.ibp")
    assert "unnamed" in fails("decompress", tmp_path / "one.ibp", tmp_path / "one.safetensors")
    assert not any(p.name.startswith(("bf.np", "one.safe")) for p in tmp_path.iterdir())


def test_python_dash_m_exits_with_status_and_one_line(tmp_path, cora_ibp):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(ibp.__file__)),
                                                        os.environ.get("PYTHONPATH", "")]))
    bad = tmp_path / "bad.ibp"
    corrupt(cora_ibp, bad, cora_ibp.stat().st_size - 200)
    r = subprocess.run([sys.executable, "-m", "ibp", "decompress", str(bad), str(tmp_path / "x.npy")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1
    assert "checksum" in r.stderr
    r = subprocess.run([sys.executable, "-m", "ibp", "info", str(cora_ibp)], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "format version 2" in r.stdout


def test_a_closed_pipe_ends_quietly(cora_ibp):
    """``ibp info --json x.ibp | head`` : the reader going away is not an error."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(ibp.__file__)),
                                                        os.environ.get("PYTHONPATH", "")]))
    p = subprocess.Popen([sys.executable, "-m", "ibp", "info", "--json", str(cora_ibp)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    p.stdout.close()   # before the command writes anything
    err = p.stderr.read().decode()
    assert p.wait() == 141 and err == ""   # 128 + SIGPIPE, as a shell pipeline reports it


def test_an_input_is_never_overwritten(files, tmp_path, cora_ibp):
    src = tmp_path / "m.safetensors"
    src.write_bytes(files["safetensors"].read_bytes())
    want = src.read_bytes()
    os.link(src, tmp_path / "hard.ibp")
    os.symlink(src, tmp_path / "soft.ibp")
    for out in (src, tmp_path / "hard.ibp", tmp_path / "soft.ibp"):
        assert "never overwrites its input" in fails("compress", src, out, "-f")
    renamed = tmp_path / "r2.safetensors"  # an ibp file under a tensor file's name
    renamed.write_bytes(cora_ibp.read_bytes())
    assert "already compressed" in fails("compress", renamed, tmp_path / "x.ibp")
    ok("compress", src, tmp_path / "m.ibp")
    renamed.write_bytes((tmp_path / "m.ibp").read_bytes())
    assert "never overwrites its input" in fails("decompress", renamed, "-f")  # default OUT is IN itself
    os.link(tmp_path / "m.ibp", tmp_path / "m2.safetensors")
    assert "never overwrites its input" in fails("decompress", tmp_path / "m.ibp", tmp_path / "m2.safetensors", "-f")
    assert src.read_bytes() == want and renamed.read_bytes() == (tmp_path / "m.ibp").read_bytes()


def test_an_output_symlink_stays_one_and_a_pipe_is_refused(files, tmp_path):
    src = tmp_path / "m.safetensors"
    src.write_bytes(files["safetensors"].read_bytes())
    (tmp_path / "target.ibp").write_bytes(b"old")
    os.symlink(tmp_path / "target.ibp", tmp_path / "link.ibp")
    ok("compress", src, tmp_path / "link.ibp", "-f")
    assert os.path.islink(tmp_path / "link.ibp")                 # the link is kept, what it names is replaced
    assert (tmp_path / "target.ibp").read_bytes()[:8] == ibp.container.MAGIC
    ok("decompress", tmp_path / "link.ibp", tmp_path / "back.safetensors")
    assert (tmp_path / "back.safetensors").read_bytes() == src.read_bytes()
    os.mkfifo(tmp_path / "pipe.ibp")
    assert "not a regular file" in fails("compress", src, tmp_path / "pipe.ibp", "-f")
    assert stat.S_ISFIFO(os.stat(tmp_path / "pipe.ibp").st_mode)   # still the pipe it was
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_errors_name_their_cause(files, tmp_path, cora_ibp):
    data = cora_ibp.read_bytes()
    cut = tmp_path / "cut.ibp"
    cut.write_bytes(data[:len(data) // 2])
    assert "truncated" in fails("info", cut)
    assert "truncated" in fails("decompress", cut, tmp_path / "o.npy")
    text = tmp_path / "notes.pt"
    text.write_text("hello, this is not a checkpoint")
    assert "not a torch checkpoint" in fails("compress", text, tmp_path / "t.ibp")
    assert "not an ibp file, it holds an .npy array" in fails("decompress", files["npy"], tmp_path / "o.npy")
    npz = tmp_path / "z.safetensors"
    npz.write_bytes(files["npz"].read_bytes())
    assert "holds an .npz archive" in fails("compress", npz, tmp_path / "z.ibp")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a compressed model directory" in fails("decompress", empty, tmp_path / "back")
    assert "not a compressed model directory" in fails("info", empty)
    assert "without .safetensors weights" in fails("compress", empty, tmp_path / "e-ibp")
    assert not (tmp_path / "e-ibp").exists() and not (tmp_path / "o.npy").exists()


def test_output_is_checked_before_the_work_and_written_atomically(files, tmp_path):
    (tmp_path / "adir").mkdir()
    assert "is a directory" in fails("compress", files["npy"], tmp_path / "adir", "-f")
    assert "no such directory" in fails("compress", files["npy"], tmp_path / "nofile.npy" / "x.ibp")
    # a failure halfway (an .npz cannot hold bfloat16) leaves nothing behind, and no temporary name leaks
    ok("compress", files["pt"], tmp_path / "bf.ibp")
    line = fails("decompress", tmp_path / "bf.ibp", tmp_path / "bf.npz")
    assert "cannot hold" in line and ".tmp" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "bf.ibp"]
    # a file written in place keeps the old one until the new one is complete
    (tmp_path / "old.npy").write_bytes(b"old")
    ok("decompress", tmp_path / "bf.ibp", tmp_path / "old.pt")
    assert (tmp_path / "old.npy").read_bytes() == b"old"


def small_model_dir(files, folder):
    """A model directory: a config and a real safetensors slice of MiniLM."""
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "model.safetensors").write_bytes(files["safetensors"].read_bytes())
    return folder


def test_force_replaces_a_directory_only_when_it_holds_an_earlier_output(files, tmp_path):
    model = small_model_dir(files, tmp_path / "model")
    victim = tmp_path / "work"
    victim.mkdir()
    (victim / "thesis.tex").write_text("precious")
    assert "not a compressed model directory" in fails("compress", model, victim, "-f")
    ok("compress", model)
    assert "not a model directory" in fails("decompress", tmp_path / "model-ibp", victim, "-f")
    assert (victim / "thesis.tex").read_text() == "precious" and os.listdir(victim) == ["thesis.tex"]
    ok("compress", model, tmp_path / "model-ibp", "-f")   # an earlier output is replaced
    (tmp_path / "empty").mkdir()
    ok("decompress", tmp_path / "model-ibp", tmp_path / "empty", "-f")   # so is an empty directory
    ok("decompress", tmp_path / "model-ibp", tmp_path / "empty", "-f")   # and a model directory
    assert (tmp_path / "empty" / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    (tmp_path / "empty" / "notes.txt").write_text("mine")   # a file the output would not hold again
    assert "not a model directory" in fails("decompress", tmp_path / "model-ibp", tmp_path / "empty", "-f")
    (tmp_path / "model-ibp" / "notes.txt").write_text("theirs")
    assert "not a compressed model directory" in fails("compress", model, tmp_path / "model-ibp", "-f")
    assert (tmp_path / "empty" / "notes.txt").read_text() == "mine"


def test_outputs_get_the_permissions_the_umask_gives(files, tmp_path):
    model = small_model_dir(files, tmp_path / "model")
    old = os.umask(0o027)
    try:
        ok("compress", files["npy"], tmp_path / "c.ibp")
        ok("decompress", tmp_path / "c.ibp", tmp_path / "c.npy")
        ok("compress", model, tmp_path / "m-ibp")
        ok("decompress", tmp_path / "m-ibp", tmp_path / "m")
    finally:
        os.umask(old)
    for name in ("c.ibp", "c.npy", "m-ibp/model.ibp", "m/model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name
    for name in ("m-ibp", "m"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o750, name


def test_short_and_empty_files_name_their_cause(tmp_path):
    for name, cause in (("t.pt", "not a torch checkpoint"), ("t.npy", "not an .npy array"),
                        ("t.npz", "not an .npz archive"), ("t.safetensors", "not a safetensors file")):
        for content in (b"hello\n", b""):
            (tmp_path / name).write_bytes(content)
            line = fails("compress", tmp_path / name, tmp_path / "o.ibp", "-f")
            assert cause in line and ("an empty file" in line) == (not content), line
    np.savez(tmp_path / "none.npz")   # an archive of no arrays is still an .npz file
    ok("compress", tmp_path / "none.npz")
    ok("decompress", tmp_path / "none.npz.ibp", tmp_path / "back.npz")
    with np.load(tmp_path / "back.npz") as z:
        assert z.files == []


def test_the_current_directory_as_input(files, tmp_path, monkeypatch):
    model = small_model_dir(files, tmp_path / "model")
    monkeypatch.chdir(model)
    ok("compress", ".")
    assert (tmp_path / "model-ibp" / "model.ibp").is_file()
    monkeypatch.chdir(tmp_path / "model-ibp")
    ok("decompress", ".", tmp_path / "back")
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    assert "exists" in fails("decompress", ".")   # the default name is ../model, which is there


# -- bench ---------------------------------------------------------------------

def test_bench_on_a_small_file(tmp_path):
    from ibp.bench import ratio
    data = tmp_path / "cora_rows.npy"
    np.save(data, datasets.cora_graph()["features"][:64])
    out_dir = tmp_path / "results"
    out = ok("bench", "--data", data, "--out", out_dir, "--quick", "--quiet")
    results = json.loads((out_dir / "ratio.json").read_text())
    assert list(results["datasets"]) == ["cora_rows.npy"]
    assert results["settings"]["repeats"] == 1
    entry = results["datasets"]["cora_rows.npy"]["codecs"]["ibp"]
    assert entry["exact"] and entry["ratio"] > 1
    # what was printed is the table of what was written
    assert ratio.format_table(results) in out
    assert f"| cora_rows.npy | ibp | {entry['ratio']:.4f} |" in out
    assert (out_dir / "ratio.md").read_text().strip() == ratio.format_table(results).strip()
    assert (out_dir / "ratio.png").read_bytes()[:4] == b"\x89PNG"
    assert str(out_dir / "ratio.json") in out
    written = (out_dir / "ratio.json").read_bytes()
    assert "pass -f" in fails("bench", "--data", data, "--out", out_dir, "--quick", "--quiet")
    assert (out_dir / "ratio.json").read_bytes() == written


def test_bench_mistakes(tmp_path):
    assert "no such file" in fails("bench", "--data", tmp_path / "none.npy", "--out", tmp_path)
    text = tmp_path / "a.txt"
    text.write_text("x")
    assert "unsupported format" in fails("bench", "--data", text, "--out", tmp_path)


@pytest.mark.parametrize("named, source", [
    (False, {"format": "npy", "arrays": [1]}),
    (False, {"format": "npy", "arrays": {"": ["<f4"]}}),
    (True, {"format": "npz", "arrays": "x"}),
    (True, {"format": "torch", "tree": 5}),
    (True, {"format": "torch", "tree": [[["b"], "tensor"]]}),          # names a tensor the file lacks
    (True, {"format": "torch", "tree": [[["a", "b"], "tensor"]]}),     # under a dict it never made
    (True, {"format": "torch", "tree": [[["c"], "value", 1]]}),        # leaves the file's tensor out
    (True, {"format": "torch", "tree": []}),                           # ... all of them
    (True, {"format": "torch", "tree": [[["a"], "tensor"], [["a"], "value", 1]]}),   # then overwrites it
    (True, {"format": "torch", "tree": [[["d"], "dict"], [["a"], "tensor"], [["d"], "dict"]]}),
    (False, {"format": "npy", "arrays": {"": ["nonsense", False]}}),
    (True, {"format": "safetensors", "metadata": [1]}),
    (True, {"format": "safetensors", "metadata": {"k": 1}}),           # safetensors would refuse the file
])
def test_a_malformed_source_record_is_one_line_and_no_output(named, source, tmp_path):
    """A foreign or damaged ibp.source record (valid checksums) is refused
    in one line: it was followed into tracebacks, a file missing tensors
    or a .safetensors file safetensors cannot read."""
    from ibp import container
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    p = tmp_path / "m.ibp"
    p.write_bytes(container.dumps({"a" if named else None: ibp.compress(x)}, {"ibp.source": json.dumps(source)}))
    assert "ibp.source metadata" in fails("decompress", p)
    assert sorted(os.listdir(tmp_path)) == ["m.ibp"]


@pytest.mark.parametrize("kind", ["bfloat16", "float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("shape", [(3, 4), ()])
def test_ml_dtypes_arrays_go_to_torch_bit_for_bit_and_never_to_npy_as_raw_bytes(kind, shape, tmp_path):
    """An .npy header has no name for ml_dtypes' types: they were written as
    raw void bytes (|V2), which even ibp compress refuses; torch has them."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    torch = pytest.importorskip("torch")
    x = (np.arange(12, dtype=np.float32)[:math.prod(shape)].reshape(shape) / 3).astype(getattr(ml_dtypes, kind))
    ibp.save({"a": x}, tmp_path / "m.ibp")
    ibp.save(ibp.compress(x), tmp_path / "lone.ibp")
    for ext, stem in (("npz", "m"), ("npy", "lone")):
        assert f"which .{ext} cannot hold" in fails("decompress", tmp_path / f"{stem}.ibp", tmp_path / f"out.{ext}")
        assert not (tmp_path / f"out.{ext}").exists()
    for stem in ("m", "lone"):
        ok("decompress", tmp_path / f"{stem}.ibp", tmp_path / f"{stem}.pt")
        back = torch.load(tmp_path / f"{stem}.pt")
        back = back["a"] if stem == "m" else back
        assert back.dtype == getattr(torch, kind) and tuple(back.shape) == shape
        assert back.reshape(-1).view(torch.uint8).numpy().tobytes() == x.tobytes()


def test_a_replaced_file_keeps_its_permissions_and_a_symlink_stays_one(files, tmp_path):
    """As writing in place would: ibp.save and the command line replace a
    0600 file with a 0600 file (it became 0644, readable by all), and
    ibp.save through a symlink replaces the file it names (it put a plain
    file in the link's place, leaving the target stale)."""
    x = np.arange(6, dtype=np.float32)
    for name, write in (("saved.ibp", lambda p: ibp.save(ibp.compress(x), p)),
                        ("cli.ibp", lambda p: ok("compress", "-f", files["npy"], p))):
        p = tmp_path / name
        p.write_bytes(b"old")
        os.chmod(p, 0o600)
        write(p)
        assert p.stat().st_mode & 0o777 == 0o600 and p.read_bytes().startswith(b"\x89IBP")
    model = small_model_dir(files, tmp_path / "model")
    ok("compress", model, tmp_path / "m-ibp")
    os.chmod(tmp_path / "m-ibp", 0o700)
    ok("compress", "-f", model, tmp_path / "m-ibp")   # a directory replaced keeps its permissions too
    assert (tmp_path / "m-ibp").stat().st_mode & 0o777 == 0o700
    shutil.rmtree(model)
    shutil.rmtree(tmp_path / "m-ibp")
    (tmp_path / "target.ibp").write_bytes(b"old")
    os.symlink(tmp_path / "target.ibp", tmp_path / "link.ibp")
    ibp.save(ibp.compress(x), tmp_path / "link.ibp")
    assert os.path.islink(tmp_path / "link.ibp")
    assert np.array_equal(ibp.decompress(ibp.load(tmp_path / "target.ibp")), x)
    assert sorted(os.listdir(tmp_path)) == ["cli.ibp", "link.ibp", "saved.ibp", "target.ibp"]
