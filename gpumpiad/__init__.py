"""gpumpiad: reverse-mode automatic differentiation through MPI, on GPUs (CuPy) or CPUs (NumPy).

Every rank runs the same program; gradients flow backwards through the communication. A
*serial* value is the same on every rank, a *distributed* value is each rank's own piece, and the
cotangent of a serial value is the same total on every rank.
"""
from mpi4py import MPI as _MPI

from . import backend
from .autodiff import LossError, grad, value_and_grad, vjp
from .backend import array_module, backend_name
from .comm import Comm, RankInt, mpi_finalize, mpi_init, mpi_rank, mpi_size
from .custom import custom_op
from .debug import CommunicationMismatch, CommunicationTimeout, set_debug, set_timeout
from .gradcheck import GradientCheckError, check_grad
from .grid import Grid
from .halo import halo_exchange
from .mpi.allgather import mpi_allgather
from .mpi.allreduce import MAX, MIN, PROD, SUM, mpi_allreduce, mpi_sum
from .mpi.alltoall import mpi_alltoall
from .mpi.barrier import mpi_barrier
from .mpi.bcast import mpi_bcast
from .mpi.gather import mpi_gather
from .mpi.p2p import mpi_exchange, mpi_recv, mpi_send, mpi_sendrecv
from .mpi.reduce import mpi_reduce
from .mpi.reduce_scatter import mpi_reduce_scatter
from .mpi.scatter import mpi_scatter
from .ops.elementwise import (abs, add, cos, divide, exp, log, maximum, minimum, multiply,
                              negative, power, sin, sqrt, subtract, tanh, where)
from .ops.indexing import getitem
from .ops.linalg import dot, matmul
from .ops.reduction import mean, sum
from .ops.shape import concatenate, reshape, stack, transpose
from .tensor import Tensor, tensor
from .transport import cuda_aware, path_description

from . import checkpoint, heat, optimize  # noqa: E402  (subpackages that use the API above)

__version__ = "0.1.0"

if _MPI.COMM_WORLD.Get_size() > 1:
    from . import abort as _abort
    _abort.install()

__all__ = [
    "MAX", "MIN", "PROD", "SUM", "Comm", "CommunicationMismatch", "CommunicationTimeout",
    "GradientCheckError", "Grid", "LossError", "RankInt", "Tensor", "abs", "add", "array_module",
    "backend", "backend_name", "check_grad", "checkpoint", "concatenate", "cos", "cuda_aware",
    "custom_op", "divide", "dot", "exp", "getitem", "grad", "halo_exchange", "heat", "log",
    "matmul", "maximum", "mean", "minimum", "mpi_allgather", "mpi_allreduce", "mpi_alltoall",
    "mpi_barrier", "mpi_bcast", "mpi_exchange", "mpi_finalize", "mpi_gather", "mpi_init",
    "mpi_rank", "mpi_recv", "mpi_reduce", "mpi_reduce_scatter", "mpi_scatter", "mpi_send",
    "mpi_sendrecv",
    "mpi_size", "mpi_sum", "multiply", "negative", "optimize", "path_description", "power",
    "reshape", "set_debug", "set_timeout", "sin", "sqrt", "stack", "subtract", "sum", "tanh",
    "tensor", "transpose", "value_and_grad", "vjp", "where",
]
