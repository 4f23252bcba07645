// Explicit 3-D heat equation (7-point stencil): forward step and fused adjoint.
//
// Layout contract: every field is a C-contiguous (nx+2) x (ny+2) x (nz+2) array; cell
// (i, j, k) lives at (i*(ny+2) + j)*(nz+2) + k, interior cells are i in 1..nx, j in 1..ny,
// k in 1..nz and the outer layer holds ghost cells.  Kernels only write the interior sub-box
// [i0, i1) x [j0, j1) x [k0, k1) of their outputs.  Outputs must not alias inputs.
//
// The Laplacian numerator sums the neighbours in the order +i, -i, +j, -j, +k, -k and then
// subtracts 6u, as gpumpiad/heat/stencil3d.py does.
//
// The same file compiles three ways, as kernels/heat.cu does:
//   * NVRTC / CuPy RawModule (no includes, CUDA built-ins only),
//   * nvcc,
//   * g++ as C++ with -DGPUMPIAD_HOST, which pulls in host_cuda.h and the host_* entry points
//     at the bottom that run the per-cell functions below in loops over the box.

#ifdef GPUMPIAD_HOST
#include "host_cuda.h"
#include <vector>
#endif

// A block is a tile of HEAT3D_BLOCK_X threads along k (the contiguous axis, for coalescing)
// by HEAT3D_BLOCK_Y along j; each thread marches along i through HEAT3D_MARCH cells, keeping
// the i-1, i and i+1 values of its column in registers, so each plane is loaded from memory
// once per march rather than three times.
#ifndef HEAT3D_BLOCK_X
#define HEAT3D_BLOCK_X 32
#endif
#ifndef HEAT3D_BLOCK_Y
#define HEAT3D_BLOCK_Y 8
#endif
#ifndef HEAT3D_MARCH
#define HEAT3D_MARCH 16
#endif
// Threads per SM the adjoint kernels must fit: __launch_bounds__ turns them into a cap of
// 65536 / threads registers per thread, met without spills
// (bench/results/kernel_resources.md).
#ifndef HEAT3D_ADJOINT_THREADS
#define HEAT3D_ADJOINT_THREADS 1024
#endif
#define HEAT3D_THREADS (HEAT3D_BLOCK_X * HEAT3D_BLOCK_Y)
#define HEAT3D_ADJOINT_MIN_BLOCKS                                                               \
    (HEAT3D_ADJOINT_THREADS > HEAT3D_THREADS ? HEAT3D_ADJOINT_THREADS / HEAT3D_THREADS : 1)

// Which cotangents the adjoint accumulates besides lam (the kernels' `grads` bit mask), as in
// heat.cu: without kappa_bar, u is not read; without f_bar, f_bar is neither read nor written.
#define HEAT3D_KAPPA_BAR 1
#define HEAT3D_F_BAR 2

typedef long long gpumpiad_idx;

// ---------------------------------------------------------------------------
// Per-cell functions (shared by GPU kernels and host loops). The +i and -i neighbours and the
// centre are passed as values: the GPU kernels carry them along the march, the host loops load
// them.
// ---------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T heat3d_lap(T ip, T im, T jp, T jm, T kp, T km, T c)
{
    return ip + im + jp + jm + kp + km - (T)6 * c;
}

template <typename T>
__device__ __forceinline__ void heat3d_step_cell(
    const T* __restrict__ u, const T* __restrict__ kappa, const T* __restrict__ f,
    T* __restrict__ u_new, gpumpiad_idx c, gpumpiad_idx sj, T up, T um, T uc, T r, T dt)
{
    u_new[c] = uc + r * kappa[c] * heat3d_lap(up, um, u[c + sj], u[c - sj], u[c + 1], u[c - 1], uc)
             + dt * f[c];
}

// w = kappa * lam_next, computed on the fly (ghosts included).
template <typename T>
__device__ __forceinline__ T heat3d_w(const T* __restrict__ lam_next,
                                      const T* __restrict__ kappa, gpumpiad_idx c)
{
    return kappa[c] * lam_next[c];
}

// ln = lam_next[c]; wp, wm, wc = w at i+1, i-1 and the cell; up, um, uc likewise of u (read
// only with KB).
template <typename T, bool KB, bool FB>
__device__ __forceinline__ void heat3d_adjoint_cell(
    const T* __restrict__ lam_next, const T* __restrict__ kappa, const T* __restrict__ u,
    T* __restrict__ lam, T* __restrict__ kappa_bar, T* __restrict__ f_bar, gpumpiad_idx c,
    gpumpiad_idx sj, T ln, T wp, T wm, T wc, T up, T um, T uc, T r, T dt)
{
    const T lapw = heat3d_lap(wp, wm, heat3d_w(lam_next, kappa, c + sj),
                              heat3d_w(lam_next, kappa, c - sj), heat3d_w(lam_next, kappa, c + 1),
                              heat3d_w(lam_next, kappa, c - 1), wc);
    lam[c] = ln + r * lapw;
    if (KB)
        kappa_bar[c] += r * ln * heat3d_lap(up, um, u[c + sj], u[c - sj], u[c + 1], u[c - 1], uc);
    if (FB) f_bar[c] += dt * ln;
}

