"""Bad data is one line, before work where it can be: missing, empty, binary, too short, not UTF-8."""

from __future__ import annotations

import logging

import pytest

from support import exit_code_of_the_app
from tttexp.app.preflight import check
from tttexp.data import DataModule
from tttexp.data.corpus import load_documents
from tttexp.errors import ConfigError


def test_missing_binary_and_empty_directory_paths_are_refused_by_preflight(tmp_path):
    (tmp_path / "nothing").mkdir()
    cases = {
        f"data.paths=[{tmp_path}/missing.txt]": "matches no text file",
        "data.paths=[/bin/ls,/bin/cat]": "/bin/ls is a binary file",
        f"data.paths=[{tmp_path}/nothing]": "a directory with no *.txt file",
    }
    for override, expected in cases.items():
        problem = check(["data=text_files", override])
        assert problem is not None and expected in problem and "\n" not in problem, problem


def test_resume_of_a_missing_file_and_an_overflowing_lr_are_refused_by_preflight(tmp_path):
    assert "no such checkpoint" in check([f"resume={tmp_path}/nonexistent.pt"])
    assert "outside float32's range" in check(["optim.lr=1e39"])


@pytest.mark.parametrize("texts, expected", [
    ({"a.txt": "", "b.txt": "   \n"}, "gave no non-empty documents"),
    ({"a.txt": "short text here", "b.txt": "another short one"}, "fewer than batch_size"),
])
def test_too_little_text_is_one_line(tmp_path, texts, expected):
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    data = DataModule(source="text_files", paths=[str(tmp_path)], seq_len=64, batch_size=4, vocab_size=300,
                      cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as refused:
        data.setup()
    assert expected in str(refused.value) and "\n" not in str(refused.value)


def test_non_utf8_bytes_are_counted_in_one_warning(tmp_path, caplog):
    (tmp_path / "a.txt").write_bytes("caf\xe9 na\xefve".encode("latin-1"))
    (tmp_path / "b.txt").write_bytes(b"ok \xff\xfe end")
    (tmp_path / "c.txt").write_text("clean text")
    with caplog.at_level(logging.WARNING, logger="tttexp.data.corpus"):
        docs = load_documents("text_files", paths=[str(tmp_path)])
    warnings = [r.getMessage() for r in caplog.records if "not UTF-8" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("4 byte(s) in 2 file(s)"), warnings
    assert docs[0].text == "caf\ufffd na\ufffdve"


def test_a_run_that_fails_after_preflight_says_why_in_its_directory(tmp_path, monkeypatch, capsys, app_cache):
    (tmp_path / "a.txt").write_text("short text here")
    (tmp_path / "b.txt").write_text("another short one")
    run = tmp_path / "run"
    monkeypatch.setenv("TTTEXP_CACHE_DIR", str(app_cache))
    code = exit_code_of_the_app(["experiment=smoke", "logging=none", "data=text_files",
                                 f"data.paths=[{tmp_path}/a.txt,{tmp_path}/b.txt]", "data.vocab_size=300",
                                 f"hydra.run.dir={run}"])
    assert code == 1
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == \
        [line for line in err.splitlines() if line.strip() and "WARNING" not in line]
    assert "Traceback" not in err and "job ? failed" not in err
    assert "fewer than batch_size" in (run / "train.log").read_text()
