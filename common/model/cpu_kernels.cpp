// The CPU engine's kernels (common/model/cpu_kernels.py loads them; bench/results/cpu_kernels.md
// measures each against what it replaces):
//   matrix-vector products  a decode step's linears: y[m, n] = sum_k x[m, k] * w[n, k] for a few rows of
//                           x (a batch's decode rows, up to mn_gemv_max_rows) against a weight stored
//                           [N, K] row-major (nn.Linear's [out, in]);
//   GEMM                    a prefill chunk's linears, the same product for many rows of x (AVX2 builds);
//   decode attention        one query per sequence against its keys where they lie in the paged cache;
//   elementwise steps       RMSNorm, RoPE, SiLU-and-multiply of a few rows, with the eager roundings;
//   chunk attention         a prefill chunk against every key it sees: bfloat16 on vdpbf16ps (AVX512-BF16),
//                           float32 and bfloat16 on float32 multiply-adds (AVX2 builds);
//   decode layers           a decode step through all the layers of a stage in one call.
//
// Matrix-vector products. At decode a linear reads its whole weight for a handful of activations, so
// it can go no faster than the weight streams from memory. torch's CPU kernels for that shape (MKL /
// oneDNN through F.linear) reach 10-17 GB/s here where a plain read of the same bytes reaches 35-55.
// This kernel streams each thread's contiguous block of rows once, front to back, each row loaded once
// and multiplied with every row of x, products accumulated in float32 (bfloat16 rows: each pair of
// products exact in float32, as the vdpbf16ps instruction computes them), the bfloat16 result rounded
// to nearest-even once, as torch rounds its float32 accumulator (or not at all: the LM head's
// variant). Only the order of the sum differs from torch's kernels, so results agree to rounding, not
// bitwise.
//
// Compiled by common/model/cpu_kernels.py on the machine that runs it (-march=native): the AVX-512 paths
// where the compiler targets them, AVX2 (with FMA) paths on machines without AVX-512, portable loops
// the compiler vectorises (OpenMP simd) elsewhere (no attention kernels there). The attention kernels
// and the one-call decode step are written once on a 16-lane float32 type (`vf`: one AVX-512 register
// or two AVX2 ones). Threads: OpenMP, the runtime torch itself loaded
// (libgomp.so.1 is resolved to the loaded one), so torch.set_num_threads applies here too.
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(MN_CHUNK_PHASES)
#include <x86intrin.h>             // __rdtsc: the profiling build's phase ticks
#endif

namespace {

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {           // round to nearest even, as torch's conversion
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);   // a NaN stays a NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

inline void store(float* y, float v) { *y = v; }
inline void store(uint16_t* y, float v) { *y = f32_to_bf16(v); }

// ---- portable: one row of w at a time, the compiler vectorises the reduction ----------------------
template <typename T>
inline float load(const T* p, int64_t k);
template <>
inline float load<float>(const float* p, int64_t k) { return p[k]; }
template <>
inline float load<uint16_t>(const uint16_t* p, int64_t k) { return bf16_to_f32(p[k]); }

template <typename T, int M, typename Y>
void rows_portable(const T* x, int64_t ldx, const T* w, int64_t ldw, Y* y, int64_t ldy, int64_t r0,
                   int64_t r1, int64_t K) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* wr = w + r * ldw;
    for (int m = 0; m < M; ++m) {
      const T* xm = x + m * ldx;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < K; ++k) acc += load(xm, k) * load(wr, k);
      store(y + m * ldy + r, acc);
    }
  }
}

#if defined(__AVX512F__)
// ---- AVX-512: four rows of w per pass, every row of x against each ------------------------------
struct F32 {                                     // 16 floats a step
  using T = float;
  using V = __m512;
  static constexpr int64_t STEP = 16;
  static V load(const T* p) { return _mm512_loadu_ps(p); }
  static V load_tail(const T* p, int64_t n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
  static __m512 fma(__m512 acc, V x, V w) { return _mm512_fmadd_ps(x, w, acc); }
};

#if defined(__AVX512BF16__)
struct BF16 {                                    // 32 bfloat16 a step, products summed in pairs
  using T = uint16_t;
  using V = __m512i;
  static constexpr int64_t STEP = 32;
  static V load(const T* p) { return _mm512_loadu_si512(p); }
  static V load_tail(const T* p, int64_t n) { return _mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p); }
  static __m512 fma(__m512 acc, V x, V w) { return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w); }
};
#define MN_BF16_ISA "avx512_bf16"
#elif defined(__AVX512BW__)
struct BF16 {                                    // 16 bfloat16 a step, widened to float32
  using T = uint16_t;
  using V = __m512;
  static constexpr int64_t STEP = 16;
  static V widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static V load(const T* p) { return widen(_mm256_loadu_si256((const __m256i*)p)); }
  static V load_tail(const T* p, int64_t n) { return widen(_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p)); }
  static __m512 fma(__m512 acc, V x, V w) { return _mm512_fmadd_ps(x, w, acc); }
};
#define MN_BF16_ISA "avx512"
#endif

template <typename P, int M, typename Y>
void rows_avx512(const typename P::T* x, int64_t ldx, const typename P::T* w, int64_t ldw, Y* y,
                 int64_t ldy, int64_t r0, int64_t r1, int64_t K) {
  // One row of w at a time, front to back: a thread's block of rows is one sequential stream, which
  // the hardware prefetcher follows (four rows at a time, four streams, read half as fast here).
  // Four accumulators per row of x hide the multiply-add latency.
  const int64_t body = K - K % P::STEP, tail = K % P::STEP;
  for (int64_t r = r0; r < r1; ++r) {
    __m512 acc[M][4];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
    const typename P::T* wr = w + r * ldw;
    int64_t k = 0;
    for (; k + 4 * P::STEP <= body; k += 4 * P::STEP) {
      typename P::V wv[4];
      for (int j = 0; j < 4; ++j) wv[j] = P::load(wr + k + j * P::STEP);
      for (int m = 0; m < M; ++m)
        for (int j = 0; j < 4; ++j) acc[m][j] = P::fma(acc[m][j], P::load(x + m * ldx + k + j * P::STEP), wv[j]);
    }
    for (; k < body; k += P::STEP) {
      typename P::V wv = P::load(wr + k);
      for (int m = 0; m < M; ++m) acc[m][0] = P::fma(acc[m][0], P::load(x + m * ldx + k), wv);
    }
    if (tail) {
      typename P::V wv = P::load_tail(wr + body, tail);
      for (int m = 0; m < M; ++m) acc[m][1] = P::fma(acc[m][1], P::load_tail(x + m * ldx + body, tail), wv);
    }
    for (int m = 0; m < M; ++m)
      store(y + m * ldy + r, _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]),
                                                                 _mm512_add_ps(acc[m][2], acc[m][3]))));
  }
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// ---- AVX2: 8 lanes, 16 registers ----------------------------------------------------------------
// (the 8-lane helpers here serve the AVX2 attention kernels below too)
inline __m256i lanes_below(int64_t n) {          // all ones in lanes i < n of 8
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)std::min<int64_t>(std::max<int64_t>(n, 0), 8)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline __m256 widen8(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
inline __m256 widen8(const uint16_t* p) { return widen8(_mm_loadu_si128((const __m128i*)p)); }
inline float hsum8(__m256 a) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

inline __m256 maskload8(const float* p, int64_t n) { return _mm256_maskload_ps(p, lanes_below(n)); }   // lanes >= n 0
#define MN_AVX2_GEMV 1

// float32: one row of w a pass, A accumulators per row of x (A = 4 for one or two rows of x: the
// multiply-add latency is 4 cycles and two issue a cycle, so two accumulators held one row to a
// quarter of the adds it could issue; A = 2 from three rows, 16 registers).
template <int M, int A, typename Y>
void rows_avx2_f32(const float* x, int64_t ldx, const float* w, int64_t ldw, Y* y, int64_t ldy, int64_t r0,
                   int64_t r1, int64_t K) {
  const int64_t body = K - K % 8, tail = K % 8;
  for (int64_t r = r0; r < r1; ++r) {
    __m256 acc[M][A];
    for (int m = 0; m < M; ++m)
      for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
    const float* wr = w + r * ldw;
    int64_t k = 0;
    for (; k + 8 * A <= body; k += 8 * A)
      for (int a = 0; a < A; ++a) {
        const __m256 wv = _mm256_loadu_ps(wr + k + 8 * a);
        for (int m = 0; m < M; ++m) acc[m][a] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * ldx + k + 8 * a), wv, acc[m][a]);
      }
    for (; k < body; k += 8) {
      const __m256 wv = _mm256_loadu_ps(wr + k);
      for (int m = 0; m < M; ++m) acc[m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * ldx + k), wv, acc[m][0]);
    }
    if (tail) {
      const __m256 wv = maskload8(wr + body, tail);
      for (int m = 0; m < M; ++m) acc[m][1] = _mm256_fmadd_ps(maskload8(x + m * ldx + body, tail), wv, acc[m][1]);
    }
    for (int m = 0; m < M; ++m) {
      __m256 s = _mm256_add_ps(acc[m][0], acc[m][1]);
      if constexpr (A == 4) s = _mm256_add_ps(s, _mm256_add_ps(acc[m][2], acc[m][3]));
      store(y + m * ldy + r, hsum8(s));
    }
  }
}

// bfloat16: a 256-bit load holds 16 weights, a pair in each 32-bit lane; the even one of a pair becomes
// its float32 by a shift left, the odd one by clearing the low half (one integer operation per 8
// weights, where widening 8 through vpmovzxwd took a shuffle and a shift). x is split once per call
// into its even and odd elements in float32 (xs: [M][K16 / 2 even | K16 / 2 odd], K16 = K rounded down
// to 16), so the loop multiplies even weights by even elements and odd by odd. 2 * U accumulators per
// row of x (8 for one or two rows of x, 16 registers). The products are exact in float32; the last
// K % 16 elements are summed in scalar after the vector sums.
// The weights' lines are prefetched this many bytes ahead of the loads (bfloat16, one or two rows of
// x): the loop's widening leaves its loads too far apart for the hardware prefetcher alone to keep the
// stream in flight (development A/Bs, all the model's decode linears, 269 MB cold: 1.05-1.10x at 1,024
// or 1,536 bytes ahead for one row, 1.08x for two; 1.02-1.04x at 512 or 2,048, none at 3,072). With 3
// or 4 rows, whose loop has twice the loads to issue, it cost 6-8%; float32's loop, half the work a
// byte, was 4-7% slower with it.
constexpr int64_t GEMV_BF16_AHEAD = 1024;

template <int M, int U, typename Y>
void rows_avx2_bf16(const float* xs, const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw, Y* y,
                    int64_t ldy, int64_t r0, int64_t r1, int64_t K) {
  const int64_t k16 = K - K % 16, half = k16 / 2;
  const __m256i odd = _mm256_set1_epi32((int)0xffff0000u);
  for (int64_t r = r0; r < r1; ++r) {
    __m256 acc[M][2 * U];
    for (int m = 0; m < M; ++m)
      for (int a = 0; a < 2 * U; ++a) acc[m][a] = _mm256_setzero_ps();
    const uint16_t* wr = w + r * ldw;
    int64_t k = 0;
    for (; k + 16 * U <= k16; k += 16 * U)
      for (int u = 0; u < U; ++u) {
        if (U > 1 && u % 2 == 0)                 // one a line (32 weights); 1-2 rows of x only
          _mm_prefetch((const char*)(wr + k + 16 * u) + GEMV_BF16_AHEAD, _MM_HINT_T0);
        const __m256i wv = _mm256_loadu_si256((const __m256i*)(wr + k + 16 * u));
        const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
        const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(wv, odd));
        for (int m = 0; m < M; ++m) {
          const float* xe = xs + m * k16 + (k + 16 * u) / 2;
          acc[m][2 * u] = _mm256_fmadd_ps(_mm256_loadu_ps(xe), we, acc[m][2 * u]);
          acc[m][2 * u + 1] = _mm256_fmadd_ps(_mm256_loadu_ps(xe + half), wo, acc[m][2 * u + 1]);
        }
      }
    for (; k < k16; k += 16) {
      const __m256i wv = _mm256_loadu_si256((const __m256i*)(wr + k));
      const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
      const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(wv, odd));
      for (int m = 0; m < M; ++m) {
        const float* xe = xs + m * k16 + k / 2;
        acc[m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xe), we, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xe + half), wo, acc[m][1]);
      }
    }
    for (int m = 0; m < M; ++m) {
      __m256 s = _mm256_add_ps(acc[m][0], acc[m][1]);
      for (int a = 2; a < 2 * U; a += 2) s = _mm256_add_ps(s, _mm256_add_ps(acc[m][a], acc[m][a + 1]));
      float v = hsum8(s);
      for (int64_t j = k16; j < K; ++j) v += bf16_to_f32(x[m * ldx + j]) * bf16_to_f32(wr[j]);
      store(y + m * ldy + r, v);
    }
  }
}

// x's rows split for rows_avx2_bf16, in a buffer of the calling thread's (its team reads it).
// The split is 64-byte aligned: the loop loads it 32 bytes at a time, and a vector's 16-byte alignment
// left those loads straddling cache lines in some processes and not others (4 rows of x: up to 1.26x).
inline const float* split_bf16(const uint16_t* x, int64_t ldx, int64_t M, int64_t K) {
  thread_local std::vector<float> buf;
  const int64_t k16 = K - K % 16, half = k16 / 2;
  if ((int64_t)buf.size() < M * k16 + 16) buf.resize(M * k16 + 16);
  float* xs = (float*)(((uintptr_t)buf.data() + 63) & ~(uintptr_t)63);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < half; ++j) {
      xs[m * k16 + j] = bf16_to_f32(x[m * ldx + 2 * j]);
      xs[m * k16 + half + j] = bf16_to_f32(x[m * ldx + 2 * j + 1]);
    }
  return xs;
}
#endif

#if defined(MN_AVX2_GEMV)
// ---- AVX2: a prefill chunk's linears, y [M, N] = x [M, K] w [N, K]^T in float32 ---------------------
// torch's float32 GEMM reached 100-170 GFLOP/s on the model's chunk shapes here (K = 576 or 1536; the
// FMA peak of 2 cores is ~190), and a bfloat16 chunk paid for widening its weight to float32 first.
// Each thread takes its own panels of 16 columns of y (16 rows of w), NB of them at a time: their w
// rows are packed, KC values of k at a time, into [KC][16] float32 (bfloat16 widened exactly on the
// way), which stay in L1/L2 while a 6 x 16 tile of y at a time (12 accumulators, rows of x broadcast)
// runs down all M rows of x. Every element of y is its k-ordered float32 sum of products, a block of
// KC at a time added to the blocks before it: the same bits for any M, any row's position in x, and any
// number of threads.
constexpr int64_t GEMM_KC = 576, GEMM_NB = 4, GEMM_MR = 6;

