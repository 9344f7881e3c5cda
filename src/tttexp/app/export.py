"""``python -m tttexp.export checkpoint=<checkpoint> out=<dir>``: a ``save_pretrained`` directory from a run's
checkpoint, of any format and world size (a ``step-*.pt`` file or a sharded ``step-*.dcp`` directory).

The directory holds ``config.json``, the weights (safetensors), the run's tokenizer and the model's code
(:mod:`tttexp.models.remote_code`); ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads it
without tttexp installed, and ``TTTForCausalLM.from_pretrained(dir)``, ``AutoTokenizer.from_pretrained(dir)`` and
``python -m tttexp.eval checkpoint=dir`` load it too. The model is rebuilt from the config the checkpoint records
(older checkpoints without one: from the run directory's ``.hydra/config.yaml``, for models trained from
scratch). A sharded checkpoint is read whole on this one process, without a process group.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from tttexp.errors import CheckpointError, ConfigError
from tttexp.training.rundir import TOKENIZER_DIR

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportConfig:
    """``conf/export.yaml``."""

    checkpoint: str = "???"  # a run's checkpoints/step-*.pt file or step-*.dcp directory
    out: str = "???"  # the save_pretrained directory to write (created; files in it are replaced)
    dtype: str = "float32"  # float32 | bfloat16 | float16: the weights' dtype in the exported directory


ConfigStore.instance().store(name="export_schema", node=ExportConfig)


def export(checkpoint: Path, out: Path, dtype: str = "float32") -> Path:
    """Write ``out`` as a ``save_pretrained`` directory of the model in ``checkpoint``; returns ``out``."""
    from tttexp.models import TTTForCausalLM, remote_code
    from tttexp.training import dcp
    from tttexp.training.checkpoint import load_checkpoint

    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype} is not allowed; choose one of: {', '.join(DTYPES)}")
    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    config = _model_config(checkpoint, state)
    model = TTTForCausalLM(config)
    if state.get("format") == "dcp":
        dcp.full_model_state(checkpoint, model)
    else:
        dcp.check_fits(str(checkpoint), {k: tuple(v.shape) for k, v in state["model"].items()}, model,
                       state.get("model_config"))
        model.load_state_dict(state["model"])
    model.to(DTYPES[dtype])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    remote_code.write(out)  # the model's code beside it: loads with trust_remote_code=True, without tttexp
    tokenizer = _run_dir(checkpoint) / TOKENIZER_DIR
    if tokenizer.is_dir():  # the run's tokenizer, so that AutoTokenizer.from_pretrained(out) works too
        for item in tokenizer.iterdir():
            if item.is_file():
                shutil.copy2(item, out / item.name)
    else:
        print(f"note: {tokenizer} does not exist (a run of an older version, or a SentencePiece file "
              "tokenizer); the directory holds the model only", flush=True)
    return out


def _run_dir(checkpoint: Path) -> Path:
    """The run directory a checkpoint was written in (``<run>/checkpoints/step-*``)."""
    return checkpoint.parent.parent


def _model_config(checkpoint: Path, state: dict[str, Any]) -> Any:
    from tttexp.models import TTTConfig

    if state.get("model_config"):
        return TTTConfig.from_dict(dict(state["model_config"]))
    run_config = _run_dir(checkpoint) / ".hydra" / "config.yaml"
    if "model" not in state or not run_config.is_file():
        raise CheckpointError(f"{checkpoint} records no model config and {run_config} does not exist; export needs "
                              "one of them")
    model = OmegaConf.load(run_config).model
    if not str(model.get("_target_", "")).endswith("FromScratch"):
        raise CheckpointError(f"{checkpoint} records no model config and its run converted a base model; export "
                              "needs a checkpoint written by this version")
    from tttexp.models import build_model

    settings = {k: v for k, v in OmegaConf.to_container(model, resolve=True).items()
                if k not in ("_target_", "base_model", "convert_layers", "freeze", "trust_remote_code", "vocab_size")}
    vocab = state["model"]["model.embed_tokens.weight"].shape[0]
    return build_model(vocab_size=vocab, **settings).config


def main() -> None:
    """Entry point (app/entry.py): preflight, the allowlist and the YAML rerun as for training, then Hydra."""
    from tttexp.app import entry
    from tttexp.app.security import check_config

    entry.main(entry.App("export", hydra_main, check_config, owns_run_dir=False))


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def hydra_main(cfg: DictConfig) -> None:
    missing = [key for key in ("checkpoint", "out") if OmegaConf.is_missing(cfg, key)]
    if missing:
        print(f"error: give {' and '.join(f'{k}=...' for k in missing)} (python -m tttexp.export "
              "checkpoint=<step-*.pt | step-*.dcp> out=<dir>)", file=sys.stderr, flush=True)
        sys.exit(2)
    try:
        out = export(Path(cfg.checkpoint), Path(cfg.out), cfg.dtype)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"written: {out} (TTTForCausalLM.from_pretrained or python -m tttexp.eval checkpoint={out})", flush=True)


if __name__ == "__main__":
    main()
