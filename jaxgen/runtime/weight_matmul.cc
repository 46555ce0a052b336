// Weight-streaming matmul for CPUs: y [M, N] = x [M, K] (float32) @ w * scale [N], with w
// stored as int8 or bfloat16, [K, N] ("kn": contracts the weight's leading dim, as every
// projection kernel does) or [N, K] ("nk": its trailing dim, as a tied embedding used as
// the output head does). Registered with XLA as FFI custom calls by
// jaxgen/runtime/cpu_kernels.py, which compiles this file on first use.
//
// Why: batch-1 decoding reads every weight once per token, so int8 / bfloat16 weights
// should halve or quarter a step. XLA:CPU instead converts narrow weights at ~1-1.5 GB/s
// inside its dots (benchmarks/RESULTS.md, "Weights in fewer bytes"), slower than reading
// float32. Here each weight byte is read once, widened in registers-sized pieces and
// used by all M activation rows (M = batch x new tokens: a speculative verify pass of
// 5 tokens reads the weights once, like a 1-token step).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// A weight as float32: int8 is exact, bfloat16 is the high half of a float32. Plain
// code the compiler vectorizes (sign/zero extend, shift, convert).
inline float Wide(int8_t v) { return static_cast<float>(v); }
inline float Wide(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
template <typename W>
inline void Widen(const W* w, float* out, int64_t count) {
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) out[j] = Wide(w[j]);
}

constexpr int64_t kColumnChunk = 512;  // [K, N] kernels: output columns per task
constexpr int64_t kRowChunk = 64;      // [N, K] kernels: output columns (weight rows) per task
constexpr int64_t kMaxK = 16384;       // [N, K] kernels: longest weight row held as float32

// y[:, n0:n1] = x [M, K] @ w[K, N][:, n0:n1] * scale[n0:n1]: one pass over the weights.
// Four weight rows per sweep of the sums: each load and store of a sum then serves four
// multiply-adds (measured here: 9 vs 6 GB/s of int8 weights on one core). One activation
// row widens the weights inside the multiply-add and keeps its sums in L1; several first
// widen the four row pieces once and reuse them for every activation row.
template <typename W>
void KnColumns(const float* x, const W* w, const float* scale, float* y, int64_t m, int64_t k, int64_t n,
               int64_t n0, int64_t n1) {
  const int64_t width = n1 - n0;
  const W* r[4];
  auto rows_from = [&](int64_t kk) {  // a short last sweep repeats its last row; its a[] are 0
    const int64_t rows = std::min<int64_t>(4, k - kk);
    for (int64_t q = 0; q < 4; ++q) r[q] = w + (kk + std::min(q, rows - 1)) * n + n0;
    return rows;
  };
  if (m == 1) {
    alignas(64) float acc[kColumnChunk];
    std::fill(acc, acc + width, 0.0f);
    for (int64_t kk = 0; kk < k; kk += 4) {
      const int64_t rows = rows_from(kk);
      float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int64_t q = 0; q < rows; ++q) a[q] = x[kk + q];
#pragma omp simd aligned(acc : 64)
      for (int64_t j = 0; j < width; ++j)
        acc[j] += a[0] * Wide(r[0][j]) + a[1] * Wide(r[1][j]) + a[2] * Wide(r[2][j]) + a[3] * Wide(r[3][j]);
    }
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) y[n0 + j] = acc[j] * scale[n0 + j];
    return;
  }
  alignas(64) float wide[4][kColumnChunk];
  for (int64_t i = 0; i < m; ++i) std::fill(y + i * n + n0, y + i * n + n1, 0.0f);
  for (int64_t kk = 0; kk < k; kk += 4) {
    const int64_t rows = rows_from(kk);
    for (int64_t q = 0; q < 4; ++q) Widen(r[q], wide[q], width);
    for (int64_t i = 0; i < m; ++i) {
      float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int64_t q = 0; q < rows; ++q) a[q] = x[i * k + kk + q];
      float* out = y + i * n + n0;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j)
        out[j] += a[0] * wide[0][j] + a[1] * wide[1][j] + a[2] * wide[2][j] + a[3] * wide[3][j];
    }
  }
  for (int64_t i = 0; i < m; ++i) {
    float* out = y + i * n + n0;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) out[j] *= scale[n0 + j];
  }
}

