"""``ibp compress DIR OUT`` and ``ibp decompress OUT BACK`` stream a model
tensor by tensor: a subprocess's peak RSS above the interpreter's own (the
same command on a one-tensor model) is a few of the largest tensors, not the
checkpoint."""
import json
import os
import subprocess
import sys

import numpy as np

TENSORS, TENSOR_MIB = 12, 16
ALLOWED_TENSORS = 4   # one read, its compressed form, the writer's buffers (measured: about 2)


def model_dir(path, count, mib):
    """A model directory of ``count`` float32 weights of ``mib`` MiB each in
    one safetensors file (a u64 header length, the JSON header, the tensors'
    bytes back to back), written one weight at a time."""
    path.mkdir()
    (path / "config.json").write_text("{}")
    shape = [mib * (1 << 20) // 4096, 1024]
    nbytes = shape[0] * shape[1] * 4
    header = {"__metadata__": {"format": "pt"}}
    header.update({f"layer.{i}.weight": {"dtype": "F32", "shape": shape,
                                         "data_offsets": [i * nbytes, (i + 1) * nbytes]} for i in range(count)})
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    rng = np.random.default_rng(0)
    with open(path / "model.safetensors", "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for _ in range(count):
            f.write((rng.standard_normal(shape, dtype=np.float32) * 0.02).tobytes())
    return path


def peak_rss(tmp_path, *args):
    """Peak resident memory in bytes of ``python -m ibp ARGS``, run alone."""
    with open(tmp_path / "log", "w+") as log:
        p = subprocess.Popen([sys.executable, "-m", "ibp", *map(str, args)], stdout=log, stderr=log)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        assert p.returncode == 0, log.read()
    return usage.ru_maxrss * 1024


def test_compress_and_decompress_of_a_model_directory_hold_a_few_tensors(tmp_path):
    tiny = model_dir(tmp_path / "tiny", 1, 1)
    big = model_dir(tmp_path / "big", TENSORS, TENSOR_MIB)
    checkpoint = os.path.getsize(big / "model.safetensors")
    allowed = ALLOWED_TENSORS * TENSOR_MIB << 20
    assert checkpoint > 2.5 * allowed
    for step, src, dst in (("compress", "", "-ibp"), ("decompress", "-ibp", "-back")):
        base = peak_rss(tmp_path, step, f"{tiny}{src}", f"{tiny}{dst}")
        peak = peak_rss(tmp_path, step, f"{big}{src}", f"{big}{dst}")
        assert peak - base < allowed, (step, (peak - base) >> 20, allowed >> 20, checkpoint >> 20)
    assert (big / "model.safetensors").read_bytes() == (tmp_path / "big-back" / "model.safetensors").read_bytes()
