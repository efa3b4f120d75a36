// Linear layers on block-quantized weights, multiplied as stored: GGUF's Q4_0 / Q4_1 / Q8_0 blocks (32 weights
// along K sharing a float16 scale d, and for Q4_1 a float16 offset m) repacked once into panels of 32 output
// columns, and each panel dequantized to bfloat16 just before it is used (step by step beside the tile products up
// to 32 rows of x, a group of panels at a time for more: linear_amx.h's grouped_products), in the AMX panel layout
// of linear_amx.h, by AVX-512 in registers into a buffer that stays in the cache. The weight stream, the memory
// traffic of a decode step, shrinks from 2 bytes a weight (bf16) to 20/32 (Q4_1) or 34/32 (Q8_0).
//
// Eight kinds of stored weight (Q4_0 is kept as Q4_1 with m = -8 d, which dequantizes to the same values):
//   kQ4: w = d q + m, q in 0..15;  kQ8: w = d q, q in -128..127;
//   kQ6: w = d (q - 32), q in 0..63, d a scale per 16 weights along K (GGUF's Q6_K: its super-block scale times
//        each sub-block's 8-bit scale, the product rounded to float16 when chunkattn/model/quant.py reads it);
//   kQ5: w = d q + m, q in 0..31 (GGUF's Q5_1 as stored; Q5_K's sub-blocks of 32, their d sc and -dmin m rounded
//        to float16 as Q4_K's are for kQ4);
//   kIQ4: w = d kvalue[q], q in 0..15 indexing GGUF's IQ4 codebook of 16 integers in -127..113 (IQ4_NL as stored;
//        IQ4_XS's sub-blocks of 32, d (ls - 32) rounded to float16);
//   kQ4x16: w = d q + m, q in 0..15, d and m per 16 weights along K (a gate/up of GGUF's Q2_K beside Q3_K: both
//        parts' values, Q3_K's offsets -4 d stored);
//   kQ2x16: the same with q in 0..3 (GGUF's Q2_K: d sc and -dmin m rounded to float16);
//   kQ3x16: w = d (q - 4), q in 0..7, d per 16 weights (GGUF's Q3_K as stored: its q + 4, d its scale product
//        rounded to float16).
// Computed in float32 as one fused multiply-add, then rounded to bf16 (to nearest even): exactly what GGUF's
// reference dequantization (gguf-py: d * q + m in float32) cast to bf16 gives, so the products equal those of the
// same model dequantized at load and cast to bf16, up to the order of the float32 sums (kQ6: 28/32 bytes a weight).
//
// Packed layout, uint8 [P, S, 2, tile_bytes] (S = K / 32 steps, 2 tiles of 16 columns a step); a tile of 16
// columns and 32 of K is
//   kQ4: d[16] fp16 | m[16] fp16 | 16 rows x 16 bytes   (320 bytes: 20 per 32 weights, Q4_1's size)
//   kQ8: d[16] fp16 | 16 rows x 32 bytes (int8)         (544 bytes: 34 per 32 weights, Q8_0's size)
//   kQ6: d[16] fp16 of k 0-15 | d[16] of k 16-31 | 8 groups x 48 bytes (448 bytes: 28 per 32 weights; Q6_K 26.25)
//   kQ5: kQ4's 320 bytes | 4 groups x 16 bytes of fifth bits   (384 bytes: 24 per 32 weights, Q5_1's size)
//   kIQ4: d[16] fp16 | 16 rows x 16 bytes                       (288 bytes: 18 per 32 weights, IQ4_NL's size)
//   kQ4x16: d[16] of k 0-15 | d[16] of k 16-31 | m[16] of k 0-15 | m[16] of k 16-31 | 8 groups x 32 bytes
//        (384 bytes: 24 per 32 weights)
//   kQ2x16: kQ4x16's scales and offsets | 8 groups x 16 bytes (256 bytes: 16 per 32 weights; Q2_K 10.5)
//   kQ3x16: kQ6's scales | 8 groups x 24 bytes (256 bytes: 16 per 32 weights; Q3_K 13.75)
// Row r of a tile holds the 32 values (W[c, 32s + 2r + t], c = 0..15, t = 0..1) at e = 2c + t, the order of a
// tdpbf16ps B row; kQ4's byte b holds e = b in its low nibble and e = b + 16 in its high nibble. Columns are those
// of linear_amx.h's panels (pack_linear_amx / pack_gate_up_amx); chunkattn/model/quant.py builds the packs.
// kQ6's group g holds tile rows 2g and 2g + 1 (value v = 32 (row - 2g) + e, kQ8's order of those two rows) as 32
// bytes of low nibbles (byte i: value i in its low nibble, value i + 32 in its high one) and 16 bytes of the top
// two bits (byte i: value i + 16 L in bits 2L, 2L + 1); q6_group unpacks a group in 7 vector operations.
// kQ4x16's group g is kQ6's without the top bits: its 32 bytes of nibbles (q4x16_group: 3 operations); kQ2x16's
// is kQ6's top bits alone, 16 bytes (byte i: value i + 16 L in bits 2L, 2L + 1; q2x16_group: 3 operations).
// kQ3x16's group g is kQ2x16's 16 bytes of two low bits, then 8 bytes of third bits (bit v of their little-endian
// 64 bits: value v's), which a mask register takes whole (q3x16_group: 5 operations).
// kQ5's group g holds the fifth bits of tile rows 4g + L (L = 0..3) as 16 bytes, byte 4n + L those of values
// e = 8n .. 8n + 7 (bit b: e = 8n + b): the 32-bit masks panel_q4_direct_one's unpacked words take whole (its
// vector u[n] holds those values of the four rows); q5_row_masks turns a group into each row's 32 bits.
//
// Two ways to multiply a dequantized panel: AMX tiles (linear_amx.h's panel_tiles_with) or, where the CPU lacks AMX
// (AMD Zen 4/5 and other AVX512-BF16 CPUs), vdpbf16ps against broadcast pairs of x, whose operand order the
// tile layout already is. For a few rows of x (a few sequences decoding: up to 1-3 rows on AMX, 8-16 without; see
// direct_max_rows) a third skips the bf16 panel:
// panel_q4_direct / panel_q8_direct / panel_q6_direct multiply the stored integers exactly (as bf16 integers
// 128 + q) and apply each block's scale to the float32 sums, so those weights are not rounded to bf16 at all. Where
// the CPU has AVX512-VNNI, panel_q8_int16 / panel_q4_int16 / panel_q6_int16 go further: x's blocks as 15-bit
// integers (exact within 2^6 of each block's largest), the products as exact integer sums by vpdpbusd, at a third
// of the vector operations (kAuto's choice for a few rows of kQ8; kQ4 and kQ6 only when asked: their rounding of x
// cost accuracy where measured, see panel_q6_direct; kQ5 and kIQ4 have none).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "linear_amx.h"
#include "ops.h"

#ifdef CHUNKATTN_BF16_DOT
#define CHUNKATTN_QUANT 1
#endif
#if defined(CHUNKATTN_QUANT) && defined(__AVX512VNNI__)
#define CHUNKATTN_QUANT_INT16 1
#endif

