// Two-phase-partition attention on the CPU, reading K/V in place from the chunked cache.
//
// One call computes one layer for a planned batch (see chunkattn/attention/cpu_tpp.py for the plan):
//   * shared tasks (chunk-first): a piece of a run of shared chunks x one K/V head, multiplied by the stacked
//     queries of every sequence sharing it (GQA: the group's query heads are extra rows), so the shared K/V is
//     read once for all of them; each writes a partial (o, m, l) per query row;
//   * private tasks (sequence-first): a tile of one sequence's query rows x one K/V head over that sequence's
//     own chunks, causally masked; it writes the output directly when nothing else contributes to its rows,
//     else a partial;
//   * a merge pass combines the partials of each row by online softmax.
// Scores are kept in base 2 (the scale is multiplied by log2(e)); the returned LSE is natural-log. float32 on
// AVX-512: tasks of >= 16 rows compute them key-major (see attend_block_t).
// Arithmetic is float32 for float32 and bfloat16 storage. SIMD through GCC/Clang vector extensions, so the
// same source compiles to AVX-512, AVX2 or NEON.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "amx.h"
#include "simd.h"
#include "ops.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define CHUNKATTN_BF16_DOT 1
#endif

namespace chunkattn::ops {
namespace {

constexpr int kKeyBlock = 128;     // keys per softmax block (gathered across chunks)
constexpr int kPackRows = 4;       // from this many query rows on, scores use the packed (transposed) K path
constexpr int kWideBlock = 16;     // keys per block of a wide task (head by head over rows kept in L2; hsum16);
                                    // bf16 at d = 64: 64 (wide_block_keys)
constexpr int kKeysT = 12;         // keys per score tile of the key-major path (12 x 2 vectors of rows)
constexpr float kLazyMax = 8.f;    // AMX path: a row's reference maximum moves when exceeded by this (log2 units)
constexpr float kLazyLimit = 256.f;  // 2^kLazyMax: a block's probabilities summing to less exceed no reference

constexpr int64_t kAmxMinRows = 4;  // bf16 tasks with fewer query rows waste most of a 16-row AMX tile
constexpr int64_t kAmxGroup = 16;   // query rows per pass of the AMX path over a block (see attend_block_amx)
constexpr int64_t kWideAmxMaxGroup = 16;  // wide tasks of GQA groups up to this size run on AMX tiles (run_wide_amx)
constexpr int64_t kWideRuns = 4;          // runs of 16 keys per block of a wide AMX task

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// Per-thread scratch of a task: packed queries, scores, transposed keys, accumulators.
struct Scratch {
  line_vector<float> q, s, kt, acc, m, l;
  line_vector<float> qt, alpha;  // key-major path: queries transposed [d, rows16], per-row rescale factors
  line_vector<int32_t> vis;
  line_vector<uint16_t> qb, pb;  // bfloat16 storage with bf16 dot products: raw queries, probabilities
  line_vector<uint32_t> ktb;     // keys as bf16 pairs: ktb[x / 2][t] holds dims x, x + 1 of key t
  line_vector<uint32_t> vpb;     // values as bf16 pairs of keys: see pack_values_bf16
  // AMX path (attend_block_amx): queries and probabilities as pairs, transposed values, gathered keys,
  // transposed accumulators
  line_vector<uint32_t> qv, pv;
  line_vector<c10::BFloat16> vt, kst;
  line_vector<float> acc_t;
  line_vector<v16> vw;      // pack_values_t's interleaved pairs, [d / 16][16 pairs]
  bool amx_task = false;    // the current task runs on AMX tiles (decided once, in load_queries)
  int tiles = 0;            // this thread's AMX tile configuration: 0 none, 1 kernels' (load_tiles), 2 + g a wide
                            // task's for group g (load_tiles_wide); released at the end of the call
  // wide AMX tasks (run_wide_amx): queries as B tiles, probabilities as A tiles, gathered rows, blocks of keys
  line_vector<uint32_t> wq, wp;
  line_vector<c10::BFloat16> wg;
  std::vector<int64_t> rows;  // a wide task's key rows (run_wide)
  int64_t krow[kKeyBlock];  // storage row of each key of the current block
  int64_t kpos[kKeyBlock];  // its position in the sequence (private tasks: causal masks)
  void reserve(int64_t rows, int64_t d) {
    const int64_t kbp = kKeyBlock, rows16 = round16(rows);  // per-row state padded to whole vectors
    if ((int64_t)q.size() < rows * d) q.resize(rows * d);
    if ((int64_t)acc.size() < round16(rows) * d) acc.resize(round16(rows) * d);  // AMX: whole 16-row tiles
    if ((int64_t)m.size() < rows16) {
      s.resize(rows16 * (kbp + kKeysT));  // the key-major path's last tile may run past the block
      m.resize(rows16);
      l.resize(rows16);
      vis.resize(rows16);
      alpha.resize(rows16);
    }
    if ((int64_t)kt.size() < d * kbp) kt.resize(d * kbp);
  }
  void reserve_bf16(int64_t rows, int64_t d) {
    const int64_t kbp = kKeyBlock;
    rows = round16(rows);  // AMX: whole 16-row tiles of queries and probabilities
    if ((int64_t)qb.size() < rows * d) qb.resize(rows * d);
    if ((int64_t)pb.size() < rows * kbp) pb.resize(rows * kbp);
    if ((int64_t)ktb.size() < d / 2 * kbp) ktb.resize(d / 2 * kbp);
    if ((int64_t)vpb.size() < d / 2 * kbp) vpb.resize(d / 2 * kbp);
  }
};

struct Layout {
  int64_t hq, hkv, group, d;
  int64_t q_row, q_head;  // strides of q (elements)
  int64_t kv_row;         // row stride of k and v (elements); head stride is d
  float qk_scale;         // scale * log2(e)
};

// In-register transpose of a 16 x 16 tile: four butterfly stages that swap off-diagonal sub-blocks.
template <int B, int... K>
constexpr i16v lower_mask(std::integer_sequence<int, K...>) { return i16v{((K & B) ? 16 + K - B : K)...}; }
template <int B, int... K>
constexpr i16v upper_mask(std::integer_sequence<int, K...>) { return i16v{((K & B) ? 16 + K : K + B)...}; }

template <int B>
inline void transpose_stage(v16* r) {
  constexpr i16v lo = lower_mask<B>(std::make_integer_sequence<int, 16>{});
  constexpr i16v hi = upper_mask<B>(std::make_integer_sequence<int, 16>{});
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    if (!(i & B)) {
      const v16 a = r[i], c = r[i + B];
      r[i] = __builtin_shuffle(a, c, lo);
      r[i + B] = __builtin_shuffle(a, c, hi);
    }
  }
}

inline void transpose16(v16* r) {
  transpose_stage<8>(r);
  transpose_stage<4>(r);
  transpose_stage<2>(r);
  transpose_stage<1>(r);
}

// kt[x, t] = K[t, x] for the block's keys t < nk (zero up to a multiple of 16), x < d; d a multiple of 16.
template <typename T>
void pack_keys(const Layout& L, const T* k, const int64_t* krow, int64_t nk, float* kt) {
  const int64_t d = L.d, kbp = kKeyBlock;
  v16 tile[16];
  for (int64_t t0 = 0; t0 < nk; t0 += 16) {
    const int64_t nt = std::min<int64_t>(16, nk - t0);
    for (int64_t x0 = 0; x0 < d; x0 += 16) {
      for (int i = 0; i < 16; ++i) tile[i] = i < nt ? load(k + krow[t0 + i] * L.kv_row + x0) : v16{};
      transpose16(tile);
      for (int i = 0; i < 16; ++i) store(kt + (x0 + i) * kbp + t0, tile[i]);
    }
  }
}

// RB rows x up to 32 keys of scores from packed keys: per head-dim element, RB broadcasts times 2 key vectors.
template <int RB>
inline void score_tile(const float* q, int64_t d, const float* kt, int64_t t0, bool two, float* s) {
  const int64_t kbp = kKeyBlock;
  v16 a0[RB] = {}, a1[RB] = {};
  if (two) {
    for (int64_t x = 0; x < d; ++x) {
      const v16 k0 = load(kt + x * kbp + t0), k1 = load(kt + x * kbp + t0 + 16);
#pragma GCC unroll 8
      for (int i = 0; i < RB; ++i) {
        v16 qv = splat(q[i * d + x]);
        pin(qv);
        a0[i] += qv * k0;
        a1[i] += qv * k1;
      }
    }
  } else {
    for (int64_t x = 0; x < d; ++x) {
      const v16 k0 = load(kt + x * kbp + t0);
#pragma GCC unroll 8
      for (int i = 0; i < RB; ++i) a0[i] += q[i * d + x] * k0;
    }
  }
  for (int i = 0; i < RB; ++i) {
    store(s + i * kbp + t0, a0[i]);
    if (two) store(s + i * kbp + t0 + 16, a1[i]);
  }
}

// Scores S[R, nk] = Q[R, d] . K[nk, d]^T for one block of keys (key t at storage row krow[t]).
template <typename T>
void scores(const Layout& L, const float* q, int64_t rows, const T* k, int64_t nk, Scratch& ws) {
  const int64_t d = L.d, kbp = kKeyBlock;
  float* s = ws.s.data();
  if (rows < kPackRows || d % 16) {
    for (int64_t t = 0; t < nk; ++t) {
      const T* kr = k + ws.krow[t] * L.kv_row;
      if (d % 16 == 0) {
        for (int64_t i = 0; i < rows; ++i) {
          const float* qi = q + i * d;
          v16 acc = v16{};
          for (int64_t x = 0; x < d; x += 16) acc += load(qi + x) * load(kr + x);
          s[i * kbp + t] = hsum(acc);
        }
      } else {
        for (int64_t i = 0; i < rows; ++i) {
          float acc = 0.f;
          for (int64_t x = 0; x < d; ++x) acc += q[i * d + x] * to_float(kr[x]);
          s[i * kbp + t] = acc;
        }
      }
    }
    return;
  }
  float* kt = ws.kt.data();
  pack_keys(L, k, ws.krow, nk, kt);
  const int64_t nk16 = (nk + 15) / 16 * 16;
  for (int64_t t0 = 0; t0 < nk16; t0 += 32) {
    const bool two = t0 + 16 < nk16;
    int64_t i0 = 0;
    for (; i0 + 8 <= rows; i0 += 8) score_tile<8>(q + i0 * d, d, kt, t0, two, s + i0 * kbp);
    switch (rows - i0) {
      case 7: score_tile<7>(q + i0 * d, d, kt, t0, two, s + i0 * kbp); break;
      case 6: score_tile<6>(q + i0 * d, d, kt, t0, two, s + i0 * kbp); break;
      case 5: score_tile<5>(q + i0 * d, d, kt, t0, two, s + i0 * kbp); break;
      case 4: score_tile<4>(q + i0 * d, d, kt, t0, two, s + i0 * kbp); break;
      case 3: score_tile<3>(q + i0 * d, d, kt, t0, two, s + i0 * kbp); break;
      case 2: score_tile<2>(q + i0 * d, d, kt, t0, two, s + i0 * kbp); break;
      case 1: score_tile<1>(q + i0 * d, d, kt, t0, two, s + i0 * kbp); break;
      default: break;
    }
  }
}

// acc[R, d] += P[R, nk] . V[nk, d] for RB rows of d = 16 * DV: RB x DV accumulators stay in registers; each
// value vector is loaded once per key and used by every row. P is row-major (p[i * kKeyBlock + t]) or, with
// KeyMajor, key-major (p[t * ld + i]: the transposed scores of attend_block_t).
template <int RB, int DV, bool KeyMajor = false, typename T>
inline void pv_tile(const float* p, const T* v, const int64_t* krow, int64_t kv_row, int64_t nk, float* acc,
                    int64_t ld = 0) {
  constexpr int64_t kbp = kKeyBlock, d = 16 * DV;
  v16 a[RB][DV];
#pragma GCC unroll 8
  for (int i = 0; i < RB; ++i)
#pragma GCC unroll 16
    for (int x = 0; x < DV; ++x) a[i][x] = load(acc + i * d + 16 * x);
  for (int64_t t = 0; t < nk; ++t) {
    const T* vr = v + krow[t] * kv_row;
    v16 pb[RB];
#pragma GCC unroll 8
    for (int i = 0; i < RB; ++i) pb[i] = splat(KeyMajor ? p[t * ld + i] : p[i * kbp + t]);
#pragma GCC unroll 16
    for (int x = 0; x < DV; ++x) {
      v16 vx = load(vr + 16 * x);
      pin(vx);
#pragma GCC unroll 8
      for (int i = 0; i < RB; ++i) a[i][x] += pb[i] * vx;
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < RB; ++i)
#pragma GCC unroll 16
    for (int x = 0; x < DV; ++x) store(acc + i * d + 16 * x, a[i][x]);
}

// The probabilities are in ws.s, row-major, or with KeyMajor key-major with leading dimension ld.
template <int DV, bool KeyMajor = false, typename T>
void accumulate_fixed(const Layout& L, int64_t rows, const T* v, int64_t nk, Scratch& ws, int64_t ld = 0) {
  constexpr int RB = DV >= 16 ? 1 : DV >= 8 ? 3 : DV >= 4 ? 6 : 8;
  constexpr int64_t kbp = kKeyBlock, d = 16 * DV;
  const float* p = ws.s.data();
  float* acc = ws.acc.data();
  auto rows_at = [&](int64_t i) { return p + (KeyMajor ? i : i * kbp); };
  int64_t i0 = 0;
  for (; i0 + RB <= rows; i0 += RB)
    pv_tile<RB, DV, KeyMajor>(rows_at(i0), v, ws.krow, L.kv_row, nk, acc + i0 * d, ld);
  const float* pt = rows_at(i0);
  float* at = acc + i0 * d;
  switch (rows - i0) {  // the remaining rows, fewer than RB
    case 7: if constexpr (RB > 7) pv_tile<7, DV, KeyMajor>(pt, v, ws.krow, L.kv_row, nk, at, ld); break;
    case 6: if constexpr (RB > 6) pv_tile<6, DV, KeyMajor>(pt, v, ws.krow, L.kv_row, nk, at, ld); break;
    case 5: if constexpr (RB > 5) pv_tile<5, DV, KeyMajor>(pt, v, ws.krow, L.kv_row, nk, at, ld); break;
    case 4: if constexpr (RB > 4) pv_tile<4, DV, KeyMajor>(pt, v, ws.krow, L.kv_row, nk, at, ld); break;
    case 3: if constexpr (RB > 3) pv_tile<3, DV, KeyMajor>(pt, v, ws.krow, L.kv_row, nk, at, ld); break;
    case 2: if constexpr (RB > 2) pv_tile<2, DV, KeyMajor>(pt, v, ws.krow, L.kv_row, nk, at, ld); break;
    case 1: if constexpr (RB > 1) pv_tile<1, DV, KeyMajor>(pt, v, ws.krow, L.kv_row, nk, at, ld); break;
    default: break;
  }
}

// acc += P . V over the block's first nk keys. Key-major probabilities come only with the head sizes that have a
// fixed path (use_key_major).
template <bool KeyMajor = false, typename T>
void accumulate(const Layout& L, int64_t rows, const T* v, int64_t nk, Scratch& ws, int64_t ld = 0) {
  switch (L.d) {
    case 64: return accumulate_fixed<4, KeyMajor>(L, rows, v, nk, ws, ld);
    case 128: return accumulate_fixed<8, KeyMajor>(L, rows, v, nk, ws, ld);
    case 32: return accumulate_fixed<2, KeyMajor>(L, rows, v, nk, ws, ld);
    case 256: return accumulate_fixed<16, KeyMajor>(L, rows, v, nk, ws, ld);
    case 16: return accumulate_fixed<1, KeyMajor>(L, rows, v, nk, ws, ld);
    default: break;
  }
  if constexpr (KeyMajor) TORCH_CHECK(false, "key-major value product for head size ", L.d);
  const int64_t d = L.d, kbp = kKeyBlock;
  const float* p = ws.s.data();
  float* acc = ws.acc.data();
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t t = 0; t < nk; ++t) {
      const float pv = p[i * kbp + t];
      if (pv == 0.f) continue;
      const T* vr = v + ws.krow[t] * L.kv_row;
      for (int64_t x = 0; x < d; ++x) acc[i * d + x] += pv * to_float(vr[x]);
    }
}

#ifdef CHUNKATTN_BF16_DOT
// bfloat16 storage on CPUs with AVX512-BF16: products of bf16 pairs accumulated in float32 (vdpbf16ps), two
// multiply-adds per instruction and no conversions. Queries and keys are used as stored; the probabilities are
// rounded to bf16 for the product with V (as flash attention does on GPUs).
inline bool use_bf16_dot(const Layout& L, int64_t rows) { return rows >= kPackRows && L.d % 32 == 0; }

// Head sizes whose value product has a bf16-pair path (accumulate_bf16_fixed); others take the float one.
inline bool bf16_pv_head_dim(int64_t d) { return d == 32 || d == 64 || d == 128 || d == 256; }

inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }

