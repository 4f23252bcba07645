// Explicit 2-D heat equation: forward step, fused adjoint, halo pack/unpack.
//
// Layout contract: every field is a C-contiguous (nx+2) x (ny+2) array; cell
// (i, j) lives at i*(ny+2) + j, interior cells are i in 1..nx, j in 1..ny and
// the surrounding ring holds ghost cells.  Compute kernels only write the
// interior sub-rectangle [i0, i1) x [j0, j1) of their outputs.  Outputs must
// not alias inputs.
//
// The same file compiles three ways:
//   * NVRTC / CuPy RawModule (no includes, CUDA built-ins only),
//   * nvcc,
//   * g++ as C++ with -DGPUMPIAD_HOST, which pulls in host_cuda.h and the
//     host_* entry points at the bottom that run the per-cell functions below
//     in ordinary loops.

#ifdef GPUMPIAD_HOST
#include "host_cuda.h"
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#endif

// Threads along j (the contiguous axis) for coalescing; rows along i.
#ifndef HEAT_BLOCK_X
#define HEAT_BLOCK_X 32
#endif
#ifndef HEAT_BLOCK_Y
#define HEAT_BLOCK_Y 8
#endif
#ifndef HALO_BLOCK
#define HALO_BLOCK 256
#endif
// Threads per SM the adjoint kernels must fit: __launch_bounds__ turns them into a cap of
// 65536 / threads registers, 32 at 2048, which they meet without spills
// (bench/results/kernel_resources.md).
#ifndef HEAT_ADJOINT_THREADS
#define HEAT_ADJOINT_THREADS 2048
#endif
#define HEAT_ADJOINT_MIN_BLOCKS                                                                 \
    (HEAT_ADJOINT_THREADS > HEAT_BLOCK_X * HEAT_BLOCK_Y                                         \
         ? HEAT_ADJOINT_THREADS / (HEAT_BLOCK_X * HEAT_BLOCK_Y)                                 \
         : 1)

typedef long long gpumpiad_idx;

// ---------------------------------------------------------------------------
// Per-cell functions (shared by GPU kernels and host loops)
// ---------------------------------------------------------------------------

// 5-point Laplacian numerator at flat offset c; s is the row stride (ny+2).
// Summation order is fixed and mirrored by gpumpiad/heat/stencil.py.
template <typename T>
__device__ __forceinline__ T heat_lap(const T* __restrict__ a, gpumpiad_idx c, gpumpiad_idx s)
{
    return a[c + s] + a[c - s] + a[c + 1] + a[c - 1] - (T)4 * a[c];
}

template <typename T>
__device__ __forceinline__ void heat_step_cell(
    const T* __restrict__ u, const T* __restrict__ kappa, const T* __restrict__ f,
    T* __restrict__ u_new, gpumpiad_idx c, gpumpiad_idx s, T r, T dt)
{
    u_new[c] = u[c] + r * kappa[c] * heat_lap(u, c, s) + dt * f[c];
}

// w = kappa * lam_next, computed on the fly (ghosts included).
template <typename T>
__device__ __forceinline__ T heat_w(const T* __restrict__ lam_next, const T* __restrict__ kappa,
                                    gpumpiad_idx c)
{
    return kappa[c] * lam_next[c];
}

// Which cotangents the adjoint accumulates besides lam (the kernels' `grads` bit mask). A
// gradient with respect to kappa alone skips f_bar's read and write, one with respect to f or
// u0 alone also skips reading u: 64 -> 48, or 40 bytes per cell and fewer.
#define HEAT_KAPPA_BAR 1
#define HEAT_F_BAR 2

template <typename T, bool KB, bool FB>
__device__ __forceinline__ void heat_adjoint_cell(
    const T* __restrict__ lam_next, const T* __restrict__ kappa, const T* __restrict__ u,
    T* __restrict__ lam, T* __restrict__ kappa_bar, T* __restrict__ f_bar,
    gpumpiad_idx c, gpumpiad_idx s, T r, T dt)
{
    const T ln = lam_next[c];
    const T lapw = heat_w(lam_next, kappa, c + s) + heat_w(lam_next, kappa, c - s)
                 + heat_w(lam_next, kappa, c + 1) + heat_w(lam_next, kappa, c - 1)
                 - (T)4 * heat_w(lam_next, kappa, c);
    lam[c] = ln + r * lapw;
    if (KB) kappa_bar[c] += r * ln * heat_lap(u, c, s);
    if (FB) f_bar[c] += dt * ln;
}

// Flat offset of the k-th cell of a halo row/column.
// side 0 = north (row 1 / ghost row 0), 1 = south (row nx / ghost row nx+1),
// 2 = west (col 1 / ghost col 0), 3 = east (col ny / ghost col ny+1).
__device__ __forceinline__ gpumpiad_idx halo_offset(int nx, int ny, int side, int ghost,
                                                     gpumpiad_idx k)
{
    const gpumpiad_idx s = (gpumpiad_idx)ny + 2;
    switch (side) {
    case 0: return (gpumpiad_idx)(ghost ? 0 : 1) * s + 1 + k;
    case 1: return (gpumpiad_idx)(ghost ? nx + 1 : nx) * s + 1 + k;
    case 2: return (1 + k) * s + (ghost ? 0 : 1);
    default: return (1 + k) * s + (ghost ? ny + 1 : ny);
    }
}

__device__ __forceinline__ gpumpiad_idx halo_length(int nx, int ny, int side)
{
    return side < 2 ? (gpumpiad_idx)ny : (gpumpiad_idx)nx;
}

// Ghost cells a patch that is its own neighbour fills without MPI (a periodic axis of one
// patch): with wrap_i the 2 ny cells of ghost rows 0 and nx+1, then with wrap_j the 2 nx cells
// of ghost columns 0 and ny+1, interior extent (no corner), each from the opposite side's
// boundary cell: what an exchange with itself would write.
__device__ __forceinline__ gpumpiad_idx halo_wrap_length(int nx, int ny, int wrap_i,
                                                         int wrap_j)
{
    return (wrap_i ? 2 * (gpumpiad_idx)ny : 0) + (wrap_j ? 2 * (gpumpiad_idx)nx : 0);
}

template <typename T>
__device__ __forceinline__ void halo_wrap_cell(T* u, int nx, int ny, int wrap_i, gpumpiad_idx k)
{
    const gpumpiad_idx rows = wrap_i ? 2 * (gpumpiad_idx)ny : 0;
    int side;
    if (k < rows) {
        side = k < ny ? 0 : 1;
        k -= side ? ny : 0;
    } else {
        k -= rows;
        side = k < nx ? 2 : 3;
        k -= side == 3 ? nx : 0;
    }
    u[halo_offset(nx, ny, side, 1, k)] = u[halo_offset(nx, ny, side ^ 1, 0, k)];
}