// y[:, n0:n1] = x [M, K] @ w[N, K][n0:n1, :]^T * scale[n0:n1]: each weight row widened
// once, then one dot per activation row. (Four weight rows per sweep of x, as KnColumns
// does, measured slower here: 4.7-5.1 vs 5.5-7.0 GB/s of int8 on one core.)
template <typename W>
void NkRows(const float* x, const W* w, const float* scale, float* y, int64_t m, int64_t k, int64_t n,
            int64_t n0, int64_t n1) {
  alignas(64) float wide[kMaxK];
  for (int64_t j = n0; j < n1; ++j) {
    Widen(w + j * k, wide, k);
    for (int64_t i = 0; i < m; ++i) {
      const float* xi = x + i * k;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t kk = 0; kk < k; ++kk) acc += xi[kk] * wide[kk];
      y[i * n + j] = acc * scale[j];
    }
  }
}

struct Tasks {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  int64_t count = 0;
  std::function<void(int64_t)> run;

  void Drain() {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < count;) {
      run(t);
      finished.fetch_add(1, std::memory_order_release);
    }
  }
};

// Runs tasks 0..count-1 on this thread and the pool's: helpers take tasks from a shared
// counter, and this thread runs whatever is left, so it never waits on a task nobody runs.
void Parallel(ffi::ThreadPool pool, int64_t count, int64_t bytes, std::function<void(int64_t)> run) {
  auto tasks = std::make_shared<Tasks>();
  tasks->count = count;
  tasks->run = std::move(run);
  const int64_t helpers = bytes < (256 << 10) ? 0 : std::min<int64_t>(pool.num_threads(), count - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([tasks] { tasks->Drain(); });
  tasks->Drain();
  while (tasks->finished.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

template <ffi::DataType T, bool kKn>
ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> w, ffi::Buffer<ffi::F32> scale,
                  ffi::ResultBuffer<ffi::F32> y) {
  using W = std::conditional_t<T == ffi::S8, int8_t, uint16_t>;
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("weight_matmul: 2-d operands only");
  const int64_t m = xd[0], k = xd[1], n = kKn ? wd[1] : wd[0];
  if ((kKn ? wd[0] : wd[1]) != k) return ffi::Error::InvalidArgument("weight_matmul: contracted sizes differ");
  if (!kKn && k > kMaxK) return ffi::Error::InvalidArgument("weight_matmul: rows longer than 16384");
  const float* xp = x.typed_data();
  const W* wp = reinterpret_cast<const W*>(w.untyped_data());
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  const int64_t chunk = kKn ? kColumnChunk : kRowChunk;
  const int64_t count = (n + chunk - 1) / chunk;
  Parallel(pool, count, static_cast<int64_t>(w.size_bytes()), [=](int64_t t) {
    const int64_t n0 = t * chunk, n1 = std::min(n, n0 + chunk);
    if constexpr (kKn) KnColumns(xp, wp, sp, yp, m, k, n, n0, n1);
    else NkRows(xp, wp, sp, yp, m, k, n, n0, n1);
  });
  return ffi::Error::Success();
}

}  // namespace

#define JAXGEN_MATMUL(name, dtype, kn)                                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, (Matmul<dtype, kn>),              \
                                ffi::Ffi::Bind()                        \
                                    .Ctx<ffi::ThreadPool>()             \
                                    .Arg<ffi::Buffer<ffi::F32>>()       \
                                    .Arg<ffi::Buffer<dtype>>()          \
                                    .Arg<ffi::Buffer<ffi::F32>>()       \
                                    .Ret<ffi::Buffer<ffi::F32>>());

JAXGEN_MATMUL(JaxgenMatmulKnS8, ffi::S8, true)
JAXGEN_MATMUL(JaxgenMatmulNkS8, ffi::S8, false)
JAXGEN_MATMUL(JaxgenMatmulKnBF16, ffi::BF16, true)
JAXGEN_MATMUL(JaxgenMatmulNkBF16, ffi::BF16, false)