// ---------------------------------------------------------------------------
// Kernel bodies: x -> k, y -> j, z -> chunks of HEAT3D_MARCH cells along i, each a grid-stride
// loop (the launch grid covers the box unless it exceeds the grid's limits).
// ---------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void heat3d_step_march(
    const T* __restrict__ u, const T* __restrict__ kappa, const T* __restrict__ f,
    T* __restrict__ u_new, gpumpiad_idx c, gpumpiad_idx si, gpumpiad_idx sj, int n, T r, T dt)
{
    T um = u[c - si], uc = u[c];
#pragma unroll 1
    for (; n > 0; --n, c += si) {
        const T up = u[c + si];
        heat3d_step_cell(u, kappa, f, u_new, c, sj, up, um, uc, r, dt);
        um = uc;
        uc = up;
    }
}

template <typename T, bool KB, bool FB>
__device__ __forceinline__ void heat3d_adjoint_march(
    const T* __restrict__ lam_next, const T* __restrict__ kappa, const T* __restrict__ u,
    T* __restrict__ lam, T* __restrict__ kappa_bar, T* __restrict__ f_bar, gpumpiad_idx c,
    gpumpiad_idx si, gpumpiad_idx sj, int n, T r, T dt)
{
    // Only w travels along the march: u's and lam_next's i-1 and centre values are reloaded
    // (cache hits), which keeps the float64 variants within 64 registers without spills.
    T wm = heat3d_w(lam_next, kappa, c - si), wc = heat3d_w(lam_next, kappa, c);
#pragma unroll 1
    for (; n > 0; --n, c += si) {
        const T wp = heat3d_w(lam_next, kappa, c + si);
        heat3d_adjoint_cell<T, KB, FB>(lam_next, kappa, u, lam, kappa_bar, f_bar, c, sj,
                                       lam_next[c], wp, wm, wc, KB ? u[c + si] : (T)0,
                                       KB ? u[c - si] : (T)0, KB ? u[c] : (T)0, r, dt);
        wm = wc;
        wc = wp;
    }
}

// The thread's column k and its first row j and march start i come from its index; further
// rows (y) and marches (z) follow by grid stride when the launch grid is capped. One loop over
// (row, march), stepped by hand, as in heat.cu's adjoint: nested loops let the compiler hoist
// per-row pointers it then keeps in registers for nothing.
#define HEAT3D_COLUMNS(MARCH_CALL)                                                              \
    const gpumpiad_idx sj = (gpumpiad_idx)nz + 2, si = ((gpumpiad_idx)ny + 2) * sj;             \
    const int k = k0 + (int)(blockIdx.x * blockDim.x + threadIdx.x);                            \
    const int j_first = j0 + (int)(blockIdx.y * blockDim.y + threadIdx.y);                      \
    const int i_first = i0 + (int)blockIdx.z * HEAT3D_MARCH;                                    \
    if (k >= k1 || j_first >= j1 || i_first >= i1) return;                                      \
    const int dj = (int)(blockDim.y * gridDim.y), di = (int)gridDim.z * HEAT3D_MARCH;           \
    int j = j_first, i = i_first;                                                               \
    _Pragma("unroll 1") while (j < j1)                                                          \
    {                                                                                           \
        const gpumpiad_idx c = (gpumpiad_idx)i * si + (gpumpiad_idx)j * sj + k;                 \
        const int n = i1 - i < HEAT3D_MARCH ? i1 - i : HEAT3D_MARCH;                            \
        MARCH_CALL;                                                                             \
        i += di;                                                                                \
        if (i >= i1) {                                                                          \
            i = i_first;                                                                        \
            j += dj;                                                                            \
        }                                                                                       \
    }

template <typename T>
__device__ __forceinline__ void heat3d_step_body(
    const T* __restrict__ u, const T* __restrict__ kappa, const T* __restrict__ f,
    T* __restrict__ u_new, int ny, int nz, T r, T dt, int i0, int i1, int j0, int j1, int k0,
    int k1)
{
    HEAT3D_COLUMNS(heat3d_step_march(u, kappa, f, u_new, c, si, sj, n, r, dt))
}

template <typename T, bool KB, bool FB>
__device__ __forceinline__ void heat3d_adjoint_body(
    const T* __restrict__ lam_next, const T* __restrict__ kappa, const T* __restrict__ u,
    T* __restrict__ lam, T* __restrict__ kappa_bar, T* __restrict__ f_bar, int ny, int nz, T r,
    T dt, int i0, int i1, int j0, int j1, int k0, int k1)
{
    HEAT3D_COLUMNS((heat3d_adjoint_march<T, KB, FB>(lam_next, kappa, u, lam, kappa_bar, f_bar,
                                                    c, si, sj, n, r, dt)))
}

