"""NVTX ranges and per-phase profiles (gpumpiad.trace), proved with a real NVTX tool.

The tool is a small NVTX v3 injection library built here with the C compiler: NVTX loads it from
``NVTX_INJECTION64_PATH`` and hands it the core function table, and it records every domain,
category, pushed range (name, category, payload) and pop into one file per process. The jobs
run a small ``heat.solve`` with a gradient through collectives, point-to-point messages,
staged copies and a checkpoint under ``mpiexec`` at 1 and 2 ranks.
"""
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import gpumpiad
from gpumpiad import trace

REPO = Path(gpumpiad.__file__).resolve().parent.parent

INJECTION_C = r"""
/* Minimal NVTX v3 injection library: records domains, categories, pushed ranges and pops. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <pthread.h>

typedef void (*NvtxFunctionPointer)(void);
typedef NvtxFunctionPointer **NvtxFunctionTable;
typedef struct {
    size_t struct_size;
    int (*GetModuleFunctionTable)(int module, NvtxFunctionTable *table, unsigned int *size);
} NvtxExportTableCallbacks;
typedef const void *(*NvtxGetExportTableFunc_t)(uint32_t table_id);

enum { ETID_CALLBACKS = 1, MODULE_CORE2 = 5 };
enum { CBID_PUSH = 4, CBID_POP = 5, CBID_NAME_CATEGORY_A = 8, CBID_REGISTER_STRING_A = 10,
       CBID_DOMAIN_CREATE_A = 12 };
enum { MESSAGE_ASCII = 1, MESSAGE_REGISTERED = 3 };
enum { PAYLOAD_UINT64 = 1, PAYLOAD_INT64 = 2, PAYLOAD_DOUBLE = 3 };

typedef struct {
    uint16_t version, size;
    uint32_t category;
    int32_t color_type;
    uint32_t color;
    int32_t payload_type, reserved0;
    union { uint64_t u64; int64_t i64; double d; } payload;
    int32_t message_type;
    union { const char *ascii; const void *unicode; const char *registered; } message;
} EventAttributes;

typedef struct { char name[256]; } Domain;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static FILE *out;
static long long pushes, pops;

static void record(const char *fmt, const char *a, const char *b, const char *c) {
    if (!out) return;
    pthread_mutex_lock(&lock);
    fprintf(out, fmt, a, b, c);
    pthread_mutex_unlock(&lock);
}

static const char *dname(const Domain *d) { return d ? d->name : "<default>"; }

static void *domain_create(const char *name) {
    Domain *d = calloc(1, sizeof(Domain));
    snprintf(d->name, sizeof d->name, "%s", name ? name : "");
    record("domain\t%s%s%s\n", d->name, "", "");
    return d;
}

static const char *register_string(const Domain *d, const char *s) {
    (void)d;
    return strdup(s);
}

static void name_category(const Domain *d, uint32_t id, const char *name) {
    char idtext[32];
    snprintf(idtext, sizeof idtext, "%u", id);
    record("category\t%s\t%s\t%s\n", dname(d), idtext, name);
}

static int push(const Domain *d, const EventAttributes *a) {
    __atomic_add_fetch(&pushes, 1, __ATOMIC_RELAXED);
    if (!out) return 0;
    const char *msg = a->message_type == MESSAGE_REGISTERED ? a->message.registered
                    : a->message_type == MESSAGE_ASCII ? a->message.ascii : "";
    char rest[96];
    if (a->payload_type == PAYLOAD_INT64)
        snprintf(rest, sizeof rest, "%u\tint\t%lld", a->category, (long long)a->payload.i64);
    else if (a->payload_type == PAYLOAD_UINT64)
        snprintf(rest, sizeof rest, "%u\tint\t%llu", a->category,
                 (unsigned long long)a->payload.u64);
    else if (a->payload_type == PAYLOAD_DOUBLE)
        snprintf(rest, sizeof rest, "%u\tfloat\t%.17g", a->category, a->payload.d);
    else
        snprintf(rest, sizeof rest, "%u\tnone\t", a->category);
    record("push\t%s\t%s\t%s\n", dname(d), msg, rest);
    return 0;
}

static int pop(const Domain *d) {
    __atomic_add_fetch(&pops, 1, __ATOMIC_RELAXED);
    record("pop\t%s%s%s\n", dname(d), "", "");
    return 0;
}

long long nvtx_record_pushes(void) { return __atomic_load_n(&pushes, __ATOMIC_RELAXED); }

static void finish(void) {
    if (out) {
        fprintf(out, "end\t%lld\t%lld\n", pushes, pops);
        fclose(out);
        out = NULL;
    }
}

int InitializeInjectionNvtx2(NvtxGetExportTableFunc_t get_export_table) {
    const NvtxExportTableCallbacks *callbacks = get_export_table(ETID_CALLBACKS);
    NvtxFunctionTable table = 0;
    unsigned int size = 0;
    if (!callbacks || !callbacks->GetModuleFunctionTable(MODULE_CORE2, &table, &size) || !table)
        return 0;
    if (size < CBID_DOMAIN_CREATE_A) return 0;  /* size: the highest callback id */
    *table[CBID_PUSH] = (NvtxFunctionPointer)push;
    *table[CBID_POP] = (NvtxFunctionPointer)pop;
    *table[CBID_NAME_CATEGORY_A] = (NvtxFunctionPointer)name_category;
    *table[CBID_REGISTER_STRING_A] = (NvtxFunctionPointer)register_string;
    *table[CBID_DOMAIN_CREATE_A] = (NvtxFunctionPointer)domain_create;
    const char *dir = getenv("NVTX_RECORD_DIR");
    if (dir && *dir) {
        char path[4096];
        snprintf(path, sizeof path, "%s/nvtx-%d.tsv", dir, (int)getpid());
        if (!out) {
            out = fopen(path, "w");
            atexit(finish);
        }
    }
    return 1;
}
"""

