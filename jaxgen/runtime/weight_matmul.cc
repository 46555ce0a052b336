// Weight-streaming matmul for CPUs: y [M, N] = x [M, K] (float32) @ w * scale [N], with w
// stored as int8 or bfloat16, [K, N] ("kn": contracts the weight's leading dim, as every
// projection kernel does) or [N, K] ("nk": its trailing dim, as a tied embedding used as
// the output head does), or [K, N] in 16 x 128 tiles ("kn_tiles", below); float32 w in
// the two [K, N] layouts. Registered with XLA as FFI custom calls by
// jaxgen/runtime/cpu_kernels.py, which compiles this file on first use.
//
// Why: batch-1 decoding reads every weight once per token, so int8 / bfloat16 weights
// should halve or quarter a step. XLA:CPU instead converts narrow weights at ~1-1.5 GB/s
// inside its dots (benchmarks/RESULTS.md, "Weights in fewer bytes"), slower than reading
// float32. Here each weight byte is read once, widened in registers-sized pieces and
// used by all M activation rows (M = batch x new tokens: a speculative verify pass of
// 5 tokens reads the weights once, like a 1-token step).
//
// Register-tiled kernels below replace the portable loops on AVX-512 CPUs, and on AVX2
// CPUs for float32 and bfloat16 weights (int8 there multiplies int16 activation rows by
// vpmaddwd). The AVX-512 [N, K] head multiplies narrow activations (int16 rows for int8
// weights, two bfloat16 parts for bfloat16 weights) with the dot-product instructions:
// results then differ from float32 arithmetic by well under the weights' own rounding
// (tests/test_cpu_kernels.py holds both paths to the same bound against float64). float32
// weights come here in tiles only (the serving layout, model/quant.py, where register
// tiles read them): in the plain layout XLA's own matvec read them faster
// (benchmarks/cpu_kernel_step.py f32: 1.21x vs 1.60x of a max pass, one run); in tiles a
// decode step runs at 1.0-1.1x of the bare pass where XLA's took 1.3-1.4x on AVX-512, and
// a 5-row verify pass at half XLA's time on AVX2 (RESULTS.md).
#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

using jaxgen::Parallel;

// A weight as float32: int8 is exact, bfloat16 is the high half of a float32. Plain
// code the compiler vectorizes (sign/zero extend, shift, convert).
inline float Wide(int8_t v) { return static_cast<float>(v); }
inline float Wide(float v) { return v; }
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
// The "kn_tiles" layout of a [K, N] weight (K % kTileRows == 0, N % kTileCols == 0; built
// at load time by jaxgen/model/quant.py): the same elements, ordered as kTileRows x
// kTileCols tiles, each row-major, the tiles row-major. A block of 16 rows swept across the
// columns is then one contiguous stream. In the plain layout a 768-wide weight read at
// 9-10 GB/s on one core (16 row pieces 768 bytes apart), tiled at 17-18
// (benchmarks/RESULTS.md). Every build reads it; serving stores it where the AVX-512
// kernels run (the portable loops read it so that one serving layout runs anywhere).
constexpr int64_t kTileRows = 16;
constexpr int64_t kTileCols = 128;

// Where the weights of rows k0.. at column j start, and how far apart their rows are: in
// the plain layout w[k0, j] and n; in tiles the [16, 128] tile holding (k0, j), rows
// kTileCols apart (k0 a multiple of kTileRows).
template <typename W>
inline const W* TileAt(const W* w, int64_t n, int64_t k0, int64_t j, bool tiles) {
  return tiles ? w + k0 * n + (j / kTileCols) * kTileCols * kTileRows + j % kTileCols : w + k0 * n + j;
}

// The rows of w[:, n0:n1] of a [K, N] weight in either layout, each contiguous (with
// tiles, n0 a multiple of kTileCols and n1 - n0 <= kTileCols: one tile column).
template <typename W>
struct ColumnRows {
  const W* w;
  bool tiles;
  int64_t k, n, n0;

  const W* At(int64_t row) const {
    return tiles ? TileAt(w, n, row / kTileRows * kTileRows, n0, true) + row % kTileRows * kTileCols
                 : w + row * n + n0;
  }
  // Rows kk..kk+R-1 into r, for the kernels that take R weight rows per sweep; a short
  // last sweep repeats its last row (the caller's activations there are 0). How many are real.
  template <int R>
  int64_t Rows(int64_t kk, const W* r[R]) const {
    const int64_t rows = std::min<int64_t>(R, k - kk);
    for (int64_t q = 0; q < R; ++q) r[q] = At(kk + std::min(q, rows - 1));
    return rows;
  }
};

// Calls f(c0, c1) for the columns n0..n1, one tile column at a time with `tiles`.
template <typename F>
void ByTileColumns(bool tiles, int64_t n0, int64_t n1, F&& f) {
  if (!tiles) return f(n0, n1);
  for (int64_t j = n0; j < n1; j += kTileCols) f(j, std::min(n1, j + kTileCols));
}

