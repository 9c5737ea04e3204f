// The layers of models.md's "Building blocks" table.
#pragma once

#include "nn/functional.h"
#include "nn/module.h"

namespace mmdit::nn {

// a * b, the width of a layer, where `what` names both factors ("FeedForward: dim 8 * mult 4");
// a product past int64 would be undefined behaviour and wrap to a width no one asked for, so it
// throws, saying "<what> overflows int64".
int64_t layer_width(int64_t a, int64_t b, const std::string& what);

enum class Init { uniform, zeros };

// y = x W^T + b; W (out, in) and b (out,) uniform in +-1/sqrt(in), or zero when asked.
class Linear : public Module {
 public:
  Linear(int64_t in, int64_t out, bool bias, Rng& rng, Init init = Init::uniform);
  Tensor operator()(const Tensor& x) const { return linear(x, weight, bias); }
  Tensor weight, bias;  // bias undefined when the layer has none
};

class RMSNorm : public Module {
 public:
  explicit RMSNorm(int64_t dim);
  Tensor operator()(const Tensor& x) const { return rms_norm(x, gamma); }
  Tensor gamma;
};

// One gamma (dim_head,) shared by all heads: RMSNorm over each head's features.
class MultiHeadRMSNorm : public Module {
 public:
  explicit MultiHeadRMSNorm(int64_t dim_head);
  Tensor operator()(const Tensor& x) const { return rms_norm(x, gamma); }
  Tensor gamma;
};

// linear2(silu(linear1(timestep_embedding(t, dim_embed))))
class TimestepEmbedding : public Module {
 public:
  TimestepEmbedding(int64_t dim_embed, int64_t dim_out, Rng& rng);
  Tensor operator()(const Tensor& t) const;
  int64_t dim_embed;
  Linear linear1, linear2;
};

// Shift and scale for tokens (..., S, D), packed as the modulation linear makes them:
// shift_scale = to_modulation(silu(cond)) with a token axis, (..., 1, 2D), shift = [:D] and
// scale = [D:].
struct Modulation {
  Tensor shift_scale;
};
// From silu(cond), which a block computes once for all its modulations.
Modulation modulation_from(const Linear& to_modulation, const Tensor& silu_cond);
// LayerNorm(x) * (1 + scale) + shift
Tensor modulate(const Tensor& x, const Modulation& m);

// LayerNorm(x) * (1 + scale) + shift with shift, scale from to_modulation (zero-init).
class AdaptiveLayerNorm : public Module {
 public:
  AdaptiveLayerNorm(int64_t dim, int64_t dim_cond, Rng& rng);
  Tensor operator()(const Tensor& x, const Tensor& cond) const;
  Modulation modulation(const Tensor& silu_cond) const {
    return modulation_from(to_modulation, silu_cond);
  }
  Linear to_modulation;
};

// SwiGLU: linear_out(linear_in(x) * silu(linear_gate(x))), no biases.
class FeedForward : public Module {
 public:
  FeedForward(int64_t dim, int64_t mult, Rng& rng);
  Tensor operator()(const Tensor& x) const;
  Linear linear_in, linear_gate, linear_out;
};

// ys[m] = layers[m](xs[m]), each under NameScope(scope + m) when a scope is given; ys[m] is
// undefined where xs[m] is (an output nobody reads). The same values as that loop; it exists so
// that a frozen model can run two modalities' products together (linear_fused_each).
std::vector<Tensor> linear_each(const std::vector<const Linear*>& layers,
                                const std::vector<Tensor>& xs, const std::string& scope = "");
std::vector<Tensor> linear_each(const ModuleList<Linear>& layers, const std::vector<Tensor>& xs,
                                const std::string& scope = "");
// feedforwards[m](xs[m]) likewise, one stage at a time across the modalities.
std::vector<Tensor> feedforward_each(const ModuleList<FeedForward>& feedforwards,
                                     const std::vector<Tensor>& xs, const std::string& scope = "");

}  // namespace mmdit::nn