// ktb[x / 2][t] = (K[t, x], K[t, x + 1]) for the block's keys (zero up to a multiple of 16).
inline void pack_keys_bf16(const Layout& L, const c10::BFloat16* k, const int64_t* krow, int64_t nk, uint32_t* ktb) {
  const int64_t d = L.d, kbp = kKeyBlock;
  v16 tile[16];
  for (int64_t t0 = 0; t0 < nk; t0 += 16) {
    const int64_t nt = std::min<int64_t>(16, nk - t0);
    for (int64_t x0 = 0; x0 < d; x0 += 32) {  // 32 dims = 16 pairs = one 64-byte row per key
      for (int i = 0; i < 16; ++i)
        tile[i] = i < nt ? *reinterpret_cast<const v16u*>(k + krow[t0 + i] * L.kv_row + x0) : v16{};
      transpose16(tile);  // bit moves only: each lane holds a pair of bf16
      for (int i = 0; i < 16; ++i) store(reinterpret_cast<float*>(ktb + (x0 / 2 + i) * kbp + t0), tile[i]);
    }
  }
}

// RB rows x 16 NV keys of scores from packed keys: per pair of head dims, NV key vectors, RB query broadcasts and
// RB x NV dot products into accumulators that stay in registers. P: the pairs per row (d / 2) where it is known
// at compile time (d = 64, 128), so that every row's query is an immediate offset from one pointer (with a
// runtime stride the rows' pointers took general registers, and the accumulators spilled); 0: `pairs`.
template <int RB, int NV, int P>
inline void score_tile_bf16(const uint32_t* qb, int64_t pairs, const uint32_t* ktb, int64_t t0, float scale,
                            float* s) {
  constexpr int64_t kbp = kKeyBlock;
  if constexpr (P > 0) pairs = P;
  __m512 a[RB][NV];
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < NV; ++v) a[i][v] = _mm512_setzero_ps();
  for (int64_t x = 0; x < pairs; ++x) {
    __m512i k[NV];
    for (int v = 0; v < NV; ++v) k[v] = _mm512_loadu_si512(ktb + x * kbp + t0 + 16 * v);
#pragma GCC unroll 8
    for (int i = 0; i < RB; ++i) {
      const __m512i qv = _mm512_set1_epi32((int)qb[i * pairs + x]);
      for (int v = 0; v < NV; ++v) a[i][v] = _mm512_dpbf16_ps(a[i][v], as_bh(qv), as_bh(k[v]));
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(s + i * kbp + t0 + 16 * v, _mm512_mul_ps(a[i][v], sc));
}

// f(std::integral_constant<int, n>) for the runtime n in 1 .. N.
template <int N, typename F>
inline void tail_rows(int64_t n, F&& f) {
  if constexpr (N > 0) {
    if (n == N) return f(std::integral_constant<int, N>{});
    tail_rows<N - 1>(n, f);
  }
}

constexpr int kScoreRows = 8;  // query rows per score tile (12 measured the same)

// Score tiles of kScoreRows rows x 32 keys over the block (16 keys at its end), the last rows by fewer.
template <int P>
inline void score_tiles_bf16(const uint32_t* qb, int64_t rows, int64_t pairs, const uint32_t* ktb, int64_t nk16,
                             float scale, float* s) {
  constexpr int64_t kbp = kKeyBlock;
  for (int64_t t0 = 0; t0 < nk16; t0 += 32) {
    const bool two = t0 + 16 < nk16;
    auto tile = [&](auto rb, int64_t i0) {
      constexpr int R = decltype(rb)::value;
      if (two)
        score_tile_bf16<R, 2, P>(qb + i0 * pairs, pairs, ktb, t0, scale, s + i0 * kbp);
      else
        score_tile_bf16<R, 1, P>(qb + i0 * pairs, pairs, ktb, t0, scale, s + i0 * kbp);
    };
    int64_t i0 = 0;
    for (; i0 + kScoreRows <= rows; i0 += kScoreRows) tile(std::integral_constant<int, kScoreRows>{}, i0);
    if (i0 < rows) tail_rows<kScoreRows - 1>(rows - i0, [&](auto rb) { tile(rb, i0); });
  }
}

inline void scores_bf16(const Layout& L, int64_t rows, const c10::BFloat16* k, int64_t nk, Scratch& ws) {
  const int64_t d = L.d;
  pack_keys_bf16(L, k, ws.krow, nk, ws.ktb.data());
  const uint32_t* qb = reinterpret_cast<const uint32_t*>(ws.qb.data());
  const int64_t nk16 = (nk + 15) / 16 * 16;
  switch (d) {
    case 64: return score_tiles_bf16<32>(qb, rows, 32, ws.ktb.data(), nk16, L.qk_scale, ws.s.data());
    case 128: return score_tiles_bf16<64>(qb, rows, 64, ws.ktb.data(), nk16, L.qk_scale, ws.s.data());
    default: return score_tiles_bf16<0>(qb, rows, d / 2, ws.ktb.data(), nk16, L.qk_scale, ws.s.data());
  }
}

// vpb[t / 2][x]: dims of keys t and t + 1 as bf16 pairs, per 32 dims first the pairs of the lower 16 dims, then
// those of the upper 16 (the operands of vdpbf16ps), for the block's keys (the odd one out pairs with zeros).
// Done once per block, so that each tile of query rows reads ready pairs instead of interleaving them again.
// Dims 16 x .. 16 x + 31 of the value rows of two keys (v1 null: zeros) as bf16 pairs (key t, key t + 1) per dim:
// `lo` holds dims 16 x .. 16 x + 15, `hi` the next 16 (the operands of vdpbf16ps).
inline void value_pairs_bf16(const c10::BFloat16* v0, const c10::BFloat16* v1, int x, __m512i& lo, __m512i& hi) {
  const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38,
                                          6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi_idx = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23,
                                          54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  const __m512i r0 = _mm512_loadu_si512(v0 + 16 * x);
  const __m512i r1 = v1 ? _mm512_loadu_si512(v1 + 16 * x) : _mm512_setzero_si512();
  lo = _mm512_permutex2var_epi16(r0, lo_idx, r1);
  hi = _mm512_permutex2var_epi16(r0, hi_idx, r1);
}

template <int DV>
inline void pack_values_bf16(const c10::BFloat16* v, const int64_t* krow, int64_t kv_row, int64_t nk, uint32_t* vpb) {
  constexpr int64_t d = 16 * DV;
  static_assert(DV % 2 == 0, "pairs of 16-dim blocks");
  for (int64_t t = 0; t < nk; t += 2) {
    const c10::BFloat16* v0 = v + krow[t] * kv_row;
    const c10::BFloat16* v1 = t + 1 < nk ? v + krow[t + 1] * kv_row : nullptr;
    uint32_t* dst = vpb + t / 2 * d;
#pragma GCC unroll 8
    for (int x = 0; x < DV; x += 2) {
      __m512i lo, hi;
      value_pairs_bf16(v0, v1, x, lo, hi);
      _mm512_storeu_si512(dst + 16 * x, lo);
      _mm512_storeu_si512(dst + 16 * (x + 1), hi);
    }
  }
}

// acc[RB rows, 16 * DV] += P . V over key pairs, from packed values: per pair of keys DV loads, RB broadcasts and
// RB x DV dot products into RB x DV accumulators that stay in registers.
template <int RB, int DV>
inline void pv_tile_bf16(const uint32_t* pb, const uint32_t* vpb, int64_t nk, float* acc) {
  constexpr int64_t d = 16 * DV, kbp2 = kKeyBlock / 2;
  __m512 a[RB][DV];
  for (int i = 0; i < RB; ++i)
    for (int x = 0; x < DV; ++x) a[i][x] = _mm512_loadu_ps(acc + i * d + 16 * x);
  for (int64_t t2 = 0; t2 < (nk + 1) / 2; ++t2) {
    __m512i pp[RB];
    for (int i = 0; i < RB; ++i) pp[i] = _mm512_set1_epi32((int)pb[i * kbp2 + t2]);
#pragma GCC unroll 16
    for (int x = 0; x < DV; ++x) {
      const __m512i vx = _mm512_loadu_si512(vpb + t2 * d + 16 * x);
#pragma GCC unroll 8
      for (int i = 0; i < RB; ++i) a[i][x] = _mm512_dpbf16_ps(a[i][x], as_bh(pp[i]), as_bh(vx));
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int x = 0; x < DV; ++x) _mm512_storeu_ps(acc + i * d + 16 * x, a[i][x]);
}

template <int DV>
void accumulate_bf16_fixed(const Layout& L, int64_t rows, const c10::BFloat16* v, int64_t nk, Scratch& ws) {
  constexpr int RB = DV >= 16 ? 1 : DV >= 8 ? 3 : 6;
  constexpr int64_t d = 16 * DV, kbp2 = kKeyBlock / 2;
  const uint32_t* pb = reinterpret_cast<const uint32_t*>(ws.pb.data());
  pack_values_bf16<DV>(v, ws.krow, L.kv_row, nk, ws.vpb.data());
  const uint32_t* vpb = ws.vpb.data();
  float* acc = ws.acc.data();
  int64_t i0 = 0;
  for (; i0 + RB <= rows; i0 += RB) pv_tile_bf16<RB, DV>(pb + i0 * kbp2, vpb, nk, acc + i0 * d);
  tail_rows<RB - 1>(rows - i0, [&](auto rb) { pv_tile_bf16<decltype(rb)::value, DV>(pb + i0 * kbp2, vpb, nk,
                                                                                      acc + i0 * d); });
}

#endif

#ifdef CHUNKATTN_BF16_DOT
// update_softmax for probabilities wanted only as bf16 pairs (ws.pb; every reader of a bf16 dot product path):
// one pass exponentiates, sums and rounds, 32 keys at a time, without writing float probabilities back; masked
// lanes for a row's last keys (no scalar tail: a diagonal block's rows see any number of its keys) and a degree-4
// exp2 (relative error < 7.5e-5, far below the bf16 rounding that follows). With the score tiles' compile-time
// head size, on the 2-core Zen 4 VM: a 1088-token causal prefill at SmolLM2's 9 / 3 heads 6.31 -> 5.98 ms
// (median of 6 alternated runs; 4160 tokens 76.7 -> 75.6 ms), a decode step of 32 sequences after 1024 shared
// tokens ~4% faster, one sequence after 1100 the same (this VM's noise is of the same size).
inline int64_t update_softmax_bf16(const Layout& L, int64_t rows, int64_t nk, Scratch& ws) {
  auto lanes = [](int64_t n) { return (__mmask16)(n >= 16 ? 0xFFFF : n <= 0 ? 0 : (1u << n) - 1); };
  const int64_t d = L.d, kbp = kKeyBlock;
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  int64_t used = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const float* si = ws.s.data() + i * kbp;
    uint16_t* pbi = ws.pb.data() + i * kbp;
    const int64_t vis = std::min<int64_t>(ws.vis[i], nk);
    if (vis <= 0) {  // a row before every key of the block: nothing seen, its probabilities all zero
      std::fill(pbi, pbi + (nk + 31) / 32 * 32, uint16_t{0});
      continue;
    }
    used = std::max(used, vis);
    const int64_t whole = vis / 32 * 32;  // keys that whole 32-key steps see in every lane (no masks)
    __m512 mv = neg_inf;
    int64_t t = 0;
    for (; t < whole; t += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(si + t));
    for (; t < vis; t += 16) mv = _mm512_max_ps(mv, _mm512_mask_loadu_ps(neg_inf, lanes(vis - t), si + t));
    const float m_old = ws.m[i];
    const float m_new = std::max(m_old, _mm512_reduce_max_ps(mv));
    const float alpha = m_old == kNegInf ? 0.f : exp2s(m_old - m_new);
    const v16 mn = splat(m_new);
    v16 sv = v16{};
    for (t = 0; t < whole; t += 32) {
      const v16 a = exp2v<4>(load(si + t) - mn), b = exp2v<4>(load(si + t + 16) - mn);
      sv += a + b;
      _mm512_storeu_si512(pbi + t, (__m512i)_mm512_cvtne2ps_pbh((__m512)b, (__m512)a));
    }
    for (; t < nk; t += 32) {
      const __mmask16 ka = lanes(vis - t), kb = lanes(vis - t - 16);
      const __m512 a = _mm512_maskz_mov_ps(ka, (__m512)exp2v<4>((v16)_mm512_maskz_loadu_ps(ka, si + t) - mn));
      const __m512 b = _mm512_maskz_mov_ps(kb, (__m512)exp2v<4>((v16)_mm512_maskz_loadu_ps(kb, si + t + 16) - mn));
      sv += (v16)a + (v16)b;
      _mm512_storeu_si512(pbi + t, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
    ws.l[i] = ws.l[i] * alpha + hsum(sv);
    ws.m[i] = m_new;
    if (alpha != 1.f) {
      float* ai = ws.acc.data() + i * d;
      for (int64_t x = 0; x < d; ++x) ai[x] *= alpha;
    }
  }
  return used;
}
#endif

// The running softmax of `rows` rows over a new block of scores (in ws.s): row i sees its first vis[i] keys.
// The block's probabilities replace its scores (zero where not seen), the accumulators are rescaled; with
// `bf16_pairs` the probabilities go to ws.pb as bf16 pairs instead (update_softmax_bf16). Returns the largest vis
// (keys the value product must read).
inline int64_t update_softmax(const Layout& L, int64_t rows, int64_t nk, Scratch& ws, bool bf16_pairs) {
#ifdef CHUNKATTN_BF16_DOT
  if (bf16_pairs) return update_softmax_bf16(L, rows, nk, ws);
#endif
  const int64_t d = L.d, kbp = kKeyBlock;
  float* s = ws.s.data();
  int64_t used = 0;
  for (int64_t i = 0; i < rows; ++i) {
    float* si = s + i * kbp;
    const int64_t vis = ws.vis[i];
    if (vis <= 0) {  // a row before every key of the block: nothing seen, its probabilities all zero
      std::fill(si, si + nk, 0.f);
      continue;
    }
    used = std::max(used, vis);
    float mb = kNegInf;
    int64_t t = 0;
    if (vis >= 16) {
      v16 mv = splat(kNegInf);
      for (; t + 16 <= vis; t += 16) {
        v16 x = load(si + t);
        mv = x > mv ? x : mv;
      }
      mb = hmax(mv);
    }
    for (; t < vis; ++t) mb = std::max(mb, si[t]);
    const float m_old = ws.m[i];
    const float m_new = std::max(m_old, mb);
    const float alpha = m_old == kNegInf ? 0.f : exp2s(m_old - m_new);
    float sum = 0.f;
    t = 0;
    v16 sv = v16{};
    const v16 mn = splat(m_new);
    for (; t + 16 <= vis; t += 16) {
      v16 e = exp2v(load(si + t) - mn);
      store(si + t, e);
      sv += e;
    }
    sum = hsum(sv);
    for (; t < vis; ++t) {
      si[t] = exp2s(si[t] - m_new);
      sum += si[t];
    }
    for (; t < nk; ++t) si[t] = 0.f;
    ws.l[i] = ws.l[i] * alpha + sum;
    ws.m[i] = m_new;
    if (alpha != 1.f) {
      float* ai = ws.acc.data() + i * d;
      for (int64_t x = 0; x < d; ++x) ai[x] *= alpha;
    }
  }
  (void)bf16_pairs;
  return used;
}


// The key-major float32 path (tasks of >= 16 query rows): scores are computed transposed, S^T[t, r] with the
// rows along the vector lanes, from queries transposed once per task (ws.qt [d, rows16]) and keys used as
// stored (broadcast element by element). So no block of keys is repacked, and the softmax runs down the key
// axis 16 rows at a time: maxima, sums and rescale factors are plain vector operations, with no per-row
// horizontal reductions.
// AVX-512 only: its 12 x 2 score accumulators fill 24 of the 32 vector registers (AVX2 and NEON have 16, and a
// 16-float vector takes two or four of them); elsewhere the packed path runs, as measured before.
inline bool use_key_major(const Layout& L, int64_t rows) {
#ifdef __AVX512F__
  return rows >= 16 && (L.d == 16 || L.d == 32 || L.d == 64 || L.d == 128 || L.d == 256);
#else
  (void)L;
  (void)rows;
  return false;
#endif
}

// ws.qt[x, r] = ws.q[r, x] for the task's rows, zero for the padding rows up to a multiple of 16, which also get
// an empty softmax state and see no key.
inline void transpose_queries(const Layout& L, int64_t rows, Scratch& ws) {
  const int64_t d = L.d, ld = round16(rows);
  if ((int64_t)ws.qt.size() < d * ld) ws.qt.resize(d * ld);
  for (int64_t r = 0; r < ld; ++r)
    for (int64_t x = 0; x < d; ++x) ws.qt[x * ld + r] = r < rows ? ws.q[r * d + x] : 0.f;
  for (int64_t r = rows; r < ld; ++r) {
    ws.m[r] = kNegInf;
    ws.l[r] = 0.f;
    ws.vis[r] = 0;
  }
}

// S^T[t0 + i, 16 RV rows] for kKeysT keys (kr: their K rows): per head-dim element, RV query vectors times
// kKeysT key broadcasts, kKeysT x RV accumulators in registers.
template <int RV>
inline void score_tile_t(const float* qt, int64_t ld, int64_t d, const float* const* kr, float* st) {
  v16 a[kKeysT][RV] = {};
  for (int64_t x = 0; x < d; ++x) {
    v16 qv[RV];
#pragma GCC unroll 4
    for (int j = 0; j < RV; ++j) {
      qv[j] = load(qt + x * ld + 16 * j);
      pin(qv[j]);
    }
#pragma GCC unroll 16
    for (int i = 0; i < kKeysT; ++i) {
      const v16 kb = splat(kr[i][x]);
#pragma GCC unroll 4
      for (int j = 0; j < RV; ++j) a[i][j] += kb * qv[j];
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < kKeysT; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < RV; ++j) store(st + i * ld + 16 * j, a[i][j]);
}

#ifdef CHUNKATTN_BF16_DOT
// Lanes 0-15 of a and b interleaved as bf16 pairs: word r = (bf16(a[r]), bf16(b[r])).
inline __m512i interleave_bf16(__m512 a, __m512 b) {
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(pairs, (__m512i)_mm512_cvtne2ps_pbh(b, a));  // cvt: lanes 0-15 a, 16-31 b
}
#endif

// How far into a block of nk keys the rows see (ws.vis): (the most any of the rows sees, the fewest).
inline std::pair<int64_t, int64_t> visible_keys(const Scratch& ws, int64_t row0, int64_t rows, int64_t nk) {
  int64_t used = 0, least = nk;
  for (int64_t r = row0; r < row0 + rows; ++r) {
    const int64_t seen = std::min<int64_t>(ws.vis[r], nk);
    used = std::max(used, seen);
    least = std::min(least, seen);
  }
  return {used, least};
}

// The running softmax of the rows over S^T (in ws.s, leading dimension ld): keys a row does not see (t >= vis)
// become -inf, the block's probabilities replace its scores, the accumulators are rescaled. Returns the number
// of keys the value product must read.
inline int64_t update_softmax_t(const Layout& L, int64_t rows, int64_t nk, Scratch& ws) {
  const int64_t d = L.d, ld = round16(rows);
  float* s = ws.s.data();
  const auto [used, least] = visible_keys(ws, 0, rows, nk);
  if (!used) return 0;
  const bool masked = least < nk || rows < ld;
  const v16 ninf = splat(kNegInf);
  for (int64_t r0 = 0; r0 < ld; r0 += 16) {
    i16v vis;
    std::memcpy(&vis, ws.vis.data() + r0, sizeof(vis));
    v16 mx = ninf;
    for (int64_t t = 0; t < nk; ++t) {
      v16 x = load(s + t * ld + r0);
      if (masked) {
        const i16v tv = i16v{} + (int32_t)t;
        x = tv < vis ? x : ninf;
        store(s + t * ld + r0, x);
      }
      mx = x > mx ? x : mx;
    }
    const v16 m_old = load(ws.m.data() + r0);
    const v16 m_new = mx > m_old ? mx : m_old;
    const v16 m_use = m_new == ninf ? v16{} : m_new;  // a row that has seen nothing yet: exp2(-inf) = 0, not NaN
    const v16 alpha = exp2v(m_old - m_use);
    v16 sum = v16{};
    for (int64_t t = 0; t < nk; ++t) {
      const v16 e = exp2v(load(s + t * ld + r0) - m_use);
      store(s + t * ld + r0, e);
      sum += e;
    }
    store(ws.l.data() + r0, load(ws.l.data() + r0) * alpha + sum);
    store(ws.m.data() + r0, m_new);
    store(ws.alpha.data() + r0, alpha);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float a = ws.alpha[r];
    if (a == 1.f) continue;
    float* ar = ws.acc.data() + r * d;
    const v16 av = splat(a);
    for (int64_t x = 0; x < d; x += 16) store(ar + x, load(ar + x) * av);
  }
  return used;
}

#ifdef CHUNKATTN_AMX
// bfloat16 tasks on CPUs with AMX: both products of a block as tile products (tdpbf16ps: 16 x 16 float32
// accumulators from 16 x 32 bf16 A tiles and 16 x 16 pair B tiles), computed transposed so that nothing per
// block is repacked but the values:
//   S^T[keys, rows] = K[keys, d] . Q^T: K is A as stored (16 keys of a chunk are 16 rows at the cache's row
//     stride; keys not 16 in a row are gathered), Q^T is B (pairs of dims per query row, packed once per task);
//   the running softmax then runs down the key axis, 16 rows per vector (update_softmax_t), and rounds the
//   probabilities to bf16 pairs of keys per query row: P^T as B;
//   O^T[d, rows] += V^T[d, keys] . P^T: V^T is A, transposed from the block's value rows (the one repacking),
//     and the accumulators stay transposed ([d, rows16]) until the task ends.
// Query rows are padded to whole tiles of 16 (zero queries, scores nobody reads) and keys to 32 (zero
// probabilities and zero values, so that 0 * garbage cannot make a NaN). Tiles 0-3 accumulate 2 x 2 blocks of
// 16 x 16, tiles 4-5 hold A operands, 6-7 B operands.
std::atomic<int64_t> g_amx_tasks{0};     // tasks run on AMX tiles so far (tests check that the path ran)
std::atomic<bool> g_amx_enabled{true};  // chunkattn_cpu.set_amx: off for A/B runs and tests of the other path

// Head sizes the AMX tiles take (whole 32-dim depth steps, at most 8 of them).
inline bool amx_head_dim(int64_t d) { return d % 32 == 0 && d <= 256; }

inline bool use_amx(const Layout& L, int64_t rows) {
  return rows >= kAmxMinRows && amx_head_dim(L.d) && g_amx_enabled.load(std::memory_order_relaxed) &&
         amx_permitted();
}

inline void load_tiles(Scratch& ws) {
  if (ws.tiles == 1) return;
  load_tile_config();
  ws.tiles = 1;
}

// The task's queries as B operands: qv[x / 2][r] = (Q[r, x], Q[r, x + 1]) as stored, zero for the padding rows;
// softmax state and transposed accumulators reset.
template <typename T>
void load_queries_amx(const Layout& L, const T* q, const int64_t* tokens, int64_t num_tokens, int64_t h,
                      Scratch& ws) {
  const int64_t d = L.d, g = L.group, rows = num_tokens * g, ld = round16(rows);
  if ((int64_t)ws.qv.size() < d / 2 * ld) ws.qv.resize(d / 2 * ld);
  if ((int64_t)ws.acc_t.size() < d * ld) ws.acc_t.resize(d * ld);
  uint32_t* qv = ws.qv.data();
  // 16 rows x 16 words at a time, transposed in registers (padding rows are zero)
  const uint32_t* src[16];
  for (int64_t r0 = 0; r0 < ld; r0 += 16) {
    for (int i = 0; i < 16; ++i) {
      const int64_t r = r0 + i;
      src[i] = r < rows ? reinterpret_cast<const uint32_t*>(q + tokens[r / g] * L.q_row + (h * g + r % g) * L.q_head)
                        : nullptr;
    }
    for (int64_t w0 = 0; w0 < d / 2; w0 += 16) {
      v16 tile[16];
      for (int i = 0; i < 16; ++i) tile[i] = src[i] ? load(reinterpret_cast<const float*>(src[i] + w0)) : v16{};
      transpose16(tile);  // bit moves only
      for (int i = 0; i < 16; ++i) store(reinterpret_cast<float*>(qv + (w0 + i) * ld + r0), tile[i]);
    }
  }
  std::fill(ws.acc_t.begin(), ws.acc_t.begin() + d * ld, 0.f);
  std::fill(ws.m.begin(), ws.m.begin() + ld, kNegInf);
  std::fill(ws.l.begin(), ws.l.begin() + ld, 0.f);
  std::fill(ws.vis.begin() + rows, ws.vis.begin() + ld, 0);
}

// S^T[t, r] (unscaled, leading dimension lds) for the block's keys and the group's rows (qv: their queries as
// pairs, leading dimension ldq; rows a multiple of 16), 32 keys x 32 rows at a time.
inline void scores_amx(const c10::BFloat16* const* kt, const int64_t* kstride, int64_t ngroups, int64_t d,
                       const uint32_t* qv, int64_t ldq, int64_t rows, float* s, int64_t lds) {
  for (int64_t g0 = 0; g0 < ngroups; g0 += 2) {
    const bool two_k = g0 + 1 < ngroups;
    for (int64_t r0 = 0; r0 < rows; r0 += 32) {
      const bool two_r = r0 + 16 < rows;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t x0 = 0; x0 < d; x0 += 32) {
        _tile_loadd(6, qv + x0 / 2 * ldq + r0, ldq * 4);
        _tile_loadd(4, kt[g0] + x0, kstride[g0]);
        _tile_dpbf16ps(0, 4, 6);
        if (two_r) {
          _tile_loadd(7, qv + x0 / 2 * ldq + r0 + 16, ldq * 4);
          _tile_dpbf16ps(1, 4, 7);
        }
        if (two_k) {
          _tile_loadd(5, kt[g0 + 1] + x0, kstride[g0 + 1]);
          _tile_dpbf16ps(2, 5, 6);
          if (two_r) _tile_dpbf16ps(3, 5, 7);
        }
      }
      float* c = s + g0 * 16 * lds + r0;
      _tile_stored(0, c, lds * 4);
      if (two_r) _tile_stored(1, c + 16, lds * 4);
      if (two_k) {
        _tile_stored(2, c + 16 * lds, lds * 4);
        if (two_r) _tile_stored(3, c + 16 * lds + 16, lds * 4);
      }
    }
  }
}

// acc_t[d, lda] += V^T[d, k32] . P^T[k32, ldp] for the group's rows (a multiple of 16) from vt (rows of kKeyBlock
// bf16) and pv (pairs of keys per row).
inline void pv_amx(const c10::BFloat16* vt, int64_t d, const uint32_t* pv, int64_t k32, int64_t ldp, int64_t rows,
                   float* acc_t, int64_t lda) {
  constexpr int64_t kbp = kKeyBlock;
  for (int64_t x0 = 0; x0 < d; x0 += 32) {
    for (int64_t r0 = 0; r0 < rows; r0 += 32) {
      const bool two_r = r0 + 16 < rows;
      float* c0 = acc_t + x0 * lda + r0;
      float* c1 = c0 + 16 * lda;
      _tile_loadd(0, c0, lda * 4);
      _tile_loadd(2, c1, lda * 4);
      if (two_r) {
        _tile_loadd(1, c0 + 16, lda * 4);
        _tile_loadd(3, c1 + 16, lda * 4);
      }
      for (int64_t t0 = 0; t0 < k32; t0 += 32) {
        _tile_loadd(6, pv + t0 / 2 * ldp + r0, ldp * 4);
        _tile_loadd(4, vt + x0 * kbp + t0, kbp * 2);
        _tile_loadd(5, vt + (x0 + 16) * kbp + t0, kbp * 2);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if (two_r) {
          _tile_loadd(7, pv + t0 / 2 * ldp + r0 + 16, ldp * 4);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, c0, lda * 4);
      _tile_stored(2, c1, lda * 4);
      if (two_r) {
        _tile_stored(1, c0 + 16, lda * 4);
        _tile_stored(3, c1 + 16, lda * 4);
      }
    }
  }
}

// vt[x, t] = V[t, x] for the block's keys t < k32 (zero from `used` on). Per 32 keys: each pair of keys' value
// rows is read once, whole, and interleaved into 32-bit words (t, t + 1) per dim, 16 dims a vector, into
// ws.vw[x / 16][pair]; then a 16 x 16 word transpose per 16 dims puts the 32 keys of one dim in a row.
inline void pack_values_t(const c10::BFloat16* v, const int64_t* krow, int64_t kv_row, int64_t used, int64_t k32,
                          int64_t d, c10::BFloat16* vt, v16* vw) {
  constexpr int64_t kbp = kKeyBlock;
  const int64_t groups = d / 16;
  auto dims16 = [](const c10::BFloat16* row, int64_t x0) {
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + x0)));
  };
  for (int64_t t0 = 0; t0 < k32; t0 += 32) {
    for (int p = 0; p < 16; ++p) {
      const int64_t t = t0 + 2 * p;
      const c10::BFloat16* r0 = t < used ? v + krow[t] * kv_row : nullptr;
      const c10::BFloat16* r1 = t + 1 < used ? v + krow[t + 1] * kv_row : nullptr;
      for (int64_t x = 0; x < groups; ++x) {
        const __m512i a = r0 ? dims16(r0, 16 * x) : _mm512_setzero_si512();
        const __m512i b = r1 ? dims16(r1, 16 * x) : _mm512_setzero_si512();
        vw[x * 16 + p] = (v16)_mm512_or_si512(a, _mm512_slli_epi32(b, 16));
      }
    }
    for (int64_t x = 0; x < groups; ++x) {
      v16* tile = vw + x * 16;
      transpose16(tile);  // bit moves only
      for (int i = 0; i < 16; ++i) store(reinterpret_cast<float*>(vt + (16 * x + i) * kbp + t0), tile[i]);
    }
  }
}

// The running softmax of the AMX path for the task's rows row0 .. row0 + n (a group: S^T in ws.s with leading
// dimension lds, a multiple of 16 >= n; probabilities into pv with the same; accumulators at acc_t[x * lda +
// row0 + r]), unscaled scores: as update_softmax_t with
// `acc_t` and `pv` (lazy reference maximum, probabilities as bf16 key pairs per row, transposed accumulators),
// in one pass over the scores where it can: once a 16-row group has a reference maximum and sees the whole
// block, its block is exponentiated against it directly (no maximum, no range clamps: exp2_finite), and only a
// group whose probabilities then sum past 2^kLazyMax (rare after a row's first blocks) takes the general passes:
// the maximum found on the way, a second pass when it exceeds the reference by kLazyMax. Probabilities from a
// degree-3 or -4 exp2 (relative error < 7.5e-5 before their rounding to bf16's 8 bits). The one-pass case took 3%
// off a prefill's attention (31 x 64 tokens after 1024 shared, SmolLM2's heads, Xeon with AMX).
inline int64_t update_softmax_amx(const Layout& L, int64_t row0, int64_t n, int64_t lds, int64_t nk, Scratch& ws,
                                  float* acc_t, int64_t lda, uint32_t* pv) {
  const int64_t d = L.d, ld = lds, k32 = (nk + 31) / 32 * 32;
  float* s = ws.s.data();
  const auto [used, least] = visible_keys(ws, row0, n, nk);
  if (!used) return 0;
  const bool masked = least < nk || n < ld;
  const v16 ninf = splat(kNegInf), sc = splat(L.qk_scale);
  auto vmax = [](v16 a, v16 b) { return a > b ? a : b; };
  for (int64_t r0 = 0; r0 < ld; r0 += 16) {
    i16v vis;
    std::memcpy(&vis, ws.vis.data() + row0 + r0, sizeof(vis));
    auto seen = [&](int64_t t) {  // S^T[t, r0..r0 + 15], -inf where the row does not see key t
      const v16 x = load(s + t * ld + r0);
      if (!masked) return x;
      const i16v tv = i16v{} + (int32_t)t;
      return tv < vis ? x : ninf;
    };
    // exponentiate against m_use, packing pairs; returns the sum, and the raw maximum in *mx
    auto exp_pass = [&](v16 m_use, v16* mx) {
      v16 sum = v16{}, m0 = ninf, m1 = ninf;
      for (int64_t t = 0; t < nk; t += 2) {
        const v16 x0 = seen(t), x1 = t + 1 < nk ? seen(t + 1) : ninf;
        m0 = vmax(m0, x0);
        m1 = vmax(m1, x1);
        const v16 e0 = exp2v<4>(x0 * sc - m_use), e1 = exp2v<4>(x1 * sc - m_use);
        sum += e0 + e1;
        _mm512_storeu_si512(pv + t / 2 * ld + r0, interleave_bf16((__m512)e0, (__m512)e1));
      }
      *mx = vmax(m0, m1) * sc;
      return sum;
    };
    const v16 m_old = load(ws.m.data() + row0 + r0);
    bool fresh = false;  // some row of the group has no reference maximum yet
    for (int i = 0; i < 16; ++i) fresh |= m_old[i] == kNegInf;
    if (!masked && !fresh) {
      // The common case (every row sees every key and has a reference): one pass without the maximum, on
      // finite scores (no range clamp), where the block's sum tells whether the reference still holds: below
      // 2^kLazyMax no probability exceeds it, and nothing moves; else the general passes below redo the block.
      v16 sum = v16{};
      for (int64_t t = 0; t < nk; t += 2) {
        const v16 e0 = exp2_finite(load(s + t * ld + r0) * sc - m_old);
        const v16 e1 = t + 1 < nk ? exp2_finite(load(s + (t + 1) * ld + r0) * sc - m_old) : v16{};
        sum += e0 + e1;
        _mm512_storeu_si512(pv + t / 2 * ld + r0, interleave_bf16((__m512)e0, (__m512)e1));
      }
      bool over = false;
      for (int i = 0; i < 16; ++i) over |= !(sum[i] <= kLazyLimit);  // NaN or inf too: the general passes
      if (!over) {
        for (int64_t t = (nk + 1) / 2 * 2; t < k32; t += 2)
          _mm512_storeu_si512(pv + t / 2 * ld + r0, _mm512_setzero_si512());
        store(ws.l.data() + row0 + r0, load(ws.l.data() + row0 + r0) + sum);
        continue;
      }
    }
    v16 mx, sum = v16{};
    if (!fresh) {
      sum = exp_pass(m_old, &mx);  // optimistic: against the reference the group has
    } else {
      v16 m0 = ninf, m1 = ninf;
      for (int64_t t = 0; t + 1 < nk; t += 2) {
        m0 = vmax(m0, seen(t));
        m1 = vmax(m1, seen(t + 1));
      }
      if (nk % 2) m0 = vmax(m0, seen(nk - 1));
      mx = vmax(m0, m1) * sc;
    }
    const v16 m_new = mx > m_old + kLazyMax ? mx : m_old;
    bool moved = fresh;
    for (int i = 0; i < 16; ++i) moved |= m_new[i] != m_old[i];
    const v16 m_use = m_new == ninf ? v16{} : m_new;  // a row that has seen nothing yet: exp2(-inf) = 0, not NaN
    if (moved) sum = exp_pass(m_use, &mx);  // (again) against the new reference
    for (int64_t t = (nk + 1) / 2 * 2; t < k32; t += 2)
      _mm512_storeu_si512(pv + t / 2 * ld + r0, _mm512_setzero_si512());
    const v16 alpha = exp2v(m_old - m_use);
    store(ws.l.data() + row0 + r0, load(ws.l.data() + row0 + r0) * alpha + sum);
    store(ws.m.data() + row0 + r0, m_new);
    bool rescale = false;
    for (int i = 0; i < 16; ++i) rescale |= alpha[i] != 1.f;
    if (rescale)  // row r's accumulators are column r of acc_t: one vector of 16 rows per dim
      for (int64_t x = 0; x < d; ++x) store(acc_t + x * lda + row0 + r0, load(acc_t + x * lda + row0 + r0) * alpha);
  }
  return used;
}

// One block of keys on AMX tiles (use_amx; the task's queries from load_queries_amx): the values transposed once,
// then the rows in groups of kAmxGroup, each group's scores, softmax and value products in turn, so that its
// scores, probabilities and the block's values stay in L1 whatever the task's rows (it is what lets bf16 tasks
// take ROWS_PER_TASK_AMX rows: with every row at once, 384 rows x 128 keys of scores would be 192 KB). One tile
// of rows a group measured fastest: 0.93x the time of 32 rows (prefill after 1024 or 4096 shared keys, d = 64),
// 0.96x for decode steps at d = 64, the same at d = 128.
inline void attend_block_amx(const Layout& L, int64_t rows, const c10::BFloat16* k, const c10::BFloat16* v,
                             int64_t nk, Scratch& ws, int64_t lo, int64_t hi) {
  constexpr int64_t kbp = kKeyBlock;
  const int64_t d = L.d, ld = round16(rows), ngroups = (nk + 15) / 16;
  const int64_t used = visible_keys(ws, 0, rows, nk).first;
  if (!used) return;
  load_tiles(ws);
  // A operands of the scores: 16 keys in a row of storage are read in place, others gathered (zero past nk)
  const c10::BFloat16* kt[kbp / 16];
  int64_t kstride[kbp / 16];
  if ((int64_t)ws.kst.size() < kbp * d) ws.kst.resize(kbp * d);
  for (int64_t g = 0; g < ngroups; ++g) {
    const int64_t t0 = 16 * g, n = std::min<int64_t>(16, nk - t0);
    if (n == 16 && ws.krow[t0 + 15] - ws.krow[t0] == 15) {
      kt[g] = k + ws.krow[t0] * L.kv_row;
      kstride[g] = L.kv_row * 2;
      continue;
    }
    c10::BFloat16* dst = ws.kst.data() + t0 * d;
    for (int64_t i = 0; i < 16; ++i) {
      if (i < n)
        std::memcpy(dst + i * d, k + ws.krow[t0 + i] * L.kv_row, d * sizeof(c10::BFloat16));
      else
        std::memset(dst + i * d, 0, d * sizeof(c10::BFloat16));
    }
    kt[g] = dst;
    kstride[g] = d * 2;
  }
  if ((int64_t)ws.vt.size() < d * kbp) ws.vt.resize(d * kbp);
  if ((int64_t)ws.vw.size() < d) ws.vw.resize(d);
  pack_values_t(v, ws.krow, L.kv_row, used, (used + 31) / 32 * 32, d, ws.vt.data(), ws.vw.data());
  if ((int64_t)ws.pv.size() < kbp / 2 * kAmxGroup) ws.pv.resize(kbp / 2 * kAmxGroup);
  for (int64_t r0 = lo / kAmxGroup * kAmxGroup; r0 < std::min(ld, round16(hi)); r0 += kAmxGroup) {
    const int64_t lds = std::min(kAmxGroup, ld - r0), n = std::min(lds, rows - r0);
    scores_amx(kt, kstride, ngroups, d, ws.qv.data() + r0, ld, lds, ws.s.data(), lds);
    const int64_t seen = update_softmax_amx(L, r0, n, lds, nk, ws, ws.acc_t.data(), ld, ws.pv.data());
    if (seen) pv_amx(ws.vt.data(), d, ws.pv.data(), (seen + 31) / 32 * 32, lds, lds, ws.acc_t.data() + r0, ld);
  }
}

// The task's transposed accumulators back into ws.acc [rows, d] for finish_rows.
inline void unload_acc_amx(const Layout& L, int64_t rows, Scratch& ws) {
  const int64_t d = L.d, ld = round16(rows);  // ws.acc holds whole 16-row tiles (Scratch::reserve)
  for (int64_t r0 = 0; r0 < ld; r0 += 16)
    for (int64_t x0 = 0; x0 < d; x0 += 16) {
      v16 tile[16];
      for (int i = 0; i < 16; ++i) tile[i] = load(ws.acc_t.data() + (x0 + i) * ld + r0);
      transpose16(tile);
      for (int i = 0; i < 16; ++i) store(ws.acc.data() + (r0 + i) * d + x0, tile[i]);
    }
}
#endif

// attend_block for float32 on the key-major path (use_key_major).
inline void attend_block_t(const Layout& L, int64_t rows, const float* k, const float* v, int64_t nk, Scratch& ws) {
  const int64_t d = L.d, ld = round16(rows);
  const float* kr[kKeysT];
  for (int64_t t0 = 0; t0 < nk; t0 += kKeysT) {
    for (int i = 0; i < kKeysT; ++i)  // keys past the block repeat its last one: their scores are never read
      kr[i] = k + ws.krow[std::min<int64_t>(t0 + i, nk - 1)] * L.kv_row;
    float* st = ws.s.data() + t0 * ld;
    int64_t r0 = 0;
    for (; r0 + 32 <= ld; r0 += 32) score_tile_t<2>(ws.qt.data() + r0, ld, d, kr, st + r0);
    if (r0 < ld) score_tile_t<1>(ws.qt.data() + r0, ld, d, kr, st + r0);
  }
  const int64_t used = update_softmax_t(L, rows, nk, ws);
  if (used) accumulate<true>(L, rows, v, used, ws, ld);
}

// One block of keys into the running softmax state of `rows` rows. vis[i]: keys of the block row i sees. Only
// rows lo .. hi - 1 may see any (the others have vis 0): the AMX path skips the other tiles of rows.
template <typename T>
void attend_block(const Layout& L, int64_t rows, const T* k, const T* v, int64_t nk, Scratch& ws, int64_t lo = 0,
                  int64_t hi = -1) {
  const int64_t d = L.d;
  if constexpr (std::is_same_v<T, float>) {
    if (use_key_major(L, rows)) return attend_block_t(L, rows, k, v, nk, ws);
  }
  (void)lo;
  (void)hi;
  bool bf16_dot = false;
#ifdef CHUNKATTN_AMX
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (ws.amx_task) return attend_block_amx(L, rows, k, v, nk, ws, lo, hi < 0 ? rows : hi);
  }
#endif
#ifdef CHUNKATTN_BF16_DOT
  if constexpr (std::is_same_v<T, c10::BFloat16>) bf16_dot = use_bf16_dot(L, rows);
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (bf16_dot) scores_bf16(L, rows, k, nk, ws);
  }
