"""``python -m tttexp.prepare``: pre-tokenize a corpus into shards (:mod:`tttexp.app.prepare`)."""

from tttexp.app.prepare import main

if __name__ == "__main__":
    main()