// The adjoint variant `grads` selects: one branch per launch, outside the loops, so that each
// variant runs its own specialised loop.
template <typename T>
__device__ __forceinline__ void heat3d_adjoint_grads(
    const T* __restrict__ lam_next, const T* __restrict__ kappa, const T* __restrict__ u,
    T* __restrict__ lam, T* __restrict__ kappa_bar, T* __restrict__ f_bar, int ny, int nz, T r,
    T dt, int i0, int i1, int j0, int j1, int k0, int k1, int grads)
{
    switch (grads & (HEAT3D_KAPPA_BAR | HEAT3D_F_BAR)) {
    case HEAT3D_KAPPA_BAR | HEAT3D_F_BAR:
        heat3d_adjoint_body<T, true, true>(lam_next, kappa, u, lam, kappa_bar, f_bar, ny, nz, r,
                                           dt, i0, i1, j0, j1, k0, k1);
        break;
    case HEAT3D_KAPPA_BAR:
        heat3d_adjoint_body<T, true, false>(lam_next, kappa, u, lam, kappa_bar, f_bar, ny, nz, r,
                                            dt, i0, i1, j0, j1, k0, k1);
        break;
    case HEAT3D_F_BAR:
        heat3d_adjoint_body<T, false, true>(lam_next, kappa, u, lam, kappa_bar, f_bar, ny, nz, r,
                                            dt, i0, i1, j0, j1, k0, k1);
        break;
    default:
        heat3d_adjoint_body<T, false, false>(lam_next, kappa, u, lam, kappa_bar, f_bar, ny, nz,
                                             r, dt, i0, i1, j0, j1, k0, k1);
    }
}

// Ghost cells a patch that is its own neighbour fills without MPI (a periodic axis of one
// patch): with wrap_i the 2 ny nz cells of the faces i = 0 and nx + 1, then with wrap_j the
// 2 nx nz cells of j = 0 and ny + 1, then with wrap_k the 2 nx ny cells of k = 0 and nz + 1,
// interior extent (no edge or corner), each from the opposite face's boundary cell: what an
// exchange with itself would write.
__device__ __forceinline__ gpumpiad_idx heat3d_wrap_length(int nx, int ny, int nz, int wrap_i,
                                                           int wrap_j, int wrap_k)
{
    return 2 * ((wrap_i ? (gpumpiad_idx)ny * nz : 0) + (wrap_j ? (gpumpiad_idx)nx * nz : 0) +
                (wrap_k ? (gpumpiad_idx)nx * ny : 0));
}

template <typename T>
__device__ __forceinline__ void heat3d_wrap_cell(T* u, int nx, int ny, int nz, int wrap_i,
                                                 int wrap_j, gpumpiad_idx k)
{
    const gpumpiad_idx sj = (gpumpiad_idx)nz + 2, si = ((gpumpiad_idx)ny + 2) * sj;
    const gpumpiad_idx fi = wrap_i ? (gpumpiad_idx)ny * nz : 0;
    const gpumpiad_idx fj = wrap_j ? (gpumpiad_idx)nx * nz : 0;
    const gpumpiad_idx fk = (gpumpiad_idx)nx * ny;
    gpumpiad_idx ghost, from;
    if (k < 2 * fi) {
        const bool far = k >= fi;
        const gpumpiad_idx m = far ? k - fi : k;
        const gpumpiad_idx c = (1 + m / nz) * sj + 1 + m % nz;  // on the face i = 0
        ghost = c + (far ? (gpumpiad_idx)(nx + 1) * si : 0);
        from = c + (far ? si : (gpumpiad_idx)nx * si);
    } else if (k - 2 * fi < 2 * fj) {
        k -= 2 * fi;
        const bool far = k >= fj;
        const gpumpiad_idx m = far ? k - fj : k;
        const gpumpiad_idx c = (1 + m / nz) * si + 1 + m % nz;  // on the face j = 0
        ghost = c + (far ? (gpumpiad_idx)(ny + 1) * sj : 0);
        from = c + (far ? sj : (gpumpiad_idx)ny * sj);
    } else {
        k -= 2 * (fi + fj);
        const bool far = k >= fk;
        const gpumpiad_idx m = far ? k - fk : k;
        const gpumpiad_idx c = (1 + m / ny) * si + (1 + m % ny) * sj;  // on the face k = 0
        ghost = c + (far ? nz + 1 : 0);
        from = c + (far ? 1 : nz);
    }
    u[ghost] = u[from];
}

template <typename T>
__device__ __forceinline__ void heat3d_wrap_body(T* u, int nx, int ny, int nz, int wrap_i,
                                                 int wrap_j, int wrap_k)
{
    const gpumpiad_idx n = heat3d_wrap_length(nx, ny, nz, wrap_i, wrap_j, wrap_k);
    for (gpumpiad_idx k = (gpumpiad_idx)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (gpumpiad_idx)blockDim.x * gridDim.x)
        heat3d_wrap_cell(u, nx, ny, nz, wrap_i, wrap_j, k);
}

// ---------------------------------------------------------------------------
// extern "C" kernels, one per op and dtype
// ---------------------------------------------------------------------------

