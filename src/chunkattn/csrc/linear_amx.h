// The AMX panel product shared by the bf16 and the quantized linear layers (linear_amx.cpp, linear_quant.cpp): a
// panel is 32 output columns of W laid out as two B operands of tdpbf16ps per 32 of K (packed[s, j] is the 16 x 16
// tile of pairs (W[16j + c, 32s + 2r], W[16j + c, 32s + 2r + 1]) at row r, column c), multiplied by x's rows in
// pairs of 16-row A tiles into float32 sums, and an epilogue that stores them (+ bias) or silu(gate) * up.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstring>
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
    // cache lines, as every operand of a tile load must be (see LineAllocator)
    static thread_local line_vector<c10::BFloat16> tail;
    if (full_ < M_) {
      tail.assign(16 * k32_, c10::BFloat16(0.f));
      for (int64_t r = full_; r < M_; ++r) std::memcpy(tail.data() + (r - full_) * k32_, xp_ + r * ldx_, k32_ * 2);
    }
    tp_ = tail.data();
  }
  std::pair<const c10::BFloat16*, int64_t> rows(int64_t r) const {
    return r < full_ ? std::make_pair(xp_ + r * ldx_, ldx_) : std::make_pair(tp_, k32_);
  }
  // row r of x (any r < M), ld elements to the next row of the same buffer
  const c10::BFloat16* row(int64_t r) const { return r < full_ ? xp_ + r * ldx_ : tp_ + (r - full_) * k32_; }
  int64_t k32() const { return k32_; }

 private:
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

// Prefetch a step's `bytes`, kPrefetchBytes ahead of `step` in a weight stream, when they lie before `limit`
// (the end of this thread's panels).
inline void prefetch_ahead(const void* step, int64_t bytes, const void* limit) {
  const char* pf = static_cast<const char*>(step) + kPrefetchBytes;
  if (pf + bytes <= static_cast<const char*>(limit))
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(pf + b, 0, 3);  // prefetcht0
}

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

}  // namespace chunkattn::panels