template <typename T>
__device__ __forceinline__ void halo_pack_cell(const T* __restrict__ u, T* __restrict__ buf,
                                               int nx, int ny, int side, int ghost, gpumpiad_idx k)
{
    buf[k] = u[halo_offset(nx, ny, side, ghost, k)];
}

template <typename T>
__device__ __forceinline__ void halo_unpack_cell(T* __restrict__ u, const T* __restrict__ buf,
                                                 int nx, int ny, int side, int ghost, int add,
                                                 gpumpiad_idx k)
{
    const gpumpiad_idx o = halo_offset(nx, ny, side, ghost, k);
    if (add) u[o] += buf[k];
    else u[o] = buf[k];
}

// 3 reads + 1 write reference used to measure attainable bandwidth.
template <typename T>
__device__ __forceinline__ void copy4_cell(const T* __restrict__ a, const T* __restrict__ b,
                                           const T* __restrict__ c, T* __restrict__ d,
                                           gpumpiad_idx k)
{
    d[k] = a[k] + b[k] + c[k];
}

// ---------------------------------------------------------------------------
// Kernel bodies: 2-D grid-stride loops over the sub-rectangle (x -> j, y -> i)
// for the stencils, 1-D grid-stride loops for the rest.
// ---------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void heat_step_body(
    const T* __restrict__ u, const T* __restrict__ kappa, const T* __restrict__ f,
    T* __restrict__ u_new, int nx, int ny, T r, T dt, int i0, int i1, int j0, int j1)
{
    (void)nx;
    const gpumpiad_idx s = (gpumpiad_idx)ny + 2;
    for (int i = i0 + (int)(blockIdx.y * blockDim.y + threadIdx.y); i < i1;
         i += (int)(blockDim.y * gridDim.y))
        for (int j = j0 + (int)(blockIdx.x * blockDim.x + threadIdx.x); j < j1;
             j += (int)(blockDim.x * gridDim.x))
            heat_step_cell(u, kappa, f, u_new, (gpumpiad_idx)i * s + j, s, r, dt);
}

template <typename T, bool KB, bool FB>
__device__ __forceinline__ void heat_adjoint_body(
    const T* __restrict__ lam_next, const T* __restrict__ kappa, const T* __restrict__ u,
    T* __restrict__ lam, T* __restrict__ kappa_bar, T* __restrict__ f_bar,
    int nx, int ny, T r, T dt, int i0, int i1, int j0, int j1)
{
    (void)nx;
    const gpumpiad_idx s = (gpumpiad_idx)ny + 2;
    // One loop, its (i, j) stepped by hand: under nested loops the compiler hoisted a pointer
    // per array and row out of the inner one (54-59 registers in float64, half occupancy), for
    // nothing, since the launch grid covers the rectangle and a thread rarely loops at all.
    const int j_first = j0 + (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (j_first >= j1) return;
    const int di = (int)(blockDim.y * gridDim.y), dj = (int)(blockDim.x * gridDim.x);
    int i = i0 + (int)(blockIdx.y * blockDim.y + threadIdx.y), j = j_first;
#pragma unroll 1
    while (i < i1) {
        heat_adjoint_cell<T, KB, FB>(lam_next, kappa, u, lam, kappa_bar, f_bar,
                                     (gpumpiad_idx)i * s + j, s, r, dt);
        j += dj;
        if (j >= j1) {
            j = j_first;
            i += di;
        }
    }
}

// The adjoint variant `grads` selects: one branch per launch, outside the loops, so that each
// variant runs its own specialised loop.
template <typename T>
__device__ __forceinline__ void heat_adjoint_grads(
    const T* __restrict__ lam_next, const T* __restrict__ kappa, const T* __restrict__ u,
    T* __restrict__ lam, T* __restrict__ kappa_bar, T* __restrict__ f_bar,
    int nx, int ny, T r, T dt, int i0, int i1, int j0, int j1, int grads)
{
    switch (grads & (HEAT_KAPPA_BAR | HEAT_F_BAR)) {
    case HEAT_KAPPA_BAR | HEAT_F_BAR:
        heat_adjoint_body<T, true, true>(lam_next, kappa, u, lam, kappa_bar, f_bar, nx, ny, r,
                                         dt, i0, i1, j0, j1);
        break;
    case HEAT_KAPPA_BAR:
        heat_adjoint_body<T, true, false>(lam_next, kappa, u, lam, kappa_bar, f_bar, nx, ny, r,
                                          dt, i0, i1, j0, j1);
        break;
    case HEAT_F_BAR:
        heat_adjoint_body<T, false, true>(lam_next, kappa, u, lam, kappa_bar, f_bar, nx, ny, r,
                                          dt, i0, i1, j0, j1);
        break;
    default:
        heat_adjoint_body<T, false, false>(lam_next, kappa, u, lam, kappa_bar, f_bar, nx, ny, r,
                                           dt, i0, i1, j0, j1);
    }
}

template <typename T>
__device__ __forceinline__ void halo_pack_body(const T* __restrict__ u, T* __restrict__ buf,
                                               int nx, int ny, int side, int ghost)
{
    const gpumpiad_idx n = halo_length(nx, ny, side);
    for (gpumpiad_idx k = (gpumpiad_idx)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (gpumpiad_idx)blockDim.x * gridDim.x)
        halo_pack_cell(u, buf, nx, ny, side, ghost, k);
}

template <typename T>
__device__ __forceinline__ void halo_unpack_body(T* __restrict__ u, const T* __restrict__ buf,
                                                 int nx, int ny, int side, int ghost, int add)
{
    const gpumpiad_idx n = halo_length(nx, ny, side);
    for (gpumpiad_idx k = (gpumpiad_idx)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (gpumpiad_idx)blockDim.x * gridDim.x)
        halo_unpack_cell(u, buf, nx, ny, side, ghost, add, k);
}

template <typename T>
__device__ __forceinline__ void halo_wrap_body(T* u, int nx, int ny, int wrap_i, int wrap_j)
{
    const gpumpiad_idx n = halo_wrap_length(nx, ny, wrap_i, wrap_j);
    for (gpumpiad_idx k = (gpumpiad_idx)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (gpumpiad_idx)blockDim.x * gridDim.x)
        halo_wrap_cell(u, nx, ny, wrap_i, k);
}

template <typename T>
__device__ __forceinline__ void copy4_body(const T* __restrict__ a, const T* __restrict__ b,
                                           const T* __restrict__ c, T* __restrict__ d,
                                           gpumpiad_idx n)
{
    for (gpumpiad_idx k = (gpumpiad_idx)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (gpumpiad_idx)blockDim.x * gridDim.x)
        copy4_cell(a, b, c, d, k);
}

// ---------------------------------------------------------------------------
// extern "C" kernels, one per op and dtype
// ---------------------------------------------------------------------------

#define GPUMPIAD_HEAT_KERNELS(T, SUF)                                                          \
    extern "C" __global__ void __launch_bounds__(HEAT_BLOCK_X * HEAT_BLOCK_Y) heat_step_##SUF( \
        const T* __restrict__ u, const T* __restrict__ kappa, const T* __restrict__ f,         \
        T* __restrict__ u_new, int nx, int ny, T r, T dt, int i0, int i1, int j0, int j1)      \
    {                                                                                          \
        heat_step_body<T>(u, kappa, f, u_new, nx, ny, r, dt, i0, i1, j0, j1);                  \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(HEAT_BLOCK_X * HEAT_BLOCK_Y,                  \
                                                 HEAT_ADJOINT_MIN_BLOCKS)                      \
        heat_adjoint_##SUF(const T* __restrict__ lam_next, const T* __restrict__ kappa,        \
                           const T* __restrict__ u, T* __restrict__ lam,                       \
                           T* __restrict__ kappa_bar, T* __restrict__ f_bar, int nx, int ny,   \
                           T r, T dt, int i0, int i1, int j0, int j1, int grads)               \
    {                                                                                          \
        heat_adjoint_grads<T>(lam_next, kappa, u, lam, kappa_bar, f_bar, nx, ny, r, dt, i0, i1, \
                              j0, j1, grads);                                                  \
    }                                                                                          \
    extern "C" __global__ void halo_pack_##SUF(const T* __restrict__ u, T* __restrict__ buf,   \
                                               int nx, int ny, int side, int ghost)            \
    {                                                                                          \
        halo_pack_body<T>(u, buf, nx, ny, side, ghost);                                        \
    }                                                                                          \
    extern "C" __global__ void halo_unpack_##SUF(T* __restrict__ u, const T* __restrict__ buf, \
                                                 int nx, int ny, int side, int ghost, int add) \
    {                                                                                          \
        halo_unpack_body<T>(u, buf, nx, ny, side, ghost, add);                                 \
    }                                                                                          \
    extern "C" __global__ void halo_wrap_##SUF(T* u, int nx, int ny, int wrap_i, int wrap_j)  \
    {                                                                                          \
        halo_wrap_body<T>(u, nx, ny, wrap_i, wrap_j);                                          \
    }                                                                                          \
    extern "C" __global__ void copy4_##SUF(const T* __restrict__ a, const T* __restrict__ b,   \
                                           const T* __restrict__ c, T* __restrict__ d,         \
                                           long long n)                                        \
    {                                                                                          \
        copy4_body<T>(a, b, c, d, n);                                                          \
    }

