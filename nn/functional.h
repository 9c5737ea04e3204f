// Stateless building blocks. linear and rms_norm are the fused ops the layers run; layer_norm,
// apply_rope and attention are the spec's formulas composed from the plain ops of
// autodiff/ops.h, which the models run fused instead (layer_norm_modulate and
// joint_attention_fused in autodiff/fused.h) and which the tests hold those fused ops to.
#pragma once

#include "autodiff/fused.h"
#include "autodiff/ops.h"

namespace mmdit::nn {

// x W^T + b over the last axis; W is (out, in).
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias = Tensor());

// x / sqrt(mean(x^2) + eps) * gamma over the last axis.
Tensor rms_norm(const Tensor& x, const Tensor& gamma, double eps = 1e-6);

// [cos(t f), sin(t f)] with f_j = exp(-ln(max_period) j / half), half = dim / 2, plus one
// trailing zero when dim is odd. t is () or (B,); the result is (dim,) or (B, dim).
Tensor timestep_embedding(const Tensor& t, int64_t dim, double max_period = 10000);
// Row p is timestep_embedding(p, dim), p = 0..length-1: the sinusoidal position table.
Tensor sincos_table(int64_t dim, int64_t length, DType dtype = DType::f32);

// Rotary embedding tables for positions 0..seq-1: cos and sin, each (seq, dim_head), where
// feature j and j + dim_head/2 share the angle p / 10000^(2j / dim_head).
struct RopeTables {
  Tensor cos, sin;
};
// Computed once per (seq, dim_head, dtype) and shared: read them, never write to them.
RopeTables rope_tables(int64_t seq, int64_t dim_head, DType dtype);

// ---- The plain compositions (not run by the models; see the top of this file) ----

// (x - mean) / sqrt(var + eps) over the last axis (biased variance, no affine).
Tensor layer_norm(const Tensor& x, double eps = 1e-5);
// x * cos + rotate_half(x) * sin, rotate_half([x1 | x2]) = [-x2 | x1]. x is (..., seq, dim_head)
// after the tables are broadcast to it.
Tensor apply_rope(const Tensor& x, const Tensor& cos, const Tensor& sin);
// softmax(q k^T / sqrt(d), masked) v for q, k, v of shape (B, H, T, d). mask: bool (T, T) or
// (B, T, T), true = may attend; undefined = attend everywhere. Masked logits become
// -0.7 * FLT_MAX, as in the reference, so a fully masked row is uniform rather than NaN.
Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask);

}  // namespace mmdit::nn