namespace chunkattn::ops {
namespace {
using namespace chunkattn::panels;

enum Kind : int64_t { kQ4 = 0, kQ8 = 1, kQ6 = 2, kQ5 = 3, kIQ4 = 4, kQ4x16 = 5, kQ2x16 = 6, kQ3x16 = 7 };
// How a call multiplies: kTiles / kVector dequantize each panel to bf16 (exactly GGUF's values, rounded) and use AMX
// tiles / vdpbf16ps; kDirect multiplies the stored integers as they are (panel_q{4,8,6}_direct); kInt16 multiplies
// them with x rounded to 15-bit integers per block (panel_q{8,4,6}_int16).
enum Path : int64_t { kAuto = 0, kTiles = 1, kVector = 2, kDirect = 3, kInt16 = 4 };

constexpr int64_t tile_bytes(int64_t kind) {
  switch (kind) {
    case kQ4: return 64 + 16 * 16;
    case kQ8: return 32 + 16 * 32;
    case kQ6: return 64 + 8 * 48;
    case kQ5: return 64 + 16 * 16 + 64;
    case kIQ4: return 32 + 16 * 16;
    case kQ4x16: return 128 + 8 * 32;
    case kQ3x16: return 64 + 8 * 24;
    default: return 128 + 8 * 16;  // kQ2x16
  }
}

// The kinds with a scale per 16 weights (two a tile row's 32 k) and groups of two tile rows' 64 values: where a
// kQ6 / kQ4x16 / kQ2x16 / kQ3x16 tile's groups start and each group's bytes.
constexpr bool per_16(int64_t kind) { return kind == kQ6 || kind == kQ4x16 || kind == kQ2x16 || kind == kQ3x16; }
constexpr int64_t groups_at(int64_t kind) { return kind == kQ6 || kind == kQ3x16 ? 64 : 128; }
constexpr int64_t group_bytes(int64_t kind) {
  return kind == kQ6 ? 48 : kind == kQ4x16 ? 32 : kind == kQ3x16 ? 24 : 16;
}

// Where a kQ4-like tile's nibbles start (kIQ4 has no offsets m).
constexpr int64_t nibbles_at(int64_t kind) { return kind == kIQ4 ? 32 : 64; }

// kIQ4's codebook (GGUF's IQ4_NL / IQ4_XS kvalues; chunkattn/model/quant.py's IQ4_VALUES).
alignas(64) constexpr float kIQ4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// The codebook as float32 in lanes 0-15.
inline __m512 iq4_values() { return _mm512_load_ps(kIQ4Values); }

// The same as bf16 words (exact: integers below 2^8), in words 0-15 and again in 16-31: a vpermw table.
inline __m512i iq4_bf16_values() {
  const __m512 v = iq4_values();
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(v, v));
}

bool quant_linear_supported() {
#ifdef CHUNKATTN_QUANT
  return true;
#else
  return false;
#endif
}

bool int16_usable() {
#ifdef CHUNKATTN_QUANT_INT16
  return true;
#else
  return false;
#endif
}

bool tiles_usable() {
#ifdef CHUNKATTN_AMX
  return amx_permitted();
#else
  return false;
#endif
}

// Rows of x up to which kAuto takes kDirect: its cost grows with the rows (one or two vdpbf16ps per row and 32
// weights), the dequantizing paths' hardly. Measured on the AMX Xeon VM, 16 SmolLM2-sized products out of cache,
// direct / tiles time: q4 0.56 / 0.74 / 0.92 / 1.15 at 1 / 2 / 3 / 4 rows, q8 0.80 / 1.22 at 1 / 2 (q5, q6, iq4
// and the x16 kinds on AMX unmeasured, taken as q4: benchmarks/quant_paths.py measures them). Without AMX the
// alternative is the vector path (each panel dequantized to bf16, then vdpbf16ps against passes of 4 rows), slower
// by far: on AMD EPYC Zen 4, direct / vector
// time at 4 / 8 / 12 / 16 / 24 rows, four 2048 x 8192 products out of cache (1B down_proj) and one 3072 x 576 in cache
// (SmolLM2 gate/up): q4 0.47-0.52 / 0.67-0.72 / 0.82 / 0.86-0.89 / 0.93-0.96; q5 0.43-0.50 / 0.68-0.74 / 0.87 /
// 0.96-1.00 / 1.11-1.15; iq4 0.55-0.61 / 0.74-0.81 / 0.93 / 0.98-1.00 / 1.05-1.10; q4x16 0.52-0.55 / 0.76-0.78 /
// 0.93 / 1.02-1.03 / 1.13-1.18; q2x16 (at 4 / 8 / 12 / 16) 0.54-0.56 / 0.79-0.80 / 0.95-0.98 / 1.06-1.14; q6
// 0.58-0.59 / 0.86-0.87 / 1.06 / 1.17-1.21; q8 (direct) 0.60-0.97 / 0.95-1.31 (2026-12-08). q3x16 (its third bits
// cost 2 operations a group more than q2x16) at 1 / 4 / 8 / 12 / 16 rows 0.34-0.36 / 0.62 / 0.87 / 1.05 / 1.16 of
// the vector path's time (benchmarks/quant_paths.py, four 1B decoder layers; q4x16 there 0.47 / 0.55 / 0.76 / 0.90
// / 1.02, 2026-12-08).
int64_t direct_max_rows(int64_t kind) {
  if (tiles_usable()) return kind == kQ8 ? 1 : 3;
  switch (kind) {
    case kQ4: return 16;
    case kQ5:
    case kIQ4:
    case kQ4x16:
    case kQ2x16: return 12;
    case kQ3x16:
    case kQ6: return 8;
    default: return 4;  // kQ8 (where the CPU has AVX512-VNNI, kInt16 goes further: int16_max_rows)
  }
}

// kQ4 takes kInt16 only when asked (path 4): on SmolLM2's Q4_1 file one request's decode step took 0.89-0.93x the
// direct path's time, but benchmarks/quant_accuracy.py's 48-token greedy continuations matched float32's in 5/8
// prompts where the direct path's matched 6/8 (per-position top-1 agreement 97.4% vs 98.9%, largest logit
// difference 0.85 vs 0.98): differences at near-ties, too few to decide, so off by default until a larger run.
// Rows of x up to which kAuto takes kInt16 for kQ8 (where the CPU has AVX512-VNNI), ahead of kDirect. Measured on
// the AMX Xeon VM, the 1B shape's products (two layers' worth six times over, out of cache), kInt16's time over
// kDirect's / over kTiles': 0.71 / 0.63 at 1 row, 0.79 / 0.72 at 2, 0.64 / 0.76 at 4, 0.54 / 0.97 at 6 rows (a
// pass of 4 and one of 2). Without AMX (the vector path the alternative) up to 8: on AMD EPYC Zen 4, kInt16's time
// over the vector path's 0.55-0.69 / 0.60-0.76 / 0.72-0.90 / 1.04 at 4 / 6 / 8 / 12 rows (the shapes above).
int64_t int16_max_rows() { return tiles_usable() ? 4 : 8; }

// The path kAuto takes for `rows` rows of x on a weight of `kind` (quant_auto_path: tests, chunkattn info).
int64_t auto_path(int64_t kind, int64_t rows) {
  TORCH_CHECK(kind >= kQ4 && kind <= kQ3x16 && rows >= 0, "quant_auto_path: kind must be 0 to 7 and rows >= 0, got ",
              kind, " and ", rows);
  return kind == kQ8 && int16_usable() && rows <= int16_max_rows() ? kInt16
         : rows <= direct_max_rows(kind)                           ? kDirect
         : tiles_usable()                                          ? kTiles
                                                                   : kVector;
}

#ifdef CHUNKATTN_QUANT
// kQ6's group at g (48 bytes) -> its 64 values q (0..63) as bytes, kQ8's order of the two tile rows: the nibbles
// broadcast to both 256-bit halves and shifted by 0 / 4, the top bits to all four 128-bit lanes and shifted by 2L
// (16-bit shifts: a byte's bits cross into its neighbour only where the masks drop them).
inline __m512i q6_group(const uint8_t* g) {
  const __m512i nib_shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  const __m512i top_shift = _mm512_set_epi64(0x0006000600060006, 0x0006000600060006, 0x0004000400040004,
                                             0x0004000400040004, 0x0002000200020002, 0x0002000200020002, 0, 0);
  const __m512i nib = _mm512_srlv_epi16(
      _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g))), nib_shift);
  const __m512i top = _mm512_and_si512(
      _mm512_slli_epi16(_mm512_srlv_epi16(_mm512_broadcast_i32x4(_mm_loadu_si128(
                                              reinterpret_cast<const __m128i*>(g + 32))), top_shift), 4),
      _mm512_set1_epi8(0x30));
  return _mm512_ternarylogic_epi32(nib, top, _mm512_set1_epi8(0x0F), 0xEC);  // (nib & 0x0F) | top
}

// kQ4x16's group at g (32 bytes) -> its 64 values q (0..15) as bytes, q6_group's order (its nibbles alone).
inline __m512i q4x16_group(const uint8_t* g) {
  const __m512i nib_shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  return _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i64x4(
                                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g))), nib_shift),
                          _mm512_set1_epi8(0x0F));
}

// kQ2x16's group at g (16 bytes) -> its 64 values q (0..3) as bytes, q6_group's order (its top bits alone).
inline __m512i q2x16_group(const uint8_t* g) {
  const __m512i shift = _mm512_set_epi64(0x0006000600060006, 0x0006000600060006, 0x0004000400040004,
                                         0x0004000400040004, 0x0002000200020002, 0x0002000200020002, 0, 0);
  return _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i32x4(_mm_loadu_si128(
                                                reinterpret_cast<const __m128i*>(g))), shift),
                          _mm512_set1_epi8(0x03));
}

// kQ3x16's group at g (24 bytes) -> its 64 values q (0..7) as bytes, q6_group's order: q2x16_group's two low bits,
// + 4 where the third bit (the 64-bit mask after them) is set (a masked byte add: AVX-512 has no masked byte or).
inline __m512i q3x16_group(const uint8_t* g) {
  uint64_t top;
  std::memcpy(&top, g + 16, 8);
  const __m512i low = q2x16_group(g);
  return _mm512_mask_add_epi8(low, _cvtu64_mask64(top), low, _mm512_set1_epi8(4));
}

// A per-16 kind's (K) group g of the tile at t, unpacked.
template <int64_t K>
inline __m512i group_values(const uint8_t* t, int g) {
  if constexpr (K == kQ6) return q6_group(t + groups_at(K) + group_bytes(K) * g);
  else if constexpr (K == kQ4x16) return q4x16_group(t + groups_at(K) + group_bytes(K) * g);
  else if constexpr (K == kQ3x16) return q3x16_group(t + groups_at(K) + group_bytes(K) * g);
  else return q2x16_group(t + groups_at(K) + group_bytes(K) * g);
}

// The offsets of a per-16 kind's (K) half tile (k 16 half .. 16 half + 15) at t, whose scales are d: w = d q + the
// offset (kQ6: -32 d, kQ3x16: -4 d, both exact; kQ4x16, kQ2x16: its m).
template <int64_t K>
inline __m512 half_offsets(const uint8_t* t, int half, __m512 d) {
  if constexpr (K == kQ6) return _mm512_mul_ps(d, _mm512_set1_ps(-32.f));
  else if constexpr (K == kQ3x16) return _mm512_mul_ps(d, _mm512_set1_ps(-4.f));
  else return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + 64 + 32 * half)));
}

// kQ5's fifth bits of tile rows 4g .. 4g + 3 (the group's 16 bytes at top) -> m[L]: row 4g + L's 32 bits, bit e
// for value e (a 4 x 4 byte transpose).
inline void q5_row_masks(const uint8_t* top, uint32_t (&m)[4]) {
  const __m128i order = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(m),
                   _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(top)), order));
}

// kQ5's mask of fifth bits for panel_q4_direct_one's u[n] of group g (top: the tile's fifth bits).
inline __mmask32 q5_lane_mask(const uint8_t* top, int g, int n) {
  uint32_t m;
  std::memcpy(&m, top + 16 * g + 4 * n, 4);
  return _cvtu32_mask32(m);
}

