#pragma once

#include <cstdint>
#include <vector>

#include "train/checkpoint.h"
#include "train/dataset.h"

namespace mmdit {

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
