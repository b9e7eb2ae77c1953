// Runs CUDA kernel source on the CPU for testing: one std::thread per CUDA thread, one block
// at a time, __syncthreads as a std::barrier, atomics as std::atomic_ref. Only what
// src/cuda/scan.cu uses is provided.
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <thread>
#include <vector>

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
thread_local EmuDim3 threadIdx, blockIdx;
static std::barrier<> *emu_barrier = nullptr;
static std::vector<unsigned char> emu_dynamic_shared_buffer;
static unsigned char *emu_dynamic_shared = nullptr;

inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
template <typename T> inline void atomicAdd(T *address, T value) {
  std::atomic_ref<T>(*address).fetch_add(value);
}
using std::max;
using std::min;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

// Runs `kernel(thread)` for every thread of every block, blocks one after another.
inline void emu_launch(unsigned blocks, unsigned threads, std::size_t shared_bytes,
                       const std::function<void()> &kernel) {
  for (unsigned b = 0; b < blocks; ++b) {
    emu_dynamic_shared_buffer.assign(shared_bytes + 16, 0xAB);  // garbage, as on a GPU
    emu_dynamic_shared = emu_dynamic_shared_buffer.data();
    std::barrier<> barrier(threads);
    emu_barrier = &barrier;
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, b, t] {
        blockIdx.x = b;
        threadIdx.x = t;
        kernel();
      });
    }
    for (auto &th : pool) th.join();
  }
}
