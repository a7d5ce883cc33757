// Runs CUDA kernels on the CPU, so that the tests check their indexing and synchronization where
// there is no GPU. Each block's threads are std::threads that meet at __syncthreads, and the lanes
// of a warp (32 consecutive threads) at its votes and shuffles; blocks run one after the other, so
// a kernel's __shared__ variables become static ones, which the threads of the running block share.
// Enough for kernels that use thread and block indices, shared memory, __syncthreads, __any_sync,
// __shfl_down_sync, __shfl_xor_sync and scalar atomicAdd: no other device intrinsics. Include after
// the C++ library headers and before the kernel headers.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
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

// The threads of one warp: a barrier for their exchanges and one slot per lane.
struct Warp {
  explicit Warp(unsigned size) : barrier(size), slots(size) {}
  std::barrier<> barrier;
  std::vector<double> slots;  // exact for the int, float and double values exchanged
  std::mutex mutex;
  std::map<unsigned, std::unique_ptr<std::barrier<>>> lane_barriers;

  // Where the lanes of `mask` meet: the warp's barrier when the mask names all its lanes, else one
  // of their own, so that the lane groups of a warp exchange independently, as with the masks of
  // __shfl_*_sync on a GPU. Every lane of the mask takes part in each exchange, and one that
  // returns must not be in a partial mask. A lane outside its own mask (undefined on a GPU) stops
  // the process rather than wait forever.
  std::barrier<>& lanes(unsigned mask, unsigned lane) {
    if ((mask >> lane & 1u) == 0) {
      std::fprintf(stderr, "cuda_emulation: lane %u exchanges with mask %#x\n", lane, mask);
      std::abort();
    }
    const unsigned present = slots.size() == 32 ? ~0u : (1u << slots.size()) - 1;
    mask &= present;
    if (mask == present) return barrier;
    const std::lock_guard<std::mutex> lock(this->mutex);
    std::unique_ptr<std::barrier<>>& group = lane_barriers[mask];
    if (!group) group = std::make_unique<std::barrier<>>(std::popcount(mask));
    return *group;
  }

  // The value of lane `source(lane)` for every lane of `mask` (a lane's own when its source is not
  // a lane of the warp).
  template <typename T, typename Source>
  T exchange(unsigned mask, unsigned lane, T value, Source source) {
    std::barrier<>& meeting = lanes(mask, lane);
    slots[lane] = static_cast<double>(value);
    meeting.arrive_and_wait();
    const unsigned from = source(lane);
    const T result = from < slots.size() ? static_cast<T>(slots[from]) : value;
    meeting.arrive_and_wait();  // nobody writes again before every lane has read
    return result;
  }
};

inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local Warp* warp = nullptr;
inline thread_local unsigned lane = 0;

// kernel<<<grid, block>>>(args...): one CPU thread per thread of a block, which runs the blocks in
// order, x fastest; a block starts when every thread has finished the one before. A thread that
// returns leaves its block's and its warp's barriers, as an exited GPU thread stops counting.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, Kernel kernel, Args... args) {
  gridDim = grid;
  blockDim = block;
  const unsigned threads = block.x * block.y * block.z;
  const unsigned blocks = grid.x * grid.y * grid.z;
  const unsigned warps_per_block = (threads + kWarpSize - 1) / kWarpSize;
  std::vector<std::unique_ptr<std::barrier<>>> block_barriers;
  std::vector<std::unique_ptr<Warp>> warps;
  for (unsigned b = 0; b < blocks; ++b) {
    block_barriers.push_back(std::make_unique<std::barrier<>>(threads));
    for (unsigned first = 0; first < threads; first += kWarpSize)
      warps.push_back(std::make_unique<Warp>(std::min(kWarpSize, threads - first)));
  }
  std::barrier<> block_done(threads);
  std::vector<std::thread> workers;
  workers.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      threadIdx = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
      lane = t % kWarpSize;
      for (unsigned b = 0; b < blocks; ++b) {
        blockIdx = dim3(b % grid.x, b / grid.x % grid.y, b / (grid.x * grid.y));
        block_barrier = block_barriers[b].get();
        warp = warps[b * warps_per_block + t / kWarpSize].get();
        kernel(args...);
        block_barrier->arrive_and_drop();
        warp->barrier.arrive_and_drop();
        block_done.arrive_and_wait();
      }
    });
  }
  for (std::thread& worker : workers) worker.join();
}

// The kernel headers' `launch(grid, block, kernel, args...)` callable.
struct Launch {
  template <typename Kernel, typename... Args>
  void operator()(dim3 grid, dim3 block, Kernel kernel, Args... args) const {
    cuda_emulation::launch(grid, block, kernel, args...);
  }
};

}  // namespace cuda_emulation

inline void __syncthreads() { cuda_emulation::block_barrier->arrive_and_wait(); }

// Every lane of the warp must call __any_sync (the full mask), as on a GPU.
inline int __any_sync(unsigned /*mask*/, int predicate) {
  cuda_emulation::Warp& warp = *cuda_emulation::warp;
  warp.slots[cuda_emulation::lane] = predicate != 0;
  warp.barrier.arrive_and_wait();
  int any = 0;
  for (double vote : warp.slots) any |= vote != 0;
  warp.barrier.arrive_and_wait();  // nobody writes again before every lane has read
  return any;
}

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
  return cuda_emulation::warp->exchange(mask, cuda_emulation::lane, value,
                                        [&](unsigned lane) { return lane + delta; });
}

// Within segments of `width` lanes: a source outside the caller's segment gives its own value.
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, unsigned lane_mask, int width = 32) {
  const unsigned segment = static_cast<unsigned>(width);
  return cuda_emulation::warp->exchange(mask, cuda_emulation::lane, value, [&](unsigned lane) {
    const unsigned from = lane ^ lane_mask;
    return from / segment == lane / segment ? from : ~0u;
  });
}

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
