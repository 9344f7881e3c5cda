"""One tokenizer interface over three libraries: `tokenizers` (trained BPE), SentencePiece, transformers.

The libraries are imported only when a tokenizer of that kind is built, so importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from tttexp.data._atomic import publish_file, temporary_sibling

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
SENTENCEPIECE_VOCAB = 32000
_BPE_FORMAT = "byte-level-bpe-v1"  # bump when training settings change, so old cache files are not reused


class _Backend(Protocol):
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...


class Tokenizer:
    """Text to token ids and back.

    `name` identifies the exact vocabulary (it is part of cache keys); `source` is what to pass back to
    `build_tokenizer` to get the same tokenizer again (a file path, or a transformers name or directory).
    """

    def __init__(self, backend: _Backend, *, name: str, source: str, vocab_size: int, eos_id: int) -> None:
        self._backend = backend
        self.name = name
        self.source = source
        self.vocab_size = vocab_size
        self.eos_id = eos_id

    def encode(self, text: str) -> list[int]:
        return self._backend.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._backend.encode_batch(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode([int(i) for i in ids])

    def save_pretrained(self, directory: Path | str) -> bool:
        """Write the tokenizer as a transformers tokenizer directory (``AutoTokenizer.from_pretrained`` loads
        it and encodes as this one does); False for a backend that has no such form (SentencePiece files)."""
        save = getattr(self._backend, "save_pretrained", None)
        if save is None:
            return False
        Path(directory).mkdir(parents=True, exist_ok=True)
        save(Path(directory))
        return True

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def build_tokenizer(
    kind: str, *, train_texts: Sequence[str] | None, vocab_size: int, cache_dir: Path | str
) -> Tokenizer:
    """Build or load a tokenizer.

    kind:
      - "bpe": byte-level BPE trained on `train_texts` with `vocab_size` entries (including EOS_TOKEN),
        cached as `cache_dir/tokenizers/bpe-<hash>.json` and loaded from there when the texts and size match;
      - "sentencepiece": the 32,000-token SentencePiece model shipped in the mistral-common package;
      - a path to a SentencePiece `.model` file, or to a `tokenizers` `.json` file (e.g. a cached BPE);
      - anything else: a transformers tokenizer name or directory, offline unless TTTEXP_ALLOW_DOWNLOAD=1.
    `vocab_size` and `train_texts` matter only for "bpe".
    """
    if kind == "bpe":
        if train_texts is None:
            raise ValueError("tokenizer='bpe' needs train_texts to train on")
        return _bpe_tokenizer(train_texts, vocab_size, Path(cache_dir).expanduser())
    if kind == "sentencepiece":
        return _sentencepiece_tokenizer(_mistral_sentencepiece_file())
    path = Path(kind).expanduser()
    if kind.endswith(".model") or (path.is_file() and ".model" in path.name):
        if not path.is_file():
            raise ValueError(f"SentencePiece model file {kind!r} does not exist; fix the tokenizer path")
        return _sentencepiece_tokenizer(path)
    if kind.endswith(".json"):
        if not path.is_file():
            raise ValueError(f"tokenizer file {kind!r} does not exist; fix the tokenizer path")
        return _json_tokenizer(path, name=f"json-{_file_digest(path)}")
    return _transformers_tokenizer(kind)


# --- byte-level BPE (tokenizers) -------------------------------------------------------------------


class _TokenizersBackend:
    def __init__(self, tok: Any) -> None:
        self.tok = tok

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def save_pretrained(self, directory: Path) -> None:
        from transformers import PreTrainedTokenizerFast

        PreTrainedTokenizerFast(tokenizer_object=self.tok, eos_token=EOS_TOKEN).save_pretrained(directory)


def _bpe_tokenizer(texts: Sequence[str], vocab_size: int, cache_dir: Path) -> Tokenizer:
    if vocab_size <= 257:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for byte-level BPE; use at least 258 (e.g. 8192)"
        )
    key = _bpe_key(texts, vocab_size)
    path = cache_dir / "tokenizers" / f"bpe-{key}.json"
    if path.is_file():
        log.info("loading BPE tokenizer from %s", path)
    else:
        log.info("training byte-level BPE (vocab %d) on %d texts -> %s", vocab_size, len(texts), path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(path)
        _train_bpe(texts, vocab_size).save(str(tmp))
        publish_file(tmp, path)
    # Always read the published file, so concurrent builders all use the same vocabulary.
    return _json_tokenizer(path, name=f"bpe-{key}")


def _bpe_key(texts: Sequence[str], vocab_size: int) -> str:
    h = hashlib.sha256(f"{_BPE_FORMAT}\x00{vocab_size}\x00{len(texts)}".encode())
    for text in texts:
        data = text.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


def _train_bpe(texts: Sequence[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def _json_tokenizer(path: Path, *, name: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception for unreadable files
        raise ValueError(
            f"cannot read tokenizer file {path}: {str(e).splitlines()[0]}; fix or delete it"
        ) from None
    eos_id = tok.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise ValueError(f"tokenizer file {path} has no {EOS_TOKEN} token; use a tokenizer with one as EOS")
    return Tokenizer(
        _TokenizersBackend(tok),
        name=name,
        source=str(path),
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        eos_id=eos_id,
    )


# --- SentencePiece ---------------------------------------------------------------------------------


class _SentencePieceBackend:
    def __init__(self, sp: Any) -> None:
        self.sp = sp

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


def _mistral_sentencepiece_file() -> Path:
    """The 32,000-entry SentencePiece model that mistral-common carries as package data.

    The package is located, not imported (it is installed without its dependencies).
    """
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "tokenizer='sentencepiece' needs mistral-common: pip install --no-deps mistral-common"
        )
    import sentencepiece

    root = Path(next(iter(spec.submodule_search_locations)))
    for candidate in sorted(root.rglob("tokenizer.model*")):
        sp = sentencepiece.SentencePieceProcessor(model_file=str(candidate))
        if sp.vocab_size() == SENTENCEPIECE_VOCAB:
            return candidate
    raise ValueError(
        f"no {SENTENCEPIECE_VOCAB}-token tokenizer.model* under {root}; reinstall mistral-common"
    )


def _sentencepiece_tokenizer(path: Path) -> Tokenizer:
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"cannot read SentencePiece model {path}: {str(e).splitlines()[0]}") from None
    if sp.eos_id() < 0:
        raise ValueError(f"SentencePiece model {path} defines no EOS token; use a model with one")
    return Tokenizer(
        _SentencePieceBackend(sp),
        name=f"spm-{_file_digest(path)}",
        source=str(path),
        vocab_size=sp.vocab_size(),
        eos_id=sp.eos_id(),
    )


# --- transformers ----------------------------------------------------------------------------------


class TransformersBackend:
    """A transformers tokenizer behind the :class:`Tokenizer` interface (no special tokens added)."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # verbose=False: documents are longer than the model's context by design; they are cut into windows.
        return self.tok(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def save_pretrained(self, directory: Path) -> None:
        self.tok.save_pretrained(directory)


def _transformers_tokenizer(name_or_path: str) -> Tokenizer:
    from transformers import AutoTokenizer

    allow_download = os.environ.get("TTTEXP_ALLOW_DOWNLOAD") == "1"
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=not allow_download)
    except (OSError, ValueError, KeyError) as e:
        hint = "" if allow_download else " (set TTTEXP_ALLOW_DOWNLOAD=1 to fetch from the hub)"
        raise ValueError(
            f"unknown tokenizer {name_or_path!r}: use 'bpe', 'sentencepiece', a .model/.json file or a local "
            f"transformers tokenizer directory{hint} [{type(e).__name__}]"
        ) from None
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no EOS token; pick a tokenizer that defines one")
    return wrap_transformers_tokenizer(tok, name_or_path)


def wrap_transformers_tokenizer(tok: Any, source: str) -> Tokenizer:
    """A loaded transformers tokenizer as a :class:`Tokenizer`, named by a digest of its full definition."""
    digest = hashlib.sha256(f"{type(tok).__name__}\x00{_transformers_definition(tok)}".encode()).hexdigest()[:16]
    return Tokenizer(
        TransformersBackend(tok),
        name=f"hf-{digest}",
        source=source,
        vocab_size=len(tok),
        eos_id=int(tok.eos_token_id),
    )


def _transformers_definition(tok: Any) -> str:
    """The full definition (normalizer, pre-tokenizer, vocabulary) when available, else the vocabulary."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str()
    return json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
