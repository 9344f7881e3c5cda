"""The paper's recipes in ``conf/experiment/``: they compose, build, and carry the published numbers."""

from __future__ import annotations

import re

import pytest
from hydra.utils import instantiate

from tttexp.app.build import build_layout
from tttexp.app.preflight import CONF_DIR, check, compose_config
from tttexp.app.schemas import validate
from tttexp.distributed import ProcessLayout

RECIPES = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml") if re.match(r"[\d.]+[mb]_ttt_", p.stem))
GPUS = 8  # the recipes' assumption: batch_size x grad_accum_steps x 8 GPUs sequences per optimizer step
TOKENS_PER_STEP = 2**19  # 0.5M
# size: (peak LR, optimizer steps, token budget ~ 20 tokens per parameter), as in the public JAX scripts
PAPER = {"125m": (3e-3, 4800, 2.5e9), "350m": (1.5e-3, 13500, 7e9), "760m": (1.25e-3, 29000, 15e9),
         "1.3b": (1e-3, 50000, 26e9)}


def parts(name: str) -> tuple[str, str, str]:
    size, layer, ctx = re.fullmatch(r"([\d.]+[mb])_ttt_(linear|mlp)_(\d+k)", name).groups()
    return size, layer, ctx


def test_every_size_and_layer_has_a_2k_recipe_and_8k_variants():
    expected = {f"{size}_ttt_{layer}_2k" for size in PAPER for layer in ("linear", "mlp")}
    assert expected <= set(RECIPES)
    assert {"125m_ttt_linear_8k", "125m_ttt_mlp_8k"} <= set(RECIPES)
    assert (CONF_DIR / "experiment" / "smoke.yaml").exists()


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_carries_the_paper_numbers(name):
    size, layer, ctx = parts(name)
    peak_lr, steps, budget = PAPER[size]
    cfg = compose_config([f"experiment={name}"])
    validate(cfg)
    assert cfg.experiment_name == name
    assert (cfg.model.name, cfg.model.ttt_layer) == (size, layer)
    assert cfg.data.seq_len == {"2k": 2048, "8k": 8192}[ctx]
    assert GPUS * cfg.data.batch_size * cfg.trainer.grad_accum_steps * cfg.data.seq_len == TOKENS_PER_STEP
    assert cfg.optim.lr == peak_lr and cfg.trainer.max_steps == steps
    assert steps * TOKENS_PER_STEP == pytest.approx(budget, rel=0.03)
    assert cfg.optim.warmup_steps == steps // 10
    assert cfg.optim.lr * cfg.optim.min_lr_ratio == pytest.approx(1e-5, rel=1e-3)  # the scripts' end LR
    assert list(cfg.optim.betas) == [0.9, 0.95]
    assert (cfg.optim.weight_decay, cfg.optim.max_grad_norm) == (0.1, 1.0)
    assert (cfg.data.source, cfg.data.tokenizer) == ("hf", "sentencepiece") and cfg.data.hf_dataset
    assert cfg.data.max_tokens >= budget  # enough tokens prepared for one pass
    assert cfg.distributed._target_.endswith("DistributedDataParallel") and not cfg.data.stream
    assert cfg.trainer.precision == "bf16" and cfg.distributed.nproc_per_node == "auto"
    assert 0 < cfg.trainer.ckpt_every < steps and 0 < cfg.trainer.eval_every < steps


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_builds_its_model_strategy_and_data(name):
    import torch

    cfg = compose_config([f"experiment={name}"])
    with torch.device("meta"):
        model, _ = instantiate(cfg.model).build(vocab_size=32000, eos_token_id=0, device="meta")
    assert model.config.hidden_size == cfg.model.hidden_size
    assert model.config.ttt_layer == cfg.model.ttt_layer
    assert model.config.ttt_base_lr == {"linear": 1.0, "mlp": 0.1}[cfg.model.ttt_layer]
    layout = build_layout(cfg)
    assert isinstance(layout, ProcessLayout) and layout.precision == "bf16"
    data = instantiate(cfg.data)  # the constructor only checks its arguments: nothing is fetched
    assert (data.seq_len, data.batch_size, data.hf_dataset) == (cfg.data.seq_len, cfg.data.batch_size,
                                                                cfg.data.hf_dataset)


def test_dataset_and_layout_are_overridable():
    argv = ["experiment=125m_ttt_linear_2k", "data.hf_dataset=HuggingFaceFW/fineweb-edu", "data.hf_config=sample-10BT",
            "trainer.grad_accum_steps=4"]
    assert check(argv) is None
    cfg = compose_config(argv)
    assert (cfg.data.hf_dataset, cfg.data.hf_config, cfg.trainer.grad_accum_steps) == \
        ("HuggingFaceFW/fineweb-edu", "sample-10BT", 4)
