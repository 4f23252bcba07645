#!/usr/bin/env bash
# GPU check on one CUDA machine: the test suite on the CuPy backend, the kernels' checks and the
# GPU benchmarks. Run from the repository root:
#
#   ci/gpu-check.sh [probe] [tests] [main] [bench] [collectives]     (default: all five)
#
# Expects CuPy, NumPy, SciPy, pytest and pytest-xdist installed; installs gpumpiad itself (editable,
# without its dependencies) and, first, any wheels in .whl/ (an MPI runtime such as the mpich
# wheel, mpi4py, nvtx, mpi-pytest) for machines that cannot reach a package index. Logs and result
# tables go to $OUT (default ./gpu-out).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
stages=${*:-probe tests main bench collectives}

if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || exit 1
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
PATH="$($PY -c 'import sys; print(sys.prefix)')/bin:$PATH"
export PATH

for stage in $stages; do
    case $stage in
    probe)
        {
            nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
                --format=csv
            nproc
            $PY - <<'EOF'
import cupy, mpi4py, numpy
from mpi4py import MPI
import gpumpiad
from gpumpiad import transport
print("cupy", cupy.__version__, "CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(),
      "mpi4py", mpi4py.__version__, "numpy", numpy.__version__)
print(MPI.Get_library_version().splitlines()[0])
print("backend", gpumpiad.backend_name(), "path", transport.path_description(),
      "MPIX_Query_cuda_support", transport._probe_cuda_support())
EOF
        } 2>&1 | tee "$OUT/probe.txt"
        ;;
    tests)
        # Forking mode of mpi-pytest: every parallel test is its own mpiexec; xdist spreads them.
        # SIGINT at the time limit still prints pytest's summary of what ran.
        GPUMPIAD_TEST_BACKEND=cupy MPIEXEC_TIMEOUT=${MPIEXEC_TIMEOUT:-60} \
            timeout -s INT -k 20 "${TEST_TIMEOUT:-420}" $PY -m pytest -p no:cacheprovider -q \
            -n "${XDIST:-8}" --tb=short -rfE ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest-cupy.log" \
            | grep -E "^(FAILED|ERROR)|passed|failed" | tail -n 80
        ;;
    main)
        GPUMPIAD_BACKEND=cupy timeout 200 mpiexec -n 4 gpumpiad heat-inverse --out /tmp/main-job \
            2>&1 | tee "$OUT/main-job.log" | tail -n 12
        ;;
    bench)
        GPUMPIAD_BACKEND=cupy timeout 240 mpiexec -n 2 $PY bench/bench_heat.py --n 4096 \
            --steps 100 --out "$OUT/heat_gpu.md" 2>&1 | tail -n 40
        # One rank exchanging with itself: the halo's cost without two ranks sharing the GPU.
        GPUMPIAD_BACKEND=cupy timeout 200 mpiexec -n 1 $PY bench/bench_heat.py --n 4096 \
            --steps 100 --periodic --out "$OUT/heat_gpu_periodic.md" 2>&1 | tail -n 16
        ;;
    collectives)
        # The data path is what the MPI library supports (probe), as users get it.
        GPUMPIAD_BACKEND=cupy timeout 200 mpiexec -n 2 $PY bench/bench_collectives.py \
            --out "$OUT/collectives_gpu.md" 2>&1 | tail -n 16
        GPUMPIAD_BACKEND=cupy MPIR_CVAR_ASYNC_PROGRESS=1 timeout 100 mpiexec -n 2 \
            $PY bench/bench_collectives.py --overlap-only --out "$OUT/collectives_gpu.md" 2>&1 \
            | tail -n 3
        ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
    esac
done
