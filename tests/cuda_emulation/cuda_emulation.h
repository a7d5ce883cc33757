// Runs CUDA kernels on the CPU, so that the tests check their indexing and synchronization where
// there is no GPU. Each block's threads are std::threads that meet at __syncthreads; blocks run one
// after the other, so a kernel's __shared__ variables become static ones, which the threads of the
// running block share. Enough for kernels that use thread and block indices, shared memory and
// __syncthreads only: no warp shuffles, atomics or device intrinsics. Include after the C++ library
// headers and before the kernel headers.
#pragma once

#include <barrier>
#include <cstdint>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace cuda_emulation {
inline thread_local std::barrier<>* block_barrier = nullptr;

// kernel<<<grid, block>>>(args...): the blocks in order, x fastest, each with its threads at once.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, Kernel kernel, Args... args) {
  gridDim = grid;
  blockDim = block;
  const unsigned threads = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> barrier(threads);
        std::vector<std::thread> workers;
        workers.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
          workers.emplace_back([&, t] {
            threadIdx = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
            blockIdx = dim3(bx, by, bz);
            block_barrier = &barrier;
            kernel(args...);
          });
        }
        for (std::thread& worker : workers) worker.join();
      }
    }
  }
}
}  // namespace cuda_emulation

inline void __syncthreads() { cuda_emulation::block_barrier->arrive_and_wait(); }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
