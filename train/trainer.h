// Training a BCPolicy by flow matching: the loop of the reference agent, as a few calls a user
// could make themselves (see examples/train_step.cc):
//
//   auto [loss, grads] = value_and_grad(loss_fn)(policy, batch);
//   optimizer.update(params, grads, lr);
//   ema.update(params);
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "train/dataset.h"
#include "train/optim.h"
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

struct StepStats {
  double loss = 0;
  double grad_norm = 0;  // global norm of the gradients, before clipping
  double lr = 0;         // the learning rate this step used: the schedule at step() before it
};

Normalizer make_normalizer(const Episodes& data, const std::string& mode);

struct LoadedPolicy;

class Trainer {
 public:
  Trainer(const TrainConfig& config, const Episodes& data);
  // A trainer without data, normalising with `normalizer` (see set_normalizer): for weights
  // trained elsewhere, loaded into policy() and saved as a checkpoint that Trainer::resume
  // continues on any data of the policy's sizes. train_step throws.
  Trainer(const TrainConfig& config, const Normalizer& normalizer);
  // Continues a run from its checkpoint: parameters, EMA, optimiser moments and step, random
  // state and data order are restored, so the losses continue exactly as without the stop.
  // `steps` raises the run's total to train further (with cosine decay, the schedule then
  // stretches over the new total from the current step on).
  static std::unique_ptr<Trainer> resume(const std::string& checkpoint, const Episodes& data,
                                         std::optional<int64_t> steps = std::nullopt);

  // Throws, naming the step, when the loss or the gradients are not finite, before anything
  // changes: parameters, EMA, moments, step, random state and data order stay as they were.
  StepStats train_step();
  int64_t step() const { return optimizer_->step(); }
  // One safetensors file, written atomically: params, EMA, Adam moments, config, normalisation,
  // random state, and the observation keys if set. A state holding a non-finite number is
  // refused, naming the tensor, and `path` is left as it was.
  void save_checkpoint(const std::string& path) const;
  // Throws what save_checkpoint would, without writing: `what` (a path, say) starts the message.
  // For a caller about to replace or remove files, so that it refuses first.
  void check_saveable(const std::string& what) const;

  // The HDF5 observation keys the data was read with, recorded in the checkpoint (empty: none
  // recorded, as for an .npz). A resumed trainer has its checkpoint's.
  void set_obs_keys(std::vector<std::string> keys) { obs_keys_ = std::move(keys); }
  const std::vector<std::string>& obs_keys() const { return obs_keys_; }

  const TrainConfig& config() const { return config_; }
  BCPolicy& policy() { return *policy_; }
  // The EMA starts again from the parameters as they are now: after replacing them with weights
  // trained elsewhere (load_equinox(trainer.policy(), path)), before the first step.
  void restart_ema() { ema_->set(policy_->named_parameters()); }
  const Normalizer& normalizer() const { return normalizer_; }
  // Statistics other than the data's, before the first step: those a policy trained elsewhere
  // was normalised with (the reference agent takes them from its config). Throws, changing
  // nothing, after the first step, for a mode other than the config's normalization, or for
  // statistics Normalizer::validate refuses.
  void set_normalizer(const Normalizer& normalizer);
  // The policy as load_policy would read it from a checkpoint saved now: a copy of the EMA (or,
  // with use_ema false, of the parameters) and the buffers, frozen for acting.
  LoadedPolicy frozen_policy(bool use_ema = true) const;
  const EMA& ema() const { return *ema_; }

 private:
  void build_policy();  // the policy of config_ at its initialisation, its optimiser and EMA
  // x0, t (and eps with sigma > 0) for a flow-matching batch, from the trainer's random state.
  FlowNoise draw_noise(const Shape& action_shape);
  // The step's loss, a function of the policy alone for value_and_grad.
  Tensor loss(const BCPolicy& policy, const Batch& batch, const FlowNoise& noise) const;
  NamedTensors checkpoint_tensors() const;  // named as the checkpoint file names them

  TrainConfig config_;
  Normalizer normalizer_;
  std::unique_ptr<BCPolicy> policy_;
  std::unique_ptr<AdamW> optimizer_;
  std::unique_ptr<EMA> ema_;
  std::unique_ptr<WindowSampler> sampler_;  // null for a trainer made without data
  Rng rng_;
  std::vector<std::string> obs_keys_;
};

// A trained policy loaded for inference, with the EMA weights by default, and the position tables
// the checkpoint holds.
struct LoadedPolicy {
  TrainConfig config;
  Normalizer normalizer;
  std::unique_ptr<BCPolicy> policy;
  int64_t step = 0;
  // The HDF5 observation keys of the data it was trained on; empty when not recorded (trained on
  // an .npz, or a checkpoint from before they were recorded).
  std::vector<std::string> obs_keys;
  // The flow objective's sampler: the checkpoint's steps, weights frozen at `weights` precision.
  std::unique_ptr<EulerSampler> sampler;
  // Raw observations (B, n_obs, state_dim), oldest first -> raw actions (B, horizon, act_dim).
  // The chunk starts at the oldest observation, as the training windows do: action
  // n_obs_steps - 1 is the one for the newest observation, the first to execute. Several threads
  // may call it at once, each with an Rng of its own.
  Tensor act(const Tensor& observations, Rng& rng) const;
};
// A checkpoint's metadata, read and checked without its tensors (a large policy's file need not
// be read to learn how to load its data).
struct CheckpointInfo {
  TrainConfig config;
  int64_t step = 0;
  std::vector<std::string> obs_keys;  // as LoadedPolicy::obs_keys
};
CheckpointInfo read_checkpoint_info(const std::string& checkpoint);

// `weights` other than f32 are for the flow objective's sampler: a policy of objective "mse"
// (which regresses its actions in float32) with bf16 weights is refused.
LoadedPolicy load_policy(const std::string& checkpoint, bool use_ema = true,
                         WeightPrecision weights = WeightPrecision::f32);

// Open-loop evaluation on demonstrations, for tasks without a simulator: the policy acts on the
// observations of training windows (LeRobot's, as the trainer samples them) and its action chunk
// is compared with the demonstrated one, in the data's units, over the steps not padded.
struct ActionError {
  int64_t windows = 0;
  double mse = 0;                   // mean over windows, unpadded steps and dimensions
  std::vector<double> mse_per_dim;  // (act_dim): the same, per action dimension
  // The action for the newest observation (index n_obs_steps - 1) alone; NaN when the chunks
  // do not reach it (horizon < n_obs_steps).
  double mse_now = 0;
};
// `max_windows` of the data's windows (one per frame; 0: all), a seeded choice, acted on in
// batches of `batch_size`, with the flow's noise drawn from `rng`.
ActionError action_error(const LoadedPolicy& policy, const Episodes& data, int64_t max_windows,
                         int64_t batch_size, uint64_t seed, Rng& rng);

}  // namespace mmdit
