"""python -m tttexp.export: any checkpoint (sharded directory or .pt file) becomes a save_pretrained directory whose
logits are the checkpoint's, and that from_pretrained and the eval app load."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tttexp.app.export import export
from tttexp.models import TTTForCausalLM
from tttexp.training import dcp
from tttexp.training.checkpoint import load_checkpoint

from . import fsdp_worker as W


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_export_round_trip_of_both_formats(tmp_path, app_cache, one_thread):
    ids = torch.randint(0, 4000, (2, 48), generator=torch.Generator().manual_seed(0))
    for fmt in ("dcp", "pt"):
        trainer, _ = W.train(W.overrides("mlp", 1, "single", f"distributed.checkpoint={fmt}", "trainer.max_steps=2"),
                             tmp_path / fmt, app_cache)
        path = tmp_path / fmt / f"checkpoints/step-00000002.{fmt}"
        # the checkpoint's own model: rebuilt at its size and loaded the way training resumes it
        model = TTTForCausalLM(trainer.raw_model.config)
        if fmt == "dcp":
            dcp.full_model_state(path, model)
        else:
            model.load_state_dict(load_checkpoint(path)["model"])
        out = export(path, tmp_path / f"export-{fmt}")
        exported = TTTForCausalLM.from_pretrained(out)
        with torch.no_grad():
            want, got = model.eval()(ids).logits, exported.eval()(ids).logits
        assert torch.equal(want, got), fmt
        trained = trainer.raw_model.eval()
        trained.set_inner_lr_scale(step=10**6, warmup_steps=1)  # TTT-MLP's inner-lr ramp, over at export
        with torch.no_grad():
            assert torch.equal(got, trained(ids).logits)


def test_export_and_eval_apps(tmp_path, app_cache, one_thread):
    trainer, _ = W.train(W.overrides("linear", 1, "single", "distributed.checkpoint=dcp", "trainer.max_steps=1"),
                         tmp_path / "run", app_cache)
    env = {**os.environ, "TTTEXP_CACHE_DIR": str(app_cache), "WANDB_MODE": "offline"}
    out = tmp_path / "exported"
    made = subprocess.run([sys.executable, "-m", "tttexp.export",
                           f"checkpoint={tmp_path}/run/checkpoints/step-00000001.dcp", f"out={out}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    # the run's tokenizer ships with the model and encodes as the run's own
    from transformers import AutoTokenizer

    text = "The state of the union is strong; 1,234 tokens."
    shipped = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert shipped(text, add_special_tokens=False)["input_ids"] == trainer.data.tokenizer.encode(text)
    assert shipped.eos_token == "<|endoftext|>"
    assert not (tmp_path / "outputs").exists() and not (out / ".hydra").exists()

    from tttexp.app.build import build, build_layout
    from tttexp.app.eval import load_model
    from tttexp.app.preflight import compose_config

    cfg = compose_config(["experiment=smoke", "logging=none", f"checkpoint={out}"], config_name="eval")
    layout = build_layout(cfg)
    layout.setup("cpu", cfg.seed)
    model = load_model(cfg, layout, build(cfg.data))
    assert isinstance(model, TTTForCausalLM) and model.config.hidden_size == 64
    # the sharded checkpoint itself evaluates too, with the same weights as its export
    cfg = compose_config(["experiment=smoke", "logging=none", f"checkpoint={tmp_path}/run/checkpoints/"
                          "step-00000001.dcp"], config_name="eval")
    direct = load_model(cfg, layout, build(cfg.data))
    exported = model.state_dict()
    assert all(torch.equal(value, exported[name]) for name, value in direct.state_dict().items())


def test_export_needs_its_two_keys(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "tttexp.export", f"out={tmp_path}"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: give checkpoint=... (python -m tttexp.export checkpoint=<step-*.pt | step-*.dcp> out=<dir>)"]