#endif
  if (!bf16_dot) scores(L, ws.q.data(), rows, k, nk, ws);
  // the value product by bf16 pairs where the head size has its fixed path; else the float one, which reads the
  // float probabilities (update_softmax writes only one of the two)
  const bool pv_bf16 = bf16_dot && bf16_pv_head_dim(d);
  const int64_t used = update_softmax(L, rows, nk, ws, pv_bf16);
  if (!used) return;
#ifdef CHUNKATTN_BF16_DOT
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (pv_bf16) {
      switch (d) {
        case 64: return accumulate_bf16_fixed<4>(L, rows, v, used, ws);
        case 128: return accumulate_bf16_fixed<8>(L, rows, v, used, ws);
        case 32: return accumulate_bf16_fixed<2>(L, rows, v, used, ws);
        case 256: return accumulate_bf16_fixed<16>(L, rows, v, used, ws);
        default: TORCH_CHECK(false, "tpp_cpu: no bf16 value product for head size ", d);  // see bf16_pv_head_dim
      }
    }
  }
#endif
  accumulate(L, rows, v, used, ws);
}

// Ask for a key's K and V bytes (one head's: d, or a wide task's every head) as the key joins its block, so that
// the whole block's rows are in flight before its tile loads and dot products wait on them one by one. In an
// engine step the linears between two layers' attention evict the K/V, and the kernel then stalled on memory:
// 32 sequences after a 1K-token prompt, 30 layers in turn, bf16 on a 2-core Xeon with AMX: 391 -> 317 us a
// layer (how far ahead made no difference: 0 to 512 keys).
std::atomic<bool> g_prefetch{true};  // chunkattn_cpu.set_prefetch: off for A/B runs
std::atomic<int64_t> g_wide_block{0};  // chunkattn_cpu.set_wide_block: keys per wide block, 0: wide_block_keys's

