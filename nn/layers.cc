#include "nn/layers.h"

#include <cmath>

namespace mmdit::nn {

Linear::Linear(int64_t in, int64_t out, bool has_bias, Rng& rng, Init init) {
  MMDIT_CHECK(in > 0 && out > 0, "Linear: sizes must be positive, got in=", in, " out=", out);
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  auto make = [&](const Shape& shape) {
    return init == Init::zeros ? zeros(shape) : rng.uniform(shape, DType::f32, -bound, bound);
  };
  weight = register_parameter("weight", make({out, in}));
  if (has_bias) bias = register_parameter("bias", make({out}));
}

RMSNorm::RMSNorm(int64_t dim) {
  gamma = register_parameter("gamma", ones({dim}));
}

MultiHeadRMSNorm::MultiHeadRMSNorm(int64_t dim_head) {
  gamma = register_parameter("gamma", ones({dim_head}));
}

TimestepEmbedding::TimestepEmbedding(int64_t dim_embed, int64_t dim_out, Rng& rng)
    : dim_embed(dim_embed),
      linear1(dim_embed, dim_out, true, rng),
      linear2(dim_out, dim_out, true, rng) {
  register_module("linear1", linear1);
  register_module("linear2", linear2);
}

Tensor TimestepEmbedding::operator()(const Tensor& t) const {
  return linear2(silu(linear1(timestep_embedding(t, dim_embed))));
}

Modulation modulation_from(const Linear& to_modulation, const Tensor& silu_cond) {
  return {unsqueeze(to_modulation(silu_cond), -2)};
}

Tensor modulate(const Tensor& x, const Modulation& m) {
  return layer_norm_modulate(x, m.shift_scale);  // layer_norm(x) * (1 + scale) + shift
}

AdaptiveLayerNorm::AdaptiveLayerNorm(int64_t dim, int64_t dim_cond, Rng& rng)
    : dim(dim), to_modulation(dim_cond, 2 * dim, true, rng, Init::zeros) {
  register_module("to_modulation", to_modulation);
}

Tensor AdaptiveLayerNorm::operator()(const Tensor& x, const Tensor& cond) const {
  return modulate(x, modulation_from(to_modulation, silu(cond)));
}

FeedForward::FeedForward(int64_t dim, int64_t mult, Rng& rng)
    : linear_in(dim, mult * dim, false, rng),
      linear_gate(dim, mult * dim, false, rng),
      linear_out(mult * dim, dim, false, rng) {
  register_module("linear_in", linear_in);
  register_module("linear_gate", linear_gate);
  register_module("linear_out", linear_out);
}

Tensor FeedForward::operator()(const Tensor& x) const {
  return linear_out(swiglu(linear_in(x), linear_gate(x)));  // linear_in(x) * silu(linear_gate(x))
}

}  // namespace mmdit::nn
