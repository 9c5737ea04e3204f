#include "train/trainer.h"

#include <cmath>

#include "autodiff/value_and_grad.h"

namespace mmdit {

Normalizer make_normalizer(const Episodes& data, const std::string& mode) {
  const NormStats s = compute_stats(data.states), a = compute_stats(data.actions);
  Normalizer n;
  n.mode = mode == "z_score" ? Normalizer::Mode::z_score : Normalizer::Mode::min_max;
  n.state_min = s.min, n.state_max = s.max, n.state_mean = s.mean, n.state_std = s.std;
  n.action_min = a.min, n.action_max = a.max, n.action_mean = a.mean, n.action_std = a.std;
  return n;
}

Trainer::Trainer(const TrainConfig& config, const Episodes& data)
    : config_(config), rng_(config.seed ^ 0x9E3779B97F4A7C15ull) {
  config_.validate();
  MMDIT_CHECK(data.state_dim() == config_.policy.state_dim, "train: the data's states have ",
              data.state_dim(), " dimensions but the policy's state_dim is ",
              config_.policy.state_dim);
  MMDIT_CHECK(data.act_dim() == config_.policy.act_dim, "train: the data's actions have ",
              data.act_dim(), " dimensions but the policy's act_dim is ", config_.policy.act_dim);
  normalizer_ = make_normalizer(data, config_.normalization);
  // Statistics a checkpoint could not be loaded with (a range that overflows float32) are
  // refused now, before any training or any file written.
  try {
    normalizer_.validate(config_.policy.state_dim, config_.policy.act_dim);
  } catch (const Error& e) {
    fail("train: the data's ", config_.normalization,
         " statistics cannot normalise it: ", e.what());
  }
  build_policy();
  sampler_ = std::make_unique<WindowSampler>(data, config_.policy.n_obs_steps,
                                             config_.policy.horizon, config_.seed);
  data_fingerprint_ = data_fingerprint(data);
}

Trainer::Trainer(const TrainConfig& config, const Normalizer& normalizer)
    : config_(config), rng_(config.seed ^ 0x9E3779B97F4A7C15ull) {
  config_.validate();
  build_policy();
  set_normalizer(normalizer);
}

void Trainer::build_policy() {
  Rng init(config_.seed);
  policy_ = std::make_unique<BCPolicy>(config_.policy, init);
  const NamedTensors params = policy_->named_parameters();
  optimizer_ = std::make_unique<AdamW>(
      params, AdamWConfig{config_.lr, config_.b1, config_.b2, config_.eps, config_.weight_decay});
  ema_ = std::make_unique<EMA>(params, config_.ema_decay);
}

FlowNoise Trainer::draw_noise(const Shape& action_shape) {
  const int64_t b = action_shape[0];
  FlowNoise noise;
  noise.x0 = rng_.normal(action_shape);
  if (config_.timestep_sampling == "logit_normal")
    noise.t = raw::mul_scalar(raw::unary(raw::UnaryOp::sigmoid, rng_.normal({b})), config_.max_t);
  else
    noise.t = rng_.uniform({b}, DType::f32, 0, config_.max_t);
  if (config_.policy.sigma > 0) noise.eps = rng_.normal(action_shape);
  return noise;
}

Tensor Trainer::loss(const BCPolicy& policy, const Batch& batch, const FlowNoise& noise) const {
  const Tensor state = normalizer_.normalize_state(batch.state);
  const Tensor action = normalizer_.normalize_action(batch.action);
  if (config_.objective == "mse")
    return regression_loss(policy, state, action, batch.action_is_pad);
  return flow_matching_loss(policy, state, action, batch.action_is_pad, noise);
}

StepStats Trainer::train_step() {
  // A step that throws leaves the trainer as it was, the random state and data order included:
  // a checkpoint saved after the throw is the one of the step before.
  MMDIT_CHECK(sampler_,
              "Trainer::train_step: this trainer was made without data; save its "
              "checkpoint and continue it with Trainer::resume(checkpoint, data)");
  const uint64_t rng_seed = rng_.seed(), rng_counter = rng_.counter();
  // Not a structured binding: Clang before 16 cannot capture one in the lambda.
  const std::pair<int64_t, int64_t> position = sampler_->position();
  const auto restore = [&] {
    rng_.set_state(rng_seed, rng_counter);
    sampler_->set_position(position.first, position.second);
  };
  try {
    const Batch batch = sampler_->next(config_.batch_size);
    const FlowNoise noise =
        config_.objective == "flow" ? draw_noise(batch.action.shape()) : FlowNoise();
    auto loss_fn = [&](BCPolicy& policy) { return loss(policy, batch, noise); };
    auto [loss_value, grads] = value_and_grad(loss_fn)(*policy_);
    StepStats stats;
    stats.loss = loss_value.item();
    MMDIT_CHECK(std::isfinite(stats.loss), "training step ", step() + 1, ": the loss is ",
                stats.loss, "; stopped before updating the parameters");
    stats.lr = warmup_cosine_lr(step(), config_.lr, config_.warmup_steps,
                                config_.cosine_decay ? config_.steps : 0);
    const NamedTensors params = policy_->named_parameters();
    // Clipping as optax.clip_by_global_norm, folded into the optimiser's pass over the gradients,
    // with the norm from the pass that checks them: a non-finite gradient is refused there,
    // before anything changes.
    try {
      stats.grad_norm =
          optimizer_->update_clipped(params, grads, stats.lr, config_.grad_clip, ema_.get());
    } catch (const OutOfMemory&) {
      throw;  // named with the batch size below
    } catch (const Error& e) {
      fail("training step ", step() + 1, ": ", e.what());
    }
    return stats;
  } catch (const OutOfMemory& e) {
    restore();
    throw OutOfMemory(str_cat("training step ", step() + 1, " at batch_size ", config_.batch_size,
                              ": ", e.what()));
  } catch (...) {
    restore();
    throw;
  }
}

void Trainer::set_normalizer(const Normalizer& normalizer) {
  MMDIT_CHECK(step() == 0, "Trainer::set_normalizer: the run is at step ", step(),
              "; its statistics may change only before the first step");
  const char* mode = normalizer.mode == Normalizer::Mode::z_score ? "z_score" : "min_max";
  MMDIT_CHECK(config_.normalization == mode, "Trainer::set_normalizer: the statistics are for ",
              mode, " normalization, the config's is ", config_.normalization);
  // In float32, as the data's own statistics are kept and checkpoints hold them.
  const Normalizer f32 = normalizer.to(DType::f32);
  f32.validate(config_.policy.state_dim, config_.policy.act_dim);
  normalizer_ = f32;
}

}  // namespace mmdit
