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
//
// The MLP's gate and up projections run as one product whose panels interleave them (pack_gate_up: 24 gate and
// the same 24 up columns per panel), and each register tile's epilogue writes silu(gate) * up: the [M, 2I]
// product is never stored, only its [M, I] activation (linear_silu_mul).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "simd.h"
#include "ops.h"

namespace chunkattn::ops {
namespace {

constexpr int kPanel = 48;  // output columns per panel: 3 vectors
constexpr int kVecs = kPanel / 16;
constexpr int kRows = 8;  // query rows per register tile

// How a register tile's sums a[i, 0..47] become output: stored (the columns c < cols), or, for a gate/up panel
// (pack_gate_up: lanes 0-23 gate, 24-47 up), y[i, c] = silu(a[i, c]) * a[i, 24 + c] for c < cols <= 24.
enum class Epilogue { kStore, kSiluMul };
constexpr int kHalf = kPanel / 2;

// y[i, c] (+)= sum_k x[i, k] w[k, c] for RB rows and the panel's 48 columns c < cols (the rest are padding);
// prefetches next[k, :] for the k with k % groups == group.
template <int RB, Epilogue E>
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
  if constexpr (E == Epilogue::kSiluMul) {
    for (int i = 0; i < RB; ++i) {
      // gate = lanes 0-23 (a[i][0], a[i][1] lanes 0-7), up = lanes 24-47 (a[i][1] lanes 8-15, a[i][2]): the up
      // halves are two permutes of the registers, not a round trip through memory
      const v16 up0 = __builtin_shufflevector(a[i][1], a[i][2], 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
                                              21, 22, 23);
      const v16 up1 = __builtin_shufflevector(a[i][2], a[i][2], 8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13,
                                              14, 15);
      const v16 o0 = silu(a[i][0]) * up0, o1 = silu(a[i][1]) * up1;  // o1: lanes 0-7 are outputs 16-23
      float* yi = y + i * ldy;
      if (cols == kHalf) {
        store(yi, o0);
        for (int c = 0; c < 8; ++c) yi[16 + c] = o1[c];
        continue;
      }
      float out[2 * 16];  // the last panel of an I that is not a multiple of 24
      store(out, o0);
      store(out + 16, o1);
      std::copy(out, out + cols, yi);
    }
    return;
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

template <Epilogue E, int... RB>
inline void tile_rows(int64_t rows, std::integer_sequence<int, RB...>, const float* x, int64_t K, const float* w,
                      const float* next, int64_t group, int64_t groups, const float* bias, int64_t cols, float* y,
                      int64_t ldy) {
  ((rows == RB + 1 ? panel_tile<RB + 1, E>(x, K, w, next, group, groups, bias, cols, y, ldy) : void()), ...);
}

// Columns of output per panel: 48 stored, or 24 of silu(gate) * up.
template <Epilogue E>
constexpr int64_t kOutCols = E == Epilogue::kStore ? kPanel : kHalf;

// w: [N, K] -> panels [P, K, 48], zero padded. kStore: P = ceil(N / 48), panel p = rows 48p.. of w. kSiluMul:
// w = [gate; up], [2I, K], P = ceil(I / 24), panel p = gate rows 24p.. in lanes 0-23 and up rows I + 24p.. in
// lanes 24-47.
template <Epilogue E>
at::Tensor pack(const at::Tensor& w, const char* op) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.device().is_cpu(), op,
              ": weight must be a float32 [N, K] CPU tensor, got ", w.scalar_type(), " ", w.sizes(), " on ",
              w.device());
  TORCH_CHECK(E == Epilogue::kStore || w.size(0) % 2 == 0, op, ": weight must be [gate; up], [2 I, K], got ",
              w.sizes());
  const at::Tensor wc = w.contiguous();
  const int64_t K = wc.size(1), n = E == Epilogue::kStore ? wc.size(0) : wc.size(0) / 2;
  const int64_t panels = (n + kOutCols<E> - 1) / kOutCols<E>;
  at::Tensor packed = at::zeros({panels, K, kPanel}, wc.options());
  const float* src = wc.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t c = 0; c < kPanel; ++c) {
        // the weight row in lane c: output column i of this panel, of the gate or the up half
        const int64_t i = E == Epilogue::kStore ? p * kPanel + c : p * kHalf + c % kHalf;
        if (i >= n) continue;
        const int64_t r = E == Epilogue::kSiluMul && c >= kHalf ? n + i : i;
        for (int64_t k = 0; k < K; ++k) dst[(p * K + k) * kPanel + c] = src[r * K + k];
      }
  });
  return packed;
}

