// bfloat16 linear layers on AMX tiles: y[M, N] = x[M, K] . W[N, K]^T (+ bias), with W packed once into panels of
// 32 output columns laid out as the B operands of tdpbf16ps, so that a panel is one sequential stream of 1 KB
// tiles: packed[p, s, j] is the 16 x 16 tile of pairs (W[32p + 16j + c, 32s + 2r], W[32p + 16j + c, 32s + 2r + 1])
// at row r, column c (zero past N and K).
//
// Decoding multiplies every weight once per step by a few rows (M = the batch), so the weight stream is the step's
// memory traffic and the arithmetic is nearly free on tiles: a thread takes a range of panels, runs the rows in
// pairs of 16-row tiles over each panel (2 x 2 accumulator tiles; x's rows are the A operands, read in place),
// and prefetches the next panel while it works on one, spread over the K steps. oneDNN's packed product streamed
// SmolLM2's bf16 decode weights at ~15 GB/s on the 2-core Xeon VM; see benchmarks/linear_cpu.py for this one.
//
// On CPUs with AVX512-BF16 and no AMX the same panels are multiplied by vdpbf16ps (panel_vector in linear_amx.h),
// 8 rows of x at a time, the weight stream prefetched into L2: on the Zen 4 VM 0.65-0.97x oneDNN's packed time on
// SmolLM2's products and 0.89-0.99x on Llama-3.2-1B's, at 1-1088 rows.
//
// The MLP's gate and up projections can run as one product whose panels hold 16 gate and the same 16 up columns
// (pack_gate_up_amx): the epilogue writes silu(gate) * up, and the [M, 2I] product is never stored.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>

#include "linear_amx.h"
#include "ops.h"

namespace chunkattn::ops {
namespace {
using namespace chunkattn::panels;

bool amx_linear_supported() {
#ifdef CHUNKATTN_AMX
  return amx_permitted();
#else
  return false;
#endif
}

// Whether linear_amx runs here at all: on AMX tiles, else by vdpbf16ps on the same panels (AVX512-BF16).
bool bf16_panels_supported() {
#ifdef CHUNKATTN_BF16_DOT
  return true;
#else
  return amx_linear_supported();
#endif
}

// w: [N, K] bf16 -> [P, S, 2, 16, 32] bf16, S = ceil(K / 32). kStore: P = ceil(N / 32), tile j of panel p holds
// output columns 32p + 16j ... kSiluMul: w = [gate; up], [2I, K], P = ceil(I / 16), tile 0 holds gate columns
// 16p ..., tile 1 the same up columns.
template <Epilogue E>
at::Tensor pack_amx(const at::Tensor& w, const char* op) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.device().is_cpu(), op,
              ": weight must be a bfloat16 [N, K] CPU tensor, got ", w.scalar_type(), " ", w.sizes(), " on ",
              w.device());
  TORCH_CHECK(E == Epilogue::kStore || w.size(0) % 2 == 0, op, ": weight must be [gate; up], [2 I, K], got ",
              w.sizes());
  const at::Tensor wc = w.contiguous();
  const int64_t K = wc.size(1), n = E == Epilogue::kStore ? wc.size(0) : wc.size(0) / 2;
  const int64_t panels = (n + kOutCols<E> - 1) / kOutCols<E>, steps = (K + kDepth - 1) / kDepth;
  at::Tensor packed = at::zeros({panels, steps, 2, 16, 32}, wc.options());
  const c10::BFloat16* src = wc.data_ptr<c10::BFloat16>();
  c10::BFloat16* dst = packed.data_ptr<c10::BFloat16>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t j = 0; j < 2; ++j)
        for (int64_t c = 0; c < 16; ++c) {
          // the weight row in column c of tile j: an output column, of the gate or the up half
          const int64_t i = E == Epilogue::kStore ? p * kCols + 16 * j + c : p * 16 + c;
          if (i >= n) continue;
          const int64_t row = E == Epilogue::kSiluMul && j == 1 ? n + i : i;
          for (int64_t k = 0; k < K; ++k) {
            const int64_t s = k / kDepth, r = (k % kDepth) / 2;
            dst[((p * steps + s) * 2 + j) * kTile + r * 32 + 2 * c + k % 2] = src[row * K + k];
          }
        }
  });
  return packed;
}


// x: [M, K] bf16, packed: pack_amx<E> of a weight with n output columns -> [M, n] bf16.
template <Epilogue E>
at::Tensor run_amx(const at::Tensor& x, const at::Tensor& packed, int64_t n, const c10::BFloat16* bias,
                   const char* op, const char* pack_op) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(), op,
              ": x must be a bfloat16 [M, K] CPU tensor, got ", x.scalar_type(), " ", x.sizes(), " on ", x.device());
  const int64_t K = x.size(1), steps = (K + kDepth - 1) / kDepth;
  const int64_t want = n >= 0 ? (n + kOutCols<E> - 1) / kOutCols<E> : -1;
  TORCH_CHECK(packed.dim() == 5 && packed.scalar_type() == at::kBFloat16 && packed.device().is_cpu() &&
                  packed.is_contiguous() && packed.size(1) == steps && packed.size(2) == 2 && packed.size(3) == 16 &&
                  packed.size(4) == 32 && n >= 0 && packed.size(0) == want,
              op, ": packed must be ", pack_op, " of a bfloat16 weight with n = ", n, " outputs and K = x.size(1) = ",
              K, " (", want, " panels of ", kOutCols<E>, " outputs, ", steps, " steps), got ", packed.sizes());
  TORCH_CHECK(bf16_panels_supported(), op, ": this CPU or build has neither AMX tiles nor AVX512-BF16 (use "
              "oneDNN's product)");
  const int64_t M = x.size(0), panels = packed.size(0);
  at::Tensor y = at::empty({M, n}, x.options());
  if (M == 0 || n == 0) return y;
