"""What every command-line tool shares: bad input becomes one line on stderr and exit status 2."""
from __future__ import annotations

import sys
from typing import Callable


def run_cli(main: Callable[[], int]) -> int:
    """Run `main`; a ValueError or FileNotFoundError (bad input) prints one line, no traceback."""
    try:
        return main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
