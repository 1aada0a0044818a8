// Matrix-vector products of a decode step on the CPU: y[m, n] = sum_k x[m, k] * w[n, k] for a few
// rows of x (M <= 4) against a weight stored [N, K] row-major (nn.Linear's [out, in]).
//
// At decode a linear reads its whole weight for a handful of activations, so it can go no faster than
// the weight streams from memory. torch's CPU kernels for that shape (MKL / oneDNN through F.linear)
// reach 10-17 GB/s here where a plain read of the same bytes reaches 35-55
// (bench/results/cpu_gemv.md). This kernel streams each thread's contiguous block of rows once, front
// to back, each row loaded once and multiplied with every row of x, products
// accumulated in float32 (bfloat16 rows: each pair of products exact in float32, as the vdpbf16ps
// instruction computes them), the bfloat16 result rounded to nearest-even once, as torch rounds its
// float32 accumulator. Only the order of the sum differs from torch's kernels, so results agree to
// rounding, not bitwise.
//
// Compiled by common/model/cpu_gemv.py on the machine that runs it (-march=native): the AVX-512 paths
// where the compiler targets them, a portable loop the compiler vectorises (OpenMP simd) elsewhere.
// Threads: OpenMP, the runtime torch itself loaded (libgomp.so.1 is resolved to the loaded one), so
// torch.set_num_threads applies here too.
#include <omp.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
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

template <typename T, int M>
void rows_portable(const T* x, int64_t ldx, const T* w, int64_t ldw, T* y, int64_t ldy, int64_t r0,
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

template <typename P, int M>
void rows_avx512(const typename P::T* x, int64_t ldx, const typename P::T* w, int64_t ldw, typename P::T* y,
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

// The path each type takes on this build.
template <typename T, int M>
void rows(const T* x, int64_t ldx, const T* w, int64_t ldw, T* y, int64_t ldy, int64_t r0, int64_t r1, int64_t K) {
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 4) {
    rows_avx512<F32, M>(x, ldx, w, ldw, y, ldy, r0, r1, K);
    return;
  }
#if defined(MN_BF16_ISA)
  if constexpr (sizeof(T) == 2) {
    rows_avx512<BF16, M>(x, ldx, w, ldw, y, ldy, r0, r1, K);
    return;
  }
#endif
#endif
  rows_portable<T, M>(x, ldx, w, ldw, y, ldy, r0, r1, K);
}

template <typename T>
void gemv(const T* x, int64_t ldx, const T* w, int64_t ldw, T* y, int64_t ldy, int64_t M, int64_t N, int64_t K) {
  // Each thread takes one contiguous block of rows, so each streams its part of w front to back; a
  // small matrix is not worth waking a second thread for.
  const int threads = N * K < 65536 ? 1 : omp_get_max_threads();
#pragma omp parallel num_threads(threads)
  {
    const int nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t per = (N + nt - 1) / nt;
    const int64_t r0 = t * per, r1 = r0 + per < N ? r0 + per : N;
    for (int64_t m = 0; r0 < r1 && m < M; m += 4) {
      const T* xm = x + m * ldx;
      T* ym = y + m * ldy;
      switch (M - m < 4 ? M - m : 4) {
        case 1: rows<T, 1>(xm, ldx, w, ldw, ym, ldy, r0, r1, K); break;
        case 2: rows<T, 2>(xm, ldx, w, ldw, ym, ldy, r0, r1, K); break;
        case 3: rows<T, 3>(xm, ldx, w, ldw, ym, ldy, r0, r1, K); break;
        default: rows<T, 4>(xm, ldx, w, ldw, ym, ldy, r0, r1, K); break;
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
#else
  return "float32=portable bfloat16=portable";
#endif
}

void mn_gemv_f32(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy, int64_t M,
                 int64_t N, int64_t K) {
  gemv<float>(x, ldx, w, ldw, y, ldy, M, N, K);
}

void mn_gemv_bf16(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw, uint16_t* y, int64_t ldy,
                  int64_t M, int64_t N, int64_t K) {
  gemv<uint16_t>(x, ldx, w, ldw, y, ldy, M, N, K);
}
}
