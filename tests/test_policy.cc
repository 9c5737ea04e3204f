// The behaviour-cloning policy (train/policy.h): its config and inputs checked by name, its
// normaliser, its position buffers and sampler against tables and loops written out here.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "tests/test_util.h"
#include "train/policy.h"

namespace mmdit {
namespace {

using ::testing::HasSubstr;

PolicyConfig tiny_policy() {
  PolicyConfig c;
  c.n_obs_steps = 2;
  c.state_dim = 3;
  c.horizon = 5;
  c.act_dim = 2;
  c.hidden_size = 16;
  c.depth = 2;
  c.dim_cond = 24;
  c.timestep_embed_dim = 8;
  c.dim_head = 8;
  c.heads = 2;
  c.ff_mult = 2;
  return c;
}

// ---------------------------------------------------------------- config
TEST(BCPolicy, RejectsABadConfigByTheFieldBeforeBuildingLayers) {
  for (const auto& [field, set] : std::vector<std::pair<std::string, void (*)(PolicyConfig&)>>{
           {"state_dim", [](PolicyConfig& c) { c.state_dim = 0; }},
           {"act_dim", [](PolicyConfig& c) { c.act_dim = 0; }},
           {"hidden_size", [](PolicyConfig& c) { c.hidden_size = 0; }}}) {
    PolicyConfig c = tiny_policy();
    set(c);
    Rng rng(0);
    EXPECT_EQ(test::error_of([&] { BCPolicy p(c, rng); }),
              "policy config: " + field + " must be positive, got 0");
  }
}

// ---------------------------------------------------------------- loss inputs
// A batch of B = 2 for tiny_policy() (horizon 5, act_dim 2, n_obs 2, state_dim 3), and the
// draws of a step; each test below breaks one of them.
struct LossInputs {
  Tensor state = zeros({2, 2, 3}), action = zeros({2, 5, 2});
  Tensor is_pad = zeros({2, 5}, DType::boolean);
  FlowNoise noise{zeros({2, 5, 2}), full({2}, 0.5), Tensor()};
};

std::string flow_error(const BCPolicy& policy, const LossInputs& in) {
  return test::error_of(
      [&] { flow_matching_loss(policy, in.state, in.action, in.is_pad, in.noise); });
}

std::string regression_error(const BCPolicy& policy, const LossInputs& in) {
  return test::error_of([&] { regression_loss(policy, in.state, in.action, in.is_pad); });
}

TEST(FlowMatchingLoss, RejectsInputsThatWouldBroadcastByName) {
  Rng rng(0);
  const BCPolicy policy(tiny_policy(), rng);
  const LossInputs good;
  EXPECT_EQ(flow_error(policy, good), "(no mmdit::Error thrown)");
  EXPECT_EQ(regression_error(policy, good), "(no mmdit::Error thrown)");

  LossInputs in = good;
  in.action = zeros({2, 5, 3});
  EXPECT_EQ(
      flow_error(policy, in),
      "flow_matching_loss: action is float32 (2,5,3); expected (B, horizon, act_dim) = (B,5,2)");
  EXPECT_EQ(regression_error(policy, in),
            "regression_loss: action is float32 (2,5,3); expected (B, horizon, act_dim) = (B,5,2)");

  in = good;
  in.state = zeros({1, 2, 3});
  EXPECT_EQ(flow_error(policy, in),
            "flow_matching_loss: state is float32 (1,2,3); expected (B, n_obs_steps, state_dim) = "
            "(2,2,3), B as the action's");

  in = good;
  in.is_pad = zeros({5}, DType::boolean);
  EXPECT_EQ(flow_error(policy, in),
            "flow_matching_loss: action_is_pad is bool (5,); expected bool (B, horizon) = (2,5)");
  EXPECT_EQ(regression_error(policy, in),
            "regression_loss: action_is_pad is bool (5,); expected bool (B, horizon) = (2,5)");
  in.is_pad = zeros({2, 5});
  EXPECT_EQ(
      flow_error(policy, in),
      "flow_matching_loss: action_is_pad is float32 (2,5); expected bool (B, horizon) = (2,5)");

  in = good;
  in.noise.x0 = zeros({1, 5, 2});
  EXPECT_EQ(flow_error(policy, in),
            "flow_matching_loss: noise.x0 is float32 (1,5,2); expected the action's shape (2,5,2)");

  in = good;
  in.noise.t = full({1}, 0.5);
  EXPECT_EQ(
      flow_error(policy, in),
      "flow_matching_loss: noise.t is float32 (1,); expected (B,) = (2,), one time per example");
  in.noise.t = Tensor();
  EXPECT_EQ(flow_error(policy, in),
            "flow_matching_loss: noise.t is undefined; expected (B,) = (2,), one time per example");
}

TEST(FlowMatchingLoss, WithSigmaNeedsEpsOfTheActionsShape) {
  PolicyConfig c = tiny_policy();
  c.sigma = 0.1;
  Rng rng(0);
  const BCPolicy policy(c, rng);
  LossInputs in;
  EXPECT_EQ(flow_error(policy, in),
            "flow_matching_loss: noise.eps (sigma > 0) is undefined; expected the action's shape "
            "(2,5,2)");
  in.noise.eps = zeros({1, 5, 2});
  EXPECT_EQ(flow_error(policy, in),
            "flow_matching_loss: noise.eps (sigma > 0) is float32 (1,5,2); expected the action's "
            "shape (2,5,2)");
  in.noise.eps = zeros({2, 5, 2});
  EXPECT_EQ(flow_error(policy, in), "(no mmdit::Error thrown)");
}

// ---------------------------------------------------------------- normaliser
TEST(Normalizer, FromJsonRejectsAModeThatIsNotAString) {
  EXPECT_THAT([] { Normalizer::from_json(R"({"mode": 3})"); },
              testing::ThrowsMessage<Error>(
                  HasSubstr(R"(normalizer: 'mode' must be "min_max" or "z_score", got 3)")));
}

// state_dim 2, act_dim 2. Each case breaks one array of a good normaliser.
TEST(Normalizer, ValidateNamesTheArrayThatIsWrong) {
  const std::string min_max =
      R"("state_min": [0, -1], "state_max": [1, 1], "action_min": [0, 0], "action_max": [2, 3])";
  const std::string z_score =
      R"("state_mean": [0, 1], "state_std": [1, 0], "action_mean": [0, 0], "action_std": [1, 2])";
  auto error = [](const std::string& json) {
    return test::error_of([&] { Normalizer::from_json(json).validate(2, 2); });
  };
  EXPECT_EQ(error(R"({"mode": "min_max", )" + min_max + "}"), "(no mmdit::Error thrown)");
  EXPECT_EQ(error(R"({"mode": "z_score", )" + z_score + "}"), "(no mmdit::Error thrown)");
  for (const auto& [json, message] : std::vector<std::pair<std::string, std::string>>{
           {R"({"mode": "min_max", "state_min": [0], "state_max": [1, 1],
                "action_min": [0, 0], "action_max": [2, 3]})",
            "normalizer: 'state_min' is float32 (1,); expected (state_dim,) = (2,)"},
           {R"({"mode": "min_max", "state_min": [0, 0], "state_max": [1, 1],
                "action_min": [0, 0], "action_max": [2, 3, 4]})",
            "normalizer: 'action_max' is float32 (3,); expected (act_dim,) = (2,)"},
           {R"({"mode": "min_max", "state_min": [0, 0], "state_max": [1, 1],
                "action_min": [0, 0]})",
            "normalizer: 'action_max' is missing; min_max mode needs it"},
           {R"({"mode": "z_score", )" + min_max + "}",
            "normalizer: 'state_mean' is missing; z_score mode needs it"},
           // 1e39 is beyond float32's range: the array the policy would use holds inf.
           {R"({"mode": "min_max", "state_min": [0, 0], "state_max": [1, 1e39],
                "action_min": [0, 0], "action_max": [2, 3]})",
            "normalizer: 'state_max'[1] is inf"},
           {R"({"mode": "min_max", "state_min": [0, 0], "state_max": [1, 1],
                "action_min": [0, 0.5], "action_max": [2, 0.25]})",
            "normalizer: 'action_max'[1] = 0.25 is below 'action_min'[1] = 0.5"},
           {R"({"mode": "z_score", "state_mean": [0, 1], "state_std": [1, 0],
                "action_mean": [0, 0], "action_std": [1, -0.5]})",
            "normalizer: 'action_std'[1] is -0.5; a standard deviation is >= 0"}})
    EXPECT_EQ(error(json), message) << json;
}

}  // namespace
}  // namespace mmdit