// Keys per block of a wide task at d = 64 and 128. bf16 by AVX512-BF16 dot products at d = 64: 64 (each row's
// softmax update, its accumulators' loads and stores and the value pairs' setup then serve 64 keys instead of
// 16: one sequence decoding after 600 / 2048 keys, 30 layers, on the 2-core Zen 4 VM, SmolLM2's 9 / 3 heads
// 27.1 -> 20.3 / 97.7 -> 84.2 us a layer, Llama-3.2-1B's 32 / 8 110.8 -> 82.5 / 291 -> 263, 8 / 8 heads 67.4 ->
// 55.9 / 230 -> 199). Else kWideBlock: at d = 128 (12 / 4 heads) and in float32 longer blocks were slower (1B's
// float32 at 2048 keys 359 -> 542 us with 64).
template <typename T>
int64_t wide_block_keys(int64_t d) {
  const int64_t forced = g_wide_block.load(std::memory_order_relaxed);
  if (forced > 0) return std::min<int64_t>(forced, kKeyBlock);
#ifdef CHUNKATTN_BF16_DOT
  if (std::is_same_v<T, c10::BFloat16> && d == 64) return 64;
#endif
  (void)d;
  return kWideBlock;
}

template <typename T>
inline void prefetch_row(const T* k, const T* v, int64_t row, int64_t row_stride, int64_t n) {
  if (!g_prefetch.load(std::memory_order_relaxed)) return;
  const int64_t bytes = n * (int64_t)sizeof(T);
  const uintptr_t kr = reinterpret_cast<uintptr_t>(k + row * row_stride);
  const uintptr_t vr = reinterpret_cast<uintptr_t>(v + row * row_stride);
  // every 64-byte line the n elements touch, from the line the row starts in
  for (uintptr_t b = kr & ~uintptr_t{63}; b < kr + bytes; b += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(b), 0, 3);
  for (uintptr_t b = vr & ~uintptr_t{63}; b < vr + bytes; b += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(b), 0, 3);
}

