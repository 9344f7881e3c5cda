"""The single-device recipes: conservative skips non-finite steps; gpu_optimized's CPU behaviour and inference."""

from __future__ import annotations

import pytest
import torch

from support import build_trainer, records
from tttexp.errors import TrainingStopped
from tttexp.training.checkpoint import latest_valid_checkpoint


class NaNInjector:
    """A forward hook that turns one block's output into NaN while ``active``: a real non-finite step."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.active = False
        module.register_forward_hook(lambda _m, _i, out: out * float("nan") if self.active else out)


def snapshot(trainer):
    params = {k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()}
    opt = {k: {n: t.clone() if torch.is_tensor(t) else t for n, t in v.items()}
           for k, v in trainer.optimizer.state_dict()["state"].items()}
    return params, opt


def test_conservative_skips_a_nonfinite_step_and_keeps_weights(tmp_path, app_cache):
    trainer = build_trainer(["strategy=conservative", "trainer.max_steps=6"], tmp_path, app_cache)
    injector = NaNInjector(trainer.raw_model.model.layers[0])
    for _ in range(2):
        _, _, ok = trainer._train_step()
        assert ok
    before_params, before_opt = snapshot(trainer)
    injector.active = True
    loss, _, ok = trainer._train_step()
    injector.active = False
    assert not ok and not torch.isfinite(loss)
    after_params, after_opt = snapshot(trainer)
    assert all(torch.equal(before_params[k], after_params[k]) for k in before_params)
    for k in before_opt:
        for name, value in before_opt[k].items():
            assert torch.equal(value, after_opt[k][name]) if torch.is_tensor(value) else value == after_opt[k][name]
    assert trainer.records.counters["warnings/nonfinite_steps"] == 1
    trainer.step = 3
    trainer.fit()
    _, state = latest_valid_checkpoint(tmp_path)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert state["counters"]["warnings/nonfinite_steps"] == 1


def test_consecutive_bad_steps_stop_with_the_last_good_weights(tmp_path, app_cache):
    trainer = build_trainer(["strategy=conservative", "trainer.max_bad_steps=3", "trainer.max_steps=20"],
                            tmp_path, app_cache)
    good = {k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()}
    NaNInjector(trainer.raw_model.model.layers[1]).active = True
    with pytest.raises(TrainingStopped, match="3 non-finite steps in a row") as err:
        trainer.fit()
    assert "\n" not in str(err.value)
    _, state = latest_valid_checkpoint(tmp_path)
    assert all(torch.equal(good[k], state["model"][k]) for k in good)


def test_conservative_runs_fp32_reference_kernels(tmp_path, app_cache):
    trainer = build_trainer(["strategy=conservative"], tmp_path, app_cache)
    assert trainer.raw_model.resolved_kernel("cpu") == "torch"
    assert trainer.layout.precision == "fp32" and not trainer.layout.compile
    assert trainer.optim.lr < 3e-3 and trainer.optim.max_grad_norm < 1.0 and trainer.loop.skip_nonfinite
    assert torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)


def test_gpu_optimized_on_cpu_falls_back_with_one_warning_and_times_inference(run_app, tmp_path):
    out = run_app("experiment=smoke", "logging=none", "strategy=gpu_optimized", "trainer.inference_every=2",
                  f"hydra.run.dir={tmp_path}/run")
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = [line for line in out.stderr.splitlines() if "no CUDA GPU" in line]
    assert len(warnings) == 1
    rows = records(tmp_path / "run")
    timing = [r for r in rows if "inference/prefill_ms" in r]
    assert timing and all(r["inference/decode_tokens_per_sec"] > 0 for r in timing)
    assert any(r.get("_type") == "text" and r.get("key") == "inference/sample" for r in rows)


def test_gpu_optimized_can_refuse_to_run_without_a_gpu():
    from tttexp.app.build import build_layout
    from tttexp.app.preflight import compose_config
    from tttexp.errors import LayoutError

    layout = build_layout(compose_config(["strategy=gpu_optimized", "trainer.on_cpu=error"]))
    with pytest.raises(LayoutError, match="needs a CUDA GPU") as err:
        layout.setup("auto", 0)
    assert "\n" not in str(err.value)
