"""``python -m tttexp.prepare data=<...> [data.tokenizer=...] out=<dir>``: pre-tokenize a corpus once.

Tokenizes with a process pool (every core unless ``data.workers``) into the shards of ``tttexp.data.shards``
under ``out`` (default ``<cache_dir>/prepared``), with a progress bar; a killed prepare continues from its last
complete shard, and a prepared corpus is found again from file names, sizes and mtimes (or the dataset's
identity) plus the tokenizer. Training with ``data.prepared_dir=<out>`` and the same data settings starts from
the shards; the training app would otherwise run this same step itself on its first start.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


def main() -> None:
    from tttexp.app.schemas import DataSchema

    @dataclass
    class PrepareConfig:
        """``conf/prepare.yaml``."""

        data: Any = field(default_factory=DataSchema)  # the corpus and tokenizer, as for training
        out: str | None = None  # root of prepared corpora (a disk every node sees); default <cache_dir>/prepared
        seed: int = 0  # the split the tokenizer sample is drawn from (data.tokenizer=bpe), as for training

    ConfigStore.instance().store(name="prepare_schema", node=PrepareConfig)
    hydra_main()


@hydra.main(version_base="1.3", config_path="../conf", config_name="prepare")
def hydra_main(cfg: DictConfig) -> None:
    from tttexp.data.module import DataModule
    from tttexp.data.shards import PreparedCorpus
    from tttexp.errors import TTTExpError

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    settings = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(settings, dict)
    settings.pop("_target_", None)
    if cfg.out:
        settings["prepared_dir"] = cfg.out
    try:
        data = DataModule(**settings)
        directory, tokenizer = data.prepare()
        corpus = PreparedCorpus(directory, tokenizer.name, tokenizer.vocab_size, tokenizer.eos_id)
    except TTTExpError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    except (ValueError, OSError) as err:
        print(f"error: data: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}",
              file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"prepared {directory}: {corpus.num_documents:,} documents, {corpus.num_tokens:,} tokens in "
          f"{len(corpus.shards)} shard(s), tokenizer {tokenizer.name}; train with the same data settings and "
          f"data.prepared_dir={data.prepared_dir}", flush=True)
