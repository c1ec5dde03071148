"""Small helpers shared by the `infer/` and `train/` entry points."""

from __future__ import annotations

import os
import sys


def quiet_jax_logs() -> None:
    """Keeps XLA/absl start-up chatter off the user's terminal."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def status(message: str, quiet: bool = False) -> None:
    """A progress line on stderr (stdout stays clean for text or JSON)."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def fail(error: BaseException, code: int = 2) -> int:
    """Prints a one-line error naming the problem and returns the exit code."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"error: {message}", file=sys.stderr)
    return code


quiet_jax_logs()
