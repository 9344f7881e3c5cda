"""Every config group option composes and instantiates; the schema catches typos and wrong types."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from tttexp.app.build import build_layout
from tttexp.app.preflight import CONF_DIR, check, compose_config
from tttexp.app.schemas import validate
from tttexp.distributed import ProcessLayout
from tttexp.errors import ConfigError


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def test_every_group_has_its_options():
    assert options("model") == ["1.3b", "125m", "350m", "760m", "tiny"]
    assert options("strategy") == ["conservative", "from_pretrained", "gpu_optimized", "multi_gpu_state_passing"]
    assert options("logging") == ["none", "wandb"]
    assert options("distributed") == ["ddp", "fsdp", "single"]
    assert options("arm") == ["transformer", "ttt_linear", "ttt_mlp"]
    assert {"hf", "shipped", "text_files"} <= set(options("data"))
    assert options("experiment")


@pytest.mark.parametrize("name", options("model"))
def test_model_options_instantiate(name):
    import torch

    cfg = compose_config([f"model={name}"])
    validate(cfg)
    with torch.device("meta"):
        model, facts = instantiate(cfg.model).build(vocab_size=32000, eos_token_id=0, device="meta")
    assert model.config.hidden_size == cfg.model.hidden_size
    assert model.config.num_hidden_layers == cfg.model.num_hidden_layers
    assert facts == {}


def test_model_yamls_agree_with_the_size_table():
    from tttexp.models import SIZE_PRESETS

    for name in options("model"):
        cfg = compose_config([f"model={name}"]).model
        assert {key: cfg[key] for key in SIZE_PRESETS[name]} == SIZE_PRESETS[name], name


@pytest.mark.parametrize("name", options("strategy"))
def test_recipes_compose_into_a_process_layer(name):
    cfg = compose_config([f"strategy={name}"])
    validate(cfg)
    assert cfg.strategy == name
    layout = build_layout(cfg)
    assert isinstance(layout, ProcessLayout)
    assert layout.precision == cfg.trainer.precision and layout.compile == cfg.trainer.compile


def test_recipes_show_the_values_that_run():
    """A recipe writes plain values into the groups that own them: nothing rescales them later."""
    conservative = compose_config(["strategy=conservative"])
    assert conservative.optim.lr == 1.5e-3 and conservative.optim.max_grad_norm == 0.5
    assert conservative.model.kernel == "torch" and conservative.trainer.precision == "fp32"
    fast = compose_config(["strategy=gpu_optimized"])
    assert fast.trainer.precision == "bf16" and fast.trainer.compile and fast.model.kernel == "auto"
    assert fast.optim.lr == 3e-3 and fast.data.prefetch
    passing = compose_config(["strategy=multi_gpu_state_passing"])
    assert passing.data.stream and passing.distributed._target_.endswith("DistributedDataParallel")
    pretrained = compose_config(["strategy=from_pretrained"])
    assert pretrained.model._target_ == "tttexp.models.pretrained.FromBase"
    assert pretrained.model.base_model == "smollm2"
    assert compose_config(["strategy=conservative", "optim.lr=1e-2"]).optim.lr == 1e-2  # the command line wins


@pytest.mark.parametrize("name", options("logging"))
def test_logging_options_instantiate(name):
    from tttexp.app.build import build_logger

    cfg = compose_config([f"logging={name}", "logging.mode=disabled"])
    logger = build_logger(cfg, Path("."), is_main=True)
    assert hasattr(logger, "log") and hasattr(logger, "finish")


@pytest.mark.parametrize("name", options("data"))
def test_data_options_instantiate(name, tmp_path):
    (tmp_path / "notes.txt").write_text("a real line of text\n", encoding="utf-8")
    extra = {"text_files": [f"data.paths=[{tmp_path}]"], "hf": ["data.hf_dataset=some/dataset"]}.get(name, [])
    cfg = compose_config([f"data={name}", *extra])
    validate(cfg)
    module = instantiate(cfg.data)
    assert module.seq_len == cfg.data.seq_len


@pytest.mark.parametrize("name", options("distributed"))
def test_distributed_options_compose(name):
    validate(compose_config([f"distributed={name}"]))


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_options_compose(name):
    validate(compose_config([f"experiment={name}"]))


def test_contract_keys_exist():
    cfg = compose_config([])
    for key in ["seed", "device", "resume", "model.ttt_layer", "model.backbone", "model.kernel", "data.seq_len",
                "data.batch_size", "optim.lr", "trainer.max_steps", "trainer.log_every", "trainer.eval_every",
                "trainer.ckpt_every", "distributed.nproc_per_node", "logging.project", "logging.run_name",
                "logging.mode"]:
        section, _, leaf = key.rpartition(".")
        node = cfg[section] if section else cfg
        assert leaf in node, key
    assert compose_config(["strategy=from_pretrained"]).model.base_model == "smollm2"


@pytest.mark.parametrize(("argv", "expected"), [
    (["model=nope"], "model=nope is not an option; choose one of: 1.3b, 125m, 350m, 760m, tiny"),
    (["optim.lr=abc"], "optim.lr=abc: expected a float"),
    (["data.seq_len=-1"], "data.seq_len=-1 must be > 0"),
    (["trainer.max_stepz=3"], "trainer.max_stepz: no such config key (did you mean trainer.max_steps?)"),
    (["trainer.compile=maybe"], "trainer.compile=maybe: expected a boolean (true or false)"),
    (["strategy.compile=true"], "strategy.compile: no such config key"),
    (["model.ttt_layer=cnn"], "model.ttt_layer='cnn' is not allowed; choose one of: linear, mlp"),
    (["model.hidden_size=100", "model.num_attention_heads=3"], "must be divisible by model.num_attention_heads"),
    (["-m", "model.ttt_layer=linear,rnn"], "model.ttt_layer='rnn' is not allowed"),
    (["+model.typo=1"], "model.typo: no such config key"),
    (["strategy=multi_gpu_state_passing", "data.seq_len=100"], "multiple of model.mini_batch_size"),
    (["logging.mode=sometimes"], "logging.mode='sometimes' is not allowed"),
    (["model.hidden_size=100"], "gives a head dim of 25; RoPE rotates pairs of features, so the head dim must be even"),
    (["data.seq_len=3"], "data.seq_len=3 is shorter than one TTT mini-batch (model.mini_batch_size=16)"),
    (["data.seq_len=1", "model.mini_batch_size=1"], "shorter than the causal conv window (model.conv_kernel=4)"),
    (["distributed=single", "distributed.replicate=4"],
     "distributed.replicate=4: tttexp.distributed.SingleDevice does not take it; only "
     "tttexp.distributed.FullyShardedDataParallel does (distributed=fsdp)"),
    (["model.base_model=x"], "model.base_model=x: tttexp.models.FromScratch does not take it; only "
                             "tttexp.models.pretrained.FromBase does (strategy=from_pretrained)"),
    (["+distributed.replicate=4"], "distributed.replicate=4: tttexp.distributed.SingleDevice does not take it"),
    (["distributed.context_parallel=2"],
     "only tttexp.distributed.DistributedDataParallel and tttexp.distributed.FullyShardedDataParallel do "
     "(distributed=ddp, distributed=fsdp)"),
    (["distributed=fsdp", "distributed.replicat=2"], "distributed.replicat: no such config key (did you mean "
                                                     "distributed.replicate?)"),
    (["model.ttt_layer=mlp", "model.kernel_settings={splitbwd:true}"],
     "model.kernel_settings.splitbwd: the TTT-MLP kernels have no such setting; they have hc, every,"),
    (["model.kernel_settings={every:two}"], "model.kernel_settings.every='two': expected int"),
    (["model.kernel_settings={lowp:bf16}"], "model.kernel_settings: lowp is one of 'input', 'tf32', got 'bf16'"),
    (["model.kernel_settings=3"], "model.kernel_settings=3: expected settings by name"),
    (["model.kernel_settings.split_bwd=true"], "a kernel setting is added with a +, as "
                                               "+model.kernel_settings.split_bwd=..."),
])
def test_bad_command_lines_give_one_line(argv, expected):
    problem = check(argv)
    assert problem is not None and expected in problem
    assert "\n" not in problem


def test_good_command_lines_pass():
    assert check([]) is None
    assert check(["-m", "model.ttt_layer=linear,mlp", "optim.lr=1e-3,3e-3"]) is None
    assert check(["model=125m", "strategy=gpu_optimized", "logging=none"]) is None
    assert check(["model.hidden_size=104"]) is None  # head dim 26: even is all RoPE needs (kernels pad)
    assert check(["model.mixer=attention", "data.seq_len=3"]) is None  # no TTT layer, no mini-batch
    assert check(["strategy=from_pretrained", "model.freeze=false"]) is None  # the option that reads it
    assert check(["model.ttt_layer=mlp", "model.kernel_settings={split_bwd:true,local_warps:4}"]) is None
    assert check(["+model.kernel_settings.every=4"]) is None


def test_kernel_settings_reach_every_ttt_layer():
    cfg = compose_config(["model.ttt_layer=mlp", "+model.kernel_settings.split_bwd=true"])
    assert validate(cfg).model.kernel_settings == {"split_bwd": True}
    model, _ = instantiate(cfg.model).build(vocab_size=61, eos_token_id=None)
    assert model.config.kernel_settings == {"split_bwd": True}
    assert all(block.ttt.kernel_settings.split_bwd for block in model.model.layers)
    default, _ = instantiate(compose_config([]).model).build(vocab_size=61, eos_token_id=None)
    assert all(block.ttt.kernel_settings is None for block in default.model.layers)


def test_only_project_targets_are_built():
    cfg = compose_config([])
    cfg.model._target_ = "os.system"
    with pytest.raises(ConfigError, match="not a callable this app builds"):
        validate(cfg)
