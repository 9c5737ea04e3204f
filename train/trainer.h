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

#include "train/checkpoint.h"
#include "train/config.h"
#include "train/dataset.h"
#include "train/evaluate.h"
#include "train/optim.h"
#include "train/policy.h"
#include "train/training_state.h"

namespace mmdit {

struct StepStats {
  double loss = 0;
  double grad_norm = 0;  // global norm of the gradients, before clipping
  double lr = 0;         // the learning rate this step used: the schedule at step() before it
};

Normalizer make_normalizer(const Episodes& data, const std::string& mode);

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
  // The policy, optimiser and EMA, whose tensors the checkpoint holds (its random state and the
  // data's position are in its metadata).
  TrainingState training_state() const;

  TrainConfig config_;
  Normalizer normalizer_;
  std::unique_ptr<BCPolicy> policy_;
  std::unique_ptr<AdamW> optimizer_;
  std::unique_ptr<EMA> ema_;
  std::unique_ptr<WindowSampler> sampler_;  // null for a trainer made without data
  std::string data_fingerprint_;            // of the data; empty without
  Rng rng_;
  std::vector<std::string> obs_keys_;
};

}  // namespace mmdit
