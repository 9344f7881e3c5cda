"""``python -m tttexp.export``: the export app (:mod:`tttexp.app.export`)."""

from tttexp.app.export import main

if __name__ == "__main__":
    main()
