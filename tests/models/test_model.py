"""TTTForCausalLM: continuation, generation, save/load, presets, resets and bad input."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tttexp.models import SIZE_PRESETS, TTTCache, TTTConfig, TTTForCausalLM


def small_model(backbone="mamba", layer="linear", dtype=torch.float64, **kw):
    cfg = TTTConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=2, backbone=backbone, ttt_layer=layer, **kw)
    return TTTForCausalLM(cfg).to(dtype).eval()


@pytest.mark.parametrize("backbone", ["mamba", "transformer"])
@pytest.mark.parametrize("layer", ["linear", "mlp"])
def test_chunked_pass_with_carried_state_equals_one_pass(backbone, layer):
    model = small_model(backbone, layer)
    ids = torch.randint(0, 61, (3, 53))
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits
        cache = TTTCache(2)
        pieces = [model(ids[:, a:b], cache=cache, use_cache=True).logits
                  for a, b in [(0, 7), (7, 16), (16, 41), (41, 42), (42, 53)]]
    assert cache.seqlen_offset == 53
    assert (torch.cat(pieces, 1) - whole).abs().max() < 1e-9


@pytest.mark.parametrize("layer", ["linear", "mlp"])
def test_greedy_generate_equals_repeated_full_forward(layer):
    model = small_model("mamba", layer, dtype=torch.float32)
    prompt = torch.randint(0, 61, (2, 13))
    out = model.generate(prompt, max_new_tokens=24, do_sample=False)
    seq = prompt
    with torch.no_grad():
        for _ in range(24):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_save_pretrained_round_trip(tmp_path):
    model = small_model("mamba", "mlp", dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].ttt.learnable_token_idx.normal_()
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "tttexp"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, TTTForCausalLM)
    ids = torch.randint(0, 61, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_doc_starts_make_each_document_independent():
    model = small_model("mamba", "linear")
    k = model.config.mini_batch_size
    a, b = torch.randint(0, 61, (1, 2 * k)), torch.randint(0, 61, (1, k + 5))
    joined = torch.cat([a, b], 1)
    starts = torch.tensor([[True, False, True, False]])
    with torch.no_grad():
        together = model(joined, doc_starts=starts, use_cache=False).logits
        alone = model(b, use_cache=False).logits
        plain = model(joined, use_cache=False).logits
    assert (together[:, 2 * k :] - alone).abs().max() < 1e-12
    assert (plain[:, 2 * k :] - alone).abs().max() > 1e-6


def test_doc_starts_with_carried_state_across_chunks():
    model = small_model("mamba", "mlp")
    ids = torch.randint(0, 61, (2, 64))
    starts = torch.rand(2, 4) < 0.5
    with torch.no_grad():
        whole = model(ids, doc_starts=starts, use_cache=False).logits
        cache = TTTCache(2)
        first = model(ids[:, :32], doc_starts=starts[:, :2], cache=cache, use_cache=True).logits
        second = model(ids[:, 32:], doc_starts=starts[:, 2:], cache=cache, use_cache=True).logits
    assert (torch.cat([first, second], 1) - whole).abs().max() < 1e-9


def test_inner_state_is_fp32_under_bf16_autocast():
    model = small_model("mamba", "linear", dtype=torch.float32)
    ids = torch.randint(0, 61, (2, 40))
    cache = TTTCache(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, cache=cache, use_cache=True).logits
    assert torch.isfinite(out).all()
    for layer in cache.layers:
        assert all(t.dtype == torch.float32 for t in (*layer.ttt, *layer.pending))


def test_training_gradients_reach_every_parameter():
    model = small_model("mamba", "mlp", dtype=torch.float32).train()
    ids = torch.randint(0, 61, (2, 40))
    out = model(ids, labels=ids)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


@pytest.mark.parametrize("size", ["125m", "350m", "760m", "1.3b"])
def test_preset_parameter_counts_match_same_width_llama(size):
    preset = SIZE_PRESETS[size]
    with torch.device("meta"):
        ttt = TTTForCausalLM(TTTConfig.from_size(size, vocab_size=32000))
        llama = LlamaForCausalLM(LlamaConfig(
            vocab_size=32000, hidden_size=preset["hidden_size"], intermediate_size=preset["intermediate_size"],
            num_hidden_layers=preset["num_hidden_layers"], num_attention_heads=preset["num_attention_heads"],
            tie_word_embeddings=True))
    n_ttt = sum(p.numel() for p in ttt.parameters())
    n_llama = sum(p.numel() for p in llama.parameters())
    assert abs(n_ttt / n_llama - 1) < 0.02, (size, n_ttt, n_llama)


def test_presets_match_the_paper():
    assert SIZE_PRESETS["125m"] == {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                                    "intermediate_size": 2048}
    assert SIZE_PRESETS["350m"] == {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                                    "intermediate_size": 2736}
    assert SIZE_PRESETS["760m"] == {"hidden_size": 1536, "num_hidden_layers": 24, "num_attention_heads": 16,
                                    "intermediate_size": 4096}
    assert SIZE_PRESETS["1.3b"] == {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32,
                                    "intermediate_size": 5504}
    assert TTTConfig.from_size("760m").head_dim == 96


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"hidden_size": 100, "num_attention_heads": 3}, "must be divisible by model.num_attention_heads"),
    ({"ttt_layer": "conv"}, r"model.ttt_layer must be one of \['linear', 'mlp'\]"),
    ({"backbone": "rnn"}, r"model.backbone must be one of \['mamba', 'transformer'\]"),
    ({"kernel": "cuda"}, "model.kernel must be one of"),
    ({"num_hidden_layers": 0}, "model.num_hidden_layers must be a positive integer"),
])
def test_bad_config_is_one_clear_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        TTTConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_kernel_settings_reach_the_op_and_keep_the_gradients(monkeypatch):
    """``kernel_settings`` of the config run TTT-MLP's split backward in every layer (the interpreter on the CPU),
    with the default backward's gradients."""
    pytest.importorskip("triton")
    from tttexp.ops.dispatch import triton_available
    from tttexp.ops.ttt_mlp import op

    if not triton_available():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    calls = []
    real = op.mlp_backward_split
    monkeypatch.setattr(op, "mlp_backward_split", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = torch.randint(0, 61, (1, 20), device=device)
    grads = []
    for settings in ({}, {"split_bwd": True}):
        torch.manual_seed(0)
        model = small_model("mamba", "mlp", dtype=torch.float32, kernel="triton", kernel_settings=settings)
        model = model.to(device).train()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        assert len(calls) == (2 if settings else 0)  # one split backward per layer, and only when asked for
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert ((grads[1][name] - g).norm() / g.norm().clamp_min(1e-12)) < 1e-5, name


def test_decoding_with_the_triton_decode_kernel_equals_one_pass():
    """Token-by-token continuation through the Triton decode kernel (the interpreter on the CPU)."""
    pytest.importorskip("triton")
    from tttexp.ops.dispatch import triton_available

    if not triton_available():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = small_model("mamba", "linear", dtype=torch.float32, kernel="triton").to(device)
    ids = torch.randint(0, 61, (2, 21), device=device)
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits
        cache = TTTCache(2)
        pieces = [model(ids[:, :16], cache=cache, use_cache=True).logits]
        pieces += [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(16, 21)]
    assert ((torch.cat(pieces, 1) - whole).norm() / whole.norm()) < 1e-5