inline __m256 load8f(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8f(const uint16_t* p) { return widen8(p); }

template <typename T>
inline void transpose8x8(const T* src, int64_t lds, float* dst, int64_t ldd) {   // dst[c][r] = src[r][c]
  const __m256 r0 = load8f(src), r1 = load8f(src + lds), r2 = load8f(src + 2 * lds), r3 = load8f(src + 3 * lds),
               r4 = load8f(src + 4 * lds), r5 = load8f(src + 5 * lds), r6 = load8f(src + 6 * lds),
               r7 = load8f(src + 7 * lds);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
               t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
               t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE),
               s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE),
               s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE),
               s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(dst + ldd, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(s3, s7, 0x31));
}

// w rows [n0, n0 + 16) (those < N; the others zeros), columns [k0, k0 + kc), into pack[kc][16]
template <typename T>
void pack_panel(const T* w, int64_t ldw, int64_t N, int64_t n0, int64_t k0, int64_t kc, float* pack) {
  int64_t kk = 0;
  if (n0 + 16 <= N)
    for (; kk + 8 <= kc; kk += 8) {
      transpose8x8(w + n0 * ldw + k0 + kk, ldw, pack + kk * 16, 16);
      transpose8x8(w + (n0 + 8) * ldw + k0 + kk, ldw, pack + kk * 16 + 8, 16);
    }
  for (; kk < kc; ++kk)
    for (int64_t j = 0; j < 16; ++j) pack[kk * 16 + j] = n0 + j < N ? load(w + (n0 + j) * ldw, k0 + kk) : 0.f;
}

// y rows [0, MR) x 16 columns (+)= x rows [0, MR) x pack: the 12 sums as named registers (held in an
// array, GCC kept them on the stack through the loop)
template <int MR>
inline void gemm_tile(const float* x, int64_t ldx, const float* b, int64_t kc, float* y, int64_t ldy, bool add) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx, *x4 = x + 4 * ldx, *x5 = x + 5 * ldx;
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(b + 16 * k), b1 = _mm256_load_ps(b + 16 * k + 8);
    __m256 a = _mm256_broadcast_ss(x0 + k);
    c00 = _mm256_fmadd_ps(a, b0, c00);
    c01 = _mm256_fmadd_ps(a, b1, c01);
    if constexpr (MR > 1) { a = _mm256_broadcast_ss(x1 + k); c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11); }
    if constexpr (MR > 2) { a = _mm256_broadcast_ss(x2 + k); c20 = _mm256_fmadd_ps(a, b0, c20); c21 = _mm256_fmadd_ps(a, b1, c21); }
    if constexpr (MR > 3) { a = _mm256_broadcast_ss(x3 + k); c30 = _mm256_fmadd_ps(a, b0, c30); c31 = _mm256_fmadd_ps(a, b1, c31); }
    if constexpr (MR > 4) { a = _mm256_broadcast_ss(x4 + k); c40 = _mm256_fmadd_ps(a, b0, c40); c41 = _mm256_fmadd_ps(a, b1, c41); }
    if constexpr (MR > 5) { a = _mm256_broadcast_ss(x5 + k); c50 = _mm256_fmadd_ps(a, b0, c50); c51 = _mm256_fmadd_ps(a, b1, c51); }
  }
  auto put = [&](int i, __m256 lo, __m256 hi) {
    float* yi = y + i * ldy;
    if (add) {
      lo = _mm256_add_ps(_mm256_loadu_ps(yi), lo);
      hi = _mm256_add_ps(_mm256_loadu_ps(yi + 8), hi);
    }
    _mm256_storeu_ps(yi, lo);
    _mm256_storeu_ps(yi + 8, hi);
  };
  put(0, c00, c01);
  if constexpr (MR > 1) put(1, c10, c11);
  if constexpr (MR > 2) put(2, c20, c21);
  if constexpr (MR > 3) put(3, c30, c31);
  if constexpr (MR > 4) put(4, c40, c41);
  if constexpr (MR > 5) put(5, c50, c51);
}

template <int MR>
inline void gemm_tile_cols(const float* x, int64_t ldx, const float* b, int64_t kc, float* y, int64_t ldy, bool add,
                           int64_t cols) {      // as gemm_tile for the first `cols` < 16 columns of y only
  alignas(32) float t[MR * 16] = {};
  if (add)
    for (int i = 0; i < MR; ++i) memcpy(t + 16 * i, y + i * ldy, cols * sizeof(float));
  gemm_tile<MR>(x, ldx, b, kc, t, 16, add);
  for (int i = 0; i < MR; ++i) memcpy(y + i * ldy, t + 16 * i, cols * sizeof(float));
}

template <int MR>
inline void gemm_rows(const float* x, int64_t ldx, const float* b, int64_t kc, float* y, int64_t ldy, bool add,
                      int64_t cols) {
  if (cols == 16) gemm_tile<MR>(x, ldx, b, kc, y, ldy, add);
  else gemm_tile_cols<MR>(x, ldx, b, kc, y, ldy, add, cols);
}

template <typename T>
void gemm(const float* x, int64_t ldx, const T* w, int64_t ldw, float* y, int64_t ldy, int64_t M, int64_t N, int64_t K) {
  const int64_t panels = (N + 15) / 16;
  const int threads = M * N * K < (1 << 22) ? 1 : omp_get_max_threads();
#pragma omp parallel num_threads(threads)
  {
    const int nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t per = (panels + nt - 1) / nt, p0 = t * per, p1 = std::min(panels, p0 + per);
    static thread_local std::vector<float> buf;
    if ((int64_t)buf.size() < GEMM_NB * GEMM_KC * 16 + 8) buf.resize(GEMM_NB * GEMM_KC * 16 + 8);
    float* pack = (float*)(((uintptr_t)buf.data() + 31) & ~(uintptr_t)31);     // 32-byte aligned
    for (int64_t g0 = p0; g0 < p1; g0 += GEMM_NB) {
      const int64_t g1 = std::min(p1, g0 + GEMM_NB);
      for (int64_t k0 = 0; k0 < K; k0 += GEMM_KC) {
        const int64_t kc = std::min(GEMM_KC, K - k0);
        for (int64_t p = g0; p < g1; ++p) pack_panel(w, ldw, N, 16 * p, k0, kc, pack + (p - g0) * GEMM_KC * 16);
        int64_t m = 0;
        for (; m + GEMM_MR <= M; m += GEMM_MR)
          for (int64_t p = g0; p < g1; ++p)
            gemm_rows<GEMM_MR>(x + m * ldx + k0, ldx, pack + (p - g0) * GEMM_KC * 16, kc, y + m * ldy + 16 * p, ldy,
                               k0 > 0, std::min<int64_t>(16, N - 16 * p));
        for (; m < M; ++m)
          for (int64_t p = g0; p < g1; ++p)
            gemm_rows<1>(x + m * ldx + k0, ldx, pack + (p - g0) * GEMM_KC * 16, kc, y + m * ldy + 16 * p, ldy, k0 > 0,
                         std::min<int64_t>(16, N - 16 * p));
      }
    }
  }
}
#endif

// The path each type takes on this build, for rows [r0, r1) of w and M <= 4 rows of x (xs: x split for
// the AVX2 bfloat16 path, else null).
template <typename T, int M, typename Y>
void rows(const T* x, int64_t ldx, const float* xs, const T* w, int64_t ldw, Y* y, int64_t ldy, int64_t r0,
          int64_t r1, int64_t K) {
  (void)xs;
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 4) {
    rows_avx512<F32, M, Y>(x, ldx, w, ldw, y, ldy, r0, r1, K);
    return;
  }
#if defined(MN_BF16_ISA)
  if constexpr (sizeof(T) == 2) {
    rows_avx512<BF16, M, Y>(x, ldx, w, ldw, y, ldy, r0, r1, K);
    return;
  }
#endif
#endif
#if defined(MN_AVX2_GEMV)
  if constexpr (sizeof(T) == 4) {
    rows_avx2_f32<M, M <= 2 ? 4 : 2, Y>(x, ldx, w, ldw, y, ldy, r0, r1, K);
    return;
  } else {
    rows_avx2_bf16<M, M <= 2 ? 4 / M : 1, Y>(xs, x, ldx, w, ldw, y, ldy, r0, r1, K);
    return;
  }
#endif
  rows_portable<T, M, Y>(x, ldx, w, ldw, y, ldy, r0, r1, K);
}

// Past 4 rows of x (a batch of decode rows), each thread multiplies a block of this many bytes of its
// rows of w by every 4 rows of x in turn: the first 4 read the block from memory, the others from L2
// (4 rows at a time over the whole of w read it from memory once per 4 rows: float32 8 and 16 rows
// 1.20-1.33x that order, bfloat16 0.79-1.07x over five runs, within the paired method's noise for
// those rows). The model's decode linears (30 layers' weights, cold) on the AVX2 build: 5-16 rows
// 1.1-2.5x the GEMM, which packs the weights on every call and was the path past 4 rows (24 rows: 0.8x,
// so the AVX2 builds take up to 16 rows here); blocks of 16-256 KB about the same; a kernel of two rows
// of w by 4 of x was no faster.
constexpr int64_t GEMV_BLOCK_BYTES = 32768;

template <typename T, typename Y>
void gemv(const T* x, int64_t ldx, const T* w, int64_t ldw, Y* y, int64_t ldy, int64_t M, int64_t N, int64_t K) {
  const float* xs = nullptr;
#if defined(MN_AVX2_GEMV)
  if constexpr (sizeof(T) == 2) xs = split_bf16(x, ldx, M, K);
#endif
  const int64_t k16 = K - K % 16;
  // Each thread takes one contiguous block of rows, so each streams its part of w front to back; a
  // small matrix is not worth waking a second thread for.
  const int threads = N * K < 65536 ? 1 : omp_get_max_threads();
#pragma omp parallel num_threads(threads)
  {
    const int nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t per = (N + nt - 1) / nt;
    const int64_t r0 = t * per, r1 = r0 + per < N ? r0 + per : N;
    const int64_t block = M <= 4 ? r1 - r0 : std::max<int64_t>(1, GEMV_BLOCK_BYTES / (K * (int64_t)sizeof(T)));
    for (int64_t b0 = r0; b0 < r1; b0 += block) {
      const int64_t b1 = std::min(r1, b0 + block);
      for (int64_t m = 0; m < M; m += 4) {
        const T* xm = x + m * ldx;
        const float* xsm = xs ? xs + m * k16 : nullptr;
        Y* ym = y + m * ldy;
        switch (M - m < 4 ? M - m : 4) {
          case 1: rows<T, 1, Y>(xm, ldx, xsm, w, ldw, ym, ldy, b0, b1, K); break;
          case 2: rows<T, 2, Y>(xm, ldx, xsm, w, ldw, ym, ldy, b0, b1, K); break;
          case 3: rows<T, 3, Y>(xm, ldx, xsm, w, ldw, ym, ldy, b0, b1, K); break;
          default: rows<T, 4, Y>(xm, ldx, xsm, w, ldw, ym, ldy, b0, b1, K); break;
        }
      }
    }
  }
}

}  // namespace

extern "C" {

// Which instructions each dtype's path uses in this build, e.g. "float32=avx512 bfloat16=avx512_bf16".
const char* mn_gemv_isa() {
#if defined(__AVX512F__) && defined(MN_BF16_ISA)
  return "float32=avx512 bfloat16=" MN_BF16_ISA;
#elif defined(__AVX512F__)
  return "float32=avx512 bfloat16=portable";
#elif defined(MN_AVX2_GEMV)
  return "float32=avx2 bfloat16=avx2";
#else
  return "float32=portable bfloat16=portable";
#endif
}

// The most rows of x for which this build's path beats the alternative (measured: the portable
// bfloat16 loop converts each weight once per row of x, and falls behind torch's kernels beyond one
// row; on AVX2 builds the GEMM below takes over past 16, see GEMV_BLOCK_BYTES).
int64_t mn_gemv_max_rows(int dtype) {
#if defined(__AVX512F__) && defined(MN_BF16_ISA)
  (void)dtype;
  return 4;
#else
#if defined(__AVX512F__)
  return 4 * (dtype == 0) + 1 * (dtype != 0);
#elif defined(MN_AVX2_GEMV)
  (void)dtype;
  return 16;
#else
  return dtype == 0 ? 4 : 1;
#endif
#endif
}

void mn_gemv_f32(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy, int64_t M,
                 int64_t N, int64_t K) {
  gemv<float, float>(x, ldx, w, ldw, y, ldy, M, N, K);
}

// bfloat16 operands, the float32 sums not rounded (the LM head: logits rounded to bfloat16 can tie).
void mn_gemv_bf16_f32(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw, float* y, int64_t ldy,
                      int64_t M, int64_t N, int64_t K) {
  gemv<uint16_t, float>(x, ldx, w, ldw, y, ldy, M, N, K);
}

void mn_gemv_bf16(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw, uint16_t* y, int64_t ldy,
                  int64_t M, int64_t N, int64_t K) {
  gemv<uint16_t, uint16_t>(x, ldx, w, ldw, y, ldy, M, N, K);
}

// 1 where this build has the prefill GEMM below (AVX2 builds), else 0.
int mn_gemm_isa() {
#if defined(MN_AVX2_GEMV)
  return 1;
#else
  return 0;
#endif
}

// y [M, N] (float32, row stride ldy) = x [M, K] (float32) times w [N, K]^T, w float32 (wdtype 0) or
// bfloat16 (1, widened exactly); rows of x and w contiguous (strides ldx, ldw). Returns 0, or -1 where
// this build has no such kernel.
int mn_gemm(int wdtype, const float* x, int64_t ldx, const void* w, int64_t ldw, float* y, int64_t ldy, int64_t M,
            int64_t N, int64_t K) {
#if defined(MN_AVX2_GEMV)
  if (wdtype == 0) { gemm<float>(x, ldx, (const float*)w, ldw, y, ldy, M, N, K); return 0; }
  if (wdtype == 1) { gemm<uint16_t>(x, ldx, (const uint16_t*)w, ldw, y, ldy, M, N, K); return 0; }
#endif
  (void)wdtype; (void)x; (void)ldx; (void)w; (void)ldw; (void)y; (void)ldy; (void)M; (void)N; (void)K;
  return -1;
}
}

