from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tttexp.data import Document, load_documents, split_documents


def test_shipped_corpus_is_the_state_of_the_union_speeches(shipped_docs: list[Document]) -> None:
    assert len(shipped_docs) > 200
    ids = [d.id for d in shipped_docs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    first = shipped_docs[0]
    assert first.id == "1790-Washington-1"
    assert first.text.startswith("Fellow-Citizens of the Senate and House of Representatives")
    assert all(d.text.strip() for d in shipped_docs)


def test_max_documents_keeps_the_first_ones(shipped_docs: list[Document]) -> None:
    assert load_documents("shipped", max_documents=3) == shipped_docs[:3]


def _write_tree(root: Path, docs: list[Document]) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "one.txt").write_text(docs[0].text, encoding="utf-8")
    (root / "a" / "two.txt").write_text(docs[1].text, encoding="utf-8")
    (root / "a" / "b" / "three.txt").write_text(docs[2].text, encoding="utf-8")
    (root / "a" / "b" / "blank.txt").write_text("  \n\n ")
    (root / "a" / "notes.md").write_text("not a .txt file")


def test_text_files_directory_is_read_recursively(tmp_path: Path, small_docs: list[Document]) -> None:
    _write_tree(tmp_path, small_docs)
    docs = load_documents("text_files", paths=[str(tmp_path)])
    assert sorted(d.text for d in docs) == sorted(d.text for d in small_docs[:3])  # blank file dropped
    assert {Path(d.id).name for d in docs} == {"one.txt", "two.txt", "three.txt"}


def test_text_files_files_and_globs_without_duplicates(tmp_path: Path, small_docs: list[Document]) -> None:
    _write_tree(tmp_path, small_docs)
    paths = [str(tmp_path / "one.txt"), str(tmp_path / "**" / "*.txt"), str(tmp_path / "a" / "two.txt")]
    docs = load_documents("text_files", paths=paths)
    assert len(docs) == 3
    assert docs[0].text == small_docs[0].text
    assert len({d.id for d in docs}) == 3


def test_text_files_path_matching_nothing_is_named(tmp_path: Path, one_line) -> None:
    missing = str(tmp_path / "nowhere" / "*.txt")
    with pytest.raises(ValueError) as excinfo:
        load_documents("text_files", paths=[missing])
    assert missing in one_line(excinfo)
    with pytest.raises(ValueError) as excinfo:
        load_documents("text_files", paths=None)
    assert "paths" in one_line(excinfo)


def test_unknown_source(one_line) -> None:
    with pytest.raises(ValueError) as excinfo:
        load_documents("wikipedia")
    assert "shipped" in one_line(excinfo)


def test_hf_source_needs_a_dataset_name(one_line) -> None:
    with pytest.raises(ValueError) as excinfo:
        load_documents("hf")
    assert "hf_dataset" in one_line(excinfo)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hf_source_without_datasets_says_how_to_install(one_line) -> None:
    with pytest.raises(ValueError) as excinfo:
        load_documents("hf", hf_dataset="some/dataset")
    assert "pip install datasets" in one_line(excinfo)


def test_split_is_by_document_and_deterministic(shipped_docs: list[Document]) -> None:
    train, val = split_documents(shipped_docs, 0.1, seed=0)
    assert not {d.id for d in train} & {d.id for d in val}
    assert len(train) + len(val) == len(shipped_docs)
    assert 0.03 < len(val) / len(shipped_docs) < 0.2
    assert split_documents(shipped_docs, 0.1, seed=0) == (train, val)
    assert split_documents(shipped_docs, 0.1, seed=1)[1] != val


def test_split_of_a_document_does_not_depend_on_the_others(shipped_docs: list[Document]) -> None:
    _, val_all = split_documents(shipped_docs, 0.1, seed=3)
    _, val_half = split_documents(shipped_docs[::2], 0.1, seed=3)
    assert {d.id for d in val_half} == {d.id for d in val_all} & {d.id for d in shipped_docs[::2]}


@pytest.mark.parametrize("fraction", [1e-9, 0.999999])
def test_split_keeps_a_document_on_each_side(shipped_docs: list[Document], fraction: float) -> None:
    train, val = split_documents(shipped_docs[:2], fraction, seed=0)
    assert len(train) == 1 and len(val) == 1


def test_split_rejects_bad_fraction(shipped_docs: list[Document], one_line) -> None:
    with pytest.raises(ValueError) as excinfo:
        split_documents(shipped_docs, 1.0, seed=0)
    assert "val_fraction" in one_line(excinfo)
