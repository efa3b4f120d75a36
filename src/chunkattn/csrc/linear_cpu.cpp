// The decoder's float32 linear layers on CPUs with AVX-512: y[M, N] = x[M, K] . W[N, K]^T (+ bias), with W packed
// once into panels of 48 output columns, [P, K, 48] (zero past N), so that a panel is one sequential stream.
//
// Each thread takes a range of panels; for a panel it runs the rows of x in groups of 8, each group a register
// tile of 8 rows x 48 columns (24 accumulators; per k three weight vectors, eight broadcasts of x, 24
// multiply-adds) over the whole K. The panel (48 x K floats: 110 KB at K = 576) is read from DRAM by the first
// group and from L2 by the others. While it works on one panel a thread prefetches the next one, spread evenly
// over its row groups (group g fetches the rows k with k % groups == g): the weight stream then overlaps the
// arithmetic instead of stalling the first group of every panel. Decoding reads every weight once per step with
// few rows (M = the batch), so this stream is the step's memory traffic: on the 2-core Zen 5 dev VM, SmolLM2's
// 121 products per decode step at M = 32, weights cold, took 22.5 ms against 32.2 ms through oneDNN's packed
// linear: 0.6-0.8x its time at 1-64 rows, 0.96-1.01x at 1088-2048 (prefill); benchmarks/linear_cpu.py, results
// in benchmarks/results/linear-cpu-2026-12-02-zen5.json.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "simd.h"

namespace {

using namespace chunkattn;

constexpr int kPanel = 48;  // output columns per panel: 3 vectors
constexpr int kVecs = kPanel / 16;
constexpr int kRows = 8;  // query rows per register tile

// y[i, c] (+)= sum_k x[i, k] w[k, c] for RB rows and the panel's 48 columns c < cols (the rest are padding);
// prefetches next[k, :] for the k with k % groups == group.
template <int RB>
inline void panel_tile(const float* x, int64_t K, const float* w, const float* next, int64_t group, int64_t groups,
                       const float* bias, int64_t cols, float* y, int64_t ldy) {
  v16 a[RB][kVecs] = {};
  int64_t wait = next != nullptr ? group : K;  // k until this group's next prefetch (a count, not k % groups)
  for (int64_t k = 0; k < K; ++k, --wait) {
    v16 wk[kVecs];
#pragma GCC unroll 3
    for (int j = 0; j < kVecs; ++j) wk[j] = load(w + k * kPanel + 16 * j);
    if (wait == 0) {
#pragma GCC unroll 3
      for (int j = 0; j < kVecs; ++j) __builtin_prefetch(next + k * kPanel + 16 * j, 0, 3);
      wait = groups;
    }
#pragma GCC unroll 8
    for (int i = 0; i < RB; ++i) {
      v16 xv = splat(x[i * K + k]);
      pin(xv);
#pragma GCC unroll 3
      for (int j = 0; j < kVecs; ++j) a[i][j] += xv * wk[j];
    }
  }
  if (bias != nullptr) {
#pragma GCC unroll 3
    for (int j = 0; j < kVecs; ++j) {
      float b[16];
      for (int c = 0; c < 16; ++c) b[c] = 16 * j + c < cols ? bias[16 * j + c] : 0.f;
      const v16 bv = load(b);
      for (int i = 0; i < RB; ++i) a[i][j] += bv;
    }
  }
  if (cols == kPanel) {
    for (int i = 0; i < RB; ++i)
#pragma GCC unroll 3
      for (int j = 0; j < kVecs; ++j) store(y + i * ldy + 16 * j, a[i][j]);
    return;
  }
  for (int i = 0; i < RB; ++i) {  // the last panel of an N that is not a multiple of 48
    float row[kPanel];
    for (int j = 0; j < kVecs; ++j) store(row + 16 * j, a[i][j]);
    std::copy(row, row + cols, y + i * ldy);
  }
}

template <int... RB>
inline void tile_rows(int64_t rows, std::integer_sequence<int, RB...>, const float* x, int64_t K, const float* w,
                      const float* next, int64_t group, int64_t groups, const float* bias, int64_t cols, float* y,
                      int64_t ldy) {
  ((rows == RB + 1 ? panel_tile<RB + 1>(x, K, w, next, group, groups, bias, cols, y, ldy) : void()), ...);
}

// w: [N, K] -> [ceil(N / 48), K, 48], zero past N.
at::Tensor pack_linear(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.device().is_cpu(),
              "pack_linear: weight must be a float32 [N, K] CPU tensor, got ", w.scalar_type(), " ", w.sizes(), " on ",
              w.device());
  const at::Tensor wc = w.contiguous();
  const int64_t n = wc.size(0), K = wc.size(1), panels = (n + kPanel - 1) / kPanel;
  at::Tensor packed = at::zeros({panels, K, kPanel}, wc.options());
  const float* src = wc.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t c = 0; c < kPanel && p * kPanel + c < n; ++c)
        for (int64_t k = 0; k < K; ++k) dst[(p * K + k) * kPanel + c] = src[(p * kPanel + c) * K + k];
  });
  return packed;
}

// x: [M, K] float32 (contiguous rows), packed: pack_linear of a [n, K] weight, bias: [n] or none -> [M, n].
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t n, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "linear: x must be a float32 [M, K] CPU tensor, got ", x.scalar_type(), " ", x.sizes(), " on ", x.device());
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kFloat && packed.device().is_cpu() &&
                  packed.is_contiguous() && packed.size(2) == kPanel && packed.size(1) == x.size(1) &&
                  n >= 0 && packed.size(0) == (n + kPanel - 1) / kPanel,
              "linear: packed must be pack_linear of a float32 [n, K] weight with n = ", n, " and K = x.size(1) = ",
              x.size(1), " (", (n + kPanel - 1) / kPanel, " panels), got ", packed.sizes());
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == at::kFloat &&
                    bias->device().is_cpu() && bias->is_contiguous(),
                "linear: bias must be a contiguous float32 [n = ", n, "] CPU tensor, got ", bias->scalar_type(), " ",
                bias->sizes());
    bp = bias->data_ptr<float>();
  }
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), panels = packed.size(0);
  at::Tensor y = at::empty({M, n}, xc.options());
  if (M == 0 || n == 0) return y;
  const float* xp = xc.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t groups = (M + kRows - 1) / kRows;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* w = wp + p * K * kPanel;
      const float* next = p + 1 < end ? w + K * kPanel : nullptr;
      const int64_t cols = std::min<int64_t>(kPanel, n - p * kPanel);
      const float* b = bp != nullptr ? bp + p * kPanel : nullptr;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t r0 = g * kRows, rows = std::min<int64_t>(kRows, M - r0);
        tile_rows(rows, std::make_integer_sequence<int, kRows>{}, xp + r0 * K, K, w, next, g, groups, b, cols,
                  yp + r0 * n + p * kPanel, n);
      }
    }
  });
  return y;
}

bool linear_supported() {
#ifdef __AVX512F__
  return true;  // 24 accumulators + 4 operands fit the 32 vector registers
#else
  return false;  // with 16 registers (AVX2) the tile would spill: the caller keeps oneDNN
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(chunkattn_layers, m) {
  m.def("pack_linear(Tensor w) -> Tensor", &pack_linear);
  m.def("linear(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor", &linear);
  m.def("linear_supported() -> bool", &linear_supported);
}