// y[:, n0:n1] = x [M, K] @ w[K, N][:, n0:n1] * scale[n0:n1]: one pass over the weights.
// Four weight rows per sweep of the sums: each load and store of a sum then serves four
// multiply-adds (measured here: 9 vs 6 GB/s of int8 weights on one core). One activation
// row widens the weights inside the multiply-add and keeps its sums in L1; several first
// widen the four row pieces once and reuse them for every activation row.
// Tiles are read one tile column at a time (ByTileColumns): the same sums in the same
// order as the plain layout's.
template <typename W>
void KnColumns(const float* x, const ColumnRows<W>& w, const float* scale, float* y, int64_t m, int64_t n,
               int64_t n1) {
  const int64_t k = w.k, n0 = w.n0, width = n1 - n0;
  const W* r[4];
  if (m == 1) {
    alignas(64) float acc[kColumnChunk];
    std::fill(acc, acc + width, 0.0f);
    for (int64_t kk = 0; kk < k; kk += 4) {
      const int64_t rows = w.template Rows<4>(kk, r);
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
    const int64_t rows = w.template Rows<4>(kk, r);
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

// Runs `tile.template operator()<MB>()` for the activation rows i0..m in groups of at most
// kMaxRows (templates need the group size at compile time).
template <int kMaxRows, typename Tile>
void RowGroups(int64_t m, Tile&& tile) {
  for (int64_t i0 = 0; i0 < m; i0 += kMaxRows) {
    switch (std::min<int64_t>(kMaxRows, m - i0)) {
      case 1: tile.template operator()<1>(i0); break;
      case 2: if constexpr (kMaxRows >= 2) tile.template operator()<2>(i0); break;
      case 3: if constexpr (kMaxRows >= 3) tile.template operator()<3>(i0); break;
      case 4: if constexpr (kMaxRows >= 4) tile.template operator()<4>(i0); break;
      case 5: if constexpr (kMaxRows >= 5) tile.template operator()<5>(i0); break;
      case 6: if constexpr (kMaxRows >= 6) tile.template operator()<6>(i0); break;
    }
  }
}

// Activations for the dot-product instructions, made once per call: for the AVX-512
// head, and for the AVX2 int8 kernels further down.
// int8 weights: each activation row rounded to int16 with a scale of its own (|error| <=
// the row's max / 65534, some 250x below the weights' own int8 rounding), so one vpdpwssd
// multiplies 32 weights (vpmaddwd 16) where the float path takes three instructions per 16
// (per 8 on AVX2). bfloat16 weights: each activation as the sum of two bfloat16 numbers
// (hi + lo: 16 significant bits of float32's 24), each used by vdpbf16ps against the
// weights as stored. Either way the weights are read at the memory's pace instead of the
// widening's (RESULTS.md).
struct NarrowRows {
  int64_t stride = 0;         // k rounded up to 64 (a step of the [N, K] kernels); the padding is 0
  std::vector<int16_t> q;     // int8 weights: [M, stride]; bfloat16: [M, 2 (hi, lo), stride] bits
  std::vector<float> scale;   // int8 weights: [M]
};

inline uint16_t Bf16Bits(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// The narrow rows of x [M, K], or false where x is not finite (the float path then gives
// the same inf/NaN as XLA would).
template <typename W>
bool MakeNarrowRows(const float* x, int64_t m, int64_t k, NarrowRows& out) {
  out.stride = (k + 63) / 64 * 64;
  constexpr int64_t parts = std::is_same_v<W, int8_t> ? 1 : 2;
  out.q.assign(m * parts * out.stride, 0);
  out.scale.assign(m, 1.0f);
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * k;
    float top = 0.0f;
    for (int64_t kk = 0; kk < k; ++kk) top = std::max(top, std::fabs(xi[kk]));
    if (!std::isfinite(top)) return false;
    int16_t* q = out.q.data() + i * parts * out.stride;
    if constexpr (std::is_same_v<W, int8_t>) {
      if (top > 0.0f) out.scale[i] = top / 32767.0f;
      const float inv = 1.0f / out.scale[i];
      for (int64_t kk = 0; kk < k; ++kk)
        q[kk] = static_cast<int16_t>(std::clamp(std::nearbyint(xi[kk] * inv), -32767.0f, 32767.0f));
    } else {
      for (int64_t kk = 0; kk < k; ++kk) {
        const uint16_t hi = Bf16Bits(xi[kk]);
        q[kk] = static_cast<int16_t>(hi);
        q[out.stride + kk] = static_cast<int16_t>(Bf16Bits(xi[kk] - Wide(hi)));
      }
    }
  }
  return true;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define JAXGEN_AVX512 1
#endif
#if !defined(JAXGEN_AVX512) && defined(__AVX2__) && defined(__FMA__)
#define JAXGEN_AVX2_TILES 1  // float32 and bfloat16 weights in tiles: KnTile with 8 lanes
#endif

#if defined(JAXGEN_AVX512) || defined(JAXGEN_AVX2_TILES)
// Register-tiled kernels for AVX-512 and AVX2 CPUs. The portable loops above leave the
// compiler to keep sums in memory (L1) and to widen through a buffer; here a tile of sums
// lives in registers and each widened weight vector serves every activation row of the
// tile, so the loads are the weight stream and little else (measured in
// benchmarks/RESULTS.md: "A register-tiled AVX-512 kernel", and "Register tiles on AVX2").
// Fully unrolled tile loops: without it GCC 12 keeps the sums in a stack array and stores
// every one of them on every step (one core, 5 activation rows: 3.6 -> 5.5 GB/s of int8).
#define JAXGEN_UNROLL _Pragma("GCC unroll 16")

constexpr int64_t kRowBlock = kTileRows;  // [K, N] tiles: weight rows per sweep of the columns
constexpr int64_t kPrefetchBytes = 32768;  // how far ahead in the weight stream to fetch
constexpr int64_t kGemmBytes = 128 << 10;  // [K, N]: a task's sums past this size: a GEMM's order
constexpr int64_t kSplitMaxRows = 6;  // [K, N] with at most this many activation rows: split by rows

#ifdef JAXGEN_AVX512
// One vector of float32 lanes and what KnTile does with it: 16 lanes, any count of them
// (masked), so that the plain layout's ragged last columns take the same kernel.
struct Vec {
  using F = __m512;
  using Mask = __mmask16;
  static constexpr int kLanes = 16;
  static constexpr bool kMasked = true;  // a row's ragged end takes masked loads
  static float Sum(F v) { return _mm512_reduce_add_ps(v); }
  static Mask First(int64_t count) {  // the first min(count, 16) lanes
    return count >= 16 ? Mask(0xFFFF) : Mask((1u << std::max<int64_t>(count, 0)) - 1);
  }
  static F Zero() { return _mm512_setzero_ps(); }
  static F Set1(float v) { return _mm512_set1_ps(v); }
  static F Fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F Mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static void Store(float* p, Mask mask, F v) { _mm512_mask_storeu_ps(p, mask, v); }
  // 16 weights (those under `mask`; the rest 0) as float32 lanes.
  static F Load(const float* p, Mask mask) { return _mm512_maskz_loadu_ps(mask, p); }
  static F Load(const int8_t* p, Mask mask) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
  }
  static F Load(const uint16_t* p, Mask mask) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
  }
};
#else
// 8 lanes, always all of them: AVX2 has no masked widening loads. KnTile is called here on
// whole vectors only (KnRange sums a plain layout's ragged columns in KnTail), NkTile sums
// a row's ragged end one by one.
struct Vec {
  using F = __m256;
  struct Mask {};
  static constexpr int kLanes = 8;
  static constexpr bool kMasked = false;  // a row's ragged end is summed one by one
  static Mask First(int64_t) { return {}; }
  static float Sum(F v) {  // the lanes in a fixed order: halves, then pairs, then the last two
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
  }
  static F Zero() { return _mm256_setzero_ps(); }
  static F Set1(float v) { return _mm256_set1_ps(v); }
  static F Fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F Mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static void Store(float* p, Mask, F v) { _mm256_storeu_ps(p, v); }
  static F Load(const float* p, Mask) { return _mm256_loadu_ps(p); }
  static F Load(const uint16_t* p, Mask) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  }
};
#endif

// Rows k0..k1 of y[i0:i0+MB, j0:j0+cols] (+)= x [M, K] @ w [K, N], cols <= C vectors, the
// weights of row k0 from `tile` on and each next row `stride` further within a block of
// kRowBlock rows (TileAt; k0 a block's first row): one weight row's C vectors are widened
// once and multiplied into the MB x C sums held in registers.
// `start` begins the sums at 0, else they add to y; a `scale` (or nullptr) multiplies them.
// `ahead`: how far down the weights (in elements) to prefetch (0: no prefetch).
// Each sum is one chain of multiply-adds down the rows, whatever MB, C or the blocks are:
// an activation row gets the same bits in a batch of any size.
template <typename W, int C, int MB>
void KnTile(const float* x, const W* tile, int64_t stride, int64_t ahead, const float* scale, float* y, int64_t k,
            int64_t n, int64_t i0, int64_t j0, int64_t cols, int64_t k0, int64_t k1, bool start) {
  constexpr int L = Vec::kLanes;
  typename Vec::Mask mask[C];
  JAXGEN_UNROLL for (int c = 0; c < C; ++c) mask[c] = Vec::First(cols - L * c);
  typename Vec::F acc[MB][C];
  JAXGEN_UNROLL for (int i = 0; i < MB; ++i)
    JAXGEN_UNROLL for (int c = 0; c < C; ++c)
      acc[i][c] = start ? Vec::Zero() : Vec::Load(y + (i0 + i) * n + j0 + L * c, mask[c]);
  for (int64_t kk = k0; kk < k1; ++kk) {
    // Blocks of kRowBlock rows lie kRowBlock * n elements apart in both layouts.
    const int64_t r = kk - k0;
    const W* row = tile + r / kRowBlock * kRowBlock * n + r % kRowBlock * stride;
    if (ahead)
      JAXGEN_UNROLL for (int line = 0; line < C * L * static_cast<int>(sizeof(W)); line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(row + ahead) + line, _MM_HINT_T0);
    // Whichever of the weight vectors (C) or the broadcasts (MB) is fewer stays in registers
    // beside the MB x C sums: 6 x 2 on AVX2 holds 12 + 2 + 1 of 16, where holding the 6
    // broadcasts asked for 19 and GCC reloaded them (float32 at 64 rows, 512 x 512:
    // 0.94 -> 0.72 ms; a 61-token prefill of the 6 x 512 edit model ~92 -> ~60 ms). Each sum
    // still takes one multiply-add per weight row, in the same order.
    if constexpr (MB > C) {  // the C weight vectors held, one broadcast at a time
      typename Vec::F wide[C];
      JAXGEN_UNROLL for (int c = 0; c < C; ++c) wide[c] = Vec::Load(row + L * c, mask[c]);
      JAXGEN_UNROLL for (int i = 0; i < MB; ++i) {
        const typename Vec::F a = Vec::Set1(x[(i0 + i) * k + kk]);
        JAXGEN_UNROLL for (int c = 0; c < C; ++c) acc[i][c] = Vec::Fma(wide[c], a, acc[i][c]);
      }
    } else {  // the MB broadcasts held, one weight vector at a time
      typename Vec::F a[MB];
      JAXGEN_UNROLL for (int i = 0; i < MB; ++i) a[i] = Vec::Set1(x[(i0 + i) * k + kk]);
      JAXGEN_UNROLL for (int c = 0; c < C; ++c) {
        const typename Vec::F wide = Vec::Load(row + L * c, mask[c]);
        JAXGEN_UNROLL for (int i = 0; i < MB; ++i) acc[i][c] = Vec::Fma(wide, a[i], acc[i][c]);
      }
    }
  }
  JAXGEN_UNROLL for (int c = 0; c < C; ++c) {
    const typename Vec::F s = scale ? Vec::Load(scale + j0 + L * c, mask[c]) : Vec::Set1(1.0f);
    JAXGEN_UNROLL for (int i = 0; i < MB; ++i) Vec::Store(y + (i0 + i) * n + j0 + L * c, mask[c], Vec::Mul(acc[i][c], s));
  }
}

// y[i0:i0+MB, j0:j0+R] of x [M, K] @ w [N, K]^T: R weight rows, a vector of k at a time, widened
// once and multiplied into the R x MB sums; each sum is reduced across lanes at the end
// (then, without masks, the row's last K % 8 products added one by one).
template <typename W, int R, int MB>
void NkTile(const float* x, const W* w, const float* scale, float* y, int64_t k, int64_t n, int64_t i0, int64_t j0) {
  constexpr int L = Vec::kLanes;
  typename Vec::F acc[R][MB];
  JAXGEN_UNROLL for (int r = 0; r < R; ++r)
    JAXGEN_UNROLL for (int i = 0; i < MB; ++i) acc[r][i] = Vec::Zero();
  auto step = [&](int64_t kk, typename Vec::Mask mask) {
    typename Vec::F wide[R];
    JAXGEN_UNROLL for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (j0 + r) * k + kk) + kPrefetchBytes, _MM_HINT_T0);
      wide[r] = Vec::Load(w + (j0 + r) * k + kk, mask);
    }
    JAXGEN_UNROLL for (int i = 0; i < MB; ++i) {
      const typename Vec::F a = Vec::Load(x + (i0 + i) * k + kk, mask);
      JAXGEN_UNROLL for (int r = 0; r < R; ++r) acc[r][i] = Vec::Fma(wide[r], a, acc[r][i]);
    }
  };
  int64_t kk = 0;
  for (; kk + L <= k; kk += L) step(kk, Vec::First(L));
  if constexpr (Vec::kMasked)
    if (kk < k) step(kk, Vec::First(k - kk));
  JAXGEN_UNROLL for (int r = 0; r < R; ++r)
    JAXGEN_UNROLL for (int i = 0; i < MB; ++i) {
      float sum = Vec::Sum(acc[r][i]);
      if constexpr (!Vec::kMasked)
        for (int64_t t = kk; t < k; ++t) sum = std::fma(Wide(w[(j0 + r) * k + t]), x[(i0 + i) * k + t], sum);
      y[(i0 + i) * n + j0 + r] = sum * scale[j0 + r];
    }
}
#endif

