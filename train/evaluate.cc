#include "train/evaluate.h"

#include <cmath>
#include <limits>

namespace mmdit {

ActionError action_error(const LoadedPolicy& policy, const Episodes& data, int64_t max_windows,
                         int64_t batch_size, uint64_t seed, Rng& rng) {
  const PolicyConfig& pc = policy.config.policy;
  MMDIT_CHECK(data.state_dim() == pc.state_dim && data.act_dim() == pc.act_dim,
              "action_error: the data's states and actions have ", data.state_dim(), " and ",
              data.act_dim(), " dimensions; the policy's state_dim and act_dim are ", pc.state_dim,
              " and ", pc.act_dim);
  MMDIT_CHECK(max_windows >= 0 && batch_size >= 1, "action_error: max_windows ", max_windows,
              " must be >= 0 and batch_size ", batch_size, " >= 1");
  const WindowSampler windows(data, pc.n_obs_steps, pc.horizon, seed);
  std::vector<int64_t> chosen = windows.permutation(0);
  if (max_windows > 0 && max_windows < static_cast<int64_t>(chosen.size()))
    chosen.resize(static_cast<size_t>(max_windows));
  const int64_t A = pc.act_dim, H = pc.horizon, now = pc.n_obs_steps - 1;
  std::vector<double> sum_per_dim(static_cast<size_t>(A), 0.0);
  double sum_now = 0;
  int64_t steps = 0, windows_now = 0;
  for (size_t begin = 0; begin < chosen.size(); begin += static_cast<size_t>(batch_size)) {
    const size_t end = std::min(chosen.size(), begin + static_cast<size_t>(batch_size));
    const Batch batch = windows.get({chosen.begin() + begin, chosen.begin() + end});
    const std::vector<float> acted = policy.act(batch.state, rng).to_vector<float>();
    const std::vector<float> shown = batch.action.to_vector<float>();
    const std::vector<bool> pad = batch.action_is_pad.to_vector<bool>();
    for (size_t w = 0; w < end - begin; ++w)
      for (int64_t t = 0; t < H; ++t) {
        if (pad[w * H + t]) continue;
        ++steps;
        double squares = 0;
        for (int64_t j = 0; j < A; ++j) {
          const size_t i = (w * H + t) * A + j;
          const double d = static_cast<double>(acted[i]) - shown[i];
          sum_per_dim[j] += d * d;
          squares += d * d;
        }
        if (t == now) {
          sum_now += squares / A;
          ++windows_now;
        }
      }
  }
  ActionError e;
  e.windows = static_cast<int64_t>(chosen.size());
  for (const double s : sum_per_dim) {
    e.mse_per_dim.push_back(s / std::max<int64_t>(steps, 1));
    e.mse += s / std::max<int64_t>(steps * A, 1);
  }
  // NaN when there was no window to act on.
  e.mse_now = windows_now > 0 ? sum_now / windows_now : std::numeric_limits<double>::quiet_NaN();
  return e;
}

}  // namespace mmdit