// ---- decode attention over the paged KV cache ---------------------------------------------------
//
// One query token per sequence against all of its keys, read where they lie in the cache: the cache
// of a layer is [num_blocks, block_size, Hkv, D] and a sequence's keys are the blocks its table row
// names, in order, its length counting from the first. Every token's K and V rows of all KV heads are
// read once, front to back, by one thread (no gather into a workspace, no padding, no mask).
//
// A sequence's blocks are cut into spans that threads take in turn; a span keeps, per query head, the
// running maximum score m, the sum l of exp(score - m) and the float32 sum acc of exp(score - m) * v
// (the online softmax), and the spans of a sequence are then merged exactly as merge_attention_states
// merges partial results: out = sum_i acc_i e^(m_i - M) / L, lse = M + log L (natural log, as the
// flash kernel's). Scores and the softmax are float32 in both dtypes (bfloat16 K and q products are
// exact in float32; V is widened; the weights that multiply V are rounded to bfloat16, as the flash
// kernel rounds them, weights_for_v), so results agree with torch's flash kernel to rounding.
// AVX-512 and AVX2 (with FMA) builds: elsewhere mn_decode_attention_isa returns 0 and the caller keeps the
// flash kernel.
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define MN_DECODE_ATTENTION 1
namespace {

// ---- 16 float32 lanes: one AVX-512 register, or two AVX2 registers --------------------------------
// The kernels below are written once on this type; each operation is the one instruction (or the
// two, one per half) that the AVX-512 code used, so an AVX-512 build computes what it computed before
// and an AVX2 build the same values (the lane order of the horizontal sums aside).
constexpr float FLUSH = -87.f;
// e^x = 2^n e^r, n = round(x log2 e), r = x - n ln2 (ln2 in two parts, so r is exact), e^r by its
// Taylor polynomial to r^7 (Horner, highest term first)
constexpr float LOG2E = 1.44269504088896341f, LN2_HI = 0.693359375f, LN2_LO = -2.12194440e-4f;
constexpr float EXP_POLY[] = {1.f / 5040, 1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};

#if defined(__AVX512F__)
struct vf { __m512 v; };
inline vf vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline __m512 widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
inline vf vload(const uint16_t* p) { return {widen_bf16(_mm256_loadu_si256((const __m256i*)p))}; }
inline void vstore(float* p, vf a) { _mm512_storeu_ps(p, a.v); }
inline vf vset1(float x) { return {_mm512_set1_ps(x)}; }
inline vf vzero() { return {_mm512_setzero_ps()}; }
inline vf vadd(vf a, vf b) { return {_mm512_add_ps(a.v, b.v)}; }
inline vf vsub(vf a, vf b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline vf vmul(vf a, vf b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline vf vdiv(vf a, vf b) { return {_mm512_div_ps(a.v, b.v)}; }
inline vf vmax(vf a, vf b) { return {_mm512_max_ps(a.v, b.v)}; }
inline vf vfma(vf a, vf b, vf c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }        // a * b + c
inline float vreduce_add(vf a) { return _mm512_reduce_add_ps(a.v); }
inline float vreduce_max(vf a) { return _mm512_reduce_max_ps(a.v); }
inline __mmask16 first_lanes(int64_t n) { return (__mmask16)(n >= 16 ? 0xffffu : (1u << n) - 1); }
// p[0..n) and `fill` in the other lanes (only the n floats are read); a's first n lanes, zeros after
inline vf vload_first(const float* p, int64_t n, float fill) { return {_mm512_mask_loadu_ps(_mm512_set1_ps(fill), first_lanes(n), p)}; }
inline vf vkeep_first(vf a, int64_t n) { return {_mm512_maskz_mov_ps(first_lanes(n), a.v)}; }

// e^x for x <= 0 (scores minus their maximum), float32, to ~1 ulp: x = n ln2 + r, |r| <= ln2/2,
// e^r by its Taylor polynomial to r^7 (EXP_POLY; error < 1e-8 relative), times 2^n. 0 below -87 (FLUSH):
// e^-87 is the smallest normal float32, and a denormal weight costs a microcode assist in every
// multiply-add it enters (real attention is peaked: the 8K decode took 1.7x as long with them);
// the weights are relative to the row's maximum (weight 1), so what is flushed is below rounding.
// x = n ln2 + r: n (into *n) and e^r, for x in the caller's range
inline __m512 exp_poly_ps(__m512 x, __m512* n) {
  *n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(*n, _mm512_set1_ps(LN2_HI), x);
  r = _mm512_fnmadd_ps(*n, _mm512_set1_ps(LN2_LO), r);
  __m512 p = _mm512_set1_ps(EXP_POLY[0]);
  for (int i = 1; i < 8; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_POLY[i]));
  return p;
}
inline __m512 exp_ps(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(FLUSH), _CMP_GE_OQ);
  __m512 n;
  const __m512 p = exp_poly_ps(_mm512_max_ps(x, _mm512_set1_ps(FLUSH)), &n);
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}
inline vf vexp(vf x) { return {exp_ps(x.v)}; }

// float32 values rounded to bfloat16 precision (to nearest even), still float32; finite, >= 0
inline vf vround_bf16(vf p) {
  const __m512i bits = _mm512_castps_si512(p.v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb);
  return {_mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u)))};
}
// any float32 rounded to bfloat16 as f32_to_bf16 rounds it (NaN kept a NaN), still float32; and
// bfloat16 values (so rounded) stored as bfloat16
inline vf vround_bf16_any(vf p) {
  const __m512i bits = _mm512_castps_si512(p.v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
  const __m512i r = _mm512_and_si512(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb), hi);
  const __m512i nan = _mm512_and_si512(_mm512_or_si512(bits, _mm512_set1_epi32(0x400000)), hi);
  return {_mm512_castsi512_ps(_mm512_mask_blend_epi32(_mm512_cmp_ps_mask(p.v, p.v, _CMP_UNORD_Q), r, nan))};
}
inline void vstore_bf16(uint16_t* y, vf p) {
  _mm256_storeu_si256((__m256i*)y, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(p.v), 16)));
}

// out[0..4) = the sums of each vector's 16 lanes (a transposing add tree, a quarter of the
// instructions of four reductions)
inline void vsum4(vf a, vf b, vf c, vf d, float* out) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a.v, b.v), _mm512_unpackhi_ps(a.v, b.v));   // a0+a2 b0+b2 a1+a3 b1+b3
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c.v, d.v), _mm512_unpackhi_ps(c.v, d.v));
  const __m512 x = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));     // a b c d per 128 bits
  const __m256 y = _mm256_add_ps(_mm512_castps512_ps256(x),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(y), _mm256_extractf128_ps(y, 1)));
}
constexpr int VREGS = 32;           // vector registers of the build (for how many sums stay in them)
#else                                            // AVX2: the 8-lane helpers of the AVX2 linears above
struct vf { __m256 lo, hi; };
inline vf vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline vf vload(const uint16_t* p) { return {widen8(p), widen8(p + 8)}; }
inline void vstore(float* p, vf a) { _mm256_storeu_ps(p, a.lo); _mm256_storeu_ps(p + 8, a.hi); }
inline vf vset1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline vf vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline vf vadd(vf a, vf b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline vf vsub(vf a, vf b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline vf vmul(vf a, vf b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline vf vdiv(vf a, vf b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline vf vmax(vf a, vf b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline vf vfma(vf a, vf b, vf c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline float hmax8(__m256 a) {
  const __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
}
inline float vreduce_add(vf a) { return hsum8(_mm256_add_ps(a.lo, a.hi)); }
inline float vreduce_max(vf a) { return hmax8(_mm256_max_ps(a.lo, a.hi)); }
inline __m256 load_first8(const float* p, int64_t n, float fill) {
  const __m256i m = lanes_below(n);
  return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
}
inline vf vload_first(const float* p, int64_t n, float fill) { return {load_first8(p, n, fill), load_first8(p + 8, n - 8, fill)}; }
inline vf vkeep_first(vf a, int64_t n) {
  return {_mm256_and_ps(a.lo, _mm256_castsi256_ps(lanes_below(n))), _mm256_and_ps(a.hi, _mm256_castsi256_ps(lanes_below(n - 8)))};
}

// e^x as the AVX-512 exp_ps above (x <= 0; 0 below FLUSH), 2^n built in the exponent bits
// (n >= -126 there, so 2^n is a normal float32 and the product rounds as scalef's)
inline __m256 exp_poly8(__m256 x, __m256* n) {  // as exp_poly_ps: n (into *n) and e^r
  *n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(*n, _mm256_set1_ps(LN2_HI), x);
  r = _mm256_fnmadd_ps(*n, _mm256_set1_ps(LN2_LO), r);
  __m256 p = _mm256_set1_ps(EXP_POLY[0]);
  for (int i = 1; i < 8; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_POLY[i]));
  return p;
}
inline __m256 exp8(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(FLUSH), _CMP_GE_OQ);
  __m256 n;
  const __m256 p = exp_poly8(_mm256_max_ps(x, _mm256_set1_ps(FLUSH)), &n);
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}
inline vf vexp(vf x) { return {exp8(x.lo), exp8(x.hi)}; }

inline void exp8x4(__m256* x) {   // exp8 of x[0..4), step by step across the four (same bits as exp8)
  __m256 keep[4], n[4], r[4], p[4];
  for (int u = 0; u < 4; ++u) keep[u] = _mm256_cmp_ps(x[u], _mm256_set1_ps(FLUSH), _CMP_GE_OQ);
  for (int u = 0; u < 4; ++u) x[u] = _mm256_max_ps(x[u], _mm256_set1_ps(FLUSH));
  for (int u = 0; u < 4; ++u) n[u] = _mm256_round_ps(_mm256_mul_ps(x[u], _mm256_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  for (int u = 0; u < 4; ++u) r[u] = _mm256_fnmadd_ps(n[u], _mm256_set1_ps(LN2_HI), x[u]);
  for (int u = 0; u < 4; ++u) r[u] = _mm256_fnmadd_ps(n[u], _mm256_set1_ps(LN2_LO), r[u]);
  for (int u = 0; u < 4; ++u) p[u] = _mm256_set1_ps(EXP_POLY[0]);
  for (int i = 1; i < 8; ++i)
    for (int u = 0; u < 4; ++u) p[u] = _mm256_fmadd_ps(p[u], r[u], _mm256_set1_ps(EXP_POLY[i]));
  for (int u = 0; u < 4; ++u) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n[u]), _mm256_set1_epi32(127)), 23);
    x[u] = _mm256_and_ps(_mm256_mul_ps(p[u], _mm256_castsi256_ps(e)), keep[u]);
  }
}

inline __m256 round_bf16_8(__m256 p) {
  const __m256i bits = _mm256_castps_si256(p);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb);
  return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u)));
}
inline vf vround_bf16(vf p) { return {round_bf16_8(p.lo), round_bf16_8(p.hi)}; }
inline __m256 round_bf16_any8(__m256 p) {
  const __m256i bits = _mm256_castps_si256(p);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
  const __m256i r = _mm256_and_si256(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb), hi);
  const __m256i nan = _mm256_and_si256(_mm256_or_si256(bits, _mm256_set1_epi32(0x400000)), hi);
  return _mm256_castsi256_ps(_mm256_blendv_epi8(r, nan, _mm256_castps_si256(_mm256_cmp_ps(p, p, _CMP_UNORD_Q))));
}
inline vf vround_bf16_any(vf p) { return {round_bf16_any8(p.lo), round_bf16_any8(p.hi)}; }
inline void vstore_bf16(uint16_t* y, vf p) {                 // 16-bit halves packed in order
  const __m256i lo = _mm256_srli_epi32(_mm256_castps_si256(p.lo), 16), hi = _mm256_srli_epi32(_mm256_castps_si256(p.hi), 16);
  _mm256_storeu_si256((__m256i*)y, _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8));
}

inline void vsum4(vf a, vf b, vf c, vf d, float* out) {
  const __m256 ab = _mm256_hadd_ps(_mm256_add_ps(a.lo, a.hi), _mm256_add_ps(b.lo, b.hi));   // a01 a23 b01 b23 | a45 a67 b45 b67
  const __m256 cd = _mm256_hadd_ps(_mm256_add_ps(c.lo, c.hi), _mm256_add_ps(d.lo, d.hi));
  const __m256 x = _mm256_hadd_ps(ab, cd);                                                  // a b c d | a b c d
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1)));
}
constexpr int VREGS = 8;            // 16 registers of 8 lanes: 8 of 16
#endif

inline float exp_flushed(float x) { return x < FLUSH ? 0.f : expf(x); }

// The softmax weights that multiply V, as torch's flash kernel (the prefill chunks' attention) takes
// them: rounded to the cache's dtype (bfloat16: to nearest even, still as float32) while their sum
// stays unrounded, so a bfloat16 prompt's last row rounds alike whether it is attended as a chunk or
// as a decode row. bfloat16 logits are coarse enough for two tokens to tie, and the greedy choice
// then follows whichever rounding came last (a float32-weights variant of a chunk kernel flipped
// test_engine_builtin's bf16 chat prompt that way).
template <typename T>
inline vf weights_for_v(vf p) {
  if constexpr (sizeof(T) == 2) return vround_bf16(p);
  return p;
}

constexpr int MAX_D = 256, MAX_HQ = 256;

struct Span { int64_t seq, t0, t1; };           // keys [t0, t1) of sequence seq

// Where the keys of a sequence lie: walks its positions block by block (no division per key).
template <typename T>
struct Rows {
  const T *kc, *vc;
  const int32_t* table;
  int64_t bs, row, bi, off;
  Rows(const T* k, const T* v, const int32_t* t, int64_t bs_, int64_t row_, int64_t pos)
      : kc(k), vc(v), table(t), bs(bs_), row(row_), bi(pos / bs_), off(pos % bs_) {}
  // the next n keys' K and V rows
  void next(int64_t n, const T** kr, const T** vr) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t slot = ((int64_t)table[bi] * bs + off) * row;
      kr[j] = kc + slot;
      vr[j] = vc + slot;
      if (++off == bs) { off = 0; ++bi; }
    }
  }
};

// acc[h..h+G) += sum over keys j in [j0, j1) of p[h'][j] * V row j (its kv head's part at koff), p[h'] at
// p + h' * ld: each V row loaded (and widened) once for the G heads that share it, their sums in registers.
template <typename T, int NC, int G>
inline void pv_heads(const float* p, int64_t ld, int64_t h, const T* const* vrow, int64_t j0, int64_t j1,
                     int64_t koff, float* acc) {
  constexpr int64_t d = 16 * NC;
  vf a[G][NC];
  for (int gi = 0; gi < G; ++gi)
    for (int c = 0; c < NC; ++c) a[gi][c] = vload(acc + (h + gi) * d + 16 * c);
  for (int64_t j = j0; j < j1; ++j) {
    vf pj[G];
    for (int gi = 0; gi < G; ++gi) pj[gi] = vset1(p[(h + gi) * ld + j]);
    for (int c = 0; c < NC; ++c) {
      const vf v = vload(vrow[j] + koff + 16 * c);
      for (int gi = 0; gi < G; ++gi) a[gi][c] = vfma(pj[gi], v, a[gi][c]);
    }
  }
  for (int gi = 0; gi < G; ++gi)
    for (int c = 0; c < NC; ++c) vstore(acc + (h + gi) * d + 16 * c, a[gi][c]);
}

