// Runs CUDA kernels on the CPU, so that the tests check their indexing and synchronization where
// there is no GPU. Each block's threads are std::threads that meet at __syncthreads, and each
// warp's (32 consecutive threads) at its warp votes; blocks run one after the other, so a kernel's
// __shared__ variables become static ones, which the threads of the running block share. Enough for
// kernels that use thread and block indices, shared memory, __syncthreads and __any_sync: no
// shuffles, atomics or device intrinsics. Include after the C++ library headers and before the
// kernel headers.
#pragma once

#include <algorithm>
#include <barrier>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace cuda_emulation {

constexpr unsigned kWarpSize = 32;

// The threads of one warp: a barrier for their votes and one slot per lane.
struct Warp {
  explicit Warp(unsigned size) : barrier(size), votes(size) {}
  std::barrier<> barrier;
  std::vector<int> votes;
};

inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local Warp* warp = nullptr;
inline thread_local unsigned lane = 0;

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
        std::vector<std::unique_ptr<Warp>> warps;
        for (unsigned first = 0; first < threads; first += kWarpSize)
          warps.push_back(std::make_unique<Warp>(std::min(kWarpSize, threads - first)));
        std::vector<std::thread> workers;
        workers.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
          workers.emplace_back([&, t] {
            threadIdx = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
            blockIdx = dim3(bx, by, bz);
            block_barrier = &barrier;
            warp = warps[t / kWarpSize].get();
            lane = t % kWarpSize;
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

// Every lane of the warp must call it (the full mask), as on a GPU.
inline int __any_sync(unsigned /*mask*/, int predicate) {
  cuda_emulation::Warp& warp = *cuda_emulation::warp;
  warp.votes[cuda_emulation::lane] = predicate != 0;
  warp.barrier.arrive_and_wait();
  int any = 0;
  for (int vote : warp.votes) any |= vote;
  warp.barrier.arrive_and_wait();  // nobody votes again before every lane has counted
  return any;
}

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
