"""``python -m ablate.bench`` (``ablate bench``): :func:`ablate.bench.cli.main`, with a data problem said
in one line (exit status 2) rather than as a traceback; the page2019 comparison's child processes rely on it."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from ablate import data
from ablate.bench import cli


def main(argv: Optional[Sequence[str]] = None) -> None:
    try:
        cli.main(argv)
    except data.DataError as err:
        print(f"ablate.bench: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
