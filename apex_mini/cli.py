"""What every command-line tool shares: bad input becomes one line on stderr and exit status 2;
the --model / --model-shape pair; JSON reports; the checks of common flags (sizes, numbers,
thread counts, policy lists, input and output files), made before any long work."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable


def run_cli(main: Callable[[], int]) -> int:
    """Run `main`; bad input (ValueError, or an OSError such as a file that cannot be read or
    written) prints one line, no traceback, and exits with status 2."""
    try:
        return main()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose own errors (an unknown flag, a bad choice, a word for a number)
    are one line too: no usage block above them. Every tool's parser is one of these."""

    def error(self, message: str):
        print(f"error: {message}; see --help", file=sys.stderr)
        self.exit(2)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--model DIR or --model-shape NAME (read by `weights.model_for`)."""
    from .weights import MODEL_SHAPES
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None,
                     help="model folder in Hugging Face layout (default: the shipped tiny model)")
    src.add_argument("--model-shape", choices=MODEL_SHAPES, default=None,
                     help="random weights of a named shape instead of a checkpoint (default: none, "
                     "the checkpoint)")


def size_list(text: str, flag: str) -> list[int]:
    """'1,8,16' -> [1, 8, 16]; anything else (empty, not integers, < 1) is a ValueError naming
    the flag."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} needs sizes >= 1, got {text!r}")
    return values


def check_output_path(path: str | None, flag: str) -> None:
    """Raise ValueError now, before a long run, if `path` (a file to write, folders made as
    needed) could not be written at the end; None: nothing to check."""
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file path")
    folder = target.parent
    while not folder.exists():                        # the nearest folder that exists
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: {folder} is a file, not a folder; give another path")
    if not os.access(folder, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ValueError(f"{flag} {path} cannot be written (permission denied); give another path")


def json_text(document, indent: int = 2) -> str:
    """Standard JSON: a NaN or infinite float is written null (Python's json would write NaN
    or Infinity, which strict parsers such as jq and JavaScript's reject)."""
    def finite(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [finite(v) for v in x]
        return x
    return json.dumps(finite(document), indent=indent, allow_nan=False)


def write_text(path: str | None, text: str) -> None:
    """Write `text` to `path` (folders made as needed) and say so on stderr; None: nothing."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    print(f"wrote {path}", file=sys.stderr)


def write_json(path: str | None, report: dict) -> None:
    """Write `report` to `path` as standard JSON (`json_text`); None: nothing."""
    if path:
        write_text(path, json_text(report))


# ------------------------------------------------------------------------------ input checks
# Each raises ValueError with one line naming the flag, before any long work.

def policy_list(text: str, hint: str = "list each policy once") -> list[str]:
    """--policies as a list: known names, each once (a repeat would silently run once)."""
    from .metrics import parse_policies
    names = parse_policies(text)
    twice = list(dict.fromkeys(n for n in names if names.count(n) > 1))
    if twice:
        raise ValueError(f"--policies {text!r} names {', '.join(twice)} more than once; {hint}")
    return names


def check_input_file(path: str | None, flag: str, expected: str) -> None:
    """`path` must be a readable file; `expected` says what it should hold."""
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give {expected}")
    if not target.is_file():
        raise ValueError(f"{flag} {path}: no such file; give {expected}")


def read_json_arg(path: str, flag: str, expected: str):
    """The JSON document in `path` (checked with `check_input_file`)."""
    check_input_file(path, flag, expected)
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag} {path} is not valid JSON ({e}); give {expected}") from None
    except OSError as e:
        raise ValueError(f"{flag} {path} cannot be read ({e.strerror}); give {expected}") from None


def check_number(value, flag: str, positive: bool, whole: bool = False) -> None:
    """None (unset) passes; else a finite number > 0 (`positive`) or >= 0."""
    if value is None:
        return
    ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        bound = ">= 1" if whole and positive else "> 0" if positive else ">= 0"
        raise ValueError(f"{flag} must be {bound}, got {value}")


def check_threads(value: int | None, flag: str) -> None:
    """A thread count: unset (torch's own choice) or at least 1."""
    if value is not None and value < 1:
        raise ValueError(f"{flag} must be at least 1 (leave it out for torch's own choice), "
                         f"got {value}")