#ifdef JAXGEN_AVX512
#if defined(__AVX512VNNI__) && defined(__AVX512BF16__)
#define JAXGEN_NARROW_ROWS 1  // the [N, K] head takes NarrowRows
// NkTile with narrow activations for one weight row: y[i0:i0+MB, j] of x [M, K] @ w [N, K]^T.
// One row at a time, kUnroll pieces of 32 weights per step in independent sums: the head
// is then one sequential stream, which this CPU reads at 17-19 GB/s on one core where four
// rows side by side read at 9 (measured; a software prefetch only slowed it).
constexpr int kUnroll = 2;
// Each int32 lane adds two int16 x int8 products per 32 x kUnroll weights of a row: rows of
// at most kMaxK keep it below 2^31 in the worst case (every product 32767 x 127).
static_assert(kMaxK / (32 * kUnroll) * 2 * 32767LL * 127 < (1LL << 31), "int32 sums could overflow");
template <typename W, int MB>
void NkRowNarrow(const NarrowRows& xn, const W* w, const float* scale, float* y, int64_t k, int64_t n, int64_t i0,
                 int64_t j) {
  constexpr bool kInt8 = std::is_same_v<W, int8_t>;
  const W* row = w + j * k;
  __m512 acc[kUnroll][MB];
  JAXGEN_UNROLL for (int u = 0; u < kUnroll; ++u)
    JAXGEN_UNROLL for (int i = 0; i < MB; ++i) acc[u][i] = _mm512_setzero_ps();
  __m512i sums[kUnroll][MB];  // int8 weights: exact integer sums
  JAXGEN_UNROLL for (int u = 0; u < kUnroll; ++u)
    JAXGEN_UNROLL for (int i = 0; i < MB; ++i) sums[u][i] = _mm512_setzero_si512();
  for (int64_t kk = 0; kk < k; kk += 32 * kUnroll) {
    __m512i wide[kUnroll];
    JAXGEN_UNROLL for (int u = 0; u < kUnroll; ++u) {
      const int64_t left = k - kk - 32 * u;
      const __mmask32 mask = left >= 32 ? __mmask32(~0u) : left <= 0 ? __mmask32(0) : __mmask32((1u << left) - 1);
      if constexpr (kInt8) wide[u] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, row + kk + 32 * u));
      else wide[u] = _mm512_maskz_loadu_epi16(mask, row + kk + 32 * u);
    }
    JAXGEN_UNROLL for (int i = 0; i < MB; ++i) {
      // Activation rows are padded to 32 with zeros, and masked-off weights are 0: reading
      // the padding adds nothing. (Past the padding, still within the buffer.)
      const int16_t* xi = xn.q.data() + (i0 + i) * (kInt8 ? 1 : 2) * xn.stride + kk;
      JAXGEN_UNROLL for (int u = 0; u < kUnroll; ++u) {
        const int64_t at = std::min<int64_t>(32 * u, xn.stride - kk - 32);  // stays inside the row
        const __m512i a = _mm512_loadu_si512(xi + at);
        if constexpr (kInt8) {
          sums[u][i] = _mm512_dpwssd_epi32(sums[u][i], wide[u], a);
        } else {
          const __m512i lo = _mm512_loadu_si512(xi + at + xn.stride);
          acc[u][i] = _mm512_dpbf16_ps(acc[u][i], (__m512bh)wide[u], (__m512bh)a);
          acc[u][i] = _mm512_dpbf16_ps(acc[u][i], (__m512bh)wide[u], (__m512bh)lo);
        }
      }
    }
  }
  if constexpr (kInt8) {
    JAXGEN_UNROLL for (int u = 0; u < kUnroll; ++u)
      JAXGEN_UNROLL for (int i = 0; i < MB; ++i) acc[u][i] = _mm512_cvtepi32_ps(sums[u][i]);
  }
  JAXGEN_UNROLL for (int i = 0; i < MB; ++i) {
    __m512 total = acc[0][i];
    JAXGEN_UNROLL for (int u = 1; u < kUnroll; ++u) total = _mm512_add_ps(total, acc[u][i]);
    y[(i0 + i) * n + j] = _mm512_reduce_add_ps(total) * xn.scale[i0 + i] * scale[j];
  }
}
#endif

