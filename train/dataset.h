// Demonstration datasets for imitation learning: loading LeRobot-style .npz arrays and
// robomimic-style HDF5 files into one in-memory form, normalization statistics, and the
// windowed sampler that turns episodes into training samples the way LeRobot's diffusion policy
// does.
//
// Files are untrusted input: every problem raises mmdit::Error whose message starts with the
// file name and names the key, demo or episode involved.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "tensor/named_tensors.h"

namespace mmdit {

// Windows longer than this are certainly a configuration mistake, and the bound keeps the index
// arithmetic far from overflow. (A policy's windows are bounded more tightly, by
// PolicyConfig::kMaxTokens.)
constexpr int64_t kMaxWindow = int64_t{1} << 20;
// A batch past this is a typo rather than a plan (the model's activations would not fit); without
// the bound it ended in a bare std::bad_alloc when the sampler reserved it.
constexpr int64_t kMaxBatchSize = int64_t{1} << 20;

// Demonstrations: the episodes concatenated along time.
struct Episodes {
  Tensor states;                        // (N, state_dim) float32
  Tensor actions;                       // (N, act_dim) float32
  std::vector<int64_t> episode_starts;  // E+1 offsets: episode e is [starts[e], starts[e+1])

  int64_t num_episodes() const;
  int64_t num_frames() const;  // N
  int64_t state_dim() const;
  int64_t act_dim() const;
  int64_t episode_length(int64_t e) const;
};

// 16 hex digits of a 64-bit FNV-1a hash of the states, actions (as float32) and episode
// boundaries: a checkpoint records it, so that a run is not resumed on other data of the same
// size.
std::string data_fingerprint(const Episodes& episodes);

// Checks the invariants above (ranks, dtypes, matching N, N >= 1, dims >= 1, starts from 0 to N
// and strictly increasing, values finite); `what` starts the error message.
void validate_episodes(const Episodes& episodes, const std::string& what);

// LeRobot-style arrays: `observation.state` (N, state_dim), `action` (N, act_dim) and
// `episode_index` (N,), integer-valued (any numeric dtype). Each episode must be one contiguous
// run of frames; the index values need not start at 0 or be increasing, but a value may not
// reappear after another episode. States and actions are converted to float32 and must be
// finite. Other keys are ignored (load_lerobot_npz does not read them).
Episodes load_lerobot_npz(const std::string& path);
Episodes load_lerobot_arrays(const NamedTensors& arrays, const std::string& what);
// Writes observation.state and action (float32) and episode_index (int64, episodes numbered
// from 0); round-trips with load_lerobot_npz.
void save_lerobot_npz(const std::string& path, const Episodes& episodes);

// robomimic-style HDF5: groups data/demo_<i>, taken in numeric order of i (demo_2 before
// demo_10; two of one number, demo_7 and demo_007, are refused; links in `data` not named
// demo_<digits> are ignored, as is robomimic's `mask` group), each with obs/<key> datasets of
// shape (T, d) (or (T,), taken as d = 1) and an `actions` dataset (T, act_dim); any
// floating-point or integer type, read as float32. Virtual datasets are refused. With several
// obs_keys the observations are concatenated along the feature axis in the given order.
Episodes load_robomimic_hdf5(const std::string& path, const std::vector<std::string>& obs_keys);

// By extension (case-insensitive): .npz -> LeRobot (obs_keys unused), .hdf5 / .h5 -> robomimic.
Episodes load_episodes(const std::string& path,
                       const std::vector<std::string>& obs_keys = {"state"});

// Per-dimension statistics of `data` (N, dim), N >= 1, each (dim,) float32, accumulated in
// float64. std is the population standard deviation (ddof = 0, as np.std and LeRobot use).
struct NormStats {
  Tensor min, max, mean, std;
};
NormStats compute_stats(const Tensor& data);

// One training sample per time step t of every episode (LeRobot's diffusion policy leaves out the
// last drop_n_last_frames = 7 of each), as LeRobot's delta timestamps give it:
// observation indices t-n_obs+1 .. t, action indices t-n_obs+1 .. t-n_obs+horizon (LeRobot
// diffusion policy: observation_delta_indices = range(1-n_obs, 1), action_delta_indices =
// range(1-n_obs, 1-n_obs+horizon)). Indices outside the episode are clamped to its first/last
// frame (the frame is repeated); action_is_pad is true for clamped action indices.
struct Batch {
  Tensor state;          // (B, n_obs, state_dim) float32
  Tensor action;         // (B, horizon, act_dim) float32
  Tensor action_is_pad;  // (B, horizon) bool
};

class WindowSampler {
 public:
  // Copies what it needs from `episodes` (validated); the sampler does not refer to it later.
  WindowSampler(const Episodes& episodes, int64_t n_obs_steps, int64_t horizon, uint64_t seed);

  int64_t num_frames() const { return num_frames_; }
  int64_t num_episodes() const { return num_episodes_; }
  int64_t n_obs_steps() const { return n_obs_; }
  int64_t horizon() const { return horizon_; }

  // The samples at `sample_indices` (each in [0, N)), in that order. Deterministic.
  Batch get(const std::vector<int64_t>& sample_indices) const;

  // Seeded shuffled minibatches without replacement: each epoch is a permutation of all samples
  // that depends only on (seed, epoch), and consecutive calls walk through it. A batch never
  // straddles two epochs: when fewer than batch_size samples remain, they are dropped and the
  // next epoch starts. When the dataset is smaller than batch_size, the batch is filled from
  // whole fresh epochs (permutation after permutation, the last one cut short) and the next call
  // starts a fresh epoch again.
  Batch next(int64_t batch_size);
  // The sample indices next(batch_size) would use, advancing the position the same way.
  std::vector<int64_t> next_indices(int64_t batch_size);
  // The permutation of epoch `epoch`.
  std::vector<int64_t> permutation(int64_t epoch) const;

  // The whole sampler state, so a resumed run continues exactly: (epoch, position in epoch).
  std::pair<int64_t, int64_t> position() const { return {epoch_, offset_}; }
  void set_position(int64_t epoch, int64_t offset);

 private:
  const std::vector<int64_t>& cached_permutation(int64_t epoch);

  int64_t n_obs_, horizon_;
  uint64_t seed_;
  int64_t num_frames_ = 0, num_episodes_ = 0, state_dim_ = 0, act_dim_ = 0;
  std::vector<float> states_, actions_;           // row-major (N, dim)
  std::vector<int64_t> frame_begin_, frame_end_;  // per frame: its episode's [begin, end)
  int64_t epoch_ = 0, offset_ = 0;
  int64_t cached_epoch_ = -1;
  std::vector<int64_t> cached_perm_;
};

}  // namespace mmdit
