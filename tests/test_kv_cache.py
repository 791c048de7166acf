"""ibp.integrations.kv_cache: the compressed KV cache against transformers'
DynamicCache, on tiny randomly initialised decoders (no network)."""
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import ibp  # noqa: E402
from ibp.integrations.kv_cache import CompressedKVCache, CompressedKVLayer, cache_kwargs  # noqa: E402
from ibp.integrations.llm import offload  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def llama(seed=0, layers=2):
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=None, pad_token_id=0, initializer_range=0.3)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def prompt(batch=2, length=12):
    return torch.randint(1, 256, (batch, length), generator=torch.Generator().manual_seed(7))


def generate(model, ids, **kwargs):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                          do_sample=False, **kwargs)


@pytest.fixture
def encodes(monkeypatch):
    """Every ibp.compress call the cache makes: (tokens it encodes, i.e. batch
    entries x positions of a [batch, heads, tokens, head_dim] block; the model
    passed in; the input's device)."""
    calls, real = [], ibp.compress

    def compress(x, *args, model=None, **kwargs):
        calls.append((x.shape[0] * x.shape[-2], model, x.device))
        return real(x, *args, model=model, **kwargs)

    monkeypatch.setattr(ibp, "compress", compress)
    return calls


def encoded(calls):
    return sum(c[0] for c in calls)


def stored_tokens(cache):
    """Tokens held compressed, counting each stored block row once."""
    return sum(b.ct.shape[0] * b.tokens for layer in cache.layers for seq in (layer._k, layer._v) for b in seq.blocks)


def same(plain, packed):
    return len(plain.layers) == len(packed.layers) and all(
        torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) for a, b in zip(plain.layers, packed.layers))


def forward(model, cache, ids):
    with torch.no_grad():
        return model(ids, **cache_kwargs(model, cache), use_cache=True).logits


# -- KV cache ---------------------------------------------------------------------
def test_compressed_kv_cache_generates_identically(encodes):
    model, ids = llama(), prompt()
    plain, cache = DynamicCache(), CompressedKVCache(block_tokens=4)
    got = generate(model, ids, **cache_kwargs(model, cache))
    assert torch.equal(got, generate(model, ids, **cache_kwargs(model, plain))) and same(plain, cache)
    assert all(isinstance(layer, CompressedKVLayer) for layer in cache.layers) and len(cache.layers) == 2
    assert cache.get_seq_length() == 12 + 12 - 1
    assert all(layer._k.compressed == layer._v.compressed == 20 for layer in cache.layers)  # of 23 tokens
    assert cache.compressed_nbytes > 0
    assert encoded(encodes) == stored_tokens(cache) == 2 * 2 * 2 * 20  # layers x K/V x batch x tokens: each once
    assert all(device == torch.device("cpu") for _, _, device in encodes)  # handed the cache's own tensors


def test_each_layer_learns_its_model_once_and_reuses_it(encodes):
    model, ids = llama(), prompt()
    cache = CompressedKVCache(block_tokens=4)
    generate(model, ids, **cache_kwargs(model, cache))
    assert sum(m is None for _, m, _ in encodes) == 2 * 2  # the first block of each layer's K and of its V
    for layer in cache.layers:
        for seq in (layer._k, layer._v):
            assert len(seq.blocks) == 5 and all(b.ct.model is seq.model for b in seq.blocks)


def test_beam_search_encodes_each_token_once(encodes):
    model, ids = llama(), prompt()
    greedy = CompressedKVCache(block_tokens=4)
    generate(model, ids, **cache_kwargs(model, greedy))
    greedy_tokens = encoded(encodes)
    encodes.clear()
    plain, cache = DynamicCache(), CompressedKVCache(block_tokens=4)
    want = generate(model, ids, num_beams=3, **cache_kwargs(model, plain))
    assert torch.equal(generate(model, ids, num_beams=3, **cache_kwargs(model, cache)), want)
    assert same(plain, cache)
    assert encoded(encodes) == stored_tokens(cache) == 3 * greedy_tokens  # 3 beams, no history re-encoded
    assert any(b.rows is not None for layer in cache.layers for b in layer._k.blocks)  # reordered by index


def test_batch_operations_keep_the_blocks(encodes):
    model, ids = llama(), prompt(3)
    plain, packed = DynamicCache(), CompressedKVCache(block_tokens=5)
    forward(model, plain, ids)
    forward(model, packed, ids)
    assert same(plain, packed) and encoded(encodes) == 2 * 2 * 3 * 10
    before = [b.ct for layer in packed.layers for b in layer._k.blocks]
    encodes.clear()
    for op in (lambda c: c.batch_select_indices(torch.tensor([2, 0])), lambda c: c.batch_repeat_interleave(3),
               lambda c: c.reorder_cache(torch.tensor([5, 0, 0, 2, 1, 4])), lambda c: c.batch_select_indices(
                   torch.tensor([True, False, True, True, False, False])), lambda c: c.reorder_cache(torch.tensor([2, 1, 0]))):
        op(plain)
        op(packed)
        assert same(plain, packed) and plain.get_seq_length() == packed.get_seq_length()
    assert encodes == [] and [b.ct for layer in packed.layers for b in layer._k.blocks] == before
    nxt = prompt(3, 7)
    assert torch.equal(forward(model, plain, nxt), forward(model, packed, nxt)) and same(plain, packed)
    assert encoded(encodes) == 2 * 2 * 3 * 5  # the one new block: 12 + 7 tokens = 3 blocks of 5 + 4