GPUMPIAD_HEAT_KERNELS(float, float32)
GPUMPIAD_HEAT_KERNELS(double, float64)

// ---------------------------------------------------------------------------
// Host entry points (g++ -DGPUMPIAD_HOST): the per-cell functions above in
// plain loops, j innermost so the compiler can vectorise along rows.
// ---------------------------------------------------------------------------
#ifdef GPUMPIAD_HOST

// Cell j of a forward step's row from the rows above, at and below it of the state before it:
// heat_step_cell's sum in the same order, so the same bits.
template <typename T>
static inline T host_step_value(const T* __restrict__ up, const T* __restrict__ mid,
                                const T* __restrict__ down, const T* __restrict__ kappa,
                                const T* __restrict__ f, T r, T dt, int j)
{
    return mid[j] + r * kappa[j] * (down[j] + up[j] + mid[j + 1] + mid[j - 1] - (T)4 * mid[j]) +
           dt * f[j];
}

#ifdef __AVX512F__
// host_step_row's cells j0 .. up to j1 - 16 in float64 vectors of 8, returning the first cell
// left: mid's -1 and +1 neighbours along j from the vectors before and after it (valignq), as
// in host_adjoint_row_avx512, 5 loads per 8 cells instead of 7, and the stores aligned to 64
// bytes (the cells before the first aligned one one by one). The same operations in the same
// order as the loop, so the same bits; 18-28 % less time per step from 128² to 512²
// (bench/results/heat_kernels_cpu.md). Rows of fewer than 16 cells are left to the loop.
static inline int host_step_row_avx512(const double* __restrict__ up,
                                       const double* __restrict__ mid,
                                       const double* __restrict__ down,
                                       const double* __restrict__ kappa,
                                       const double* __restrict__ f, double* __restrict__ out,
                                       double r, double dt, int j0, int j1)
{
    int j = j0;
    for (; j < j1 && (reinterpret_cast<std::uintptr_t>(out + j) & 63); ++j)
        out[j] = host_step_value(up, mid, down, kappa, f, r, dt, j);
    if (j1 - j < 16) return j;
    const __m512d vr = _mm512_set1_pd(r), vdt = _mm512_set1_pd(dt), four = _mm512_set1_pd(4.0);
    // mid at j - 8 .. j - 1 (only its last lane read), j .. j + 7.
    __m512d before = _mm512_maskz_loadu_pd((__mmask8)0x80, mid + j - 8);
    __m512d here = _mm512_loadu_pd(mid + j);
    for (; j + 16 <= j1; j += 8) {
        const __m512d after = _mm512_loadu_pd(mid + j + 8);
        const __m512d right = _mm512_castsi512_pd(_mm512_alignr_epi64(
            _mm512_castpd_si512(after), _mm512_castpd_si512(here), 1));
        const __m512d left = _mm512_castsi512_pd(_mm512_alignr_epi64(
            _mm512_castpd_si512(here), _mm512_castpd_si512(before), 7));
        __m512d lap = _mm512_add_pd(_mm512_loadu_pd(down + j), _mm512_loadu_pd(up + j));
        lap = _mm512_add_pd(_mm512_add_pd(lap, right), left);
        lap = _mm512_sub_pd(lap, _mm512_mul_pd(four, here));
        const __m512d flux = _mm512_mul_pd(_mm512_mul_pd(vr, _mm512_loadu_pd(kappa + j)), lap);
        _mm512_store_pd(out + j, _mm512_add_pd(_mm512_add_pd(here, flux),
                                                _mm512_mul_pd(vdt, _mm512_loadu_pd(f + j))));
        before = here;
        here = after;
    }
    return j;
}
#endif

