"""The ``kdrun`` console entry point (``python -m kdrun`` too).

It imports the CLI inside a ``try``: a Ctrl-C in the first fraction of a second, while torch, Hydra and
omegaconf are still being imported, is then the same one line and exit status 130 as a Ctrl-C later
(:func:`kdrun.cli.main`), not a traceback from the middle of an import."""
from __future__ import annotations

import sys


def entry() -> None:
    try:
        from kdrun.cli import main
    except KeyboardInterrupt:
        print("kdrun: interrupted (Ctrl-C).", file=sys.stderr, flush=True)
        sys.exit(130)
    main()


if __name__ == "__main__":
    entry()