#define GPUMPIAD_HEAT3D_KERNELS(T, SUF)                                                         \
    extern "C" __global__ void __launch_bounds__(HEAT3D_THREADS) heat3d_step_##SUF(             \
        const T* __restrict__ u, const T* __restrict__ kappa, const T* __restrict__ f,          \
        T* __restrict__ u_new, int nx, int ny, int nz, T r, T dt, int i0, int i1, int j0,       \
        int j1, int k0, int k1)                                                                 \
    {                                                                                           \
        (void)nx;                                                                               \
        heat3d_step_body<T>(u, kappa, f, u_new, ny, nz, r, dt, i0, i1, j0, j1, k0, k1);         \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(HEAT3D_THREADS, HEAT3D_ADJOINT_MIN_BLOCKS)     \
        heat3d_adjoint_##SUF(const T* __restrict__ lam_next, const T* __restrict__ kappa,       \
                             const T* __restrict__ u, T* __restrict__ lam,                      \
                             T* __restrict__ kappa_bar, T* __restrict__ f_bar, int nx, int ny,  \
                             int nz, T r, T dt, int i0, int i1, int j0, int j1, int k0, int k1, \
                             int grads)                                                         \
    {                                                                                           \
        (void)nx;                                                                               \
        heat3d_adjoint_grads<T>(lam_next, kappa, u, lam, kappa_bar, f_bar, ny, nz, r, dt, i0,   \
                                i1, j0, j1, k0, k1, grads);                                     \
    }                                                                                           \
    extern "C" __global__ void heat3d_wrap_##SUF(T* u, int nx, int ny, int nz, int wrap_i,      \
                                                 int wrap_j, int wrap_k)                        \
    {                                                                                           \
        heat3d_wrap_body<T>(u, nx, ny, nz, wrap_i, wrap_j, wrap_k);                             \
    }

GPUMPIAD_HEAT3D_KERNELS(float, float32)
GPUMPIAD_HEAT3D_KERNELS(double, float64)

// ---------------------------------------------------------------------------
// Host entry points (g++ -DGPUMPIAD_HOST): the per-cell functions above in plain loops, k
// innermost so the compiler can vectorise along it.
// ---------------------------------------------------------------------------
#ifdef GPUMPIAD_HOST

template <typename T>
static void host_heat3d_step(const T* __restrict__ u, const T* __restrict__ kappa,
                             const T* __restrict__ f, T* __restrict__ u_new, int ny, int nz,
                             T r, T dt, int i0, int i1, int j0, int j1, int k0, int k1)
{
    const gpumpiad_idx sj = (gpumpiad_idx)nz + 2, si = ((gpumpiad_idx)ny + 2) * sj;
    for (int i = i0; i < i1; ++i)
        for (int j = j0; j < j1; ++j) {
            const gpumpiad_idx row = (gpumpiad_idx)i * si + (gpumpiad_idx)j * sj;
            for (int k = k0; k < k1; ++k) {
                const gpumpiad_idx c = row + k;
                heat3d_step_cell(u, kappa, f, u_new, c, sj, u[c + si], u[c - si], u[c], r, dt);
            }
        }
}

template <typename T, bool KB, bool FB>
static void host_heat3d_adjoint(const T* __restrict__ lam_next, const T* __restrict__ kappa,
                                const T* __restrict__ u, T* __restrict__ lam,
                                T* __restrict__ kappa_bar, T* __restrict__ f_bar, int ny, int nz,
                                T r, T dt, int i0, int i1, int j0, int j1, int k0, int k1)
{
    if (i0 >= i1 || j0 >= j1 || k0 >= k1) return;
    const gpumpiad_idx sj = (gpumpiad_idx)nz + 2, si = ((gpumpiad_idx)ny + 2) * sj;
    // heat3d_adjoint_cell's arithmetic, with w = kappa * lam_next formed once per cell into
    // three plane buffers (planes i-1, i, i+1 over rows j0-1 .. j1 and columns k0-1 .. k1)
    // instead of seven times: the same products, so the same bits.
    const gpumpiad_idx pj = (gpumpiad_idx)(k1 - k0) + 2;
    const gpumpiad_idx plane = ((gpumpiad_idx)(j1 - j0) + 2) * pj;
    std::vector<T> planes(3 * plane);
    auto fill = [&](T* w, int i) {
        for (int j = j0 - 1; j <= j1; ++j) {
            const gpumpiad_idx row = (gpumpiad_idx)i * si + (gpumpiad_idx)j * sj + k0 - 1;
            T* __restrict__ out = w + (gpumpiad_idx)(j - j0 + 1) * pj;
            for (gpumpiad_idx k = 0; k < pj; ++k) out[k] = heat3d_w(lam_next, kappa, row + k);
        }
    };
    T* below = planes.data();
    T* mid = below + plane;
    T* above = mid + plane;
    fill(below, i0 - 1);
    fill(mid, i0);
    for (int i = i0; i < i1; ++i) {
        fill(above, i + 1);
        for (int j = j0; j < j1; ++j) {
            const gpumpiad_idx row = (gpumpiad_idx)i * si + (gpumpiad_idx)j * sj;
            const gpumpiad_idx b = (gpumpiad_idx)(j - j0 + 1) * pj + 1 - k0;
            const T* __restrict__ wa = above + b;
            const T* __restrict__ wb = below + b;
            const T* __restrict__ wm = mid + b;
            for (int k = k0; k < k1; ++k) {
                const gpumpiad_idx c = row + k;
                const T ln = lam_next[c];
                const T lapw = heat3d_lap(wa[k], wb[k], wm[k + pj], wm[k - pj], wm[k + 1],
                                          wm[k - 1], wm[k]);
                lam[c] = ln + r * lapw;
                if (KB)
                    kappa_bar[c] += r * ln * heat3d_lap(u[c + si], u[c - si], u[c + sj],
                                                        u[c - sj], u[c + 1], u[c - 1], u[c]);
                if (FB) f_bar[c] += dt * ln;
            }
        }
        T* t = below;
        below = mid;
        mid = above;
        above = t;
    }
}