// As pv_heads for the dimensions [16 c0, 16 (c0 + CC)) of the rows only: AVX2's 16 registers hold G x CC
// sums where they cannot hold G x NC, so the g heads of a kv head share each V row's widening in
// NC / CC passes instead of loading (and widening) it once per head.
template <typename T, int CC, int G>
inline void pv_heads_part(const float* p, int64_t ld, int64_t h, const T* const* vrow, int64_t j0, int64_t j1,
                          int64_t koff, int64_t d, int64_t c0, float* acc) {
  vf a[G][CC];
  for (int gi = 0; gi < G; ++gi)
    for (int c = 0; c < CC; ++c) a[gi][c] = vload(acc + (h + gi) * d + 16 * (c0 + c));
  for (int64_t j = j0; j < j1; ++j) {
    for (int c = 0; c < CC; ++c) {
      const vf v = vload(vrow[j] + koff + 16 * (c0 + c));
      for (int gi = 0; gi < G; ++gi) a[gi][c] = vfma(vset1(p[(h + gi) * ld + j]), v, a[gi][c]);
    }
  }
  for (int gi = 0; gi < G; ++gi)
    for (int c = 0; c < CC; ++c) vstore(acc + (h + gi) * d + 16 * (c0 + c), a[gi][c]);
}

#if !defined(__AVX512F__)
// pv_heads_part<T, 2, G> for bfloat16 V rows on AVX2, written on 8-lane registers: G heads x 32
// dimensions of sums (4 G registers), the G weights of a key broadcast once, then the row's four 8-lane
// parts widened one at a time: 12 + 3 + 1 registers for 3 heads. pv_heads_part (16-lane pairs, a whole
// widened part of the row at once) needed 17, and GCC kept one sum on the stack: a store and a reload
// in every key's chain. The same products and sums in the same order (the same bits). One bfloat16
// layer over 8K keys 3-20% faster in five of six alternating runs (a development microbenchmark).
// float32 keeps pv_heads_part (which spills one sum there too): this form was no faster for it,
// 4-11% slower in three runs, within the noise in three more.
template <typename T, int G>
inline void pv_heads_part8(const float* p, int64_t ld, int64_t h, const T* const* vrow, int64_t j0, int64_t j1,
                           int64_t koff, int64_t d, int64_t c0, float* acc) {
  __m256 a[G][4];
  for (int gi = 0; gi < G; ++gi)
    for (int q = 0; q < 4; ++q) a[gi][q] = _mm256_loadu_ps(acc + (h + gi) * d + 16 * c0 + 8 * q);
  for (int64_t j = j0; j < j1; ++j) {
    __m256 b[G];
    for (int gi = 0; gi < G; ++gi) b[gi] = _mm256_broadcast_ss(p + (h + gi) * ld + j);
    const T* vj = vrow[j] + koff + 16 * c0;
    for (int q = 0; q < 4; ++q) {
      const __m256 v = load8f(vj + 8 * q);
      for (int gi = 0; gi < G; ++gi) a[gi][q] = _mm256_fmadd_ps(b[gi], v, a[gi][q]);
    }
  }
  for (int gi = 0; gi < G; ++gi)
    for (int q = 0; q < 4; ++q) _mm256_storeu_ps(acc + (h + gi) * d + 16 * c0 + 8 * q, a[gi][q]);
}
#endif

// One AVX2 pass of the V products over dimensions [16 c0, 16 c0 + 32) for G heads: pv_heads_part8 for
// bfloat16, pv_heads_part for float32 (AVX-512 builds do not take passes).
template <typename T, int G>
inline void pv_pass(const float* p, int64_t ld, int64_t h, const T* const* vrow, int64_t j0, int64_t j1,
                    int64_t koff, int64_t d, int64_t c0, float* acc) {
#if !defined(__AVX512F__)
  if constexpr (sizeof(T) == 2) {
    pv_heads_part8<T, G>(p, ld, h, vrow, j0, j1, koff, d, c0, acc);
    return;
  }
#endif
  pv_heads_part<T, 2, G>(p, ld, h, vrow, j0, j1, koff, d, c0, acc);
}

#if !defined(__AVX512F__)
// The AVX2 scores of 4 keys for G <= 3 query heads of one kv head: 4 G sums of 8 lanes stay in registers
// (12 of the 16 for 3 heads), each 16 dimensions of a key's row loaded once for the G heads, q read from
// L1 by the multiply-adds; the 4 sums of a head then reduced together (3 horizontal adds) and stored.
// bfloat16 rows are widened by halves of their 32-bit words (the even dimension shifted up, the odd one
// masked: 3 instructions for 16 values), so qp holds each 16 dimensions of q with its even ones first;
// float32 rows are read in order (qp is q). It replaced a pass that stored each key's per-head sums and
// reduced them from memory: the bfloat16 scores pass 10-15% faster in a development build's phase
// timings, the whole kernel within the noise of it (the pass waits on memory about as long as it
// computes; what moved the kernel is the V rows' prefetch below).
template <typename T, int G>
inline void scores4(const float* qp, const T* const* kr, int64_t koff, int64_t d, float* s, int64_t ns) {
  __m256 a[G][4];
  for (int gi = 0; gi < G; ++gi)
    for (int u = 0; u < 4; ++u) a[gi][u] = _mm256_setzero_ps();
  for (int64_t c = 0; c < d; c += 16)
    for (int u = 0; u < 4; ++u) {
      __m256 lo, hi;
      if constexpr (sizeof(T) == 2) {
        const __m256i x = _mm256_loadu_si256((const __m256i*)(kr[u] + koff + c));
        lo = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
        hi = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32((int)0xffff0000u)));
      } else {
        lo = _mm256_loadu_ps(kr[u] + koff + c);
        hi = _mm256_loadu_ps(kr[u] + koff + c + 8);
      }
      for (int gi = 0; gi < G; ++gi) {
        a[gi][u] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(qp + gi * d + c), a[gi][u]);
        a[gi][u] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(qp + gi * d + c + 8), a[gi][u]);
      }
    }
  for (int gi = 0; gi < G; ++gi) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[gi][0], a[gi][1]), _mm256_hadd_ps(a[gi][2], a[gi][3]));
    _mm_storeu_ps(s + gi * ns, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
  }
}

// The AVX2 scores of 3 keys for 3 query heads of one kv head (a GQA group of 3, the built-in model's):
// 9 sums in registers, each 16 dimensions in two halves (the 3 keys' first 8, then their last 8: a
// bfloat16 row's even dimensions, then its odd ones), so every sum takes its multiply-adds in scores4's
// order and is reduced by the same adds: the same bits. Written to load each of q's vectors once for
// the 3 keys; GCC folds those loads into the multiply-adds instead (keeping registers for the sums), and
// forcing q into registers (an empty asm) made the bfloat16 scores 0.91x and float32's 1.06-1.10x (one
// thread's phase ticks, paired). Against scores4 (bench/results/kernel_ab_decode_scores3_s29.md, 30
// layers' caches read cold): the kernel 1.00-1.10x, the decode step 0.99-1.06x.
template <typename T>
inline void scores3(const float* qp, const T* const* kr, int64_t koff, int64_t d, float* s, int64_t ns) {
  __m256 a0[3], a1[3], a2[3];                     // a<head>[key]
  for (int u = 0; u < 3; ++u) a0[u] = a1[u] = a2[u] = _mm256_setzero_ps();
  for (int64_t c = 0; c < d; c += 16)
    for (int half = 0; half < 2; ++half) {
      __m256 k[3];
      for (int u = 0; u < 3; ++u) {
        if constexpr (sizeof(T) == 2) {
          const __m256i x = _mm256_loadu_si256((const __m256i*)(kr[u] + koff + c));
          k[u] = half == 0 ? _mm256_castsi256_ps(_mm256_slli_epi32(x, 16))
                           : _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32((int)0xffff0000u)));
        } else {
          k[u] = _mm256_loadu_ps(kr[u] + koff + c + 8 * half);
        }
      }
      __m256 qv = _mm256_loadu_ps(qp + c + 8 * half);
      for (int u = 0; u < 3; ++u) a0[u] = _mm256_fmadd_ps(k[u], qv, a0[u]);
      qv = _mm256_loadu_ps(qp + d + c + 8 * half);
      for (int u = 0; u < 3; ++u) a1[u] = _mm256_fmadd_ps(k[u], qv, a1[u]);
      qv = _mm256_loadu_ps(qp + 2 * d + c + 8 * half);
      for (int u = 0; u < 3; ++u) a2[u] = _mm256_fmadd_ps(k[u], qv, a2[u]);
    }
  auto put = [&](__m256* a, float* out) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[2]));
    const __m128 r = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    _mm_storel_pi((__m64*)out, r);
    _mm_store_ss(out + 2, _mm_movehl_ps(r, r));
  };
  put(a0, s);
  put(a1, s + ns);
  put(a2, s + 2 * ns);
}
#endif

// A thread's scratch for attend_span, kept between calls (a span of 8,192 keys and 9 heads takes
// ~0.4 MB: allocated per call, it was mapped and unmapped each time).
struct SpanScratch {
  std::vector<float> s;
  std::vector<const void*> k, v;
};
inline SpanScratch& span_scratch() {
  static thread_local SpanScratch sc;
  return sc;
}

constexpr int64_t AHEAD = 16;      // keys prefetched ahead of the ones being read
// Bytes of V rows that all the kv heads' passes over a block read while they stay in L1/L2, the next
// block's rows arriving beside them: 128 keys of bfloat16 rows of 3 heads x 64, 64 of float32 ones.
// In a development A/B 48 KB and 96 KB were even on cold caches (8K keys, 30 layers: 1.10-1.15x the old
// kernel), 192 KB behind them (1.05-1.07x), and on a layer already in L3 96 KB cost float32 8% where
// 48 KB did not (the prefetched block evicted the one being read).
constexpr int64_t V_BLOCK_BYTES = 49152;
constexpr int64_t V_STEP = 32;     // keys a pass reads between two of its prefetches of the next block

// Prefetches the cache lines of rows [j, j1) (`lines` lines of 64 bytes each) a few at a time, `per`
// lines a step(): spread over the steps of work that come before the rows are read.
template <typename T>
struct LineFetch {
  const T* const* rows;
  int64_t j, j1, lines, per, line = 0;
  LineFetch(const T* const* r, int64_t j_, int64_t j1_, int64_t lines_, int64_t steps)
      : rows(r), j(j_), j1(j1_), lines(lines_), per(steps > 0 ? ((j1_ - j_) * lines_ + steps - 1) / steps : 0) {}
  void step() {
    for (int64_t e = 0; e < per && j < j1; ++e) {
      _mm_prefetch((const char*)rows[j] + 64 * line, _MM_HINT_T0);
      if (++line == lines) { line = 0; ++j; }
    }
  }
};

