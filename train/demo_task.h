// A built-in 2-D control task whose expert is deliberately multimodal, so that the project's
// demo can show what flow matching buys over plain regression.
//
// A point agent starts below a disc obstacle and must reach a goal above it. The expert passes
// the obstacle on the LEFT or on the RIGHT, chosen by a fair coin per episode, independently of
// the start. Near the start both modes are equally likely for the same observation, and the
// mean of their actions points straight at the obstacle: a policy that regresses the mean
// (MSE) drives into it, a policy that samples one mode (flow matching) goes around.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "tensor/tensor.h"

namespace mmdit {

struct DemoTaskConfig {
  std::array<double, 2> start = {0.0, -1.0};  // centre of the start region
  double start_jitter = 0.1;                  // starts are uniform in start ± jitter, per axis
  std::array<double, 2> goal = {0.0, 1.0};
  double success_radius = 0.1;  // success once this close to the goal
  std::array<double, 2> obstacle_center = {0.0, -0.3};
  double obstacle_radius = 0.45;
  double max_speed = 0.06;  // per step; longer actions are scaled down to it
  int64_t max_steps = 80;   // the expert needs ~40
  // The expert follows x = side * detour * sin(pi * u), u the progress from start to goal, so
  // it passes the obstacle with detour - obstacle_radius of clearance.
  double expert_detour = 0.9;
  double expert_lookahead = 0.15;  // how far ahead along the path it steers to
  double expert_noise = 0.1;       // action noise std, as a fraction of max_speed
};

class DemoTask {
 public:
  // Checks the geometry: the start region and both expert paths must clear the obstacle.
  explicit DemoTask(DemoTaskConfig cfg = {});

  const DemoTaskConfig& config() const { return cfg_; }
  int64_t state_dim() const { return 2; }  // the position (x, y); the goal never moves
  int64_t act_dim() const { return 2; }    // the displacement (dx, dy) of one step

  enum class Outcome { running, success, collision, timeout };

  // One step of the dynamics: the action is scaled down to max_speed, then added. Outcome is
  // collision if the step's segment touches the obstacle, else success or running (the step
  // count, hence timeout, is the caller's business).
  Outcome step(std::array<double, 2>& pos, std::array<double, 2> action) const;

  // The expert's noise-free action at `pos` when passing on `side` (-1 left, +1 right).
  std::array<double, 2> expert_action(std::array<double, 2> pos, int side) const;

  // num_episodes expert episodes, concatenated: row t of `states` is the position before
  // action t; episode i is rows [episode_starts[i], episode_starts[i + 1]). The state at
  // which the goal is reached has no action and is not recorded. Episode i depends only on
  // (seed, i), so a longer draw extends a shorter one.
  struct Demos {
    Tensor states;                        // (total_steps, state_dim) float32
    Tensor actions;                       // (total_steps, 2) float32
    std::vector<int64_t> episode_starts;  // num_episodes + 1 entries, the last is total_steps
    std::vector<int> sides;               // -1 left, +1 right
  };
  Demos generate_demos(int64_t num_episodes, uint64_t seed) const;

  // Receives the last n_obs_steps states of every episode, oldest first, (M, n_obs, state_dim)
  // float32, and returns an action chunk (M, horizon, 2), float32 or float64.
  using Policy = std::function<Tensor(const Tensor& obs_history)>;
  struct EvalResult {
    int64_t episodes = 0, successes = 0, collisions = 0, timeouts = 0;
    double success_rate = 0;  // successes / episodes
    // successes / episodes in percent, whole where that is exact, else with as many decimals as
    // it takes not to show 0% or 100%: 995 of 1000 is "99.5%", 1999 of 2000 "99.95%".
    std::string success_percent() const;
    // Per episode: every position visited, the start included, and how it ended.
    std::vector<std::vector<std::array<float, 2>>> trajectories;
    std::vector<Outcome> outcomes;
    std::vector<bool> succeeded;  // outcomes[i] == success, the form write_rollouts_svg takes
  };
  // Runs num_episodes closed-loop episodes together as one batch. At the start the first state
  // fills the whole history. From each chunk the task executes actions
  // [n_obs_steps - 1, n_obs_steps - 1 + n_action_steps): training windows start their actions
  // at the oldest observation (LeRobot-style), so that index is "now". Finished episodes stay
  // in the batch with their state frozen and their actions ignored. Start positions come from
  // `seed` through a different stream than generate_demos, so one seed for both still
  // evaluates on unseen starts. Throws mmdit::Error on a wrong output shape or a non-finite
  // action.
  EvalResult evaluate(const Policy& policy, int64_t num_episodes, int64_t n_obs_steps,
                      int64_t n_action_steps, uint64_t seed) const;

 private:
  DemoTaskConfig cfg_;
};

const char* outcome_name(DemoTask::Outcome outcome);

}  // namespace mmdit