// dequant_tile's kQ4, kQ5 or kIQ4 tile (K), each row's pairs of columns scaled by dlo / dhi.
template <int64_t K>
inline void dequant_q4_tile(const uint8_t* t, __m512 dlo, __m512 dhi, c10::BFloat16* dst) {
  const __m512i lo_idx = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i hi_idx = _mm512_add_epi32(lo_idx, _mm512_set1_epi32(8));
  __m512 mlo = _mm512_setzero_ps(), mhi = mlo;
  if constexpr (K != kIQ4) {
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + 32)));
    mlo = _mm512_permutexvar_ps(lo_idx, m), mhi = _mm512_permutexvar_ps(hi_idx, m);
  }
  const __m512i nibble = _mm512_set1_epi32(0xF), sixteen = _mm512_set1_epi32(16);
  const __m512 book = iq4_values();
  const uint8_t* q = t + nibbles_at(K);
  uint32_t top[4];  // kQ5: rows 4g .. 4g + 3's fifth bits
  for (int r = 0; r < 16; ++r) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * r)));
    __m512i vlo = _mm512_and_si512(v, nibble), vhi = _mm512_srli_epi32(v, 4);
    if constexpr (K == kQ5) {  // | 16 where the value's fifth bit is set
      if (r % 4 == 0) q5_row_masks(t + 320 + 4 * r, top);
      vlo = _mm512_mask_or_epi32(vlo, static_cast<__mmask16>(top[r % 4]), vlo, sixteen);
      vhi = _mm512_mask_or_epi32(vhi, static_cast<__mmask16>(top[r % 4] >> 16), vhi, sixteen);
    }
    __m512 lo, hi;
    if constexpr (K == kIQ4) {  // d kvalue[q]: exact in float32 (11 x 7 bits) before the rounding to bf16
      lo = _mm512_mul_ps(_mm512_permutexvar_ps(vlo, book), dlo);
      hi = _mm512_mul_ps(_mm512_permutexvar_ps(vhi, book), dhi);
    } else {
      lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(vlo), dlo, mlo);
      hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(vhi), dhi, mhi);
    }
    _mm512_storeu_si512(dst + 32 * r, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
  }
}

// dequant_tile's per-16 tile (K: kQ6, kQ4x16, kQ2x16 or kQ3x16): each half's scales and offsets, each group's
// two tile rows.
template <int64_t K>
inline void dequant_per16_tile(const uint8_t* t, c10::BFloat16* dst) {
  const __m512i lo_idx = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i hi_idx = _mm512_add_epi32(lo_idx, _mm512_set1_epi32(8));
  for (int half = 0; half < 2; ++half) {  // tile rows 8 half .. 8 half + 7: k = 16 half .. 16 half + 15
    const __m512 dh = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + 32 * half)));
    const __m512 oh = half_offsets<K>(t, half, dh);
    const __m512 dlo = _mm512_permutexvar_ps(lo_idx, dh), dhi = _mm512_permutexvar_ps(hi_idx, dh);
    const __m512 olo = _mm512_permutexvar_ps(lo_idx, oh), ohi = _mm512_permutexvar_ps(hi_idx, oh);
    for (int g = 4 * half; g < 4 * half + 4; ++g) {
      const __m512i u = group_values<K>(t, g);
      // row 2g + rr: 128-bit lanes 2 rr (e 0-15) and 2 rr + 1 (e 16-31); d q + offset in one fused multiply-add
      // (kQ6's d q - 32 d, kQ3x16's d q - 4 d and kQ4x16's / kQ2x16's d q exact in float32), then the one
      // rounding to bf16
      const __m128i lane[4] = {_mm512_extracti32x4_epi32(u, 0), _mm512_extracti32x4_epi32(u, 1),
                               _mm512_extracti32x4_epi32(u, 2), _mm512_extracti32x4_epi32(u, 3)};
      for (int rr = 0; rr < 2; ++rr) {
        const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lane[2 * rr])), dlo, olo);
        const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lane[2 * rr + 1])), dhi, ohi);
        _mm512_storeu_si512(dst + 32 * (2 * g + rr), reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
      }
    }
  }
}

// One packed tile -> 16 rows x 32 bf16 at dst (a tdpbf16ps B operand).
inline void dequant_tile(const uint8_t* t, int64_t kind, c10::BFloat16* dst) {
  // lanes 0-15 of a row are columns 0-7 (pairs), lanes 16-31 columns 8-15: each column's scale twice
  const __m512i lo_idx = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i hi_idx = _mm512_add_epi32(lo_idx, _mm512_set1_epi32(8));
  const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t)));
  const __m512 dlo = _mm512_permutexvar_ps(lo_idx, d), dhi = _mm512_permutexvar_ps(hi_idx, d);
  if (kind == kQ4 || kind == kQ5 || kind == kIQ4) {
    if (kind == kQ5) dequant_q4_tile<kQ5>(t, dlo, dhi, dst);
    else if (kind == kIQ4) dequant_q4_tile<kIQ4>(t, dlo, dhi, dst);
    else dequant_q4_tile<kQ4>(t, dlo, dhi, dst);
  } else if (kind == kQ6) {
    dequant_per16_tile<kQ6>(t, dst);
  } else if (kind == kQ4x16) {
    dequant_per16_tile<kQ4x16>(t, dst);
  } else if (kind == kQ2x16) {
    dequant_per16_tile<kQ2x16>(t, dst);
  } else if (kind == kQ3x16) {
    dequant_per16_tile<kQ3x16>(t, dst);
  } else {
    const uint8_t* q = t + 32;
    for (int r = 0; r < 16; ++r) {
      const __m128i* row = reinterpret_cast<const __m128i*>(q + 32 * r);
      const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(row))), dlo);
      const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(row + 1))), dhi);
      _mm512_storeu_si512(dst + 32 * r, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
    }
  }
}

// A whole panel (steps x 2 tiles) -> bf16 in linear_amx.h's panel layout, prefetching the packed stream ahead up to
// `limit` (the end of this thread's panels).
inline void dequant_panel(const uint8_t* src, int64_t kind, int64_t steps, const uint8_t* limit, c10::BFloat16* dst) {
  const int64_t tb = tile_bytes(kind);
  for (int64_t s = 0; s < steps; ++s) {
    prefetch_ahead(src + 2 * tb * s, 2 * tb, limit);
    dequant_tile(src + 2 * tb * s, kind, dst + 2 * kTile * s);
    dequant_tile(src + 2 * tb * s + tb, kind, dst + 2 * kTile * s + kTile);
  }
}

#ifdef CHUNKATTN_AMX
// panel_tiles for up to 32 rows with each step dequantized just before its tile products (into w, the panel
// buffer), so that the vector units dequantize step s + 1 while the tile unit multiplies step s (dequantizing the
// whole panel first left one idle while the other worked).
inline void panel_tiles_interleaved(const RowTiles& a, int64_t steps, const uint8_t* src, int64_t kind,
                                    const uint8_t* limit, bool two, c10::BFloat16* w, float* c) {
  const int64_t tb = tile_bytes(kind);
  auto dequant_step = [&](int64_t s) {
    // q8 into L2 (prefetcht1): 1B-shape products at 32 rows 0.86x the time of prefetcht0; q4: 1.03-1.08x, so not
    if (kind == kQ8) prefetch_ahead<2>(src + 2 * tb * s, 2 * tb, limit);
    else prefetch_ahead(src + 2 * tb * s, 2 * tb, limit);
    dequant_tile(src + 2 * tb * s, kind, w + 2 * kTile * s);
    dequant_tile(src + 2 * tb * s + tb, kind, w + 2 * kTile * s + kTile);
  };
  dequant_step(0);
  // a step ahead: the tile loads of step s read stores already done
  panel_tiles_with(a, steps, w, two, c, [&](int64_t s) {
    if (s + 1 < steps) dequant_step(s + 1);
  });
}
#endif

// kQ4 without dequantizing to bf16 first, for 2-4 rows of x (a few sequences decoding; one row takes
// panel_q4_direct_one below), where the dequantization bounded the rows above (~10 vector operations per 32
// weights), not the weight stream: for a
// block of 32 weights, sum_k (d q_k + m) x_k = d sum_k (128 + q_k) x_k + (m - 128 d) sum_k x_k. 128 + q (q in
// 0..15) is a bf16 integer whose bits are 0x4300 | q, so a tile row of nibbles becomes the vdpbf16ps operand in 3
// operations (its 16 bytes broadcast to both halves, widened to words, shifted by 0 / 4 per half, masked and or-ed
// with 0x4300 in one vpternlog). The weights enter exactly (not rounded to bf16, as the dequantized paths do);
// float32 sums. xsum: [NR][steps] sums of each row's blocks. K = kQ5: 128 + q for q in 0..31 (0x4300 | q: the
// fifth bit or-ed in as 0x4310 where the row's mask has it, the same vpternlog); K = kIQ4: each nibble's codebook
// value as bf16 by one vpermw (exact: integers below 2^8), sum d kvalue[q] x = d sum kvalue[q] x, no offset.
template <int NR, int64_t K = kQ4>
inline void panel_q4_direct(const c10::BFloat16* const* x, const float* xsum, int64_t steps, const uint8_t* src,
                            const uint8_t* limit, float* c) {
  constexpr int64_t tb = tile_bytes(K);
  const __m512i book = iq4_bf16_values();
  const __m512i shifts = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  const __m512i low4 = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);
  const __m512i magic5 = _mm512_set1_epi16(0x4310);
  __m512 y[NR][2];
  for (int i = 0; i < NR; ++i) y[i][0] = y[i][1] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    const uint8_t* t = src + 2 * tb * s;
    prefetch_ahead(t, 2 * tb, limit);  // 2-4 rows (one row: panel_q4_direct_one): into L2 measured no better
    __m512 acc[NR][2];
    for (int i = 0; i < NR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    uint32_t top[2][4];  // kQ5: rows 4g .. 4g + 3's fifth bits (word e of w[j]: value e)
    for (int r = 0; r < 16; ++r) {
      __m512bh w[2];
      for (int j = 0; j < 2; ++j) {
        const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
            t + j * tb + nibbles_at(K) + 16 * r)));
        const __m512i v = _mm512_srlv_epi16(_mm512_cvtepu8_epi16(b), shifts);
        if constexpr (K == kIQ4) {
          w[j] = reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(_mm512_and_si512(v, low4), book));
          continue;
        }
        __m512i mg = magic;
        if constexpr (K == kQ5) {
          if (r % 4 == 0) q5_row_masks(t + j * tb + 320 + 4 * r, top[j]);
          mg = _mm512_mask_mov_epi16(magic, _cvtu32_mask32(top[j][r % 4]), magic5);
        }
        w[j] = reinterpret_cast<__m512bh>(_mm512_ternarylogic_epi32(v, low4, mg, 0xEA));  // (v & 15) | 0x43..
      }
      for (int i = 0; i < NR; ++i) {
        const __m512bh xb = x_pair(x[i], s, r);
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], w[0], xb);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], w[1], xb);
      }
    }
    for (int j = 0; j < 2; ++j) {
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + j * tb)));
      for (int i = 0; i < NR; ++i) y[i][j] = _mm512_fmadd_ps(acc[i][j], d, y[i][j]);
      if constexpr (K == kIQ4) continue;
      const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + j * tb + 32)));
      const __m512 offset = _mm512_fmadd_ps(d, _mm512_set1_ps(-128.f), m);
      for (int i = 0; i < NR; ++i) y[i][j] = _mm512_fmadd_ps(offset, _mm512_set1_ps(xsum[i * steps + s]), y[i][j]);
    }
  }
  store_sums<NR>(y, c);
}