// One span: its partial result into m[Hq], l[Hq], acc[Hq][D].
// NC = d / 16 is a compile-time constant so that a row's vectors live in registers.
//
// In three passes over the span, not one online pass per tile of keys: the scores of every key (the K
// rows alone, front to back, AHEAD keys prefetched into L1), the softmax weights from the span's
// maximum, then the weighted V rows (the V rows alone). Interleaving a tile's K and V rows kept the
// kernel at ~40% of its own speed on data in L3 when it read a cold cache (15 GB/s in bfloat16, 20 in
// float32, where a plain read reaches 45); one stream at a time reads it 1.4-1.5x faster
// (bench/results/cpu_kernels_twopass.md). The weights that multiply V are rounded as torch's flash
// kernel rounds them (weights_for_v), their sum is not.
template <typename T, int NC>
void attend_span(const T* q, const T* kc, const T* vc, const int32_t* table, int64_t t0, int64_t t1,
                 int64_t bs, int64_t hq, int64_t hkv, float scale, float* m, float* l, float* acc) {
  constexpr int64_t d = 16 * NC, nc = NC;
  const int64_t g = hq / hkv, row = hkv * d, n = t1 - t0, ns = (n + 15) & ~(int64_t)15;
  const int64_t line_bytes = row * (int64_t)sizeof(T);
  for (int64_t i = 0; i < hq * d; ++i) acc[i] = 0.f;
  // q in float32, scaled once
  alignas(64) float qf[MAX_HQ * MAX_D / 16];    // hq * d <= 4096 (checked by the caller)
  for (int64_t h = 0; h < hq; ++h)
    for (int c = 0; c < nc; ++c) vstore(qf + h * d + 16 * c, vmul(vload(q + h * d + 16 * c), vset1(scale)));
#if !defined(__AVX512F__)
  if constexpr (sizeof(T) == 2)                  // scores4's order: each 16 dimensions' even ones first
    for (int64_t i = 0; i < hq * d; i += 16) {
      float t[16];
      memcpy(t, qf + i, sizeof t);
      for (int e = 0; e < 8; ++e) { qf[i + e] = t[2 * e]; qf[i + 8 + e] = t[2 * e + 1]; }
    }
#endif
  SpanScratch& sc = span_scratch();
  if ((int64_t)sc.s.size() < hq * ns) sc.s.resize(hq * ns);
  if ((int64_t)sc.k.size() < ns) { sc.k.resize(ns); sc.v.resize(ns); }
  float* s = sc.s.data();                        // s[h * ns + j]: scores, then weights
  const T** kr = (const T**)sc.k.data();
  const T** vr = (const T**)sc.v.data();
  Rows<T> rows(kc, vc, table, bs, row, t0);
  rows.next(n, kr, vr);
  for (int64_t j = n; j < ns; ++j) { kr[j] = kr[0]; vr[j] = vr[0]; }     // padding: scored, then masked
  // 1. scores s[h][j] = q_h . k_j (q scaled), four keys at a time (three for AVX2's groups of 3 heads)
#if !defined(__AVX512F__)
  if (g == 3) {
    int64_t j = 0;
    for (; j + 3 <= ns; j += 3) {
      for (int64_t u = j + AHEAD; u < j + AHEAD + 3 && u < n; ++u)
        for (int64_t c = 0; c < line_bytes; c += 64) _mm_prefetch((const char*)kr[u] + c, _MM_HINT_T0);
      for (int64_t kh = 0; kh < hkv; ++kh) scores3<T>(qf + 3 * kh * d, kr + j, kh * d, d, s + 3 * kh * ns + j, ns);
    }
    if (j < ns)                   // ns % 3 keys left: the last 4 again, as scores4 takes them (the same bits)
      for (int64_t kh = 0; kh < hkv; ++kh)
        scores4<T, 3>(qf + 3 * kh * d, kr + ns - 4, kh * d, d, s + 3 * kh * ns + ns - 4, ns);
  } else
#endif
  for (int64_t j = 0; j < ns; j += 4) {
    for (int64_t u = j + AHEAD; u < j + AHEAD + 4 && u < n; ++u)
      for (int64_t c = 0; c < line_bytes; c += 64) _mm_prefetch((const char*)kr[u] + c, _MM_HINT_T0);
    for (int64_t kh = 0; kh < hkv; ++kh) {
#if defined(__AVX512F__)                         // the 4 keys' rows stay in registers for the g heads
      vf kv[4][NC];
      for (int u = 0; u < 4; ++u)
        for (int c = 0; c < nc; ++c) kv[u][c] = vload(kr[j + u] + kh * d + 16 * c);
      for (int64_t h = kh * g; h < (kh + 1) * g; ++h) {
        vf a[4];
        for (int u = 0; u < 4; ++u) {
          a[u] = vmul(kv[u][0], vload(qf + h * d));
          for (int c = 1; c < nc; ++c) a[u] = vfma(kv[u][c], vload(qf + h * d + 16 * c), a[u]);
        }
        vsum4(a[0], a[1], a[2], a[3], s + h * ns + j);
      }
#else                                            // AVX2: 4 keys x up to 3 heads of sums in registers
      for (int64_t h = kh * g; h < (kh + 1) * g;) {
        const int64_t gb = (kh + 1) * g - h < 3 ? (kh + 1) * g - h : 3;
        if (gb == 3) scores4<T, 3>(qf + h * d, kr + j, kh * d, d, s + h * ns + j, ns);
        else if (gb == 2) scores4<T, 2>(qf + h * d, kr + j, kh * d, d, s + h * ns + j, ns);
        else scores4<T, 1>(qf + h * d, kr + j, kh * d, d, s + h * ns + j, ns);
        h += gb;
      }
#endif
    }
  }
  // 2. the weights, from the span's maximum per head; meanwhile the first block of V rows is fetched
  const int64_t lines = (line_bytes + 63) / 64;
  const int64_t vblock = std::max<int64_t>(V_STEP, V_BLOCK_BYTES / line_bytes / V_STEP * V_STEP);   // keys
  LineFetch<T> first(vr, 0, n < vblock ? n : vblock, lines, hq * (ns / 16));
  for (int64_t h = 0; h < hq; ++h) {
    float* sh = s + h * ns;
    vf mv = vset1(-INFINITY);
    for (int64_t j = 0; j < ns; j += 16) mv = vmax(mv, vload_first(sh + j, n - j, -INFINITY));
    const float mx = vreduce_max(mv);
    vf sum = vzero();
    for (int64_t j = 0; j < ns; j += 16) {
      first.step();
      const vf pv = vkeep_first(vexp(vsub(vload(sh + j), vset1(mx))), n - j);
      sum = vadd(sum, pv);
      vstore(sh + j, weights_for_v<T>(pv));
    }
    m[h] = mx;
    l[h] = vreduce_add(sum);
  }
  // 3. the weighted V rows, a block of keys at a time (its rows stay close while every kv head reads
  // its part of them, in passes of up to 3 heads and 2 16-lane parts of the row on AVX2), each V row
  // loaded once for the query heads that share it. The next block's rows are fetched while this block
  // is read, a few lines every V_STEP keys of every pass: the memory stream runs under all the passes'
  // multiply-adds (fetched in a block's first pass, as before, that pass waited on memory and the other
  // five fetched nothing). With the scores above, against the kernel before (bench/results/
  // cpu_kernels_decode_s26.md, 30 layers' caches read cold as a decode step reads them, one sequence of
  // 1K-8K keys or batches of 16 x 512 and 64 x 128): 1.04-1.11x in float32, 1.00-1.21x in bfloat16; a
  // layer already in cache 0.86-0.98x in float32 (the prefetches cost instructions and L1 there: a
  // decode step never finds its KV there, the weights stream through between layers); the built-in
  // model's decode step 1.05-1.08x.
  constexpr int64_t gmax = NC * 4 <= VREGS / 2 ? 4 : NC * 2 <= VREGS / 2 ? 2 : 1;   // sums that stay in registers
  // AVX2 (gmax 1 for d >= 64): up to 3 heads x 2 of the row's 16-lane parts in registers, a pass per 2 parts
  constexpr bool parts = VREGS == 8 && NC % 2 == 0;
  constexpr int64_t gm = parts ? 3 : gmax, part_passes = parts ? NC / 2 : 1;
  auto pv = [&](int64_t gb, int64_t h, int64_t ja, int64_t jb, int64_t koff, int64_t c0) {
    if constexpr (parts) {
      switch (gb) {
        case 1: pv_pass<T, 1>(s, ns, h, vr, ja, jb, koff, d, c0, acc); break;
        case 2: pv_pass<T, 2>(s, ns, h, vr, ja, jb, koff, d, c0, acc); break;
        default: pv_pass<T, 3>(s, ns, h, vr, ja, jb, koff, d, c0, acc); break;
      }
      return;
    }
    switch (gb) {
      case 1: pv_heads<T, NC, 1>(s, ns, h, vr, ja, jb, koff, acc); break;
      case 2: pv_heads<T, NC, 2>(s, ns, h, vr, ja, jb, koff, acc); break;
      case 3: pv_heads<T, NC, 3>(s, ns, h, vr, ja, jb, koff, acc); break;
      default: pv_heads<T, NC, 4>(s, ns, h, vr, ja, jb, koff, acc); break;
    }
  };
  const int64_t passes = hkv * ((g + gm - 1) / gm) * part_passes;    // passes over each block
  for (int64_t j0 = 0; j0 < n; j0 += vblock) {
    const int64_t j1 = j0 + vblock < n ? j0 + vblock : n, j2 = j1 + vblock < n ? j1 + vblock : n;
    LineFetch<T> next(vr, j1, j2, lines, passes * ((j1 - j0 + V_STEP - 1) / V_STEP));
    for (int64_t kh = 0; kh < hkv; ++kh)
      for (int64_t h = kh * g; h < (kh + 1) * g;) {
        const int64_t gb = (kh + 1) * g - h < gm ? (kh + 1) * g - h : gm;
        for (int64_t c0 = 0; c0 < 2 * part_passes; c0 += 2)
          for (int64_t ja = j0; ja < j1; ja += V_STEP) {
            next.step();
            pv(gb, h, ja, ja + V_STEP < j1 ? ja + V_STEP : j1, kh * d, c0);
          }
        h += gb;
      }
  }
}

inline void put(float* y, vf v) { vstore(y, v); }
inline void put(uint16_t* y, vf v) { vstore_bf16(y, vround_bf16_any(v)); }   // as f32_to_bf16

template <typename T>
int decode_attention(const T* q, const T* kc, const T* vc, const int32_t* tables, int64_t ld_table,
                     const int32_t* lens, int64_t b, int64_t hq, int64_t hkv, int64_t d, int64_t bs, float scale,
                     int64_t span_keys, T* out, float* lse) {
  if (d % 16 || d > MAX_D || d == 112 || (d > 128 && d != 256) || hq > MAX_HQ || hq % hkv
      || hq * d > MAX_HQ * MAX_D / 16)
    return -1;
  std::vector<Span> spans;
  std::vector<int64_t> first(b + 1);
  for (int64_t i = 0; i < b; ++i) {
    first[i] = (int64_t)spans.size();
    for (int64_t t = 0; t < lens[i]; t += span_keys) spans.push_back({i, t, t + span_keys < lens[i] ? t + span_keys : lens[i]});
  }
  first[b] = (int64_t)spans.size();
  const int64_t ns = (int64_t)spans.size(), per = hq * (d + 2);
  std::vector<float> part(ns * per);
#pragma omp parallel for schedule(dynamic, 1) if (ns > 1)
  for (int64_t i = 0; i < ns; ++i) {
    float* pp = part.data() + i * per;
    const Span& sp = spans[i];
    const T* qs = q + sp.seq * hq * d;
    const int32_t* tb = tables + sp.seq * ld_table;
    float *m = pp, *l = pp + hq, *acc = pp + 2 * hq;
    switch (d / 16) {
      case 1: attend_span<T, 1>(qs, kc, vc, tb, sp.t0, sp.t1, bs, hq, hkv, scale, m, l, acc); break;
      case 2: attend_span<T, 2>(qs, kc, vc, tb, sp.t0, sp.t1, bs, hq, hkv, scale, m, l, acc); break;
      case 3: attend_span<T, 3>(qs, kc, vc, tb, sp.t0, sp.t1, bs, hq, hkv, scale, m, l, acc); break;
      case 4: attend_span<T, 4>(qs, kc, vc, tb, sp.t0, sp.t1, bs, hq, hkv, scale, m, l, acc); break;
      case 5: attend_span<T, 5>(qs, kc, vc, tb, sp.t0, sp.t1, bs, hq, hkv, scale, m, l, acc); break;
      case 6: attend_span<T, 6>(qs, kc, vc, tb, sp.t0, sp.t1, bs, hq, hkv, scale, m, l, acc); break;
      case 8: attend_span<T, 8>(qs, kc, vc, tb, sp.t0, sp.t1, bs, hq, hkv, scale, m, l, acc); break;
      case 16: attend_span<T, 16>(qs, kc, vc, tb, sp.t0, sp.t1, bs, hq, hkv, scale, m, l, acc); break;
    }
  }
  for (int64_t i = 0; i < b; ++i)
    for (int64_t h = 0; h < hq; ++h) {
      T* o = out + (i * hq + h) * d;
      if (first[i] == first[i + 1]) {             // no keys: zeros, lse -inf
        for (int c = 0; c < d / 16; ++c) put(o + 16 * c, vzero());
        lse[i * hq + h] = -INFINITY;
        continue;
      }
      float mx = -INFINITY;
      for (int64_t s = first[i]; s < first[i + 1]; ++s) mx = std::max(mx, part[s * per + h]);
      float total = 0.f;
      vf a[MAX_D / 16];
      for (int c = 0; c < d / 16; ++c) a[c] = vzero();
      for (int64_t s = first[i]; s < first[i + 1]; ++s) {
        const float* pp = part.data() + s * per;
        const float w = exp_flushed(pp[h] - mx);
        total += pp[hq + h] * w;
        for (int c = 0; c < d / 16; ++c) a[c] = vfma(vset1(w), vload(pp + 2 * hq + h * d + 16 * c), a[c]);
      }
      for (int c = 0; c < d / 16; ++c) put(o + 16 * c, vdiv(a[c], vset1(total)));
      lse[i * hq + h] = mx + logf(total);
    }
  return 0;
}

}  // namespace
#endif

extern "C" {

// 1 where this build has the decode attention kernel (AVX-512, or AVX2 with FMA), else 0.
int mn_decode_attention_isa() {
#if defined(MN_DECODE_ATTENTION)
  return 1;
#else
  return 0;
#endif
}

// q [B, Hq, D], caches [num_blocks, bs, Hkv, D], tables [B, ld_table] int32, lens [B] int32 (all
// contiguous, q and caches of one dtype: 0 float32, 1 bfloat16) -> out [B, Hq, D] (that dtype),
// lse [B, Hq] float32. span_keys: keys per unit of work. Returns 0, or -1 for an unsupported shape.
int mn_decode_attention(int dtype, const void* q, const void* kc, const void* vc, const int32_t* tables,
                        int64_t ld_table, const int32_t* lens, int64_t b, int64_t hq, int64_t hkv, int64_t d,
                        int64_t bs, float scale, int64_t span_keys, void* out, float* lse) {
#if defined(MN_DECODE_ATTENTION)
  if (dtype == 0)
    return decode_attention<float>((const float*)q, (const float*)kc, (const float*)vc, tables, ld_table, lens, b,
                                   hq, hkv, d, bs, scale, span_keys, (float*)out, lse);
  if (dtype == 1)
    return decode_attention<uint16_t>((const uint16_t*)q, (const uint16_t*)kc, (const uint16_t*)vc, tables, ld_table,
                                      lens, b, hq, hkv, d, bs, scale, span_keys, (uint16_t*)out, lse);
#endif
  return -1;
}
}

// ---- the elementwise steps of a layer ------------------------------------------------------------
//
// For a few rows the eager expressions below cost a handful of torch ops each (RMSNorm 8, RoPE of q
// and k 10, SiLU-and-multiply 3), microseconds of dispatch apiece around nanoseconds of arithmetic;
// for a prefill chunk's rows they are passes over memory each (one layer's steps on a 1K float32
// chunk: 2.9 ms in torch's ops, 0.8 here, bench/results/elementwise_prefill.md). Each is one call
// here, computing what the eager code computes with the same roundings: float32 arithmetic, each
// eager op's result rounded to the activations' dtype where the eager op rounds it (the file is
// compiled with -ffp-contract=off, so a product and a sum are never fused into one rounding). Only
// reductions (RMSNorm's sum of squares) and exp (SiLU) may differ in the last bit. Builds with the
// 16-lane type (AVX-512, AVX2 + FMA) run rows whose length is a multiple of 16 on it; more than
// ELEMENTWISE_SERIAL_ROWS rows are split over the threads.
namespace {

constexpr int64_t ELEMENTWISE_SERIAL_ROWS = 16;

inline float rnd(float v, float) { return v; }                      // to the dtype: float32 as is,
inline float rnd(float v, uint16_t) { return bf16_to_f32(f32_to_bf16(v)); }   // bfloat16 rounded

#if defined(MN_DECODE_ATTENTION)
// 16 lanes rounded to the dtype as rnd rounds one value (bfloat16: to nearest even, NaN kept a NaN)
inline vf vrnd(vf v, float) { return v; }
inline vf vrnd(vf v, uint16_t) { return vround_bf16_any(v); }
// e^x over float32's whole range, for SiLU's e^-a (attention's vexp flushes below -87, where SiLU
// still has normal results): x clamped to [-104, 89] (e^x rounds to 0 below, overflows above), the
// polynomial as vexp's, times 2^n with denormal results and overflow rounded once (AVX-512: scalef;
// AVX2: as 2^(n/2) 2^(n - n/2), the first product exact). A NaN comes back as a number: SiLU's
// numerator keeps it a NaN.
#if defined(__AVX512F__)
inline __m512 exp_full_ps(__m512 x) {
  __m512 n;
  const __m512 p = exp_poly_ps(_mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(89.f)), &n);
  return _mm512_scalef_ps(p, n);
}
// silu(a) = a / (1 + e^-a), the eager expression's operations
inline vf vsilu(vf a) {
  return {_mm512_div_ps(a.v, _mm512_add_ps(_mm512_set1_ps(1.f), exp_full_ps(_mm512_sub_ps(_mm512_setzero_ps(), a.v))))};
}
#else
inline __m256 exp_full8(__m256 x) {
  __m256 n;
  const __m256 p = exp_poly8(_mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-104.f)), _mm256_set1_ps(89.f)), &n);
  const __m256i ni = _mm256_cvtps_epi32(n), n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}
