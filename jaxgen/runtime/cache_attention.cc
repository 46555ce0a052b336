// Attention of a few new tokens over the decoding KV cache, for CPUs: out [B, T, N, H] =
// softmax(q . keys / sqrt(H), masked) . values, reading one layer of the stacked cache
// [L, B, K, S, H] (jaxgen/model/kvcache.py) where it lies. Registered with XLA as an FFI
// custom call by jaxgen/runtime/cpu_kernels.py; used for decode steps and verify passes
// and prefills of short prompts (T <= 128), float32 only (jaxgen/model/attention.py).
//
// Why: XLA's dots read a layer's keys and values only after copying them out of the stacked
// cache (a slice is not a dot operand on XLA:CPU): 24 copies per GPT-2 124M step, 1.5 ms of
// a 13.5 ms int8-head step at 160 slots, twice that at 288 (benchmarks/RESULTS.md). Here the
// layer is read in place, and only the slots some query sees: causality hides every slot
// after the last new token, so a cache sized for 256 new tokens is read as far as it is
// filled, not to its end.
//
// Each query's scores, softmax and sum run in one fixed order over its slots, whatever the
// batch, the other rows or the number of new tokens: a row decodes to the same bits alone
// or in a batch, one token at a time or in a verify pass.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

using jaxgen::Parallel;

ffi::Error CacheAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> keys,
                          ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::S32> layer,
                          ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = keys.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || md.size() != 3 || values.dimensions() != kd)
    return ffi::Error::InvalidArgument("cache_attention: q [B, T, N, H], keys and values [L, B, K, S, H], mask [B, T, S]");
  const int64_t b = qd[0], t = qd[1], n = qd[2], h = qd[3], l = kd[0], kv = kd[2], s = kd[3];
  if (kd[1] != b || kd[4] != h || n % kv != 0 || md[0] != b || md[1] != t || md[2] != s)
    return ffi::Error::InvalidArgument("cache_attention: shapes do not match");
  const int64_t li = *layer.typed_data();
  if (li < 0 || li >= l) return ffi::Error::InvalidArgument("cache_attention: layer out of range");
  const int64_t g = n / kv, rows = g * t;  // queries per (row, kv head)
  const float* qp = q.typed_data();
  const float* kp = keys.typed_data() + li * b * kv * s * h;
  const float* vp = values.typed_data() + li * b * kv * s * h;
  const bool* mp = mask.typed_data();
  float* op = out->typed_data();
  // XLA's path multiplies the float32 scores by float32(h ** -0.5) (a Python float).
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(h)));
  const int64_t bytes = 2 * b * kv * s * h * static_cast<int64_t>(sizeof(float));
  Parallel(pool, b * kv, bytes, [=](int64_t task) {
    const int64_t bi = task / kv, ki = task % kv;
    const float* kr = kp + task * s * h;  // this (row, kv head)'s [S, H] keys
    const float* vr = vp + task * s * h;
    const bool* row_mask = mp + bi * t * s;  // [T, S]
    // The slots any query of this row sees; none past the last one is read.
    int64_t end = 0;
    for (int64_t ti = 0; ti < t; ++ti)
      for (int64_t si = s; si > end; --si)
        if (row_mask[ti * s + si - 1]) {
          end = si;
          break;
        }
    std::vector<float> score(rows * std::max<int64_t>(end, 1));
    std::vector<float> top(rows, -std::numeric_limits<float>::infinity());
    auto query = [&](int64_t r) { return qp + ((bi * t + r % t) * n + ki * g + r / t) * h; };  // r = gi * t + ti
    for (int64_t si = 0; si < end; ++si) {
      const float* krow = kr + si * h;
      for (int64_t r = 0; r < rows; ++r) {
        if (!row_mask[(r % t) * s + si]) continue;
        const float* qr = query(r);
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < h; ++j) dot += qr[j] * krow[j];
        score[r * end + si] = dot * scale;
        top[r] = std::max(top[r], score[r * end + si]);
      }
    }
    std::vector<float> acc(h);
    for (int64_t r = 0; r < rows; ++r) {
      float* o = op + (query(r) - qp);
      std::fill(acc.begin(), acc.end(), 0.0f);
      const bool* m = row_mask + (r % t) * s;
      if (top[r] == -std::numeric_limits<float>::infinity()) {
        // No slot visible (a padding query): XLA's masked softmax is then uniform over
        // all S slots, so its output is their mean.
        for (int64_t si = 0; si < s; ++si)
          for (int64_t j = 0; j < h; ++j) acc[j] += vr[si * h + j];
        for (int64_t j = 0; j < h; ++j) o[j] = acc[j] / static_cast<float>(s);
        continue;
      }
      float total = 0.0f;
      for (int64_t si = 0; si < end; ++si)
        if (m[si]) total += score[r * end + si] = std::exp(score[r * end + si] - top[r]);
      const float inv = 1.0f / total;
      for (int64_t si = 0; si < end; ++si) {
        if (!m[si]) continue;
        const float p = score[r * end + si] * inv;
        const float* vrow = vr + si * h;
#pragma omp simd
        for (int64_t j = 0; j < h; ++j) acc[j] += p * vrow[j];
      }
      std::copy(acc.begin(), acc.end(), o);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxgenCacheAttention, CacheAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
