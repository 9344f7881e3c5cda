"""``python -m tttexp.train``: the training app (:mod:`tttexp.app.train`)."""

from tttexp.app.train import main

if __name__ == "__main__":
    main()