template <typename T>
static void host_heat3d_adjoint_grads(const T* lam_next, const T* kappa, const T* u, T* lam,
                                      T* kappa_bar, T* f_bar, int ny, int nz, T r, T dt, int i0,
                                      int i1, int j0, int j1, int k0, int k1, int grads)
{
    switch (grads & (HEAT3D_KAPPA_BAR | HEAT3D_F_BAR)) {
    case HEAT3D_KAPPA_BAR | HEAT3D_F_BAR:
        host_heat3d_adjoint<T, true, true>(lam_next, kappa, u, lam, kappa_bar, f_bar, ny, nz, r,
                                           dt, i0, i1, j0, j1, k0, k1);
        break;
    case HEAT3D_KAPPA_BAR:
        host_heat3d_adjoint<T, true, false>(lam_next, kappa, u, lam, kappa_bar, f_bar, ny, nz, r,
                                            dt, i0, i1, j0, j1, k0, k1);
        break;
    case HEAT3D_F_BAR:
        host_heat3d_adjoint<T, false, true>(lam_next, kappa, u, lam, kappa_bar, f_bar, ny, nz, r,
                                            dt, i0, i1, j0, j1, k0, k1);
        break;
    default:
        host_heat3d_adjoint<T, false, false>(lam_next, kappa, u, lam, kappa_bar, f_bar, ny, nz,
                                             r, dt, i0, i1, j0, j1, k0, k1);
    }
}

// The wrapped ghosts along j and k of plane p (interior extent), from the plane's own cells.
template <typename T>
static inline void host_heat3d_wrap_plane(T* __restrict__ p, int ny, int nz, int wrap_j,
                                          int wrap_k)
{
    const gpumpiad_idx sj = (gpumpiad_idx)nz + 2;
    if (wrap_j)
        for (int k = 1; k <= nz; ++k) {
            p[k] = p[ny * sj + k];
            p[(ny + 1) * sj + k] = p[sj + k];
        }
    if (wrap_k)
        for (int j = 1; j <= ny; ++j) {
            p[j * sj] = p[j * sj + nz];
            p[j * sj + nz + 1] = p[j * sj + 1];
        }
}

// Ghosts of a patch that is its own neighbour (heat3d_wrap_cell's cells and values), by faces:
// the host has no threads to spread the cells over, and plain loops need no division per cell.
template <typename T>
static void host_heat3d_wrap(T* u, int nx, int ny, int nz, int wrap_i, int wrap_j, int wrap_k)
{
    const gpumpiad_idx sj = (gpumpiad_idx)nz + 2, si = ((gpumpiad_idx)ny + 2) * sj;
    if (wrap_i)
        for (int j = 1; j <= ny; ++j)
            for (int k = 1; k <= nz; ++k) {
                const gpumpiad_idx c = j * sj + k;
                u[c] = u[c + nx * si];
                u[c + (nx + 1) * si] = u[c + si];
            }
    if (wrap_j || wrap_k)
        for (int i = 1; i <= nx; ++i) host_heat3d_wrap_plane(u + i * si, ny, nz, wrap_j, wrap_k);
}

// K forward steps in one sweep over the planes, states[t] = step(states[t - 1]) for t = 1 .. K:
// level t makes plane i - t + 1 while level 1 makes plane i, from three planes of the state
// before it that are still in cache, so that u, kappa and f pass through memory once per K
// steps. As heat.cu's host_heat_steps_deep along rows: a buffer may appear at levels t and
// t + 2 or further apart. The ghosts along i of states[1 .. K] must not depend on their
// interior (no wrap along i); those wrapped along j and k are filled plane by plane as the
// planes are made (states[0]'s must be filled).
template <typename T>
static void host_heat3d_steps_deep(T* const* states, const T* kappa, const T* f, int K, int nx,
                                   int ny, int nz, T r, T dt, int wrap_j, int wrap_k)
{
    for (int i = 1; i <= nx + K - 1; ++i)
        for (int t = 1; t <= K && i - t + 1 >= 1; ++t) {
            const int m = i - t + 1;
            if (m > nx) continue;
            host_heat3d_step<T>(states[t - 1], kappa, f, states[t], ny, nz, r, dt, m, m + 1, 1,
                                ny + 1, 1, nz + 1);
            host_heat3d_wrap_plane(states[t] + m * (((gpumpiad_idx)ny + 2) * (nz + 2)), ny, nz,
                                   wrap_j, wrap_k);
        }
}