// The four vectors y[q] of lane_sums' argument hold, in 128-bit lane L and dword i, partial sums of column 4q + i
// (from tile rows = L mod 4): their sums over the four lanes as one vector of 16 columns (lane q: columns 4q ..).
inline __m512 lane_sums(const __m512 (&y)[4]) {
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x44), _mm512_shuffle_f32x4(y[0], y[1], 0xEE));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], 0x44), _mm512_shuffle_f32x4(y[2], y[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

// panel_q4_direct for one row of x (a single sequence decoding), with fewer and cheaper operations: a 64-byte load
// is four tile rows, one per 128-bit lane, and unpacking its bytes (and its bytes shifted right by 4) to words
// within each lane gives 4 vectors u[0..3] of 128 + q (after the same vpternlog): dword i of u[n]'s lane L holds
// column 4n + i's pair at tile row 4g + L, and x's pair of that row faces it (one pair per lane). The sums stay in
// that layout (each lane's partial times its columns' scales) until the panel ends. 14 operations per 128
// weights, none crossing lanes (x's pairs and the scales take one vpermd / vpermps each), against
// panel_q4_direct's 20 (its widening vpmovzxbw and vpsrlvw were the limit on Zen 4: one SmolLM2 gate/up panel set
// 0.6 vs 0.96 ns per 32 weights out of L2). K = kQ5: its group of fifth bits gives each u[n] its mask whole (a
// masked move of 0x4310 into the vpternlog's constant: 2 operations more per 32 weights); kIQ4: each u[n]'s
// nibbles masked and looked up (vpermw) as bf16 codebook values.
template <int64_t K = kQ4>
inline void panel_q4_direct_one(const c10::BFloat16* x, const float* xsum, int64_t steps, const uint8_t* src,
                                const uint8_t* limit, float* c) {
  constexpr int64_t tb = tile_bytes(K);
  const __m512i book = iq4_bf16_values();
  const __m512i low4 = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);
  const __m512i magic5 = _mm512_set1_epi16(0x4310);
  const __m512i zero = _mm512_setzero_si512();
  const __m512i pair_of_lane = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const __m512i lane_col = _mm512_set_epi32(3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0);
  __m512i col[4];  // column 4q + i of a tile's scales in dword i of every lane
  for (int q = 0; q < 4; ++q) col[q] = _mm512_add_epi32(lane_col, _mm512_set1_epi32(4 * q));
  __m512 y[2][4], z[2];
  for (int j = 0; j < 2; ++j) {
    z[j] = _mm512_setzero_ps();
    for (int q = 0; q < 4; ++q) y[j][q] = _mm512_setzero_ps();
  }
  for (int64_t s = 0; s < steps; ++s) {
    const uint8_t* t = src + 2 * tb * s;
    prefetch_ahead<2>(t, 2 * tb, limit);  // into L2: 0.84x the time of prefetcht0 (1B shape, AMX Xeon, older loop)
    __m512 a[2][4];
    for (int j = 0; j < 2; ++j)
      for (int q = 0; q < 4; ++q) a[j][q] = _mm512_setzero_ps();
    for (int g = 0; g < 4; ++g) {  // tile rows 4g .. 4g + 3: x[8g .. 8g + 7], pair L in lane L
      const __m512bh xb = reinterpret_cast<__m512bh>(_mm512_permutexvar_epi32(
          pair_of_lane, _mm512_castsi128_si512(_mm_loadu_si128(
                            reinterpret_cast<const __m128i*>(x + s * kDepth + 8 * g)))));
      for (int j = 0; j < 2; ++j) {
        const __m512i v = _mm512_loadu_si512(t + j * tb + nibbles_at(K) + 64 * g);
        const __m512i hi = _mm512_srli_epi16(v, 4);  // each byte's high nibble in its low 4 bits
        const __m512i u[4] = {_mm512_unpacklo_epi8(v, zero), _mm512_unpackhi_epi8(v, zero),  // columns 0-3, 4-7
                              _mm512_unpacklo_epi8(hi, zero), _mm512_unpackhi_epi8(hi, zero)};  // 8-11, 12-15
        for (int q = 0; q < 4; ++q) {
          __m512i w;
          if constexpr (K == kIQ4) {
            w = _mm512_permutexvar_epi16(_mm512_and_si512(u[q], low4), book);
          } else {
            __m512i mg = magic;
            if constexpr (K == kQ5) mg = _mm512_mask_mov_epi16(magic, q5_lane_mask(t + j * tb + 320, g, q), magic5);
            w = _mm512_ternarylogic_epi32(u[q], low4, mg, 0xEA);
          }
          a[j][q] = _mm512_dpbf16_ps(a[j][q], reinterpret_cast<__m512bh>(w), xb);
        }
      }
    }
    for (int j = 0; j < 2; ++j) {
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + j * tb)));
      for (int q = 0; q < 4; ++q) y[j][q] = _mm512_fmadd_ps(a[j][q], _mm512_permutexvar_ps(col[q], d), y[j][q]);
      if constexpr (K != kIQ4) {  // (iq4 has no offsets)
        const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + j * tb + 32)));
        z[j] = _mm512_fmadd_ps(_mm512_fmadd_ps(d, _mm512_set1_ps(-128.f), m), _mm512_set1_ps(xsum[s]), z[j]);
      }
    }
  }
  _mm512_storeu_ps(c, _mm512_add_ps(lane_sums(y[0]), z[0]));
  _mm512_storeu_ps(c + 16, _mm512_add_ps(lane_sums(y[1]), z[1]));
}

// kQ8 likewise: u = q + 128 (0..255; the int8's sign bit flipped) is split into nibbles, u = 16 h + l, each a bf16
// integer 128 + h / 128 + l as above, so sum_k q_k x_k = 16 A + B - 2304 X with A = sum (128 + h) x,
// B = sum (128 + l) x, X = sum x: 5 operations per 32 weights and two vdpbf16ps per row of x (the dequantizing
// vector path: ~8, plus a store and a load of the bf16 panel).
template <int NR>
inline void panel_q8_direct(const c10::BFloat16* const* x, const float* xsum, int64_t steps, const uint8_t* src,
                            const uint8_t* limit, float* c) {
  constexpr int64_t tb = tile_bytes(kQ8);
  const __m256i sign = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m512i low4 = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);
  __m512 y[NR][2];
  for (int i = 0; i < NR; ++i) y[i][0] = y[i][1] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    const uint8_t* t = src + 2 * tb * s;
    prefetch_ahead(t, 2 * tb, limit);
    __m512 hi_acc[NR][2], lo_acc[NR][2];
    for (int i = 0; i < NR; ++i)
      for (int j = 0; j < 2; ++j) hi_acc[i][j] = lo_acc[i][j] = _mm512_setzero_ps();
    for (int r = 0; r < 16; ++r) {
      __m512bh hi[2], lo[2];
      for (int j = 0; j < 2; ++j) {
        const __m256i b = _mm256_xor_si256(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + j * tb + 32 + 32 * r)), sign);
        const __m512i u = _mm512_cvtepu8_epi16(b);
        lo[j] = reinterpret_cast<__m512bh>(_mm512_ternarylogic_epi32(u, low4, magic, 0xEA));
        hi[j] = reinterpret_cast<__m512bh>(_mm512_or_si512(_mm512_srli_epi16(u, 4), magic));
      }
      for (int i = 0; i < NR; ++i) {
        const __m512bh xb = x_pair(x[i], s, r);
        for (int j = 0; j < 2; ++j) {
          hi_acc[i][j] = _mm512_dpbf16_ps(hi_acc[i][j], hi[j], xb);
          lo_acc[i][j] = _mm512_dpbf16_ps(lo_acc[i][j], lo[j], xb);
        }
      }
    }
    for (int j = 0; j < 2; ++j) {
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + j * tb)));
      const __m512 offset = _mm512_mul_ps(d, _mm512_set1_ps(-2304.f));
      for (int i = 0; i < NR; ++i) {
        const __m512 sum = _mm512_fmadd_ps(hi_acc[i][j], _mm512_set1_ps(16.f), lo_acc[i][j]);
        y[i][j] = _mm512_fmadd_ps(sum, d, y[i][j]);
        y[i][j] = _mm512_fmadd_ps(offset, _mm512_set1_ps(xsum[i * steps + s]), y[i][j]);
      }
    }
  }
  store_sums<NR>(y, c);
}

