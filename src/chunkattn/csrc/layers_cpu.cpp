// Fused elementwise layers of the decoder on the CPU, one pass over memory each (vLLM's CPU build has the same
// set): rotary embedding in place, SiLU-and-multiply, residual add + RMSNorm. float32 and bfloat16 storage,
// float32 arithmetic. Also greedy sampling's argmax over the vocabulary, in one pass per row.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"
#include "ops.h"

namespace chunkattn::ops {
namespace {

// x: [N, W]; the first `heads` heads of size d = 2 * cos.size(1) in each row rotate in place (rotate-half, as
// Hugging Face's Llama): x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin. cos, sin: [N, d / 2] float32.
template <typename T>
void rope_impl(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t heads) {
  const int64_t n = x.size(0), half = cos.size(1), row = x.stride(0);
  T* xp = x.data_ptr<T>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* c = cp + r * half;
      const float* s = sp + r * half;
      for (int64_t h = 0; h < heads; ++h) {
        T* a = xp + r * row + h * 2 * half;
        T* b = a + half;
        int64_t i = 0;
        for (; i + 16 <= half; i += 16) {  // 16 pairs at a time; the rest (half % 16) one by one
          const v16 x1 = load(a + i), x2 = load(b + i), ci = load(c + i), si = load(s + i);
          store(a + i, x1 * ci - x2 * si);
          store(b + i, x2 * ci + x1 * si);
        }
        for (; i < half; ++i) {
          const float x1 = static_cast<float>(a[i]), x2 = static_cast<float>(b[i]);
          a[i] = static_cast<T>(x1 * c[i] - x2 * s[i]);
          b[i] = static_cast<T>(x2 * c[i] + x1 * s[i]);
        }
      }
    }
  });
}

}  // namespace

void rope_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, int64_t heads) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rope_: x must be [rows, width] with contiguous rows");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.sizes() == sin.sizes() && cos.size(0) == x.size(0),
              "rope_: cos and sin must be contiguous float32 [rows, head_dim / 2]");
  TORCH_CHECK(heads * 2 * cos.size(1) <= x.size(1), "rope_: heads * head_dim exceeds the row width");
  if (x.scalar_type() == at::kFloat)
    rope_impl<float>(x, cos, sin, heads);
  else if (x.scalar_type() == at::kBFloat16)
    rope_impl<c10::BFloat16>(x, cos, sin, heads);
  else
    TORCH_CHECK(false, "rope_: float32 or bfloat16, got ", x.scalar_type());
}

namespace {

// out[r, i] = silu(x[r, i]) * x[r, I + i] for x: [N, 2I].
template <typename T>
void silu_mul_impl(const at::Tensor& x, at::Tensor& out) {
  const int64_t n = x.size(0), inner = out.size(1), row = x.stride(0);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, n, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = xp + r * row;
      const T* u = g + inner;
      T* o = op + r * inner;
      int64_t i = 0;
      for (; i + 16 <= inner; i += 16) {
        store(o + i, silu(load(g + i)) * load(u + i));
      }
      for (; i < inner; ++i) {
        const float gv = static_cast<float>(g[i]);
        o[i] = static_cast<T>(gv / (1.0f + std::exp(-gv)) * static_cast<float>(u[i]));
      }
    }
  });
}

}  // namespace

at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0, "silu_and_mul: x must be [rows, 2 * I]");
  at::Tensor out = at::empty({x.size(0), x.size(1) / 2}, x.options());
  if (x.scalar_type() == at::kFloat)
    silu_mul_impl<float>(x, out);
  else if (x.scalar_type() == at::kBFloat16)
    silu_mul_impl<c10::BFloat16>(x, out);
  else
    TORCH_CHECK(false, "silu_and_mul: float32 or bfloat16, got ", x.scalar_type());
  return out;
}

namespace {

// residual += x (when given); x = residual * rsqrt(mean(residual^2) + eps) * weight. Rows of width h. In
// bfloat16 the sum is rounded as stored, and the normalised value is rounded before the weight multiplies it
// (Hugging Face's order).
template <typename T>
void add_rms_norm_impl(at::Tensor& x, at::Tensor* residual, const at::Tensor& weight, double eps) {
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  const int64_t n = x.size(0), h = x.size(1), hv = h / 16 * 16;
  T* xp = x.data_ptr<T>();
  T* rp = residual ? residual->data_ptr<T>() : nullptr;
  const T* wp = weight.data_ptr<T>();
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(h);
    for (int64_t r = begin; r < end; ++r) {
      T* xr = xp + r * h;
      T* rr = rp ? rp + r * h : nullptr;
      v16 ssv = v16{};
      float ss = 0.f;
      for (int64_t i = 0; i < hv; i += 16) {
        v16 y = load(xr + i);
        if (rr) {
          y += load(rr + i);
          store(rr + i, y);
          if constexpr (kBf16) y = round_bf16(y);
        }
        store(buf.data() + i, y);
        ssv += y * y;
      }
      ss = hsum(ssv);
      for (int64_t i = hv; i < h; ++i) {
        float y = static_cast<float>(xr[i]);
        if (rr) {
          rr[i] = static_cast<T>(static_cast<float>(rr[i]) + y);
          y = static_cast<float>(rr[i]);
        }
        buf[i] = y;
        ss += y * y;
      }
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(h) + static_cast<float>(eps));
      for (int64_t i = 0; i < hv; i += 16) {
        v16 y = load(buf.data() + i) * inv;
        if constexpr (kBf16) y = round_bf16(y);
        store(xr + i, y * load(wp + i));
      }
      for (int64_t i = hv; i < h; ++i) {
        const float y = buf[i] * inv;
        xr[i] = kBf16 ? static_cast<T>(static_cast<float>(wp[i]) * static_cast<float>(static_cast<T>(y)))
                      : static_cast<T>(y * static_cast<float>(wp[i]));
      }
    }
  });
}

}  // namespace