// The K and V lines of a list of rows, asked for a few at a time (step) from inside the loops of the block before
// them, into L2 (prefetcht1), so that memory streams while that block computes. Asking for a block's lines all at
// once as its keys join (prefetch_row) stalls the core until most have arrived (it holds a few dozen misses in
// flight; a wide block of the Llama-3.2-1B heads is 512 lines in bf16), so fetching and arithmetic took turns:
// on the 2-core AMD EPYC (Zen 4) VM, 32 sequences of 1024 own keys took the sum of their in-cache time and their
// memory time. Spread and into L2, wide tasks of GQA groups >= 2 out of cache took 0.56-0.64x the time (32 / 8
// and 32 / 16 heads of 64, SmolLM2's 9 / 3 at 64 sequences; bf16 and fp32; results/ab-revs-2026-12-06-zen4-
// linefeed.json); into L1 (prefetcht0) they gained little. Where one head per group leaves the task streaming at
// the memory's rate (32 / 32 heads at d = 128) the feed cost ~10%: those tasks ask as each key joins its block.
struct LineFeed {
  const char *k = nullptr, *v = nullptr;
  const int64_t* rows = nullptr;
  int64_t n = 0, stride = 0, bytes = 0;  // rows, the bytes between rows, the bytes read of each
  int64_t r = 0, line = 0, lines = 0, per_step = 0;
  template <typename T>
  void start(const T* k_, const T* v_, const int64_t* rows_, int64_t n_, int64_t kv_row, int64_t used, int64_t steps) {
    k = reinterpret_cast<const char*>(k_);
    v = reinterpret_cast<const char*>(v_);
    rows = rows_;
    n = g_prefetch.load(std::memory_order_relaxed) ? n_ : 0;
    stride = kv_row * (int64_t)sizeof(T);
    bytes = used * (int64_t)sizeof(T);
    r = line = 0;
    const bool aligned = ((reinterpret_cast<uintptr_t>(k_) | reinterpret_cast<uintptr_t>(v_) | stride) & 63) == 0;
    lines = (bytes + 63) / 64 + (aligned ? 0 : 1);  // a row not starting on a line touches one more
    per_step = (n * lines + steps - 1) / std::max<int64_t>(1, steps);
  }
  void step() {
    for (int64_t i = 0; i < per_step && r < n; ++i) {
      const uintptr_t kr = reinterpret_cast<uintptr_t>(k + rows[r] * stride);
      const uintptr_t vr = reinterpret_cast<uintptr_t>(v + rows[r] * stride);
      __builtin_prefetch(reinterpret_cast<const void*>((kr & ~uintptr_t{63}) + 64 * line), 0, 2);
      __builtin_prefetch(reinterpret_cast<const void*>((vr & ~uintptr_t{63}) + 64 * line), 0, 2);
      if (++line == lines) {
        line = 0;
        ++r;
      }
    }
  }
};

// One block of keys for every head of one token (a "wide" task): ws rows are the query heads. A key's K (and
// V) for all heads is one contiguous row of storage, read once, in order.
template <typename T>
void attend_block_wide(const Layout& L, const T* k, const T* v, int64_t nk, Scratch& ws) {
  const int64_t d = L.d, g = L.group, hq = L.hq, kbp = kKeyBlock;
  float* s = ws.s.data();
  const float* q = ws.q.data();
  for (int64_t t = 0; t < nk; ++t) {
    const T* kr = k + ws.krow[t] * L.kv_row;
    for (int64_t i = 0; i < hq; ++i) {
      const T* kh = kr + (i / g) * d;
      const float* qi = q + i * d;
      if (d % 16 == 0) {
        v16 acc = v16{};
        for (int64_t x = 0; x < d; x += 16) acc += load(qi + x) * load(kh + x);
        s[i * kbp + t] = hsum(acc);
      } else {
        float acc = 0.f;
        for (int64_t x = 0; x < d; ++x) acc += qi[x] * to_float(kh[x]);
        s[i * kbp + t] = acc;
      }
    }
  }
  std::fill(ws.vis.begin(), ws.vis.begin() + hq, (int32_t)nk);
  const int64_t used = update_softmax(L, hq, nk, ws, false);
  float* acc = ws.acc.data();
  for (int64_t t = 0; t < used; ++t) {
    const T* vr = v + ws.krow[t] * L.kv_row;
    for (int64_t i = 0; i < hq; ++i) {
      const float p = s[i * kbp + t];
      const T* vh = vr + (i / g) * d;
      float* ai = acc + i * d;
      if (d % 16 == 0) {
        const v16 pv = splat(p);
        for (int64_t x = 0; x < d; x += 16) store(ai + x, load(ai + x) + pv * load(vh + x));
      } else {
        for (int64_t x = 0; x < d; ++x) ai[x] += p * to_float(vh[x]);
      }
    }
  }
}

#ifdef CHUNKATTN_BF16_DOT
// The value product of a wide block in bf16 dot products: for each K/V head, each pair of keys' value rows is
// interleaved into bf16 pairs once and multiplied by the G query heads of the group (their probabilities as bf16
// pairs in ws.pb, as the shared path), G x DV accumulators in registers (G = 4 only at d = 64: 16 of them).
template <int DV, int G>
inline void pv_wide_bf16(const Layout& L, const c10::BFloat16* v, int64_t nk, Scratch& ws, LineFeed& feed) {
  constexpr int64_t d = 16 * DV, kbp2 = kKeyBlock / 2;
  static_assert(DV % 2 == 0, "pairs of 16-dim blocks");
  const uint32_t* pb = reinterpret_cast<const uint32_t*>(ws.pb.data());
  for (int64_t h = 0; h < L.hkv; ++h) {
    const c10::BFloat16* vh = v + h * d;
    float* acc = ws.acc.data() + h * G * d;
    __m512 a[G][DV];
    for (int j = 0; j < G; ++j)
      for (int x = 0; x < DV; ++x) a[j][x] = _mm512_loadu_ps(acc + j * d + 16 * x);
    for (int64_t t2 = 0; t2 < (nk + 1) / 2; ++t2) {
      const c10::BFloat16* v0 = vh + ws.krow[2 * t2] * L.kv_row;
      const c10::BFloat16* v1 = 2 * t2 + 1 < nk ? vh + ws.krow[2 * t2 + 1] * L.kv_row : nullptr;
      __m512i pp[G];
      for (int j = 0; j < G; ++j) pp[j] = _mm512_set1_epi32((int)pb[(h * G + j) * kbp2 + t2]);
#pragma GCC unroll 8
      for (int x = 0; x < DV; x += 2) {
        __m512i plo, phi;
        value_pairs_bf16(v0, v1, x, plo, phi);
        for (int j = 0; j < G; ++j) {
          a[j][x] = _mm512_dpbf16_ps(a[j][x], as_bh(pp[j]), as_bh(plo));
          a[j][x + 1] = _mm512_dpbf16_ps(a[j][x + 1], as_bh(pp[j]), as_bh(phi));
        }
      }
    }
    for (int j = 0; j < G; ++j) {
      for (int x = 0; x < DV; ++x) _mm512_storeu_ps(acc + j * d + 16 * x, a[j][x]);
      feed.step();
    }
  }
}
#endif

// One head's scores over a wide block, si[t] = scale * sum of the lanes of dot(t): a full block of 16 keys reduced
// at once (hsum16), a partial one key by key. (scale = 1 is exact: float32 scores are pre-scaled.)
template <typename Dot>
inline void wide_scores(int64_t nk, float scale, float* si, Dot dot) {
  int64_t t0 = 0;
  for (; t0 + 16 <= nk; t0 += 16) {
    v16 a[16];
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t) a[t] = dot(t0 + t);
    store(si + t0, hsum16(a) * scale);
  }
  for (int64_t t = t0; t < nk; ++t) si[t] = hsum(dot(t)) * scale;
}

// attend_block_wide for d = 16 * DV, head by head: each head's query (scores) and accumulator (values) stay in
// registers across the block's keys, so a (key, head) costs DV multiply-adds and loads of K or V, with no
// accumulator traffic through memory. The block is short (wide_block_keys) so that its rows stay in L2 while
// every head passes over them.
template <int DV, typename T>
void attend_block_wide_fixed(const Layout& L, const T* k, const T* v, int64_t nk, Scratch& ws, LineFeed& feed) {
  constexpr int64_t d = 16 * DV, kbp = kKeyBlock;
  const int64_t g = L.group, hq = L.hq;
  float* s = ws.s.data();
  const float* q = ws.q.data();
#ifdef CHUNKATTN_BF16_DOT
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // bf16 dot products of the stored query and key (32 dims per instruction, no conversions), scaled after
    // (as the shared path's scores_bf16)
    const c10::BFloat16* qb = reinterpret_cast<const c10::BFloat16*>(ws.qb.data());
    for (int64_t h = 0, i = 0; h < L.hkv; ++h) {
      const T* kh = k + h * d;
      for (int64_t j = 0; j < g; ++j, ++i) {
        __m512i qv[DV / 2];
#pragma GCC unroll 8
        for (int x = 0; x < DV / 2; ++x) qv[x] = _mm512_loadu_si512(qb + i * d + 32 * x);
        wide_scores(nk, L.qk_scale, s + i * kbp, [&](int64_t t) {
          const T* kr = kh + ws.krow[t] * L.kv_row;
          __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), as_bh(qv[0]), as_bh(_mm512_loadu_si512(kr)));
#pragma GCC unroll 8
          for (int x = 1; x < DV / 2; ++x)
            a = _mm512_dpbf16_ps(a, as_bh(qv[x]), as_bh(_mm512_loadu_si512(kr + 32 * x)));
          return (v16)a;
        });
        feed.step();
      }
    }
  } else
