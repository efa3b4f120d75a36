// The entry points of the native layers that other translation units call directly (decoder_cpu.cpp's layer
// loop), without going through the dispatcher. Each is the function the op of that name registers, defined in
// its kernel's file (linear_cpu.cpp, linear_amx.cpp, linear_quant.cpp, layers_cpu.cpp, tpp_cpu.cpp), whose
// helpers stay in an anonymous namespace inside chunkattn::ops.
#pragma once

#include <ATen/ATen.h>

namespace chunkattn::ops {

void rope_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, int64_t heads);
at::Tensor silu_and_mul(const at::Tensor& x);
void add_rms_norm_(at::Tensor x, c10::optional<at::Tensor> residual, const at::Tensor& weight, double eps);
void store_kv_(at::Tensor& kc, at::Tensor& vc, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dst,
               const c10::optional<at::Tensor>& src);

at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t n, const c10::optional<at::Tensor>& bias);
at::Tensor linear_silu_mul(const at::Tensor& x, const at::Tensor& packed, int64_t inner);
at::Tensor linear_amx(const at::Tensor& x, const at::Tensor& packed, int64_t n, const c10::optional<at::Tensor>& bias);
at::Tensor linear_silu_mul_amx(const at::Tensor& x, const at::Tensor& packed, int64_t inner);
at::Tensor linear_quant(const at::Tensor& x, const at::Tensor& packed, int64_t kind, int64_t n,
                        const c10::optional<at::Tensor>& bias, int64_t path);
at::Tensor linear_silu_mul_quant(const at::Tensor& x, const at::Tensor& packed, int64_t kind, int64_t inner,
                                 int64_t path);

void tpp_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor out, at::Tensor lse,
             at::Tensor o_part, at::Tensor ml_part, at::TensorList idx, double scale, int64_t group);

}  // namespace chunkattn::ops
