"""Converting a Llama into a TTT (or hybrid) model, on a tiny Llama built here with random weights."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tttexp.models import TTTCache, TTTConfig, TTTForCausalLM
from tttexp.models.convert import (
    ConversionError,
    check_convertible,
    convert_llama,
    freeze_pretrained,
    mean_attention_outputs,
    new_parameter_names,
    parse_layers,
)

VOCAB = 97


def tiny_llama(tie: bool = False, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=1e5, rms_norm_eps=1e-5,
                      tie_word_embeddings=tie, **overrides)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # RMSNorm weights start at 1: make them informative, so a wrong copy shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def layer_outputs(base: LlamaForCausalLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """Input of layer 0, then each decoder layer's output."""
    outs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in base.model.layers]
    with torch.no_grad():
        base(ids)
    for h in hooks:
        h.remove()
    return [base.model.embed_tokens(ids).detach(), *outs]


def test_layers_kept_as_attention_are_bit_identical_to_the_base():
    base = tiny_llama()
    model = convert_llama(base, "1,3").eval()
    assert model.config.mixer_types == ["attention", "ttt", "attention", "ttt"]
    ids = torch.randint(0, VOCAB, (2, 37))
    ref = layer_outputs(base, ids)
    with torch.no_grad():
        assert torch.equal(model.model.embed_tokens(ids), ref[0])
        for i in (0, 2):
            out = model.model.layers[i](ref[i], None, 0, None, None)
            assert torch.equal(out, ref[i + 1]), i
        # final norm + untied LM head are copies too
        assert torch.equal(model.lm_head(model.model.norm(ref[-1])), base.lm_head(base.model.norm(ref[-1])))


def test_whole_model_matches_the_base_with_the_converted_attention_removed():
    """Gate and bias at 0 make a converted layer's mixer output 0; zeroing that attention's output in the base
    must then give the same logits bit for bit (tied embeddings here)."""
    base = tiny_llama(tie=True)
    model = convert_llama(base, "0")
    with torch.no_grad():
        model.model.layers[0].ttt.output_bias.zero_()
        base.model.layers[0].self_attn.o_proj.weight.zero_()
    ids = torch.randint(0, VOCAB, (3, 21))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_converted_layer_projections_repeat_grouped_kv_heads():
    base = tiny_llama()
    model = convert_llama(base, "all")
    attn, ttt = base.model.layers[2].self_attn, model.model.layers[2].ttt
    f, groups = 16, 2
    assert torch.equal(ttt.q_proj.weight, attn.q_proj.weight)
    assert torch.equal(ttt.o_proj.weight, attn.o_proj.weight)
    for head in range(4):  # query head h reads K/V head h // groups
        kv = head // groups
        rows, src = slice(head * f, (head + 1) * f), slice(kv * f, (kv + 1) * f)
        assert torch.equal(ttt.k_proj.weight[rows], attn.k_proj.weight[src])
        assert torch.equal(ttt.v_proj.weight[rows], attn.v_proj.weight[src])
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (64, 4, 4, 96)
    assert (cfg.vocab_size, cfg.backbone, cfg.rope_theta, cfg.rms_norm_eps) == (VOCAB, "transformer", 1e5, 1e-5)


def test_gated_residual_starts_as_mean_ablation():
    """With the gate closed, a converted layer adds the base attention's mean output over the calibration data."""
    base = tiny_llama()
    calib = [torch.randint(0, VOCAB, (2, 16)) for _ in range(2)]
    model = convert_llama(base, "1", calibration=calib).eval()
    means = mean_attention_outputs(base, [1], calib)
    ttt = model.model.layers[1].ttt
    assert torch.equal(ttt.output_bias, means[1]) and not ttt.output_gate.any()
    h = torch.randn(2, 9, 64)
    layer = base.model.layers[1]
    with torch.no_grad():
        expected = h + means[1]
        expected = expected + layer.mlp(layer.post_attention_layernorm(expected))
        assert torch.allclose(model.model.layers[1](h, None, 0, None, None), expected, atol=1e-6, rtol=0)


def test_freeze_leaves_only_the_new_ttt_parameters_trainable():
    model = convert_llama(tiny_llama(), "every_other")
    assert model.config.mixer_types == ["attention", "ttt", "attention", "ttt"]
    trainable = freeze_pretrained(model)
    assert trainable == sorted(new_parameter_names(model))
    assert {n.split(".ttt.")[1] for n in trainable} == {
        "lr_weight", "lr_bias", "learnable_token_idx", "ttt_norm_weight", "ttt_norm_bias", "W1", "b1",
        "post_norm.weight", "post_norm.bias", "output_gate", "output_bias"}
    assert all(".layers.1." in n or ".layers.3." in n for n in trainable)
    ids = torch.randint(0, VOCAB, (2, 20))
    model.train()
    model(ids, labels=ids).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == set(trainable)