// One row of a forward step, cells j0 .. j1-1, from the rows above, at and below it of the state
// before it (every pointer at column 0 of its row): heat_step_cell's sum in the same order, so
// the same bits.
template <typename T>
static inline void host_step_row(const T* __restrict__ up, const T* __restrict__ mid,
                                 const T* __restrict__ down, const T* __restrict__ kappa,
                                 const T* __restrict__ f, T* __restrict__ out, T r, T dt, int j0,
                                 int j1)
{
    int first = j0;
#ifdef __AVX512F__
    if constexpr (std::is_same<T, double>::value)
        first = host_step_row_avx512(up, mid, down, kappa, f, out, r, dt, j0, j1);
#endif
    for (int j = first; j < j1; ++j) out[j] = host_step_value(up, mid, down, kappa, f, r, dt, j);
}

template <typename T>
static void host_heat_step(const T* __restrict__ u, const T* __restrict__ kappa,
                           const T* __restrict__ f, T* __restrict__ u_new, int nx, int ny,
                           T r, T dt, int i0, int i1, int j0, int j1)
{
    (void)nx;
    const gpumpiad_idx s = (gpumpiad_idx)ny + 2;
    for (int i = i0; i < i1; ++i) {
        const gpumpiad_idx row = (gpumpiad_idx)i * s;
        host_step_row(u + row - s, u + row, u + row + s, kappa + row, f + row, u_new + row, r, dt,
                      j0, j1);
    }
}

#ifdef __AVX512F__
// host_adjoint_row's cells j0 .. up to j1 - 16 in float64 vectors of 8, returning the first
// cell left: the -1 and +1 neighbours along j of w's middle row and of u's row come from the
// vectors before and after (valignq), one load per row instead of three. The same operations
// in the same order as the loop below, so the same bits; 6-13 % less time per adjoint step
// from 128² to 512² (bench/results/heat_kernels_cpu.md). Rows of fewer than 16 cells are left
// to the loop: the first vectors would reach past their ends.
template <bool KB, bool FB>
static inline int host_adjoint_row_avx512(const double* __restrict__ ln,
                                          const double* __restrict__ wu,
                                          const double* __restrict__ wm,
                                          const double* __restrict__ wd,
                                          const double* __restrict__ u, double* __restrict__ out,
                                          double* __restrict__ kb, double* __restrict__ fb,
                                          gpumpiad_idx s, double r, double dt, int j0, int j1)
{
    if (j1 - j0 < 16) return j0;
    const __m512d vr = _mm512_set1_pd(r), vdt = _mm512_set1_pd(dt), four = _mm512_set1_pd(4.0);
    // w at k - 8 .. k - 1 (only its last lane read), k .. k + 7; u likewise at j.
    __m512d w_before = _mm512_maskz_loadu_pd((__mmask8)0x80, wm - 7);
    __m512d w_here = _mm512_loadu_pd(wm + 1);
    __m512d u_before = KB ? _mm512_maskz_loadu_pd((__mmask8)0x80, u + j0 - 8) : _mm512_setzero_pd();
    __m512d u_here = KB ? _mm512_loadu_pd(u + j0) : _mm512_setzero_pd();
    int j = j0;
    for (gpumpiad_idx k = 1; j + 16 <= j1; j += 8, k += 8) {
        const __m512d w_after = _mm512_loadu_pd(wm + k + 8);
        const __m512d w_right = _mm512_castsi512_pd(_mm512_alignr_epi64(
            _mm512_castpd_si512(w_after), _mm512_castpd_si512(w_here), 1));
        const __m512d w_left = _mm512_castsi512_pd(_mm512_alignr_epi64(
            _mm512_castpd_si512(w_here), _mm512_castpd_si512(w_before), 7));
        const __m512d l = _mm512_loadu_pd(ln + j);
        __m512d lapw = _mm512_add_pd(_mm512_loadu_pd(wd + k), _mm512_loadu_pd(wu + k));
        lapw = _mm512_add_pd(_mm512_add_pd(lapw, w_right), w_left);
        lapw = _mm512_sub_pd(lapw, _mm512_mul_pd(four, w_here));
        _mm512_storeu_pd(out + j, _mm512_add_pd(l, _mm512_mul_pd(vr, lapw)));
        if (KB) {
            const __m512d u_after = _mm512_loadu_pd(u + j + 8);
            const __m512d u_right = _mm512_castsi512_pd(_mm512_alignr_epi64(
                _mm512_castpd_si512(u_after), _mm512_castpd_si512(u_here), 1));
            const __m512d u_left = _mm512_castsi512_pd(_mm512_alignr_epi64(
                _mm512_castpd_si512(u_here), _mm512_castpd_si512(u_before), 7));
            __m512d lapu = _mm512_add_pd(_mm512_loadu_pd(u + j + s), _mm512_loadu_pd(u + j - s));
            lapu = _mm512_add_pd(_mm512_add_pd(lapu, u_right), u_left);
            lapu = _mm512_sub_pd(lapu, _mm512_mul_pd(four, u_here));
            _mm512_storeu_pd(kb + j, _mm512_add_pd(_mm512_loadu_pd(kb + j),
                                                   _mm512_mul_pd(_mm512_mul_pd(vr, l), lapu)));
            u_before = u_here;
            u_here = u_after;
        }
        if (FB)
            _mm512_storeu_pd(fb + j,
                             _mm512_add_pd(_mm512_loadu_pd(fb + j), _mm512_mul_pd(vdt, l)));
        w_before = w_here;
        w_here = w_after;
    }
    return j;
}
#endif

// One row of the adjoint, cells j0 .. j1-1: heat_adjoint_cell's arithmetic with w = kappa *
// lam_next read from three row buffers (rows i-1, i, i+1, indexed from column j0-1). ln, out,
// kb and fb point at column 0 of row i of lam_next, lam, kappa_bar and f_bar, u at u's.
template <typename T, bool KB, bool FB>
static inline void host_adjoint_row(const T* __restrict__ ln, const T* __restrict__ wu,
                                    const T* __restrict__ wm, const T* __restrict__ wd,
                                    const T* __restrict__ u, T* __restrict__ out,
                                    T* __restrict__ kb, T* __restrict__ fb, gpumpiad_idx s, T r,
                                    T dt, int j0, int j1)
{
    int first = j0;
#ifdef __AVX512F__
    if constexpr (std::is_same<T, double>::value)
        first = host_adjoint_row_avx512<KB, FB>(ln, wu, wm, wd, u, out, kb, fb, s, r, dt, j0, j1);
#endif
    for (int j = first; j < j1; ++j) {
        const gpumpiad_idx k = (gpumpiad_idx)(j - j0) + 1;
        const T l = ln[j];
        const T lapw = wd[k] + wu[k] + wm[k + 1] + wm[k - 1] - (T)4 * wm[k];
        out[j] = l + r * lapw;
        if (KB) kb[j] += r * l * heat_lap(u, (gpumpiad_idx)j, s);
        if (FB) fb[j] += dt * l;
    }
}

