// Standalone (no JAX): one thread, int8 [768, 3072] x 12 weights times one float row, the
// portable kernel's m == 1 loop (V0, 4 weight rows per sweep) against 8 rows per sweep (V1) and
// register accumulators over 32-column strips (V2), and int16 activations with integer
// multiply-adds (V3, V4 with 4 rows per sweep, V5 = V6<0> with 8; maxdiff is then its rounding,
// relative to sums of ~|x| * 127 * 768). Measures how fast a core widens int8.
// With an argument: two threads, half the columns each, V4, V5 and V6 (V5 with the next
// sweep's rows prefetched 8, 16 or 32 rows ahead: what jaxgen's AVX2 kernel does).
//   g++ -O3 -march=native -std=c++20 -fopenmp-simd -pthread -o /tmp/int8_widen benchmarks/cpu_int8_widen.cc
//   /tmp/int8_widen; /tmp/int8_widen 2
#include <immintrin.h>
#include <cmath>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>
#include <algorithm>
#include <thread>
constexpr int64_t kColumnChunk = 512;
inline float Wide(int8_t v) { return static_cast<float>(v); }
// current: 4 rows per sweep, acc in L1
void V0(const float* x, const int8_t* w, float* y, int64_t k, int64_t n, int64_t n0, int64_t n1) {
  const int64_t width = n1 - n0;
  alignas(64) float acc[kColumnChunk];
  std::fill(acc, acc + width, 0.0f);
  for (int64_t kk = 0; kk < k; kk += 4) {
    const int8_t* r0 = w + kk * n + n0; const int8_t* r1 = r0 + n; const int8_t* r2 = r1 + n; const int8_t* r3 = r2 + n;
    float a0 = x[kk], a1 = x[kk+1], a2 = x[kk+2], a3 = x[kk+3];
#pragma omp simd aligned(acc : 64)
    for (int64_t j = 0; j < width; ++j)
      acc[j] += a0 * Wide(r0[j]) + a1 * Wide(r1[j]) + a2 * Wide(r2[j]) + a3 * Wide(r3[j]);
  }
  for (int64_t j = 0; j < width; ++j) y[n0 + j] = acc[j];
}
// 8 rows per sweep
void V1(const float* x, const int8_t* w, float* y, int64_t k, int64_t n, int64_t n0, int64_t n1) {
  const int64_t width = n1 - n0;
  alignas(64) float acc[kColumnChunk];
  std::fill(acc, acc + width, 0.0f);
  for (int64_t kk = 0; kk < k; kk += 8) {
    const int8_t* r = w + kk * n + n0;
    float a[8]; for (int q = 0; q < 8; ++q) a[q] = x[kk + q];
#pragma omp simd aligned(acc : 64)
    for (int64_t j = 0; j < width; ++j)
      acc[j] += a[0] * Wide(r[j]) + a[1] * Wide(r[n+j]) + a[2] * Wide(r[2*n+j]) + a[3] * Wide(r[3*n+j])
              + a[4] * Wide(r[4*n+j]) + a[5] * Wide(r[5*n+j]) + a[6] * Wide(r[6*n+j]) + a[7] * Wide(r[7*n+j]);
  }
  for (int64_t j = 0; j < width; ++j) y[n0 + j] = acc[j];
}
// intrinsics: 32-column strips, 4 accumulators in registers over all k rows
void V2(const float* x, const int8_t* w, float* y, int64_t k, int64_t n, int64_t n0, int64_t n1) {
  for (int64_t j = n0; j < n1; j += 32) {
    __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
    const int8_t* p = w + j;
    for (int64_t kk = 0; kk < k; ++kk, p += n) {
      __m256 a = _mm256_broadcast_ss(x + kk);
      __m128i lo = _mm_loadu_si128((const __m128i*)p), hi = _mm_loadu_si128((const __m128i*)(p + 16));
      c0 = _mm256_fmadd_ps(a, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), c0);
      c1 = _mm256_fmadd_ps(a, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), c1);
      c2 = _mm256_fmadd_ps(a, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), c2);
      c3 = _mm256_fmadd_ps(a, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), c3);
    }
    _mm256_storeu_ps(y + j, c0); _mm256_storeu_ps(y + j + 8, c1); _mm256_storeu_ps(y + j + 16, c2); _mm256_storeu_ps(y + j + 24, c3);
  }
}
// x rounded to int16 with one scale (returned): |x| * 32767 / max|x|.
float ToInt16(const float* x, int64_t k, int16_t* q) {
  float top = 0;
  for (int64_t i = 0; i < k; ++i) top = std::max(top, std::abs(x[i]));
  const float s = top > 0 ? top / 32767.0f : 1.0f;
  for (int64_t i = 0; i < k; ++i) q[i] = (int16_t)std::nearbyint(x[i] / s);
  return s;
}
// int16 activations (one scale per row, as the AVX-512 head path) and integer multiply-adds:
// rows k and k+1 interleaved byte by byte, widened to int16, vpmaddwd against the pair
// (x[k], x[k+1]) broadcast: 16 columns x 2 rows per instruction, exact int32 sums.
void V3(const float* x, const int8_t* w, float* y, int64_t k, int64_t n, int64_t n0, int64_t n1) {
  alignas(64) int16_t q[16384];
  const float s = ToInt16(x, k, q);
  alignas(32) int32_t acc[kColumnChunk];
  std::fill(acc, acc + (n1 - n0), 0);
  for (int64_t kk = 0; kk < k; kk += 2) {
    int32_t pair; std::memcpy(&pair, q + kk, 4);
    const __m256i a = _mm256_set1_epi32(pair);
    const int8_t* r0 = w + kk * n + n0; const int8_t* r1 = r0 + n;
    for (int64_t j = 0; j < n1 - n0; j += 16) {
      const __m128i b0 = _mm_loadu_si128((const __m128i*)(r0 + j)), b1 = _mm_loadu_si128((const __m128i*)(r1 + j));
      const __m256i lo = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(b0, b1));  // columns j..j+7, pairs
      const __m256i hi = _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(b0, b1));  // columns j+8..j+15
      __m256i* c = (__m256i*)(acc + j);
      c[0] = _mm256_add_epi32(c[0], _mm256_madd_epi16(lo, a));
      c[1] = _mm256_add_epi32(c[1], _mm256_madd_epi16(hi, a));
    }
  }
  for (int64_t j = 0; j < n1 - n0; ++j) y[n0 + j] = acc[j] * s;
}
// V3 with 4 rows per sweep: two pairs' products summed before the accumulator is touched.
void V4(const float* x, const int8_t* w, float* y, int64_t k, int64_t n, int64_t n0, int64_t n1) {
  alignas(64) int16_t q[16384];
  const float s = ToInt16(x, k, q);
  alignas(32) int32_t acc[kColumnChunk];
  std::fill(acc, acc + (n1 - n0), 0);
  for (int64_t kk = 0; kk < k; kk += 4) {
    int32_t p0, p1; std::memcpy(&p0, q + kk, 4); std::memcpy(&p1, q + kk + 2, 4);
    const __m256i a0 = _mm256_set1_epi32(p0), a1 = _mm256_set1_epi32(p1);
    const int8_t* r0 = w + kk * n + n0;
    for (int64_t j = 0; j < n1 - n0; j += 16) {
      const __m128i b0 = _mm_loadu_si128((const __m128i*)(r0 + j)), b1 = _mm_loadu_si128((const __m128i*)(r0 + n + j));
      const __m128i b2 = _mm_loadu_si128((const __m128i*)(r0 + 2 * n + j)), b3 = _mm_loadu_si128((const __m128i*)(r0 + 3 * n + j));
      __m256i* c = (__m256i*)(acc + j);
      c[0] = _mm256_add_epi32(c[0], _mm256_add_epi32(_mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_unpacklo_epi8(b0, b1)), a0),
                                                      _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_unpacklo_epi8(b2, b3)), a1)));
      c[1] = _mm256_add_epi32(c[1], _mm256_add_epi32(_mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_unpackhi_epi8(b0, b1)), a0),
                                                      _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_unpackhi_epi8(b2, b3)), a1)));
    }
  }
  for (int64_t j = 0; j < n1 - n0; ++j) y[n0 + j] = acc[j] * s;
}
// V4 with 8 rows per sweep: four pairs' products summed before the accumulator is touched;
// AHEAD > 0 (V6) also fetches the rows AHEAD rows further down as it reads.
template <int AHEAD>
void V6(const float* x, const int8_t* w, float* y, int64_t k, int64_t n, int64_t n0, int64_t n1) {
  alignas(64) int16_t q[16384];
  const float s = ToInt16(x, k, q);
  alignas(32) int32_t acc[kColumnChunk];
  std::fill(acc, acc + (n1 - n0), 0);
  for (int64_t kk = 0; kk < k; kk += 8) {
    __m256i a[4];
    for (int p = 0; p < 4; ++p) { int32_t v; std::memcpy(&v, q + kk + 2 * p, 4); a[p] = _mm256_set1_epi32(v); }
    const int8_t* r0 = w + kk * n + n0;
    for (int64_t j = 0; j < n1 - n0; j += 16) {
      if (AHEAD > 0 && (j & 63) == 0) for (int p = 0; p < 8; ++p) _mm_prefetch((const char*)(r0 + (AHEAD + p) * n + j), _MM_HINT_T0);
      __m256i lo = _mm256_setzero_si256(), hi = lo;
      for (int p = 0; p < 4; ++p) {
        const __m128i b0 = _mm_loadu_si128((const __m128i*)(r0 + 2 * p * n + j)), b1 = _mm_loadu_si128((const __m128i*)(r0 + (2 * p + 1) * n + j));
        lo = _mm256_add_epi32(lo, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_unpacklo_epi8(b0, b1)), a[p]));
        hi = _mm256_add_epi32(hi, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_unpackhi_epi8(b0, b1)), a[p]));
      }
      __m256i* c = (__m256i*)(acc + j);
      c[0] = _mm256_add_epi32(c[0], lo);
      c[1] = _mm256_add_epi32(c[1], hi);
    }
  }
  for (int64_t j = 0; j < n1 - n0; ++j) y[n0 + j] = acc[j] * s;
}
using F = void (*)(const float*, const int8_t*, float*, int64_t, int64_t, int64_t, int64_t);
constexpr int64_t k = 768, n = 3072, mats = 12, reps = 5;