// x: [M, K] float32 (contiguous rows), packed: pack<E> of a weight with n output columns -> [M, n].
template <Epilogue E>
at::Tensor run(const at::Tensor& x, const at::Tensor& packed, int64_t n, const float* bias, const char* op,
               const char* pack_op) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), op,
              ": x must be a float32 [M, K] CPU tensor, got ", x.scalar_type(), " ", x.sizes(), " on ", x.device());
  const int64_t want = n >= 0 ? (n + kOutCols<E> - 1) / kOutCols<E> : -1;
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kFloat && packed.device().is_cpu() &&
                  packed.is_contiguous() && packed.size(2) == kPanel && packed.size(1) == x.size(1) &&
                  n >= 0 && packed.size(0) == want,
              op, ": packed must be ", pack_op, " of a float32 weight with n = ", n, " outputs and K = x.size(1) = ",
              x.size(1), " (", want, " panels of ", kOutCols<E>, " outputs), got ", packed.sizes());
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
      const int64_t c0 = p * kOutCols<E>, cols = std::min<int64_t>(kOutCols<E>, n - c0);
      const float* b = bias != nullptr ? bias + c0 : nullptr;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t r0 = g * kRows, rows = std::min<int64_t>(kRows, M - r0);
        tile_rows<E>(rows, std::make_integer_sequence<int, kRows>{}, xp + r0 * K, K, w, next, g, groups, b, cols,
                     yp + r0 * n + c0, n);
      }
    }
  });
  return y;
}

}  // namespace

// w: [N, K] -> [ceil(N / 48), K, 48].
at::Tensor pack_linear(const at::Tensor& w) { return pack<Epilogue::kStore>(w, "pack_linear"); }

// x . w^T (+ bias): x [M, K], packed: pack_linear of a [n, K] weight, bias: [n] or none -> [M, n].
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t n, const c10::optional<at::Tensor>& bias) {
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == at::kFloat &&
                    bias->device().is_cpu() && bias->is_contiguous(),
                "linear: bias must be a contiguous float32 [n = ", n, "] CPU tensor, got ", bias->scalar_type(), " ",
                bias->sizes());
    bp = bias->data_ptr<float>();
  }
  return run<Epilogue::kStore>(x, packed, n, bp, "linear", "pack_linear");
}

// w = [gate; up]: [2I, K] -> [ceil(I / 24), K, 48].
at::Tensor pack_gate_up(const at::Tensor& w) { return pack<Epilogue::kSiluMul>(w, "pack_gate_up"); }

// silu(x . gate^T) * (x . up^T): x [M, K], packed: pack_gate_up of [gate; up], [2I, K] -> [M, I]. The [M, 2I]
// product is never stored.
at::Tensor linear_silu_mul(const at::Tensor& x, const at::Tensor& packed, int64_t inner) {
  return run<Epilogue::kSiluMul>(x, packed, inner, nullptr, "linear_silu_mul", "pack_gate_up");
}

bool linear_supported() {
#ifdef __AVX512F__
  return true;  // 24 accumulators + 4 operands fit the 32 vector registers
#else
  return false;  // with 16 registers (AVX2) the tile would spill: the caller keeps oneDNN
#endif
}

}  // namespace chunkattn::ops

using namespace chunkattn::ops;  // the ops below


TORCH_LIBRARY_FRAGMENT(chunkattn_layers, m) {
  m.def("pack_linear(Tensor w) -> Tensor", &pack_linear);
  m.def("linear(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor", &linear);
  m.def("pack_gate_up(Tensor w) -> Tensor", &pack_gate_up);
  m.def("linear_silu_mul(Tensor x, Tensor packed, int inner) -> Tensor", &linear_silu_mul);
  m.def("linear_supported() -> bool", &linear_supported);
}
