"""A failure on one rank ends the whole job.

An uncaught exception on one rank would leave the others waiting forever in their next
collective. The hook installed here prints the traceback (once, from the failing rank) and
calls ``MPI_Abort`` so that every rank exits promptly with a non-zero code, as
``python -m mpi4py`` does. Installed at import in jobs of more than one rank;
``GPUMPIAD_ABORT_ON_ERROR=0`` leaves the interpreter's hooks alone.
"""
from __future__ import annotations

import os
import sys
import threading

_installed = {"done": False}


def _abort():
    import time

    from mpi4py import MPI
    try:
        sys.stderr.flush()
        sys.stdout.flush()
        # Give mpiexec a moment to forward the traceback before it tears the job down.
        time.sleep(0.2)
    finally:
        MPI.COMM_WORLD.Abort(1)


def install():
    """Install the abort-on-uncaught-exception hooks (main thread and other threads)."""
    if _installed["done"] or os.environ.get("GPUMPIAD_ABORT_ON_ERROR", "1").strip() == "0":
        return
    _installed["done"] = True
    previous = sys.excepthook
    previous_thread = threading.excepthook

    def excepthook(kind, value, traceback):
        previous(kind, value, traceback)
        if kind not in (KeyboardInterrupt, SystemExit):
            _abort()

    def thread_excepthook(args):
        previous_thread(args)
        if args.exc_type is not SystemExit:
            _abort()

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