@pytest.mark.parametrize("remove", [1, 2, 4, 5, 7, 10, 12, 30])
def test_crop_drops_blocks_without_encoding(encodes, remove):
    model, ids = llama(), prompt(2, 12)
    plain, packed = DynamicCache(), CompressedKVCache(block_tokens=5)
    forward(model, plain, ids)
    forward(model, packed, ids)   # two blocks of 5 compressed, 2 raw tokens
    encodes.clear()
    plain.crop(-remove)
    packed.crop(-remove)
    assert encodes == [] and same(plain, packed) and plain.get_seq_length() == packed.get_seq_length()
    kept = max(0, 12 - remove)
    assert all(layer._k.compressed == kept // 5 * 5 for layer in packed.layers)
    nxt = prompt(2, 6)
    assert torch.equal(forward(model, plain, nxt), forward(model, packed, nxt)) and same(plain, packed)
    assert encoded(encodes) == 2 * 2 * 2 * ((kept + 6) // 5 * 5 - kept // 5 * 5)  # only the new full blocks


def test_crop_follows_the_installed_dynamic_cache():
    model, ids = llama(), prompt()
    plain, packed = DynamicCache(), CompressedKVCache(block_tokens=5)
    forward(model, plain, ids)
    forward(model, packed, ids)
    for length in (0, 7, 30):
        try:
            plain.crop(length)
        except ValueError:
            with pytest.raises(ValueError):
                packed.crop(length)
        else:
            packed.crop(length)
        assert same(plain, packed) and plain.get_seq_length() == packed.get_seq_length()


def test_reset_and_reuse():
    model, ids = llama(), prompt()
    plain, packed = DynamicCache(), CompressedKVCache(block_tokens=5)
    forward(model, packed, prompt(2, 9))
    packed.reset()
    assert packed.get_seq_length() == 0 and packed.compressed_nbytes == 0
    forward(model, plain, ids)
    forward(model, packed, ids)
    assert same(plain, packed)


def test_offload_and_kv_cache_together():
    ref, ids = llama(), prompt()
    model = offload(llama(), "cpu", min_bytes=4096)
    cache = CompressedKVCache(block_tokens=8)
    assert torch.equal(generate(model, ids, **cache_kwargs(model, cache)), generate(ref, ids))


def test_kv_cache_refuses_bad_block_size():
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(ValueError):
            CompressedKVCache(block_tokens=bad)
        with pytest.raises(ValueError):
            CompressedKVLayer(block_tokens=bad)


def test_kv_cache_benchmark_runs_on_the_cpu(monkeypatch):
    from ibp.bench import e2e_kv_cache, gpu
    rng = np.random.default_rng(0)
    kv = {f"layer0.{part}": rng.standard_normal((1, 2, 70, 16)).astype(np.float32) for part in ("key", "value")}
    monkeypatch.setattr(gpu, "load_dataset", lambda name, pack=None: kv if name == "minilm-kv" else None)
    tiny = dict(e2e_kv_cache.TINY, prompt_tokens=20, new_tokens=4, block_tokens=8)
    entry = e2e_kv_cache.kv_cache(torch.device("cpu"), config=tiny)
    assert entry["identical"] and entry["ibp_tokens_per_s"] > 0 and entry["offloaded_cache_tokens_per_s"] is None
    assert entry["ibp_tokens_encoded"] == 2 * 2 * 2 * 16  # layers x K/V x batch x 2 blocks of 8 (of 23 tokens)
    assert 0 < entry["ibp_compressed_bytes"] and entry["ibp_compressed_raw_bytes"] == 2 * 2 * 2 * 16 * 2 * 16 * 4
    real = entry["real_kv"]
    assert real["float32"]["exact"] and real["bfloat16"]["exact"]
    assert real["float32"]["raw_bytes"] == 2 * 2 * 64 * 16 * 4 and real["float32"]["ratio"] > 0


# -- GPU --------------------------------------------------------------------------
@pytest.mark.gpu
@requires_cuda
def test_cuda_kv_cache_encodes_on_the_device(encodes):
    model, ids = llama().cuda(), prompt().cuda()
    plain, cache = DynamicCache(), CompressedKVCache(block_tokens=4)
    want = generate(model, ids, num_beams=3, **cache_kwargs(model, plain))
    assert torch.equal(generate(model, ids, num_beams=3, **cache_kwargs(model, cache)), want)
    assert same(plain, cache)
    assert encodes and all(device.type == "cuda" for _, _, device in encodes)  # no raw copy to the host first
    assert all(b.ct.is_pinned() for layer in cache.layers for seq in (layer._k, layer._v) for b in seq.blocks)
    assert encoded(encodes) == stored_tokens(cache)