// y[:, n0:n1] (+)= x[:, r0:r1] @ w[r0:r1, n0:n1] for [K, N] weights, times `scale` (or
// nullptr) once the last row is in: blocks of kRowBlock weight rows, each swept across the
// columns before the next, so that KnTile's prefetch runs a block ahead (a tile down all K
// rows instead: 8 GB/s here; blocks of 4, 8, 32 or 64 rows measured slower than 16).
// Tasks split the columns (r0..r1 = all of K) or, for a few activation rows, the rows
// (n0..n1 = all of N, into partial sums): each task then reads one contiguous stream,
// measured on one core at 124M shapes at 21 GB/s of int8 for 768 x 2304 and 768 x 3072,
// against 13-14 split by columns.
// With `tiles` (the "kn_tiles" layout) r0 and n0 are multiples of kRowBlock and kTileCols.
template <typename W>
void KnRange(const float* x, const W* w, bool tiles, const float* scale, float* y, int64_t m, int64_t k, int64_t n,
             int64_t r0, int64_t r1, int64_t n0, int64_t n1) {
  // The same columns ~kPrefetchBytes further down the weights, in whole blocks of rows, are
  // fetched as each row is read: the hardware does not follow a tile's n-byte strides (one
  // core, 768-row int8 matrices: 8-9 -> 14-21 GB/s, measured). Whole blocks ahead is the
  // same element offset in both layouts.
  const int64_t row_bytes = n * static_cast<int64_t>(sizeof(W));
  const int64_t blocks = (kPrefetchBytes + kRowBlock * row_bytes - 1) / (kRowBlock * row_bytes);
  const int64_t ahead = blocks * kRowBlock * n;
  const int64_t stride = tiles ? kTileCols : n;
  // Rows k0..k1 of every activation row, 64 columns at a time from column j, 6 rows at a time.
  auto row_groups = [&](int64_t j, int64_t k0, int64_t k1, int64_t fetch, const float* s, bool start) {
    RowGroups<6>(m, [&]<int MB>(int64_t i0) {
      KnTile<W, 4, MB>(x, TileAt(w, n, k0, j, tiles), stride, fetch, s, y, k, n, i0, j, std::min<int64_t>(64, n1 - j),
                       k0, k1, start);
    });
  };
  // More than one row from tiles, or many rows: a GEMM's order. Each group of 6 rows x 64
  // columns takes all of r0..r1 in registers and is stored once; the 64 columns' weights
  // (K x 64) stay in L2 across the row groups. Sweeping blocks of rows across all of y
  // instead re-read and re-wrote y once per 16 weight rows, from L3 once y outgrew L2
  // (float32 768 x 3072 at M = 512: 1.43x XLA's dot), and at 2-6 rows (verify passes) the
  // y round trips and 3 + 2 row groups made a 5-row float32 pass of the 6 x 512 edit model
  // 6.5 ms where a 1-row pass is 3.9; in this order 4.6 (a Xeon with AVX-512, RESULTS.md
  // "Verify passes in a GEMM's order"). The 3-row sweep this replaced had been chosen on a
  // Zen 4 over 64-column sweeps; this order was not measured there. Zen 1's AVX2 build
  // keeps its own measured order.
  if (m > 1 && (tiles || m * (n1 - n0) * static_cast<int64_t>(sizeof(float)) > kGemmBytes)) {
    for (int64_t j = n0; j < n1; j += 64) row_groups(j, r0, r1, ahead, scale, true);
    return;
  }
  // Float32 tiles swept block by block are one sequential stream of whole cache lines,
  // which the hardware prefetcher follows: a software prefetch per line only took load
  // slots (float32 decode, 8 x 640 to GPT-2 124M: steps 12-18% faster without it,
  // benchmarks/RESULTS.md). Narrow weights and the GEMM order keep it.
  const int64_t sweep_ahead = (tiles && sizeof(W) == 4) ? 0 : ahead;
  for (int64_t k0 = r0; k0 < r1; k0 += kRowBlock) {
    const int64_t k1 = std::min(r1, k0 + kRowBlock);
    const float* s = k1 == r1 ? scale : nullptr;
    // One row: whole 128-column tile rows (8 vectors of sums hide the multiply-add latency),
    // float32 tiles read as one sequential stream. A few rows of the plain layout take 64
    // columns and 6 rows, so that each weight is widened once for all of them.
    if (m == 1) {
      for (int64_t j = n0; j < n1; j += 128)
        KnTile<W, 8, 1>(x, TileAt(w, n, k0, j, tiles), stride, sweep_ahead, s, y, k, n, 0, j,
                        std::min<int64_t>(128, n1 - j), k0, k1, k0 == r0);
      continue;
    }
    for (int64_t j = n0; j < n1; j += 64) row_groups(j, k0, k1, sweep_ahead, s, k0 == r0);
  }
}

