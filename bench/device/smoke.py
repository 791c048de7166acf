"""Correctness smoke of every GPU path against the CPU decoder, for the GPU
run (bench/device/run): each word width x layout x path (zero-copy gather,
stream, device-resident, pinned and unpinned sources) on a small tensor,
bit for bit, every output poisoned first.  ``--shapes`` forces each kernel
team shape of ibp.cuda.SHAPES once instead (the compute-sanitizer run).
``--dry-run`` builds the cases and their CPU results only (no GPU).
Each case is also compressed on the GPU (ibp.cuda_encode) with its model,
pinned and device payloads (and once with a model learned there), in
several D2H chunks, and must give the CPU encoder's kinds, payload and row
index, with one host wait for the packed layout, none for the slotted one
(torch's sync debug mode raising on any other); ``encode_extras`` adds
bf16, a non-contiguous view, a padded last unit, one element, 0-d and
empty tensors, a second stream sharing the model, and update_rows from
CUDA values.

    PYTHONPATH=. python3 bench/device/smoke.py [--shapes] [--dry-run]
"""
import argparse
import sys
import traceback

import numpy as np

import ibp
from ibp import cuda

WORD_BITS = (8, 16, 32, 64)
LAYOUTS = ("packed", "slotted")


def sample(rng, rows, cols):
    """float64 rows sharing most bits, a tenth of the words random bit patterns."""
    base = 1.5 + rng.standard_normal((rows, cols)) * 0.01
    bits = rng.integers(0, 1 << 63, (rows, cols)).view(np.float64)
    return np.where(rng.random((rows, cols)) < 0.1, bits, base)


def cases(rows, cols):
    """[(label, ct, index, expect_whole, expect_rows)] for every word width x layout."""
    rng = np.random.default_rng(0)
    x = sample(rng, rows, cols)
    index = rng.integers(-rows, rows, 97)
    out = []
    for W in WORD_BITS:
        for layout in LAYOUTS:
            ct = ibp.compress(x, word_bits=W, layout=layout)
            expect, expect_rows = ibp.decompress(ct), ibp.decompress(ct, index=index)
            if expect.tobytes() != x.tobytes() or expect_rows.tobytes() != x[index].tobytes():
                raise RuntimeError(f"CPU round trip differs (W={W}, {layout})")
            out.append((f"W={W} {layout}", ct, index, expect, expect_rows))
    return out


def run_paths(torch, ct, index, expect, expect_rows, few=False):
    """path label -> True when the GPU result equals the CPU's; ``few``: one
    whole-tensor decode in place, one streamed, one gather (the sanitizer run)."""
    pinned, resident = ct.pin_memory(), cuda.to_device(ct)
    gpu_index = torch.from_numpy(index).cuda()
    whole = {"pinned zero-copy": dict(ct=pinned, path="zero-copy"), "pinned stream": dict(ct=pinned, path="stream"),
             "unpinned stream": dict(ct=ct, path="stream"), "unpinned auto": dict(ct=ct),
             "device-resident": dict(ct=resident)}
    rows = {"gather pinned zero-copy": pinned, "gather device-resident": resident, "gather unpinned": ct}
    if few:
        whole = {k: whole[k] for k in ("pinned zero-copy", "pinned stream")}
        rows = {k: rows[k] for k in ("gather pinned zero-copy",)}
    got = {}
    for label, kw in whole.items():
        out = torch.empty(expect.shape, dtype=torch.float64, device="cuda")
        out.view(torch.uint8).fill_(0xFF)
        cuda.decompress(out=out, sync=True, **kw)
        got[label] = out.cpu().numpy().tobytes() == expect.tobytes()
    for label, source in rows.items():
        out = torch.empty(expect_rows.shape, dtype=torch.float64, device="cuda")
        out.view(torch.uint8).fill_(0xFF)
        cuda.decompress(source, index=gpu_index, out=out, sync=True)
        got[label] = out.cpu().numpy().tobytes() == expect_rows.tobytes()
    return got


def encode_paths(torch, x, ct):
    """path label -> True when the GPU encoder gives ``ct``'s bytes, and
    waits as often as it should."""
    x_dev = torch.from_numpy(x).cuda()
    got = {}
    for payload in ("pinned", "device"):
        g = ibp.compress(x_dev, model=ct.model, layout=ct.layout, payload=payload)
        got[f"encode {payload}"] = same_encoding(g, ct)
    learned = ibp.compress(x_dev, layout=ct.layout)
    got["encode learned"] = same_encoding(learned, ibp.compress(x, model=learned.model, layout=ct.layout))
    for label, model in (("given", ct.model), ("learned", None)):
        got[f"encode {label} waits"] = waits_as_documented(torch, x_dev, model, ct.layout)
    return got


def waits_as_documented(torch, x_dev, model, layout):
    """One host wait (cuda_encode.host_wait) for a packed compress, none for a
    slotted one, and no blocking torch call (sync debug mode "error")."""
    from ibp import cuda_encode
    waits, real_wait = [], cuda_encode.host_wait
    cuda_encode.host_wait = lambda event: (waits.append(event), real_wait(event))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ibp.compress(x_dev, model=model, layout=layout)
    except RuntimeError as e:
        print(f"     blocking call in a {layout} compress: {e}")
        return False
    finally:
        torch.cuda.set_sync_debug_mode(0)
        cuda_encode.host_wait = real_wait
    return len(waits) == (layout == "packed")


