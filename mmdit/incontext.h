// InContextMMDiT: joint attention with RMSNorm and plain residuals; conditioning arrives as
// tokens the caller prepends (models.md, "InContextMMDiT").
#pragma once

#include <vector>

#include "nn/attention.h"

namespace mmdit {

// linear_out(RMSNorm(x)), linear_out zero-initialised.
class SimpleFinalLayer : public nn::Module {
 public:
  SimpleFinalLayer(int64_t dim_in, int64_t dim_out, Rng& rng);
  Tensor operator()(const Tensor& x) const { return linear_out(rms_norm(x)); }
  nn::RMSNorm rms_norm;
  nn::Linear linear_out;
};

class InContextMMDiTBlock : public nn::Module {
 public:
  InContextMMDiTBlock(std::vector<int64_t> dim_modalities, int64_t dim_head, int64_t heads,
                      int64_t ff_mult, Rng& rng);
  std::vector<Tensor> operator()(std::vector<Tensor> xs, const Tensor& mask = Tensor()) const;

  std::vector<int64_t> dim_modalities;
  nn::ModuleList<nn::RMSNorm> attn_norms, ff_norms;
  nn::JointAttention joint_attn;
  nn::ModuleList<nn::FeedForward> feedforwards;
};

struct InContextMMDiTConfig {
  int64_t depth = 0;  // the number of blocks; required, as in the reference
  std::vector<int64_t> dim_modalities;
  std::vector<int64_t> dim_outs;
  int64_t dim_head = 64;
  int64_t heads = 8;
  int64_t ff_mult = 4;
  // Throws an error naming the first field out of range; the constructor calls it.
  void validate() const;
  // "depth 2, dim_modalities (8,4), ...", for messages.
  std::string describe() const;
};

class InContextMMDiT : public nn::Module {
 public:
  InContextMMDiT(const InContextMMDiTConfig& config, Rng& rng);
  std::vector<Tensor> operator()(const std::vector<Tensor>& xs,
                                 const Tensor& mask = Tensor()) const;

  InContextMMDiTConfig config;
  nn::ModuleList<InContextMMDiTBlock> blocks;
  nn::ModuleList<SimpleFinalLayer> final_layers;
};

}  // namespace mmdit
