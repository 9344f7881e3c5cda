"""``python -m tttexp.data.prepare``: pre-tokenize a corpus into shards (the app: :mod:`tttexp.app.prepare`)."""

from tttexp.app.prepare import main

if __name__ == "__main__":
    main()
