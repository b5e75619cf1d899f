// Runs CUDA kernel source on the CPU, to test the fused kernel's exact code where no GPU exists.
//
// A CTA is 128 std::threads; __syncthreads is a barrier over them; __shared__ variables become statics and
// dynamic shared memory one buffer, refilled with NaN patterns before every CTA so a read of data never
// loaded shows up. mma.sync m16n8k16 is a warp-level exchange: the 32 lanes publish their fragments, each
// computes its four outputs from the PTX fragment layout, in fp32 from the bf16/fp16 inputs.
//
// cp.async has two landing modes, the two ends of what hardware may do: late (copies queue per thread in
// commit groups and land only when that thread's cp.async.wait_group retires their group) and eager
// (`eager_landing`: a copy also lands at issue, so refilling a stage another warp still reads is a data race
// ThreadSanitizer reports). Every typed access, cp.async and mapped pointer is checked: aligned to its
// size (a misaligned access faults on the GPU), and inside the dynamic shared memory the launch asked for;
// bytes past that size must still hold their poison after each CTA. CTAs run one at a time, in grid order
// or, with `cta_order_seed`, shuffled, so a result cannot depend on which CTA of a split-K group arrives
// last. What this cannot show: timing, bank conflicts, CTAs running at once, memory ordering between CTAs,
// and whether the PTX layouts written here match the hardware (the GPU tests do).
#pragma once

#define XORGEMM_EMULATE 1

#include <stdint.h>
#include <string.h>

#include <stdio.h>
#include <stdlib.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __syncthreads() emulate::syncthreads()

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct uint2 {
  uint32_t x, y;
};
struct alignas(16) uint4 {
  uint32_t x, y, z, w;
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace emulate {

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    const uint64_t gen = gen_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, arrived_ = 0;
  uint64_t gen_ = 0;
};

inline constexpr int kThreads = 128;
inline Barrier cta_barrier(kThreads);
inline Barrier warp_barrier[kThreads / 32] = {Barrier(32), Barrier(32), Barrier(32), Barrier(32)};
alignas(16) inline unsigned char smem_buffer[228 * 1024];

inline void syncthreads() { cta_barrier.wait(); }
inline unsigned char* dynamic_smem() { return smem_buffer; }

inline bool eager_landing = false;  // cp.async: land at issue too (see the top of this file)
inline unsigned cta_order_seed = 0;  // nonzero: run the CTAs of a launch in a shuffled order
inline size_t smem_requested = sizeof smem_buffer;  // the dynamic shared memory of the running launch
constexpr size_t kMaxDynamicSmem = 227 * 1024;      // what a CTA may opt in to on sm_90 (sm_80: 163 KiB)

[[noreturn]] inline void fail(const char* what, const void* p, size_t n) {
  fprintf(stderr, "emulation: %s (%zu bytes at %p, CTA %u,%u,%u thread %u)\n", what, n, p, blockIdx.x, blockIdx.y,
          blockIdx.z, threadIdx.x);
  abort();
}
// What the GPU requires of an access of n bytes at p: natural alignment, and inside the requested dynamic
// shared memory when it is shared memory at all.
inline void check_access(const void* p, size_t n) {
  if (reinterpret_cast<uintptr_t>(p) % n != 0) fail("misaligned access", p, n);
  const auto* b = static_cast<const unsigned char*>(p);
  if (b >= smem_buffer && b < smem_buffer + sizeof smem_buffer && b + n > smem_buffer + smem_requested)
    fail("shared-memory access beyond the launch's dynamic size", p, n);
}

template <typename T>
T atomic_add(T* p, T v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
// A seq_cst read-modify-write rather than a fence: ThreadSanitizer models the one and not the other.
inline std::atomic<unsigned> fence_word{0};
inline void threadfence() { fence_word.fetch_add(0, std::memory_order_seq_cst); }

struct Copy {
  void* dst;
  const void* src;
  bool valid;
};
inline thread_local std::vector<Copy> open_group;
inline thread_local std::deque<std::vector<Copy>> committed;

inline void land(const Copy& c) {
  if (c.valid) {
    memcpy(c.dst, c.src, 16);
  } else {
    memset(c.dst, 0, 16);
  }
}
inline void cp_async16(void* dst, const void* src, bool valid) {
  check_access(dst, 16);
  if (valid) check_access(src, 16);
  open_group.push_back({dst, src, valid});
  if (eager_landing) land(open_group.back());  // and again at the wait: the same bytes
}
inline void cp_async_commit() {
  committed.push_back(std::move(open_group));
  open_group.clear();
}
inline void cp_async_wait(int n) {
  while ((int)committed.size() > n) {
    for (const Copy& c : committed.front()) land(c);
    committed.pop_front();
  }
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: renormalize
      int e = -1;
      uint32_t m = man;
      do {
        ++e;
        m <<= 1;
      } while (!(m & 1024));
      u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((m & 1023) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {  // round to nearest even
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}
inline uint16_t float_to_fp16(float f) {  // round to nearest even, finite inputs
  uint32_t u;
  memcpy(&u, &f, 4);
  const uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
  const int exp = (int)((u >> 23) & 255) - 127 + 15;
  uint32_t man = u & 0x7fffff;
  if (exp >= 31) return sign | 0x7c00;
  if (exp <= 0) {  // subnormal or zero
    if (exp < -10) return sign;
    man |= 0x800000;
    const int shift = 14 - exp;
    uint32_t h = man >> shift;
    const uint32_t rest = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (h & 1))) ++h;
    return sign | (uint16_t)h;
  }
  uint32_t h = ((uint32_t)exp << 10) | (man >> 13);
  const uint32_t rest = man & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;
  return sign | (uint16_t)h;
}

struct bf16 {
  uint16_t bits;
  bf16() = default;
  explicit bf16(float f) : bits(float_to_bf16(f)) {}
  explicit operator float() const { return bf16_to_float(bits); }
};
struct fp16 {
  uint16_t bits;
  fp16() = default;
  explicit fp16(float f) : bits(float_to_fp16(f)) {}
  explicit operator float() const { return fp16_to_float(bits); }
};

struct Fragments {
  uint32_t a[32][4], b[32][2];
};
inline Fragments warp_fragments[kThreads / 32];

// D = A B + C for one m16n8k16 tile, A row-major 16x16, B column-major 16x8, per the PTX fragment layout:
// A reg r of lane l holds (row l/4 + 8*(r&1), cols 2*(l%4) + 8*(r>>1) + {0,1}); B reg r holds
// (k = 2*(l%4) + 8*r + {0,1}, n = l/4); C/D element i holds (row l/4 + 8*(i>>1), col 2*(l%4) + (i&1)).
inline void mma16816(bool is_bf16, float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  Fragments& f = warp_fragments[w];
  memcpy(f.a[lane], a, sizeof a);
  memcpy(f.b[lane], b, sizeof b);
  warp_barrier[w].wait();
  const auto value = [&](uint32_t reg, int half) {
    const uint16_t h = (uint16_t)(reg >> (16 * half));
    return is_bf16 ? bf16_to_float(h) : fp16_to_float(h);
  };
  float d[4];
  for (int i = 0; i < 4; ++i) {
    const int row = lane / 4 + 8 * (i >> 1), col = 2 * (lane % 4) + (i & 1);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) {
      const float av = value(f.a[(row % 8) * 4 + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)], k % 2);
      const float bv = value(f.b[col * 4 + (k % 8) / 2][k >= 8], k % 2);
      acc += av * bv;
    }
    d[i] = acc;
  }
  warp_barrier[w].wait();  // every lane has read the exchange before any lane overwrites it
  memcpy(c, d, sizeof d);
}

