"""Small helpers shared by the `infer/` and `train/` entry points."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn


def quiet_jax_logs() -> None:
    """Keeps XLA/absl start-up chatter off the user's terminal."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def status(message: str, quiet: bool = False) -> None:
    """A progress line on stderr (stdout stays clean for text or JSON)."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def run_main(main: Callable[[], int]) -> NoReturn:
    """Runs a CLI's `main` and exits with its code; Ctrl-C anywhere (loading, compiling) exits
    with 130 and one line instead of a traceback. Work in progress is the caller's to keep:
    training checkpoints on Ctrl-C, distillation writes whole chunk files only."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Skip atexit hooks: a library interrupted halfway through its import (Ctrl-C while
        # jax loads) would print its own traceback from them.
        os._exit(130)
    sys.exit(code)


def fail(error: BaseException, code: int = 2) -> int:
    """Prints a one-line error naming the problem and returns the exit code."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"error: {message}", file=sys.stderr)
    return code


quiet_jax_logs()