#endif

#if defined(__AVX2__) && !defined(JAXGEN_AVX512)
// int8 weights on AVX2 CPUs without AVX-512 (Haswell to Alder Lake, Zen 1-3): activation
// rows rounded to int16 (NarrowRows), weights sign-extended to int16 and multiplied in
// pairs by vpmaddwd, 16 products per instruction, into exact int32 sums. The float loop
// above spends an extension, a conversion and a multiply-add per 8 weights and read int8
// at 3.8-4.1 GB/s on one Zen 1 core, which streams 13.5 from memory; eight weight rows per
// sweep this way read 7.1-7.4 (benchmarks/cpu_int8_widen.cc, V5; RESULTS.md). Every
// activation row gets the same integer sums and the same float32 steps whatever M is, so
// a decode step's logits are those of its full forward pass.
#define JAXGEN_AVX2_INT8 1
// Weight rows summed in int32 before the float32 sums take them: a lane adds at most
// kIntRows products of an int16 (|q| <= 32767) and an int8.
constexpr int64_t kIntRows = 512;
static_assert(kIntRows * 32767LL * 128 < (1LL << 31), "int32 sums could overflow");

// Activations kk..kk+7 of one narrow row as four broadcast int16 pairs, (kk, kk+1) and so
// on: the operands vpmaddwd pairs with two interleaved weight rows. Past K the row's
// padding is 0.
inline void ActivationPairs(const int16_t* q, __m256i a[4]) {
  int32_t pair[4];
  std::memcpy(pair, q, sizeof pair);
  for (int p = 0; p < 4; ++p) a[p] = _mm256_set1_epi32(pair[p]);
}

// y[i0:i0+MB, n0:n1] = x @ w[K, N][:, n0:n1] * scale for int8 w and x as narrow rows
// (n1 - n0 <= kColumnChunk). Eight weight rows per sweep, interleaved in pairs byte by
// byte and widened, so that each 32-bit lane holds one column's pair; the four pairs'
// products are summed before the int32 sums are touched, and the next sweep's rows are
// fetched as this one reads: the hardware prefetcher does not follow eight streams
// n bytes apart (two Zen 1 cores, standalone: 4 rows unfetched 5.9-7.4 GB/s, 8 rows
// 7.6-8.6, 8 rows fetched 8 ahead 9.9-10.2; benchmarks/cpu_int8_widen.cc, RESULTS.md).
template <int MB>
void KnColumnsNarrow(const NarrowRows& xn, const ColumnRows<int8_t>& w, const float* scale, float* y, int64_t n,
                     int64_t n1, int64_t i0) {
  constexpr int kRows = 8;
  const int64_t n0 = w.n0, width = n1 - n0, whole = width / 16 * 16;
  alignas(32) int32_t sums[MB][kColumnChunk];
  const int16_t* q[MB];
  for (int i = 0; i < MB; ++i) q[i] = xn.q.data() + (i0 + i) * xn.stride;
  for (int64_t kb = 0; kb < w.k; kb += kIntRows) {
    for (int i = 0; i < MB; ++i) std::fill(sums[i], sums[i] + width, 0);
    for (int64_t kk = kb; kk < std::min(w.k, kb + kIntRows); kk += kRows) {
      const int8_t *r[kRows], *next[kRows];
      w.template Rows<kRows>(kk, r);
      w.template Rows<kRows>(std::min(kk + kRows, w.k - 1), next);
      __m256i a[MB][kRows / 2];
      for (int i = 0; i < MB; ++i) ActivationPairs(q[i] + kk, a[i]);
      for (int64_t j = 0; j < whole; j += 16) {
        if (j % 64 == 0)
          for (int p = 0; p < kRows; ++p) _mm_prefetch(reinterpret_cast<const char*>(next[p] + j), _MM_HINT_T0);
        __m256i lo[kRows / 2], hi[kRows / 2];  // columns j..j+7 and j+8..j+15 of each pair of rows
        for (int p = 0; p < kRows / 2; ++p) {
          const __m128i b0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[2 * p] + j));
          const __m128i b1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[2 * p + 1] + j));
          lo[p] = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(b0, b1));
          hi[p] = _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(b0, b1));
        }
        for (int i = 0; i < MB; ++i) {
          __m256i sum_lo = _mm256_madd_epi16(lo[0], a[i][0]), sum_hi = _mm256_madd_epi16(hi[0], a[i][0]);
          for (int p = 1; p < kRows / 2; ++p) {
            sum_lo = _mm256_add_epi32(sum_lo, _mm256_madd_epi16(lo[p], a[i][p]));
            sum_hi = _mm256_add_epi32(sum_hi, _mm256_madd_epi16(hi[p], a[i][p]));
          }
          __m256i* c = reinterpret_cast<__m256i*>(sums[i] + j);
          c[0] = _mm256_add_epi32(c[0], sum_lo);
          c[1] = _mm256_add_epi32(c[1], sum_hi);
        }
      }
      for (int i = 0; i < MB; ++i)  // a ragged last piece: the same integer sums
        for (int64_t j = whole; j < width; ++j)
          for (int p = 0; p < kRows; ++p) sums[i][j] += q[i][kk + p] * r[p][j];
    }
    for (int i = 0; i < MB; ++i) {
      float* out = y + (i0 + i) * n + n0;
      if (kb == 0) std::copy(sums[i], sums[i] + width, out);  // int32 -> float32
      else
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) out[j] += static_cast<float>(sums[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    float* out = y + (i0 + i) * n + n0;
    const float row_scale = xn.scale[i0 + i];
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) out[j] = out[j] * row_scale * scale[n0 + j];
  }
}