// `steps` forward steps in one call, state n+1 written to states[n+1] (states[0] holds the
// first), for a patch whose ghosts come from no other rank: each state's wrapped ghosts filled
// before it is read, the last one's too. Consecutive states are distinct buffers; a buffer may
// appear again two or more states later and ends holding its last state. Without ghosts
// wrapped along i the steps go `depth` per sweep (host_heat3d_steps_deep): the bits of single
// steps.
template <typename T>
static void host_heat3d_steps(T* const* states, const T* kappa, const T* f, int nx, int ny,
                              int nz, T r, T dt, int steps, int wrap_i, int wrap_j, int wrap_k,
                              int depth)
{
    if (!wrap_i && depth > 1) {
        host_heat3d_wrap(states[0], nx, ny, nz, 0, wrap_j, wrap_k);
        for (int n = 0; n < steps; n += depth)
            host_heat3d_steps_deep<T>(states + n, kappa, f, steps - n < depth ? steps - n : depth,
                                      nx, ny, nz, r, dt, wrap_j, wrap_k);
        return;
    }
    for (int n = 0; n < steps; ++n) {
        host_heat3d_wrap(states[n], nx, ny, nz, wrap_i, wrap_j, wrap_k);
        host_heat3d_step<T>(states[n], kappa, f, states[n + 1], ny, nz, r, dt, 1, nx + 1, 1,
                            ny + 1, 1, nz + 1);
    }
    host_heat3d_wrap(states[steps], nx, ny, nz, wrap_i, wrap_j, wrap_k);
}

// w = kappa * lam over the n values of a plane (ghost ring included), as heat3d_w forms it.
template <typename T>
static inline void host_heat3d_w_plane(T* __restrict__ w, const T* __restrict__ lam,
                                       const T* __restrict__ kappa, gpumpiad_idx n)
{
    for (gpumpiad_idx c = 0; c < n; ++c) w[c] = kappa[c] * lam[c];
}

// The ghost ring of plane `from` (rows j = 0 and ny + 1, columns k = 0 and nz + 1) into `out`.
template <typename T>
static inline void host_heat3d_plane_ghosts(T* __restrict__ out, const T* __restrict__ from,
                                            int ny, int nz)
{
    const gpumpiad_idx sj = (gpumpiad_idx)nz + 2, last = (ny + 1) * sj;
    for (gpumpiad_idx k = 0; k < sj; ++k) {
        out[k] = from[k];
        out[last + k] = from[last + k];
    }
    for (int j = 1; j <= ny; ++j) {
        out[j * sj] = from[j * sj];
        out[j * sj + nz + 1] = from[j * sj + nz + 1];
    }
}

// One interior plane of host_heat3d_adjoint from the planes wb, wm, wa of w = kappa * lam_next
// below, at and above it (whole planes in the fields' layout): the same operations per cell.
// ln, u, out, kb, fb point at the plane (u's neighbours si away).
template <typename T, bool KB, bool FB>
static inline void host_heat3d_adjoint_plane(const T* __restrict__ ln, const T* __restrict__ wb,
                                             const T* __restrict__ wm, const T* __restrict__ wa,
                                             const T* __restrict__ u, T* __restrict__ out,
                                             T* __restrict__ kb, T* __restrict__ fb,
                                             gpumpiad_idx si, int ny, int nz, T r, T dt)
{
    const gpumpiad_idx sj = (gpumpiad_idx)nz + 2;
    for (int j = 1; j <= ny; ++j)
        for (gpumpiad_idx c = j * sj + 1; c <= j * sj + nz; ++c) {
            const T l = ln[c];
            const T lapw =
                heat3d_lap(wa[c], wb[c], wm[c + sj], wm[c - sj], wm[c + 1], wm[c - 1], wm[c]);
            out[c] = l + r * lapw;
            if (KB)
                kb[c] += r * l * heat3d_lap(u[c + si], u[c - si], u[c + sj], u[c - sj], u[c + 1],
                                            u[c - 1], u[c]);
            if (FB) fb[c] += dt * l;
        }
}