// kQ6 likewise: each group unpacked by q6_group to two tile rows of bytes q (0..63), widened to words and or-ed
// with 0x4300 (bf16 128 + q), and each half block (tile rows 0-7: k 0-15; 8-15: k 16-31) summed apart for its own
// scale: sum d (q - 32) x = d (sum (128 + q) x - 160 sum x). The weights and x enter exactly (x as bf16, not
// rounded to integers as kInt16 does: on a Q4_K_M file's Q6_K down projections, whose inputs carry the MLP's
// outliers, kInt16 turned 16 of 1116 decode positions' top-1 mismatches against float32 into 24). xhalf: [NR][steps]
// [2] sums of each row's half blocks. K = kQ4x16 / kQ2x16: its groups' values (q4x16_group / q2x16_group),
// sum (d q + m) x = d sum (128 + q) x + (m - 128 d) sum x; K = kQ3x16 (q3x16_group): m = -4 d.
template <int NR, int64_t K = kQ6>
inline void panel_q6_direct(const c10::BFloat16* const* x, const float* xhalf, int64_t steps, const uint8_t* src,
                            const uint8_t* limit, float* c) {
  constexpr int64_t tb = tile_bytes(K);
  const __m512i magic = _mm512_set1_epi16(0x4300);
  __m512 y[NR][2];
  for (int i = 0; i < NR; ++i) y[i][0] = y[i][1] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    const uint8_t* t = src + 2 * tb * s;
    prefetch_ahead<2>(t, 2 * tb, limit);  // into L2, as the other one-row loops
    for (int half = 0; half < 2; ++half) {
      __m512 acc[NR][2];
      for (int i = 0; i < NR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
      for (int g = 4 * half; g < 4 * half + 4; ++g) {  // tile rows 2g, 2g + 1
        __m512i u[2];
        for (int j = 0; j < 2; ++j) u[j] = group_values<K>(t + j * tb, g);
        for (int rr = 0; rr < 2; ++rr) {
          __m512bh w[2];
          for (int j = 0; j < 2; ++j) {
            const __m256i row = rr == 0 ? _mm512_castsi512_si256(u[j]) : _mm512_extracti64x4_epi64(u[j], 1);
            w[j] = reinterpret_cast<__m512bh>(_mm512_or_si512(_mm512_cvtepu8_epi16(row), magic));
          }
          for (int i = 0; i < NR; ++i) {
            const __m512bh xb = x_pair(x[i], s, 2 * g + rr);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], w[0], xb);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], w[1], xb);
          }
        }
      }
      for (int j = 0; j < 2; ++j) {
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + j * tb + 32 * half)));
        const __m512 offset = _mm512_fmadd_ps(d, _mm512_set1_ps(-128.f), half_offsets<K>(t + j * tb, half, d));
        for (int i = 0; i < NR; ++i) {
          y[i][j] = _mm512_fmadd_ps(acc[i][j], d, y[i][j]);
          y[i][j] = _mm512_fmadd_ps(offset, _mm512_set1_ps(xhalf[(i * steps + s) * 2 + half]), y[i][j]);
        }
      }
    }
  }
  store_sums<NR>(y, c);
}

// panel_q6_direct for one row of x, with fewer operations (as panel_q4_direct_one for kQ4): each unpacked group's
// bytes become words 0x4300 | q within their 128-bit lanes (vpunpck{l,h}bw against 0x43: one operation per 32
// weights, not the cross-lane widening and an or), so lane L of the low words holds tile row 2g + L / 2's columns
// 0-3 (L even) or 8-11 (L odd), the high words columns 4-7 / 12-15; x's pair of row 2g faces lanes 0-1 and that of
// row 2g + 1 lanes 2-3. The sums stay in that layout (each scaled by its columns' scales) until the panel ends,
// when the two rows' lanes are added and put in column order. K = kQ4x16 / kQ2x16 / kQ3x16 as in panel_q6_direct.
template <int64_t K = kQ6>
inline void panel_q6_direct_one(const c10::BFloat16* x, const float* xhalf, int64_t steps, const uint8_t* src,
                                const uint8_t* limit, float* c) {
  constexpr int64_t tb = tile_bytes(K);
  const __m512i magic = _mm512_set1_epi8(0x43);
  const __m512i pair_of_lane = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i lo_cols = _mm512_set_epi32(11, 10, 9, 8, 3, 2, 1, 0, 11, 10, 9, 8, 3, 2, 1, 0);
  const __m512i hi_cols = _mm512_add_epi32(lo_cols, _mm512_set1_epi32(4));
  __m512 ylo[2], yhi[2], z[2];
  for (int j = 0; j < 2; ++j) ylo[j] = yhi[j] = z[j] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    const uint8_t* t = src + 2 * tb * s;
    prefetch_ahead<2>(t, 2 * tb, limit);
    for (int half = 0; half < 2; ++half) {
      __m512 alo[2], ahi[2];
      for (int j = 0; j < 2; ++j) alo[j] = ahi[j] = _mm512_setzero_ps();
      for (int g = 4 * half; g < 4 * half + 4; ++g) {  // tile rows 2g, 2g + 1: x[4g .. 4g + 3]
        const __m512bh xb = reinterpret_cast<__m512bh>(_mm512_permutexvar_epi32(
            pair_of_lane, _mm512_castsi128_si512(_mm_loadl_epi64(
                              reinterpret_cast<const __m128i*>(x + s * kDepth + 4 * g)))));
        for (int j = 0; j < 2; ++j) {
          const __m512i u = group_values<K>(t + j * tb, g);
          alo[j] = _mm512_dpbf16_ps(alo[j], reinterpret_cast<__m512bh>(_mm512_unpacklo_epi8(u, magic)), xb);
          ahi[j] = _mm512_dpbf16_ps(ahi[j], reinterpret_cast<__m512bh>(_mm512_unpackhi_epi8(u, magic)), xb);
        }
      }
      for (int j = 0; j < 2; ++j) {
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + j * tb + 32 * half)));
        ylo[j] = _mm512_fmadd_ps(alo[j], _mm512_permutexvar_ps(lo_cols, d), ylo[j]);
        yhi[j] = _mm512_fmadd_ps(ahi[j], _mm512_permutexvar_ps(hi_cols, d), yhi[j]);
        const __m512 offset = _mm512_fmadd_ps(d, _mm512_set1_ps(-128.f), half_offsets<K>(t + j * tb, half, d));
        z[j] = _mm512_fmadd_ps(offset, _mm512_set1_ps(xhalf[2 * s + half]), z[j]);
      }
    }
  }
  for (int j = 0; j < 2; ++j) {
    // lanes of ylo: columns 0-3, 8-11 (row 2g), 0-3, 8-11 (row 2g + 1); of yhi: 4-7, 12-15, 4-7, 12-15
    const __m512 sum = _mm512_add_ps(_mm512_shuffle_f32x4(ylo[j], yhi[j], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(ylo[j], yhi[j], _MM_SHUFFLE(3, 2, 3, 2)));
    _mm512_storeu_ps(c + 16 * j, _mm512_add_ps(_mm512_shuffle_f32x4(sum, sum, _MM_SHUFFLE(3, 1, 2, 0)), z[j]));
  }
}

#ifdef CHUNKATTN_QUANT_INT16
// x's rows as 15-bit integers for kInt16, block floating point: each block of 32 gets the scale a = 2^(E - 13),
// E = floor(log2 amax) (clamped at -100), and v = round(x / a) (to nearest even), |v| <= 16320. A power of two, so
// every x within 2^6 of its block's largest is exact (bf16 holds 8 significant bits) and the rest are off by at
// most 2^-14 amax (relative to the block's largest, far below bf16's 2^-9; a value 2^12 below it may lose more than
// its own rounding did). Each v is stored as two int8 (v = 256 h + l, l in -128..127, h in -64..64) for vpdpbusd:
// hl [M][steps][2][32] (the block's h, then its l); vsum: sum(v) a block. A block holding an Inf or NaN gets a NaN
// scale and zero integers: the output is NaN, not a silently wrong number.
struct Int16Rows {
  std::vector<int8_t> hl;
  std::vector<float> scale;    // [M][steps]
  std::vector<int32_t> vsum;   // [M][steps]
  std::vector<int32_t> vhalf;  // [M][steps][2]: sum(v) of each half block (kQ6's scales are per 16)
};

inline Int16Rows round_rows_to_int16(const ARows& rows, int64_t M, int64_t steps) {
  Int16Rows r;
  r.hl.resize(M * steps * 2 * kDepth);
  r.scale.resize(M * steps);
  r.vsum.resize(M * steps);
  r.vhalf.resize(M * steps * 2);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t s = 0; s < steps; ++s) {
      const c10::BFloat16* xi = rows.row(i) + s * kDepth;
      const __m512 a = load(xi), b = load(xi + 16);
      int8_t* dst = r.hl.data() + (i * steps + s) * 2 * kDepth;
      if (std::isnan(hsum(_mm512_mul_ps(a, _mm512_setzero_ps()) + _mm512_mul_ps(b, _mm512_setzero_ps())))) {
        std::memset(dst, 0, 2 * kDepth);  // an Inf or NaN (x * 0 is NaN only for those)
        r.scale[i * steps + s] = std::numeric_limits<float>::quiet_NaN();
        r.vsum[i * steps + s] = 0;
        r.vhalf[(i * steps + s) * 2] = r.vhalf[(i * steps + s) * 2 + 1] = 0;
        continue;
      }
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
      const int e = amax > 0 ? std::max(std::ilogb(amax), -100) : 0;
      const __m512 inv = _mm512_set1_ps(amax > 0 ? std::ldexp(1.f, 13 - e) : 0.f);
      int32_t sum = 0;
      for (int half = 0; half < 2; ++half) {
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(half == 0 ? a : b, inv));
        const __m512i l = _mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24);  // the low byte, signed
        const __m512i h = _mm512_srai_epi32(_mm512_sub_epi32(v, l), 8);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16 * half), _mm512_cvtepi32_epi8(h));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + kDepth + 16 * half), _mm512_cvtepi32_epi8(l));
        const int32_t part = _mm512_reduce_add_epi32(v);
        r.vhalf[(i * steps + s) * 2 + half] = part;
        sum += part;
      }
      r.scale[i * steps + s] = std::ldexp(1.f, e - 13);
      r.vsum[i * steps + s] = sum;
    }
  return r;
}

inline int32_t quad(const int8_t* q) {
  int32_t v;
  std::memcpy(&v, q, 4);
  return v;
}