// w = kappa * lam over `width` cells from flat offset `first`; lam_row is lam at that offset.
template <typename T>
static inline void host_w_row(T* __restrict__ w, const T* __restrict__ lam_row,
                              const T* __restrict__ kappa, gpumpiad_idx first, gpumpiad_idx width)
{
    for (gpumpiad_idx k = 0; k < width; ++k) w[k] = kappa[first + k] * lam_row[k];
}

template <typename T, bool KB, bool FB>
static void host_heat_adjoint(const T* __restrict__ lam_next, const T* __restrict__ kappa,
                              const T* __restrict__ u, T* __restrict__ lam,
                              T* __restrict__ kappa_bar, T* __restrict__ f_bar, int nx, int ny,
                              T r, T dt, int i0, int i1, int j0, int j1)
{
    (void)nx;
    const gpumpiad_idx s = (gpumpiad_idx)ny + 2;
    if (i0 >= i1 || j0 >= j1) return;
    // w = kappa * lam_next formed once per cell into three row buffers (rows i-1, i, i+1;
    // columns j0-1 .. j1) instead of five times: a quarter less time on one core, and
    // bit-identical results.
    const gpumpiad_idx width = (gpumpiad_idx)(j1 - j0) + 2;
    std::vector<T> rows(3 * width);
    auto fill = [&](T* w, int i) {
        const gpumpiad_idx first = (gpumpiad_idx)i * s + j0 - 1;
        host_w_row(w, lam_next + first, kappa, first, width);
    };
    T* up = rows.data();
    T* mid = up + width;
    T* down = mid + width;
    fill(up, i0 - 1);
    fill(mid, i0);
    for (int i = i0; i < i1; ++i) {
        fill(down, i + 1);
        const gpumpiad_idx row = (gpumpiad_idx)i * s;
        host_adjoint_row<T, KB, FB>(lam_next + row, up, mid, down, KB ? u + row : nullptr,
                                    lam + row, KB ? kappa_bar + row : nullptr,
                                    FB ? f_bar + row : nullptr, s, r, dt, j0, j1);
        T* t = up; up = mid; mid = down; down = t;
    }
}

template <typename T>
static void host_heat_adjoint_grads(const T* lam_next, const T* kappa, const T* u, T* lam,
                                    T* kappa_bar, T* f_bar, int nx, int ny, T r, T dt, int i0,
                                    int i1, int j0, int j1, int grads)
{
    switch (grads & (HEAT_KAPPA_BAR | HEAT_F_BAR)) {
    case HEAT_KAPPA_BAR | HEAT_F_BAR:
        host_heat_adjoint<T, true, true>(lam_next, kappa, u, lam, kappa_bar, f_bar, nx, ny, r,
                                         dt, i0, i1, j0, j1);
        break;
    case HEAT_KAPPA_BAR:
        host_heat_adjoint<T, true, false>(lam_next, kappa, u, lam, kappa_bar, f_bar, nx, ny, r,
                                          dt, i0, i1, j0, j1);
        break;
    case HEAT_F_BAR:
        host_heat_adjoint<T, false, true>(lam_next, kappa, u, lam, kappa_bar, f_bar, nx, ny, r,
                                          dt, i0, i1, j0, j1);
        break;
    default:
        host_heat_adjoint<T, false, false>(lam_next, kappa, u, lam, kappa_bar, f_bar, nx, ny, r,
                                           dt, i0, i1, j0, j1);
    }
}

// Ghosts of a patch that is its own neighbour along a periodic axis (one patch along it):
// what the halo exchange with itself would write, without MPI (halo_wrap_cell).
template <typename T>
static void host_wrap(T* u, int nx, int ny, int wrap_i, int wrap_j)
{
    const gpumpiad_idx n = halo_wrap_length(nx, ny, wrap_i, wrap_j);
    for (gpumpiad_idx k = 0; k < n; ++k) halo_wrap_cell(u, nx, ny, wrap_i, k);
}

// Two forward steps in one sweep over the rows: row i of the middle state, then row i - 1 of
// `out` from rows i - 2 .. i of the middle state while they are still in cache. The middle
// state goes to `mid` (the data a step moves falls from 4 to 2.5 fields) or, given `ring`
// (3 * (ny + 2) values), to a ring of three rows with the ghosts of `mid`, for a middle state
// nobody reads afterwards (2 fields). `out` may be `u` itself: row i - 1 of u is no longer read
// once row i of the middle state is written. Ghosts of `mid` must not depend on its interior
// (no wrap).
template <typename T>
static void host_heat_step_pair(const T* u, const T* __restrict__ kappa,
                                const T* __restrict__ f, T* mid, T* out, T* ring, int nx,
                                int ny, T r, T dt)
{
    const gpumpiad_idx s = (gpumpiad_idx)ny + 2;
    auto row = [&](int i) -> T* {
        return ring && i >= 1 && i <= nx ? ring + (i % 3) * s : mid + i * s;
    };
    for (int i = 1; i <= nx + 1; ++i) {
        if (i <= nx) {
            T* m = row(i);
            if (ring) {
                m[0] = mid[i * s];
                m[ny + 1] = mid[i * s + ny + 1];
            }
            host_step_row(u + (i - 1) * s, u + i * s, u + (i + 1) * s, kappa + i * s,
                          f + i * s, m, r, dt, 1, ny + 1);
        }
        if (i > 1)
            host_step_row(row(i - 2), row(i - 1), row(i), kappa + (i - 1) * s,
                          f + (i - 1) * s, out + (i - 1) * s, r, dt, 1, ny + 1);
    }
}