void add_rms_norm_(at::Tensor x, c10::optional<at::Tensor> residual, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "add_rms_norm_: x must be a contiguous [rows, hidden]");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.scalar_type() == x.scalar_type() &&
                  weight.is_contiguous(), "add_rms_norm_: weight must be [hidden] like x");
  at::Tensor* res = nullptr;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->is_contiguous() &&
                    residual->scalar_type() == x.scalar_type(), "add_rms_norm_: residual must be like x");
    res = &residual.value();
  }
  if (x.scalar_type() == at::kFloat)
    add_rms_norm_impl<float>(x, res, weight, eps);
  else if (x.scalar_type() == at::kBFloat16)
    add_rms_norm_impl<c10::BFloat16>(x, res, weight, eps);
  else
    TORCH_CHECK(false, "add_rms_norm_: float32 or bfloat16, got ", x.scalar_type());
}

// x: [R, V] float32 -> [R] int64: per row the index of the first maximum, a NaN counting as the largest (as
// torch.argmax). One pass: each of 16 lanes keeps its largest value and where it first saw it (strict >).
at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.size(1) > 0,
              "argmax_rows: x must be a contiguous non-empty [rows, n] float32");
  const int64_t rows = x.size(0), n = x.size(1), nv = n / 16 * 16;
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    const i16v lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * n;
      v16 best = splat(kNegInf);
      i16v at_ = i16v{} - 1, nan = i16v{};
      for (int64_t i = 0; i < nv; i += 16) {
        const v16 v = load(xr + i);
        const i16v gt = v > best;
        best = gt ? v : best;
        at_ = gt ? lane + (int32_t)i : at_;
        nan |= v != v;
      }
      float m = kNegInf;
      int64_t idx = -1;
      for (int j = 0; j < 16; ++j) {  // the largest lane; among equals the earliest index
        if (at_[j] >= 0 && (best[j] > m || (best[j] == m && at_[j] < idx))) m = best[j], idx = at_[j];
      }
      bool has_nan = false;
      for (int j = 0; j < 16; ++j) has_nan |= nan[j] != 0;
      for (int64_t i = nv; i < n; ++i) {
        if (xr[i] != xr[i]) has_nan = true;
        else if (xr[i] > m) m = xr[i], idx = i;
      }
      if (has_nan) {
        for (int64_t i = 0; i < n; ++i)
          if (xr[i] != xr[i]) {
            idx = i;
            break;
          }
      }
      op[r] = idx < 0 ? 0 : idx;  // every value -inf: the first
    }
  });
  return out;
}

// Structured outputs: logits[rows[i], t] = -inf wherever bit t of bitmask[i] (LSB first in 32-bit words, as
// llguidance packs them) is 0. logits: [R, V] float32 contiguous; bitmask: [C, ceil(V / 32)] int32 contiguous;
// rows: [C] int64 distinct indices into logits' rows. One pass over each constrained row; whole words of allowed
// tokens are skipped.
void apply_token_bitmask_(at::Tensor& logits, const at::Tensor& bitmask, const at::Tensor& rows) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == at::kFloat,
              "apply_token_bitmask_: logits must be a contiguous [rows, vocab] float32");
  const int64_t vocab = logits.size(1), words = (vocab + 31) / 32, n = rows.numel();
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.is_contiguous() && bitmask.scalar_type() == at::kInt &&
                  bitmask.size(0) == n && bitmask.size(1) == words,
              "apply_token_bitmask_: bitmask must be a contiguous [len(rows), ceil(vocab / 32)] int32");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous(),
              "apply_token_bitmask_: rows must be a contiguous 1-D int64");
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(rp[i] >= 0 && rp[i] < logits.size(0), "apply_token_bitmask_: row ", rp[i], " out of range");
  float* lp = logits.data_ptr<float>();
  const uint32_t* mp = reinterpret_cast<const uint32_t*>(bitmask.data_ptr<int32_t>());
  const int64_t full = vocab / 32;  // words whose 32 tokens are all in the vocabulary
  at::parallel_for(0, n * words, 4096, [&](int64_t begin, int64_t end) {
    const i16v lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const v16 neg_inf = splat(kNegInf);
    for (int64_t k = begin; k < end; ++k) {
      const int64_t i = k / words, w = k % words;
      const uint32_t bits = mp[k];
      if (bits == 0xFFFFFFFFu) continue;
      float* x = lp + rp[i] * vocab + w * 32;
      if (w < full) {
        for (int half = 0; half < 2; ++half) {
          const i16v keep = ((i16v{} + (int32_t)((bits >> (16 * half)) & 0xFFFFu)) >> lane) & 1;
          const v16 v = load(x + 16 * half);
          store(x + 16 * half, keep != 0 ? v : neg_inf);
        }
      } else {
        for (int64_t j = 0; j < vocab - w * 32; ++j)
          if (!((bits >> j) & 1u)) x[j] = kNegInf;
      }
    }
  });
}

