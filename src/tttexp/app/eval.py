"""``python -m tttexp.eval checkpoint=...``: validation loss, perplexity and loss by position of a trained model.

Takes the same config groups as training (the data and tokenizer must match the run that made the checkpoint).
``checkpoint`` is a run's ``checkpoints/step-*.pt`` file or sharded ``step-*.dcp`` directory (any world size, read
on this one process), or a directory written by ``save_pretrained``.
Writes ``eval.json`` and ``ppl_by_position.png`` to its own run directory.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from tttexp.app import preflight
from tttexp.app.build import build_data, build_layout, build_model_and_data
from tttexp.app.schemas import TrainConfig, register_configs, validate
from tttexp.errors import CheckpointError, ConfigError
from tttexp.loggers import catalogue as C
from tttexp.training import dcp
from tttexp.training.checkpoint import load_checkpoint
from tttexp.training.validation import mean_loss

register_configs()


def load_model(cfg: Any, layout: Any, data: Any) -> object:
    """A model from a run checkpoint (rebuilt from ``cfg.model``) or from a ``save_pretrained`` directory; sets up
    ``data`` with the tokenizer the model was trained on."""
    source = Path(cfg.checkpoint)
    if source.is_dir() and not dcp.is_sharded(source):
        from tttexp.models import TTTForCausalLM

        if not (source / "config.json").exists():
            raise CheckpointError(f"{source} is a directory without config.json; give a save_pretrained directory")
        data.setup(mini_batch_size=cfg.model.mini_batch_size)
        return TTTForCausalLM.from_pretrained(source)
    state = load_checkpoint(source)
    model, _ = build_model_and_data(cfg, layout, data, resuming=True)
    if state.get("format") == "dcp":  # a sharded directory, read whole on this one process
        dcp.full_model_state(source, model)
        return model
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{source} does not fit model={cfg.model.name}: pass the run's model options "
                              f"({str(err).splitlines()[0][:120]})") from err
    return model


def evaluate(cfg: DictConfig, out_dir: Path, job: TrainConfig | None = None) -> dict:
    """Evaluate ``cfg.checkpoint`` into ``out_dir``; ``job``: the config :func:`validate` built from ``cfg`` (built
    here when not given)."""
    job = job if job is not None else validate(cfg)
    if job.harness.tasks:  # before the model is loaded: lm-eval installed, settings sane
        from tttexp.app import harness

        harness.check_config(cfg.harness)
    layout = build_layout(job)
    device = layout.setup(job.device, job.seed)
    data = build_data(job.data)
    model = load_model(job, layout, data).to(device)
    total, count = mean_loss(model, data.val_set.batches(job.data.batch_size), autocast=layout.autocast())
    loss = total / max(count, 1)
    result = {"checkpoint": str(job.checkpoint), C.VAL_LOSS: loss, C.VAL_PPL: math.exp(min(loss, 50.0)),
              C.VAL_TOKENS: count}
    from tttexp.loggers import NullLogger
    from tttexp.training.long_context import context_reports

    rows, extras = context_reports(
        model, data, out_dir, NullLogger(), 0, length=job.trainer.position_eval_len,
        sequences=job.trainer.position_eval_sequences or 8, passkey=job.passkey, autocast=layout.autocast(),
        batch_size=job.data.batch_size,
    )
    if rows:
        result[C.VAL_PPL_BY_POSITION] = rows
    result.update({k.replace(C.SUMMARY_PREFIX, C.VAL_PREFIX): v for k, v in extras.items()})
    if cfg.harness.tasks:  # lm-evaluation-harness (app/harness.py): harness.json, the Logger, the summary table
        result.update(harness.evaluate(cfg, model, data, out_dir, layout.autocast(), result))
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    print(f"val/loss {loss:.4f}  val/ppl {result[C.VAL_PPL]:.2f}  ({count:,} tokens)")
    for row in result.get(C.VAL_PPL_BY_POSITION, []):
        print(f"  positions {row['start']:>6}-{row['end']:<6} ppl {row['ppl']:10.2f}")
    if C.VAL_PASSKEY_ACCURACY in result:
        print(f"  passkey accuracy {result[C.VAL_PASSKEY_ACCURACY]:.1%} (passkey.csv, passkey.png)")
    print(f"written: {out_dir / 'eval.json'}", flush=True)
    return result


def main() -> None:
    """Entry point (app/entry.py): preflight, the allowlist and the YAML rerun as for training, then Hydra."""
    from tttexp.app import entry

    entry.main(entry.App("eval", hydra_main, validate, claim=claim))


def claim(cfg: DictConfig, run_dir: Path) -> None:
    """Eval writes its own run directory: never one that holds a training run."""
    from tttexp.training.checkpoint import list_checkpoints

    existing = list_checkpoints(run_dir)
    if existing:
        raise ConfigError(f"{run_dir} holds a training run (checkpoints/{existing[0].name}); eval writes eval.json "
                          "and .hydra/ into a directory of its own: choose another hydra.run.dir")


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def hydra_main(cfg: DictConfig) -> float:
    from tttexp.app import entry

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        with entry.own(run_dir):
            return evaluate(cfg, run_dir, preflight.checked(cfg, validate))[C.VAL_LOSS]
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