// K forward steps in one sweep over the rows, states[t] = step(states[t - 1]) for t = 1 .. K:
// level t makes row i - t + 1 while level 1 makes row i, from three rows of the state before it
// that are still in cache, so that u, kappa and f pass through memory once per K steps. A
// buffer may appear at levels t and t + 2 or further apart (its rows are no longer read when
// the later level overwrites them; it ends holding its last state): with two buffers in turn,
// each row of both is written back to memory about once per sweep. Ghosts of states[1 .. K]
// must not depend on their interior (no wrap).
template <typename T>
static void host_heat_steps_deep(T* const* states, const T* __restrict__ kappa,
                                 const T* __restrict__ f, int K, int nx, int ny, T r, T dt)
{
    const gpumpiad_idx s = (gpumpiad_idx)ny + 2;
    for (int i = 1; i <= nx + K - 1; ++i)
        for (int t = 1; t <= K && i - t + 1 >= 1; ++t) {
            const int m = i - t + 1;
            if (m > nx) continue;
            const gpumpiad_idx row = (gpumpiad_idx)m * s;
            const T* u = states[t - 1] + row;
            host_step_row(u - s, u, u + s, kappa + row, f + row, states[t] + row, r, dt, 1,
                          ny + 1);
        }
}

// `steps` forward steps in one call, state n+1 written to states[n+1] (states[0] holds the
// first): a patch whose ghosts come from no other rank needs no Python between steps. Each
// state's wrapped ghosts are filled before it is read, the last one's too, so every buffer
// ends as single steps with their exchanges would leave it. Consecutive states are distinct
// buffers; a buffer may appear again two or more states later, and ends holding its last state.
// Without wrapped ghosts the steps go `depth` per sweep (host_heat_steps_deep), or, for a depth
// of 2, in pairs whose middle state stays in a ring of rows when a later state overwrites it.
template <typename T>
static void host_heat_steps(T* const* states, const T* __restrict__ kappa,
                            const T* __restrict__ f, int nx, int ny, T r, T dt, int steps,
                            int wrap_i, int wrap_j, int depth)
{
    if (!wrap_i && !wrap_j && depth > 2) {
        for (int n = 0; n < steps; n += depth) {
            const int K = steps - n < depth ? steps - n : depth;
            host_heat_steps_deep<T>(states + n, kappa, f, K, nx, ny, r, dt);
        }
        return;
    }
    if (!wrap_i && !wrap_j) {
        int n = 0;
        if (steps % 2) {
            host_heat_step<T>(states[0], kappa, f, states[1], nx, ny, r, dt, 1, nx + 1, 1,
                              ny + 1);
            n = 1;
        }
        std::vector<T> ring(3 * ((size_t)ny + 2));
        for (; n < steps; n += 2) {
            // A middle state whose buffer a later state overwrites is never read.
            const bool unread = n + 3 <= steps && states[n + 3] == states[n + 1];
            host_heat_step_pair<T>(states[n], kappa, f, states[n + 1], states[n + 2],
                                   unread ? ring.data() : nullptr, nx, ny, r, dt);
        }
        return;
    }
    for (int n = 0; n < steps; ++n) {
        host_wrap(states[n], nx, ny, wrap_i, wrap_j);
        host_heat_step<T>(states[n], kappa, f, states[n + 1], nx, ny, r, dt, 1, nx + 1, 1,
                          ny + 1);
    }
    host_wrap(states[steps], nx, ny, wrap_i, wrap_j);
}

// traj's nx x ny cotangent of state n, row i (1 .. nx), added to the interior of row `out`.
template <typename T>
static inline void host_add_traj(T* __restrict__ out, const T* __restrict__ traj, int n, int i,
                                 int nx, int ny)
{
    const T* __restrict__ g = traj + ((gpumpiad_idx)n * nx + (i - 1)) * ny;
    for (int j = 0; j < ny; ++j) out[j + 1] += g[j];
}

// K adjoint steps in one sweep over the rows, lam^(n+K) in x -> lam^n in x (K even: the buffer
// the per-step loop leaves it in), the K - 1 lams between only in rows of a ring. Level t holds
// lam^(n+K-t) and makes row i - t + 1 while level 1 makes row i, from three rows of level t-1's
// w = kappa * lam (and lam's own row): x, kappa, kappa_bar and f_bar pass through memory once per
// K steps. Each level's ghosts are those of the buffer the per-step loop would hold it in (y for
// odd t, x for even t), its ghost columns wrapped instead under wrap_j, and x's ghost columns are
// wrapped as the per-step loop wraps lam^(n+K) and the even levels: the same operations on every
// cell in the same order (each cell's kappa_bar and f_bar sums run from step n+K-1 down to n),
// the same bits. Not for wrap_i.
// ring: 5 * K rows of ny + 2 values.
template <typename T, bool KB, bool FB>
static void host_heat_adjoint_deep(T* __restrict__ x, const T* __restrict__ y,
                                   const T* __restrict__ kappa, const T* const* states,
                                   T* __restrict__ kappa_bar, T* __restrict__ f_bar,
                                   const T* __restrict__ traj, int n, int K, int nx, int ny, T r,
                                   T dt, int wrap_j, T* __restrict__ ring)
{
    const gpumpiad_idx s = (gpumpiad_idx)ny + 2;
    // Level t's w rows at ring rows 5t + row % 3, its lam rows at 5t + 3 + row % 2.
    auto w_of = [&](int t, int row) { return ring + (5 * (gpumpiad_idx)t + row % 3) * s; };
    auto lam_of = [&](int t, int row) {
        return t == 0 ? x + row * s : ring + (5 * (gpumpiad_idx)t + 3 + (row & 1)) * s;
    };
    auto wrap_row = [&](T* a) {
        if (wrap_j) {
            a[0] = a[ny];
            a[ny + 1] = a[1];
        }
    };
    host_w_row(w_of(0, 0), x, kappa, 0, s);
    wrap_row(x + s);
    host_w_row(w_of(0, 1), x + s, kappa, s, s);
    for (int t = 1; t < K; ++t) host_w_row(w_of(t, 0), t & 1 ? y : x, kappa, 0, s);
    for (int i = 1; i <= nx + K - 1; ++i) {
        if (i <= nx) {
            T* next = x + (gpumpiad_idx)(i + 1) * s;
            if (i < nx) wrap_row(next);
            host_w_row(w_of(0, i + 1), next, kappa, (gpumpiad_idx)(i + 1) * s, s);
        }
        for (int t = 1; t <= K && i - t + 1 >= 1; ++t) {
            const int m = i - t + 1;
            const gpumpiad_idx row = (gpumpiad_idx)m * s;
            const T* ghosts = t & 1 ? y : x;
            if (m > nx) {
                if (m == nx + 1 && t < K) host_w_row(w_of(t, m), ghosts + row, kappa, row, s);
                continue;
            }
            T* out = t == K ? x + row : lam_of(t, m);
            if (t < K) {
                out[0] = ghosts[row];
                out[ny + 1] = ghosts[row + ny + 1];
            }
            host_adjoint_row<T, KB, FB>(lam_of(t - 1, m), w_of(t - 1, m - 1), w_of(t - 1, m),
                                        w_of(t - 1, m + 1), KB ? states[n + K - t] + row : nullptr,
                                        out, KB ? kappa_bar + row : nullptr,
                                        FB ? f_bar + row : nullptr, s, r, dt, 1, ny + 1);
            if (traj) host_add_traj(out, traj, n + K - t, m, nx, ny);
            if (t < K) {
                wrap_row(out);
                if (wrap_j && !(t & 1)) {
                    // The per-step loop wraps x's ghost columns from this lam.
                    x[row] = out[0];
                    x[row + ny + 1] = out[ny + 1];
                }
                host_w_row(w_of(t, m), out, kappa, row, s);
            }
        }
    }
}