inline __m256 silu8(__m256 a) {               // a / (1 + e^-a), the eager expression's operations
  return _mm256_div_ps(a, _mm256_add_ps(_mm256_set1_ps(1.f), exp_full8(_mm256_sub_ps(_mm256_setzero_ps(), a))));
}
inline vf vsilu(vf a) { return {silu8(a.lo), silu8(a.hi)}; }
#endif
#endif

// Hugging Face's LlamaRMSNorm: y = (x * rsqrt(mean(x^2) + eps)) in the dtype, then weight * y in it.
template <typename T>
void rms_norm(const T* x, int64_t ldx, const T* w, T* out, int64_t ldo, int64_t rows, int64_t n, float eps) {
#pragma omp parallel for schedule(static) if (rows > ELEMENTWISE_SERIAL_ROWS)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * ldx;
    T* o = out + r * ldo;
#if defined(MN_DECODE_ATTENTION)
    if (n % 16 == 0) {
      vf ss = vzero();
      for (int64_t i = 0; i < n; i += 16) {
        const vf xi = vload(xr + i);
        ss = vadd(ss, vmul(xi, xi));
      }
      const vf inv = vset1(1.f / std::sqrt(vreduce_add(ss) / (float)n + eps));
      for (int64_t i = 0; i < n; i += 16) put(o + i, vmul(vload(w + i), vrnd(vmul(vload(xr + i), inv), T{})));
      continue;
    }
#endif
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; ++i) ss += load(xr, i) * load(xr, i);
    const float inv = 1.f / std::sqrt(ss / (float)n + eps);
    for (int64_t i = 0; i < n; ++i) store(o + i, load(w, i) * rnd(load(xr, i) * inv, T{}));
  }
}

// x * cos + rotate_half(x) * sin over rows of heads: x [rows, heads, d] with strides (sx0, sx1, 1),
// cos/sin [rows, d] contiguous -> out [rows, heads, d] contiguous.
template <typename T>
void rope(const T* x, int64_t sx0, int64_t sx1, const T* cos, const T* sin, T* out, int64_t rows, int64_t heads,
          int64_t d) {
  const int64_t half = d / 2;
#pragma omp parallel for schedule(static) if (rows > ELEMENTWISE_SERIAL_ROWS)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < heads; ++h) {
      const T* xr = x + r * sx0 + h * sx1;
      const T* c = cos + r * d;
      const T* s = sin + r * d;
      T* o = out + (r * heads + h) * d;
#if defined(MN_DECODE_ATTENTION)
      if (half % 16 == 0) {
        for (int64_t i = 0; i < d; i += 16) {
          // rotate_half: -x[i + half] in the first half, x[i - half] in the second (negation is exact)
          const vf rot = i < half ? vsub(vzero(), vload(xr + i + half)) : vload(xr + i - half);
          put(o + i, vadd(vrnd(vmul(vload(xr + i), vload(c + i)), T{}), vrnd(vmul(rot, vload(s + i)), T{})));
        }
        continue;
      }
#endif
      for (int64_t i = 0; i < d; ++i) {
        const float rot = i < half ? -load(xr, i + half) : load(xr, i - half);
        store(o + i, rnd(load(xr, i) * load(c, i), T{}) + rnd(rot * load(s, i), T{}));
      }
    }
}

// silu(gate) * up, gate and up the two halves of each row of gu [rows, 2n] (row stride ldgu).
template <typename T>
void silu_mul(const T* gu, int64_t ldgu, T* out, int64_t rows, int64_t n) {
#pragma omp parallel for schedule(static) if (rows > ELEMENTWISE_SERIAL_ROWS)
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = gu + r * ldgu;
    const T* u = g + n;
    T* o = out + r * n;
#if defined(MN_DECODE_ATTENTION)
    if (n % 16 == 0) {
      for (int64_t i = 0; i < n; i += 16) put(o + i, vmul(vrnd(vsilu(vload(g + i)), T{}), vload(u + i)));
      continue;
    }
#endif
    for (int64_t i = 0; i < n; ++i) {
      const float a = load(g, i);
      store(o + i, rnd(a / (1.f + std::exp(-a)), T{}) * load(u, i));
    }
  }
}

}  // namespace

extern "C" {

void mn_rms_norm(int dtype, const void* x, int64_t ldx, const void* w, void* out, int64_t ldo, int64_t rows,
                 int64_t n, float eps) {
  if (dtype == 0) rms_norm<float>((const float*)x, ldx, (const float*)w, (float*)out, ldo, rows, n, eps);
  else rms_norm<uint16_t>((const uint16_t*)x, ldx, (const uint16_t*)w, (uint16_t*)out, ldo, rows, n, eps);
}

void mn_rope(int dtype, const void* x, int64_t sx0, int64_t sx1, const void* cos, const void* sin, void* out,
             int64_t rows, int64_t heads, int64_t d) {
  if (dtype == 0) rope<float>((const float*)x, sx0, sx1, (const float*)cos, (const float*)sin, (float*)out, rows, heads, d);
  else rope<uint16_t>((const uint16_t*)x, sx0, sx1, (const uint16_t*)cos, (const uint16_t*)sin, (uint16_t*)out, rows,
                      heads, d);
}

void mn_silu_mul(int dtype, const void* gu, int64_t ld, void* out, int64_t rows, int64_t n) {
  if (dtype == 0) silu_mul<float>((const float*)gu, ld, (float*)out, rows, n);
  else silu_mul<uint16_t>((const uint16_t*)gu, ld, (uint16_t*)out, rows, n);
}

// 1 where the elementwise steps run on the 16-lane type (rows of a multiple of 16 values) and split
// rows over the threads: worth taking a prefill chunk's rows; 0 where they are scalar loops (only a
// decode step's few rows beat torch's ops with them).
int mn_elementwise_isa() {
#if defined(MN_DECODE_ATTENTION)
  return 1;
#else
  return 0;
#endif
}
}

// ---- a bfloat16 prefill chunk's attention (AVX512-BF16) ----------------------------------------
//
// Queries [n, Hq, D] at positions q_start + i against keys [L, Hkv, D] at positions k_start + j:
// query i sees key j iff k_start + j <= q_start + i (causal by position; every key when the chunk
// comes after all of them), in one call: no split into a non-causal and a causal part, no merge.
// Work: (KV head, block of QB query positions) tasks, later blocks (more keys) first; a task walks the
// keys in tiles of BK, packs each tile's K as pairs along D and V as pairs along the keys, and runs an
// online softmax over register blocks of RB query rows (the g query heads of the KV head are rows too:
// GQA without copies). Both products are vdpbf16ps (two bfloat16 products summed in float32 per lane:
// twice the float32 multiply-add rate), the numerics of torch's flash kernel for bfloat16: scores
// from exact bfloat16 products summed in float32 and then scaled, the softmax in float32, its weights
// rounded to bfloat16 for the product with V (their sum not), the output rounded once.
#if defined(__AVX512BF16__)
namespace {

constexpr int CBK = 64, CQB = 32, CRB = 6;

template <int NC>
void chunk_task_bf16(const uint16_t* q, int64_t sq0, int64_t sq1, const uint16_t* k, int64_t sk0, const uint16_t* v,
                     int64_t sv0, int64_t i0, int64_t i1, int64_t kh, int64_t g, int64_t L, int64_t diag, float scale,
                     uint16_t* out, int64_t hq, float* lse, float* work) {
  constexpr int64_t d = 16 * NC;
  const int64_t rows = (i1 - i0) * g;                     // row r: position i0 + r / g, head kh * g + r % g
  float* o = work;                                        // [rows][d] running sums
  float* m = o + rows * d;                                // [rows]
  float* l = m + rows;                                    // [rows]
  uint32_t* qp = (uint32_t*)(l + rows);                   // [rows][d / 2] q as bf16 pairs
  uint32_t* kp = qp + rows * d / 2;                       // [d / 2][CBK] K pairs along d
  uint32_t* vp = kp + d / 2 * CBK;                        // [CBK / 2][d] V pairs along the keys
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* qr = q + (i0 + r / g) * sq0 + (kh * g + r % g) * sq1;
    memcpy(qp + r * d / 2, qr, d * sizeof(uint16_t));
    for (int64_t e = 0; e < d; ++e) o[r * d + e] = 0.f;
    m[r] = -INFINITY;
    l[r] = 0.f;
  }
  const int64_t kend = std::min(L, i1 + diag);            // keys the task's last query sees
  alignas(64) float p[CRB][CBK];
  for (int64_t j0 = 0; j0 < kend; j0 += CBK) {
    const int64_t nk = std::min<int64_t>(CBK, kend - j0);
    for (int64_t j = 0; j < CBK; ++j) {                     // K pairs: kp[e2][j] = (k[j][2 e2], k[j][2 e2 + 1])
      if (j < nk) {
        const uint32_t* kr = (const uint32_t*)(k + (j0 + j) * sk0 + kh * d);
        for (int64_t e2 = 0; e2 < d / 2; ++e2) kp[e2 * CBK + j] = kr[e2];
      } else {
        for (int64_t e2 = 0; e2 < d / 2; ++e2) kp[e2 * CBK + j] = 0;
      }
    }
    for (int64_t j2 = 0; j2 < CBK / 2; ++j2) {             // V pairs: vp[j2][e] = (v[2 j2][e], v[2 j2 + 1][e])
      const int64_t ja = j0 + 2 * j2, jb = ja + 1;
      const uint16_t* va = ja < j0 + nk ? v + ja * sv0 + kh * d : nullptr;
      const uint16_t* vb = jb < j0 + nk ? v + jb * sv0 + kh * d : nullptr;
      uint16_t* dst = (uint16_t*)(vp + j2 * d);
      for (int64_t e = 0; e < d; ++e) {
        dst[2 * e] = va ? va[e] : 0;
        dst[2 * e + 1] = vb ? vb[e] : 0;
      }
    }
    for (int64_t r0 = 0; r0 < rows; r0 += CRB) {
      const int rb = (int)std::min<int64_t>(CRB, rows - r0);
      __m512 s[CRB][4];
      for (int r = 0; r < CRB; ++r)
        for (int u = 0; u < 4; ++u) s[r][u] = _mm512_setzero_ps();
      for (int64_t e2 = 0; e2 < d / 2; ++e2) {
        __m512i kv[4];
        for (int u = 0; u < 4; ++u) kv[u] = _mm512_loadu_si512(kp + e2 * CBK + 16 * u);
        for (int r = 0; r < CRB; ++r) {
          if (r >= rb) break;
          const __m512i qb = _mm512_set1_epi32((int)qp[(r0 + r) * d / 2 + e2]);
          for (int u = 0; u < 4; ++u) s[r][u] = _mm512_dpbf16_ps(s[r][u], (__m512bh)qb, (__m512bh)kv[u]);
        }
      }
      for (int r = 0; r < rb; ++r) {
        const int64_t rr = r0 + r;
        const int64_t last = (i0 + rr / g) + diag - j0;     // the last key (tile index) this row sees
        float mt = -INFINITY;
        for (int u = 0; u < 4; ++u) {
          const int64_t lim = std::min<int64_t>(nk, last + 1) - 16 * u;
          const __mmask16 vis = lim >= 16 ? (__mmask16)0xFFFF : lim <= 0 ? (__mmask16)0 : (__mmask16)((1u << lim) - 1);
          s[r][u] = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), vis, _mm512_mul_ps(s[r][u], _mm512_set1_ps(scale)));
          mt = std::max(mt, _mm512_reduce_max_ps(s[r][u]));
        }
        if (mt == -INFINITY) {
          for (int u = 0; u < 4; ++u) _mm512_store_ps(p[r] + 16 * u, _mm512_setzero_ps());
          continue;
        }
        const float mn = std::max(m[rr], mt);
        const float corr = m[rr] == -INFINITY ? 0.f : exp_flushed(m[rr] - mn);
        __m512 sum = _mm512_setzero_ps();
        for (int u = 0; u < 4; ++u) {
          const __m512 pu = exp_ps(_mm512_sub_ps(s[r][u], _mm512_set1_ps(mn)));
          _mm512_store_ps(p[r] + 16 * u, pu);
          sum = _mm512_add_ps(sum, pu);
        }
        l[rr] = l[rr] * corr + _mm512_reduce_add_ps(sum);
        m[rr] = mn;
        if (corr != 1.f)
          for (int c = 0; c < NC; ++c)
            _mm512_storeu_ps(o + rr * d + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(o + rr * d + 16 * c), _mm512_set1_ps(corr)));
      }
      // o += p . V, the weights as bf16 pairs along the keys
      alignas(64) uint32_t pp[CRB][CBK / 2];
      for (int r = 0; r < rb; ++r)
        for (int64_t j2 = 0; j2 < CBK / 2; ++j2)
          pp[r][j2] = (uint32_t)f32_to_bf16(p[r][2 * j2]) | ((uint32_t)f32_to_bf16(p[r][2 * j2 + 1]) << 16);
      __m512 acc[CRB][NC];
      for (int r = 0; r < CRB; ++r) {
        if (r >= rb) break;
        for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_loadu_ps(o + (r0 + r) * d + 16 * c);
      }
      const int64_t npairs = (nk + 1) / 2;
      for (int64_t j2 = 0; j2 < npairs; ++j2) {
        __m512i vv[NC];
        for (int c = 0; c < NC; ++c) vv[c] = _mm512_loadu_si512(vp + j2 * d + 16 * c);
        for (int r = 0; r < CRB; ++r) {
          if (r >= rb) break;
          const __m512i pb = _mm512_set1_epi32((int)pp[r][j2]);
          for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)pb, (__m512bh)vv[c]);
        }
      }
      for (int r = 0; r < CRB; ++r) {
        if (r >= rb) break;
        for (int c = 0; c < NC; ++c) _mm512_storeu_ps(o + (r0 + r) * d + 16 * c, acc[r][c]);
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r / g, h = kh * g + r % g;
    uint16_t* dst = out + (i * hq + h) * d;
    if (l[r] == 0.f) {                                    // no visible key: zeros, lse -inf
      for (int64_t e = 0; e < d; ++e) dst[e] = 0;
      lse[i * hq + h] = -INFINITY;
      continue;
    }
    const float inv = 1.f / l[r];
    for (int64_t e = 0; e < d; ++e) dst[e] = f32_to_bf16(o[r * d + e] * inv);
    lse[i * hq + h] = m[r] + logf(l[r]);
  }
}

template <int NC>
void chunk_attention_bf16(const uint16_t* q, int64_t sq0, int64_t sq1, const uint16_t* k, int64_t sk0,
                          const uint16_t* v, int64_t sv0, int64_t n, int64_t L, int64_t hq, int64_t hkv, int64_t diag,
                          float scale, uint16_t* out, float* lse) {
  const int64_t g = hq / hkv, blocks = (n + CQB - 1) / CQB, tasks = hkv * blocks, d = 16 * NC;
  const int64_t per = CQB * g * d + CQB * g * 2 + CQB * g * d / 2 + d / 2 * CBK + CBK / 2 * d + 64;
#pragma omp parallel
  {
    std::vector<float> work(per);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t kh = t % hkv, blk = blocks - 1 - t / hkv;   // later query blocks see more keys: first
      const int64_t i0 = blk * CQB, i1 = std::min(n, i0 + CQB);
      chunk_task_bf16<NC>(q, sq0, sq1, k, sk0, v, sv0, i0, i1, kh, g, L, diag, scale, out, hq, lse, work.data());
    }
  }
}

}  // namespace
#endif

