"""ibp.integrations.kv_cache: the compressed KV cache against transformers'
DynamicCache, on tiny randomly initialised decoders (no network)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

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


# -- KV cache ---------------------------------------------------------------------
def test_compressed_kv_cache_generates_identically():
    model, ids = llama(), prompt()
    cache = CompressedKVCache(block_tokens=4)
    got = generate(model, ids, **cache_kwargs(model, cache))
    assert torch.equal(got, generate(model, ids))
    assert all(isinstance(layer, CompressedKVLayer) for layer in cache.layers) and len(cache.layers) == 2
    assert cache.get_seq_length() == 12 + 12 - 1
    assert all(layer._k.compressed == layer._v.compressed == 20 for layer in cache.layers)  # of 23 tokens
    assert cache.compressed_nbytes > 0


def test_compressed_kv_cache_holds_the_same_tensors():
    model, ids = llama(), prompt()
    plain, packed = DynamicCache(), CompressedKVCache(block_tokens=5)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, plain), use_cache=True)
        model(ids, **cache_kwargs(model, packed), use_cache=True)

    def same():
        return all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                   for a, b in zip(plain.layers, packed.layers))

    assert same()
    for op in (lambda c: c.crop(-3), lambda c: c.batch_select_indices(torch.tensor([1])),
               lambda c: c.batch_repeat_interleave(2), lambda c: c.reorder_cache(torch.tensor([1, 0]))):
        op(plain)
        op(packed)
        assert same() and plain.get_seq_length() == packed.get_seq_length()
    nxt = prompt(2, 7)
    with torch.no_grad():
        a = model(nxt, **cache_kwargs(model, plain), use_cache=True).logits
        b = model(nxt, **cache_kwargs(model, packed), use_cache=True).logits
    assert torch.equal(a, b) and same()
    packed.reset()
    assert packed.get_seq_length() == 0


def test_offload_and_kv_cache_together():
    ref, ids = llama(), prompt()
    model = offload(llama(), "cpu", min_bytes=4096)
    cache = CompressedKVCache(block_tokens=8)
    assert torch.equal(generate(model, ids, **cache_kwargs(model, cache)), generate(ref, ids))


def test_kv_cache_refuses_bad_block_size():
    with pytest.raises(ValueError):
        CompressedKVCache(block_tokens=0)
    with pytest.raises(ValueError):
        CompressedKVLayer(block_tokens=2.5)


# -- GPU --------------------------------------------------------------------------
@pytest.mark.gpu
@requires_cuda
def test_cuda_kv_cache_generates_identically():
    model, ids = llama().cuda(), prompt().cuda()
    cache = CompressedKVCache(block_tokens=4)
    assert torch.equal(generate(model, ids, **cache_kwargs(model, cache)), generate(model, ids))
    assert all(ct.is_pinned() for layer in cache.layers for ct in layer._k.blocks)


