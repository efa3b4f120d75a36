// The decoder's layer loop on the CPU in one call: chunkattn_layers.DecoderStack holds every layer's weights
// (norms, and each linear layer as the product it runs: chunkattn's float32 panels, the bfloat16 panels, the
// quantized blocks or a dense weight) and `run` computes all layers of one engine step, calling the same kernels
// as the Python layer loop of chunkattn/model/llama.py in the same order with the same arguments (so the results
// are bit-equal), without the ~3 ms of Python and dispatcher overhead that loop costs a SmolLM2 decode step on
// 2 cores (its ~270 kernel calls). Built by chunkattn.model.native_stack, which decides when it applies.

#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <tuple>
#include <utility>
#include <vector>

#include "ops.h"

namespace {

using chunkattn::ops::add_rms_norm_;

// How a linear layer multiplies (chunkattn.model.native_stack.LINEAR_KINDS names them).
enum LinearKind : int64_t { kDense = 0, kPanels = 1, kBf16Panels = 2, kQuant = 3, kQuantParts = 4 };

// What identifies a tensor's values: its version (bumped by every in-place change) and its data pointer (a
// `.data =` assignment swaps the storage).
std::pair<int64_t, const void*> version_of(const at::Tensor& t) {
  if (!t.defined()) return {0, nullptr};
  return {t.is_inference() ? 0 : static_cast<int64_t>(t._version()), t.data_ptr()};
}

struct LinearSpec {
  int64_t kind;
  at::Tensor weight;  // the dense weight: kDense, and kBf16Panels above max_rows
  at::Tensor packed;  // the pack of kPanels / kBf16Panels, the blocks of kQuant
  c10::optional<at::Tensor> bias;
  int64_t n;         // output columns, or the intermediate size of a gate/up layer
  int64_t qkind;     // kQuant: the block kind of chunkattn_layers.linear_quant
  int64_t max_rows;  // kBf16Panels: rows up to which the panels run (Linear.panel_max_rows), F.linear above
  bool gate_up;      // silu(x W_gate^T) * (x W_up^T)
  std::pair<int64_t, const void*> weight_version, packed_version;  // when added (see fresh)
  // kQuantParts: a fused projection whose parts are of different block kinds (a Q4_K_M file's Q4_K q / k beside a
  // Q6_K v), each multiplied by linear_quant into its columns of one output, as quant.QuantizedParts.linear
  std::vector<at::Tensor> parts;
  std::vector<int64_t> part_kinds, part_ns;
  std::vector<c10::optional<at::Tensor>> part_bias;
  std::vector<std::pair<int64_t, const void*>> part_versions;

  // As Linear.forward / GateUpLinear.forward (chunkattn/model/layers.py) for the pack kinds above.
  at::Tensor operator()(const at::Tensor& x) const {
    namespace ops = chunkattn::ops;
    switch (kind) {
      case kPanels:
        return gate_up ? ops::linear_silu_mul(x, packed, n) : ops::linear(x, packed, n, bias);
      case kBf16Panels:
        if (x.size(0) <= max_rows) {
          return gate_up ? ops::linear_silu_mul_amx(x, packed, n) : ops::linear_amx(x, packed, n, bias);
        }
        break;
      case kQuant:
        return gate_up ? ops::linear_silu_mul_quant(x, packed, qkind, n, 0)
                       : ops::linear_quant(x, packed, qkind, n, bias, 0);
      case kQuantParts: {
        std::vector<at::Tensor> ys;
        for (size_t p = 0; p < parts.size(); ++p)
          ys.push_back(ops::linear_quant(x, parts[p], part_kinds[p], part_ns[p], part_bias[p], 0));
        return at::cat(ys, 1);
      }
      default:
        break;
    }
    at::Tensor y = at::linear(x, weight, bias);
    return gate_up ? ops::silu_and_mul(y) : y;
  }
};

struct DecoderStack : torch::CustomClassHolder {
  int64_t heads, kv_heads, head_dim;
  std::vector<LinearSpec> linears;  // per layer: qkv_proj, o_proj, gate_up_proj, down_proj
  std::vector<std::pair<at::Tensor, double>> norms;  // per layer: input_layernorm, post_attention_layernorm
  std::vector<std::pair<int64_t, const void*>> norm_versions;