// y[i0:i0+MB, j] of x [M, K] @ w [N, K]^T for int8 w and x as narrow rows: 64 weights per
// step, widened once for the MB rows, into four independent sums (each int32 lane then
// adds at most kMaxK / 32 products), added as float32 at the end.
static_assert(kMaxK / 32 * 32767LL * 128 < (1LL << 31), "int32 sums could overflow");
template <int MB>
void NkRowNarrow(const NarrowRows& xn, const int8_t* w, const float* scale, float* y, int64_t k, int64_t n,
                 int64_t i0, int64_t j) {
  const int8_t* row = w + j * k;
  __m256i sums[MB][4];
  for (int i = 0; i < MB; ++i)
    for (int u = 0; u < 4; ++u) sums[i][u] = _mm256_setzero_si256();
  alignas(16) int8_t last[64];
  for (int64_t kk = 0; kk < k; kk += 64) {
    const int8_t* piece = row + kk;
    if (k - kk < 64) {  // the row's end, padded with zeros (the activations' padding is 0 too)
      std::memset(last, 0, sizeof last);
      std::memcpy(last, piece, k - kk);
      piece = last;
    }
    __m256i wide[4];
    for (int u = 0; u < 4; ++u)
      wide[u] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(piece + 16 * u)));
    for (int i = 0; i < MB; ++i) {
      const int16_t* q = xn.q.data() + (i0 + i) * xn.stride + kk;
      for (int u = 0; u < 4; ++u)
        sums[i][u] = _mm256_add_epi32(
            sums[i][u], _mm256_madd_epi16(wide[u], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 16 * u))));
    }
  }
  for (int i = 0; i < MB; ++i) {
    __m256 total = _mm256_cvtepi32_ps(sums[i][0]);
    for (int u = 1; u < 4; ++u) total = _mm256_add_ps(total, _mm256_cvtepi32_ps(sums[i][u]));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, total);
    float dot = 0.0f;
    for (float lane : lanes) dot += lane;
    y[(i0 + i) * n + j] = dot * xn.scale[i0 + i] * scale[j];
  }
}
#endif

#ifdef JAXGEN_AVX2_TILES
// KnTile for columns j0..j1 of fewer than 8 (the plain layout's ragged end), one lane at a
// time: the same chain of multiply-adds (std::fma rounds once, as the vector's does).
template <typename W, int MB>
void KnTail(const float* x, const W* w, const float* scale, float* y, int64_t k, int64_t n, int64_t i0,
            int64_t j0, int64_t j1, int64_t k0, int64_t k1, bool start) {
  for (int i = 0; i < MB; ++i)
    for (int64_t j = j0; j < j1; ++j) {
      float acc = start ? 0.0f : y[(i0 + i) * n + j];
      for (int64_t kk = k0; kk < k1; ++kk) acc = std::fma(Wide(w[kk * n + j]), x[(i0 + i) * k + kk], acc);
      y[(i0 + i) * n + j] = scale ? acc * scale[j] : acc;
    }
}

