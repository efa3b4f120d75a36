// The AMX panel product shared by the bf16 and the quantized linear layers (linear_amx.cpp, linear_quant.cpp): a
// panel is 32 output columns of W laid out as two B operands of tdpbf16ps per 32 of K (packed[s, j] is the 16 x 16
// tile of pairs (W[16j + c, 32s + 2r], W[16j + c, 32s + 2r + 1]) at row r, column c), multiplied by x's rows in
// pairs of 16-row A tiles into float32 sums, and an epilogue that stores them (+ bias) or silu(gate) * up.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "amx.h"
#include "simd.h"

namespace chunkattn::panels {

constexpr int64_t kCols = 32;   // output columns per panel: two 16-column tiles
constexpr int64_t kDepth = 32;  // K per tile step: 16 pairs
constexpr int64_t kTile = 16 * 32;  // bf16 elements per packed tile
constexpr int64_t kPrefetchBytes = 4096;  // how far ahead in the weight stream each step prefetches
constexpr int64_t kXBlockBytes = 1 << 20;  // rows of x per block: as many as fit this (they stay in L2)

enum class Epilogue { kStore, kSiluMul };

// Output columns per panel: 32 stored, or 16 of silu(gate) * up.
template <Epilogue E>
constexpr int64_t kOutCols = E == Epilogue::kStore ? kCols : kCols / 2;

// The A operands of x: its rows read in place in whole tiles of 16 rows x 32 of K; with K not a multiple of 32 (or x
// not row-major) from a zero-padded copy of x; the last 16-row tile, when M is not a multiple of 16, from a
// zero-padded copy of its rows (a tile load would read past x). `rows(r)` is the tile of rows r .. r + 15.
class ARows {
 public:
  explicit ARows(const at::Tensor& x) : M_(x.size(0)), k32_((x.size(1) + kDepth - 1) / kDepth * kDepth) {
    xa_ = x;
    if (k32_ != x.size(1) || x.stride(1) != 1) {
      xa_ = at::zeros({M_, k32_}, x.options());
      xa_.narrow(1, 0, x.size(1)).copy_(x);
    }
    xp_ = xa_.data_ptr<c10::BFloat16>();
    ldx_ = xa_.stride(0);
    full_ = M_ / 16 * 16;
    // a plain buffer, not a tensor: at one row (single-stream decoding) tensor ops cost more than the copy; on
    // cache lines, as every operand of a tile load must be (see LineAllocator). Only what the last call wrote is
    // zeroed again: filling all 16 rows each call took 37% of a one-row product's time (SmolLM2's o_proj, Q4_1).
    static thread_local Tail tail;
    if (full_ < M_) {
      const int64_t live = (M_ - full_) * k32_;  // elements of the rows copied
      if (static_cast<int64_t>(tail.rows.size()) < 16 * k32_) tail.rows.resize(16 * k32_, c10::BFloat16(0.f));
      for (int64_t r = full_; r < M_; ++r)
        std::memcpy(tail.rows.data() + (r - full_) * k32_, xp_ + r * ldx_, k32_ * 2);
      if (tail.written > live) std::memset(tail.rows.data() + live, 0, (tail.written - live) * 2);
      tail.written = live;
    }
    tp_ = tail.rows.data();
  }
  std::pair<const c10::BFloat16*, int64_t> rows(int64_t r) const {
    return r < full_ ? std::make_pair(xp_ + r * ldx_, ldx_) : std::make_pair(tp_, k32_);
  }
  // row r of x (any r < M), ld elements to the next row of the same buffer
  const c10::BFloat16* row(int64_t r) const { return r < full_ ? xp_ + r * ldx_ : tp_ + (r - full_) * k32_; }
  int64_t k32() const { return k32_; }