  DecoderStack(int64_t heads, int64_t kv_heads, int64_t head_dim)
      : heads(heads), kv_heads(kv_heads), head_dim(head_dim) {
    TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0 && head_dim % 2 == 0,
                "DecoderStack: heads must be a positive multiple of kv_heads and head_dim positive and even");
  }

  void add_linear(int64_t kind, at::Tensor weight, at::Tensor packed, c10::optional<at::Tensor> bias, int64_t n,
                  int64_t qkind, int64_t max_rows, bool gate_up) {
    TORCH_CHECK(kind >= kDense && kind <= kQuant, "DecoderStack.add_linear: unknown kind ", kind,
                " (parts of several kinds: add_linear_parts)");
    TORCH_CHECK(kind == kDense || packed.defined(), "DecoderStack.add_linear: kind ", kind, " needs its pack");
    TORCH_CHECK(kind == kPanels || kind == kQuant || weight.dim() == 2,
                "DecoderStack.add_linear: kind ", kind, " needs the dense [out, in] weight");
    linears.push_back(LinearSpec{kind, weight, packed, std::move(bias), n, qkind, max_rows, gate_up,
                                 version_of(weight), version_of(packed)});
  }

  // A projection of quantized parts (packs of kinds `kinds`, with `ns` output columns each), stacked along the
  // output; bias (optional) over all of them.
  void add_linear_parts(std::vector<at::Tensor> packs, std::vector<int64_t> kinds, std::vector<int64_t> ns,
                        c10::optional<at::Tensor> bias) {
    TORCH_CHECK(!packs.empty() && packs.size() == kinds.size() && packs.size() == ns.size(),
                "DecoderStack.add_linear_parts: one kind and column count per pack, and at least one pack");
    int64_t total = 0;
    for (int64_t n : ns) total += n;
    TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->numel() == total),
                "DecoderStack.add_linear_parts: a bias must be 1-D with one value per output column (", total,
                "), got ", bias.has_value() ? bias->sizes() : at::IntArrayRef{});
    LinearSpec spec{kQuantParts, at::Tensor(), at::Tensor(), bias, 0, 0, 0, false, {0, nullptr}, {0, nullptr}};
    int64_t offset = 0;
    for (size_t p = 0; p < packs.size(); ++p) {
      spec.part_bias.push_back(bias.has_value() ? c10::optional<at::Tensor>(bias->narrow(0, offset, ns[p]))
                                                : c10::nullopt);
      spec.part_versions.push_back(version_of(packs[p]));
      offset += ns[p];
    }
    spec.n = offset;
    spec.parts = std::move(packs);
    spec.part_kinds = std::move(kinds);
    spec.part_ns = std::move(ns);
    linears.push_back(std::move(spec));
  }

  void add_norm(at::Tensor weight, double eps) {
    norm_versions.push_back(version_of(weight));
    norms.emplace_back(std::move(weight), eps);
  }

  int64_t num_layers() const { return static_cast<int64_t>(norms.size() / 2); }

  // Whether every weight and pack is as it was when added (the Python layers repack a weight changed in place
  // on their next call; the stack must then be rebuilt from them).
  bool fresh() const {
    for (const LinearSpec& l : linears) {
      if (version_of(l.weight) != l.weight_version || version_of(l.packed) != l.packed_version) return false;
      for (size_t p = 0; p < l.parts.size(); ++p)
        if (version_of(l.parts[p]) != l.part_versions[p]) return false;
    }
    for (size_t i = 0; i < norms.size(); ++i) {
      if (version_of(norms[i].first).second != norm_versions[i].second) return false;
    }
    return true;
  }

  // All layers of one step. x: [N, hidden], the embeddings of the step's new tokens (overwritten); cos, sin:
  // [N, head_dim / 2] float32; k_cache, v_cache: the pool's [layers, rows, kv_heads, head_dim] (layer l of the
  // stack attends on the cache's layer l); dst (src): the cache rows the new K/V go to (the rows of k/v they come
  // from, none: all in order); o_part, ml_part, idx: the attention plan's chunkattn_cpu.tpp workspace. Returns
  // (the last layer's output, the residual stream before it), as LlamaForCausalLM's layer loop.
  std::tuple<at::Tensor, at::Tensor> run(at::Tensor x, at::Tensor cos, at::Tensor sin, at::Tensor k_cache,
                                         at::Tensor v_cache, at::Tensor dst, c10::optional<at::Tensor> src,
                                         at::Tensor o_part, at::Tensor ml_part, std::vector<at::Tensor> idx,
                                         double scale) const {
    const int64_t layers = num_layers();
    TORCH_CHECK(layers > 0 && static_cast<int64_t>(linears.size()) == 4 * layers,
                "DecoderStack.run: the stack has ", norms.size(), " norms and ", linears.size(),
                " linear layers, not 2 and 4 per layer");
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "DecoderStack.run: x must be a contiguous [rows, hidden]");
    TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) >= layers && k_cache.size(2) == kv_heads &&
                    k_cache.size(3) == head_dim && v_cache.sizes() == k_cache.sizes(),
                "DecoderStack.run: k_cache and v_cache must be [layers >= ", layers, ", rows, ", kv_heads, ", ",
                head_dim, "], got ", k_cache.sizes(), " and ", v_cache.sizes());
    const int64_t n = x.size(0), q_size = heads * head_dim, kv_size = kv_heads * head_dim;
    const at::Tensor out = at::empty({n, heads, head_dim}, x.options());
    const at::Tensor lse = at::empty({n, heads}, x.options().dtype(at::kFloat));
    at::Tensor residual;
    for (int64_t l = 0; l < layers; ++l) {
      const LinearSpec* lin = &linears[4 * l];
      at::Tensor h;
      if (l == 0) {
        residual = x;
        h = x.clone();
        add_rms_norm_(h, c10::nullopt, norms[0].first, norms[0].second);
      } else {
        add_rms_norm_(x, residual, norms[2 * l].first, norms[2 * l].second);
        h = x;
      }
      at::Tensor qkv = lin[0](h);  // [N, (H + 2 Hkv) d]
      chunkattn::ops::rope_(qkv, cos, sin, heads + kv_heads);
      const at::Tensor q = qkv.narrow(1, 0, q_size).view({n, heads, head_dim});
      const at::Tensor k = qkv.narrow(1, q_size, kv_size).view({n, kv_heads, head_dim});
      const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({n, kv_heads, head_dim});
      at::Tensor kc = k_cache.select(0, l), vc = v_cache.select(0, l);
      chunkattn::ops::store_kv_(kc, vc, k, v, dst, src);
      chunkattn::ops::tpp_cpu(q, kc, vc, out, lse, o_part, ml_part, idx, scale, heads / kv_heads);
      h = lin[1](out.view({n, q_size}));
      add_rms_norm_(h, residual, norms[2 * l + 1].first, norms[2 * l + 1].second);
      x = lin[3](lin[2](h));
    }
    return {x, residual};
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(chunkattn_layers, m) {
  m.class_<DecoderStack>("DecoderStack")
      .def(torch::init<int64_t, int64_t, int64_t>())
      .def("add_linear", &DecoderStack::add_linear)
      .def("add_linear_parts", &DecoderStack::add_linear_parts)
      .def("add_norm", &DecoderStack::add_norm)
      .def("num_layers", &DecoderStack::num_layers)
      .def("fresh", &DecoderStack::fresh)
      .def("run", &DecoderStack::run);
}
