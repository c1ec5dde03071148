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


_silent = False  # another process of a multi-process job prints (`only_main_process_prints`)


def status(message: str, quiet: bool = False) -> None:
    """A progress line on stderr (stdout stays clean for text or JSON)."""
    if not quiet and not _silent:
        print(message, file=sys.stderr, flush=True)


def only_main_process_prints(is_main: bool) -> None:
    """In a job of several processes, all but the main one run silently: their stdout goes to
    /dev/null and `status` lines are dropped (errors still reach stderr)."""
    global _silent
    if not is_main:
        _silent = True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


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


DTYPES = ("float32", "bfloat16", "bfloat16-pure")  # models.config.PRECISIONS, float16 aside
DTYPE_HELP = ("float32 (default); bfloat16: bf16 weights, fp32 activations and cache (the "
              "accelerator mode: half the weight memory, BiTA still equals greedy); "
              "bfloat16-pure: activations in bf16 too (faster, rounds differently in tree and "
              "one-token steps)")


def add_dtype_argument(parser) -> None:
    """`--dtype float32|bfloat16|bfloat16-pure` on an entry point's argparse parser."""
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help=DTYPE_HELP)


def dtype_list(text: str, flag: str = "--dtype") -> list[str]:
    """A comma-separated list of `DTYPES`; ValueError names the first unknown one."""
    names = [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in names if d not in DTYPES]
    if bad or not names:
        raise ValueError(f"{flag}: unknown dtype {(bad or [text])[0]!r}; use "
                         f"{', '.join(DTYPES)}")
    return names


MESH_HELP = ("decode on a device mesh: data=D,model=N (either may be left out: the other takes "
             "the remaining devices; auto: data over every device). Default: one device. "
             "Weights split over 'model' by the logical-axis rules, batch rows and the KV "
             "cache over 'data' (and kv heads over 'model' where they divide)")


def add_mesh_argument(parser) -> None:
    """`--mesh data=D,model=N` on an entry point's argparse parser (default: one device)."""
    parser.add_argument("--mesh", default=None, metavar="data=D,model=N", help=MESH_HELP)
