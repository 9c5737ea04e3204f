#include "train/demo_task.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "tensor/random.h"
#include "train/dataset.h"

namespace mmdit {
namespace {

using Vec2 = std::array<double, 2>;

Vec2 operator+(Vec2 a, Vec2 b) {
  return {a[0] + b[0], a[1] + b[1]};
}
Vec2 operator-(Vec2 a, Vec2 b) {
  return {a[0] - b[0], a[1] - b[1]};
}
Vec2 operator*(double s, Vec2 a) {
  return {s * a[0], s * a[1]};
}
double dot(Vec2 a, Vec2 b) {
  return a[0] * b[0] + a[1] * b[1];
}
double norm(Vec2 a) {
  return std::sqrt(dot(a, a));
}

// Distance from c to the segment [p, q]: a step that cuts through the rim of the obstacle
// between two outside points is still a collision.
double segment_distance(Vec2 p, Vec2 q, Vec2 c) {
  const Vec2 d = q - p;
  const double len2 = dot(d, d);
  const double t = len2 > 0 ? std::clamp(dot(c - p, d) / len2, 0.0, 1.0) : 0.0;
  return norm(p + t * d - c);
}

Vec2 clip_speed(Vec2 a, double max_speed) {
  const double n = norm(a);
  return n > max_speed ? (max_speed / n) * a : a;
}

// Point at progress u of the expert path on `side`: the start-goal segment bowed sideways by
// a half sine, so it leaves and arrives heading along the axis and is widest at the obstacle.
Vec2 expert_path(const DemoTaskConfig& c, double u, int side) {
  const Vec2 axis = c.goal - c.start;
  const double len = norm(axis);
  const Vec2 right = {axis[1] / len, -axis[0] / len};
  return c.start + u * axis + (side * c.expert_detour * std::sin(M_PI * u)) * right;
}

// Evaluation starts must not coincide with the demonstrations' when a caller uses one seed for
// both; any other Philox key gives an independent stream.
constexpr uint64_t kEvalSeedSalt = 0x9E3779B97F4A7C15ull;

}  // namespace

const char* outcome_name(DemoTask::Outcome outcome) {
  switch (outcome) {
    case DemoTask::Outcome::running:
      return "running";
    case DemoTask::Outcome::success:
      return "success";
    case DemoTask::Outcome::collision:
      return "collision";
    case DemoTask::Outcome::timeout:
      return "timeout";
  }
  return "?";
}

DemoTask::DemoTask(DemoTaskConfig cfg) : cfg_(cfg) {
  const auto& c = cfg_;
  MMDIT_CHECK(c.obstacle_radius > 0 && c.success_radius > 0 && c.max_speed > 0 && c.max_steps > 0 &&
                  c.start_jitter >= 0 && c.expert_lookahead > 0 && c.expert_noise >= 0,
              "DemoTask: obstacle_radius, success_radius, max_speed, max_steps and "
              "expert_lookahead must be > 0, start_jitter and expert_noise >= 0");
  MMDIT_CHECK(norm(c.goal - c.start) > c.success_radius,
              "DemoTask: the start is already within success_radius of the goal");
  // The nearest point of the start box to the obstacle centre.
  const Vec2 nearest = {
      std::clamp(c.obstacle_center[0], c.start[0] - c.start_jitter, c.start[0] + c.start_jitter),
      std::clamp(c.obstacle_center[1], c.start[1] - c.start_jitter, c.start[1] + c.start_jitter)};
  MMDIT_CHECK(norm(nearest - c.obstacle_center) > c.obstacle_radius,
              "DemoTask: the start region overlaps the obstacle");
  MMDIT_CHECK(norm(c.goal - c.obstacle_center) > c.obstacle_radius + c.success_radius,
              "DemoTask: the goal region overlaps the obstacle");
  double clearance = INFINITY;
  for (int side : {-1, 1})
    for (int i = 0; i <= 200; ++i)
      clearance = std::min(clearance, norm(expert_path(c, i / 200.0, side) - c.obstacle_center));
  MMDIT_CHECK(clearance > c.obstacle_radius + c.max_speed, "DemoTask: the expert paths pass ",
              clearance, " from the obstacle centre, need more than obstacle_radius + max_speed = ",
              c.obstacle_radius + c.max_speed, " (raise expert_detour)");
}

DemoTask::Outcome DemoTask::step(std::array<double, 2>& pos, std::array<double, 2> action) const {
  const Vec2 next = pos + clip_speed(action, cfg_.max_speed);
  const bool hit = segment_distance(pos, next, cfg_.obstacle_center) < cfg_.obstacle_radius;
  pos = next;
  if (hit) return Outcome::collision;
  if (norm(next - cfg_.goal) < cfg_.success_radius) return Outcome::success;
  return Outcome::running;
}

std::array<double, 2> DemoTask::expert_action(std::array<double, 2> pos, int side) const {
  MMDIT_CHECK(side == -1 || side == 1, "DemoTask::expert_action: side must be -1 or +1, got ",
              side);
  // Pure pursuit of a point a little ahead on the path: it pulls a perturbed agent back onto
  // the path instead of replaying a fixed sequence, so the noisy demos stay valid.
  const Vec2 axis = cfg_.goal - cfg_.start;
  const double len = norm(axis);
  const double u = dot(pos - cfg_.start, axis) / (len * len);
  const double target_u = std::clamp(u + cfg_.expert_lookahead / len, 0.0, 1.0);
  return clip_speed(expert_path(cfg_, target_u, side) - pos, cfg_.max_speed);
}

DemoTask::Demos DemoTask::generate_demos(int64_t num_episodes, uint64_t seed) const {
  MMDIT_CHECK(num_episodes > 0, "DemoTask::generate_demos: num_episodes must be > 0, got ",
              num_episodes);
  const auto& c = cfg_;
  // Every draw is made up front, indexed by episode, so that episode i depends only on
  // (seed, i) and not on how many steps the episodes before it took.
  Rng rng(seed);
  const auto starts = rng.uniform({num_episodes, 2}, DType::f64, -c.start_jitter, c.start_jitter)
                          .to_vector<double>();
  const auto coins = rng.uniform({num_episodes}, DType::f64).to_vector<double>();
  const auto noise =
      rng.normal({num_episodes, c.max_steps, 2}, DType::f64, 0, c.expert_noise * c.max_speed)
          .to_vector<double>();

  Demos d;
  std::vector<float> states, actions;
  d.episode_starts.push_back(0);
  for (int64_t e = 0; e < num_episodes; ++e) {
    const int side = coins[e] < 0.5 ? -1 : 1;
    Vec2 pos = c.start + Vec2{starts[2 * e], starts[2 * e + 1]};
    Outcome outcome = Outcome::running;
    int64_t t = 0;
    for (; t < c.max_steps && outcome == Outcome::running; ++t) {
      const double* n = &noise[2 * (e * c.max_steps + t)];
      // Record what is executed, so that states[t] + actions[t] == states[t + 1] exactly.
      const Vec2 a = clip_speed(expert_action(pos, side) + Vec2{n[0], n[1]}, c.max_speed);
      states.insert(states.end(), {static_cast<float>(pos[0]), static_cast<float>(pos[1])});
      actions.insert(actions.end(), {static_cast<float>(a[0]), static_cast<float>(a[1])});
      outcome = step(pos, a);
    }
    MMDIT_CHECK(outcome == Outcome::success, "DemoTask::generate_demos: the expert's episode ", e,
                " ended in ", outcome == Outcome::running ? "timeout" : outcome_name(outcome),
                " after ", t, " steps; the task configuration is too hard for it");
    d.episode_starts.push_back(static_cast<int64_t>(actions.size() / 2));
    d.sides.push_back(side);
  }
  const int64_t total = d.episode_starts.back();
  d.states = from_vector<float>(states, {total, 2});
  d.actions = from_vector<float>(actions, {total, 2});
  return d;
}

DemoTask::EvalResult DemoTask::evaluate(const Policy& policy, int64_t num_episodes,
                                        int64_t n_obs_steps, int64_t n_action_steps,
                                        uint64_t seed) const {
  MMDIT_CHECK(policy, "DemoTask::evaluate: the policy is empty");
  MMDIT_CHECK(num_episodes > 0, "DemoTask::evaluate: num_episodes must be > 0, got ", num_episodes);
  // Bounded as a policy's windows are, which keeps exec_start + n_action_steps from overflowing:
  // near INT64_MAX the sum was undefined behaviour, and a wrapped, negative one passed the shape
  // check and left the episode loop with nothing to execute, forever.
  MMDIT_CHECK(n_obs_steps >= 1 && n_obs_steps <= kMaxWindow,
              "DemoTask::evaluate: n_obs_steps must be in [1, ", kMaxWindow, "], got ",
              n_obs_steps);
  MMDIT_CHECK(n_action_steps >= 1 && n_action_steps <= kMaxWindow,
              "DemoTask::evaluate: n_action_steps must be in [1, ", kMaxWindow, "], got ",
              n_action_steps);
  const auto& c = cfg_;
  const int64_t m_count = num_episodes, exec_start = n_obs_steps - 1,
                min_horizon = exec_start + n_action_steps;

  Rng rng(seed ^ kEvalSeedSalt);
  const auto starts =
      rng.uniform({m_count, 2}, DType::f64, -c.start_jitter, c.start_jitter).to_vector<double>();
  std::vector<Vec2> pos(m_count);
  std::vector<std::vector<Vec2>> history(m_count);  // oldest first
  EvalResult r;
  r.episodes = m_count;
  r.trajectories.resize(m_count);
  r.outcomes.assign(m_count, Outcome::running);
  for (int64_t m = 0; m < m_count; ++m) {
    pos[m] = c.start + Vec2{starts[2 * m], starts[2 * m + 1]};
    history[m].assign(n_obs_steps, pos[m]);
    r.trajectories[m].push_back({static_cast<float>(pos[m][0]), static_cast<float>(pos[m][1])});
  }

  int64_t steps = 0, running = m_count;
  std::vector<float> obs(m_count * n_obs_steps * 2);
  while (running > 0 && steps < c.max_steps) {
    for (int64_t m = 0; m < m_count; ++m)
      for (int64_t k = 0; k < n_obs_steps; ++k)
        for (int64_t j = 0; j < 2; ++j)
          obs[(m * n_obs_steps + k) * 2 + j] = static_cast<float>(history[m][k][j]);
    const Tensor out = policy(from_vector<float>(obs, {m_count, n_obs_steps, 2}));
    MMDIT_CHECK(out.defined(), "DemoTask::evaluate: the policy returned an undefined tensor");
    MMDIT_CHECK(
        out.dim() == 3 && out.size(0) == m_count && out.size(1) >= min_horizon && out.size(2) == 2,
        "DemoTask::evaluate: the policy returned shape ", shape_str(out.shape()), ", expected (",
        m_count, ",horizon,2) with horizon >= ", min_horizon,
        " (n_obs_steps - 1 + n_action_steps)");
    MMDIT_CHECK(is_floating(out.dtype()), "DemoTask::evaluate: the policy returned dtype ",
                dtype_name(out.dtype()), ", expected float32 or float64");
    const auto acts = out.to_vector<double>();
    const int64_t horizon = out.size(1);
    for (int64_t k = exec_start; k < min_horizon && running > 0 && steps < c.max_steps; ++k) {
      for (int64_t m = 0; m < m_count; ++m) {
        if (r.outcomes[m] != Outcome::running) continue;
        const double* a = &acts[(m * horizon + k) * 2];
        MMDIT_CHECK(std::isfinite(a[0]) && std::isfinite(a[1]),
                    "DemoTask::evaluate: the policy returned a non-finite action for episode ", m,
                    " at step ", steps);
        r.outcomes[m] = step(pos[m], {a[0], a[1]});
        r.trajectories[m].push_back({static_cast<float>(pos[m][0]), static_cast<float>(pos[m][1])});
        history[m].erase(history[m].begin());
        history[m].push_back(pos[m]);
        if (r.outcomes[m] != Outcome::running) --running;
      }
      ++steps;
    }
  }

  for (auto& o : r.outcomes) {
    if (o == Outcome::running) o = Outcome::timeout;
    r.successes += o == Outcome::success;
    r.collisions += o == Outcome::collision;
    r.timeouts += o == Outcome::timeout;
    r.succeeded.push_back(o == Outcome::success);
  }
  r.success_rate = static_cast<double>(r.successes) / static_cast<double>(r.episodes);
  return r;
}

std::string DemoTask::EvalResult::success_percent() const {
  MMDIT_CHECK(episodes > 0 && successes >= 0 && successes <= episodes,
              "EvalResult::success_percent: ", successes, " successes of ", episodes, " episodes");
  // Decided in integers: 100 * (7 / 100.0) is 7.000000000000001.
  if (100 * successes % episodes == 0) return str_cat(100 * successes / episodes, "%");
  const double percent = 100.0 * static_cast<double>(successes) / static_cast<double>(episodes);
  char buf[32];
  for (int decimals = 1; decimals < 9; ++decimals) {
    std::snprintf(buf, sizeof buf, "%.*f", decimals, percent);
    const double shown = std::strtod(buf, nullptr);
    if (shown != 0 && shown != 100) break;
  }
  return std::string(buf) + "%";
}

}  // namespace mmdit
