"""DataModule: the config-facing entry point that turns data settings into loaders."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, TypeVar

import torch

from tttexp.data import integrity
from tttexp.data.cache import tokenize_documents
from tttexp.data.corpus import SOURCES, load_documents, split_documents
from tttexp.data.integrity import Fingerprinted
from tttexp.data.loaders import StreamLoader, ValidationSet, WindowLoader
from tttexp.data.prefetch import Prefetcher
from tttexp.data.tokenizer import Tokenizer, build_tokenizer
from tttexp.errors import ConfigError

log = logging.getLogger(__name__)
_T = TypeVar("_T")


def default_cache_dir() -> Path:
    return Path(os.environ.get("TTTEXP_CACHE_DIR") or "~/.cache/tttexp").expanduser()


class DataModule:
    """Data settings from the config; `setup()` loads, splits and tokenizes and builds the loaders.

    The constructor only checks arguments, so building the object from a config is cheap. All cache
    writes are atomic and the first published entry wins, so every rank may call `setup()` at once.
    """

    def __init__(
        self,
        source: str = "shipped",
        seq_len: int = 128,
        batch_size: int = 8,
        stream: bool = False,
        prefetch: bool = False,
        tokenizer: str = "bpe",
        vocab_size: int = 4096,
        val_fraction: float = 0.05,
        val_windows: int = 32,
        paths: list[str] | None = None,
        hf_dataset: str | None = None,
        hf_config: str | None = None,
        hf_split: str = "train",
        text_field: str = "text",
        max_documents: int | None = None,
        cache_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        if source not in SOURCES:
            raise ValueError(f"unknown data source {source!r}: use one of {', '.join(SOURCES)}")
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("val_windows", val_windows)):
            if value <= 0:
                raise ValueError(f"data.{name} must be positive, got {value}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be strictly between 0 and 1, got {val_fraction}")
        if tokenizer == "bpe" and vocab_size <= 257:
            raise ValueError(
                f"data.vocab_size={vocab_size} is too small for byte-level BPE; use at least 258"
            )
        if max_documents is not None and max_documents <= 0:
            raise ValueError(f"data.max_documents must be positive or null, got {max_documents}")
        if source == "text_files" and not paths:
            raise ValueError("data.source=text_files needs data.paths (files, directories or globs)")
        if source == "hf" and not hf_dataset:
            raise ValueError("data.source=hf needs data.hf_dataset (a dataset name or local path)")
        self.source, self.seq_len, self.batch_size = source, seq_len, batch_size
        self.stream, self.prefetch = bool(stream), bool(prefetch)
        self.tokenizer_kind, self.requested_vocab_size = tokenizer, vocab_size
        self.val_fraction, self.val_windows = val_fraction, val_windows
        self.paths = list(paths) if paths is not None else None
        self.hf_dataset, self.hf_config, self.hf_split = hf_dataset, hf_config, hf_split
        self.text_field = text_field
        self.max_documents, self.seed = max_documents, seed
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self._tokenizer: Tokenizer | None = None
        self._train_loader: Any = None
        self._val_set: ValidationSet | None = None
        self._num_train_tokens = self._num_val_tokens = 0

    def setup(
        self,
        rank: int = 0,
        world_size: int = 1,
        mini_batch_size: int = 16,
        tokenizer: Tokenizer | None = None,
        device: torch.device | str | None = None,
        check_batches: bool = False,
    ) -> None:
        """Load and split the documents, build the tokenizer (on the training split, unless one is given,
        e.g. a pretrained model's), tokenize through the cache and build `train_loader` and `val_set`.

        `data.stream=true` gives a StreamLoader (per-row contiguous documents for state passing), otherwise a
        WindowLoader of shuffled windows. With `data.prefetch=true` it is wrapped in a :class:`Prefetcher` that
        prepares batches on `device`; `check_batches` adds each batch's fingerprint (data/integrity.py) before it
        leaves the host. Data that cannot make a run (no text, too little text for one sequence, a missing
        tokenizer) raises :class:`ConfigError`: one line, reported by the app without a traceback.
        """
        try:
            self._setup(rank, world_size, mini_batch_size, tokenizer)
        except ConfigError:
            raise
        except (ValueError, OSError) as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            raise ConfigError(f"data: {lines[0] if lines else type(err).__name__}") from err
        loader: Any = self._train_loader
        if check_batches:
            loader = Fingerprinted(loader)
        if self.prefetch:
            loader = Prefetcher(loader, torch.device(device) if device is not None else torch.device("cpu"),
                                host_keys=(integrity.KEY,))
        self._train_loader = loader

    def _setup(self, rank: int, world_size: int, mini_batch_size: int, tokenizer: Tokenizer | None) -> None:
        docs = load_documents(
            self.source,
            paths=self.paths,
            hf_dataset=self.hf_dataset,
            hf_config=self.hf_config,
            hf_split=self.hf_split,
            text_field=self.text_field,
            max_documents=self.max_documents,
        )
        if len(docs) < 2:
            raise ValueError(
                f"data.source={self.source} gave {len(docs)} document; a train/val split needs two"
            )
        train_docs, val_docs = split_documents(docs, self.val_fraction, self.seed)
        log.info("%d documents: %d train, %d validation", len(docs), len(train_docs), len(val_docs))
        if tokenizer is None:
            tokenizer = build_tokenizer(
                self.tokenizer_kind,
                train_texts=[d.text for d in train_docs] if self.tokenizer_kind == "bpe" else None,
                vocab_size=self.requested_vocab_size,
                cache_dir=self.cache_dir,
            )
        train_tokens = tokenize_documents(train_docs, tokenizer, self.cache_dir)
        val_tokens = tokenize_documents(val_docs, tokenizer, self.cache_dir)

        if self.stream:
            self._train_loader = StreamLoader(
                train_tokens,
                eos_id=tokenizer.eos_id,
                pad_id=tokenizer.eos_id,
                seq_len=self.seq_len,
                batch_size=self.batch_size,
                mini_batch_size=mini_batch_size,
                seed=self.seed,
                rank=rank,
                world_size=world_size,
            )
        else:
            self._train_loader = WindowLoader(
                train_tokens,
                eos_id=tokenizer.eos_id,
                seq_len=self.seq_len,
                batch_size=self.batch_size,
                seed=self.seed,
                rank=rank,
                world_size=world_size,
            )
        self._val_set = ValidationSet(val_tokens, tokenizer.eos_id, self.seq_len, self.val_windows)
        self._tokenizer = tokenizer
        self._num_train_tokens = sum(len(t) + 1 for t in train_tokens)
        self._num_val_tokens = sum(len(t) + 1 for t in val_tokens)

    @property
    def tokenizer(self) -> Tokenizer:
        return _ready(self._tokenizer)

    @property
    def vocab_size(self) -> int:
        """Size of the tokenizer's vocabulary (may be below the requested vocab_size on a small corpus)."""
        return self.tokenizer.vocab_size

    @property
    def train_loader(self) -> Any:
        """The one loader training reads: windows or streams, fingerprinted and prefetched as configured."""
        return _ready(self._train_loader)

    @property
    def val_set(self) -> ValidationSet:
        return _ready(self._val_set)

    @property
    def num_train_tokens(self) -> int:
        """Tokens in the training split, one EOS per document included."""
        _ready(self._tokenizer)
        return self._num_train_tokens

    @property
    def num_val_tokens(self) -> int:
        """Tokens in the validation split, one EOS per document included."""
        _ready(self._tokenizer)
        return self._num_val_tokens


def _ready(value: _T | None) -> _T:
    if value is None:
        raise RuntimeError("DataModule.setup() has not been called yet")
    return value