// `steps` adjoint steps in one call, n = steps-1 ... 0: lam^n from lam^(n+1) (its wrapped ghosts
// filled first), the two buffers lam and spare in turn, starting from lam. states[n] is u^n
// (states NULL: no kappa_bar); traj, when not NULL, holds steps+1 unpadded nx x ny cotangents of
// the states, and traj[n] is added to lam^n's interior after its step. Returns the buffer that
// holds lam^0. The same operations on every cell in the same order as one
// host_heat_adjoint_wrapped call per step: the same bits in lam^0 and the cotangents. Without
// wrap_i the steps go `depth` (even) at a time (host_heat_adjoint_deep; an odd count's first
// step alone, a shorter even group last), the lams between never written to spare: 7 + K instead
// of 8 K fields through memory per K steps.
template <typename T>
static T* host_heat_adjoints(T* lam, T* spare, const T* __restrict__ kappa,
                             const T* const* states, T* kappa_bar, T* f_bar,
                             const T* __restrict__ traj, int nx, int ny, T r, T dt, int steps,
                             int grads, int wrap_i, int wrap_j, int depth)
{
    const gpumpiad_idx s = (gpumpiad_idx)ny + 2;
    const int single = wrap_i ? steps : steps % 2;
    int n = steps - 1;
    for (; n >= steps - single; --n) {
        host_wrap(lam, nx, ny, wrap_i, wrap_j);
        host_heat_adjoint_grads<T>(lam, kappa, states ? states[n] : nullptr, spare, kappa_bar,
                                   f_bar, nx, ny, r, dt, 1, nx + 1, 1, ny + 1, grads);
        if (traj)
            for (int i = 1; i <= nx; ++i) host_add_traj(spare + (gpumpiad_idx)i * s, traj, n, i,
                                                         nx, ny);
        T* t = lam; lam = spare; spare = t;
    }
    if (n < 1) return lam;
    std::vector<T> ring(5 * (gpumpiad_idx)depth * s);
    while (n >= 1) {
        const int K = n + 1 < depth ? n + 1 : depth;  // even
        n -= K;
        switch (grads & (HEAT_KAPPA_BAR | HEAT_F_BAR)) {
        case HEAT_KAPPA_BAR | HEAT_F_BAR:
            host_heat_adjoint_deep<T, true, true>(lam, spare, kappa, states, kappa_bar, f_bar,
                                                  traj, n + 1, K, nx, ny, r, dt, wrap_j,
                                                  ring.data());
            break;
        case HEAT_KAPPA_BAR:
            host_heat_adjoint_deep<T, true, false>(lam, spare, kappa, states, kappa_bar, f_bar,
                                                   traj, n + 1, K, nx, ny, r, dt, wrap_j,
                                                   ring.data());
            break;
        case HEAT_F_BAR:
            host_heat_adjoint_deep<T, false, true>(lam, spare, kappa, states, kappa_bar, f_bar,
                                                   traj, n + 1, K, nx, ny, r, dt, wrap_j,
                                                   ring.data());
            break;
        default:
            host_heat_adjoint_deep<T, false, false>(lam, spare, kappa, states, kappa_bar, f_bar,
                                                    traj, n + 1, K, nx, ny, r, dt, wrap_j,
                                                    ring.data());
        }
    }
    return lam;
}

// Row `in` (n values) copied to `out`; its min, max and count of NaN and Inf. In registers of
// 32 bytes where the compiler has vector extensions: a min/max reduction of floats does not
// vectorise without fast-math. Min and max are meaningless when the count is not 0.
template <typename T>
static inline long long host_pad_row(const T* __restrict__ in, T* __restrict__ out, int n, T& lo,
                                     T& hi)
{
    lo = hi = in[0];
    long long bad = 0;
    int j = 0;
#if defined(__GNUC__)
    constexpr int W = 32 / sizeof(T);
    typedef T V __attribute__((vector_size(32)));
    typedef decltype(V{} < V{}) M;
    if (n >= W) {
        V vlo, vhi, v;
        M vbad = {};
        std::memcpy(&vlo, in, sizeof(V));
        vhi = vlo;
        for (; j + W <= n; j += W) {
            std::memcpy(&v, in + j, sizeof(V));
            std::memcpy(out + j, &v, sizeof(V));
            vlo = v < vlo ? v : vlo;
            vhi = v > vhi ? v : vhi;
            vbad += (v - v) != V{};  // -1 per NaN or Inf
        }
        for (int k = 0; k < W; ++k) {
            lo = vlo[k] < lo ? vlo[k] : lo;
            hi = vhi[k] > hi ? vhi[k] : hi;
            bad -= vbad[k];
        }
    }
#endif
    for (; j < n; ++j) {
        const T v = in[j];
        out[j] = v;
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
        bad += !(v - v == (T)0);
    }
    return bad;
}

