// Plots for the demo, written as standalone SVG (no dependencies; any browser shows them, and
// rsvg-convert turns them into PNG). Every file is written to a temporary name and renamed,
// so a crash never leaves a half-written plot under the real name.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "train/demo_task.h"

namespace mmdit {

// A run's losses for the loss plot, in memory that does not grow with the run: a day of
// training at 50 steps/s is 4 million steps. Up to `capacity` buckets of one step each are kept
// as they come; when they are full, neighbouring pairs merge into one, and new buckets hold
// twice as many steps as before. A bucket keeps what the plot draws of its steps: the lowest and
// the highest loss (with their steps) and the mean of log10 loss. The last and the lowest loss of
// the whole run are kept exactly. Losses that are not finite and positive cannot be placed on a log
// axis: they are counted, not kept.
class LossHistory {
 public:
  struct Bucket {
    int64_t first_step = 0, last_step = 0;
    int64_t low_step = 0, high_step = 0;
    double low = 0, high = 0;  // log10 loss
    double log_sum = 0;        // of log10 loss
    int64_t count = 0;
  };

  explicit LossHistory(size_t capacity = 8192);
  // Steps must increase from one call to the next; throws mmdit::Error otherwise.
  void add(int64_t step, double loss);

  const std::vector<Bucket>& buckets() const { return buckets_; }
  int64_t points() const;  // the finite, positive losses added
  int64_t omitted() const { return omitted_; }
  bool has_step() const { return last_step_.has_value(); }
  int64_t last_step() const { return *last_step_; }  // of any loss added; needs has_step()
  // The last and the lowest finite, positive loss, with their steps; needs points() > 0.
  std::pair<int64_t, double> last() const { return last_; }
  std::pair<int64_t, double> lowest() const { return lowest_; }

 private:
  void halve();

  size_t capacity_;
  int64_t steps_per_bucket_ = 1;
  std::vector<Bucket> buckets_;
  int64_t omitted_ = 0;
  std::optional<int64_t> last_step_;
  std::pair<int64_t, double> last_{0, 0}, lowest_{0, 0};
};

// Training loss against step, log-scale y, with a moving average over the raw curve. Losses
// that are not finite and positive are left out and the plot says how many. One point, or none,
// still gives a valid plot. Throws mmdit::Error if the file cannot be written.
void write_loss_curve_svg(const std::string& path, const LossHistory& history,
                          const std::string& title);
// The same for (step, loss) pairs in any order, each step once.
void write_loss_curve_svg(const std::string& path,
                          const std::vector<std::pair<int64_t, double>>& step_loss,
                          const std::string& title);

// The task from above: obstacle, goal region, start region, the expert demonstrations as thin
// grey paths (pass an empty Demos to leave them out) and the rollouts coloured by success[i]
// (green success, red failure), e.g. EvalResult::trajectories and EvalResult::succeeded.
// Throws mmdit::Error if rollouts and success differ in length or the file cannot be written.
void write_rollouts_svg(const std::string& path, const DemoTaskConfig& task,
                        const DemoTask::Demos& demos,
                        const std::vector<std::vector<std::array<float, 2>>>& rollouts,
                        const std::vector<bool>& success, const std::string& title);

}  // namespace mmdit