// The order panel_q8_int16 and panel_q6_int16 put two tile rows of byte weights in (16 columns' pairs at k = 4g,
// 4g + 1, then at 4g + 2, 4g + 3), by 16-bit words: lane c holds column c's 4 k, a vpdpbusd operand.
alignas(64) constexpr uint16_t kQuadOrder[32] = {0,  16, 1,  17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                 8,  24, 9,  25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

// hacc / lacc += w (two tile rows of unsigned weights in kQuadOrder) times each row's quad of h / l at k = 4g ..
// 4g + 3 (Int16Rows' hl of step s).
template <int NR>
inline void quad_products(__m512i w, const int8_t* const* hl, int64_t s, int g, __m512i (&hacc)[NR],
                          __m512i (&lacc)[NR]) {
  for (int i = 0; i < NR; ++i) {
    const int8_t* x = hl[i] + s * 2 * kDepth + 4 * g;
    hacc[i] = _mm512_dpbusd_epi32(hacc[i], w, _mm512_set1_epi32(quad(x)));
    lacc[i] = _mm512_dpbusd_epi32(lacc[i], w, _mm512_set1_epi32(quad(x + kDepth)));
  }
}

// y + d a (256 hacc + lacc - offset): a block's exact integer sums (offset: the unsigned weights' bias times
// sum(v)), scaled by its weights' scales d and x's scale a.
inline __m512 add_block_sums(__m512 y, __m512i hacc, __m512i lacc, int32_t offset, float a, __m512 d) {
  const __m512i sum = _mm512_sub_epi32(_mm512_add_epi32(_mm512_slli_epi32(hacc, 8), lacc), _mm512_set1_epi32(offset));
  return _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(a)), d, y);
}

// kQ8 times 15-bit rows by vpdpbusd (u8 x s8 -> int32, 4 products a lane): the weights' sign bits flipped
// (u = q + 128, unsigned), each two tile rows (16 columns' pairs at k = 2r, 2r + 1 and 2r + 2, 2r + 3) permuted so
// a lane holds one column's 4 k, against the quads of x's h and l broadcast. Exact integer sums per block:
// sum(q v) = 256 sum(u h) + sum(u l) - 128 sum(v), then y += d a sum(q v). 3 operations per 64 weights (load,
// xor, vpermw) plus two vpdpbusd per row of x, against panel_q8_direct's 10 plus 4.
template <int NR>
inline void panel_q8_int16(const int8_t* const* hl, const float* const* xs, const int32_t* const* vsum,
                           int64_t steps, const uint8_t* src, const uint8_t* limit, float* c) {
  constexpr int64_t tb = tile_bytes(kQ8);
  const __m512i idx = _mm512_load_si512(kQuadOrder), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 y[NR][2];
  for (int i = 0; i < NR; ++i) y[i][0] = y[i][1] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    const uint8_t* t = src + 2 * tb * s;
    prefetch_ahead<2>(t, 2 * tb, limit);  // into L2: 0.76x the time of prefetcht0 (1B, one row)
    for (int j = 0; j < 2; ++j) {
      __m512i hacc[NR], lacc[NR];
      for (int i = 0; i < NR; ++i) hacc[i] = lacc[i] = _mm512_setzero_si512();
      for (int g = 0; g < 8; ++g) {  // tile rows 2g, 2g + 1: k = 4g .. 4g + 3
        const __m512i w = _mm512_permutexvar_epi16(
            idx, _mm512_xor_si512(_mm512_loadu_si512(t + j * tb + 32 + 64 * g), flip));
        quad_products<NR>(w, hl, s, g, hacc, lacc);
      }
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + j * tb)));
      for (int i = 0; i < NR; ++i) y[i][j] = add_block_sums(y[i][j], hacc[i], lacc[i], 128 * vsum[i][s], xs[i][s], d);
    }
  }
  store_sums<NR>(y, c);
}

// kQ4 likewise, the nibbles (0..15) already unsigned: a 64-byte load is 4 tile rows of one half (low nibbles
// columns 0-7, high 8-15); permuted, lane c < 8 holds column c at k = 2r .. 2r + 3, lane 8 + c at 2r + 4 .. 2r + 7,
// against x's quads (h and l: lanes 0-7 k = 8g .., 8-15 k = 8g + 4 ..); a block's two halves are added, then
// y += a (d sum(q v) + m sum(v)): exactly w times the rounded x, as for kQ8.
template <int NR>
inline void panel_q4_int16(const int8_t* const* hl, const float* const* xs, const int32_t* const* vsum,
                           int64_t steps, const uint8_t* src, const uint8_t* limit, float* c) {
  constexpr int64_t tb = tile_bytes(kQ4);
  alignas(64) static constexpr uint16_t kIdx[32] = {0,  8,  1,  9,  2,  10, 3,  11, 4,  12, 5,  13, 6,  14, 7,  15,
                                                    16, 24, 17, 25, 18, 26, 19, 27, 20, 28, 21, 29, 22, 30, 23, 31};
  const __m512i idx = _mm512_load_si512(kIdx), low4 = _mm512_set1_epi8(0x0F);
  const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 y[NR][2];
  for (int i = 0; i < NR; ++i) y[i][0] = y[i][1] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    const uint8_t* t = src + 2 * tb * s;
    prefetch_ahead<2>(t, 2 * tb, limit);  // as panel_q8_int16 (not measured apart)
    __m512i xh[NR][4], xl[NR][4];
    for (int i = 0; i < NR; ++i)
      for (int g = 0; g < 4; ++g) {
        const int8_t* x = hl[i] + s * 2 * kDepth + 8 * g;
        xh[i][g] = _mm512_permutexvar_epi32(halves, _mm512_castsi128_si512(_mm_loadl_epi64(
                                                        reinterpret_cast<const __m128i*>(x))));
        xl[i][g] = _mm512_permutexvar_epi32(halves, _mm512_castsi128_si512(_mm_loadl_epi64(
                                                        reinterpret_cast<const __m128i*>(x + kDepth))));
      }
    for (int j = 0; j < 2; ++j) {
      __m512i lh[NR], ll[NR], hh[NR], hl2[NR];  // low / high nibbles against x's h / l
      for (int i = 0; i < NR; ++i) lh[i] = ll[i] = hh[i] = hl2[i] = _mm512_setzero_si512();
      for (int g = 0; g < 4; ++g) {  // tile rows 4g .. 4g + 3
        const __m512i v = _mm512_loadu_si512(t + j * tb + 64 + 64 * g);
        const __m512i wl = _mm512_permutexvar_epi16(idx, _mm512_and_si512(v, low4));
        const __m512i wh = _mm512_permutexvar_epi16(idx, _mm512_and_si512(_mm512_srli_epi16(v, 4), low4));
        for (int i = 0; i < NR; ++i) {
          lh[i] = _mm512_dpbusd_epi32(lh[i], wl, xh[i][g]);
          ll[i] = _mm512_dpbusd_epi32(ll[i], wl, xl[i][g]);
          hh[i] = _mm512_dpbusd_epi32(hh[i], wh, xh[i][g]);
          hl2[i] = _mm512_dpbusd_epi32(hl2[i], wh, xl[i][g]);
        }
      }
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + j * tb)));
      const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + j * tb + 32)));
      for (int i = 0; i < NR; ++i) {
        const __m512i lo = _mm512_add_epi32(_mm512_slli_epi32(lh[i], 8), ll[i]);
        const __m512i hi = _mm512_add_epi32(_mm512_slli_epi32(hh[i], 8), hl2[i]);
        // lanes 0-7: columns 0-7 (lo's two halves), 8-15: columns 8-15 (hi's)
        const __m512i cols = _mm512_add_epi32(_mm512_shuffle_i64x2(lo, hi, 0x44), _mm512_shuffle_i64x2(lo, hi, 0xEE));
        const __m512 sum = _mm512_mul_ps(_mm512_cvtepi32_ps(cols), _mm512_set1_ps(xs[i][s]));
        const __m512 vs = _mm512_set1_ps(static_cast<float>(vsum[i][s]) * xs[i][s]);  // |sum(v)| < 2^24: exact
        y[i][j] = _mm512_fmadd_ps(m, vs, _mm512_fmadd_ps(sum, d, y[i][j]));
      }
    }
  }
  store_sums<NR>(y, c);
}

// kQ6 likewise: each group unpacked by q6_group to kQ8's two rows of bytes, already unsigned (q in 0..63), and
// permuted as there; each half block (tile rows 0-7: k 0-15, rows 8-15: k 16-31) summed apart for its own scale:
// sum((q - 32) v) = 256 sum(q h) + sum(q l) - 32 sum(v), then y += d a sum. Every sum is an exact integer below
// 2^24 (|q - 32| <= 32, |v| <= 16320, 16 terms), so the float32 conversion is exact too.
template <int NR>
inline void panel_q6_int16(const int8_t* const* hl, const float* const* xs, const int32_t* const* vhalf,
                           int64_t steps, const uint8_t* src, const uint8_t* limit, float* c) {
  constexpr int64_t tb = tile_bytes(kQ6);
  const __m512i idx = _mm512_load_si512(kQuadOrder);
  __m512 y[NR][2];
  for (int i = 0; i < NR; ++i) y[i][0] = y[i][1] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    const uint8_t* t = src + 2 * tb * s;
    prefetch_ahead<2>(t, 2 * tb, limit);  // as panel_q8_int16
    for (int j = 0; j < 2; ++j)
      for (int half = 0; half < 2; ++half) {
        __m512i hacc[NR], lacc[NR];
        for (int i = 0; i < NR; ++i) hacc[i] = lacc[i] = _mm512_setzero_si512();
        for (int g = 4 * half; g < 4 * half + 4; ++g) {  // tile rows 2g, 2g + 1: k = 4g .. 4g + 3
          quad_products<NR>(_mm512_permutexvar_epi16(idx, q6_group(t + j * tb + 64 + 48 * g)), hl, s, g, hacc, lacc);
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + j * tb + 32 * half)));
        for (int i = 0; i < NR; ++i)
          y[i][j] = add_block_sums(y[i][j], hacc[i], lacc[i], 32 * vhalf[i][2 * s + half], xs[i][s], d);
      }
  }
  store_sums<NR>(y, c);
}

