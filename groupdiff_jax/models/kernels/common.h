// Shared by the CPU kernels (attention.cc, dense.cc): vector types, the register-blocked
// micro-kernel every product runs through, and a parallel loop over XLA's intra-op pool.
#ifndef GROUPDIFF_JAX_KERNELS_COMMON_H_
#define GROUPDIFF_JAX_KERNELS_COMMON_H_

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;  // floats per vector register
constexpr int kRows = 6;    // micro-kernel tile: kRows x kVecs vectors of accumulators (24 of 32
constexpr int kVecs = 4;    // registers), kVecs loads and kRows broadcasts per kRows*kVecs FMAs
#else
constexpr int kLanes = 8;   // AVX2 / other: 16 registers, a 4 x 3 tile
constexpr int kRows = 4;
constexpr int kVecs = 3;
#endif

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef float VecU __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec Load(const float* p) { return *reinterpret_cast<const VecU*>(p); }
inline void Store(float* p, Vec v) { *reinterpret_cast<VecU*>(p) = v; }
inline Vec Splat(float x) { return Vec{} + x; }

int64_t RoundUp(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// C[ROWS][VECS*kLanes] (+)= A[ROWS][K] B[K][VECS*kLanes]; A[r][k] at a[r * a_row + k * a_col]
// (either operand order, so A can be read transposed), B rows ldb apart, C rows ldc apart.
template <int ROWS, int VECS, bool ACCUMULATE>
void MicroKernel(int64_t depth, const float* a, int64_t a_row, int64_t a_col, const float* b,
                 int64_t ldb, float* c, int64_t ldc) {
  Vec acc[ROWS][VECS];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < VECS; ++v) acc[r][v] = ACCUMULATE ? Load(c + r * ldc + v * kLanes) : Vec{};
  for (int64_t k = 0; k < depth; ++k) {
    Vec bv[VECS];
#pragma GCC unroll 8
    for (int v = 0; v < VECS; ++v) bv[v] = Load(b + k * ldb + v * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const float x = a[r * a_row + k * a_col];
#pragma GCC unroll 8
      for (int v = 0; v < VECS; ++v) acc[r][v] += x * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < VECS; ++v) Store(c + r * ldc + v * kLanes, acc[r][v]);
}

using MicroKernelFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t,
                               float*, int64_t);

template <bool ACCUMULATE, size_t... I>
constexpr std::array<MicroKernelFn, sizeof...(I)> MicroKernels(std::index_sequence<I...>) {
  return {&MicroKernel<I / kVecs + 1, I % kVecs + 1, ACCUMULATE>...};
}

// Every tile shape, for the edges: kernels[(rows - 1) * kVecs + (vecs - 1)].
constexpr auto kSet = MicroKernels<false>(std::make_index_sequence<kRows * kVecs>{});
constexpr auto kAdd = MicroKernels<true>(std::make_index_sequence<kRows * kVecs>{});

// C[M][N] (+)= A[M][K] B[K][N], N a multiple of kLanes; A strided as in MicroKernel.
template <bool ACCUMULATE>
void Gemm(int64_t m, int64_t n, int64_t depth, const float* a, int64_t a_row, int64_t a_col,
          const float* b, int64_t ldb, float* c, int64_t ldc) {
  const auto& kernels = ACCUMULATE ? kAdd : kSet;
  for (int64_t i = 0; i < m; i += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, m - i));
    for (int64_t j = 0; j < n; j += kVecs * kLanes) {
      const int vecs = static_cast<int>(std::min<int64_t>(kVecs, (n - j) / kLanes));
      kernels[(rows - 1) * kVecs + (vecs - 1)](depth, a + i * a_row, a_row, a_col, b + j, ldb,
                                               c + i * ldc + j, ldc);
    }
  }
}

// A per-thread scratch area that grows and is kept: XLA's pool threads live as long as the
// process, so steady-state calls neither allocate nor fault in fresh pages.
float* Scratch(size_t floats) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < floats) buffer.resize(floats);
  return buffer.data();
}

// Runs fn(0..n-1) on the calling thread and the pool's other threads. Helpers claim items from a
// shared counter; one that starts after all items are claimed touches only the shared state, so
// the caller never waits on a task that has not started (no deadlock when the pool is busy).
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const Fn& fn) {
  const int64_t threads = std::min<int64_t>(pool.num_threads(), n);
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, &fn]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      fn(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule(decltype(work)(work));  // by value
  work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace

#endif  // GROUPDIFF_JAX_KERNELS_COMMON_H_