// y[:, n0:n1] (+)= x[:, r0:r1] @ w[r0:r1, n0:n1] for float32 or bfloat16 [K, N] weights on
// AVX2, times `scale` (or nullptr) once the last row is in: the AVX-512 KnRange's contract
// (r0 a multiple of kRowBlock; with `tiles`, n0 and n1 multiples of kTileCols), in KnTile's
// register tiles: 16 registers hold MB x C vectors of sums, C weight vectors per row and MB
// broadcast activations, so the tile narrows as the rows grow (1 x 8, 3 x 4, 6 x 2). A few
// activation rows sweep each block of kRowBlock weight rows across the columns (one
// sequential stream of tiles); many rows take a GEMM's order, as on AVX-512 (KnRange).
// Both orders give each sum the same chain down r0..r1, so tiles and the plain layout
// agree bit for bit, and an activation row's sums here do not depend on M.
template <typename W>
void KnRange(const float* x, const W* w, bool tiles, const float* scale, float* y, int64_t m, int64_t k, int64_t n,
             int64_t r0, int64_t r1, int64_t n0, int64_t n1) {
  const int64_t stride = tiles ? kTileCols : n;
  // The same columns ~kPrefetchBytes further down, in whole blocks of rows, fetched as each
  // row is read (as on AVX-512). Unlike there, float32 tiles need it too on Zen 1: a
  // streamed 512 x 1408 matrix at 5 rows took 0.435 ms without, 0.244 with (RESULTS.md).
  const int64_t row_bytes = n * static_cast<int64_t>(sizeof(W));
  const int64_t ahead = (kPrefetchBytes + kRowBlock * row_bytes - 1) / (kRowBlock * row_bytes) * kRowBlock * n;
  // Rows k0..k1 of activation rows i0.. (MB of them) over columns j0..j1.
  auto columns = [&]<int MB>(int64_t i0, int64_t j0, int64_t j1, int64_t k0, int64_t k1, const float* s,
                             bool start) {
    constexpr int C = MB == 1 ? 8 : MB <= 3 ? 4 : 2;
    auto tile = [&]<int CC>(int64_t j) {
      KnTile<W, CC, MB>(x, TileAt(w, n, k0, j, tiles), stride, ahead, s, y, k, n, i0, j, CC * Vec::kLanes, k0, k1,
                        start);
    };
    int64_t j = j0;
    for (; j + C * Vec::kLanes <= j1; j += C * Vec::kLanes) tile.template operator()<C>(j);
    for (; j + Vec::kLanes <= j1; j += Vec::kLanes) tile.template operator()<1>(j);
    if (j < j1) KnTail<W, MB>(x, w, s, y, k, n, i0, j, j1, k0, k1, start);  // plain layout only
  };
  if (m > 1 && m * (n1 - n0) * static_cast<int64_t>(sizeof(float)) > kGemmBytes) {
    ByTileColumns(tiles, n0, n1, [&](int64_t c0, int64_t c1) {
      for (int64_t j = c0; j < c1; j += 2 * Vec::kLanes)  // the 6 x 2 tile's width: K x 16 weights stay in L2
        RowGroups<6>(m, [&]<int MB>(int64_t i0) {
          columns.template operator()<MB>(i0, j, std::min(c1, j + 2 * Vec::kLanes), r0, r1, scale, true);
        });
    });
    return;
  }
  for (int64_t k0 = r0; k0 < r1; k0 += kRowBlock) {
    const int64_t k1 = std::min(r1, k0 + kRowBlock);
    const float* s = k1 == r1 ? scale : nullptr;
    ByTileColumns(tiles, n0, n1, [&](int64_t c0, int64_t c1) {
      RowGroups<6>(m, [&]<int MB>(int64_t i0) { columns.template operator()<MB>(i0, c0, c1, k0, k1, s, k0 == r0); });
    });
  }
}
#endif

#if defined(JAXGEN_AVX512) || defined(JAXGEN_AVX2_TILES)
// y[:, n0:n1] of x [M, K] @ w [N, K]^T (the head): four weight rows at a time, each read
// as one stream, times up to kNkRows activation rows in registers (4 x 4 vectors of sums
// on AVX-512; 4 x 3 of AVX2's 16 registers, with the 4 weight vectors: 4 x 2 read the rows
// of a 5-row verify pass three times, 4096 x 512 head 0.95 -> 0.86 ms, 8 rows 1.24 ->
// 1.04); int8 rows on AVX-512 take NkRowNarrow.
constexpr int kNkRows = Vec::kLanes == 16 ? 4 : 3;
template <typename W>
void NkRowsTiled(const float* x, const NarrowRows* narrow, const W* w, const float* scale, float* y, int64_t m, int64_t k,
                 int64_t n, int64_t n0, int64_t n1) {
  auto rows = [&]<int R>(int64_t j) {
#ifdef JAXGEN_NARROW_ROWS
    if (narrow != nullptr) {
      const NarrowRows& xn = *narrow;
      for (int64_t r = 0; r < R; ++r)
        RowGroups<4>(m, [&]<int MB>(int64_t i0) { NkRowNarrow<W, MB>(xn, w, scale, y, k, n, i0, j + r); });
      return;
    }
#endif
    RowGroups<kNkRows>(m, [&]<int MB>(int64_t i0) { NkTile<W, R, MB>(x, w, scale, y, k, n, i0, j); });
  };
  int64_t j = n0;
  for (; j + 4 <= n1; j += 4) rows.template operator()<4>(j);
  for (; j < n1; ++j) rows.template operator()<1>(j);
}
#endif

// Whether weights W take the register-tiled kernels in this build (KnRange for [K, N],
// plain or tiles; NkRowsTiled for [N, K]): every dtype on AVX-512, float32 and bfloat16
// on AVX2 (int8 there takes int16 rows).
template <typename W>
constexpr bool RegisterTiles() {
#if defined(JAXGEN_AVX512)
  return true;
#elif defined(JAXGEN_AVX2_TILES)
  return !std::is_same_v<W, int8_t>;
#else
  return false;
#endif
}

// Whether weights W in a [K, N] (`kn`, plain or tiles) or [N, K] layout multiply
// activation rows as NarrowRows in this build: the AVX-512 head (int8 and bfloat16), every
// int8 layout on the AVX2 build.
template <typename W>
constexpr bool TakesNarrowRows(bool kn) {
#if defined(JAXGEN_NARROW_ROWS)
  return !kn && !std::is_same_v<W, float>;
#elif defined(JAXGEN_AVX2_INT8)
  return std::is_same_v<W, int8_t>;
#else
  return false;
#endif
}

enum class Layout { kKn, kNk, kKnTiles };

template <ffi::DataType T, Layout L>
ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> w, ffi::Buffer<ffi::F32> scale,
                  ffi::ResultBuffer<ffi::F32> y) {
  using W = std::conditional_t<T == ffi::S8, int8_t, std::conditional_t<T == ffi::F32, float, uint16_t>>;
  constexpr bool kKn = L != Layout::kNk, kTiles = L == Layout::kKnTiles;
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("weight_matmul: 2-d operands only");
  const int64_t m = xd[0], k = xd[1], n = kKn ? wd[1] : wd[0];
  if ((kKn ? wd[0] : wd[1]) != k) return ffi::Error::InvalidArgument("weight_matmul: contracted sizes differ");
  if (!kKn && k > kMaxK) return ffi::Error::InvalidArgument("weight_matmul: rows longer than 16384");
  if (kTiles && (k % kTileRows != 0 || n % kTileCols != 0))
    return ffi::Error::InvalidArgument("weight_matmul: tiles need K % 16 == 0 and N % 128 == 0");
  const float* xp = x.typed_data();
  const W* wp = reinterpret_cast<const W*>(w.untyped_data());
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  constexpr bool kTiled = kKn && RegisterTiles<W>();
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
#if defined(JAXGEN_AVX512) || defined(JAXGEN_AVX2_TILES)
  // [K, N] in register tiles: rows or columns in equal pieces, one per thread: each thread
  // then reads one stream (512-column tasks left one of two threads idle for a third of a
  // 768-wide projection; two pieces per thread measured slower). A few activation rows
  // split the weight rows, so that each task reads one contiguous stream, and the partial
  // sums are added here: an activation row gets the same bits in any batch of up to
  // kSplitMaxRows rows (decode steps, verify passes), and in any batch above it.
  if constexpr (kTiled)
    if (m <= kSplitMaxRows) {
      const int64_t rows = ((k + threads - 1) / threads + kRowBlock - 1) / kRowBlock * kRowBlock;
      const int64_t tasks = (k + rows - 1) / rows;
      std::vector<float> partial(tasks * m * n);
      float* pp = partial.data();
      Parallel(pool, tasks, static_cast<int64_t>(w.size_bytes()), [=](int64_t t) {
        KnRange(xp, wp, kTiles, nullptr, pp + t * m * n, m, k, n, t * rows, std::min(k, (t + 1) * rows), 0, n);
      });
      for (int64_t i = 0; i < m; ++i) {
        float* out = yp + i * n;
        std::copy(pp + i * n, pp + (i + 1) * n, out);
        for (int64_t t = 1; t < tasks; ++t) {
          const float* part = pp + (t * m + i) * n;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) out[j] += part[j];
        }
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) out[j] *= sp[j];
      }
      return ffi::Error::Success();
    }