extern "C" {

// 1 where this build has the bfloat16 chunk attention kernel (AVX512-BF16), else 0.
int mn_chunk_attention_isa() {
#if defined(__AVX512BF16__)
  return 1;
#else
  return 0;
#endif
}

// bfloat16 q [n, Hq, D] strides (sq0, sq1, 1); k, v [L, Hkv, D] strides (sk0 / sv0, D, 1); query i sees
// key j iff j <= i + diag (diag = q_start - k_start) -> out [n, Hq, D] contiguous bfloat16, lse [n, Hq]
// float32. Returns 0, or -1 where this build cannot (no AVX512-BF16, another head dim).
int mn_chunk_attention_bf16(const void* q, int64_t sq0, int64_t sq1, const void* k, int64_t sk0, const void* v,
                            int64_t sv0, int64_t n, int64_t L, int64_t hq, int64_t hkv, int64_t d, int64_t diag,
                            float scale, void* out, float* lse) {
#if defined(__AVX512BF16__)
  if (hq % hkv || n <= 0 || L <= 0) return -1;
  const uint16_t *qq = (const uint16_t*)q, *kk = (const uint16_t*)k, *vv = (const uint16_t*)v;
  switch (d) {
    case 64: chunk_attention_bf16<4>(qq, sq0, sq1, kk, sk0, vv, sv0, n, L, hq, hkv, diag, scale, (uint16_t*)out, lse); return 0;
    case 128: chunk_attention_bf16<8>(qq, sq0, sq1, kk, sk0, vv, sv0, n, L, hq, hkv, diag, scale, (uint16_t*)out, lse); return 0;
    case 32: chunk_attention_bf16<2>(qq, sq0, sq1, kk, sk0, vv, sv0, n, L, hq, hkv, diag, scale, (uint16_t*)out, lse); return 0;
  }
#endif
  return -1;
}
}

// ---- a prefill chunk's attention on float32 multiply-adds (AVX2 builds) ---------------------------
//
// Queries [n, Hq, D] at positions q_start + i against keys [L, Hkv, D] at k_start + j, query i seeing
// key j iff j <= i + diag (diag = q_start - k_start), as mn_chunk_attention_bf16 but for float32 and
// bfloat16 on machines without AVX-512, where torch's flash kernel reached 60-110 GFLOP/s against a
// float32 GEMM's 140-180 (bench/results/cpu_kernels_avx2.md). K is laid out as K^T per KV head (float32,
// bfloat16 widened exactly) a window of KW keys at a time, shared by every task; V is read where it
// lies (float32) or widened once per window (bfloat16: widened per block of rows, 128 queries over
// 64K keys took 388 ms where the flash path took 290; widened once, 217 against 236). A task is (KV
// head, FQB query positions): its rows are those positions times the g query heads of the KV head
// (GQA without copies); it walks the keys its last position sees in blocks of CK:
// scores of FRB rows x 16 keys in registers (one multiply-add per key and dimension), the online
// softmax in float32 over the block (scores scaled after the product, as the flash kernel scales
// them), the weights that multiply V rounded to the input dtype as the flash kernel rounds them
// (weights_for_v; their sum not), then o += p . V for FRB rows x 16 dimensions in registers. The
// output is rounded once. Measured by phase (bench/results/chunk_phases.md, a build with
// -DMN_CHUNK_PHASES): the two products run at 0.83-0.96 of the GEMM's rate on a core (0.71-0.89 in a
// noisier run) and the softmax takes 14-18% of the threads' time (18-21% while every row's scores were
// loaded through masks): ~25 instructions per 8 scores off the diagonal (e^x alone 18) where the
// products take 16 8-lane multiply-adds per score, and e^x's Horner chain is long enough that one exp
// at a time left the pipes idle (two at a time, exp8x4: 2-4% faster). The two products' inner loops are
// unrolled by 4 (5-6% faster in paired runs at 4K and 8K keys; by 8: no better). Tried in paired
// development runs and not kept, none faster beyond the method's noise (~5%): e^x by Estrin's scheme
// or with n rounded by adding 1.5 * 2^23, the rows' corrections in one vector e^x, the K panels
// prefetched, d a constant 64 (unrolled 4 or 16; fully: 0.77-0.98x), blocks of 192 or 256 keys (64:
// 0.94-0.99x), 16 or 64 positions a task, and each phase run for up to 96 rows before the next (fewer
// switches between the three loops).
#if defined(MN_DECODE_ATTENTION) && !defined(__AVX512F__)
#define MN_CHUNK_F32 1
namespace {

constexpr int64_t CK = 128, FQB = 32, FRB = 6;   // keys per block, positions per task, rows per register block
constexpr int64_t KW = 16384;                    // keys laid out as K^T at a time (its scratch: KW Hkv D floats)

// A profiling build (-DMN_CHUNK_PHASES, bench/chunk_phases.py) counts the time-stamp counter's ticks
// each thread spends in the three phases of a register block: scores, softmax, V product.
#if defined(MN_CHUNK_PHASES)
#define MN_PHASE_MARK(t) const uint64_t t = __rdtsc()
#define MN_PHASE_ADD(k, a, b) (chunk_phase_ticks[omp_get_thread_num() % PHASE_THREADS].t[k] += (b) - (a))
constexpr int PHASE_THREADS = 256;
struct alignas(64) PhaseTicks { uint64_t t[3]; };
PhaseTicks chunk_phase_ticks[PHASE_THREADS];
#else
#define MN_PHASE_MARK(t)
#define MN_PHASE_ADD(k, a, b)
#endif

struct ChunkScratch { std::vector<float> kt, vw, state; };   // kept between calls (a call's state at 1,024
                                                                // queries is ~4.8 MB: allocated per call, it
                                                                // was mapped and faulted in each time)
inline ChunkScratch& chunk_scratch() {
  static thread_local ChunkScratch sc;
  return sc;
}

// A task's state between windows of keys: rows = its positions x the g heads of its kv head, row r
// position i0 + r / g, head kh * g + r % g.
struct ChunkRows {
  float *qs, *o, *m, *l;                         // [rows][d] q in float32, [rows][d] running sums, [rows], [rows]
};

// Keys [j_begin, j_end) (whole blocks of CK from the window's first key w0; kt: the window's K^T of
// the task's kv head, [block][CK / 16][d][16]; v: its V from key w0 on, rows sv0 apart) into a task's
// rows.
template <typename T, typename TV>
void chunk_keys_f32(ChunkRows st, int64_t rows, const float* kt, int64_t w0, const TV* v, int64_t sv0, int64_t i0,
                    int64_t g, int64_t d, int64_t j_begin, int64_t j_end, int64_t diag, float scale, float* p) {
  float *qs = st.qs, *o = st.o, *m = st.m, *l = st.l;
  // Block by block of keys, and within a block register block by register block of rows: the scores,
  // the softmax and the product with V of FRB rows one after the other, so that the block's K and V
  // (2 CK d floats) stay near across the rows of the task. CK = 128 against 64: 4-8% faster (each
  // row's softmax and each register block's sums of o cost the same per block, whatever its length;
  // 32 was slower still), though K and V no longer fit in L1 together.
  for (int64_t j0 = j_begin; j0 < j_end; j0 += CK) {
    const int64_t nk = std::min(CK, j_end - j0);
    const float* kp = kt + ((j0 - w0) / CK) * d * CK;
    const TV* vb = v + (j0 - w0) * sv0;
    for (int64_t r0 = 0; r0 < rows; r0 += FRB) {
      const int rb = (int)std::min<int64_t>(FRB, rows - r0);
      // keys of the block its last row sees (the others see no more): the register block's work ends
      // there (where it ran to the block's end, a prompt's first 1,024-token chunk spent ~10% of its
      // products on keys after the diagonal)
      const int64_t seen = std::min(nk, (i0 + (r0 + rb - 1) / g) + diag - j0 + 1), nvr = (seen + 15) / 16;
      if (seen <= 0) continue;               // its rows see none of the block: their state stays as it is
      MN_PHASE_MARK(t0);
      // scores p[r][j] = q_r . k_{j0+j}, FRB rows x 16 keys in registers
      for (int64_t jv = 0; jv < nvr; ++jv) {
        vf sr[FRB];
        for (int r = 0; r < FRB; ++r) sr[r] = vzero();
        const float* kc = kp + jv * 16 * d;
        const float* qb = qs + r0 * d;
        if (rb == FRB) {
#pragma GCC unroll 4
          for (int64_t e = 0; e < d; ++e) {
            const vf kv = vload(kc + e * 16);
            for (int r = 0; r < FRB; ++r) sr[r] = vfma(vset1(qb[r * d + e]), kv, sr[r]);
          }
        } else {
          for (int64_t e = 0; e < d; ++e) {
            const vf kv = vload(kc + e * 16);
            for (int r = 0; r < rb; ++r) sr[r] = vfma(vset1(qb[r * d + e]), kv, sr[r]);
          }
        }
        for (int r = 0; r < rb; ++r) vstore(p + r * CK + 16 * jv, sr[r]);
      }
      MN_PHASE_MARK(t1);
      // the online softmax of each row over the block: maxima and corrections first, then the weights;
      // a row's correction of o is applied where the product with V loads its sums (x 1 where the
      // maximum held: exact), not in a pass of its own
      // A row that sees every key of the block's vectors (all rows but those at the diagonal) takes both
      // loops without masks (`masked` false): a mask cost ~6 instructions per 8 scores in each loop, ~12
      // of the ~35 the softmax took per 8 scores (the kernel 1.05-1.08x in float32 in paired runs,
      // bench/results/kernel_ab_chunk_s28.md). The same values either way.
      auto row_max = [&](const float* pr, int64_t n, auto masked) {      // max of the row's n scores
        auto at = [&](int64_t jv) {
          if constexpr (decltype(masked)::value) return vload_first(pr + 16 * jv, n - 16 * jv, -INFINITY);
          else return vload(pr + 16 * jv);
        };
        vf mv = at(0);
        for (int64_t jv = 1; jv < nvr; ++jv) mv = vmax(mv, at(jv));
        return vreduce_max(mv);
      };
      auto row_weights = [&](float* pr, int64_t n, float mxr, auto masked) {   // weights in place; their sum
        auto keep = [&](vf v, int64_t jv) {
          if constexpr (decltype(masked)::value) return vkeep_first(v, n - 16 * jv);
          else return v;
        };
        const vf sc = vset1(scale), mx = vset1(mxr);
        vf sum = vzero();
        int64_t jv = 0;
        for (; jv + 1 < nvr; jv += 2) {        // two at a time: exp's steps interleaved (its chain is long)
          const vf a = vsub(vmul(vload(pr + 16 * jv), sc), mx), b = vsub(vmul(vload(pr + 16 * jv + 16), sc), mx);
          __m256 x[4] = {a.lo, a.hi, b.lo, b.hi};
          exp8x4(x);
          const vf pa = keep(vf{x[0], x[1]}, jv), pb = keep(vf{x[2], x[3]}, jv + 1);
          sum = vadd(sum, pa);
          sum = vadd(sum, pb);
          vstore(pr + 16 * jv, weights_for_v<T>(pa));
          vstore(pr + 16 * jv + 16, weights_for_v<T>(pb));
        }
        for (; jv < nvr; ++jv) {
          const vf pv = keep(vexp(vsub(vmul(vload(pr + 16 * jv), sc), mx)), jv);
          sum = vadd(sum, pv);
          vstore(pr + 16 * jv, weights_for_v<T>(pv));
        }
        return sum;
      };
      int64_t see[FRB];
      float mn[FRB], corr[FRB];
      for (int r = 0; r < rb; ++r) {
        see[r] = std::min(nk, (i0 + (r0 + r) / g) + diag - j0 + 1);    // keys of the block row r sees
        const float* pr = p + r * CK;
        const float mt = see[r] >= 16 * nvr ? row_max(pr, see[r], std::false_type{}) * scale
                         : see[r] > 0      ? row_max(pr, see[r], std::true_type{}) * scale
                                           : -INFINITY;
        const float mo = m[r0 + r];
        mn[r] = std::max(mo, mt);
        corr[r] = mo == mn[r] ? 1.f : mo == -INFINITY ? 0.f : exp_flushed(mo - mn[r]);
        m[r0 + r] = mn[r];
      }
      for (int r = 0; r < rb; ++r) {
        float* pr = p + r * CK;
        vf sum = vzero();
        if (see[r] <= 0)
          for (int64_t jv = 0; jv < nvr; ++jv) vstore(pr + 16 * jv, vzero());
        else if (see[r] >= 16 * nvr)
          sum = row_weights(pr, see[r], mn[r], std::false_type{});
        else
          sum = row_weights(pr, see[r], mn[r], std::true_type{});
        l[r0 + r] = l[r0 + r] * corr[r] + vreduce_add(sum);
      }
      MN_PHASE_MARK(t2);
      // o += p . V, FRB rows x 16 dimensions in registers
      for (int64_t e = 0; e < d; e += 16) {
        vf a[FRB];
        for (int r = 0; r < rb; ++r) a[r] = vmul(vload(o + (r0 + r) * d + e), vset1(corr[r]));   // x 1: exact
        if (rb == FRB) {
#pragma GCC unroll 4
          for (int64_t j = 0; j < seen; ++j) {
            const vf vv = vload(vb + j * sv0 + e);
            for (int r = 0; r < FRB; ++r) a[r] = vfma(vset1(p[r * CK + j]), vv, a[r]);
          }
        } else {
          for (int64_t j = 0; j < seen; ++j) {
            const vf vv = vload(vb + j * sv0 + e);
            for (int r = 0; r < rb; ++r) a[r] = vfma(vset1(p[r * CK + j]), vv, a[r]);
          }
        }
        for (int r = 0; r < rb; ++r) vstore(o + (r0 + r) * d + e, a[r]);
      }
      MN_PHASE_MARK(t3);
      MN_PHASE_ADD(0, t0, t1);
      MN_PHASE_ADD(1, t1, t2);
      MN_PHASE_ADD(2, t2, t3);
    }
  }
}

template <typename T>
int chunk_attention_f32(const T* q, int64_t sq0, int64_t sq1, const T* k, int64_t sk0, const T* v, int64_t sv0,
                        int64_t n, int64_t L, int64_t hq, int64_t hkv, int64_t d, int64_t diag, float scale, T* out,
                        float* lse) {
  if (hq % hkv || n <= 0 || L <= 0 || d % 16 || d > MAX_D) return -1;
  const int64_t g = hq / hkv, kend = std::max<int64_t>(0, std::min(L, n - 1 + diag + 1));   // keys any query sees
  const int64_t blocks = (n + FQB - 1) / FQB, tasks = hkv * blocks, per_task = FQB * g;
  // every task's rows (the output's size in float32, twice, and two floats a row): kept across windows
  ChunkScratch& sc = chunk_scratch();
  if ((int64_t)sc.state.size() < tasks * per_task * (2 * d + 2)) sc.state.resize(tasks * per_task * (2 * d + 2));
  float* const state = sc.state.data();
  auto rows_of = [&](int64_t t, int64_t* kh, int64_t* i0, int64_t* i1) -> ChunkRows {
    *kh = t % hkv;
    const int64_t blk = blocks - 1 - t / hkv;             // later query blocks see more keys: first
    *i0 = blk * FQB;
    *i1 = std::min(n, *i0 + FQB);
    float* base = state + t * per_task * (2 * d + 2);
    return {base, base + per_task * d, base + 2 * per_task * d, base + 2 * per_task * d + per_task};
  };
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    int64_t kh, i0, i1;
    const ChunkRows st = rows_of(t, &kh, &i0, &i1);
    for (int64_t r = 0; r < (i1 - i0) * g; ++r) {
      const T* qr = q + (i0 + r / g) * sq0 + (kh * g + r % g) * sq1;
      for (int64_t e = 0; e < d; e += 16) {
        vstore(st.qs + r * d + e, vload(qr + e));
        vstore(st.o + r * d + e, vzero());
      }
      st.m[r] = -INFINITY;
      st.l[r] = 0.f;
    }
  }
  // Windows of KW keys: K^T laid out in blocks of CK keys, each in panels of 16 keys,
  // [kh][block][CK / 16][d][16]: the scores' loop reads a panel front to back, 64 bytes a dimension
  // (rows the whole length apart, a multiple of 4 KiB, all fell in one L1 set and ran 1.4x slower at
  // 8K keys; rows CK floats apart, 64 bytes of every 4 lines a pass, ~5% slower than panels), then
  // every task's keys of the window. The scratch is KW Hkv D floats at most,
  // whatever the context.
  for (int64_t w0 = 0; w0 < kend; w0 += KW) {
    const int64_t w1 = std::min(kend, w0 + KW), nblk = (w1 - w0 + CK - 1) / CK, kblocks = nblk * CK / 16;
    if ((int64_t)sc.kt.size() < hkv * nblk * d * CK) sc.kt.resize(hkv * nblk * d * CK);
    float* kt = sc.kt.data();
    float* vw = nullptr;
    if constexpr (sizeof(T) == 2) {
      if ((int64_t)sc.vw.size() < hkv * (w1 - w0) * d) sc.vw.resize(hkv * (w1 - w0) * d);
      vw = sc.vw.data();
    }
#pragma omp parallel for schedule(static) if (hkv * kblocks > 1)
    for (int64_t t = 0; t < hkv * kblocks; ++t) {        // kt[kh][j / 16][e][j % 16] = k[w0 + j][kh][e], 16 keys a task
      const int64_t kh = t / kblocks, j0 = 16 * (t % kblocks);
      float* dst = kt + (kh * nblk + j0 / CK) * d * CK + (j0 % CK) * d;
      for (int64_t jj = 0; jj < 16; ++jj) {
        const int64_t j = w0 + j0 + jj;
        if (j < w1) {
          const T* src = k + j * sk0 + kh * d;
          for (int64_t e = 0; e < d; ++e) dst[e * 16 + jj] = load(src, e);
          if constexpr (sizeof(T) == 2) {        // bfloat16 V widened once, not once per block of rows
            const T* vs = v + j * sv0 + kh * d;
            float* vd = vw + (kh * (w1 - w0) + (j - w0)) * d;
            for (int64_t e = 0; e < d; e += 16) vstore(vd + e, vload(vs + e));
          }
        } else {
          for (int64_t e = 0; e < d; ++e) dst[e * 16 + jj] = 0.f;
        }
      }
    }
#pragma omp parallel
    {
      std::vector<float> p(FRB * CK);
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < tasks; ++t) {
        int64_t kh, i0, i1;
        const ChunkRows st = rows_of(t, &kh, &i0, &i1);
        const int64_t sees = std::min(w1, i1 - 1 + diag + 1);    // keys the task's last position sees
        if (sees <= w0) continue;
        if constexpr (sizeof(T) == 2)            // the window's V widened: [kh][key][d]
          chunk_keys_f32<T, float>(st, (i1 - i0) * g, kt + kh * nblk * d * CK, w0, vw + kh * (w1 - w0) * d, d, i0,
                                   g, d, w0, sees, diag, scale, p.data());
        else                                     // float32 V where it lies
          chunk_keys_f32<T, T>(st, (i1 - i0) * g, kt + kh * nblk * d * CK, w0, v + w0 * sv0 + kh * d, sv0, i0, g,
                               d, w0, sees, diag, scale, p.data());
      }
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    int64_t kh, i0, i1;
    const ChunkRows st = rows_of(t, &kh, &i0, &i1);
    for (int64_t r = 0; r < (i1 - i0) * g; ++r) {
      const int64_t i = i0 + r / g, h = kh * g + r % g;
      T* dst = out + (i * hq + h) * d;
      if (st.l[r] == 0.f) {                              // no visible key: zeros, lse -inf
        for (int64_t e = 0; e < d; e += 16) put(dst + e, vzero());
        lse[i * hq + h] = -INFINITY;
        continue;
      }
      const vf inv = vset1(1.f / st.l[r]);
      for (int64_t e = 0; e < d; e += 16) put(dst + e, vmul(vload(st.o + r * d + e), inv));
      lse[i * hq + h] = st.m[r] + logf(st.l[r]);
    }
  }
  return 0;
}

}  // namespace
#endif

