"""Every metric key the training loop and the app write comes from the catalogue (tttexp.loggers.catalogue)."""

from __future__ import annotations

import re
from pathlib import Path

import tttexp

SRC = Path(tttexp.__file__).parent
PREFIXES = "train|val|summary|system|warnings|state|inference|model|harness|plots|trainer"
# a whole string literal that is a metric key or a key prefix: "train/loss", 'summary/', "warnings/recompiles"
KEY_LITERAL = re.compile(rf"""(["'])(?:{PREFIXES})/[a-z0-9_/]*\1""")


def test_no_metric_key_literal_in_training_or_app():
    found = []
    for folder in ("training", "app"):
        for path in sorted((SRC / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if KEY_LITERAL.search(line):
                    found.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert not found, "metric keys written as literals; use tttexp.loggers.catalogue:\n" + "\n".join(found)


def test_the_pattern_finds_a_literal():
    assert KEY_LITERAL.search('record["train/loss"] = 1')
    assert KEY_LITERAL.search("k.replace('summary/', x)")
    assert not KEY_LITERAL.search('print(f"val/loss {loss:.4f}")')  # display text, not a key