#endif
  // [K, N] otherwise: register tiles in one equal piece per thread; the portable loops in
  // pieces of at most kColumnChunk columns (their sums' buffer), as many for each thread.
  // [N, K]: kRowChunk weight rows per task.
  const int64_t align = kTiles ? kTileCols : 16;
  const int64_t rounds = kTiled ? 1 : (n + threads * kColumnChunk - 1) / (threads * kColumnChunk);
  const int64_t chunk = kKn ? ((n + threads * rounds - 1) / (threads * rounds) + align - 1) / align * align : kRowChunk;
  const int64_t count = (n + chunk - 1) / chunk;
  // Activation rows as NarrowRows for the kernels that take them (int8 on the AVX2 build;
  // the AVX-512 head), unless a row is not finite.
  const NarrowRows* narrow = nullptr;
  NarrowRows rows;
  constexpr bool kNarrow = TakesNarrowRows<W>(kKn);
  if constexpr (kNarrow)
    if (MakeNarrowRows<W>(xp, m, k, rows)) narrow = &rows;
  Parallel(pool, count, static_cast<int64_t>(w.size_bytes()), [=](int64_t t) {
    const int64_t n0 = t * chunk, n1 = std::min(n, n0 + chunk);
#if defined(JAXGEN_AVX512) || defined(JAXGEN_AVX2_TILES)
    if constexpr (RegisterTiles<W>()) {
      if constexpr (kKn) KnRange(xp, wp, kTiles, sp, yp, m, k, n, 0, k, n0, n1);
      else NkRowsTiled(xp, narrow, wp, sp, yp, m, k, n, n0, n1);
      return;
    }
#endif
#ifndef JAXGEN_AVX512
    if constexpr (kKn) {
      ByTileColumns(kTiles, n0, n1, [&](int64_t c0, int64_t c1) {
        const ColumnRows<W> columns{wp, kTiles, k, n, c0};
#ifdef JAXGEN_AVX2_INT8
        if constexpr (kNarrow)
          if (narrow != nullptr)
            return RowGroups<4>(m, [&]<int MB>(int64_t i0) { KnColumnsNarrow<MB>(*narrow, columns, sp, yp, n, c1, i0); });
#endif
        KnColumns(xp, columns, sp, yp, m, n, c1);
      });
    } else {
#ifdef JAXGEN_AVX2_INT8
      if constexpr (kNarrow)
        if (narrow != nullptr) {
          for (int64_t j = n0; j < n1; ++j)
            RowGroups<2>(m, [&]<int MB>(int64_t i0) { NkRowNarrow<MB>(*narrow, wp, sp, yp, k, n, i0, j); });
          return;
        }
#endif
      NkRows(xp, wp, sp, yp, m, k, n, n0, n1);
    }
#endif
  });
  return ffi::Error::Success();
}

}  // namespace

#define JAXGEN_MATMUL(name, dtype, layout)                              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, (Matmul<dtype, layout>),          \
                                ffi::Ffi::Bind()                        \
                                    .Ctx<ffi::ThreadPool>()             \
                                    .Arg<ffi::Buffer<ffi::F32>>()       \
                                    .Arg<ffi::Buffer<dtype>>()          \
                                    .Arg<ffi::Buffer<ffi::F32>>()       \
                                    .Ret<ffi::Buffer<ffi::F32>>());

JAXGEN_MATMUL(JaxgenMatmulKnS8, ffi::S8, Layout::kKn)
JAXGEN_MATMUL(JaxgenMatmulNkS8, ffi::S8, Layout::kNk)
JAXGEN_MATMUL(JaxgenMatmulKnTilesS8, ffi::S8, Layout::kKnTiles)
JAXGEN_MATMUL(JaxgenMatmulKnBF16, ffi::BF16, Layout::kKn)
JAXGEN_MATMUL(JaxgenMatmulNkBF16, ffi::BF16, Layout::kNk)
JAXGEN_MATMUL(JaxgenMatmulKnTilesBF16, ffi::BF16, Layout::kKnTiles)
JAXGEN_MATMUL(JaxgenMatmulKnF32, ffi::F32, Layout::kKn)
JAXGEN_MATMUL(JaxgenMatmulNkF32, ffi::F32, Layout::kNk)
JAXGEN_MATMUL(JaxgenMatmulKnTilesF32, ffi::F32, Layout::kKnTiles)

// Whether this build has register-tiled kernels (1: AVX-512, and float32 and bfloat16 on
// AVX2) or the portable loops only (0): where serving stores the "kn_tiles" layout
// (jaxgen/model/quant.py; every build reads it) and a float32 head scoring a few rows
// takes the kernel instead of XLA's dot (the portable loops were slower there, RESULTS.md).
extern "C" int JaxgenTiledKernels() {
#if defined(JAXGEN_AVX512) || defined(JAXGEN_AVX2_TILES)
  return 1;
#else
  return 0;
#endif
}

// Which layouts of int8 weights multiply activation rows rounded to int16 (NarrowRows) in
// this build: bit 0 [K, N] (plain and tiles), bit 1 [N, K]. Tests bound their results by
// that rounding (jaxgen/runtime/cpu_kernels.py, rounds_activations).
extern "C" int JaxgenInt16Activations() {
  return (TakesNarrowRows<int8_t>(true) ? 1 : 0) | (TakesNarrowRows<int8_t>(false) ? 2 : 0);
}
