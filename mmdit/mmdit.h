// MMDiT: joint attention with adaLN-Zero modulation from a timestep conditioning vector
// (models.md, "MMDiT").
#pragma once

#include <vector>

#include "nn/attention.h"

namespace mmdit {

// linear_out(LayerNorm(x) * (1 + scale) + shift), shift and scale from adaLN_modulation(silu(c)).
// Both linears are zero-initialised, so a fresh layer outputs zeros.
class ModulatedFinalLayer : public nn::Module {
 public:
  ModulatedFinalLayer(int64_t dim_in, int64_t dim_out, int64_t dim_cond, Rng& rng);
  Tensor operator()(const Tensor& x, const Tensor& c) const;
  // shift and scale from adaLN_modulation(silu(c)).
  nn::Modulation modulation(const Tensor& silu_c) const;
  // The layer given its modulation.
  Tensor forward(const Tensor& x, const nn::Modulation& modulation) const;
  nn::Linear adaLN_modulation, linear_out;
};

// What a block takes from the conditioning vector c: per modality, the shift and scale of both
// adaptive LayerNorms and the two residual gates, each (..., 1, D_m).
struct BlockConditioning {
  std::vector<nn::Modulation> attn_layernorms, ff_layernorms;
  std::vector<Tensor> attn_gates, ff_gates;
};

class MMDiTBlock : public nn::Module {
 public:
  MMDiTBlock(std::vector<int64_t> dim_modalities, int64_t dim_cond, int64_t dim_head, int64_t heads,
             int64_t ff_mult, Rng& rng);
  // xs[m]: (S_m, D_m) or (B, S_m, D_m); c: (dim_cond,) or (B, dim_cond).
  std::vector<Tensor> operator()(std::vector<Tensor> xs, const Tensor& c,
                                 const Tensor& mask = Tensor()) const;
  BlockConditioning condition(const Tensor& c) const;
  // The block given its conditioning (one entry per modality in each list), which may have batch
  // 1 for a batch of tokens. outputs: which modalities the caller reads (empty: all); the others
  // come back undefined, without the work only they need (their attention output projection,
  // residuals and feed-forward).
  std::vector<Tensor> forward(std::vector<Tensor> xs, const BlockConditioning& cond,
                              const Tensor& mask = Tensor(),
                              const std::vector<bool>& outputs = {}) const;

  std::vector<int64_t> dim_modalities;
  nn::ModuleList<nn::AdaptiveLayerNorm> attn_layernorms, ff_layernorms;
  nn::JointAttention joint_attn;
  nn::ModuleList<nn::FeedForward> feedforwards;
  nn::Linear to_cond;  // zero-init: every gate starts at 0, so a fresh block is the identity

 private:
  void check_inputs(const std::vector<Tensor>& xs, const Tensor& c) const;
};

struct MMDiTConfig {
  int64_t depth = 0;                    // the number of blocks; required, as in the reference
  std::vector<int64_t> dim_modalities;  // at least two
  std::vector<int64_t> dim_outs;
  int64_t dim_cond = 1024;
  std::vector<int64_t> timestep_embed_dims = {256};  // one per conditioning variable
  int64_t dim_head = 64;  // even: RoPE pairs feature j with feature j + dim_head / 2
  int64_t heads = 8;
  int64_t ff_mult = 4;
  // Throws an error naming the first field out of range; the MMDiT constructor calls it.
  void validate() const;
  // "depth 2, dim_modalities (8,4), ...", for messages.
  std::string describe() const;
};

// Everything MMDiT derives from its timesteps: it depends on them alone, so a sampler computes
// it once per step for the whole batch, and with frozen weights once per schedule.
struct MMDiTConditioning {
  std::vector<BlockConditioning> blocks;
  std::vector<nn::Modulation> final_layers;
};

class MMDiT : public nn::Module {
 public:
  MMDiT(const MMDiTConfig& config, Rng& rng);
  // timesteps[c] is () per example or (B,) batched, one per conditioning variable; with batched
  // tokens a () timestep is shared by the whole batch. forward(xs, condition(timesteps), mask),
  // one example being a batch of one.
  std::vector<Tensor> operator()(const std::vector<Tensor>& xs,
                                 const std::vector<Tensor>& timesteps,
                                 const Tensor& mask = Tensor()) const;
  // c = sum over conditioning variables of timestep_embeds.c(t_c), for timesteps (B,) each.
  Tensor embed_timesteps(const std::vector<Tensor>& timesteps) const;
  // The blocks' and final layers' modulations for batched timesteps (B,) each; B may be 1 for
  // any batch of tokens.
  MMDiTConditioning condition(const std::vector<Tensor>& timesteps) const;
  // outputs: which modalities' outputs the caller reads (empty: all). The last block and the
  // final layers skip the work only the others need, as XLA drops dead code under jit; the
  // others come back undefined.
  std::vector<Tensor> forward(const std::vector<Tensor>& xs, const MMDiTConditioning& cond,
                              const Tensor& mask = Tensor(),
                              const std::vector<bool>& outputs = {}) const;

  MMDiTConfig config;
  nn::ModuleList<nn::TimestepEmbedding> timestep_embeds;
  nn::ModuleList<MMDiTBlock> blocks;
  nn::ModuleList<ModulatedFinalLayer> final_layers;

 private:
  void check_forward_inputs(const std::vector<Tensor>& xs, const MMDiTConditioning& cond,
                            const std::vector<bool>& outputs) const;
};

}  // namespace mmdit