JOB = textwrap.dedent("""
    import os
    import numpy as np
    import gpumpiad as gm
    from gpumpiad import checkpoint, trace
    from gpumpiad.heat import Grid, solve

    assert trace.nvtx_attached()
    comm = gm.Comm()
    rank, size = comm.rank, comm.size
    n = 12
    x = np.linspace(0.0, 1.0, n)
    with Grid((n, n)) as grid:
        kappa = grid.local(1.0 + 0.5 * np.outer(x, x))
        u0 = grid.local(np.outer(np.sin(np.pi * x), np.sin(np.pi * x)))
        f = grid.local(np.zeros((n, n)))

        def objective(k, theta):
            u = solve(u0, k, f, 1e-4, 1.0 / n, 5, grid=grid, checkpoints=2)
            local = (u * u).sum().reshape(1) * gm.mpi_bcast(theta)
            shifted = gm.mpi_exchange(local, dest=(rank + 1) % size,
                                      source=(rank - 1) % size)
            pieces = gm.mpi_gather(shifted)
            first = pieces.sum() if rank == 0 else 0.0 * shifted.sum()
            return gm.sum(gm.mpi_sum(local)) + gm.sum(gm.mpi_sum(first))

        value, grads = gm.value_and_grad(objective, argnums=(0, 1))(
            gm.tensor(kappa, distributed=True), np.array([1.5]))
    path = os.path.join(os.environ["NVTX_RECORD_DIR"], "state.ckpt")
    checkpoint.save(path, {"g": gm.backend.to_numpy(grads[1].data)}, comm=comm)
    assert checkpoint.load(path, comm=comm)["g"].shape == (1,)
    for payload in (7, None, 2.5, np.int32(9)):
        with trace.span("test.payload", trace.WAIT, payload):
            pass
    try:
        with trace.span("test.raises", trace.COMPUTE):
            raise RuntimeError("inside a span")
    except RuntimeError:
        pass
    gm.mpi_finalize()
    print("job", rank, float(np.asarray(value).reshape(-1)[0]), flush=True)
""")

