"""DataModule: the config-facing entry point that turns data settings into loaders."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from tttexp.data.config import DataConfig
from tttexp.data.corpus import id_digest, shipped_files, text_files, val_mask
from tttexp.data.pretokenize import Source, prepare, source_texts
from tttexp.data.shards import PreparedCorpus
from tttexp.data.tokenizer import Tokenizer, build_tokenizer
from tttexp.errors import ConfigError

if TYPE_CHECKING:  # torch and the loaders are imported by setup(): preparing a corpus never loads torch
    import torch

    from tttexp.data.loaders import ValidationSet

log = logging.getLogger(__name__)
_T = TypeVar("_T")

BPE_SAMPLE_BYTES = 100 << 20  # a BPE is trained on at most this much of the training split's text
VAL_TOKENS = 16 << 20  # validation reads at most this many tokens of held-out documents, spread over all of them


def default_cache_dir() -> Path:
    return Path(os.environ.get("TTTEXP_CACHE_DIR") or "~/.cache/tttexp").expanduser()


class DataModule:
    """Data settings from the config; `setup()` prepares the corpus (once: data/pretokenize.py), opens its
    shards and builds the loaders.

    The constructor only checks arguments, so building the object from a config is cheap. Cache writes are
    atomic and a prepare holds a lock on its corpus, so every rank may call `setup()` at once.
    """

    def __init__(self, config: DataConfig | None = None, /, **settings: Any) -> None:
        """``config``: the settings, already checked (the app builds its :class:`DataConfig` once per job); or
        ``settings``, its fields (``DataModule(seq_len=64)``), checked here."""
        if config is not None and settings:
            raise TypeError("DataModule takes a DataConfig or its fields, not both")
        config = self.config = config if config is not None else DataConfig(**settings)
        self.source, self.seq_len, self.batch_size = config.source, config.seq_len, config.batch_size
        self.stream, self.prefetch = bool(config.stream), bool(config.prefetch)
        self.tokenizer_kind, self.requested_vocab_size = config.tokenizer, config.vocab_size
        self.val_fraction, self.val_windows = config.val_fraction, config.val_windows
        self.paths = list(config.paths) if config.paths is not None else None
        self.hf_dataset, self.hf_config, self.hf_split = config.hf_dataset, config.hf_config, config.hf_split
        self.text_field = config.text_field
        self.max_documents, self.max_tokens = config.max_documents, config.max_tokens
        self.workers, self.seed = config.workers, config.seed
        self.cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
        self.prepared_dir = (Path(config.prepared_dir).expanduser() if config.prepared_dir
                             else self.cache_dir / "prepared")
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
        """Build the tokenizer (on a sample of the training split, unless one is given, e.g. a pretrained
        model's), prepare the corpus unless it is prepared, open its shards, split them by document and build
        `train_loader` (reading only this rank's windows) and `val_set`.

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
        import torch

        from tttexp.data import integrity
        from tttexp.data.prefetch import Prefetcher

        loader: Any = self._train_loader
        if check_batches:
            loader = integrity.Fingerprinted(loader)
        if self.prefetch:
            loader = Prefetcher(loader, torch.device(device) if device is not None else torch.device("cpu"),
                                depth=self.config.prefetch_depth, host_keys=(integrity.KEY,))
        self._train_loader = loader

    def prepare(self, tokenizer: Tokenizer | None = None, progress: bool = True) -> tuple[Path, Tokenizer]:
        """Tokenize the corpus into shards under `prepared_dir` unless they are there; returns the corpus
        directory and the tokenizer (built here unless given: a BPE is trained on a bounded sample)."""
        source = self._source()
        if tokenizer is None:
            tokenizer = self._build_tokenizer(source)
        directory = prepare(source, tokenizer, self.prepared_dir, max_documents=self.max_documents,
                            max_tokens=self.max_tokens, workers=self.workers, progress=progress)
        return directory, tokenizer

    def _source(self) -> Source:
        if self.source == "hf":
            return Source("hf", hf=(str(self.hf_dataset), self.hf_config, self.hf_split, self.text_field))
        files = shipped_files() if self.source == "shipped" else text_files(self.paths)
        return Source(self.source, files=tuple((doc_id, str(path)) for doc_id, path in files))

    def _build_tokenizer(self, source: Source) -> Tokenizer:
        if self.tokenizer_kind != "bpe":
            return build_tokenizer(self.tokenizer_kind, train_texts=None, vocab_size=self.requested_vocab_size,
                                   cache_dir=self.cache_dir)
        if source.hf is None:  # the split of the listed files, as training will see it
            ids = [doc_id for doc_id, _ in source.files[: self.max_documents]]
            is_val = val_mask(np.array([id_digest(i) for i in ids], dtype=np.uint64), self.val_fraction, self.seed)
            train_ids = {i for i, v in zip(ids, is_val.tolist(), strict=True) if not v}
            keep = train_ids.__contains__
        else:
            def keep(doc_id: str) -> bool:
                return not val_mask(np.array([id_digest(doc_id)], dtype=np.uint64), self.val_fraction, self.seed)[0]
        texts = source_texts(source, keep, BPE_SAMPLE_BYTES)
        if not texts:
            raise ConfigError(f"data.source={self.source} gave no non-empty documents; point it at some text")
        return build_tokenizer("bpe", train_texts=texts, vocab_size=self.requested_vocab_size,
                               cache_dir=self.cache_dir)

    def _setup(self, rank: int, world_size: int, mini_batch_size: int, tokenizer: Tokenizer | None) -> None:
        from tttexp.data.loaders import StreamLoader, ValidationSet, WindowLoader

        directory, tokenizer = self.prepare(tokenizer, progress=rank == 0)
        corpus = PreparedCorpus(directory, tokenizer.name, tokenizer.vocab_size, tokenizer.eos_id)
        n = corpus.prefix(self.max_documents, self.max_tokens)
        if n == 0:
            raise ConfigError(f"data.source={self.source} gave no non-empty documents; point it at some text")
        if n < 2:
            raise ValueError(f"data.source={self.source} gave {n} document; a train/val split needs two")
        is_val = np.zeros(corpus.num_documents, dtype=bool)
        is_val[:n] = val_mask(corpus.digests[:n], self.val_fraction, self.seed)
        is_train = np.zeros(corpus.num_documents, dtype=bool)
        is_train[:n] = ~is_val[:n]
        log.info("%d documents: %d train, %d validation", n, int(is_train.sum()), int(is_val.sum()))

        if self.stream:
            self._train_loader = StreamLoader(
                corpus.documents(is_train),
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
                corpus.stream(is_train),
                eos_id=tokenizer.eos_id,
                seq_len=self.seq_len,
                batch_size=self.batch_size,
                seed=self.seed,
                rank=rank,
                world_size=world_size,
                shuffle=self.config.shuffle,
            )
        self._val_set = ValidationSet(_spread(corpus, is_val, VAL_TOKENS), tokenizer.eos_id, self.seq_len,
                                      self.val_windows)
        self._tokenizer = tokenizer
        self._num_train_tokens = int((corpus.lengths[is_train] + 1).sum())
        self._num_val_tokens = int((corpus.lengths[is_val] + 1).sum())

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


def _spread(corpus: PreparedCorpus, keep: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """The selected documents, or evenly spaced ones among them holding about `max_tokens` tokens."""
    idx = np.flatnonzero(keep)
    total = int((corpus.lengths[idx] + 1).sum())
    if total > max_tokens:
        count = max(1, len(idx) * max_tokens // total)
        idx = idx[np.linspace(0, len(idx) - 1, count).round().astype(np.int64)]
    chosen = np.zeros(len(keep), dtype=bool)
    chosen[idx] = True
    return list(corpus.documents(chosen))


def _ready(value: _T | None) -> _T:
    if value is None:
        raise RuntimeError("DataModule.setup() has not been called yet")
    return value