inline void panel_int16_rows(int64_t kind, const int8_t* const* hl, const float* const* xs,
                             const int32_t* const* vsum, const int32_t* const* vhalf, int64_t rows, int64_t steps,
                             const uint8_t* src, const uint8_t* limit, float* c) {
  with_rows(rows, [&](auto nr) {
    constexpr int NR = decltype(nr)::value;
    if (kind == kQ4) panel_q4_int16<NR>(hl, xs, vsum, steps, src, limit, c);
    else if (kind == kQ6) panel_q6_int16<NR>(hl, xs, vhalf, steps, src, limit, c);
    else panel_q8_int16<NR>(hl, xs, vsum, steps, src, limit, c);
  });
}
#endif

inline void panel_direct_rows(int64_t kind, const c10::BFloat16* const* x, const float* xsum, int64_t rows,
                              int64_t steps, const uint8_t* src, const uint8_t* limit, float* c) {
  with_rows(rows, [&](auto nr) {
    constexpr int NR = decltype(nr)::value;
    // the per-16 kinds' loops and the q4 family's, each with its own one-row loop
    auto per_16_loop = [&](auto k) {
      constexpr int64_t K = decltype(k)::value;
      if constexpr (NR == 1) panel_q6_direct_one<K>(x[0], xsum, steps, src, limit, c);
      else panel_q6_direct<NR, K>(x, xsum, steps, src, limit, c);
    };
    auto q4_loop = [&](auto k) {
      constexpr int64_t K = decltype(k)::value;
      if constexpr (NR == 1) panel_q4_direct_one<K>(x[0], xsum, steps, src, limit, c);
      else panel_q4_direct<NR, K>(x, xsum, steps, src, limit, c);
    };
    switch (kind) {
      case kQ8: panel_q8_direct<NR>(x, xsum, steps, src, limit, c); break;
      case kQ6: per_16_loop(std::integral_constant<int64_t, kQ6>{}); break;
      case kQ4x16: per_16_loop(std::integral_constant<int64_t, kQ4x16>{}); break;
      case kQ2x16: per_16_loop(std::integral_constant<int64_t, kQ2x16>{}); break;
      case kQ3x16: per_16_loop(std::integral_constant<int64_t, kQ3x16>{}); break;
      case kQ5: q4_loop(std::integral_constant<int64_t, kQ5>{}); break;
      case kIQ4: q4_loop(std::integral_constant<int64_t, kIQ4>{}); break;
      default: q4_loop(std::integral_constant<int64_t, kQ4>{});
    }
  });
}

#endif

void check_packed(const at::Tensor& packed, int64_t kind, int64_t K, int64_t want, const char* op) {
  TORCH_CHECK(kind >= kQ4 && kind <= kQ3x16, op, ": kind must be 0 (q4: Q4_0 / Q4_1), 1 (q8: Q8_0), 2 (q6: ",
              "Q6_K), 3 (q5: Q5_1 / Q5_K), 4 (iq4: IQ4_NL / IQ4_XS), 5 (q4x16: a Q3_K gate/up beside Q2_K), 6 ",
              "(q2x16: Q2_K) or 7 (q3x16: Q3_K), got ", kind);
  TORCH_CHECK(K > 0 && K % kDepth == 0, op, ": quantized weights need K a positive multiple of 32 (GGUF's block), "
              "got K = ", K);
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kByte && packed.device().is_cpu() &&
                  packed.is_contiguous() && packed.size(0) == want && packed.size(1) == K / kDepth &&
                  packed.size(2) == 2 && packed.size(3) == tile_bytes(kind),
              op, ": packed must be a contiguous uint8 [", want, ", ", K / kDepth, ", 2, ", tile_bytes(kind),
              "] CPU tensor (chunkattn.model.quant's pack of this weight), got ", packed.scalar_type(), " ",
              packed.sizes());
}

// x: [M, K] bf16 times a packed quantized weight with n output columns (E: stored, or silu(gate) * up) -> [M, n].
template <Epilogue E>
at::Tensor run_quant(const at::Tensor& x, const at::Tensor& packed, int64_t kind, int64_t n,
                     const c10::optional<at::Tensor>& bias, int64_t path, const char* op) {
  TORCH_CHECK(quant_linear_supported(), op, ": this CPU or build lacks AVX512-BF16 (dequantize the weights instead)");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(), op,
              ": x must be a bfloat16 [M, K] CPU tensor, got ", x.scalar_type(), " ", x.sizes(), " on ", x.device());
  TORCH_CHECK(n >= 0, op, ": n must be >= 0, got ", n);
  const int64_t K = x.size(1), steps = K / kDepth, M = x.size(0);
  check_packed(packed, kind, K, (n + kOutCols<E> - 1) / kOutCols<E>, op);
  const c10::BFloat16* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == at::kBFloat16 &&
                    bias->device().is_cpu() && bias->is_contiguous(),
                op, ": bias must be a contiguous bfloat16 [", n, "] CPU tensor, got ", bias->sizes());
    b = bias->data_ptr<c10::BFloat16>();
  }
  TORCH_CHECK(path >= kAuto && path <= kInt16, op, ": path must be 0 (auto), 1 (AMX tiles), 2 (vector), 3 ",
              "(direct) or 4 (x as 15-bit integers), got ", path);
  TORCH_CHECK(path != kTiles || tiles_usable(), op, ": this CPU or build has no AMX tiles");
  TORCH_CHECK(path != kInt16 || kind == kQ4 || kind == kQ8 || kind == kQ6, op, ": path 4 (x as integers) has no ",
              kind == kQ5      ? "q5 kernel (Q5_1 / Q5_K)"
              : kind == kIQ4   ? "iq4 kernel (IQ4_NL / IQ4_XS)"
              : kind == kQ4x16 ? "q4x16 kernel (Q3_K beside Q2_K)"
              : kind == kQ3x16 ? "q3x16 kernel (Q3_K)"
                               : "q2x16 kernel (Q2_K)",
              ": use 0 to 3");
  TORCH_CHECK(path != kInt16 || int16_usable(), op, ": this CPU or build has no AVX512-VNNI (path 4, x as integers)");
  if (path == kAuto) path = auto_path(kind, M);
  const bool tiles = path == kTiles, direct = path == kDirect, int16 = path == kInt16;
  at::Tensor y = at::empty({M, n}, x.options());
  if (M == 0 || n == 0) return y;
#ifdef CHUNKATTN_QUANT
  const ARows rows(x);
  const int64_t panels = packed.size(0), tb = tile_bytes(kind);
  const uint8_t* qp = packed.data_ptr<uint8_t>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  // rows per block: kXBlockBytes of x (they stay in L2 while the panels pass), whole pairs of row tiles
  const int64_t block = std::max<int64_t>(32, (kXBlockBytes / (K * 2)) / 32 * 32);
  // direct: [M][steps] sums of x's blocks (the per-16 kinds: [M][steps][2], of each half block)
  const int64_t sums = per_16(kind) ? 2 : 1;
  std::vector<float> xsum;
  if (direct && kind != kIQ4) {  // (iq4: no offsets to scale by the sums; its kernels do not read them)
    xsum.resize(M * steps * sums);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t s = 0; s < steps; ++s) {
        const c10::BFloat16* xi = rows.row(i) + s * kDepth;
        const auto a = load(xi), b = load(xi + 16);
        if (per_16(kind)) {
          xsum[(i * steps + s) * 2] = hsum(a);
          xsum[(i * steps + s) * 2 + 1] = hsum(b);
        } else {
          xsum[i * steps + s] = hsum(a + b);
        }
      }
  }
#ifdef CHUNKATTN_QUANT_INT16
  const Int16Rows xi16 = int16 ? round_rows_to_int16(rows, M, steps) : Int16Rows{};
#endif
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    // the dequantized panel: 2 KB a step, 64-byte aligned for the tile loads
    static thread_local std::vector<float> buffer;
    const size_t need = static_cast<size_t>(steps * kTile) + 32;  // floats: 2 bf16 each
    if (buffer.size() < need) buffer.resize(need);
    c10::BFloat16* w = reinterpret_cast<c10::BFloat16*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~63ull);
    alignas(64) float c[2 * kCols * kCols];  // grouped_products: two products' sums
#ifdef CHUNKATTN_AMX
    if (tiles) load_tile_config();
#endif
    const uint8_t* limit = qp + end * steps * 2 * tb;
#ifdef CHUNKATTN_AMX
    if (tiles && M > 32) {
      // each group of panels dequantized into a buffer first
      static thread_local line_vector<c10::BFloat16> wg;
      const int64_t panel = steps * 2 * kTile;
      grouped_products<E>(rows, M, n, steps, end - begin, begin, b, yp, c, [&](int64_t g0, int64_t g1) {
        if (static_cast<int64_t>(wg.size()) < (g1 - g0) * panel) wg.resize((g1 - g0) * panel);
        for (int64_t p = g0; p < g1; ++p)
          dequant_panel(qp + (begin + p) * steps * 2 * tb, kind, steps, limit, wg.data() + (p - g0) * panel);
        return static_cast<const c10::BFloat16*>(wg.data());
      });
      _tile_release();
      return;
    }
