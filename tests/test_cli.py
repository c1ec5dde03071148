"""The CLI wrapper's Ctrl-C contract, independent of any model: exit 130, one line, always."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Ctrl-C that lands while Python runs a finalizer (jax registers a gc callback, so this happens
# in real runs): a KeyboardInterrupt raised there is printed as "Exception ignored" and dropped.
SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from bita_jax.cli import run_main

    class PressesCtrlC:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))  # the handler runs at the next bytecode boundary, still in here

    def main():
        PressesCtrlC()  # dropped at once: the finalizer runs now
        print("finished as if nothing happened")
        return 0

    run_main(main, interrupted=sys.argv[1])
""")


def test_ctrl_c_inside_a_finalizer_still_exits():
    run = subprocess.run([sys.executable, "-c", SCRIPT, "interrupted: rerun to resume"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 130, run.stdout + run.stderr
    assert "finished" not in run.stdout
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr
    assert run.stderr.strip().splitlines() == ["interrupted: rerun to resume"]