// The K/V cache's scatter: kc[layer][dst[j]] = k[src[j]] (and V) for every j (src: None = j). kc, vc: one
// layer's [slots, H, d] contiguous storage; k, v: [N, H, d] with contiguous rows (a row stride of their own, e.g.
// views of the fused QKV projection). Every index is checked (a bad one would write outside the pool); dst holds
// distinct rows (as the cache's slots are: with duplicates, which copy lands is unspecified). For a
// decode step's few rows: two index_copy_ calls cost ~20 us each, a row's memcpy ~nothing.
void store_kv_(at::Tensor& kc, at::Tensor& vc, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dst,
               const c10::optional<at::Tensor>& src) {
  TORCH_CHECK(kc.dim() == 3 && kc.is_contiguous() && vc.is_contiguous() && vc.sizes() == kc.sizes() &&
                  kc.device().is_cpu() && vc.device().is_cpu(),
              "store_kv_: the caches must be contiguous [slots, heads, head_dim] CPU tensors of one shape");
  const int64_t slots = kc.size(0), row = kc.size(1) * kc.size(2), n = dst.numel();
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&vc, &k, &v})
    TORCH_CHECK(t->scalar_type() == kc.scalar_type(), "store_kv_: k, v and the caches must have one dtype");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&k, &v})
    TORCH_CHECK(t->dim() == 3 && t->size(1) == kc.size(1) && t->size(2) == kc.size(2) && t->stride(2) == 1 &&
                    t->stride(1) == kc.size(2) && t->device().is_cpu(),
                "store_kv_: k and v must be [rows, heads, head_dim] CPU tensors with contiguous rows");
  TORCH_CHECK(dst.dim() == 1 && dst.scalar_type() == at::kLong && dst.is_contiguous() && dst.device().is_cpu(),
              "store_kv_: dst must be a contiguous 1-D int64 CPU tensor");
  const int64_t* dp = dst.data_ptr<int64_t>();
  const int64_t* sp = nullptr;
  if (src.has_value()) {
    TORCH_CHECK(src->dim() == 1 && src->scalar_type() == at::kLong && src->is_contiguous() && src->numel() == n &&
                    src->device().is_cpu(),
                "store_kv_: src must be a contiguous 1-D int64 CPU tensor as long as dst");
    sp = src->data_ptr<int64_t>();
  } else {
    TORCH_CHECK(k.size(0) == n && v.size(0) == n, "store_kv_: without src, k and v need one row per dst");
  }
  for (int64_t j = 0; j < n; ++j) {
    TORCH_CHECK(dp[j] >= 0 && dp[j] < slots, "store_kv_: destination row ", dp[j], " outside [0, ", slots, ")");
    if (sp != nullptr)
      TORCH_CHECK(sp[j] >= 0 && sp[j] < k.size(0) && sp[j] < v.size(0), "store_kv_: source row ", sp[j],
                  " outside [0, ", std::min(k.size(0), v.size(0)), ")");
  }
  const int64_t elem = kc.element_size(), bytes = row * elem;
  char* kd = static_cast<char*>(kc.data_ptr());
  char* vd = static_cast<char*>(vc.data_ptr());
  const char* ks = static_cast<const char*>(k.data_ptr());
  const char* vs = static_cast<const char*>(v.data_ptr());
  const int64_t ksr = k.stride(0) * elem, vsr = v.stride(0) * elem;
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t from = sp != nullptr ? sp[j] : j;
      std::memcpy(kd + dp[j] * bytes, ks + from * ksr, bytes);
      std::memcpy(vd + dp[j] * bytes, vs + from * vsr, bytes);
    }
  });
}

}  // namespace chunkattn::ops

using namespace chunkattn::ops;  // the ops below

TORCH_LIBRARY(chunkattn_layers, m) {
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin, int heads) -> ()", &rope_);
  m.def("silu_and_mul(Tensor x) -> Tensor", &silu_and_mul);
  m.def("add_rms_norm_(Tensor(a!) x, Tensor(b!)? residual, Tensor weight, float eps) -> ()", &add_rms_norm_);
  m.def("argmax_rows(Tensor x) -> Tensor", &argmax_rows);
  m.def("apply_token_bitmask_(Tensor(a!) logits, Tensor bitmask, Tensor rows) -> ()", &apply_token_bitmask_);
  m.def("store_kv_(Tensor(a!) kc, Tensor(b!) vc, Tensor k, Tensor v, Tensor dst, Tensor? src) -> ()", &store_kv_);
}