#endif
  {
    for (int64_t h = 0, i = 0; h < L.hkv; ++h) {
      const T* kh = k + h * d;
      for (int64_t j = 0; j < g; ++j, ++i) {
        v16 qv[DV];
#pragma GCC unroll 16
        for (int x = 0; x < DV; ++x) qv[x] = load(q + i * d + 16 * x);
        wide_scores(nk, 1.f, s + i * kbp, [&](int64_t t) {
          const T* kr = kh + ws.krow[t] * L.kv_row;
          v16 a = qv[0] * load(kr);
#pragma GCC unroll 16
          for (int x = 1; x < DV; ++x) a += qv[x] * load(kr + 16 * x);
          return a;
        });
        feed.step();
      }
    }
  }
  std::fill(ws.vis.begin(), ws.vis.begin() + hq, (int32_t)nk);
#ifdef CHUNKATTN_BF16_DOT
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (g <= 3 || (g == 4 && DV == 4)) {
      const int64_t used = update_softmax(L, hq, nk, ws, true);  // also the probabilities as bf16 pairs
      if (!used) return;
      switch (g) {
        case 1: return pv_wide_bf16<DV, 1>(L, v, used, ws, feed);
        case 2: return pv_wide_bf16<DV, 2>(L, v, used, ws, feed);
        case 3: return pv_wide_bf16<DV, 3>(L, v, used, ws, feed);
        default: return pv_wide_bf16<4, 4>(L, v, used, ws, feed);
      }
    }
  }
#endif
  const int64_t used = update_softmax(L, hq, nk, ws, false);
  float* acc = ws.acc.data();
  for (int64_t h = 0, i = 0; h < L.hkv; ++h) {
    const T* vh = v + h * d;
    for (int64_t j = 0; j < g; ++j, ++i) {
      v16 a[DV];
#pragma GCC unroll 16
      for (int x = 0; x < DV; ++x) a[x] = load(acc + i * d + 16 * x);
      for (int64_t t = 0; t < used; ++t) {
        const T* vr = vh + ws.krow[t] * L.kv_row;
        const v16 p = splat(s[i * kbp + t]);
#pragma GCC unroll 16
        for (int x = 0; x < DV; ++x) a[x] += p * load(vr + 16 * x);
      }
#pragma GCC unroll 16
      for (int x = 0; x < DV; ++x) store(acc + i * d + 16 * x, a[x]);
      feed.step();
    }
  }
}

// Pack the query rows of `tokens` (GQA group of K/V head h) scaled into ws.q (and, for the key-major path,
// transposed into ws.qt); reset the softmax state.
template <typename T>
void load_queries(const Layout& L, const T* q, const int64_t* tokens, int64_t num_tokens, int64_t h, Scratch& ws) {
  const int64_t d = L.d, g = L.group;
  ws.amx_task = false;
#ifdef CHUNKATTN_AMX
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (use_amx(L, num_tokens * g)) {
      ws.amx_task = true;  // every block of this task goes to attend_block_amx
      g_amx_tasks.fetch_add(1, std::memory_order_relaxed);
      return load_queries_amx(L, q, tokens, num_tokens, h, ws);
    }
  }
#endif
  for (int64_t a = 0; a < num_tokens; ++a)
    for (int64_t j = 0; j < g; ++j) {
      const T* src = q + tokens[a] * L.q_row + (h * g + j) * L.q_head;
      float* dst = ws.q.data() + (a * g + j) * d;
      for (int64_t x = 0; x < d; ++x) dst[x] = to_float(src[x]) * L.qk_scale;
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (!ws.qb.empty()) std::memcpy(ws.qb.data() + (a * g + j) * d, src, d * sizeof(T));
      }
    }
  const int64_t rows = num_tokens * g;
  std::fill(ws.acc.begin(), ws.acc.begin() + rows * d, 0.f);
  std::fill(ws.m.begin(), ws.m.begin() + rows, kNegInf);
  std::fill(ws.l.begin(), ws.l.begin() + rows, 0.f);
  if constexpr (std::is_same_v<T, float>) {
    if (use_key_major(L, rows)) transpose_queries(L, rows, ws);  // attend_block will take the key-major path
  }
}

// dst[x] = src[x] * scale for x < d, rounded to T: 16 values a vector, then one by one (a scalar bf16 conversion per
// value, and a memcpy call per row, cost a prefill's partials and merge several percent of its attention).
template <typename T>
inline void write_scaled(T* dst, const float* src, float scale, int64_t d) {
  int64_t x = 0;
  for (; x + 16 <= d; x += 16) store(dst + x, load(src + x) * scale);
  for (; x < d; ++x) dst[x] = static_cast<T>(src[x] * scale);
}

// Write each row's result: normalised output + natural-log LSE, or the raw partial (o, m, l) of a slot.
template <typename T>
void finish_rows(const Layout& L, const int64_t* tokens, int64_t num_tokens, int64_t h, int64_t slot, T* out,
                 float* lse, float* o_part, float* ml_part, const Scratch& ws) {
  const int64_t d = L.d, g = L.group, hq = L.hq;
  for (int64_t a = 0; a < num_tokens; ++a)
    for (int64_t j = 0; j < g; ++j) {
      const int64_t i = a * g + j, head = h * g + j;
      const float* acc = ws.acc.data() + i * d;
      if (slot < 0) {
        const float inv = ws.l[i] > 0.f ? 1.f / ws.l[i] : 0.f;
        write_scaled(out + (tokens[a] * hq + head) * d, acc, inv, d);
        lse[tokens[a] * hq + head] = ws.l[i] > 0.f ? (ws.m[i] + std::log2(ws.l[i])) * kLn2 : kNegInf;
      } else {
        const int64_t s = slot + a;
        write_scaled(o_part + (s * hq + head) * d, acc, 1.f, d);
        ml_part[(s * hq + head) * 2] = ws.m[i];
        ml_part[(s * hq + head) * 2 + 1] = ws.l[i];
      }
    }
}

struct Plan {
  // the attention plan (AttentionPlan.tensors)
  const int64_t *q_pos, *private_indptr, *private_kv_begin, *private_len, *private_pos, *shared_kv_begin,
      *shared_len;
  // tasks (cpu_tpp.CpuWorkspace)
  const int64_t *pt_row_begin, *pt_row_end, *pt_chunk_begin, *pt_chunk_end, *pt_slot;
  const int64_t *st_chunk_begin, *st_chunk_end, *st_row_begin, *st_row_end, *st_slot, *st_rows;
  const int64_t *row_slot_indptr, *row_slots;
  const int64_t *wt_row, *wt_chunk_begin, *wt_chunk_end, *wt_slot;  // wide tasks: one decode token, all heads
  // private tasks st_fused_begin[t] .. st_fused_end[t] - 1 run inside shared task t, after its shared keys (the
  // private tasks from num_private on run only there)
  const int64_t *st_fused_begin, *st_fused_end;
  int64_t num_private, num_shared, num_wide, num_rows;
};

// Private task `task`'s keys (its sequence's own chunks, causal) into the running state of a task whose rows are
// `rows` (tokens x group); the private task's tokens are the task's rows a0 * g .. (a0 + n) * g - 1, and every
// other row sees none of these keys.
template <typename T>
void attend_private(const Layout& L, const Plan& P, int64_t task, int64_t a0, int64_t rows, const T* kh,
                    const T* vh, Scratch& ws) {
  const int64_t r0 = P.pt_row_begin[task], n = P.pt_row_end[task] - r0, g = L.group;
  int64_t hi_pos = -1;
  for (int64_t a = 0; a < n; ++a) hi_pos = std::max(hi_pos, P.q_pos[r0 + a]);
  if (rows > n * g) {
    std::fill(ws.vis.begin(), ws.vis.begin() + a0 * g, 0);
    std::fill(ws.vis.begin() + (a0 + n) * g, ws.vis.begin() + rows, 0);
  }
  int64_t nk = 0;
  auto flush = [&]() {
    for (int64_t a = 0; a < n; ++a) {  // keys are in position order: a row sees a prefix of the block
      const int64_t seen = std::upper_bound(ws.kpos, ws.kpos + nk, P.q_pos[r0 + a]) - ws.kpos;
      for (int64_t j = 0; j < g; ++j) ws.vis[(a0 + a) * g + j] = (int32_t)seen;
    }
    attend_block(L, rows, kh, vh, nk, ws, a0 * g, (a0 + n) * g);
    nk = 0;
  };
  for (int64_t c = P.pt_chunk_begin[task]; c < P.pt_chunk_end[task]; ++c) {
    const int64_t pos0 = P.private_pos[c], kv0 = P.private_kv_begin[c];
    const int64_t len = std::min(P.private_len[c], hi_pos - pos0 + 1);  // keys past every row are skipped
    for (int64_t t = 0; t < len; ++t) {
      prefetch_row(kh, vh, kv0 + t, L.kv_row, L.d);
      ws.krow[nk] = kv0 + t;
      ws.kpos[nk] = pos0 + t;
      if (++nk == kKeyBlock) flush();
    }
  }
  if (nk) flush();
}

template <typename T>
void run_private(const Layout& L, const Plan& P, int64_t task, int64_t h, const T* q, const T* k, const T* v,
                 T* out, float* lse, float* o_part, float* ml_part, Scratch& ws, std::vector<int64_t>& tokens) {
  const int64_t r0 = P.pt_row_begin[task], r1 = P.pt_row_end[task], n = r1 - r0, g = L.group;
  tokens.resize(n);
  for (int64_t a = 0; a < n; ++a) tokens[a] = r0 + a;
  ws.reserve(n * g, L.d);
#ifdef CHUNKATTN_BF16_DOT
  if constexpr (std::is_same_v<T, c10::BFloat16>) ws.reserve_bf16(n * g, L.d);
#endif
  load_queries(L, q, tokens.data(), n, h, ws);
  attend_private(L, P, task, 0, n * g, k + h * L.d, v + h * L.d, ws);
#ifdef CHUNKATTN_AMX
  if (ws.amx_task) unload_acc_amx(L, n * g, ws);
#endif
  finish_rows(L, tokens.data(), n, h, P.pt_slot[task], out, lse, o_part, ml_part, ws);
}

template <typename T>
void run_shared(const Layout& L, const Plan& P, int64_t task, int64_t h, const T* q, const T* k, const T* v,
                T* out, float* lse, float* o_part, float* ml_part, Scratch& ws) {
  const int64_t u0 = P.st_row_begin[task], n = P.st_row_end[task] - u0, g = L.group;
  const int64_t* tokens = P.st_rows + u0;
  ws.reserve(n * g, L.d);
#ifdef CHUNKATTN_BF16_DOT
  if constexpr (std::is_same_v<T, c10::BFloat16>) ws.reserve_bf16(n * g, L.d);
#endif
  load_queries(L, q, tokens, n, h, ws);
  const T* kh = k + h * L.d;
  const T* vh = v + h * L.d;
  int64_t nk = 0;
  auto flush = [&]() {
    std::fill(ws.vis.begin(), ws.vis.begin() + n * g, (int32_t)nk);  // shared keys precede every query
    attend_block(L, n * g, kh, vh, nk, ws);
    nk = 0;
  };
  for (int64_t j = P.st_chunk_begin[task]; j < P.st_chunk_end[task]; ++j) {
    const int64_t kv0 = P.shared_kv_begin[j], len = P.shared_len[j];
    for (int64_t t = 0; t < len; ++t) {
      prefetch_row(kh, vh, kv0 + t, L.kv_row, L.d);
      ws.krow[nk] = kv0 + t;
      if (++nk == kKeyBlock) flush();
    }
  }
  if (nk) flush();
  // fused private tasks: their sequences' own keys, for their rows of this task (the planner fuses only tasks
  // whose every row's sequence lies wholly inside it and shares nothing else), then the rows are complete
  for (int64_t f = P.st_fused_begin[task]; f < P.st_fused_end[task]; ++f) {
    const int64_t a0 = std::find(tokens, tokens + n, P.pt_row_begin[f]) - tokens;
    const int64_t len = P.pt_row_end[f] - P.pt_row_begin[f];
    bool inside = a0 + len <= n;
    for (int64_t a = 0; inside && a < len; ++a) inside = tokens[a0 + a] == P.pt_row_begin[f] + a;
    TORCH_CHECK(inside, "tpp_cpu: a fused private task's rows are not a run of its shared task's rows");
    attend_private(L, P, f, a0, n * g, kh, vh, ws);
  }
#ifdef CHUNKATTN_AMX
  if (ws.amx_task) unload_acc_amx(L, n * g, ws);
#endif
  finish_rows<T>(L, tokens, n, h, P.st_slot[task], out, lse, o_part, ml_part, ws);
}

#ifdef CHUNKATTN_AMX
// A decode token's wide task on AMX tiles (bfloat16; d a multiple of 32 up to 256; group <= 16): all heads of one
// token over its private keys, in runs of 16 keys read in place (16 rows of storage; the rest gathered), 4 runs a
// block:
//   scores: S^T[16 keys, 16 query rows] = K[16 keys, 32 dims of head h] . Q^T, the B operand holding the rows'
//     query dims as pairs, zero in the columns of rows of other heads, summed over the heads and depth steps of
//     the 16 rows: one tile of scores holds every query row of 16 / group heads (no padding rows for a GQA group
//     of 4, where a per-head task filled 4 rows of 16);
//   softmax down the keys, 16 rows per vector (lazy reference maximum, as update_softmax_amx), the
//     probabilities transposed to rows of keys;
//   values: O[g rows, 16 dims] += P[g rows, 16 keys] . V[16 keys, 32 dims] with V's rows as stored as the B
//     operand (bf16 pairs of adjacent dims) and the probabilities as (p, 0) pairs for the even dims and (0, p)
//     for the odd ones: twice the tile products of repacked values, but nothing per block is repacked, and a
//     tile product costs the same whatever its rows (measured: 4 rows as 16). The accumulators (even and odd
//     dims of each 32) live in memory between blocks and are interleaved back at the end.
// Tile configuration (load_tiles_wide): tiles 0-3 have g rows (value accumulators even / odd, probabilities
// even / odd), tiles 4-7 16 rows (scores of two runs, the K or V operand, the Q operand).
// Measured on a 2-core Xeon with AMX against the AVX512-BF16 wide task (bf16, 32 sequences x 1024 own keys, one
// layer in cache): Llama-3.2-1B's heads (32 / 8, d = 64) 0.55x the time, 32 / 32 heads at d = 128 0.85x, SmolLM2's
// 9 / 3 0.69x; one long sequence 0.6x. Per key and K/V head (1B heads) it spends ~40 cycles, where streaming
// its K and V rows from L3 takes ~24: the tile loads of 16 rows 1 KB apart wait on memory (software prefetches
// of the next block cost more than they saved with the rows in cache, and saved ~6% from DRAM: not taken).
std::atomic<int64_t> g_amx_wide_tasks{0};  // wide tasks run on AMX tiles so far (tests check that the path ran)

