"""Small helpers shared by the `infer/` and `train/` entry points."""

from __future__ import annotations

import os
import signal
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


def run_main(main: Callable[[], int], interrupted: str = "interrupted") -> NoReturn:
    """Runs a CLI's `main` and exits with its code. Ctrl-C anywhere (loading, compiling,
    generating) exits at once with 130 and the one line `interrupted`, no traceback.

    The exit happens in the SIGINT handler itself rather than through `KeyboardInterrupt`:
    an exception raised while Python runs a `__del__` or a gc callback (jax has one) is
    printed and dropped, and the run would go on as if Ctrl-C had never been pressed. Work in
    progress is safe: distillation writes whole chunk files only, and training installs its own
    handler that checkpoints after the current step (`training.loop.Interrupt`)."""

    def exit_now(signum, frame):
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001 - a flush cut in half must not block the exit
            pass
        os.write(2, f"\n{interrupted}\n".encode())
        # Skip atexit hooks: a library interrupted halfway through its work would print its
        # own traceback from them.
        os._exit(130)

    signal.signal(signal.SIGINT, exit_now)
    try:
        code = main()
    except KeyboardInterrupt:  # one that main raised itself, e.g. from a handler it installed
        exit_now(signal.SIGINT, None)
    sys.exit(code)


def fail(error: BaseException, code: int = 2) -> int:
    """Prints a one-line error naming the problem and returns the exit code."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"error: {message}", file=sys.stderr)
    return code


quiet_jax_logs()