// Runs `kernel` (a callable taking no arguments: the kernel bound to its parameters) over `grid` CTAs of
// kThreads threads with `smem_bytes` of dynamic shared memory, one CTA at a time.
inline void launch(dim3 grid, const std::function<void()>& kernel, size_t smem_bytes = 0) {
  if (smem_bytes > kMaxDynamicSmem)
    fail("a launch asks for more dynamic shared memory than an SM has", nullptr, smem_bytes);
  blockDim = {kThreads, 1, 1};
  gridDim = grid;
  smem_requested = smem_bytes;
  std::vector<dim3> order;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.push_back({x, y, z});
  if (cta_order_seed != 0) std::shuffle(order.begin(), order.end(), std::mt19937(cta_order_seed));
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      threadIdx = {(unsigned)t, 0, 0};
      for (const dim3& cta : order) {
        blockIdx = cta;
        if (t == 0) memset(smem_buffer, 0xff, sizeof smem_buffer);  // NaN in bf16 and fp16
        syncthreads();
        kernel();
        cp_async_wait(0);
        syncthreads();
        if (t == 0)
          for (size_t i = smem_bytes; i < sizeof smem_buffer; ++i)
            if (smem_buffer[i] != 0xff) fail("a write beyond the launch's dynamic shared memory", smem_buffer + i, 1);
      }
    });
  }
  for (auto& th : threads) th.join();
  smem_requested = sizeof smem_buffer;
}

// A grid-stride kernel run by one thread covering the whole grid.
inline void launch_serial(const std::function<void()>& kernel) {
  blockDim = {1, 1, 1};
  gridDim = {1, 1, 1};
  threadIdx = {0, 0, 0};
  blockIdx = {0, 0, 0};
  kernel();
}

}  // namespace emulate