inline bool use_wide_amx(const Layout& L) {
  return amx_head_dim(L.d) && L.group <= kWideAmxMaxGroup &&
         g_amx_enabled.load(std::memory_order_relaxed) && amx_permitted();
}

inline void load_tiles_wide(Scratch& ws, int64_t g) {
  if (ws.tiles == 2 + g) return;
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = i < 4 ? (uint8_t)g : 16;
    cfg.colsb[i] = 64;
  }
  _tile_loadconfig(&cfg);
  ws.tiles = (int)(2 + g);
}

// 16 keys of a wide task: rows of K and V (row stride in bytes) of n valid keys (16 in place; gathered rows are
// zero past n).
struct WideKeys {
  const c10::BFloat16 *k, *v;
  int64_t stride, n;
};

// The private keys of wide task `task` as runs of 16: 16 consecutive rows of a chunk in place, the rest of each
// chunk gathered (with the next chunks' rest) into rows of ws.wg.
inline void wide_key_runs(const Layout& L, const Plan& P, int64_t task, const c10::BFloat16* k,
                          const c10::BFloat16* v, Scratch& ws, std::vector<WideKeys>& runs) {
  const int64_t row = L.hkv * L.d, pos = P.q_pos[P.wt_row[task]];
  runs.clear();
  // gathered rows: count first, so that ws.wg does not move under the pointers taken
  int64_t rest = 0;
  for (int64_t c = P.wt_chunk_begin[task]; c < P.wt_chunk_end[task]; ++c)
    rest += std::max<int64_t>(0, std::min(P.private_len[c], pos - P.private_pos[c] + 1)) % 16;
  const int64_t groups = (rest + 15) / 16;
  if ((int64_t)ws.wg.size() < groups * 32 * row) ws.wg.resize(groups * 32 * row);
  c10::BFloat16* gk = ws.wg.data();
  int64_t pending = 0;
  auto flush = [&]() {
    c10::BFloat16* gv = gk + 16 * row;
    std::memset(gk + pending * row, 0, (16 - pending) * row * sizeof(c10::BFloat16));
    std::memset(gv + pending * row, 0, (16 - pending) * row * sizeof(c10::BFloat16));
    runs.push_back({gk, gv, row * 2, pending});
    gk += 32 * row;
    pending = 0;
  };
  for (int64_t c = P.wt_chunk_begin[task]; c < P.wt_chunk_end[task]; ++c) {
    const int64_t kv0 = P.private_kv_begin[c];
    const int64_t len = std::max<int64_t>(0, std::min(P.private_len[c], pos - P.private_pos[c] + 1));
    int64_t t = 0;
    for (; t + 16 <= len; t += 16)
      runs.push_back({k + (kv0 + t) * L.kv_row, v + (kv0 + t) * L.kv_row, L.kv_row * 2, 16});
    for (; t < len; ++t) {
      std::memcpy(gk + pending * row, k + (kv0 + t) * L.kv_row, row * sizeof(c10::BFloat16));
      std::memcpy(gk + (16 + pending) * row, v + (kv0 + t) * L.kv_row, row * sizeof(c10::BFloat16));
      if (++pending == 16) flush();
    }
  }
  if (pending) flush();
}

// The first and last K/V head whose query rows fall in 16-row column tile j.
inline std::pair<int64_t, int64_t> tile_heads(const Layout& L, int64_t j) {
  return {16 * j / L.group, std::min(L.hkv - 1, (16 * j + 15) / L.group)};
}

void run_wide_amx(const Layout& L, const Plan& P, int64_t task, const c10::BFloat16* q, const c10::BFloat16* k,
                  const c10::BFloat16* v, c10::BFloat16* out, float* lse, float* o_part, float* ml_part,
                  Scratch& ws) {
  static thread_local std::vector<WideKeys> runs;
  const int64_t r = P.wt_row[task], hq = L.hq, hkv = L.hkv, d = L.d, g = L.group, ns = d / 32;
  const int64_t ncol = (hq + 15) / 16, rows16 = 16 * ncol, gl = g * 16;
  ws.reserve(hq, d);
  g_amx_wide_tasks.fetch_add(1, std::memory_order_relaxed);
  // B operands of the scores: for column tile j, each head h of its rows and depth step x, 16 x 16 words
  int64_t btiles = 0;
  for (int64_t j = 0; j < ncol; ++j) btiles += (tile_heads(L, j).second - tile_heads(L, j).first + 1) * ns;
  if ((int64_t)ws.wq.size() < btiles * 256) ws.wq.resize(btiles * 256);
  const int64_t pld = rows16 * 16;  // probabilities: [run][even, odd][row][16 keys]
  if ((int64_t)ws.wp.size() < 2 * kWideRuns * pld) ws.wp.resize(2 * kWideRuns * pld);
  static thread_local std::vector<int64_t> wq_at;  // column tile j's first B operand
  wq_at.resize(ncol);
  uint32_t* wq = ws.wq.data();
  for (int64_t j = 0; j < ncol; ++j) {
    wq_at[j] = wq - ws.wq.data();
    const auto [h0, h1] = tile_heads(L, j);
    for (int64_t x = 0; x < ns; ++x) {
      v16 tile[16];
      for (int c = 0; c < 16; ++c) {
        const int64_t i = 16 * j + c;
        tile[c] = i < hq ? load(reinterpret_cast<const float*>(q + r * L.q_row + i * L.q_head) + 16 * x) : v16{};
      }
      transpose16(tile);  // tile[w][c]: word 16 x + w of row 16 j + c (bit moves only)
      for (int64_t h = h0; h <= h1; ++h) {
        uint32_t mine = 0;
        for (int c = 0; c < 16; ++c) mine |= (16 * j + c < hq && (16 * j + c) / g == h) ? (1u << c) : 0u;
        uint32_t* dst = wq + ((h - h0) * ns + x) * 256;
        for (int w = 0; w < 16; ++w) {
          const __m512i words = _mm512_castps_si512((__m512)tile[w]);
          _mm512_storeu_si512(dst + w * 16, _mm512_maskz_mov_epi32((__mmask16)mine, words));
        }
      }
    }
    wq += (h1 - h0 + 1) * ns * 256;
  }
  float* acc = ws.acc.data();  // [h][x][even, odd][g rows][16]
  std::fill(acc, acc + hq * d, 0.f);
  std::fill(ws.m.begin(), ws.m.begin() + rows16, kNegInf);
  std::fill(ws.l.begin(), ws.l.begin() + rows16, 0.f);
  wide_key_runs(L, P, task, k, v, ws, runs);
  load_tiles_wide(ws, g);
  float* s = ws.s.data();  // scores [j][kWideRuns x 16 keys][16 rows]
  uint32_t* wp = ws.wp.data();
  const v16 sc = splat(L.qk_scale), ninf = splat(kNegInf);
  auto vmax = [](v16 a, v16 b) { return a > b ? a : b; };
  for (size_t b = 0; b < runs.size(); b += kWideRuns) {
    const int64_t nr = std::min<int64_t>(kWideRuns, runs.size() - b);
    const WideKeys* kr = runs.data() + b;
    // column tile by column tile: scores, then the softmax down the keys, the probabilities of each run
    // transposed in registers
    for (int64_t j = 0; j < ncol; ++j) {
      // scores of column tile j, two runs at a time: s[j][key][16 rows]
      for (int64_t r0 = 0; r0 < nr; r0 += 2) {
        const bool two = r0 + 1 < nr;
        const uint32_t* wqj = ws.wq.data() + wq_at[j];
        const auto [h0, h1] = tile_heads(L, j);
        _tile_zero(4);
        _tile_zero(7);
        for (int64_t h = h0; h <= h1; ++h)
          for (int64_t x = 0; x < ns; ++x, wqj += 256) {
            _tile_loadd(6, wqj, 64);
            _tile_loadd(5, kr[r0].k + h * d + 32 * x, kr[r0].stride);
            _tile_dpbf16ps(4, 5, 6);
            if (two) {
              _tile_loadd(5, kr[r0 + 1].k + h * d + 32 * x, kr[r0 + 1].stride);
              _tile_dpbf16ps(7, 5, 6);
            }
          }
        _tile_stored(4, s + (j * kWideRuns + r0) * 256, 64);
        if (two) _tile_stored(7, s + (j * kWideRuns + r0 + 1) * 256, 64);
      }
      const float* sj = s + j * kWideRuns * 256;
      const v16 m_old = load(ws.m.data() + 16 * j);
      bool fresh = false;
      for (int i = 0; i < 16; ++i) fresh |= m_old[i] == kNegInf;
      // exponentiate every run against m_use into the A operands; the sum of the probabilities
      auto exp_runs = [&](v16 m_use, bool finite) {
        v16 sum = v16{};
        for (int64_t rr = 0; rr < nr; ++rr) {
          v16 e[16];
#pragma GCC unroll 16
          for (int t = 0; t < 16; ++t) {
            const v16 x = load(sj + (rr * 16 + t) * 16) * sc - m_use;
            e[t] = t < kr[rr].n ? (finite ? exp2_finite(x) : exp2v<4>(x)) : v16{};
            sum += e[t];
          }
          transpose16(e);  // e[c][t]: row 16 j + c, key t of the run
          uint32_t* we = wp + 2 * rr * pld + 16 * j * 16;
          uint32_t* wo = we + pld;
#pragma GCC unroll 16
          for (int c = 0; c < 16; ++c) {  // words (p, 0) for the even dims, (0, p) for the odd
            _mm512_storeu_si512(we + c * 16, interleave_bf16((__m512)e[c], _mm512_setzero_ps()));
            _mm512_storeu_si512(wo + c * 16, interleave_bf16(_mm512_setzero_ps(), (__m512)e[c]));
          }
        }
        return sum;
      };
      if (!fresh) {  // one pass against the reference the rows have (as update_softmax_amx)
        const v16 sum = exp_runs(m_old, true);
        bool over = false;
        for (int i = 0; i < 16; ++i) over |= !(sum[i] <= kLazyLimit);  // NaN or inf too: the general pass
        if (!over) {
          store(ws.l.data() + 16 * j, load(ws.l.data() + 16 * j) + sum);
          continue;
        }
      }
      v16 mx = ninf;
      for (int64_t rr = 0; rr < nr; ++rr)
        for (int64_t t = 0; t < kr[rr].n; ++t) mx = vmax(mx, load(sj + (rr * 16 + t) * 16) * sc);
      const v16 m_new = mx > m_old + kLazyMax ? mx : m_old;
      const v16 m_use = m_new == ninf ? v16{} : m_new;
      const v16 sum = exp_runs(m_use, false);
      const v16 alpha = exp2v(m_old - m_use);
      store(ws.l.data() + 16 * j, load(ws.l.data() + 16 * j) * alpha + sum);
      store(ws.m.data() + 16 * j, m_new);
      for (int c = 0; c < 16; ++c) {
        const int64_t i = 16 * j + c;
        if (i >= hq || alpha[c] == 1.f) continue;
        float* a = acc + (i / g) * ns * 2 * gl + (i % g) * 16;
        for (int64_t y = 0; y < 2 * ns; ++y) store(a + y * gl, load(a + y * gl) * alpha[c]);
      }
    }
    // values: the accumulators of each head and depth step loaded once per block
    for (int64_t h = 0; h < hkv; ++h)
      for (int64_t x = 0; x < ns; ++x) {
        float* ce = acc + (h * ns + x) * 2 * gl;
        _tile_loadd(0, ce, 64);
        _tile_loadd(1, ce + gl, 64);
        for (int64_t rr = 0; rr < nr; ++rr) {
          _tile_loadd(2, wp + 2 * rr * pld + h * gl, 64);
          _tile_loadd(3, wp + (2 * rr + 1) * pld + h * gl, 64);
          _tile_loadd(5, kr[rr].v + h * d + 32 * x, kr[rr].stride);
          _tile_dpbf16ps(0, 2, 5);
          _tile_dpbf16ps(1, 3, 5);
        }
        _tile_stored(0, ce, 64);
        _tile_stored(1, ce + gl, 64);
      }
  }
  // even and odd dims back in order, then the output (or the partial) as run_wide writes it
  const i16v lo = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
  const i16v hi = lo + 8;
  const int64_t slot = P.wt_slot[task];
  float row[256];
  for (int64_t i = 0; i < hq; ++i) {
    const float* a = acc + (i / g) * ns * 2 * gl + (i % g) * 16;
    for (int64_t x = 0; x < ns; ++x) {
      const __m512 e = (__m512)load(a + 2 * x * gl), o = (__m512)load(a + (2 * x + 1) * gl);
      _mm512_storeu_ps(row + 32 * x, _mm512_permutex2var_ps(e, (__m512i)lo, o));
      _mm512_storeu_ps(row + 32 * x + 16, _mm512_permutex2var_ps(e, (__m512i)hi, o));
    }
    const float li = ws.l[i], mi = ws.m[i];
    if (slot < 0) {
      write_scaled(out + (r * hq + i) * d, row, li > 0.f ? 1.f / li : 0.f, d);
      lse[r * hq + i] = li > 0.f ? (mi + std::log2(li)) * kLn2 : kNegInf;
    } else {
      write_scaled(o_part + (slot * hq + i) * d, row, 1.f, d);
      ml_part[(slot * hq + i) * 2] = mi;
      ml_part[(slot * hq + i) * 2 + 1] = li;
    }
  }
}
#endif

template <typename T>
void run_wide(const Layout& L, const Plan& P, int64_t task, const T* q, const T* k, const T* v, T* out, float* lse,
              float* o_part, float* ml_part, Scratch& ws) {
#ifdef CHUNKATTN_AMX
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (use_wide_amx(L)) return run_wide_amx(L, P, task, q, k, v, out, lse, o_part, ml_part, ws);
  }
