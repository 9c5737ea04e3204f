// A run's checkpoint read back: its metadata alone (read_checkpoint_info), or the policy for
// acting (load_policy). Trainer::save_checkpoint and Trainer::resume write and continue one; all
// three are in checkpoint.cc, with the file's format.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "tensor/safetensors.h"
#include "train/config.h"
#include "train/policy.h"

namespace mmdit {

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
  // The flow objective's sampler: config.sample_steps (the checkpoint's, or load_policy's
  // sample_steps), weights frozen at `weights` precision.
  std::unique_ptr<EulerSampler> sampler;
  // Raw observations (B, n_obs, state_dim), oldest first -> raw actions (B, horizon, act_dim);
  // one example's (n_obs, state_dim), as the reference's policy takes it, -> (horizon, act_dim).
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
  // The data it was trained on, as recorded: its frames and episodes (0 when not recorded: a run
  // without data, or a checkpoint from before they were kept) and data_fingerprint (empty when
  // not recorded).
  int64_t data_frames = 0, data_episodes = 0;
  std::string data_fingerprint;
  // For a file of export_policy, what it holds ("EMA", "parameters in bfloat16"); empty for a
  // run's checkpoint.
  std::string exported;
  bool holds_ema() const { return !exported.starts_with("parameters"); }
};
CheckpointInfo read_checkpoint_info(const std::string& checkpoint);
// Throws unless `info` is of a checkpoint a run can continue from (not an exported policy).
void check_resumable(const CheckpointInfo& info, const std::string& checkpoint);

// `weights` other than f32 and `sample_steps` (the Euler steps of the flow's sampler; 0: the
// config's, which training's evaluations used) are for the flow objective's sampler: a policy of
// objective "mse" (which regresses its actions in one pass, in float32) refuses both.
LoadedPolicy load_policy(const std::string& checkpoint, bool use_ema = true,
                         WeightPrecision weights = WeightPrecision::f32, int64_t sample_steps = 0);

// A checkpoint's policy alone, for a robot: the EMA's weights (use_ema false: the parameters)
// and the position tables, with the config, normalisation, step and observation keys, written
// atomically to `out`. Its floats are stored as they are or, with StoredFloats::bf16, as
// bfloat16: an eighth of a float32 checkpoint's bytes (one set of weights of its four, in half
// the bytes). load_policy, sample, eval and info read it; Trainer::resume refuses it (it has no
// optimiser state), and so does exporting it again: export from its checkpoint.
void export_policy(const std::string& checkpoint, const std::string& out, bool use_ema = true,
                   StoredFloats floats = StoredFloats::as_is);

}  // namespace mmdit
