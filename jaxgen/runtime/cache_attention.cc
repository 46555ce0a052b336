// Attention of a few new tokens over the decoding KV cache, for CPUs: out [B, T, N, H] =
// softmax(q . keys / sqrt(H), masked) . values, reading one layer of the stacked cache
// [L, B, K, S, H] (jaxgen/model/kvcache.py) where it lies. Registered with XLA as an FFI
// custom call by jaxgen/runtime/cpu_kernels.py; used for decode steps and verify passes
// and prefills (how long: jaxgen/model/attention.py, KERNEL_QUERIES), float32 only.
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

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

using jaxgen::Parallel;

// A query that sees no slot (a padding query): XLA's masked softmax is then uniform over
// all S slots, so its output is their mean.
inline void MeanOfValues(const float* vr, int64_t s, int64_t h, float* o) {
  std::vector<float> acc(h);
  for (int64_t si = 0; si < s; ++si)
    for (int64_t j = 0; j < h; ++j) acc[j] += vr[si * h + j];
  for (int64_t j = 0; j < h; ++j) o[j] = acc[j] / static_cast<float>(s);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// AVX-512 for head sizes of 16, 32, 64 or 128 (HC = H / 16 vectors): the scores of 16 slots
// at a time, each slot's products summed by one fixed tree (Sum16), exp 16 lanes at a time,
// and a query's output sums held in registers. The scalar loop below spent its time
// summing each dot product's lanes one by one, storing and reloading its output sums (a
// heap vector) for every slot, and in std::exp. One layer of the 6 x 512 edit model (16
// heads of 32, ~115 slots): 5 queries 0.063 -> 0.026 ms, 64 queries 0.35 -> 0.16
// (benchmarks/RESULTS.md, "Prompt lookup at 2x").
//
// The bits of a query's output do not depend on the other queries or on how many slots the
// row's last query sees: slots are summed in blocks of 16 from slot 0 in one order, and
// slots a query does not see add exact zeros.

// Lane l of the result: the sum of the 16 lanes of v[kOrder[l]], by one fixed tree (pairs of
// halves, then of quarters, then within 128-bit lanes). kOrder is its own inverse, so a
// caller that puts slot kOrder[l]'s products in v[l] gets slot l's sum in lane l.
constexpr int kOrder[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
inline __m512 Sum16(const __m512 v[16]) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44), _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
}

// e^x for x <= 0 (scores minus their maximum), 0 below -87.3 and for -inf: Cephes' expf
// (a degree-6 polynomial on [-ln2/2, ln2/2], then times 2^n), within 2 ulp of std::exp.
inline __m512 ExpNonPositive(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.33654f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(y, n));
}

// Which of slots s0 .. s0 + 15 of a query's mask row (length s) it sees.
inline __mmask16 Visible(const bool* row, int64_t s0, int64_t s) {
  if (s0 + 16 <= s) return _mm_test_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + s0)), _mm_set1_epi8(1));
  __mmask16 m = 0;
  for (int64_t l = 0; s0 + l < s; ++l) m |= static_cast<__mmask16>(row[s0 + l] ? 1u << l : 0u);
  return m;
}

// One (row, kv head): `rows` queries (query(r) -> its H floats) over slots [0, end) of its
// [S, H] keys and values, into out(r).
template <int HC, typename Query, typename Out>
void AttendBlocks(Query query, Out out, const float* kr, const float* vr, const bool* row_mask, int64_t t, int64_t s,
                  int64_t rows, int64_t end, float scale) {
  constexpr int64_t h = 16 * HC;
  const int64_t blocks = (end + 15) / 16;
  std::vector<float> score(blocks * 16);  // one query's scores, then its weights
  alignas(64) float zero_row[h] = {};
  for (int64_t r = 0; r < rows; ++r) {
    const float* qr = query(r);
    const bool* m = row_mask + (r % t) * s;
    __m512 q[HC];
    for (int c = 0; c < HC; ++c) q[c] = _mm512_loadu_ps(qr + 16 * c);
    __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t s0 = 16 * b;
      __m512 prod[16];
      for (int l = 0; l < 16; ++l) {
        const int64_t si = s0 + kOrder[l];
        const float* krow = si < s ? kr + si * h : zero_row;
        __m512 acc = _mm512_mul_ps(q[0], _mm512_loadu_ps(krow));
        for (int c = 1; c < HC; ++c) acc = _mm512_fmadd_ps(q[c], _mm512_loadu_ps(krow + 16 * c), acc);
        prod[l] = acc;
      }
      const __m512 dots = _mm512_mul_ps(Sum16(prod), _mm512_set1_ps(scale));
      const __m512 sc = _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), Visible(m, s0, s), dots);
      _mm512_storeu_ps(score.data() + s0, sc);
      top = _mm512_max_ps(top, sc);
    }
    const float best = _mm512_reduce_max_ps(top);
    float* o = out(r);
    if (best == -std::numeric_limits<float>::infinity()) {
      MeanOfValues(vr, s, h, o);
      continue;
    }
    __m512 total = _mm512_setzero_ps();
    float* sr = score.data();
    for (int64_t b = 0; b < blocks; ++b) {
      const __m512 e = ExpNonPositive(_mm512_sub_ps(_mm512_loadu_ps(sr + 16 * b), _mm512_set1_ps(best)));
      _mm512_storeu_ps(sr + 16 * b, e);
      total = _mm512_add_ps(total, e);
    }
    const float inv = 1.0f / _mm512_reduce_add_ps(total);
    __m512 acc[HC];
    for (int c = 0; c < HC; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t si = 0; si < end; ++si) {
      if (!m[si]) continue;
      const __m512 p = _mm512_set1_ps(sr[si] * inv);
      for (int c = 0; c < HC; ++c) acc[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vr + si * h + 16 * c), acc[c]);
    }
    for (int c = 0; c < HC; ++c) _mm512_storeu_ps(o + 16 * c, acc[c]);
  }
}
#endif

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
    auto query = [&](int64_t r) { return qp + ((bi * t + r % t) * n + ki * g + r / t) * h; };  // r = gi * t + ti
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    auto out_of = [&](int64_t r) { return op + (query(r) - qp); };
    switch (h) {
      case 16: return AttendBlocks<1>(query, out_of, kr, vr, row_mask, t, s, rows, end, scale);
      case 32: return AttendBlocks<2>(query, out_of, kr, vr, row_mask, t, s, rows, end, scale);
      case 64: return AttendBlocks<4>(query, out_of, kr, vr, row_mask, t, s, rows, end, scale);
      case 128: return AttendBlocks<8>(query, out_of, kr, vr, row_mask, t, s, rows, end, scale);
    }
#endif
    std::vector<float> score(rows * std::max<int64_t>(end, 1));
    std::vector<float> top(rows, -std::numeric_limits<float>::infinity());
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
        MeanOfValues(vr, s, h, o);
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

// Whether this build attends in AVX-512 blocks of 16 slots for head size h (1) or one slot
// at a time (0). jaxgen/model/attention.py sends prefills of any length to the blocks, and
// only short ones to the slot-at-a-time loop (XLA's dots win there past ~128 tokens).
extern "C" int JaxgenAttentionBlocks(int h) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  return h == 16 || h == 32 || h == 64 || h == 128;
#else
  return 0;
#endif
}