def test_converted_hybrid_saves_and_reloads(tmp_path):
    base = tiny_llama()
    model = convert_llama(base, "0,2", ttt_layer="mlp", calibration=[torch.randint(0, VOCAB, (2, 16))]).eval()
    with torch.no_grad():
        for layer in model.ttt_layers():
            layer.output_gate.normal_()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, TTTForCausalLM)
    assert loaded.config.mixer_types == ["ttt", "attention", "ttt", "attention"]
    assert loaded.config.num_key_value_heads == 2 and loaded.config.ttt_output_gate
    ids = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_hybrid_continues_chunk_by_chunk_and_generates():
    model = convert_llama(tiny_llama(), "1,2").to(torch.float64).eval()
    with torch.no_grad():
        for layer in model.ttt_layers():
            layer.output_gate.normal_()
    ids = torch.randint(0, VOCAB, (2, 45))
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits
        cache = TTTCache(4)
        pieces = [model(ids[:, a:b], cache=cache, use_cache=True).logits
                  for a, b in [(0, 5), (5, 16), (16, 44), (44, 45)]]
    assert cache.layers[0].keys.shape == (2, 2, 45, 16)
    assert (torch.cat(pieces, 1) - whole).abs().max() < 1e-10
    model = model.float()
    prompt = ids[:, :9]  # 9 + 8 tokens: generation crosses a mini-batch boundary
    out = model.generate(prompt, max_new_tokens=8, do_sample=False)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_attention_layers_respect_document_starts_across_chunks():
    cfg = TTTConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, backbone="transformer", mixer_types=["attention", "ttt"])
    model = TTTForCausalLM(cfg).to(torch.float64).eval()
    ids = torch.randint(0, 61, (2, 64))
    starts = torch.tensor([[False, True, False, True], [False, False, True, False]])
    with torch.no_grad():
        whole = model(ids, doc_starts=starts, use_cache=False).logits
        alone = model(ids[1:, 32:], use_cache=False).logits
        cache = TTTCache(2)
        first = model(ids[:, :32], doc_starts=starts[:, :2], cache=cache, use_cache=True).logits
        second = model(ids[:, 32:], doc_starts=starts[:, 2:], cache=cache, use_cache=True).logits
    assert (torch.cat([first, second], 1) - whole).abs().max() < 1e-10
    assert (whole[1:, 32:] - alone).abs().max() < 1e-10


@pytest.mark.parametrize(("spec", "expected"), [
    ("all", [0, 1, 2, 3, 4]), ("every_other", [1, 3]), ("0,2, 4", [0, 2, 4]), ("3", [3]), ([4, 1], [1, 4]),
])
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 5) == expected


@pytest.mark.parametrize("spec", ["", "5", "-1", "1,1", "odd", "1;2"])
def test_bad_layer_lists_are_one_line(spec):
    with pytest.raises(ConversionError) as err:
        parse_layers(spec, 5)
    message = str(err.value)
    assert "\n" not in message and ("0..4" in message or "every_other" in message)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"head_dim": 32}, "head dim 32 x 4 heads != hidden size 64"),
    ({"attention_bias": True}, "biases"),
    ({"hidden_act": "gelu"}, "activation 'gelu'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "RoPE scaling 'linear'"),
])
def test_inexact_llama_variants_are_refused_with_one_line(overrides, message):
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, **overrides)
    with pytest.raises(ConversionError, match=message) as err:
        check_convertible(cfg)
    assert "\n" not in str(err.value)


def test_other_architectures_are_refused_by_name():
    from transformers import GPT2Config

    with pytest.raises(ConversionError, match=r"architecture gpt2 is not supported: only llama, mistral") as err:
        check_convertible(GPT2Config())
    assert "\n" not in str(err.value)


def test_mixer_types_are_validated():
    with pytest.raises(ValueError, match="model.mixer_types must list 2 entries") as err:
        TTTConfig(num_hidden_layers=2, mixer_types=["ttt", "mamba"])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="num_key_value_heads must be a positive divisor"):
        TTTConfig(num_attention_heads=12, num_key_value_heads=5)