def encode_extras(torch):
    """label -> True for GPU encodes of odd inputs, each giving the CPU
    encoder's file bytes for the same model."""
    rng = np.random.default_rng(1)
    weights = torch.from_numpy((rng.standard_normal((300, 64)) * 0.02).astype(np.float32))
    tensors = {"bf16": weights.to(torch.bfloat16), "non-contiguous": weights[:, 1:63],
               "padded last unit": weights[:100, :5].contiguous(), "one element": weights[:1, :1],
               "0-d": weights[0, 0].clone(), "empty": weights[:0]}
    got = {}
    for label, x in tensors.items():
        for layout in LAYOUTS:
            x_dev = x.cuda()
            model = ibp.compress(x, layout=layout).model
            given = ibp.compress(x_dev, model=model, layout=layout)
            learned = ibp.compress(x_dev, layout=layout)
            got[f"encode {label} {layout}"] = (
                given.to_bytes() == ibp.compress(x, model=model, layout=layout).to_bytes()
                and learned.to_bytes() == ibp.compress(x, model=learned.model, layout=layout).to_bytes())
    x_dev, model = weights.cuda(), ibp.analyze(weights.numpy())
    torch.cuda.synchronize()
    first = ibp.compress(x_dev, model=model, layout="slotted")   # uploads the model's table, waits for nothing
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):            # the same model at once on another stream, on a tensor made there
        on_side = ibp.compress(x_dev * 1.0, model=model, layout="slotted")
    expect = ibp.compress(weights, model=model, layout="slotted").to_bytes()
    got["encode two streams, one model"] = first.to_bytes() == expect and on_side.to_bytes() == expect
    rows = rng.integers(0, 300, 40)                       # repeats too: the last value wins
    new = torch.from_numpy((rng.standard_normal((40, 64)) * 0.5).astype(np.float32))
    for unit_rows in (None, 1):
        expect = ibp.compress(weights, model=model, layout="slotted", unit_rows=unit_rows)
        host = ibp.compress(weights, model=model, layout="slotted", unit_rows=unit_rows)
        on_gpu = ibp.compress(x_dev, model=model, layout="slotted", unit_rows=unit_rows, payload="device")
        expect.update_rows(rows, new)
        host.update_rows(rows, new.cuda())
        on_gpu.update_rows(rows, new.cuda())
        got[f"update_rows from CUDA unit_rows={unit_rows}"] = (
            host.to_bytes() == expect.to_bytes() and on_gpu.to_bytes() == expect.to_bytes()
            and on_gpu.device_payload.cpu().numpy().tobytes() == expect.payload.tobytes())
    return got


def same_encoding(a, b):
    """Equal kinds, payload and (packed) payload bits and row index, whatever
    framework each came from."""
    same = a.kinds.tobytes() == b.kinds.tobytes() and a.payload.tobytes() == b.payload.tobytes()
    if a.layout == "packed":
        same = same and a.payload_bits == b.payload_bits and (a.index is None) == (b.index is None)
        same = same and (a.index is None or a.index[:2] == b.index[:2] and all(
            p.tobytes() == q.tobytes() for p, q in zip(a.index[2:], b.index[2:])))
    return same


def reported(label, check, *args):
    """``check(*args)``, or {label: False} with the traceback printed when it
    raises, so one broken encoder path hides none of the other results."""
    try:
        return check(*args)
    except Exception:
        traceback.print_exc()
        return {f"{label} (raised)": False}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", action="store_true", help="force each kernel team shape once (sanitizer run)")
    p.add_argument("--dry-run", action="store_true", help="build the cases only, no GPU")
    args = p.parse_args(argv)
    # small under the sanitizer (every access is checked), larger otherwise so streams use several chunks
    todo = cases(40, 24) if args.shapes else cases(3000, 40)
    shapes = cuda.SHAPES if args.shapes else (None,)
    print(f"smoke: {len(todo)} cases x {len(shapes)} team shapes")
    if args.dry_run:
        return 0
    import torch
    from ibp import cuda_encode
    if args.shapes:
        cuda.CHUNK_BYTES, cuda.STREAM_MIN_BYTES = 4096, 0
        cuda_encode.CHUNK_BYTES = 1024            # the packed encoder's D2H in several chunks
    else:
        cuda.CHUNK_BYTES = 64 << 10               # several chunks, so the ring of device buffers wraps
        cuda_encode.CHUNK_BYTES = 64 << 10
    failed = 0
    choose = cuda.team_shape
    for shape in shapes:
        cuda.team_shape = choose if shape is None else (lambda unit_words, job_words, s=shape: s)
        for label, ct, index, expect, expect_rows in todo:
            paths = run_paths(torch, ct, index, expect, expect_rows, args.shapes)
            if shape is None or shape == shapes[0]:
                paths.update(reported("encode", encode_paths, torch, expect, ct))
            for path, ok in paths.items():
                failed += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {label} {path}" + (f" shape={shape}" if shape else ""))
    cuda.team_shape = choose
    for path, ok in reported("encode extras", encode_extras, torch).items():
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {path}")
    cuda.check()
    print(f"smoke: {failed} failures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
