"""``python -m tttexp.eval``: the evaluation app (:mod:`tttexp.app.eval`)."""

from tttexp.app.eval import main

if __name__ == "__main__":
    main()
