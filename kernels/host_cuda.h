// Lets kernels/heat.cu compile as plain C++ (g++ -DGPUMPIAD_HOST) for the host.
//
// CUDA qualifiers become ordinary C++ ones and the built-in thread-index
// variables become a single-thread launch (index 0, one block of one thread),
// so the __global__ kernels compile (and even run serially), while the
// host_* entry points in heat.cu drive the per-cell functions from loops.
#ifndef GPUMPIAD_HOST_CUDA_H
#define GPUMPIAD_HOST_CUDA_H

#ifdef __CUDACC__
#error "host_cuda.h is for host (non-CUDA) builds only"
#endif

#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __constant__ static const
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
// g++ already understands __restrict__.

#define GPUMPIAD_EXPORT __attribute__((visibility("default")))

struct gpumpiad_dim3 {
    unsigned int x, y, z;
};

static gpumpiad_dim3 threadIdx = {0u, 0u, 0u};
static gpumpiad_dim3 blockIdx = {0u, 0u, 0u};
static gpumpiad_dim3 blockDim = {1u, 1u, 1u};
static gpumpiad_dim3 gridDim = {1u, 1u, 1u};

// Makes the next kernel calls thread (tx, ty) of block (bx, by) in a launch of gx x gy blocks
// of dx x dy threads: a test runs a whole launch, thread by thread, to check that the grid-stride
// loops cover the rectangle exactly once. gpumpiad_host_thread(0, 0, 0, 0, 1, 1, 1, 1) restores
// the one-thread launch every other caller relies on.
extern "C" GPUMPIAD_EXPORT void gpumpiad_host_thread(unsigned int tx, unsigned int ty,
                                                     unsigned int bx, unsigned int by,
                                                     unsigned int dx, unsigned int dy,
                                                     unsigned int gx, unsigned int gy)
{
    threadIdx = {tx, ty, 0u};
    blockIdx = {bx, by, 0u};
    blockDim = {dx, dy, 1u};
    gridDim = {gx, gy, 1u};
}

static inline void __syncthreads() {}

#endif  // GPUMPIAD_HOST_CUDA_H
