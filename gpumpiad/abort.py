"""A failure on one rank ends the whole job.

An uncaught exception on one rank would leave the others waiting forever in their next
collective. The hook installed here prints the traceback (once, from the failing rank) and
calls ``MPI_Abort`` so that every rank exits promptly with a non-zero code, as
``python -m mpi4py`` does. The same holds for Ctrl-C (``KeyboardInterrupt``, exit code 130)
and for ``sys.exit`` with a non-zero code: Python runs no hook for ``SystemExit``, so
``sys.exit`` records the code and an exit handler aborts the job with it once ``finally``
blocks and context managers have run. Installed at import in jobs of more than one rank;
``GPUMPIAD_ABORT_ON_ERROR=0`` leaves the interpreter's hooks alone.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading

_installed = {"done": False}


_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT
_exit_code = {"code": 0}


def _abort(code=1):
    import time

    from mpi4py import MPI
    try:
        sys.stderr.flush()
        sys.stdout.flush()
        # Give mpiexec a moment to forward the traceback before it tears the job down.
        time.sleep(0.2)
    finally:
        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.COMM_WORLD.Abort(code)


def _code_of(status):
    """The process exit code ``sys.exit(status)`` gives."""
    if status is None:
        return 0
    if isinstance(status, int):
        return status
    return 1  # a message: printed, exit code 1


def _exit_handler():
    code = _exit_code["code"]
    if code:
        from mpi4py import MPI
        sys.stderr.write(f"gpumpiad: rank {MPI.COMM_WORLD.Get_rank()} exited with code {code} "
                         "(sys.exit); ending the whole job\n")
        _abort(code)


def install():
    """Install the abort-on-uncaught-exception hooks (main thread and other threads)."""
    if _installed["done"] or os.environ.get("GPUMPIAD_ABORT_ON_ERROR", "1").strip() == "0":
        return
    _installed["done"] = True
    previous = sys.excepthook
    previous_thread = threading.excepthook
    previous_exit = sys.exit

    def excepthook(kind, value, traceback):
        previous(kind, value, traceback)
        if issubclass(kind, KeyboardInterrupt):
            _abort(_INTERRUPTED)
        elif not issubclass(kind, SystemExit):
            _abort()

    def exit(status=None):
        if threading.current_thread() is threading.main_thread():
            _exit_code["code"] = _code_of(status)
        previous_exit(status)

    def thread_excepthook(args):
        previous_thread(args)
        if args.exc_type is not SystemExit:
            _abort()

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
    exit.__doc__ = previous_exit.__doc__
    sys.exit = exit
    # Registered after mpi4py's finaliser, so it runs before it (exit handlers run last first).
    atexit.register(_exit_handler)
