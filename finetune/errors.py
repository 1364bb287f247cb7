"""How an ocrtune command ends when something goes wrong.

A user error (bad input, config, file, name) prints one line and exits 2. Anything else is an
internal error: one line naming the stage and a log file that holds the traceback and the
versions of the libraries involved, exit 1. The terminal never gets a bare traceback.
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

from data_prep.errors import OcrtuneError  # the base of every user error; re-exported
from data_prep.errors import ExistingPathError, InputError, MissingPathError  # re-exported

ERROR_LOG = "ocrtune-error.log"
INTERNAL_EXIT = 1
USER_EXIT = 2


# What the CLI reports as "your input is wrong": OcrtuneError and its subclasses only, caught by
# base class, so an error class defined in a module that runs as __main__ (`python -m
# finetune.train`) is still caught. A plain ValueError or OSError from anywhere is not an input
# check of ours: it is reported as an internal error, with its traceback logged.
USER_ERRORS = (OcrtuneError,)

__all__ = ["ERROR_LOG", "INTERNAL_EXIT", "USER_ERRORS", "USER_EXIT", "ExistingPathError", "InputError",
           "MissingPathError", "OcrtuneError", "internal_error_line", "library_versions", "run_command",
           "write_error_log"]


def library_versions() -> dict[str, str]:
    """Python and the installed versions of ocrtune and the libraries it runs on, read from
    package metadata (no import: on an error path the library itself may be what is broken).
    Recorded in train_summary.json and the tracker config, and written into error logs."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for name in ("ocrtune", "torch", "transformers", "peft", "accelerate", "datasets", "huggingface_hub"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def write_error_log(log_dir: str | Path | None, stage: str, exc: BaseException) -> Path:
    """Append the traceback to LOG_DIR/ocrtune-error.log (a temp file when LOG_DIR is None or
    cannot be written) and return its path. Appended, so the stages of one run share a log."""
    text = (f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} internal error in {stage}\n"
            + ", ".join(f"{k} {v}" for k, v in library_versions().items()) + "\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) + "\n")
    if log_dir is not None:
        try:
            path = Path(log_dir) / ERROR_LOG
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(text)
            return path
        except OSError:
            pass
    handle, name = tempfile.mkstemp(prefix="ocrtune-error-", suffix=".log")
    with open(handle, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(name)


def internal_error_line(stage: str, exc: BaseException, log: Path) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    what = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return f"internal error in {stage}: {what} (traceback in {log})"


def run_command(stage: str | Callable[[], str], fn: Callable[[], int | None],
                log_dir: Callable[[], str | Path | None]) -> int:
    """Run one command's body. `stage` (or what it returns, for a command of several stages) and
    `log_dir` are read only on an internal error, so they can name what the body reached."""
    try:
        return fn() or 0
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_EXIT
    except Exception as exc:  # noqa: BLE001  everything else is ours to fix: logged, one line
        try:
            where = log_dir()
        except Exception:  # noqa: BLE001  the folder itself may be what failed
            where = None
        name = stage() if callable(stage) else stage
        log = write_error_log(where, name, exc)
        print(internal_error_line(name, exc, log), file=sys.stderr)
        return INTERNAL_EXIT