 private:
  struct Tail {  // the thread's padded copy of a partial tile of rows: zero from element `written` on
    line_vector<c10::BFloat16> rows;
    int64_t written = 0;
  };
  int64_t M_, k32_, ldx_ = 0, full_ = 0;
  at::Tensor xa_;
  const c10::BFloat16* xp_ = nullptr;
  const c10::BFloat16* tp_ = nullptr;
};

// The A operands of the two row tiles: rows of x (bf16, ldx elements apart), each tile from its own buffer (the
// last, partial tile of rows comes from a zero-padded copy).
struct RowTiles {
  const c10::BFloat16* x0;
  const c10::BFloat16* x1;
  int64_t ld0, ld1;
};

// Prefetch a step's `bytes`, `Ahead` bytes (kPrefetchBytes unless the caller says) ahead of `step` in a weight
// stream, when they lie before `limit` (the end of this thread's panels). Locality 3 is prefetcht0 (into L1), 2
// prefetcht1 (into L2). Measured on the AMX Xeon VM, 1B-shape products out of cache: prefetcht1 takes 0.76x the
// time for Q8_0 at one row (integer x), 0.84x for Q4 at one row (direct), 0.86x for Q8_0 at 32 rows (tiles); Q4
// tiles 1.03-1.08x and the bf16 panels on tiles within noise either way, so those keep prefetcht0
// (linear_quant.cpp picks per loop). The bf16 panels by vdpbf16ps (no AMX) take prefetcht1: on the Zen 4 VM the 1B
// shape's products at one row streamed ~24 GB/s with it, ~16 without (then 4 KB ahead; now kVectorPrefetchBytes).
template <int Locality = 3, int64_t Ahead = kPrefetchBytes>
inline void prefetch_ahead(const void* step, int64_t bytes, const void* limit) {
  const char* pf = static_cast<const char*>(step) + Ahead;
  if (pf + bytes <= static_cast<const char*>(limit))
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(pf + b, 0, Locality);
}

// f(std::integral_constant<int, NR>) for NR = rows (1..4; more rows are a pass of 4): the row count of a panel
// kernel as its template argument.
template <class F>
inline void with_rows(int64_t rows, F f) {
  switch (rows) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 4>{});
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
// vdpbf16ps on the panels: CPUs with AVX512-BF16, with or without AMX (the quantized kernels' vector paths, and
// the bf16 linears where there are no tiles).
#define CHUNKATTN_BF16_DOT 1

// How far ahead panel_vector prefetches its weight stream: 2 KB a step (two bf16 tiles), so 4 KB (kPrefetchBytes,
// which the quantized streams' 0.6-1 KB steps take) was two steps. SmolLM2's bf16 products, one pass over every
// layer's weights, on the Zen 4 VM, one build with the distance from the environment, alternated three times: at
// 1 row 11.2 / 17.2 / 11.2 ms with 4 KB, 10.7 / 11.6 / 10.8 with 8 KB, 10.5 / 12.0 / 11.0 with 16 KB; at 8 rows
// 12.0 / 16.7 / 12.9 against 10.8 / 11.7 / 13.8 (a gain of ~5-10%, near this VM's noise; 32 KB was slower).
constexpr int64_t kVectorPrefetchBytes = 8192;

// x's pair (x[32s + 2r], x[32s + 2r + 1]) in every lane: the vdpbf16ps operand facing row r of step s's tiles.
inline __m512bh x_pair(const c10::BFloat16* x, int64_t s, int r) {
  int32_t pair;
  std::memcpy(&pair, x + s * kDepth + 2 * r, 4);
  return reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
}

// NR rows' sums of a panel's two 16-column tiles -> c[NR][32].
template <int NR>
inline void store_sums(const __m512 (&sums)[NR][2], float* c) {
  for (int i = 0; i < NR; ++i) {
    _mm512_storeu_ps(c + i * kCols, sums[i][0]);
    _mm512_storeu_ps(c + i * kCols + 16, sums[i][1]);
  }
}

// NR rows of x (row(i) for i < NR) times a bf16 panel -> c[NR][32] float32, by vdpbf16ps: row r of a tile is 16
// columns' (W[c, 2r], W[c, 2r + 1]) pairs, so broadcasting x's pair (x[2r], x[2r + 1]) gives 16 columns' sums.
// limit: the end of this thread's weight stream, prefetched ahead (nullptr: the panel is in cache already).
template <int NR>
inline void panel_vector(const c10::BFloat16* const* x, int64_t steps, const c10::BFloat16* w, float* c,
                         const void* limit) {
  __m512 acc[NR][2];
  for (int i = 0; i < NR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    const c10::BFloat16* ws = w + 2 * kTile * s;
    if (limit != nullptr) prefetch_ahead<2, kVectorPrefetchBytes>(ws, 2 * kTile * 2, limit);
    for (int r = 0; r < 16; ++r) {
      const __m512bh w0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(ws + 32 * r));
      const __m512bh w1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(ws + kTile + 32 * r));
      for (int i = 0; i < NR; ++i) {
        const __m512bh xb = x_pair(x[i], s, r);
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], w0, xb);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], w1, xb);
      }
    }
  }
  store_sums<NR>(acc, c);
}

