// The flow-matching behaviour-cloning policy (models.md, "The flow-matching behaviour-cloning
// policy"): observation and action tokens through an MMDiT that predicts the velocity field.
#pragma once

#include <optional>
#include <string>

#include "mmdit/mmdit.h"
#include "tensor/packed_weight.h"

namespace mmdit {

struct PolicyConfig {
  int64_t n_obs_steps = 2;
  int64_t state_dim = 4;
  int64_t horizon = 16;
  int64_t act_dim = 2;
  int64_t hidden_size = 256;
  int64_t depth = 8;
  int64_t dim_cond = 1024;
  int64_t timestep_embed_dim = 256;
  int64_t dim_head = 64;
  int64_t heads = 8;
  int64_t ff_mult = 4;
  double sigma = 0;  // std of Gaussian noise added to x_t in training (0 = none)

  // n_obs_steps + horizon at most: the mask is this square of bools and attention's scores as
  // many floats per head and example, so a longer sequence is a mistake, not a plan.
  static constexpr int64_t kMaxTokens = 16384;

  std::string to_json() const;
  static PolicyConfig from_json(const std::string& json);  // unknown keys are an error
  void validate() const;
};

// Per-dimension statistics, and the map to the policy's [-1, 1] (min-max) or unit-variance
// (z-score) coordinates.
struct Normalizer {
  enum class Mode { min_max, z_score };
  Mode mode = Mode::min_max;
  Tensor state_min, state_max, state_mean, state_std;      // (state_dim,)
  Tensor action_min, action_max, action_mean, action_std;  // (act_dim,)

  // min-max: 2 (x - min) / (max - min + 1e-8) - 1; z-score: (x - mean) / (std + 1e-8).
  Tensor normalize_state(const Tensor& s) const;
  Tensor normalize_action(const Tensor& a) const;
  // min-max: (a + 1) / 2 * (max - min) + min, without the 1e-8 (as the reference); z-score:
  // a * (std + 1e-8) + mean, the exact inverse.
  Tensor unnormalize_action(const Tensor& a) const;
  // Throws, naming the array, unless the arrays the mode uses are present, float, of length
  // state_dim or act_dim, finite, with max >= min and max - min finite in float32 (min-max) or
  // std >= 0 and std + 1e-8 finite in float32 (z-score). A length-1 array would otherwise
  // broadcast over every dimension, a missing one fail at first use, and a range that overflows
  // make every action infinite.
  void validate(int64_t state_dim, int64_t act_dim) const;
  Normalizer to(DType dtype) const;
  std::string to_json() const;  // values printed with round-trip precision
  static Normalizer from_json(const std::string& json);
};

// The MMDiT of a policy of these sizes: observation and action tokens of width hidden_size, the
// action stream's output of width act_dim, one conditioning variable (the flow time).
MMDiTConfig mmdit_config(const PolicyConfig& c);

class BCPolicy : public nn::Module {
 public:
  BCPolicy(const PolicyConfig& config, Rng& rng);

  // nn::Module::to, then the position buffers recomputed in float64 and rounded to `dtype`: a
  // float64 policy's tables are exact, not float32's widened (models.md "Precision"). Values
  // loaded into the buffers before are replaced, so convert first, then load.
  void to(DType dtype) override;

  // Observation tokens (B, n_obs, hidden) from normalised states (B, n_obs, state_dim).
  Tensor encode_observations(const Tensor& state) const;
  // The velocity v(x_t, t) (B, horizon, act_dim) given the observation tokens, x_t (B, horizon,
  // act_dim) and t (B,).
  Tensor velocity(const Tensor& obs_tokens, const Tensor& x_t, const Tensor& t) const;
  // The same, with the time conditioning already computed (mmdit.condition({t})).
  Tensor velocity(const Tensor& obs_tokens, const Tensor& x_t, const MMDiTConditioning& time) const;
  // (n_obs + horizon)^2: observation rows see everything; action rows see every observation
  // and the actions at or before their own position.
  const Tensor& attention_mask() const { return mask_; }

