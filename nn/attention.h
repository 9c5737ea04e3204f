// Joint attention over any number of modalities (models.md, "Joint attention").
#pragma once

#include <vector>

#include "nn/layers.h"

namespace mmdit::nn {

class JointAttention : public Module {
 public:
  JointAttention(std::vector<int64_t> dim_inputs, int64_t dim_head, int64_t heads, Rng& rng);

  // xs[m] is (S_m, D_m) or (B, S_m, D_m), all batched or none. mask: bool (total, total) or
  // (B, total, total), true = attend; undefined = full attention. outputs: which modalities'
  // outputs the caller reads (empty: all); the others come back undefined, without their to_out.
  std::vector<Tensor> operator()(const std::vector<Tensor>& xs, const Tensor& mask = Tensor(),
                                 const std::vector<bool>& outputs = {}) const;

  std::vector<int64_t> dim_inputs;
  int64_t dim_head, heads;
  ModuleList<Linear> to_qkv, to_out;
  ModuleList<MultiHeadRMSNorm> q_rmsnorms, k_rmsnorms;
};

// Checks a list of modality token tensors against the expected feature sizes and returns
// whether they are batched; `who` names the caller in errors.
bool check_modalities(const std::vector<Tensor>& xs, const std::vector<int64_t>& dims,
                      const char* who);
// The same, and every modality of the model's dtype: "MMDiT: modality 0 is float64, the model is
// float32", rather than the error of the first inner op that meets the mismatch.
bool check_modalities(const std::vector<Tensor>& xs, const std::vector<int64_t>& dims,
                      const char* who, DType model_dtype);
// `outputs` of a forward that computes only the modalities its caller reads: empty (all), or one
// flag per modality.
void check_outputs(const std::vector<bool>& outputs, size_t modalities, const char* who);
inline bool wanted(const std::vector<bool>& outputs, size_t m) {
  return outputs.empty() || outputs[m];
}

}  // namespace mmdit::nn