// Interior of a planes x nx x ny C-contiguous field copied into planes consecutive padded
// (nx + 2) x (ny + 2) planes from dst on (a 2-D field: one plane; a 3-D one: the planes of its
// padded array after the first); stats = {min, max, non-finite count} of the values (min and
// max over the finite ones): the solver's argument check and its padded copy in one pass.
template <typename T>
static void host_pad(const T* __restrict__ src, T* __restrict__ dst, int planes, int nx, int ny,
                     double* stats)
{
    const gpumpiad_idx s = (gpumpiad_idx)ny + 2;
    const gpumpiad_idx plane = ((gpumpiad_idx)nx + 2) * s;
    T lo = (T)0, hi = (T)0;
    long long bad = 0;
    bool any = false;
    for (gpumpiad_idx row = 0; row < (gpumpiad_idx)planes * nx; ++row) {
        const gpumpiad_idx i = row % nx;
        const T* __restrict__ in = src + row * ny;
        T* __restrict__ out = dst + (row / nx) * plane + (i + 1) * s + 1;
        T rlo, rhi;
        const long long rbad = host_pad_row(in, out, ny, rlo, rhi);
        if (rbad) {
            // min/max over the finite values only; a rare, slower row.
            for (int j = 0; j < ny; ++j) {
                const T v = in[j];
                if (!(v - v == (T)0)) continue;
                if (!any) { lo = hi = v; any = true; }
                lo = v < lo ? v : lo;
                hi = v > hi ? v : hi;
            }
            bad += rbad;
            continue;
        }
        if (!any) { lo = rlo; hi = rhi; any = true; }
        lo = rlo < lo ? rlo : lo;
        hi = rhi > hi ? rhi : hi;
    }
    stats[0] = (double)lo;
    stats[1] = (double)hi;
    stats[2] = (double)bad;
}

template <typename T>
static void host_halo_pack(const T* __restrict__ u, T* __restrict__ buf, int nx, int ny,
                           int side, int ghost)
{
    const gpumpiad_idx n = halo_length(nx, ny, side);
    for (gpumpiad_idx k = 0; k < n; ++k) halo_pack_cell(u, buf, nx, ny, side, ghost, k);
}

template <typename T>
static void host_halo_unpack(T* __restrict__ u, const T* __restrict__ buf, int nx, int ny,
                             int side, int ghost, int add)
{
    const gpumpiad_idx n = halo_length(nx, ny, side);
    for (gpumpiad_idx k = 0; k < n; ++k) halo_unpack_cell(u, buf, nx, ny, side, ghost, add, k);
}

template <typename T>
static void host_copy4(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ c,
                       T* __restrict__ d, long long n)
{
    for (gpumpiad_idx k = 0; k < n; ++k) copy4_cell(a, b, c, d, k);
}

#define GPUMPIAD_HEAT_HOST(T, SUF)                                                              \
    extern "C" GPUMPIAD_EXPORT void host_heat_step_##SUF(                                       \
        const T* u, const T* kappa, const T* f, T* u_new, int nx, int ny, T r, T dt, int i0,    \
        int i1, int j0, int j1)                                                                 \
    {                                                                                           \
        host_heat_step<T>(u, kappa, f, u_new, nx, ny, r, dt, i0, i1, j0, j1);                   \
    }                                                                                           \
    extern "C" GPUMPIAD_EXPORT void host_heat_adjoint_##SUF(                                    \
        const T* lam_next, const T* kappa, const T* u, T* lam, T* kappa_bar, T* f_bar, int nx,  \
        int ny, T r, T dt, int i0, int i1, int j0, int j1, int grads)                           \
    {                                                                                           \
        host_heat_adjoint_grads<T>(lam_next, kappa, u, lam, kappa_bar, f_bar, nx, ny, r, dt, i0, \
                                   i1, j0, j1, grads);                                          \
    }                                                                                           \
    extern "C" GPUMPIAD_EXPORT void host_heat_steps_##SUF(                                      \
        T* const* states, const T* kappa, const T* f, int nx, int ny, T r, T dt, int steps,     \
        int wrap_i, int wrap_j, int depth)                                                      \
    {                                                                                           \
        host_heat_steps<T>(states, kappa, f, nx, ny, r, dt, steps, wrap_i, wrap_j, depth);      \
    }                                                                                           \
    extern "C" GPUMPIAD_EXPORT void host_heat_adjoint_wrapped_##SUF(                            \
        T* lam_next, const T* kappa, const T* u, T* lam, T* kappa_bar, T* f_bar, int nx,        \
        int ny, T r, T dt, int grads, int wrap_i, int wrap_j)                                   \
    {                                                                                           \
        host_wrap(lam_next, nx, ny, wrap_i, wrap_j);                                            \
        host_heat_adjoint_grads<T>(lam_next, kappa, u, lam, kappa_bar, f_bar, nx, ny, r, dt, 1,  \
                                   nx + 1, 1, ny + 1, grads);                                   \
    }                                                                                           \
    extern "C" GPUMPIAD_EXPORT T* host_heat_adjoints_##SUF(                                     \
        T* lam, T* spare, const T* kappa, const T* const* states, T* kappa_bar, T* f_bar,       \
        const T* traj, int nx, int ny, T r, T dt, int steps, int grads, int wrap_i, int wrap_j, \
        int depth)                                                                              \
    {                                                                                           \
        return host_heat_adjoints<T>(lam, spare, kappa, states, kappa_bar, f_bar, traj, nx, ny, \
                                     r, dt, steps, grads, wrap_i, wrap_j, depth);               \
    }                                                                                           \
    extern "C" GPUMPIAD_EXPORT void host_wrap_##SUF(T* u, int nx, int ny, int wrap_i,           \
                                                    int wrap_j)                                 \
    {                                                                                           \
        host_wrap<T>(u, nx, ny, wrap_i, wrap_j);                                                \
    }                                                                                           \
    extern "C" GPUMPIAD_EXPORT void host_pad_##SUF(const T* src, T* dst, int planes, int nx,    \
                                                   int ny, double* stats)                       \
    {                                                                                           \
        host_pad<T>(src, dst, planes, nx, ny, stats);                                           \
    }                                                                                           \
    extern "C" GPUMPIAD_EXPORT void host_halo_pack_##SUF(const T* u, T* buf, int nx, int ny,    \
                                                         int side, int ghost)                   \
    {                                                                                           \
        host_halo_pack<T>(u, buf, nx, ny, side, ghost);                                         \
    }                                                                                           \
    extern "C" GPUMPIAD_EXPORT void host_halo_unpack_##SUF(T* u, const T* buf, int nx, int ny,  \
                                                           int side, int ghost, int add)        \
    {                                                                                           \
        host_halo_unpack<T>(u, buf, nx, ny, side, ghost, add);                                  \
    }                                                                                           \
    extern "C" GPUMPIAD_EXPORT void host_copy4_##SUF(const T* a, const T* b, const T* c, T* d,  \
                                                     long long n)                               \
    {                                                                                           \
        host_copy4<T>(a, b, c, d, n);                                                           \
    }

GPUMPIAD_HEAT_HOST(float, float32)
GPUMPIAD_HEAT_HOST(double, float64)

#endif  // GPUMPIAD_HOST
