"""Command line: ``gpumpiad <job>`` (also ``python -m gpumpiad``), run under ``mpiexec``."""
from __future__ import annotations

import argparse
import sys


def _seed(args):
    """The seed's example: L = sum(mpi_sum(mpi_bcast(θ) ** rank)) and dL/dθ at θ = 2."""
    import numpy as np

    import gpumpiad as gm

    def loss(theta):
        return gm.sum(gm.mpi_sum(gm.mpi_bcast(theta) ** gm.mpi_rank()))

    value, grad = gm.value_and_grad(loss)(np.array([args.theta]))
    if gm.mpi_rank() == 0:
        print(f"ranks {gm.mpi_size()}: L = {float(value):g}, dL/dθ = {float(grad[0]):g}")
    return 0


def main(argv=None):
    """Entry point of the ``gpumpiad`` console script."""
    import gpumpiad

    parser = argparse.ArgumentParser(prog="gpumpiad", description=gpumpiad.__doc__.splitlines()[0])
    jobs = parser.add_subparsers(dest="job", required=True)
    seed = jobs.add_parser("seed", help="the seed's sum/broadcast example and its gradient")
    seed.add_argument("--theta", type=float, default=2.0)
    seed.set_defaults(run=_seed)
    args = parser.parse_args(argv)
    gpumpiad.mpi_init()
    code = args.run(args)
    gpumpiad.mpi_finalize()
    return code


if __name__ == "__main__":
    sys.exit(main())
