// TrainConfig: every setting of a training run, as the JSON of --config and of a run's
// config.json.
#pragma once

#include <cstdint>
#include <string>

#include "train/policy.h"

namespace mmdit {

// The defaults are the reference agent's (AgentConfig: lr 1e-4, weight decay 0.01, EMA 0.999,
// constant lr, no clipping, 10 sampling steps), as PolicyConfig's sizes are.
struct TrainConfig {
  PolicyConfig policy;
  int64_t steps = 2000;
  int64_t batch_size = 64;
  double lr = 1e-4;
  double weight_decay = 0.01;
  double b1 = 0.9, b2 = 0.999, eps = 1e-8;
  double ema_decay = 0.999;
  double grad_clip = 0;  // global-norm clipping; 0 = off
  int64_t warmup_steps = 0;
  bool cosine_decay = false;                  // cosine from lr to 0 over `steps` after warm-up
  std::string normalization = "min_max";      // or "z_score"
  std::string timestep_sampling = "uniform";  // t ~ U[0, max_t); or "logit_normal"
  double max_t = 1.0;
  std::string objective = "flow";  // or "mse": plain regression, the baseline that averages modes
  int64_t sample_steps = 10;       // Euler steps when acting
  uint64_t seed = 0;

  std::string to_json() const;
  // Keys not given keep their defaults; an unknown key is an error naming it.
  static TrainConfig from_json(const std::string& json, const TrainConfig& defaults);
  static TrainConfig from_json(const std::string& json);
  void validate() const;
};

}  // namespace mmdit