# Ranges the library pushes in this job at every number of ranks, with their categories.
# (Reductions of the ranks' cotangents and halo exchanges, which one rank does without, are
# checked at two.)
EXPECTED = {
    "mpi.bcast": trace.COMMUNICATION,
    "mpi.sum": trace.COMMUNICATION,
    "mpi.gather": trace.COMMUNICATION,
    "mpi.gather.reverse": trace.COMMUNICATION,
    "mpi.exchange": trace.COMMUNICATION,
    "mpi.exchange.reverse": trace.COMMUNICATION,
    "mpi.control": trace.COMMUNICATION,
    "staging.device_to_host": trace.STAGING,
    "staging.host_to_device": trace.STAGING,
    "test.raises": trace.COMPUTE,
    "test.payload": trace.WAIT,
    # Waits for results (transport) and reverse-mode steps (tape).
    "mpi.wait": trace.WAIT,
    "adjoint.heat.solve": trace.ADJOINT,
    "adjoint.mpi_bcast": trace.ADJOINT,
    "adjoint.mpi_sum": trace.ADJOINT,
    "adjoint.mpi_gather": trace.ADJOINT,
    "adjoint.mpi_exchange": trace.ADJOINT,
    # The solver's phases (two checkpoints for five steps: the reverse pass recomputes).
    "heat.forward": trace.COMPUTE,
    "heat.steps": trace.COMPUTE,
    "heat.recompute": trace.COMPUTE,
    "heat.adjoint": trace.ADJOINT,
}
# Pushed on the writing rank only.
EXPECTED_ON_ROOT = {
    "checkpoint.write": trace.STAGING,
    "checkpoint.read": trace.STAGING,
}
EXPECTED_AT_TWO = {
    "mpi.allreduce.cotangents": trace.COMMUNICATION,
    "mpi.allreduce.agreement": trace.COMMUNICATION,
    "halo_exchange": trace.COMMUNICATION,
}
# Ranges whose payload is a byte count (some pieces are empty, but not all).
SIZED = {"mpi.bcast", "mpi.sum", "mpi.gather", "mpi.exchange", "staging.device_to_host",
         "staging.host_to_device", "checkpoint.write", "halo_exchange"}
# Ranges whose payload is a number of cells.
CELLS = {"heat.forward", "heat.steps", "heat.recompute", "heat.adjoint"}


def build_injection(folder):
    """Build the injection library in ``folder``; its path, or None without a C compiler.
    (``bench/bench_nvtx.py`` uses it too.)"""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None
    folder = Path(folder)
    (folder / "inject.c").write_text(INJECTION_C)
    library = folder / "libinject.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", str(library),
                    str(folder / "inject.c"), "-lpthread"], check=True, timeout=120)
    return library


@pytest.fixture(scope="module")
def injection(tmp_path_factory):
    library = build_injection(tmp_path_factory.mktemp("nvtx"))
    if library is None:
        pytest.skip("needs a C compiler (gcc) to build the NVTX injection library")
    return library


