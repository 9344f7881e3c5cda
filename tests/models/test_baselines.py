"""The Transformer++ baseline (``mixer=attention``) and hybrids: sizes equal a Llama's, no TTT-only pieces,
cached generation equal to full recomputation."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tttexp.models import SIZE_PRESETS, TTTCache, build_model


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", list(SIZE_PRESETS))
@pytest.mark.parametrize("kv_heads", [None, "half"])
def test_transformer_parameter_count_equals_llama(size: str, kv_heads: str | None) -> None:
    """Same width, depth, vocab and tying as a transformers Llama: the parameter counts agree to 1 % (they are
    in fact equal). Built on the meta device, so the 1.3b case costs no memory."""
    preset = SIZE_PRESETS[size]
    kv = None if kv_heads is None else preset["num_attention_heads"] // 2
    with torch.device("meta"):
        ours = build_model(vocab_size=32000, mixer="attention", num_key_value_heads=kv, **preset)
        llama = LlamaForCausalLM(LlamaConfig(
            vocab_size=32000, hidden_size=preset["hidden_size"], intermediate_size=preset["intermediate_size"],
            num_hidden_layers=preset["num_hidden_layers"], num_attention_heads=preset["num_attention_heads"],
            num_key_value_heads=kv or preset["num_attention_heads"], tie_word_embeddings=True,
            attention_bias=False, mlp_bias=False,
        ))
    n_ours, n_llama = _count(ours), _count(llama)
    assert abs(n_ours - n_llama) / n_llama < 0.01, (n_ours, n_llama)
    assert n_ours == n_llama


def test_attention_blocks_have_no_ttt_pieces_on_either_backbone() -> None:
    """A Transformer++ has no pre-conv, gate or inner state, whatever model.backbone says; a hybrid's TTT layers
    keep theirs."""
    for backbone in ("mamba", "transformer"):
        model = build_model(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, mixer="attention", backbone=backbone)
        names = [n for n, _ in model.named_parameters()]
        assert not [n for n in names if any(k in n for k in ("conv", "g_proj", "W1", "lr_weight", ".ttt."))]
        assert model.ttt_layers() == [] and model.resolved_kernel("cpu") == "none"
    hybrid = build_model(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, mixer_types=["ttt", "attention"])
    assert [b.mixer for b in hybrid.model.layers] == ["ttt", "attention"]
    assert hybrid.model.layers[0].pre_conv and not hybrid.model.layers[1].pre_conv
    assert len(hybrid.ttt_layers()) == 1


@pytest.mark.parametrize("mixers", [["attention", "attention"], ["ttt", "attention"]])
def test_generate_with_cache_equals_recomputation(mixers: list[str]) -> None:
    """generate() through the KV cache (and TTT state) gives the tokens a full forward pass picks each step."""
    torch.manual_seed(0)
    model = build_model(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, mixer_types=mixers).eval()
    prompt = torch.randint(0, 97, (2, 21))
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(12):
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(cached, ids)


def test_chunked_attention_with_cache_equals_one_pass() -> None:
    """Feeding a sequence in chunks through the cache gives the logits of one pass (RoPE at absolute positions)."""
    torch.manual_seed(1)
    model = build_model(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, mixer="attention").eval()
    ids = torch.randint(0, 50, (2, 40))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = TTTCache(2)
        parts = [model(ids[:, a:b], cache=cache, use_cache=True).logits for a, b in ((0, 16), (16, 17), (17, 40))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-5)


def test_a_carried_attention_cache_keeps_one_chunk_of_keys() -> None:
    """Under state passing an attention layer carries the previous chunk's keys, not the whole stream: chunk c read
    through the trimmed cache equals a fresh pass over chunks c-1 and c (RoPE is relative, so the offset is moot; one
    layer, so that the kept keys saw no earlier chunk through a lower layer)."""
    torch.manual_seed(0)
    model = build_model(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, mixer="attention", backbone="transformer").double().eval()
    chunk = 12
    ids = torch.randint(0, 64, (2, 4 * chunk))
    chunks = ids.split(chunk, dim=1)
    with torch.no_grad():
        cache = TTTCache(1)
        for c, piece in enumerate(chunks):
            logits = model(piece, cache=cache, use_cache=True).logits
            cache.keep_last_keys(chunk)
            assert all(layer.keys.shape[2] == chunk for layer in cache.layers)
            if c:
                fresh = model(torch.cat([chunks[c - 1], piece], dim=1), use_cache=False).logits[:, chunk:]
                torch.testing.assert_close(logits, fresh, rtol=1e-9, atol=1e-9)