  PolicyConfig config;
  nn::Linear state_encoder, action_encoder;
  Tensor state_pos_embed, action_pos_embed;  // frozen buffers
  MMDiT mmdit;

 private:
  Tensor action_tokens(const Tensor& x_t) const;  // checked, encoded, position-embedded
  Tensor mask_;
};

// The random draws of one training step, fixed by the caller (the parity cases fix them too).
struct FlowNoise {
  Tensor x0;   // (B, horizon, act_dim) standard normal
  Tensor t;    // (B,)
  Tensor eps;  // (B, horizon, act_dim), used only when config.sigma > 0
};

// mean over (B, horizon, act_dim) of (u - v)^2 * valid, u = z - x0, x_t = t z + (1 - t) x0,
// with states and actions already normalised; padded actions count in the denominator, as in
// the reference.
Tensor flow_matching_loss(const BCPolicy& policy, const Tensor& state, const Tensor& action,
                          const Tensor& action_is_pad, const FlowNoise& noise);

// The baseline: the same network regressing the actions directly (x_t = 0, t = 0), trained with
// plain MSE. With multimodal demonstrations it learns the average of the modes.
Tensor regression_loss(const BCPolicy& policy, const Tensor& state, const Tensor& action,
                       const Tensor& action_is_pad);
Tensor regress_actions(const BCPolicy& policy, const Tensor& state);

// Euler integration from noise a0 (normalised space) over t_k = k max_t / steps, max_t finite
// and > 0; observation tokens are computed once. Returns normalised actions (B, horizon, act_dim).
// With config.sigma > 0 each step's velocity is taken, as the reference's sampler takes it, at
// x_t = a + sigma * N(0, 1), fresh noise for every step drawn from `noise` (required then).
Tensor sample_actions(const BCPolicy& policy, const Tensor& state, const Tensor& a0, int64_t steps,
                      double max_t = 1.0, Rng* noise = nullptr);

// sample_actions for a policy whose weights no longer change (deployment): the time
// conditioning of every step of the schedule (timestep embedding, every adaLN modulation and
// gate) is the same for all calls and all examples, so it is computed once, here. Each call then
// runs only the token path. Keeps a reference to the policy. It keeps the conditioning and the
// packed copies of the weights it first saw: after policy.load(...) it still samples with the
// old weights, so make a new sampler (after policy.to(...) a call throws).
class EulerSampler {
 public:
  // packed: the token path's weights are packed (tensor/packed_weight.h) at this precision on
  // the first call, which pays from the second call on; bf16 halves the bytes each step
  // streams, at some accuracy (README). nullopt: the plain products, for a single call. Only
  // float32 policies are packed: a float64 one runs its plain products with f32, and refuses
  // bf16.
  EulerSampler(const BCPolicy& policy, int64_t steps, double max_t = 1.0,
               std::optional<WeightPrecision> packed = WeightPrecision::f32);
  // noise: as for sample_actions, needed when the policy's sigma > 0.
  Tensor operator()(const Tensor& state, const Tensor& a0, Rng* noise = nullptr) const;
  int64_t steps() const { return static_cast<int64_t>(schedule_.size()); }
  // Bytes of the packed weights one Euler step reads, once the first call has packed them (0
  // before, and when not packed): at batch 1 the memory traffic that bounds a call.
  size_t packed_bytes() const { return frozen_ ? frozen_->bytes() : 0; }

 private:
  const BCPolicy& policy_;
  DType dtype_;                              // the policy's when the schedule was computed
  std::vector<double> times_;                // t_0 = 0, ..., t_steps = max_t
  std::vector<MMDiTConditioning> schedule_;  // the conditioning at t_0 .. t_{steps-1}
  std::unique_ptr<FrozenWeights> frozen_;    // null when not packed
};

}  // namespace mmdit