#endif
  const int64_t r = P.wt_row[task], hq = L.hq, d = L.d, pos = P.q_pos[r];
  ws.reserve(hq, d);
  for (int64_t i = 0; i < hq; ++i) {
    const T* src = q + r * L.q_row + i * L.q_head;
    float* dst = ws.q.data() + i * d;
    for (int64_t x = 0; x < d; ++x) dst[x] = to_float(src[x]) * L.qk_scale;
  }
#ifdef CHUNKATTN_BF16_DOT
  if constexpr (std::is_same_v<T, c10::BFloat16>) {  // the stored query, for the bf16 dot products of d = 64, 128
    if (d == 64 || d == 128) {
      ws.reserve_bf16(hq, d);
      for (int64_t i = 0; i < hq; ++i)
        std::memcpy(ws.qb.data() + i * d, q + r * L.q_row + i * L.q_head, d * sizeof(T));
    }
  }
#endif
  std::fill(ws.acc.begin(), ws.acc.begin() + hq * d, 0.f);
  std::fill(ws.m.begin(), ws.m.begin() + hq, kNegInf);
  std::fill(ws.l.begin(), ws.l.begin() + hq, 0.f);
  const bool fixed = d == 64 || d == 128;
  const int64_t block = fixed ? wide_block_keys<T>(d) : kKeyBlock, used = L.hkv * d;
  LineFeed feed;  // GQA groups >= 2 at d = 64, 128: each block's lines asked for during the block before it
  auto wide_block = [&](int64_t nk) {
    switch (d) {
      case 64: return attend_block_wide_fixed<4>(L, k, v, nk, ws, feed);
      case 128: return attend_block_wide_fixed<8>(L, k, v, nk, ws, feed);
      default: return attend_block_wide(L, k, v, nk, ws);
    }
  };
  auto for_each_key = [&](auto&& fn) {  // the storage row of each key the token sees, in order
    for (int64_t c = P.wt_chunk_begin[task]; c < P.wt_chunk_end[task]; ++c) {
      const int64_t kv0 = P.private_kv_begin[c], len = std::min(P.private_len[c], pos - P.private_pos[c] + 1);
      for (int64_t t = 0; t < len; ++t) fn(kv0 + t);
    }
  };
  if (fixed && L.group >= 2) {
    ws.rows.clear();
    for_each_key([&](int64_t row) { ws.rows.push_back(row); });
    const int64_t n = ws.rows.size();
    for (int64_t b = 0; b < n; b += block) {
      const int64_t nk = std::min(block, n - b), next = std::min(block, std::max<int64_t>(0, n - b - block));
      if (b == 0)  // the first block's lines at once
        for (int64_t t = 0; t < nk; ++t) prefetch_row(k, v, ws.rows[t], L.kv_row, used);
      std::copy(ws.rows.begin() + b, ws.rows.begin() + b + nk, ws.krow);
      feed.start(k, v, next ? ws.rows.data() + b + block : nullptr, next, L.kv_row, used, 2 * hq);
      wide_block(nk);
    }
  } else {  // each block's lines asked for as its keys join
    int64_t nk = 0;
    for_each_key([&](int64_t row) {
      prefetch_row(k, v, row, L.kv_row, used);
      ws.krow[nk] = row;
      if (++nk == block) {
        wide_block(nk);
        nk = 0;
      }
    });
    if (nk) wide_block(nk);
  }
  const int64_t slot = P.wt_slot[task];
  for (int64_t i = 0; i < hq; ++i) {
    const float* acc = ws.acc.data() + i * d;
    if (slot < 0) {
      const float inv = ws.l[i] > 0.f ? 1.f / ws.l[i] : 0.f;
      write_scaled(out + (r * hq + i) * d, acc, inv, d);
      lse[r * hq + i] = ws.l[i] > 0.f ? (ws.m[i] + std::log2(ws.l[i])) * kLn2 : kNegInf;
    } else {
      write_scaled(o_part + (slot * hq + i) * d, acc, 1.f, d);
      ml_part[(slot * hq + i) * 2] = ws.m[i];
      ml_part[(slot * hq + i) * 2 + 1] = ws.l[i];
    }
  }
}

template <typename T>
void merge_rows(const Layout& L, const Plan& P, T* out, float* lse, const float* o_part, const float* ml_part) {
  const int64_t hq = L.hq, d = L.d;
  at::parallel_for(0, P.num_rows, 8, [&](int64_t begin, int64_t end) {
    line_vector<float> acc(d);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t s0 = P.row_slot_indptr[r], s1 = P.row_slot_indptr[r + 1];
      if (s0 == s1) continue;  // written directly by its task
      for (int64_t head = 0; head < hq; ++head) {
        float m = kNegInf;
        for (int64_t s = s0; s < s1; ++s) m = std::max(m, ml_part[(P.row_slots[s] * hq + head) * 2]);
        std::fill(acc.begin(), acc.end(), 0.f);
        float l = 0.f;
        for (int64_t s = s0; s < s1; ++s) {
          const int64_t slot = P.row_slots[s];
          const float ms = ml_part[(slot * hq + head) * 2], ls = ml_part[(slot * hq + head) * 2 + 1];
          if (ms == kNegInf || ls == 0.f) continue;
          const float w = exp2s(ms - m);
          l += w * ls;
          const float* o = o_part + (slot * hq + head) * d;
          int64_t x = 0;
          for (; x + 16 <= d; x += 16) store(acc.data() + x, load(acc.data() + x) + w * load(o + x));
          for (; x < d; ++x) acc[x] += w * o[x];
        }
        const float inv = l > 0.f ? 1.f / l : 0.f;
        write_scaled(out + (r * hq + head) * d, acc.data(), inv, d);
        lse[r * hq + head] = l > 0.f ? (m + std::log2(l)) * kLn2 : kNegInf;
      }
    }
  });
}

template <typename T>
void tpp_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
              at::Tensor& o_part, at::Tensor& ml_part, const Plan& P, double scale, int64_t group) {
  Layout L;
  L.hq = q.size(1);
  L.hkv = k.size(1);
  L.group = group;
  L.d = q.size(2);
  L.q_row = q.stride(0);
  L.q_head = q.stride(1);
  L.kv_row = k.stride(0);
  L.qk_scale = static_cast<float>(scale) * kLog2e;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  float* opart = o_part.data_ptr<float>();
  float* mlpart = ml_part.data_ptr<float>();
  // Tasks: shared ones first (the largest), then private ones; threads take the next task as they free up.
  // Order: shared (largest), wide, per-head private tasks.
  const int64_t num_headed = (P.num_shared + P.num_private) * L.hkv, wide0 = P.num_shared * L.hkv;
  const int64_t num_tasks = num_headed + P.num_wide;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_tasks));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    // Scratch buffers live as long as the thread: reallocating (and zero-filling) them on every call cost
    // more than a whole small decode step's work.
    static thread_local Scratch ws;
    static thread_local std::vector<int64_t> tokens;
    ws.tiles = 0;
    for (int64_t t = next.fetch_add(1); t < num_tasks; t = next.fetch_add(1)) {
      if (t >= wide0 && t < wide0 + P.num_wide) {
        run_wide(L, P, t - wide0, qp, kp, vp, op, lp, opart, mlpart, ws);
        continue;
      }
      const int64_t u = t < wide0 ? t : t - P.num_wide;
      const int64_t item = u / L.hkv, h = u % L.hkv;
      if (item < P.num_shared)
        run_shared(L, P, item, h, qp, kp, vp, op, lp, opart, mlpart, ws);
      else
        run_private(L, P, item - P.num_shared, h, qp, kp, vp, op, lp, opart, mlpart, ws, tokens);
    }
#ifdef CHUNKATTN_AMX
    if (ws.tiles) _tile_release();
#endif
  });
  if (P.row_slots != nullptr) merge_rows(L, P, op, lp, opart, mlpart);
}

}  // namespace

void tpp_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor out, at::Tensor lse,
             at::Tensor o_part, at::Tensor ml_part, at::TensorList idx, double scale, int64_t group) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "tpp_cpu runs on CPU tensors");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be [rows, heads, head_dim]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type() &&
                  out.scalar_type() == q.scalar_type(), "q, k, v and out must have one dtype");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1 && k.stride(1) == k.size(2) &&
                  v.stride(1) == v.size(2) && v.stride(0) == k.stride(0), "k, v must be [rows, heads, d] row-major");
  TORCH_CHECK(out.is_contiguous() && lse.is_contiguous() && lse.scalar_type() == at::kFloat, "bad out / lse");
  TORCH_CHECK(o_part.scalar_type() == at::kFloat && ml_part.scalar_type() == at::kFloat, "partials are float32");
  TORCH_CHECK(idx.size() == 26, "tpp_cpu expects 26 index tensors");
  TORCH_CHECK(q.size(1) == k.size(1) * group, "num_q_heads must be num_kv_heads * group");
  for (const auto& t : idx) TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous(), "indices are int64");
  auto ptr = [&](int i) { return idx[i].numel() ? idx[i].data_ptr<int64_t>() : nullptr; };
  Plan P;
  P.q_pos = ptr(0);
  P.private_indptr = ptr(1);
  P.private_kv_begin = ptr(2);
  P.private_len = ptr(3);
  P.private_pos = ptr(4);
  P.shared_kv_begin = ptr(5);
  P.shared_len = ptr(6);
  P.pt_row_begin = ptr(7);
  P.pt_row_end = ptr(8);
  P.pt_chunk_begin = ptr(9);
  P.pt_chunk_end = ptr(10);
  P.pt_slot = ptr(11);
  P.st_chunk_begin = ptr(12);
  P.st_chunk_end = ptr(13);
  P.st_row_begin = ptr(14);
  P.st_row_end = ptr(15);
  P.st_slot = ptr(16);
  P.st_rows = ptr(17);
  P.row_slot_indptr = ptr(18);
  P.row_slots = ptr(19);
  P.wt_row = ptr(20);
  P.wt_chunk_begin = ptr(21);
  P.wt_chunk_end = ptr(22);
  P.wt_slot = ptr(23);
  P.st_fused_begin = ptr(24);
  P.st_fused_end = ptr(25);
  P.num_wide = idx[20].numel();
  P.num_shared = idx[12].numel();
  TORCH_CHECK(idx[24].numel() == P.num_shared && idx[25].numel() == P.num_shared,
              "tpp_cpu: one fused range per shared task");
  int64_t fused = 0;
  for (int64_t t = 0; t < P.num_shared; ++t) fused += P.st_fused_end[t] - P.st_fused_begin[t];
  P.num_private = idx[7].numel() - fused;  // the fused private tasks come last
  // the non-empty ranges, in order, cover the last private tasks exactly once, each in a task writing outputs
  for (int64_t t = 0, next = P.num_private; t < P.num_shared; ++t) {
    if (P.st_fused_begin[t] == P.st_fused_end[t]) continue;
    TORCH_CHECK(P.st_fused_begin[t] == next && P.st_fused_end[t] > next && P.st_fused_end[t] <= idx[7].numel() &&
                    P.st_slot[t] < 0,
                "tpp_cpu: fused private tasks must be the last ones, each run by one shared task without a slot");
    next = P.st_fused_end[t];
  }
  P.num_rows = q.size(0);
  if (q.scalar_type() == at::kFloat)
    tpp_impl<float>(q, k, v, out, lse, o_part, ml_part, P, scale, group);
  else if (q.scalar_type() == at::kBFloat16)
    tpp_impl<c10::BFloat16>(q, k, v, out, lse, o_part, ml_part, P, scale, group);
  else
    TORCH_CHECK(false, "tpp_cpu supports float32 and bfloat16, got ", q.scalar_type());
}

// Whether bfloat16 tasks of >= kAmxMinRows query rows run on AMX tiles here (built for a CPU with AMX, the OS
// granted the tile state, not switched off).
bool amx_active() {
#ifdef CHUNKATTN_AMX
  return g_amx_enabled.load() && amx_permitted();
#else
  return false;
#endif
}

// Switch the AMX path on or off (tests and A/B timings of the AVX512-BF16 path on an AMX CPU); returns
// amx_active() afterwards.
bool set_amx(bool enabled) {
#ifdef CHUNKATTN_AMX
  g_amx_enabled.store(enabled);
#endif
  (void)enabled;
  return amx_active();
}

// Which instruction path each kind of task takes on this build and CPU, for logs and `chunkattn info`.
std::string attention_paths() {
  std::string bf16 = "scalar float32";
#ifdef CHUNKATTN_BF16_DOT
  bf16 = "avx512-bf16 dot products";
#endif
  if (amx_active())
    bf16 = "amx tiles (>= " + std::to_string(kAmxMinRows) +
           " rows; decode tokens all heads at once), avx512-bf16 otherwise";
#ifdef __AVX512F__
  const std::string fp32 = "avx512 (key-major from 16 rows)";
#else
  const std::string fp32 = "portable vectors";
#endif
  return "float32: " + fp32 + "; bfloat16: " + bf16;
}

}  // namespace chunkattn::ops

using namespace chunkattn::ops;  // the ops below


TORCH_LIBRARY(chunkattn_cpu, m) {
  m.def("amx_active() -> bool", &amx_active);
  m.def("amx_for_head_dim(int head_dim) -> bool", [](int64_t d) -> bool {
#ifdef CHUNKATTN_AMX
    return amx_active() && amx_head_dim(d);
#else
    (void)d;
    return false;
#endif
  });
  m.def("set_prefetch(bool enabled) -> bool", [](bool enabled) -> bool { return g_prefetch.exchange(enabled); });
  m.def("set_wide_block(int keys) -> int", [](int64_t keys) -> int64_t {  // 0: wide_block_keys's choice
    TORCH_CHECK(keys >= 0 && keys <= kKeyBlock, "set_wide_block: keys must be in [0, ", kKeyBlock, "]");
    return g_wide_block.exchange(keys);
  });
  m.def("amx_tasks() -> int", []() -> int64_t {
#ifdef CHUNKATTN_AMX
    return g_amx_tasks.load();
#else
    return 0;
#endif
  });
  m.def("amx_wide_tasks() -> int", []() -> int64_t {
#ifdef CHUNKATTN_AMX
    return g_amx_wide_tasks.load();
#else
    return 0;
#endif
  });
  m.def("set_amx(bool enabled) -> bool", &set_amx);
  m.def("attention_paths() -> str", &attention_paths);
  m.def("tpp(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse, Tensor(c!) o_part, "
        "Tensor(d!) ml_part, Tensor[] idx, float scale, int group) -> ()",
        &tpp_cpu);
}
