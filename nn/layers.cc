#include "nn/layers.h"

#include <cmath>
#include <optional>
#include <string>
#include <vector>

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
  gamma = register_parameter("gamma", ones({positive("RMSNorm", "dim", dim)}));
}

MultiHeadRMSNorm::MultiHeadRMSNorm(int64_t dim_head) {
  gamma = register_parameter("gamma", ones({positive("MultiHeadRMSNorm", "dim_head", dim_head)}));
}

TimestepEmbedding::TimestepEmbedding(int64_t dim_embed, int64_t dim_out, Rng& rng)
    : dim_embed(positive("TimestepEmbedding", "dim_embed", dim_embed)),
      linear1(dim_embed, positive("TimestepEmbedding", "dim_out", dim_out), true, rng),
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

int64_t layer_width(int64_t a, int64_t b, const std::string& what) {
  int64_t width = 0;
  MMDIT_CHECK(!__builtin_mul_overflow(a, b, &width), what, " overflows int64");
  return width;
}

AdaptiveLayerNorm::AdaptiveLayerNorm(int64_t dim, int64_t dim_cond, Rng& rng)
    : to_modulation(positive("AdaptiveLayerNorm", "dim_cond", dim_cond),
                    layer_width(2, positive("AdaptiveLayerNorm", "dim", dim),
                                str_cat("AdaptiveLayerNorm: 2 * dim ", dim)),
                    true, rng, Init::zeros) {
  register_module("to_modulation", to_modulation);
}

Tensor AdaptiveLayerNorm::operator()(const Tensor& x, const Tensor& cond) const {
  return modulate(x, modulation_from(to_modulation, silu(cond)));
}

namespace {

// dim * mult, each checked first: the layers' own messages would name the product.
int64_t feedforward_width(int64_t dim, int64_t mult) {
  return layer_width(positive("FeedForward", "dim", dim), positive("FeedForward", "mult", mult),
                     str_cat("FeedForward: dim ", dim, " * mult ", mult));
}

}  // namespace

FeedForward::FeedForward(int64_t dim, int64_t mult, Rng& rng)
    : linear_in(dim, feedforward_width(dim, mult), false, rng),
      linear_gate(dim, feedforward_width(dim, mult), false, rng),
      linear_out(feedforward_width(dim, mult), dim, false, rng) {
  register_module("linear_in", linear_in);
  register_module("linear_gate", linear_gate);
  register_module("linear_out", linear_out);
}

Tensor FeedForward::operator()(const Tensor& x) const {
  return linear_out(swiglu(linear_in(x), linear_gate(x)));  // linear_in(x) * silu(linear_gate(x))
}

namespace {

// scopes: one NameScope per modality, or none.
std::vector<Tensor> linear_each_scoped(const std::vector<const Linear*>& layers,
                                       const std::vector<Tensor>& xs,
                                       const std::vector<std::string>& scopes) {
  MMDIT_CHECK(layers.size() == xs.size(), "linear_each: ", layers.size(), " layers for ", xs.size(),
              " inputs");
  std::vector<Tensor> weights, biases;
  for (const Linear* layer : layers) {
    weights.push_back(layer->weight);
    biases.push_back(layer->bias);
  }
  return linear_fused_each(xs, weights, biases, scopes);
}

std::vector<std::string> scopes_of(const std::string& prefix, size_t count,
                                   const std::string& suffix = "") {
  std::vector<std::string> scopes;
  if (!prefix.empty())
    for (size_t m = 0; m < count; ++m) scopes.push_back(str_cat(prefix, m, suffix));
  return scopes;
}

}  // namespace

std::vector<Tensor> linear_each(const std::vector<const Linear*>& layers,
                                const std::vector<Tensor>& xs, const std::string& scope) {
  return linear_each_scoped(layers, xs, scopes_of(scope, layers.size()));
}

std::vector<Tensor> linear_each(const ModuleList<Linear>& layers, const std::vector<Tensor>& xs,
                                const std::string& scope) {
  std::vector<const Linear*> list;
  for (size_t m = 0; m < layers.size(); ++m) list.push_back(&layers[m]);
  return linear_each(list, xs, scope);
}

std::vector<Tensor> feedforward_each(const ModuleList<FeedForward>& feedforwards,
                                     const std::vector<Tensor>& xs, const std::string& scope) {
  const size_t M = feedforwards.size();
  MMDIT_CHECK(xs.size() == M, "feedforward_each: ", M, " feed-forwards for ", xs.size(), " inputs");
  const auto layers = [&](Linear FeedForward::*layer) {
    std::vector<const Linear*> list;
    for (size_t m = 0; m < M; ++m) list.push_back(&(feedforwards[m].*layer));
    return list;
  };
  const std::vector<Tensor> in =
      linear_each_scoped(layers(&FeedForward::linear_in), xs, scopes_of(scope, M, ".linear_in"));
  const std::vector<Tensor> gate = linear_each_scoped(layers(&FeedForward::linear_gate), xs,
                                                      scopes_of(scope, M, ".linear_gate"));
  std::vector<Tensor> hidden(M);
  for (size_t m = 0; m < M; ++m) {
    if (!xs[m].defined()) continue;
    std::optional<NameScope> named;
    if (!scope.empty()) named.emplace(str_cat(scope, m));
    hidden[m] = swiglu(in[m], gate[m]);
  }
  return linear_each_scoped(layers(&FeedForward::linear_out), hidden,
                            scopes_of(scope, M, ".linear_out"));
}

}  // namespace mmdit::nn