def run_recorded(library, folder, ranks, script, extra_env=None, timeout=240):
    folder.mkdir(exist_ok=True)
    (folder / "job.py").write_text(script)
    env = dict(os.environ, GPUMPIAD_BACKEND="numpy", NVTX_INJECTION64_PATH=str(library),
               NVTX_RECORD_DIR=str(folder), PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
               **(extra_env or {}))
    env.pop("NVTX_DISABLE", None)
    proc = subprocess.run(["mpiexec", "-n", str(ranks), sys.executable, str(folder / "job.py")],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, [read_record(p) for p in sorted(folder.glob("nvtx-*.tsv"))]


def read_record(path):
    """One process's record: domains, categories {(domain, id): name}, pushes
    [(domain, name, category id, payload kind, payload)], pops [domain], and the tool's own
    push/pop counts from its last line."""
    rec = dict(domains=[], categories={}, pushes=[], pops=[], end=None)
    for line in path.read_text().splitlines():
        kind, *fields = line.split("\t")
        if kind == "domain":
            rec["domains"].append(fields[0])
        elif kind == "category":
            rec["categories"][(fields[0], int(fields[1]))] = fields[2]
        elif kind == "push":
            domain, name, category, payload_kind, payload = fields
            value = {"int": int, "float": float}.get(payload_kind, lambda _: None)(payload)
            rec["pushes"].append((domain, name, int(category), payload_kind, value))
        elif kind == "pop":
            rec["pops"].append(fields[0])
        elif kind == "end":
            rec["end"] = (int(fields[0]), int(fields[1]))
    return rec


@pytest.mark.parametrize("ranks", [1, 2])
def test_every_phase_pushes_its_range_in_the_gpumpiad_domain(injection, tmp_path, ranks):
    # Staging mode runs the host staging copies a device array takes, on NumPy arrays.
    proc, records = run_recorded(injection, tmp_path / "rec", ranks, JOB,
                                 {"GPUMPIAD_STAGE_HOST_ARRAYS": "1"})
    assert len(records) == ranks, proc.stdout + proc.stderr
    values = {line.split()[2] for line in proc.stdout.splitlines() if line.startswith("job")}
    assert len(values) == 1, proc.stdout
    expected = dict(EXPECTED, **(EXPECTED_AT_TWO if ranks > 1 else {}))
    everywhere = set()
    largest = {}
    for rec in records:
        assert "gpumpiad" in rec["domains"]
        categories = {name: cid for (domain, cid), name in rec["categories"].items()
                      if domain == "gpumpiad"}
        assert set(categories) == set(trace.CATEGORIES)
        ours = [p for p in rec["pushes"] if p[0] == "gpumpiad"]
        names = {p[1] for p in ours}
        everywhere |= names
        missing = set(expected) - names
        assert not missing, f"ranges never pushed: {sorted(missing)}; pushed: {sorted(names)}"
        for _, name, cid, kind, payload in ours:
            category = {**expected, **EXPECTED_ON_ROOT}.get(name)
            if category is not None:
                assert cid == categories[category], (name, cid, categories)
            if name in SIZED or name in CELLS:
                assert kind == "int" and payload >= 0, (name, kind, payload)
                largest[name] = max(largest.get(name, 0), payload)
        # A range's payload is its own push's, never an earlier push's of the same name.
        assert [(p[3], p[4]) for p in ours if p[1] == "test.payload"] == [
            ("int", 7), ("none", None), ("float", 2.5), ("int", 9)]
        # Every range is closed, an exception inside a span included.
        assert rec["pops"].count("gpumpiad") == len(ours)
        assert rec["end"] is not None and rec["end"][0] == rec["end"][1]
    assert set(EXPECTED_ON_ROOT) <= everywhere
    assert all(largest[name] > 0 for name in (SIZED | CELLS) & everywhere), largest
    assert (SIZED | CELLS) - {"halo_exchange"} <= everywhere


def test_no_tool_and_no_profile_is_one_shared_no_op():
    if trace.nvtx_attached():
        pytest.skip("an NVTX tool is attached to this test process")
    a = trace.span("test.a", trace.COMPUTE, payload=3)
    assert a is trace.span("test.b", trace.WAIT)
    with a as value:
        assert value is None


def test_profile_time_is_exclusive_per_category_and_within_wall_time():
    with trace.collect() as totals:
        with trace.span("test.outer", trace.ADJOINT):
            time.sleep(0.02)
            with trace.span("test.inner", trace.COMMUNICATION, payload=np.int64(8)):
                time.sleep(0.03)
                with trace.span("test.innermost", trace.WAIT, payload=np.float32(0.5)):
                    time.sleep(0.01)
        time.sleep(0.01)
        live = trace.profile_totals()
    assert 0.02 <= totals[trace.ADJOINT] < 0.02 + 0.015
    assert 0.03 <= totals[trace.COMMUNICATION] < 0.03 + 0.015
    assert 0.01 <= totals[trace.WAIT] < 0.01 + 0.015
    assert totals[trace.COMPUTE] == totals[trace.STAGING] == 0.0
    spans = sum(totals[c] for c in trace.CATEGORIES)
    assert spans + totals.other == pytest.approx(totals.wall)
    assert totals.other >= 0.01
    assert live[trace.ADJOINT] == totals[trace.ADJOINT] and live["wall"] <= totals.wall
    # Closed: later spans add nothing, and the off path is back.
    with trace.span("test.after", trace.COMPUTE):
        time.sleep(0.005)
    assert totals[trace.COMPUTE] == 0.0
    assert trace.profile_totals()["wall"] == 0.0


def test_profile_counts_only_its_own_thread_and_survives_exceptions():
    import threading

    def elsewhere():
        with trace.span("test.thread", trace.COMPUTE):
            time.sleep(0.02)

    with trace.collect() as totals:
        worker = threading.Thread(target=elsewhere)
        worker.start()
        worker.join()
        with pytest.raises(KeyError):
            with trace.span("test.raises", trace.STAGING):
                raise KeyError("x")
        with trace.span("test.after", trace.WAIT):
            time.sleep(0.01)
    assert totals[trace.COMPUTE] == 0.0
    assert totals[trace.WAIT] >= 0.01
    assert totals[trace.STAGING] < 0.01


@pytest.mark.parametrize("args, error, words", [
    (("test.x", "gpu"), ValueError, "category must be one of compute, communication"),
    ((b"test.x", trace.COMPUTE), TypeError, "name must be a str, got bytes"),
    (("test.x", trace.COMPUTE, "12"), TypeError, "payload must be an int or a float, got str"),
    (("test.x", trace.COMPUTE, True), TypeError, "payload must be an int or a float, got bool"),
    (("test.x", trace.COMPUTE, [1]), TypeError, "payload must be an int or a float, got list"),
])
def test_span_arguments_are_checked_while_tracing(args, error, words):
    with trace.collect():
        with pytest.raises(error, match=f"rank 0: trace.span: {words}"):
            trace.span(*args)
