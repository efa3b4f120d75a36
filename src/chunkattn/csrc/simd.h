// SIMD helpers shared by chunkattn's CPU kernels: 16-float vectors through GCC/Clang vector extensions (the
// same source compiles to AVX-512, AVX2 or NEON), loads from float32 / bfloat16, reductions, a fast exp2.
#pragma once

#include <c10/util/BFloat16.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <cstddef>
#include <cstdint>
#include <limits>
#include <new>
#include <utility>
#include <vector>

namespace chunkattn {


// std::vector storage on 64-byte (cache line) boundaries. Scratch that tile loads and stores read row by row must
// be: an AMX tile load whose rows straddle two lines measured ~6x slower (42 vs 7 cycles, Xeon with AMX), and
// malloc only promises 16 bytes.
template <typename T>
struct LineAllocator {
  using value_type = T;
  LineAllocator() = default;
  template <typename U>
  LineAllocator(const LineAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t{64}); }
  template <typename U>
  bool operator==(const LineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAllocator<U>&) const { return false; }
};
template <typename T>
using line_vector = std::vector<T, LineAllocator<T>>;

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t i16v __attribute__((vector_size(64)));
typedef uint32_t u16v __attribute__((vector_size(64)));
typedef uint16_t h16u __attribute__((vector_size(32), aligned(2)));

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// All lanes = x, one broadcast (a load when x comes from memory). Not `v16{} + x`: the compiler must keep that add
// (0 + -0.0 is +0.0), so each splat became a scalar add plus a register broadcast on the multiply-add ports,
// which halved the rate of the products they fed.
inline v16 splat(float x) { return v16{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
// Keep a value in a register: stops the compiler from folding its load into every instruction that uses it
// (each folded copy is another load, and loads, not multiplies, would then bound the products).
inline void pin(v16& x) { asm volatile("" : "+v"(x)); }
inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline v16 load(const c10::BFloat16* p) {
  h16u h = *reinterpret_cast<const h16u*>(p);
  u16v w = __builtin_convertvector(h, u16v) << 16;
  return (v16)w;
}
inline void store(float* p, v16 x) { *reinterpret_cast<v16u*>(p) = x; }
// float32 -> bfloat16 bits, rounding to nearest even (what c10::BFloat16 does, NaN aside), 16 at a time.
inline u16v bf16_bits(v16 x) {
  u16v b = (u16v)x;
  return (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
}
inline v16 round_bf16(v16 x) { return (v16)(bf16_bits(x) << 16); }  // x as the bfloat16 it would be stored as
inline void store(c10::BFloat16* p, v16 x) {
  *reinterpret_cast<h16u*>(p) = __builtin_convertvector(bf16_bits(x), h16u);
}
inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
template <int... I>
inline v16 swap(v16 x) { return __builtin_shuffle(x, i16v{I...}); }
inline v16 fold(v16 x, int step) {  // x[i] op x[i ^ step] lanes, for tree reductions
  switch (step) {
    case 8: return swap<8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7>(x);
    case 4: return swap<4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11>(x);
    case 2: return swap<2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13>(x);
    default: return swap<1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14>(x);
  }
}
inline float hsum(v16 x) {
  for (int step = 8; step; step >>= 1) x += fold(x, step);
  return x[0];
}
// Sixteen sums at once: lane t of the result = hsum(a[t]). A tree of 15 two-input shuffles-and-adds (each halves
// the lanes per input and pairs two inputs), then one permute that undoes the tree's bit-reversed lane order:
// 46 vector operations instead of 16 x 8 for sixteen hsum calls.
inline v16 hsum16(const v16* a) {
  v16 b[8], c[4], e[2];
  for (int m = 0; m < 8; ++m)  // lanes 0-7: a[2m], 8-15: a[2m + 1]
    b[m] = __builtin_shuffle(a[2 * m], a[2 * m + 1], i16v{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}) +
           __builtin_shuffle(a[2 * m], a[2 * m + 1], i16v{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  for (int n = 0; n < 4; ++n)  // quarters: keys 4n, 4n + 2, 4n + 1, 4n + 3
    c[n] = __builtin_shuffle(b[2 * n], b[2 * n + 1], i16v{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27}) +
           __builtin_shuffle(b[2 * n], b[2 * n + 1], i16v{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
  for (int p = 0; p < 2; ++p)
    e[p] = __builtin_shuffle(c[2 * p], c[2 * p + 1], i16v{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29}) +
           __builtin_shuffle(c[2 * p], c[2 * p + 1], i16v{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
  const v16 f = __builtin_shuffle(e[0], e[1], i16v{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}) +
                __builtin_shuffle(e[0], e[1], i16v{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31});
  return __builtin_shuffle(f, i16v{0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15});  // lane l held key rev(l)
}
inline float hmax(v16 x) {
  for (int step = 8; step; step >>= 1) {
    const v16 y = fold(x, step);
    x = x > y ? x : y;
  }
  return x[0];
}

// 2^f for f in [-0.5, 0.5]: the Taylor series of e^(f ln 2) to degree 6 (relative error < 2e-7).
inline v16 exp2_fraction(v16 f) {
  constexpr float c1 = kLn2, c2 = c1 * kLn2 / 2, c3 = c2 * kLn2 / 3, c4 = c3 * kLn2 / 4, c5 = c4 * kLn2 / 5,
                  c6 = c5 * kLn2 / 6;  // ln2^k / k!
  v16 p = splat(c6);
  p = p * f + c5;
  p = p * f + c4;
  p = p * f + c3;
  p = p * f + c2;
  p = p * f + c1;
  return p * f + 1.0f;
}

// 2^f for f in [-0.5, 0.5] to degree 4 (relative error < 5e-5): for probabilities that are rounded to bf16
// (8 bits) right after.
inline v16 exp2_fraction4(v16 f) {
  constexpr float c1 = kLn2, c2 = c1 * kLn2 / 2, c3 = c2 * kLn2 / 3, c4 = c3 * kLn2 / 4;
  v16 p = splat(c4);
  p = p * f + c3;
  p = p * f + c2;
  p = p * f + c1;
  return p * f + 1.0f;
}

// 2^f for f in [-0.5, 0.5] to degree 3 with coefficients fitted to the relative error (< 7.5e-5, as degree 4's
// Taylor series): for probabilities that are rounded to bf16 (8 bits) right after.
inline v16 exp2_fraction3(v16 f) {
  v16 p = splat(0.05517167f);
  p = p * f + 0.24261112f;
  p = p * f + 0.69326099f;
  return p * f + 0.99992807f;
}

#ifdef __AVX512F__
// 2^x for finite x (scores minus a reference): no range clamp, so -inf gives NaN; x far below -127 gives 0
// (vscalefps underflows), NaN stays NaN. Four operations fewer than exp2v<4>.
inline v16 exp2_finite(v16 x) {
  const __m512 n = _mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return (v16)_mm512_scalef_ps((__m512)exp2_fraction3(x - (v16)n), n);
}
#endif

// 2^x for x <= 0 (scores minus their running maximum; the sigmoid passes x <= 126): -inf and anything at or below
// -127 give 0, NaN stays NaN. Round to the nearest integer n, then exp2_fraction(x - n) times 2^n. With AVX-512,
// rounding and the scaling by 2^n are one instruction each (vrndscaleps, vscalefps with a zeroing mask): 10
// operations a vector instead of 15.
template <int Degree = 6>
inline v16 exp2v(v16 x) {
  static_assert(Degree == 4 || Degree == 6, "exp2_fraction or exp2_fraction4");
  auto fraction = [](v16 f) { return Degree == 6 ? exp2_fraction(f) : exp2_fraction4(f); };
#ifdef __AVX512F__
  const __m512 lo = _mm512_set1_ps(-127.0f), xv = (__m512)x;
  const __mmask16 live = _mm512_cmp_ps_mask(xv, lo, _CMP_NLE_UQ);  // x > -127 or NaN
  const __m512 xc = _mm512_max_ps(lo, xv);                          // NaN stays NaN (max returns its 2nd operand)
  const __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const v16 p = fraction((v16)xc - (v16)n);
  return (v16)_mm512_maskz_scalef_ps(live, (__m512)p, n);
#else
  const v16 lo = splat(-127.0f);
  v16 xc = x < lo ? lo : x;
  v16 t = xc + 12582912.0f;  // 1.5 * 2^23: rounds to the nearest integer in its low mantissa bits
  const v16 p = fraction(xc - (t - 12582912.0f));
  i16v e = ((i16v)t - 0x4B400000 + 127) << 23;  // 2^n from the exponent bits: 0 (the float 0) at n = -127
  return p * (v16)e;
#endif
}

inline float exp2s(float x) { return x < -126.0f ? 0.0f : __builtin_exp2f(x); }

// silu(g) = g * sigmoid(g) = g / (1 + e^-g), e^-g as 2^(-g log2 e) clamped at 2^126 (~8.5e37), so g far below
// zero gives g / 8.5e37 (~0 for any activation a model produces) instead of NaN (inf / inf).
inline v16 silu(v16 g) {
  const v16 t = g * -kLog2e, hi = splat(126.0f);
  return g / (1.0f + exp2v(t > hi ? hi : t));
}

}  // namespace chunkattn