#endif
    for (int64_t rb = 0; rb < M; rb += block) {
      const int64_t rend = std::min(M, rb + block);
      for (int64_t p = begin; p < end; ++p) {
        const uint8_t* src = qp + p * steps * 2 * tb;
        const int64_t c0 = p * kOutCols<E>, cols = std::min<int64_t>(kOutCols<E>, n - c0);
        const c10::BFloat16* bp = b != nullptr ? b + c0 : nullptr;
        // the block's rows four at a time: pass(r0, nr) leaves nr rows' sums in c, written out here
        auto in_passes = [&](auto pass) {
          for (int64_t r0 = rb; r0 < rend; r0 += 4) {
            const int64_t nr = std::min<int64_t>(4, rend - r0);
            pass(r0, nr);
            panel_out<E>(c, nr, cols, bp, yp + r0 * n + c0, n);
          }
        };
#ifdef CHUNKATTN_QUANT_INT16
        if (int16) {
          in_passes([&](int64_t r0, int64_t nr) {
            const int8_t* hl[4];
            const float* xs[4];
            const int32_t* vsum[4];
            const int32_t* vhalf[4];
            for (int64_t i = 0; i < nr; ++i) {
              hl[i] = xi16.hl.data() + (r0 + i) * steps * 2 * kDepth;
              xs[i] = xi16.scale.data() + (r0 + i) * steps;
              vsum[i] = xi16.vsum.data() + (r0 + i) * steps;
              vhalf[i] = xi16.vhalf.data() + (r0 + i) * steps * 2;
            }
            panel_int16_rows(kind, hl, xs, vsum, vhalf, nr, steps, src, r0 == 0 ? limit : qp, c);
          });
          continue;
        }
#endif
        if (direct) {
          in_passes([&](int64_t r0, int64_t nr) {
            const c10::BFloat16* xr[4];
            for (int64_t i = 0; i < nr; ++i) xr[i] = rows.row(r0 + i);
            const float* xs = xsum.empty() ? nullptr : xsum.data() + r0 * steps * sums;
            panel_direct_rows(kind, xr, xs, nr, steps, src, r0 == 0 ? limit : qp, c);
          });
          continue;
        }
        if (tiles) {  // M <= 32, one pair of row tiles: dequantize step by step beside the products
#ifdef CHUNKATTN_AMX
          const bool two = rb + 16 < M;
          const auto [x0, ld0] = rows.rows(rb);
          const auto [x1, ld1] = two ? rows.rows(rb + 16) : std::make_pair(x0, ld0);
          panel_tiles_interleaved(RowTiles{x0, x1, ld0, ld1}, steps, src, kind, limit, two, w, c);
          panel_out<E>(c, rend - rb, cols, bp, yp + rb * n + c0, n);
#endif
          continue;
        }
        dequant_panel(src, kind, steps, rb == 0 ? limit : qp, w);
        in_passes([&](int64_t r0, int64_t nr) {
          const c10::BFloat16* xr[4];
          for (int64_t i = 0; i < nr; ++i) xr[i] = rows.row(r0 + i);
          panel_vector_rows(xr, nr, steps, w, c, nullptr);
        });
      }
    }
#ifdef CHUNKATTN_AMX
    if (tiles) _tile_release();
#endif
  });
#else
  (void)b;
  (void)tiles;
  (void)direct;
  (void)int16;
#endif
  return y;
}

}  // namespace

at::Tensor linear_quant(const at::Tensor& x, const at::Tensor& packed, int64_t kind, int64_t n,
                        const c10::optional<at::Tensor>& bias, int64_t path) {
  return run_quant<Epilogue::kStore>(x, packed, kind, n, bias, path, "linear_quant");
}

at::Tensor linear_silu_mul_quant(const at::Tensor& x, const at::Tensor& packed, int64_t kind, int64_t inner,
                                 int64_t path) {
  return run_quant<Epilogue::kSiluMul>(x, packed, kind, inner, c10::nullopt, path, "linear_silu_mul_quant");
}

// The kernel's own dequantization of a whole pack: bf16 [P, S, 2, 16, 32], pack_linear_amx's layout (for tests).
at::Tensor dequantize_panels(const at::Tensor& packed, int64_t kind) {
  TORCH_CHECK(quant_linear_supported(), "dequantize_panels: this CPU or build lacks AVX512-BF16");
  TORCH_CHECK(packed.dim() == 4, "dequantize_panels: packed must be [P, S, 2, tile_bytes], got ", packed.sizes());
  const int64_t P = packed.size(0), steps = packed.size(1);
  check_packed(packed, kind, steps * kDepth, P, "dequantize_panels");
  at::Tensor out = at::empty({P, steps, 2, 16, 32}, packed.options().dtype(at::kBFloat16));
#ifdef CHUNKATTN_QUANT
  const uint8_t* qp = packed.data_ptr<uint8_t>();
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  const int64_t tb = tile_bytes(kind);
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      dequant_panel(qp + p * steps * 2 * tb, kind, steps, qp, op + p * steps * 2 * kTile);
  });
#endif
  return out;
}

// Rows `ids` of a packed (not gate/up) weight with n rows, dequantized to float32 [len(ids), K] as GGUF does (d q,
// or d q + m rounded after the product: exactly QuantizedWeight.rows, the reference): an embedding lookup. The
// PyTorch gathers it replaces cost a 2048-token prefill ~70 ms (13% of the step) on the AMX Xeon VM.
at::Tensor embedding_quant(const at::Tensor& packed, int64_t kind, const at::Tensor& ids, int64_t n) {
  TORCH_CHECK(packed.dim() == 4, "embedding_quant: packed must be [P, S, 2, tile bytes], got ", packed.sizes());
  check_packed(packed, kind, packed.size(1) * kDepth, packed.size(0), "embedding_quant");
  TORCH_CHECK(n >= 0 && n <= packed.size(0) * 32, "embedding_quant: ", packed.size(0), " panels cannot hold n = ", n,
              " rows");
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong && ids.device().is_cpu(),
              "embedding_quant: ids must be a 1-D int64 CPU tensor, got ", ids.scalar_type(), " ", ids.sizes());
  const at::Tensor idc = ids.contiguous();
  const int64_t* id = idc.data_ptr<int64_t>();
  const int64_t count = idc.numel(), steps = packed.size(1), K = steps * kDepth, tb = tile_bytes(kind);
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK_INDEX(id[i] >= 0 && id[i] < n, "embedding_quant: row index out of range: rows must be in [0, ", n,
                      "), got ", id[i]);
  at::Tensor out = at::empty({count, K}, packed.options().dtype(at::kFloat));
  const uint8_t* qp = packed.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = id[i], p = row / 32, j = (row % 32) / 16, c = row % 16;
      float* dst = op + i * K;
      for (int64_t s = 0; s < steps; ++s) {
        const uint8_t* t = qp + ((p * steps + s) * 2 + j) * tb;
        const float d = static_cast<float>(reinterpret_cast<const c10::Half*>(t)[c]);
        if (kind == kIQ4) {
          for (int64_t k = 0; k < kDepth; ++k) {
            const int64_t e = 2 * c + k % 2;
            const uint8_t b = t[32 + 16 * (k / 2) + e % 16];
            dst[s * kDepth + k] = kIQ4Values[e < 16 ? b & 15 : b >> 4] * d;  // exact: 7 x 11 bits
          }
        } else if (kind == kQ4 || kind == kQ5) {
          const float m = static_cast<float>(reinterpret_cast<const c10::Half*>(t + 32)[c]);
          for (int64_t k = 0; k < kDepth; ++k) {
            const int64_t e = 2 * c + k % 2, r = k / 2;
            const uint8_t b = t[64 + 16 * r + e % 16];
            int q = e < 16 ? b & 15 : b >> 4;
            if (kind == kQ5) q |= ((t[320 + 16 * (r / 4) + 4 * (e / 8) + r % 4] >> (e % 8)) & 1) << 4;
            float prod = static_cast<float>(q) * d;
            asm("" : "+x"(prod));  // rounded here, as rows() does: never contracted into a fused multiply-add
            dst[s * kDepth + k] = prod + m;
          }
        } else if (per_16(kind)) {
          const float d1 = static_cast<float>(reinterpret_cast<const c10::Half*>(t + 32)[c]);
          const bool q6 = kind == kQ6, q3 = kind == kQ3x16;
          float m0 = 0, m1 = 0;  // kQ4x16's / kQ2x16's offsets
          if (!q6 && !q3) {
            m0 = static_cast<float>(reinterpret_cast<const c10::Half*>(t + 64)[c]);
            m1 = static_cast<float>(reinterpret_cast<const c10::Half*>(t + 96)[c]);
          }
          for (int64_t k = 0; k < kDepth; ++k) {
            const int64_t r = k / 2, v = 32 * (r % 2) + 2 * c + k % 2;  // group r / 2, value v
            const uint8_t* g = t + groups_at(kind) + group_bytes(kind) * (r / 2);
            int q = kind == kQ2x16 || q3 ? (g[v % 16] >> (2 * (v / 16))) & 3 : v < 32 ? g[v] & 15 : g[v - 32] >> 4;
            if (q3) {
              q |= ((g[16 + v / 8] >> (v % 8)) & 1) << 2;
              dst[s * kDepth + k] = static_cast<float>(q - 4) * (k < 16 ? d : d1);  // exact: 3 x 11 bits
            } else if (q6) {
              q |= ((g[32 + v % 16] >> (2 * (v / 16))) & 3) << 4;
              dst[s * kDepth + k] = static_cast<float>(q - 32) * (k < 16 ? d : d1);  // exact: 6 x 11 bits
            } else {
              float prod = static_cast<float>(q) * (k < 16 ? d : d1);
              asm("" : "+x"(prod));  // rounded here (exact: 4 x 11 bits), as rows() does, then + m
              dst[s * kDepth + k] = prod + (k < 16 ? m0 : m1);
            }
          }
        } else {
          for (int64_t k = 0; k < kDepth; ++k) {
            const int64_t e = 2 * c + k % 2;
            dst[s * kDepth + k] = static_cast<float>(static_cast<int8_t>(t[32 + 32 * (k / 2) + e])) * d;
          }
        }
      }
    }
  });
  return out;
}

}  // namespace chunkattn::ops

using namespace chunkattn::ops;  // the ops below


TORCH_LIBRARY_FRAGMENT(chunkattn_layers, m) {
  m.def("quant_linear_supported() -> bool", &quant_linear_supported);
  m.def("quant_int_x_supported() -> bool", &int16_usable);
  m.def("quant_auto_path(int kind, int rows) -> int", &auto_path);
  m.def("linear_quant(Tensor x, Tensor packed, int kind, int n, Tensor? bias, int path=0) -> Tensor", &linear_quant);
  m.def("linear_silu_mul_quant(Tensor x, Tensor packed, int kind, int inner, int path=0) -> Tensor",
        &linear_silu_mul_quant);
  m.def("dequantize_panels(Tensor packed, int kind) -> Tensor", &dequantize_panels);
  m.def("embedding_quant(Tensor packed, int kind, Tensor ids, int n) -> Tensor", &embedding_quant);
}