// K adjoint steps in one sweep over the planes, lam^(n+K) in x -> lam^n in x (K even: the buffer
// the per-step loop leaves it in), the K - 1 lams between only in planes of a ring: heat.cu's
// host_heat_adjoint_deep with planes for rows. Level t holds lam^(n+K-t) and makes plane
// i - t + 1 while level 1 makes plane i, from three planes of level t-1's w = kappa * lam:
// x, kappa, kappa_bar and f_bar pass through memory once per K steps. Each level's ghost ring
// is that of the buffer the per-step loop would hold it in (y for odd t, x for even t), its
// ghosts along j and k wrapped instead where flagged, and x's are wrapped as the per-step loop
// wraps lam^(n+K) and the even levels: the same operations on every cell in the same order,
// the same bits in x and the cotangents (y is not written). Not for ghosts wrapped along i.
// ring: 5 * K planes of (ny + 2) * (nz + 2) values.
template <typename T, bool KB, bool FB>
static void host_heat3d_adjoint_deep(T* __restrict__ x, const T* __restrict__ y,
                                     const T* __restrict__ kappa, const T* const* states,
                                     T* __restrict__ kb, T* __restrict__ fb,
                                     const T* __restrict__ traj, int n, int K, int nx, int ny,
                                     int nz, T r, T dt, int wrap_j, int wrap_k,
                                     T* __restrict__ ring)
{
    const gpumpiad_idx sj = (gpumpiad_idx)nz + 2, si = ((gpumpiad_idx)ny + 2) * sj;
    const gpumpiad_idx cells = (gpumpiad_idx)nx * ny * nz;
    // Level t's w planes at ring planes 5t + plane % 3, its lam planes at 5t + 3 + plane % 2.
    auto w_of = [&](int t, int p) { return ring + (5 * (gpumpiad_idx)t + p % 3) * si; };
    auto lam_of = [&](int t, int p) {
        return t == 0 ? x + p * si : ring + (5 * (gpumpiad_idx)t + 3 + (p & 1)) * si;
    };
    auto w_plane = [&](T* w, const T* lam, int p) {
        host_heat3d_w_plane(w, lam, kappa + p * si, si);
    };
    auto wrap = [&](T* p) { host_heat3d_wrap_plane(p, ny, nz, wrap_j, wrap_k); };
    w_plane(w_of(0, 0), x, 0);
    wrap(x + si);
    w_plane(w_of(0, 1), x + si, 1);
    for (int t = 1; t < K; ++t) w_plane(w_of(t, 0), t & 1 ? y : x, 0);
    for (int i = 1; i <= nx + K - 1; ++i) {
        if (i <= nx) {
            T* next = x + (i + 1) * si;
            if (i < nx) wrap(next);
            w_plane(w_of(0, i + 1), next, i + 1);
        }
        for (int t = 1; t <= K && i - t + 1 >= 1; ++t) {
            const int m = i - t + 1;
            const gpumpiad_idx p = m * si;
            const T* ghosts = t & 1 ? y : x;
            if (m > nx) {
                if (m == nx + 1 && t < K) w_plane(w_of(t, m), ghosts + p, m);
                continue;
            }
            T* out = t == K ? x + p : lam_of(t, m);
            if (t < K) host_heat3d_plane_ghosts(out, ghosts + p, ny, nz);
            host_heat3d_adjoint_plane<T, KB, FB>(
                lam_of(t - 1, m), w_of(t - 1, m - 1), w_of(t - 1, m), w_of(t - 1, m + 1),
                KB ? states[n + K - t] + p : nullptr, out, KB ? kb + p : nullptr,
                FB ? fb + p : nullptr, si, ny, nz, r, dt);
            if (traj) {
                const T* g = traj + (gpumpiad_idx)(n + K - t) * cells +
                             (gpumpiad_idx)(m - 1) * ny * nz;
                for (int j = 1; j <= ny; ++j)
                    for (int k = 1; k <= nz; ++k) out[j * sj + k] += g[(j - 1) * nz + k - 1];
            }
            if (t < K) {
                wrap(out);
                // The per-step loop wraps x's ghosts from the even levels.
                if ((wrap_j || wrap_k) && !(t & 1)) host_heat3d_plane_ghosts(x + p, out, ny, nz);
                w_plane(w_of(t, m), out, m);
            }
        }
    }
}

// `steps` adjoint steps in one call, n = steps-1 ... 0: lam^n from lam^(n+1) (its wrapped ghosts
// filled first), the two buffers lam and spare in turn, starting from lam. states[n] is u^n
// (states NULL: no kappa_bar); traj, when not NULL, holds steps+1 unpadded nx x ny x nz
// cotangents of the states, and traj[n] is added to lam^n's interior after its step. Returns
// the buffer that holds lam^0, with the bits of one wrap and host_heat3d_adjoint_grads per step
// in it and the cotangents (the other buffer's are not kept). Without ghosts wrapped along i and
// with a depth of 2 or more (even) the steps go `depth` at a time (host_heat3d_adjoint_deep; an
// odd count's first step alone, a shorter even group last).
template <typename T>
static T* host_heat3d_adjoints(T* lam, T* spare, const T* kappa, const T* const* states,
                               T* kappa_bar, T* f_bar, const T* traj, int nx, int ny, int nz,
                               T r, T dt, int steps, int grads, int wrap_i, int wrap_j,
                               int wrap_k, int depth)
{
    const gpumpiad_idx sj = (gpumpiad_idx)nz + 2, si = ((gpumpiad_idx)ny + 2) * sj;
    const int single = wrap_i || depth < 2 ? steps : steps % 2;
    int n = steps - 1;
    for (; n >= steps - single; --n) {
        host_heat3d_wrap(lam, nx, ny, nz, wrap_i, wrap_j, wrap_k);
        host_heat3d_adjoint_grads<T>(lam, kappa, states ? states[n] : nullptr, spare, kappa_bar,
                                     f_bar, ny, nz, r, dt, 1, nx + 1, 1, ny + 1, 1, nz + 1,
                                     grads);
        if (traj) {
            const T* g = traj + (gpumpiad_idx)n * nx * ny * nz;
            for (int i = 1; i <= nx; ++i)
                for (int j = 1; j <= ny; ++j) {
                    T* __restrict__ out = spare + i * si + j * sj + 1;
                    const T* __restrict__ add = g + ((gpumpiad_idx)(i - 1) * ny + j - 1) * nz;
                    for (int k = 0; k < nz; ++k) out[k] += add[k];
                }
        }
        T* t = lam;
        lam = spare;
        spare = t;
    }
    if (n < 1) return lam;
    std::vector<T> ring(5 * (gpumpiad_idx)depth * si);
    while (n >= 1) {
        const int K = n + 1 < depth ? n + 1 : depth;  // even
        n -= K;
        switch (grads & (HEAT3D_KAPPA_BAR | HEAT3D_F_BAR)) {
        case HEAT3D_KAPPA_BAR | HEAT3D_F_BAR:
            host_heat3d_adjoint_deep<T, true, true>(lam, spare, kappa, states, kappa_bar, f_bar,
                                                    traj, n + 1, K, nx, ny, nz, r, dt, wrap_j,
                                                    wrap_k, ring.data());
            break;
        case HEAT3D_KAPPA_BAR:
            host_heat3d_adjoint_deep<T, true, false>(lam, spare, kappa, states, kappa_bar, f_bar,
                                                     traj, n + 1, K, nx, ny, nz, r, dt, wrap_j,
                                                     wrap_k, ring.data());
            break;
        case HEAT3D_F_BAR:
            host_heat3d_adjoint_deep<T, false, true>(lam, spare, kappa, states, kappa_bar, f_bar,
                                                     traj, n + 1, K, nx, ny, nz, r, dt, wrap_j,
                                                     wrap_k, ring.data());
            break;
        default:
            host_heat3d_adjoint_deep<T, false, false>(lam, spare, kappa, states, kappa_bar,
                                                      f_bar, traj, n + 1, K, nx, ny, nz, r, dt,
                                                      wrap_j, wrap_k, ring.data());
        }
    }
    return lam;
}

