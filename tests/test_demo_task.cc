// The demo task: the expert is valid and bimodal, averaging its modes fails, acting like it
// succeeds through the closed loop, and the plots are well-formed files.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "tensor/random.h"
#include "train/demo_task.h"
#include "train/plots.h"

namespace mmdit {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;
using Vec2 = std::array<double, 2>;

double dist(Vec2 a, Vec2 b) {
  return std::hypot(a[0] - b[0], a[1] - b[1]);
}

// A chunking policy built from a per-state rule, as a trained policy would answer: the chunk
// starts at the oldest observation, so entries before n_obs - 1 are the actions already taken
// (read off the history), and from n_obs - 1 on the rule is rolled forward from the current
// state. Executing the wrong chunk entries therefore replays the past, which goes nowhere.
DemoTask::Policy chunk_policy(const DemoTask& task, int64_t horizon,
                              std::function<Vec2(Vec2 pos, Vec2 start_of_chunk)> rule) {
  return [&task, horizon, rule](const Tensor& obs) {
    const int64_t m_count = obs.size(0), n_obs = obs.size(1);
    const auto o = obs.to_vector<double>();
    std::vector<float> out(m_count * horizon * 2, 0.f);
    for (int64_t m = 0; m < m_count; ++m) {
      const double* h = &o[m * n_obs * 2];
      for (int64_t k = 0; k + 1 < n_obs && k < horizon; ++k)
        for (int j = 0; j < 2; ++j)
          out[(m * horizon + k) * 2 + j] = static_cast<float>(h[(k + 1) * 2 + j] - h[k * 2 + j]);
      const Vec2 now = {h[(n_obs - 1) * 2], h[(n_obs - 1) * 2 + 1]};
      Vec2 pos = now;
      for (int64_t k = n_obs - 1; k < horizon; ++k) {
        const Vec2 a = rule(pos, now);
        out[(m * horizon + k) * 2] = static_cast<float>(a[0]);
        out[(m * horizon + k) * 2 + 1] = static_cast<float>(a[1]);
        task.step(pos, a);
      }
    }
    return from_vector<float>(out, {m_count, horizon, 2});
  };
}

// The expert's decision rule with the side read off the observation: the side the agent is on
// is the side it passes.
DemoTask::Policy expert_oracle(const DemoTask& task, int64_t horizon) {
  return chunk_policy(task, horizon, [&task](Vec2 pos, Vec2 now) {
    return task.expert_action(pos, now[0] >= 0 ? 1 : -1);
  });
}

// What a regression onto the demonstrations converges to where both modes are present.
DemoTask::Policy mean_of_modes(const DemoTask& task, int64_t horizon) {
  return chunk_policy(task, horizon, [&task](Vec2 pos, Vec2) {
    const Vec2 l = task.expert_action(pos, -1), r = task.expert_action(pos, 1);
    return Vec2{(l[0] + r[0]) / 2, (l[1] + r[1]) / 2};
  });
}

TEST(DemoTask, ExpertSucceedsOnEveryEpisodeWithoutCollision) {
  const DemoTask task;
  const auto d = task.generate_demos(200, 7);
  ASSERT_EQ(d.episode_starts.size(), 201u);
  ASSERT_EQ(d.sides.size(), 200u);
  const int64_t total = d.episode_starts.back();
  EXPECT_EQ(d.states.shape(), Shape({total, task.state_dim()}));
  EXPECT_EQ(d.actions.shape(), Shape({total, task.act_dim()}));
  EXPECT_EQ(d.states.dtype(), DType::f32);
  EXPECT_EQ(d.actions.dtype(), DType::f32);
  const auto s = d.states.to_vector<double>(), a = d.actions.to_vector<double>();
  const auto& c = task.config();
  int64_t min_len = 1 << 30, max_len = 0;
  for (int64_t e = 0; e < 200; ++e) {
    const int64_t b = d.episode_starts[e], end = d.episode_starts[e + 1];
    min_len = std::min(min_len, end - b), max_len = std::max(max_len, end - b);
    Vec2 pos = {s[2 * b], s[2 * b + 1]};
    EXPECT_LE(std::abs(pos[0] - c.start[0]), c.start_jitter + 1e-6);
    EXPECT_LE(std::abs(pos[1] - c.start[1]), c.start_jitter + 1e-6);
    // Replaying the recorded actions through the dynamics reproduces the recorded states and
    // reaches the goal exactly at the last one, touching the obstacle nowhere.
    for (int64_t t = b; t < end; ++t) {
      EXPECT_NEAR(pos[0], s[2 * t], 1e-5);
      EXPECT_NEAR(pos[1], s[2 * t + 1], 1e-5);
      EXPECT_LE(std::hypot(a[2 * t], a[2 * t + 1]), c.max_speed + 1e-6);
      pos = {s[2 * t], s[2 * t + 1]};
      const auto outcome = task.step(pos, {a[2 * t], a[2 * t + 1]});
      ASSERT_NE(outcome, DemoTask::Outcome::collision) << "episode " << e << " step " << t - b;
      EXPECT_EQ(outcome, t + 1 == end ? DemoTask::Outcome::success : DemoTask::Outcome::running)
          << "episode " << e << " step " << t - b;
      EXPECT_GT(dist(pos, c.obstacle_center), c.obstacle_radius + c.max_speed);  // a step of margin
    }
  }
  EXPECT_GE(min_len, 30);
  EXPECT_LE(max_len, 50);
}

TEST(DemoTask, ExpertIsBimodalAndItsMeanPointsAtTheObstacle) {
  const DemoTask task;
  const auto d = task.generate_demos(200, 11);
  const auto s = d.states.to_vector<double>(), a = d.actions.to_vector<double>();
  int rights = 0;
  Vec2 first_mean = {0, 0};
  for (int64_t e = 0; e < 200; ++e) {
    const int side = d.sides[e];
    ASSERT_TRUE(side == -1 || side == 1);
    rights += side == 1;
    // The side shows in the path: it passes the obstacle's equator on that side.
    double x_mid = 0;
    for (int64_t t = d.episode_starts[e]; t < d.episode_starts[e + 1]; ++t)
      if (std::abs(s[2 * t + 1]) < 0.1) x_mid = s[2 * t];
    EXPECT_GT(side * x_mid, 0.45) << "episode " << e;
    const int64_t b = d.episode_starts[e];
    first_mean[0] += a[2 * b] / 200, first_mean[1] += a[2 * b + 1] / 200;
  }
  EXPECT_GE(rights, 70);
  EXPECT_LE(rights, 130);
  // Averaged over both modes the first action goes (nearly) straight up, into the obstacle.
  EXPECT_LT(std::abs(first_mean[0]), 0.01);
  EXPECT_GT(first_mean[1], 0.02);
}

TEST(DemoTask, GenerateDemosIsDeterministicPerSeed) {
  const DemoTask task;
  const auto a = task.generate_demos(20, 3), b = task.generate_demos(20, 3);
  const auto c = task.generate_demos(20, 4), prefix = task.generate_demos(5, 3);
  EXPECT_EQ(a.states.to_vector<float>(), b.states.to_vector<float>());
  EXPECT_EQ(a.actions.to_vector<float>(), b.actions.to_vector<float>());
  EXPECT_EQ(a.episode_starts, b.episode_starts);
  EXPECT_EQ(a.sides, b.sides);
  EXPECT_NE(a.states.to_vector<float>(), c.states.to_vector<float>());
  EXPECT_NE(a.sides, c.sides);
  // Episode i depends only on (seed, i).
  const int64_t n5 = prefix.episode_starts.back();
  EXPECT_EQ(std::vector<int64_t>(a.episode_starts.begin(), a.episode_starts.begin() + 6),
            prefix.episode_starts);
  const auto sa = a.states.to_vector<float>();
  EXPECT_EQ(std::vector<float>(sa.begin(), sa.begin() + 2 * n5), prefix.states.to_vector<float>());
}

TEST(DemoTask, AveragingTheModesCollides) {
  const DemoTask task;
  const auto r = task.evaluate(mean_of_modes(task, 16), 100, 2, 8, 5);
  EXPECT_LE(r.successes, 10);
  EXPECT_GE(r.collisions, 90);
  // Simplest form of the same failure: heading straight for the goal.
  const DemoTask::Policy straight = chunk_policy(task, 16, [&task](Vec2 pos, Vec2) {
    return Vec2{task.config().goal[0] - pos[0], task.config().goal[1] - pos[1]};
  });
  const auto s = task.evaluate(straight, 100, 2, 8, 5);
  EXPECT_EQ(s.collisions, 100);
}

TEST(DemoTask, ExpertOracleSucceedsClosedLoop) {
  const DemoTask task;
  const auto r = task.evaluate(expert_oracle(task, 16), 100, 2, 8, 1);
  EXPECT_GE(r.success_rate, 0.95) << r.collisions << " collisions, " << r.timeouts << " timeouts";
  EXPECT_EQ(r.successes + r.collisions + r.timeouts, r.episodes);
  // Other history lengths and chunkings, down to replanning every step.
  for (auto [n_obs, n_act] : {std::pair<int64_t, int64_t>{1, 1}, {1, 16}, {4, 4}}) {
    const auto q = task.evaluate(expert_oracle(task, 20), 30, n_obs, n_act, 2);
    EXPECT_GE(q.success_rate, 0.95) << "n_obs " << n_obs << " n_action_steps " << n_act;
  }
}

TEST(DemoTask, EvaluateHandlesOneAndFiftyEpisodes) {
  const DemoTask task;
  for (int64_t m : {1, 50}) {
    const auto r = task.evaluate(expert_oracle(task, 16), m, 2, 8, 9);
    EXPECT_EQ(r.episodes, m);
    ASSERT_EQ(r.trajectories.size(), static_cast<size_t>(m));
    ASSERT_EQ(r.outcomes.size(), static_cast<size_t>(m));
    ASSERT_EQ(r.succeeded.size(), static_cast<size_t>(m));
    int64_t successes = 0;
    for (int64_t i = 0; i < m; ++i) {
      successes += r.succeeded[i];
      EXPECT_EQ(r.succeeded[i], r.outcomes[i] == DemoTask::Outcome::success);
      EXPECT_GE(r.trajectories[i].size(), 2u);
      EXPECT_LE(r.trajectories[i].size(), static_cast<size_t>(task.config().max_steps + 1));
    }
    EXPECT_EQ(successes, r.successes);
    EXPECT_DOUBLE_EQ(r.success_rate, static_cast<double>(r.successes) / m);
  }
  // Seeded: the same seed gives the same starts, another seed other starts.
  const auto a = task.evaluate(expert_oracle(task, 16), 5, 2, 8, 9);
  const auto b = task.evaluate(expert_oracle(task, 16), 5, 2, 8, 9);
  const auto c = task.evaluate(expert_oracle(task, 16), 5, 2, 8, 10);
  EXPECT_EQ(a.trajectories, b.trajectories);
  EXPECT_NE(a.trajectories[0][0], c.trajectories[0][0]);
}

// The printed rate never says 0% or 100% when some episodes went the other way, and is the
// rate rounded to the decimals it shows.
TEST(DemoTask, SuccessPercentNeverRoundsToAllOrNothing) {
  auto percent = [](int64_t successes, int64_t episodes) {
    DemoTask::EvalResult r;
    r.successes = successes;
    r.episodes = episodes;
    return r.success_percent();
  };
  // Whole rates are whole: 100 * (7 / 100.0) is not 7 in floating point.
  for (int64_t n : {20, 50, 100, 1000})
    for (int64_t k = 0; k <= n; ++k)
      if (100 * k % n == 0) {
        EXPECT_EQ(percent(k, n), std::to_string(100 * k / n) + "%") << k;
      }
  EXPECT_EQ(percent(7, 100), "7%");
  EXPECT_EQ(percent(0, 5), "0%");
  EXPECT_EQ(percent(5, 5), "100%");
  EXPECT_EQ(percent(1, 8), "12.5%");
  EXPECT_EQ(percent(2, 3), "66.7%");
  EXPECT_EQ(percent(995, 1000), "99.5%");
  EXPECT_EQ(percent(1999, 2000), "99.95%");
  EXPECT_EQ(percent(1, 300000), "0.0003%");
  for (int64_t n = 2; n <= 20000; n += (n < 200 ? 1 : 97)) {
    for (int64_t k : {int64_t{1}, n - 1}) {
      const std::string text = percent(k, n);
      ASSERT_EQ(text.back(), '%') << text;
      const std::string digits = text.substr(0, text.size() - 1);
      const double shown = std::stod(digits);
      const size_t point = digits.find('.');
      const int decimals = point == std::string::npos ? 0 : int(digits.size() - point - 1);
      EXPECT_NE(shown, 0) << k << " of " << n;
      EXPECT_NE(shown, 100) << k << " of " << n;
      EXPECT_LE(std::abs(shown - 100.0 * k / n), 0.5 * std::pow(10.0, -decimals) + 1e-12)
          << k << " of " << n << ": " << text;
    }
  }
}

TEST(DemoTask, ExecutesTheChunkFromTheNewestObservationOn) {
  const DemoTask task;
  // Entry k of every chunk moves k/1000 to the right: the first step taken shows which entry
  // ran first, and the first observation shows the start repeated.
  std::vector<Tensor> seen;
  const DemoTask::Policy marker = [&seen](const Tensor& obs) {
    seen.push_back(obs);
    std::vector<float> v;
    for (int64_t m = 0; m < obs.size(0); ++m)
      for (int64_t k = 0; k < 12; ++k) v.insert(v.end(), {k / 1000.f, 0.f});
    return from_vector<float>(v, {obs.size(0), 12, 2});
  };
  const auto r = task.evaluate(marker, 3, 3, 4, 0);
  ASSERT_FALSE(seen.empty());
  EXPECT_EQ(seen[0].shape(), Shape({3, 3, 2}));
  EXPECT_EQ(seen[0].dtype(), DType::f32);
  const auto o = seen[0].to_vector<float>();
  for (int64_t k = 1; k < 3; ++k) {
    EXPECT_EQ(o[k * 2], o[0]);
    EXPECT_EQ(o[k * 2 + 1], o[1]);
  }
  const auto& t = r.trajectories[0];
  EXPECT_NEAR(t[1][0] - t[0][0], 0.002, 1e-6);  // entry n_obs - 1 = 2 first
  EXPECT_NEAR(t[4][0] - t[3][0], 0.005, 1e-6);  // entry 5 last, then a new chunk
  EXPECT_NEAR(t[5][0] - t[4][0], 0.002, 1e-6);
  // The second observation holds the last three positions, oldest first.
  const auto o2 = seen[1].to_vector<float>();
  for (int64_t k = 0; k < 3; ++k) EXPECT_EQ(o2[k * 2], t[2 + k][0]);
  EXPECT_EQ(r.timeouts, 3);
  EXPECT_EQ(t.size(), static_cast<size_t>(task.config().max_steps + 1));
}

TEST(DemoTask, FinishedEpisodesStopMovingAndActionsAreClipped) {
  const DemoTask task;
  // Runs the oracle but asks for ten times the allowed speed: steps must still be max_speed.
  std::vector<Tensor> seen;
  const auto oracle = expert_oracle(task, 16);
  const DemoTask::Policy greedy = [&](const Tensor& obs) {
    seen.push_back(obs);
    const Tensor chunk = oracle(obs);
    auto v = chunk.to_vector<float>();
    for (auto& x : v) x *= 10;
    return from_vector<float>(v, chunk.shape());
  };
  const auto r = task.evaluate(greedy, 40, 2, 8, 3);
  const double vmax = task.config().max_speed;
  size_t shortest = 1 << 30, longest = 0;
  for (int64_t m = 0; m < 40; ++m) {
    const auto& t = r.trajectories[m];
    shortest = std::min(shortest, t.size()), longest = std::max(longest, t.size());
    for (size_t i = 1; i < t.size(); ++i)
      EXPECT_LE(std::hypot(t[i][0] - t[i - 1][0], t[i][1] - t[i - 1][1]), vmax + 1e-5);
    // Every observation after the episode ended shows its final position.
    const size_t steps_taken = t.size() - 1;
    for (size_t call = 0; call < seen.size(); ++call) {
      if (call * 8 < steps_taken) continue;
      const auto o = seen[call].to_vector<float>();
      for (int64_t k = 0; k < 2; ++k) {
        EXPECT_EQ(o[(m * 2 + k) * 2], t.back()[0]);
        EXPECT_EQ(o[(m * 2 + k) * 2 + 1], t.back()[1]);
      }
    }
  }
  // Episodes finish at different steps, so some were carried frozen while others ran on.
  EXPECT_LT(shortest, longest);
  EXPECT_GE(r.success_rate, 0.95);
}

// exec_start + n_action_steps overflowed near INT64_MAX: the shape check passed, no action was
// executed, the step count never grew and evaluate() looped forever.
TEST(DemoTask, RefusesChunkSizesPastTheHorizonBound) {
  const DemoTask task;
  const auto oracle = expert_oracle(task, 16);
  EXPECT_THAT(
      [&] { task.evaluate(oracle, 4, INT64_MAX, 8, 1); },
      testing::ThrowsMessage<Error>(HasSubstr(
          "DemoTask::evaluate: n_obs_steps must be in [1, 1048576], got 9223372036854775807")));
  EXPECT_THAT([&] { task.evaluate(oracle, 4, 2, INT64_MAX, 1); },
              testing::ThrowsMessage<Error>(HasSubstr("DemoTask::evaluate: n_action_steps must be "
                                                      "in [1, 1048576], got 9223372036854775807")));
}

// A step whose ends are both outside the obstacle but whose path cuts its rim collides: from
// (-0.03, -0.7495) by (0.06, 0), the ends are 0.4505 from the centre (0, -0.3), the path's
// middle 0.4495, inside the radius 0.45.
TEST(DemoTask, AStepThroughTheRimCollides) {
  const DemoTask task;
  ASSERT_EQ(task.config().obstacle_radius, 0.45);
  ASSERT_GE(task.config().max_speed, 0.06);
  std::array<double, 2> pos = {-0.03, -0.7495};
  EXPECT_EQ(task.step(pos, {0.06, 0.0}), DemoTask::Outcome::collision);
  pos = {-0.03, -0.7515};  // the whole path 0.4515 or more from the centre: no collision
  EXPECT_EQ(task.step(pos, {0.06, 0.0}), DemoTask::Outcome::running);
}

TEST(DemoTask, RejectsBadInput) {
  const DemoTask task;
  auto message = [](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_THAT(message([&] { task.generate_demos(0, 1); }), HasSubstr("num_episodes"));
  const auto oracle = expert_oracle(task, 16);
  EXPECT_THAT(message([&] { task.evaluate(oracle, 0, 2, 8, 1); }), HasSubstr("num_episodes"));
  EXPECT_THAT(message([&] { task.evaluate(oracle, 4, 0, 8, 1); }), HasSubstr("n_obs_steps"));
  EXPECT_THAT(message([&] { task.evaluate(nullptr, 4, 2, 8, 1); }), HasSubstr("empty"));
  // A chunk too short for the executed window names both shapes.
  const auto short_chunk = [](const Tensor& obs) { return zeros({obs.size(0), 8, 2}); };
  const std::string m1 = message([&] { task.evaluate(short_chunk, 3, 2, 8, 1); });
  EXPECT_THAT(m1, HasSubstr("(3,8,2)"));
  EXPECT_THAT(m1, HasSubstr("expected (3,horizon,2) with horizon >= 9"));
  const auto wrong_batch = [](const Tensor&) { return zeros({1, 16, 2}); };
  EXPECT_THAT(message([&] { task.evaluate(wrong_batch, 3, 2, 8, 1); }), HasSubstr("(1,16,2)"));
  const auto flat = [](const Tensor& obs) { return zeros({obs.size(0), 32}); };
  EXPECT_THAT(message([&] { task.evaluate(flat, 3, 2, 8, 1); }), HasSubstr("(3,32)"));
  const auto nan = [](const Tensor& obs) { return full({obs.size(0), 16, 2}, NAN); };
  EXPECT_THAT(message([&] { task.evaluate(nan, 3, 2, 8, 1); }), HasSubstr("non-finite"));
  // Geometry the expert cannot solve is refused up front.
  DemoTaskConfig narrow;
  narrow.expert_detour = 0.3;
  EXPECT_THAT(message([&] { DemoTask{narrow}; }), HasSubstr("expert_detour"));
  DemoTaskConfig bad_speed;
  bad_speed.max_speed = 0;
  EXPECT_THAT(message([&] { DemoTask{bad_speed}; }), HasSubstr("max_speed"));
  EXPECT_THAT(message([&] { task.expert_action({0, 0}, 0); }), HasSubstr("side"));
}

// ---- plots ----

class Plots : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("mmdit_plots_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  static std::string read(const fs::path& p) {
    std::ifstream f(p);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
  }
  static int count(const std::string& s, const std::string& needle) {
    int n = 0;
    for (size_t pos = s.find(needle); pos != std::string::npos; pos = s.find(needle, pos + 1)) ++n;
    return n;
  }
  // Only the files the test asked for: the temporary ones were renamed away.
  void expect_only(std::vector<std::string> names) {
    std::vector<std::string> found;
    for (const auto& e : fs::directory_iterator(dir_)) found.push_back(e.path().filename());
    std::sort(found.begin(), found.end());
    std::sort(names.begin(), names.end());
    EXPECT_EQ(found, names);
  }

  fs::path dir_;
};

TEST_F(Plots, LossCurve) {
  std::vector<std::pair<int64_t, double>> curve;
  Rng rng(1);
  const auto noise = rng.uniform({500}, DType::f64, 0.7, 1.3).to_vector<double>();
  for (int64_t i = 0; i < 500; ++i)
    curve.emplace_back(i * 10, 2.0 * std::exp(-i / 80.0) * noise[i] + 1e-3);
  write_loss_curve_svg(dir_ / "loss.svg", curve, "Training loss <flow matching>");
  const std::string svg = read(dir_ / "loss.svg");
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_THAT(svg, HasSubstr("</svg>"));
  EXPECT_THAT(svg, HasSubstr("Training loss &lt;flow matching&gt;"));
  EXPECT_THAT(svg, HasSubstr("class=\"loss\""));
  EXPECT_THAT(svg, HasSubstr("class=\"loss-smoothed\""));
  EXPECT_THAT(svg, HasSubstr(">0.01<"));  // a decade tick label
  EXPECT_THAT(svg, HasSubstr(">4000<"));  // a step tick label

  // A long run's curve: at most two points per pixel column (608 of them), its lowest and
  // highest, so that the band stays (it held every point: 24 bytes a step).
  std::vector<std::pair<int64_t, double>> long_run;
  const auto long_noise = rng.uniform({200000}, DType::f64, 0.5, 1.5).to_vector<double>();
  for (int64_t i = 0; i < 200000; ++i) long_run.emplace_back(i + 1, long_noise[i]);
  long_run[123456].second = 1e-3;  // a dip to a decade's edge in one step
  write_loss_curve_svg(dir_ / "long.svg", long_run, "long run");
  const std::string long_svg = read(dir_ / "long.svg");
  EXPECT_LT(long_svg.size(), 40000u);
  const size_t raw = long_svg.find("class=\"loss\"");
  ASSERT_NE(raw, std::string::npos);
  const std::string raw_points = long_svg.substr(raw, long_svg.find('/', raw) - raw);
  EXPECT_EQ(std::count(raw_points.begin(), raw_points.end(), ','), 2 * 608);
  // The dip is drawn: the lowest loss sits near the plot's bottom edge (y 384), where the
  // others (0.5 and up, three decades above) do not reach.
  double lowest_drawn = 0;  // the largest y
  std::istringstream coordinates(raw_points.substr(raw_points.find("points=\"") + 8));
  for (double x, y; coordinates >> x && coordinates.get() == ',' && coordinates >> y;)
    lowest_drawn = std::max(lowest_drawn, y);
  EXPECT_GT(lowest_drawn, 350);
  EXPECT_THAT(long_svg, HasSubstr("min 0.001 at step "));

  // Degenerate inputs still give a plot.
  write_loss_curve_svg(dir_ / "one.svg", {{100, 0.5}}, "one point");
  EXPECT_THAT(read(dir_ / "one.svg"), HasSubstr("<circle"));
  write_loss_curve_svg(dir_ / "bad.svg", {{0, 1.0}, {1, 0.0}, {2, -3.0}, {3, NAN}, {4, 0.5}},
                       "with non-positive values");
  const std::string bad = read(dir_ / "bad.svg");
  EXPECT_THAT(bad, HasSubstr("3 non-positive or non-finite values omitted"));
  EXPECT_EQ(bad.find("nan"), std::string::npos);
  EXPECT_EQ(bad.find("inf"), std::string::npos);
  write_loss_curve_svg(dir_ / "empty.svg", LossHistory(), "empty");
  EXPECT_THAT(read(dir_ / "empty.svg"), HasSubstr("no positive loss values"));
  expect_only({"bad.svg", "empty.svg", "long.svg", "loss.svg", "one.svg"});
}

// A history of many steps in bounded memory keeps, per bucket, exactly what the plot draws.
TEST(LossHistory, MergesStepsIntoBucketsThatKeepTheBandAndTheMean) {
  LossHistory history(64);
  Rng rng(3);
  const auto noise = rng.uniform({100000}, DType::f64, 0.5, 2.0).to_vector<double>();
  double log_sum = 0;
  for (int64_t i = 0; i < 100000; ++i) {
    history.add(i + 1, i == 70000 ? 1e-4 : noise[i]);
    log_sum += std::log10(i == 70000 ? 1e-4 : noise[i]);
  }
  history.add(100001, NAN);
  history.add(100002, 0.0);
  EXPECT_EQ(history.points(), 100000);
  EXPECT_EQ(history.omitted(), 2);
  EXPECT_EQ(history.last_step(), 100002);
  const auto& buckets = history.buckets();
  ASSERT_LE(buckets.size(), 64u);
  ASSERT_GE(buckets.size(), 32u);
  // The buckets tile the steps in order, and together hold every point and its log.
  double bucket_log_sum = 0;
  int64_t next_step = 1;
  for (const auto& b : buckets) {
    EXPECT_EQ(b.first_step, next_step);
    next_step = b.last_step + 1;
    bucket_log_sum += b.log_sum;
    // The band is the bucket's own lowest and highest loss.
    double low = INFINITY, high = -INFINITY;
    for (int64_t step = b.first_step; step <= b.last_step; ++step) {
      const double y = std::log10(step == 70001 ? 1e-4 : noise[step - 1]);
      low = std::min(low, y), high = std::max(high, y);
    }
    EXPECT_EQ(b.low, low);
    EXPECT_EQ(b.high, high);
    EXPECT_EQ(b.count, b.last_step - b.first_step + 1);
  }
  EXPECT_EQ(next_step, 100001);
  EXPECT_NEAR(bucket_log_sum, log_sum, 1e-9 * 100000);
  EXPECT_EQ(history.lowest(), std::make_pair(int64_t{70001}, -4.0));
  EXPECT_EQ(history.last(), std::make_pair(int64_t{100000}, std::log10(noise[99999])));

  EXPECT_THAT([&] { history.add(100002, 1.0); },
              ThrowsMessage<Error>(HasSubstr("step 100002 comes after step 100002")));
  EXPECT_THAT([] { LossHistory(1); }, ThrowsMessage<Error>(HasSubstr("capacity 1 is below 2")));
}

// The plot of a merged history draws the same band, extremes and subtitle as that of every step.
TEST_F(Plots, LossCurveOfAMergedHistoryMatchesTheFullOne) {
  Rng rng(4);
  const auto noise = rng.uniform({20000}, DType::f64, 0.5, 1.5).to_vector<double>();
  std::vector<std::pair<int64_t, double>> every_step;
  LossHistory merged(256);
  for (int64_t i = 0; i < 20000; ++i) {
    const double loss = std::exp(-i / 4000.0) * noise[i] + (i == 12345 ? -1.0 : 0.0);
    every_step.emplace_back(i + 1, loss);
    merged.add(i + 1, loss);
  }
  write_loss_curve_svg(dir_ / "full.svg", every_step, "run");
  write_loss_curve_svg(dir_ / "merged.svg", merged, "run");
  const std::string full = read(dir_ / "full.svg"), thin = read(dir_ / "merged.svg");
  const auto subtitle = [](const std::string& svg) {
    const size_t at = svg.find("last ");
    return svg.substr(at, svg.find('<', at) - at);
  };
  EXPECT_EQ(subtitle(thin), subtitle(full));
  EXPECT_THAT(subtitle(full), HasSubstr("(1 non-positive or non-finite values omitted)"));
  // Tick labels (both axes) come from the extremes, which merging keeps.
  const auto labels = [](const std::string& svg) {
    std::vector<std::string> found;
    for (size_t at = svg.find("<text"); at != std::string::npos; at = svg.find("<text", at + 1))
      found.push_back(
          svg.substr(svg.find('>', at) + 1, svg.find("</text>", at) - svg.find('>', at) - 1));
    return found;
  };
  EXPECT_EQ(labels(thin), labels(full));
}

TEST_F(Plots, Rollouts) {
  const DemoTask task;
  const auto demos = task.generate_demos(30, 2);
  auto r = task.evaluate(expert_oracle(task, 16), 12, 2, 8, 4);
  const auto m = task.evaluate(mean_of_modes(task, 16), 5, 2, 8, 4);
  r.trajectories.insert(r.trajectories.end(), m.trajectories.begin(), m.trajectories.end());
  r.succeeded.insert(r.succeeded.end(), m.succeeded.begin(), m.succeeded.end());
  int successes = 0;
  for (bool b : r.succeeded) successes += b;

  write_rollouts_svg(dir_ / "rollouts.svg", task.config(), demos, r.trajectories, r.succeeded,
                     "Closed-loop rollouts");
  const std::string svg = read(dir_ / "rollouts.svg");
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_THAT(svg, HasSubstr("</svg>"));
  EXPECT_EQ(count(svg, "<circle class=\"obstacle\""), 1);
  EXPECT_EQ(count(svg, "<circle class=\"goal\""), 1);
  EXPECT_EQ(count(svg, "<rect class=\"start-region\""), 1);
  EXPECT_EQ(count(svg, "<polyline class=\"expert\""), 30);
  EXPECT_EQ(count(svg, "<polyline class=\"rollout "), 17);
  EXPECT_EQ(count(svg, "<polyline class=\"rollout success\""), successes);
  EXPECT_EQ(count(svg, "<polyline class=\"rollout failure\""), 17 - successes);
  EXPECT_THAT(svg, HasSubstr("expert demo (30)"));
  EXPECT_THAT(svg, HasSubstr("Closed-loop rollouts"));

  // Without demos, or without rollouts.
  write_rollouts_svg(dir_ / "no_demos.svg", task.config(), {}, r.trajectories, r.succeeded, "t");
  EXPECT_EQ(count(read(dir_ / "no_demos.svg"), "class=\"expert\""), 0);
  write_rollouts_svg(dir_ / "demos_only.svg", task.config(), demos, {}, {}, "t");
  EXPECT_EQ(count(read(dir_ / "demos_only.svg"), "class=\"rollout"), 0);

  EXPECT_THROW(write_rollouts_svg(dir_ / "x.svg", task.config(), demos, r.trajectories, {}, "t"),
               Error);
  EXPECT_THROW(write_rollouts_svg((dir_ / "missing_dir" / "x.svg").string(), task.config(), demos,
                                  r.trajectories, r.succeeded, "t"),
               Error);
  expect_only({"demos_only.svg", "no_demos.svg", "rollouts.svg"});
}

}  // namespace
}  // namespace mmdit