// Three rounds of each kernel over the same weights and row; `threads` 1 or 2 (half the
// columns each); one thread also prints each result's largest difference from the first's.
void Run(const F* fs, const char* const* names, int count, int threads) {
  std::vector<int8_t> w(mats * k * n);
  for (size_t i = 0; i < w.size(); ++i) w[i] = (int8_t)((i * 2654435761u) >> 24);
  std::vector<float> x(k), y(n), y0(n);
  for (int i = 0; i < k; ++i) x[i] = (i % 7) * 0.1f - 0.3f;
  for (int round = 0; round < 3; ++round)
    for (int v = 0; v < count; ++v) {
      auto columns = [&](int m, int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; c += kColumnChunk) fs[v](x.data(), w.data() + m * k * n, y.data(), k, n, c, c + kColumnChunk);
      };
      auto t0 = std::chrono::steady_clock::now();
      for (int r = 0; r < reps; ++r)
        for (int m = 0; m < mats; ++m) {
          if (threads == 1) { columns(m, 0, n); continue; }
          std::thread t([&] { columns(m, 0, n / 2); });
          columns(m, n / 2, n);
          t.join();
        }
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (v == 0) y0 = y;
      double err = 0;
      for (int j = 0; j < n; ++j) err = std::max(err, (double)std::abs(y[j] - y0[j]));
      printf("%d thread(s) %s: %.2f GB/s  maxdiff %.3g\n", threads, names[v], reps * mats * k * n / s / 1e9, err);
    }
}

int main(int argc, char** argv) {
  if (argc > 1) {
    const F fs[] = {V4, V6<0>, V6<8>, V6<16>, V6<32>};
    const char* names[] = {"V4 int16 4rows", "V5 int16 8rows", "V6 8rows ahead 8", "V6 ahead 16", "V6 ahead 32"};
    Run(fs, names, 5, 2);
  } else {
    const F fs[] = {V0, V1, V2, V3, V4, V6<0>};
    const char* names[] = {"V0 4rows", "V1 8rows", "V2 regs32", "V3 int16", "V4 int16 4rows", "V5 int16 8rows"};
    Run(fs, names, 6, 1);
  }
}
