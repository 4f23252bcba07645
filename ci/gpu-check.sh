#!/usr/bin/env bash
# GPU check on one CUDA machine, within 8 minutes: bench/gpu_validate.py's stages (probe,
# kernels against the NumPy reference, kernel bandwidth, the 3-D kernels against their
# reference and their bandwidth, halo-exchange cost at 1 and 2 ranks,
# the test suite on the CuPy backend at 1 and 2 ranks), each with its log under $OUT, a summary
# table at the end, results in bench/results/gpu-validate-<gpu>-<date>.{md,json}. Run from the
# repository root:
#
#   ci/gpu-check.sh [probe] [kernels] [bandwidth] [heat3d] [halo] [tests]   (default: all six)
#   ci/gpu-check.sh main | bench | collectives                      (longer jobs, on their own)
#
# Exits non-zero when any stage failed. Expects CuPy, NumPy, SciPy and pytest installed
# (pytest-xdist used when present); installs gpumpiad itself (editable, without its
# dependencies) and, first, any wheels in .whl/ (an MPI runtime such as the mpich wheel, mpi4py,
# nvtx, mpi-pytest) for machines that cannot reach a package index. Logs and result tables go to
# $OUT (default ./gpu-out), the results also to $RESULTS (default bench/results); BUDGET
# (seconds, default 480) bounds the validation stages; PYTEST_ARGS (test files, options), XDIST
# (workers, default the CPUs less two) and GPUMPIAD_VALIDATE_MIN_RANKS / _MAX_RANKS (the
# parallel tests' ranks, default 1 and 2) shape the tests stage.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-480}
RESULTS=${RESULTS:-bench/results}

validate=()
extra=()
for stage in "$@"; do
    case $stage in
    probe | kernels | bandwidth | heat3d | halo | tests) validate+=("$stage") ;;
    main | bench | collectives) extra+=("$stage") ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
    esac
done

if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --force-reinstall .whl/*.whl || exit 1
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
PREFIX=$($PY -c 'import sys; print(sys.prefix)')
PATH="$PREFIX/bin:$PATH"
export PATH
if compgen -G ".whl/mpich-*.whl" >/dev/null && [ -e "$PREFIX/lib/libmpi.so.12" ]; then
    # The carried MPICH, not an MPI the image may have (mpi4py would load that one, and
    # MPICH's mpiexec would then start ranks that each see a world of one).
    export MPI4PY_MPIABI=mpich MPI4PY_LIBMPI=$PREFIX/lib/libmpi.so.12 \
        LD_PRELOAD=$PREFIX/lib/libmpi.so.12
fi

rc=0
if [ $# -eq 0 ] || [ ${#validate[@]} -gt 0 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
        --format=csv >"$OUT/nvidia-smi.txt" 2>&1
    GPUMPIAD_BACKEND=cupy $PY bench/gpu_validate.py --out "$OUT" --results "$RESULTS" \
        --budget $((BUDGET - SECONDS)) ${validate[@]+"${validate[@]}"} || rc=1
fi

# Each longer job: its log under $OUT, its exit status in the last line.
run() {
    local name=$1
    shift
    "$@" >"$OUT/$name.log" 2>&1
    local status=$?
    tail -n 16 "$OUT/$name.log"
    echo "$name: exit $status"
    [ $status -eq 0 ] || rc=1
}
for stage in ${extra[@]+"${extra[@]}"}; do
    case $stage in
    main)
        run main-job env GPUMPIAD_BACKEND=cupy timeout 200 mpiexec -n 4 gpumpiad heat-inverse \
            --out "$OUT/main-job"
        ;;
    bench)
        run bench-heat env GPUMPIAD_BACKEND=cupy timeout 240 mpiexec -n 2 $PY bench/bench_heat.py \
            --n 4096 --steps 100 --out "$OUT/heat_gpu.md"
        # One rank exchanging with itself: the halo's cost without two ranks sharing the GPU.
        run bench-heat-periodic env GPUMPIAD_BACKEND=cupy timeout 200 mpiexec -n 1 \
            $PY bench/bench_heat.py --n 4096 --steps 100 --periodic \
            --out "$OUT/heat_gpu_periodic.md"
        ;;
    collectives)
        # The data path is what the MPI library supports (probe), as users get it.
        run collectives env GPUMPIAD_BACKEND=cupy timeout 200 mpiexec -n 2 \
            $PY bench/bench_collectives.py --out "$OUT/collectives_gpu.md"
        run collectives-overlap env GPUMPIAD_BACKEND=cupy MPIR_CVAR_ASYNC_PROGRESS=1 timeout 100 \
            mpiexec -n 2 $PY bench/bench_collectives.py --overlap-only \
            --out "$OUT/collectives_gpu.md"
        ;;
    esac
done
exit $rc