#ifdef CHUNKATTN_BF16_DOT
  const ARows rows(x);
  const int64_t k32 = rows.k32();
  const c10::BFloat16* wp = packed.data_ptr<c10::BFloat16>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  // rows per block: kXBlockBytes of x, whole pairs of row tiles
  const int64_t block = std::max<int64_t>(32, (kXBlockBytes / (std::max(k32, kDepth) * 2)) / 32 * 32);
  if (!amx_linear_supported()) {  // no tiles: vdpbf16ps, passes of 8 rows of x over each panel
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      alignas(64) float c[8 * kCols];
      const char* limit = reinterpret_cast<const char*>(wp + end * steps * 2 * kTile);
      for (int64_t rb = 0; rb < M; rb += block) {  // rows of x that stay in L2 while the panels pass
        const int64_t rend = std::min(M, rb + block);
        for (int64_t p = begin; p < end; ++p) {
          const c10::BFloat16* w = wp + p * steps * 2 * kTile;
          const int64_t c0 = p * kOutCols<E>, cols = std::min<int64_t>(kOutCols<E>, n - c0);
          for (int64_t r0 = rb, nr; r0 < rend; r0 += nr) {  // passes of 8 rows, the rest by up to 4
            nr = rend - r0 >= 8 ? 8 : std::min<int64_t>(4, rend - r0);
            const c10::BFloat16* xr[8];
            for (int64_t i = 0; i < nr; ++i) xr[i] = rows.row(r0 + i);
            panel_vector_rows(xr, nr, steps, w, c, r0 == rb ? limit : nullptr);
            panel_out<E>(c, nr, cols, bias != nullptr ? bias + c0 : nullptr, yp + r0 * n + c0, n);
          }
        }
      }
    });
    return y;
  }
#endif
#ifdef CHUNKATTN_AMX
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    load_tile_config();
    alignas(64) float c[2 * kCols * kCols];  // grouped_products: two products' sums
    if (M > kRowMajorRows) {  // prefill: groups of the packed panels in place, each through all the rows
      grouped_products<E>(rows, M, n, steps, end - begin, begin, bias, yp, c, [&](int64_t g0, int64_t) {
        return wp + (begin + g0) * steps * 2 * kTile;
      });
      _tile_release();
      return;
    }
    const char* limit = reinterpret_cast<const char*>(wp + end * steps * 2 * kTile);
    for (int64_t rb = 0; rb < M; rb += block) {  // rows of x that stay in L2 while the panels pass
      for (int64_t p = begin; p < end; ++p) {
        const c10::BFloat16* w = wp + p * steps * 2 * kTile;
        const int64_t c0 = p * kOutCols<E>, cols = std::min<int64_t>(kOutCols<E>, n - c0);
        for (int64_t r0 = rb; r0 < std::min(M, rb + block); r0 += 32) {
          const bool two = r0 + 16 < M;
          const auto [x0, ld0] = rows.rows(r0);
          const auto [x1, ld1] = two ? rows.rows(r0 + 16) : std::make_pair(x0, ld0);
          panel_tiles(RowTiles{x0, x1, ld0, ld1}, steps, w, r0 == rb ? limit : nullptr, two, c);
          panel_out<E>(c, std::min<int64_t>(32, M - r0), cols, bias != nullptr ? bias + c0 : nullptr,
                       yp + r0 * n + c0, n);
        }
      }
    }
    _tile_release();
  });
#else
  (void)bias;
#endif
  return y;
}

const c10::BFloat16* bias_ptr(const c10::optional<at::Tensor>& bias, int64_t n, const char* op) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == at::kBFloat16 &&
                  bias->device().is_cpu() && bias->is_contiguous(),
              op, ": bias must be a contiguous bfloat16 [n = ", n, "] CPU tensor, got ", bias->scalar_type(), " ",
              bias->sizes());
  return bias->data_ptr<c10::BFloat16>();
}

}  // namespace

at::Tensor pack_linear_amx(const at::Tensor& w) { return pack_amx<Epilogue::kStore>(w, "pack_linear_amx"); }

at::Tensor linear_amx(const at::Tensor& x, const at::Tensor& packed, int64_t n, const c10::optional<at::Tensor>& bias) {
  return run_amx<Epilogue::kStore>(x, packed, n, bias_ptr(bias, n, "linear_amx"), "linear_amx", "pack_linear_amx");
}

at::Tensor pack_gate_up_amx(const at::Tensor& w) { return pack_amx<Epilogue::kSiluMul>(w, "pack_gate_up_amx"); }

at::Tensor linear_silu_mul_amx(const at::Tensor& x, const at::Tensor& packed, int64_t inner) {
  return run_amx<Epilogue::kSiluMul>(x, packed, inner, nullptr, "linear_silu_mul_amx", "pack_gate_up_amx");
}

}  // namespace chunkattn::ops

using namespace chunkattn::ops;  // the ops below


TORCH_LIBRARY_FRAGMENT(chunkattn_layers, m) {
  m.def("amx_linear_supported() -> bool", &amx_linear_supported);
  m.def("bf16_panels_supported() -> bool", &bf16_panels_supported);
  m.def("pack_linear_amx(Tensor w) -> Tensor", &pack_linear_amx);
  m.def("linear_amx(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor", &linear_amx);
  m.def("pack_gate_up_amx(Tensor w) -> Tensor", &pack_gate_up_amx);
  m.def("linear_silu_mul_amx(Tensor x, Tensor packed, int inner) -> Tensor", &linear_silu_mul_amx);
}
