"""Run a decoder with its weights and KV cache IBP-compressed in host memory.

``offload`` keeps every large weight compressed on the host and decodes each
module's weights on the device just before it runs; ``CompressedKVCache``
keeps older tokens' keys and values compressed on the host.  Both are
lossless, so greedy generation gives exactly the tokens of the plain model.

The model here is a small randomly initialised Llama built from a config, so
the script runs offline in seconds; swap in ``AutoModelForCausalLM
.from_pretrained(...)`` for a real one (and ``state=ibp.load(path)`` to start
from a compressed checkpoint, see examples/safetensors_checkpoint.py).

    python examples/llm_offload.py
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ibp.integrations.llm import CompressedKVCache, cache_kwargs, offload


def tiny_llama(seed=0):
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=None, pad_token_id=0,
                         initializer_range=0.3)  # wide weights: varied tokens, a sharper check
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def main(new_tokens=16):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prompt = torch.randint(1, 512, (1, 16), generator=torch.Generator().manual_seed(1))

    plain = tiny_llama().to(device)
    expected = plain.generate(prompt.to(device), max_new_tokens=new_tokens, do_sample=False)

    model = offload(tiny_llama(), device, min_bytes=32 << 10)
    offloader = model.ibp_offloader
    cache = CompressedKVCache(block_tokens=8)
    tokens = model.generate(prompt.to(device), max_new_tokens=new_tokens, do_sample=False,
                            **cache_kwargs(model, cache))

    print(f"weights: {len(offloader.entries)} modules offloaded, {offloader.raw_nbytes / 2**20:.2f} MiB raw, "
          f"{offloader.nbytes / 2**20:.2f} MiB compressed on the host; at most "
          f"{offloader.peak_bytes / 2**20:.2f} MiB of them on {device} at once")
    print(f"kv cache: {cache.get_seq_length()} tokens, "
          f"{cache.compressed_nbytes / 2**10:.1f} KiB compressed on the host")
    print("tokens:", tokens[0, prompt.shape[1]:].tolist())
    same = torch.equal(tokens, expected)
    print("identical to the uncompressed model:", same)
    if not same:
        raise SystemExit("generated tokens differ")
    return tokens, expected


if __name__ == "__main__":
    main()