// Makes the next kernel calls those of block z-index bz in a launch of gz blocks along z, after
// host_cuda.h's gpumpiad_host_thread (which sets x and y, and z to one block): a test runs a
// whole 3-D launch, thread by thread, to check that the loops cover the box exactly once.
// host_heat3d_block_z(0, 1) restores the one-block launch.
extern "C" GPUMPIAD_EXPORT void host_heat3d_block_z(unsigned int bz, unsigned int gz)
{
    blockIdx.z = bz;
    gridDim.z = gz;
}

#define GPUMPIAD_HEAT3D_HOST(T, SUF)                                                            \
    extern "C" GPUMPIAD_EXPORT void host_heat3d_step_##SUF(                                     \
        const T* u, const T* kappa, const T* f, T* u_new, int nx, int ny, int nz, T r, T dt,    \
        int i0, int i1, int j0, int j1, int k0, int k1)                                         \
    {                                                                                           \
        (void)nx;                                                                               \
        host_heat3d_step<T>(u, kappa, f, u_new, ny, nz, r, dt, i0, i1, j0, j1, k0, k1);         \
    }                                                                                           \
    extern "C" GPUMPIAD_EXPORT void host_heat3d_adjoint_##SUF(                                  \
        const T* lam_next, const T* kappa, const T* u, T* lam, T* kappa_bar, T* f_bar, int nx,  \
        int ny, int nz, T r, T dt, int i0, int i1, int j0, int j1, int k0, int k1, int grads)   \
    {                                                                                           \
        (void)nx;                                                                               \
        host_heat3d_adjoint_grads<T>(lam_next, kappa, u, lam, kappa_bar, f_bar, ny, nz, r, dt,  \
                                     i0, i1, j0, j1, k0, k1, grads);                            \
    }                                                                                           \
    extern "C" GPUMPIAD_EXPORT void host_heat3d_steps_##SUF(                                    \
        T* const* states, const T* kappa, const T* f, int nx, int ny, int nz, T r, T dt,        \
        int steps, int wrap_i, int wrap_j, int wrap_k, int depth)                               \
    {                                                                                           \
        host_heat3d_steps<T>(states, kappa, f, nx, ny, nz, r, dt, steps, wrap_i, wrap_j, wrap_k, \
                             depth);                                                            \
    }                                                                                           \
    extern "C" GPUMPIAD_EXPORT void host_heat3d_adjoint_wrapped_##SUF(                          \
        T* lam_next, const T* kappa, const T* u, T* lam, T* kappa_bar, T* f_bar, int nx,        \
        int ny, int nz, T r, T dt, int grads, int wrap_i, int wrap_j, int wrap_k)               \
    {                                                                                           \
        host_heat3d_wrap(lam_next, nx, ny, nz, wrap_i, wrap_j, wrap_k);                         \
        host_heat3d_adjoint_grads<T>(lam_next, kappa, u, lam, kappa_bar, f_bar, ny, nz, r, dt,  \
                                     1, nx + 1, 1, ny + 1, 1, nz + 1, grads);                   \
    }                                                                                           \
    extern "C" GPUMPIAD_EXPORT T* host_heat3d_adjoints_##SUF(                                   \
        T* lam, T* spare, const T* kappa, const T* const* states, T* kappa_bar, T* f_bar,       \
        const T* traj, int nx, int ny, int nz, T r, T dt, int steps, int grads, int wrap_i,     \
        int wrap_j, int wrap_k, int depth)                                                      \
    {                                                                                           \
        return host_heat3d_adjoints<T>(lam, spare, kappa, states, kappa_bar, f_bar, traj, nx,   \
                                       ny, nz, r, dt, steps, grads, wrap_i, wrap_j, wrap_k,     \
                                       depth);                                                  \
    }                                                                                           \
    extern "C" GPUMPIAD_EXPORT void host_heat3d_wrap_##SUF(T* u, int nx, int ny, int nz,        \
                                                           int wrap_i, int wrap_j, int wrap_k)  \
    {                                                                                           \
        host_heat3d_wrap<T>(u, nx, ny, nz, wrap_i, wrap_j, wrap_k);                             \
    }

GPUMPIAD_HEAT3D_HOST(float, float32)
GPUMPIAD_HEAT3D_HOST(double, float64)

#endif  // GPUMPIAD_HOST
