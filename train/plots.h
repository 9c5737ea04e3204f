// Plots for the demo, written as standalone SVG (no dependencies; any browser shows them, and
// rsvg-convert turns them into PNG). Every file is written to a temporary name and renamed,
// so a crash never leaves a half-written plot under the real name.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "train/demo_task.h"

namespace mmdit {

// Training loss against step, log-scale y. Points that are not finite and positive cannot be
// placed on a log axis: they are left out and the plot says how many. One point, or none,
// still gives a valid plot. Throws mmdit::Error if the file cannot be written.
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