// rows: 1-4 or 8 (c[rows][32] is written; 5-7 would compute only 4 of them, so callers pass those as 4 + the rest).
inline void panel_vector_rows(const c10::BFloat16* const* x, int64_t rows, int64_t steps, const c10::BFloat16* w,
                              float* c, const void* limit) {
  if (rows >= 8) return panel_vector<8>(x, steps, w, c, limit);
  with_rows(rows, [&](auto nr) { panel_vector<decltype(nr)::value>(x, steps, w, c, limit); });
}
#endif

#if defined(CHUNKATTN_AMX) && !defined(CHUNKATTN_BF16_DOT)
#error "an AMX build has AVX512-BF16 (amx.h asks for it): linear_amx.cpp's tile path uses CHUNKATTN_BF16_DOT's set-up"
#endif

#ifdef CHUNKATTN_AMX

// The tile products of one panel `w` (steps x 2 B tiles) for the row tiles of `a`, into c; before(s) runs ahead of
// step s's tile loads (a prefetch of the weight stream; linear_quant.cpp dequantizes the next step there).
template <class Before>
inline void panel_tiles_with(const RowTiles& a, int64_t steps, const c10::BFloat16* w, bool two, float* c,
                             Before before) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < steps; ++s) {
    before(s);
    const c10::BFloat16* ws = w + s * 2 * kTile;
    _tile_loadd(6, ws, 64);
    _tile_loadd(7, ws + kTile, 64);
    _tile_loadd(4, a.x0 + s * kDepth, a.ld0 * 2);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (two) {
      _tile_loadd(5, a.x1 + s * kDepth, a.ld1 * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, kCols * 4);
  _tile_stored(1, c + 16, kCols * 4);
  if (two) {
    _tile_stored(2, c + 16 * kCols, kCols * 4);
    _tile_stored(3, c + 16 * kCols + 16, kCols * 4);
  }
}

// One panel for the row tiles r0 and r0 + 16 (the second when `two`): C = x[r0.., :] . panel, float32, into
// c[32][32] (rows, columns of the panel). x: bf16 rows of ldx elements, K a multiple of 32 in steps. With `limit`
// (the end of this thread's panels) each step prefetches the weights kPrefetchBytes ahead. Measured on the 2-core
// Xeon VM (1B-shape MLP weights, 805 MB): 4 KB ahead streamed 26 GB/s at one row (oneDNN 25.6), 16 KB 25.7, 64
// KB 21.7, none 24.2; at 32 rows 23.8 GB/s (oneDNN 20.5).
inline void panel_tiles(const RowTiles& a, int64_t steps, const c10::BFloat16* w, const char* limit, bool two,
                        float* c) {
  panel_tiles_with(a, steps, w, two, c, [&](int64_t s) {
    if (limit != nullptr) prefetch_ahead(w + s * 2 * kTile, 2 * kTile * 2, limit);  // across panel ends
  });
}
#endif

// y[rows, cols] (row stride ldy) from the panel's float32 sums c[32][32]: + bias, rounded to bf16; or
// silu(gate) * up of the two halves.
template <Epilogue E>
inline void panel_out(const float* c, int64_t rows, int64_t cols, const c10::BFloat16* bias, c10::BFloat16* y,
                      int64_t ldy) {
  float b[kCols] = {};
  if (bias != nullptr)
    for (int64_t j = 0; j < cols; ++j) b[j] = static_cast<float>(bias[j]);
  for (int64_t i = 0; i < rows; ++i) {
    const float* ci = c + i * kCols;
    c10::BFloat16* yi = y + i * ldy;
    if constexpr (E == Epilogue::kSiluMul) {
      const v16 o = silu(load(ci)) * load(ci + 16);
      if (cols == 16) {
        store(yi, o);
      } else {
        float out[16];
        store(out, o);
        for (int64_t j = 0; j < cols; ++j) yi[j] = static_cast<c10::BFloat16>(out[j]);
      }
    } else if (cols == kCols) {
      store(yi, load(ci) + load(b));
      store(yi + 16, load(ci + 16) + load(b + 16));
    } else {
      for (int64_t j = 0; j < cols; ++j) yi[j] = static_cast<c10::BFloat16>(ci[j] + b[j]);
    }
  }
}

#ifdef CHUNKATTN_AMX
// The products of more than 32 rows of x (prefill) with `count` panels (panel index `first` on), a group of panels
// at a time: load_group(g0, g1) makes the panels [g0, g1) (counted from `first`) available (dequantizes them into a
// buffer, or points into packed bf16 weights) and returns the first, the others `steps * 2 * kTile` elements apart;
// each group is multiplied by all M rows while it stays in L2. Above kRowMajorRows rows, row-pair-major: each pair
// of row tiles (32 rows) goes through every panel of the group while it stays in L1 (K <= 768) or L2; up to it,
// panel-major: each panel through a block of rows (the weights' reuse matters more at few rows with a long K).
// Measured on the AMX Xeon VM, Q4_1 dequantized by groups, in-process against each panel dequantized once per 1 MB
// block of rows and multiplied by all of them (where the y rows written out evicted x from L2): SmolLM2 products at
// 1088 / 1984 rows 0.78-0.95x the time, 1B-shaped 0.84-0.92x; panel-major at 33-128 rows, where row-pair-major
// took 1.12-1.2x on the 1B down projection (K = 8192).
// Each product's sums are written out (panel_out) during the next product's tile steps, a few rows a step:
// written out right after its tile stores, the epilogue waited for the last tile products and the next product's
// tiles for it (a loop of 28 panels x 32 row pairs, K = 576: 26.7 TSC cycles a tile product with the epilogue
// after the stores, 24.1 spread over the next product's steps, 21.9 with no epilogue at all). c: room for two
// products' sums (2 x 32 x 32 floats). The tile configuration must be loaded.
constexpr int64_t kRowMajorRows = 128;
constexpr int64_t kGroupBytes[2] = {512 << 10, 1 << 20}, kGroupMaxPanels[2] = {16, 32};  // [panel-major, row-major]
constexpr int64_t kRowBlockBytes = 256 << 10;  // panel-major: x's rows per block, 32 to 128 rows

template <Epilogue E, class LoadGroup>
void grouped_products(const ARows& rows, int64_t M, int64_t n, int64_t steps, int64_t count, int64_t first,
                      const c10::BFloat16* bias, c10::BFloat16* y, float* c, LoadGroup load_group) {
  const int64_t panel = steps * 2 * kTile;  // bf16 elements of a panel
  const bool row_major = M > kRowMajorRows;
  const int64_t group = std::clamp<int64_t>(kGroupBytes[row_major] / (panel * 2), 1, kGroupMaxPanels[row_major]);
  // panel-major: rows per block; row-major: all of them
  const int64_t block = row_major ? M : std::clamp<int64_t>(kRowBlockBytes / (steps * kDepth * 2) / 32 * 32, 32, 128);
  struct Pending {
    const float* c = nullptr;
    int64_t rows = 0, cols = 0;
    const c10::BFloat16* bias = nullptr;
    c10::BFloat16* y = nullptr;
  } pending;
  auto write_out = [&](int64_t i0, int64_t i1) {  // rows i0 .. i1 of the pending product
    i1 = std::min(i1, pending.rows);
    if (i0 < i1) panel_out<E>(pending.c + i0 * kCols, i1 - i0, pending.cols, pending.bias, pending.y + i0 * n, n);
  };
  const int64_t per_step = (32 + steps - 1) / steps;
  float* sums[2] = {c, c + kCols * kCols};
  int buf = 0;
  // the pair of row tiles at r0 times panel p (w) into y
  auto product = [&](int64_t r0, int64_t p, const c10::BFloat16* w) {
    const bool two = r0 + 16 < M;
    const auto [x0, ld0] = rows.rows(r0);
    const auto [x1, ld1] = two ? rows.rows(r0 + 16) : std::make_pair(x0, ld0);
    const int64_t c0 = (first + p) * kOutCols<E>, cols = std::min<int64_t>(kOutCols<E>, n - c0);
    panel_tiles_with(RowTiles{x0, x1, ld0, ld1}, steps, w, two, sums[buf],
                     [&](int64_t s) { write_out(s * per_step, (s + 1) * per_step); });
    pending = Pending{sums[buf], std::min<int64_t>(32, M - r0), cols, bias != nullptr ? bias + c0 : nullptr,
                      y + r0 * n + c0};
    buf ^= 1;
  };
  for (int64_t g0 = 0; g0 < count; g0 += group) {
    const int64_t g1 = std::min(count, g0 + group);
    const c10::BFloat16* w = load_group(g0, g1);
    for (int64_t rb = 0; rb < M; rb += block) {
      const int64_t rend = std::min(M, rb + block);
      if (row_major) {
        for (int64_t r0 = rb; r0 < rend; r0 += 32)
          for (int64_t p = g0; p < g1; ++p) product(r0, p, w + (p - g0) * panel);
      } else {
        for (int64_t p = g0; p < g1; ++p)
          for (int64_t r0 = rb; r0 < rend; r0 += 32) product(r0, p, w + (p - g0) * panel);
      }
    }
  }
  write_out(0, 32);
}
#endif

}  // namespace chunkattn::panels
