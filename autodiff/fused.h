// Fused ops: a few elementwise steps of the models done in one pass over memory, and recorded as
// one tape node whose backward kernel sits right under its forward kernel (fused.cc, and
// fused_attention.cc for attention). Each is exactly a composition of the plain ops, given in its
// comment; tests/test_fused.cc checks both the values against that composition and the
// gradients against central differences.
//
// Why: a LayerNorm written with plain ops is ten nodes, each reading and writing the whole
// activation and saving a copy for backward. Fused, it is one read, one write and one saved
// tensor (see docs/autodiff.md, section 5).
#pragma once

#include "autodiff/tape.h"

namespace mmdit {

// x W^T + b over the last axis, as matmul(x, transpose(W)) + b; W: (out, in), b: (out,) or
// undefined. One node: the bias is added in the product's output, and its gradient is the column
// sums of the output's gradient.
Tensor linear_fused(const Tensor& x, const Tensor& weight, const Tensor& bias = Tensor());
// linear_fused(xs[i], weights[i], biases[i]) for independent inputs, such as one per modality,
// each recorded under NameScope(scopes[i]) when scopes are given; an undefined xs[i] gives an
// undefined output. A frozen model multiplies them two at a time (raw::matmul_packed_pair): at
// batch 1 one modality's compute-bound product hides the other's memory-bound one.
std::vector<Tensor> linear_fused_each(const std::vector<Tensor>& xs,
                                      const std::vector<Tensor>& weights,
                                      const std::vector<Tensor>& biases,
                                      const std::vector<std::string>& scopes = {});

// layer_norm(x) * (1 + scale) + shift, the normalisation over the last axis without affine and
// with the biased variance. x: (..., S, D); shift, scale: broadcastable to (..., 1, D).
Tensor layer_norm_modulate(const Tensor& x, const Tensor& shift, const Tensor& scale,
                           double eps = 1e-5);
// The same with shift and scale packed as the modulation linear gives them: shift_scale
// broadcastable to (..., 1, 2D), shift first.
Tensor layer_norm_modulate(const Tensor& x, const Tensor& shift_scale, double eps = 1e-5);

// x * rsqrt(mean(square(x), {-1}, true) + eps) * gamma; gamma: (D,).
Tensor rms_norm_fused(const Tensor& x, const Tensor& gamma, double eps = 1e-6);

// a * silu(g), the gated activation of SwiGLU; a and g have one shape.
Tensor swiglu(const Tensor& a, const Tensor& g);

// x + gate * y: an adaLN-Zero residual. x, y: (..., S, D); gate: broadcastable to (..., 1, D).
Tensor gated_residual(const Tensor& x, const Tensor& gate, const Tensor& y);

// Rotary embedding x * cos + rotate_half(x) * sin, rotate_half([x1 | x2]) = [-x2 | x1].
// x: (B, S, H, d); cos, sin: (S, d) constant tables (no gradient).
Tensor rope(const Tensor& x, const Tensor& cos, const Tensor& sin);

// softmax(q k^T / sqrt(d), masked) v for every head, as nn::attention, but with q, k, v and the
// result in token-major (B, T, H, d) layout, so that no permuted copies are made. mask: bool
// (T, T) or (B, T, T), true = may attend, or undefined. Masked logits are -0.7 FLT_MAX, as in the
// reference (a fully masked row is uniform) and get no gradient. Saves the probabilities
// (B, H, T, T) for backward, up to sequences of kBlockedAttentionFrom tokens (below).
Tensor attention_fused(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask);
// The same with q, k, v packed as one projection makes them: qkv (B, T, 3, H, d), q = [:, :, 0],
// k = [:, :, 1], v = [:, :, 2]; the result is (B, T, H, d). Sequences of at least `blocked_from`
// tokens go through blocks of queries and save only each row's max and sum of exponentials
// (O(B H T) instead of O(B H T^2)); backward then recomputes the probabilities.
constexpr int64_t kBlockedAttentionFrom = 512;
Tensor attention_packed(const Tensor& qkv, const Tensor& mask,
                        int64_t blocked_from = kBlockedAttentionFrom);

// Joint attention's core as one op. Per modality m, qkv[m] (B, S_m, 3, H, d) packed as its to_qkv
// projection makes it; q and k get QK-RMSNorm (gamma_q[m], gamma_k[m]: (d,)) and the rotary
// embedding of positions 0..S_m-1 (cos[m], sin[m]: (S_m, d)); then one attention over all the
// modalities' tokens in order. Returns (B, T, H, d), T = sum S_m: the values of
//   attention_packed(concat({qk_norm_rope(qkv[m], gamma_q[m], gamma_k[m], cos[m], sin[m])}, 1),
//                    mask)
// without writing the normalised q, k, v or their concatenation to memory: each head gathers
// and normalises its rows into a scratch that stays in cache, in forward and again in backward.
Tensor joint_attention_fused(const std::vector<Tensor>& qkv, const std::vector<Tensor>& gamma_q,
                             const std::vector<Tensor>& gamma_k, const std::vector<Tensor>& cos,
                             const std::vector<Tensor>& sin, const Tensor& mask, double eps = 1e-6,
                             int64_t blocked_from = kBlockedAttentionFrom);

// On packed qkv (B, S, 3, H, d): q and k become rope(rms_norm(., gamma_q or gamma_k)) (the
// QK-RMSNorm and rotary embedding of joint attention), v is passed through. cos, sin: (S, d)
// constant tables.
Tensor qk_norm_rope(const Tensor& qkv, const Tensor& gamma_q, const Tensor& gamma_k,
                    const Tensor& cos, const Tensor& sin, double eps = 1e-6);

}  // namespace mmdit