extern "C" {

// The profiling build's ticks in the float32 chunk kernel's phases (scores, softmax, V product), summed
// over threads since the last call, into out[0..3), and the time-stamp counter into out[3]. Returns 0,
// or -1 in other builds (out untouched).
int mn_chunk_phases(uint64_t* out) {
#if defined(MN_CHUNK_PHASES) && defined(MN_CHUNK_F32)
  for (int k = 0; k < 3; ++k) {
    out[k] = 0;
    for (int t = 0; t < PHASE_THREADS; ++t) {
      out[k] += chunk_phase_ticks[t].t[k];
      chunk_phase_ticks[t].t[k] = 0;
    }
  }
  out[3] = __rdtsc();
  return 0;
#else
  (void)out;
  return -1;
#endif
}

// 1 where this build has the float32 / widened-bfloat16 chunk attention kernel (AVX2 builds), else 0.
int mn_chunk_attention_f32_isa() {
#if defined(MN_CHUNK_F32)
  return 1;
#else
  return 0;
#endif
}

// As mn_chunk_attention_bf16, for dtype 0 float32 or 1 bfloat16 (out in that dtype). Returns 0, or -1
// where this build cannot (no such kernel, a head dim not a multiple of 16 or over 256).
int mn_chunk_attention_f32(int dtype, const void* q, int64_t sq0, int64_t sq1, const void* k, int64_t sk0,
                           const void* v, int64_t sv0, int64_t n, int64_t L, int64_t hq, int64_t hkv, int64_t d,
                           int64_t diag, float scale, void* out, float* lse) {
#if defined(MN_CHUNK_F32)
  if (dtype == 0)
    return chunk_attention_f32<float>((const float*)q, sq0, sq1, (const float*)k, sk0, (const float*)v, sv0, n, L, hq,
                                      hkv, d, diag, scale, (float*)out, lse);
  if (dtype == 1)
    return chunk_attention_f32<uint16_t>((const uint16_t*)q, sq0, sq1, (const uint16_t*)k, sk0, (const uint16_t*)v,
                                         sv0, n, L, hq, hkv, d, diag, scale, (uint16_t*)out, lse);
#endif
  return -1;
}
}

// ---- a decode step through all the layers of a stage, in one call -------------------------------
//
// What LlamaModel's layers compute for a few rows that each decode one token (common/model/
// decode_layers.py checks that the step is that and that every step below is the one the module
// would take), through the functions above in the modules' order: RMSNorm, the fused q/k/v
// product, RoPE of q and of k, K and V stored at the rows' cache slots, decode attention, the o
// product, the residual sum, RMSNorm, the gate/up product, SiLU-and-multiply, the down product, the
// residual sum (each sum rounded to the dtype, as torch's add). So the hidden states are the per-op
// path's bit for bit, without the ~15 Python calls and tensor allocations of each layer.
#if defined(MN_DECODE_ATTENTION)
namespace {

template <typename T>
void add_into(T* x, const T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) store(x + i, load(x, i) + load(y, i));
}

template <typename T>
int decode_layers(int64_t layers, T* x, int64_t rows, int64_t hidden, const void* const* ln1, const void* const* wqkv,
                  const void* const* wo, const void* const* ln2, const void* const* wgu, const void* const* wdown,
                  int64_t inter, float eps, const T* cos, const T* sin, int64_t hq, int64_t hkv, int64_t d,
                  void* const* kcache, void* const* vcache, const int64_t* slots, const int32_t* tables,
                  int64_t ld_table, const int32_t* lens, int64_t bs, float scale, int64_t span, T* o_buf,
                  float* lse_buf, int (*combine)(int64_t)) {
  const int64_t nq = hq * d, nkv = hkv * d, nqkv = nq + 2 * nkv;
  std::vector<T> h(rows * hidden), qkv(rows * nqkv), q(rows * nq), k(rows * nkv), o_own(o_buf ? 0 : rows * nq),
      y(rows * hidden), gu(rows * 2 * inter), act(rows * inter);
  std::vector<float> lse_own(lse_buf ? 0 : rows * hq);
  T* o = o_buf ? o_buf : o_own.data();
  float* lse = lse_buf ? lse_buf : lse_own.data();
  for (int64_t l = 0; l < layers; ++l) {
    rms_norm<T>(x, hidden, (const T*)ln1[l], h.data(), hidden, rows, hidden, eps);
    gemv<T, T>(h.data(), hidden, (const T*)wqkv[l], hidden, qkv.data(), nqkv, rows, nqkv, hidden);
    rope<T>(qkv.data(), nqkv, d, cos, sin, q.data(), rows, hq, d);
    rope<T>(qkv.data() + nq, nqkv, d, cos, sin, k.data(), rows, hkv, d);
    T* kc = (T*)kcache[l];
    T* vc = (T*)vcache[l];
    for (int64_t r = 0; r < rows; ++r) {
      if (slots[r] < 0) continue;                // a row whose K and V another KV-parallel group stores
      memcpy(kc + slots[r] * nkv, k.data() + r * nkv, nkv * sizeof(T));
      memcpy(vc + slots[r] * nkv, qkv.data() + r * nqkv + nq + nkv, nkv * sizeof(T));
    }
    if (decode_attention<T>(q.data(), kc, vc, tables, ld_table, lens, rows, hq, hkv, d, bs, scale, span, o, lse))
      return -1;
    if (combine && combine(l)) return -2;        // the groups' partial results merged into o (KV parallel)
    gemv<T, T>(o, nq, (const T*)wo[l], nq, y.data(), hidden, rows, hidden, nq);
    add_into<T>(x, y.data(), rows * hidden);
    rms_norm<T>(x, hidden, (const T*)ln2[l], h.data(), hidden, rows, hidden, eps);
    gemv<T, T>(h.data(), hidden, (const T*)wgu[l], hidden, gu.data(), 2 * inter, rows, 2 * inter, hidden);
    silu_mul<T>(gu.data(), 2 * inter, act.data(), rows, inter);
    gemv<T, T>(act.data(), inter, (const T*)wdown[l], inter, y.data(), hidden, rows, hidden, inter);
    add_into<T>(x, y.data(), rows * hidden);
  }
  return 0;
}

}  // namespace
#endif

extern "C" {

// x [rows, hidden] (contiguous, updated in place): the hidden states entering the first layer, leaving
// the last. Per layer l: RMSNorm weights ln1[l], ln2[l] [hidden]; weights [out, in] contiguous: wqkv[l]
// [(hq + 2 hkv) d, hidden], wo[l] [hidden, hq d], wgu[l] [2 inter, hidden] (gate | up), wdown[l]
// [hidden, inter]; the K and V caches kcache[l], vcache[l] [num_blocks, bs, hkv, d]. cos, sin [rows, d];
// slots [rows] int64 (where each row's K and V go), tables [rows, ld_table] and lens [rows] int32 (its
// keys, its own included; a row with no keys here has length 0: zeros, lse -inf). A slot < 0: the row's
// K and V are not stored here (another KV-parallel group stores them). o_buf [rows, hq d] in the dtype and
// lse_buf [rows, hq] float32, if not null, receive each layer's attention output and log-sum-exp (else
// scratch of the call's own); combine, if not null, is called after each layer's attention with the
// layer's index (0 .. layers - 1) and leaves the merged output of every KV-parallel group in o_buf,
// returning 0 (anything else stops the step). dtype 0 float32, 1 bfloat16. Returns 0; -1 (nothing is
// complete then) for a shape the attention kernel does not take or a build without it; -2 where
// combine failed (the layers before it are done, and their K and V stored).
int mn_decode_layers(int dtype, int64_t layers, void* x, int64_t rows, int64_t hidden, const void* const* ln1,
                     const void* const* wqkv, const void* const* wo, const void* const* ln2, const void* const* wgu,
                     const void* const* wdown, int64_t inter, float eps, const void* cos, const void* sin, int64_t hq,
                     int64_t hkv, int64_t d, void* const* kcache, void* const* vcache, const int64_t* slots,
                     const int32_t* tables, int64_t ld_table, const int32_t* lens, int64_t bs, float scale,
                     int64_t span, void* o_buf, float* lse_buf, int (*combine)(int64_t)) {
#if defined(MN_DECODE_ATTENTION)
  if (dtype == 0)
    return decode_layers<float>(layers, (float*)x, rows, hidden, ln1, wqkv, wo, ln2, wgu, wdown, inter, eps,
                                (const float*)cos, (const float*)sin, hq, hkv, d, kcache, vcache, slots, tables,
                                ld_table, lens, bs, scale, span, (float*)o_buf, lse_buf, combine);
  if (dtype == 1)
    return decode_layers<uint16_t>(layers, (uint16_t*)x, rows, hidden, ln1, wqkv, wo, ln2, wgu, wdown, inter, eps,
                                   (const uint16_t*)cos, (const uint16_t*)sin, hq, hkv, d, kcache, vcache, slots,
                                   tables, ld_table, lens, bs, scale, span, (uint16_t*)o_buf, lse_buf, combine);
#endif
  return -1;
}
}
