// The behaviour-cloning policy (train/policy.h): its config and inputs checked by name, its
// normaliser, its position buffers and sampler against tables and loops written out here.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <limits>

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <sstream>

#include "autodiff/gradcheck.h"
#include "autodiff/value_and_grad.h"
#include "tensor/safetensors.h"
#include "tests/test_util.h"
#include "train/parity.h"
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

// A chunk shorter than the observation window trained, and then no controller could act on it
// (eval: "horizon - n_obs_steps + 1 = 0" actions a chunk holds from now on; eval --data: MSE nan).
TEST(PolicyConfig, RefusesAChunkWithoutTheActionForNow) {
  PolicyConfig c = tiny_policy();
  c.n_obs_steps = 3;
  c.horizon = 2;
  const std::string message =
      "policy config: horizon 2 is shorter than n_obs_steps 3: the chunk must hold the action "
      "for now, its index n_obs_steps - 1";
  EXPECT_EQ(test::error_of([&] { c.validate(); }), message);
  EXPECT_EQ(test::error_of([] { PolicyConfig::from_json(R"({"n_obs_steps": 3, "horizon": 2})"); }),
            message);
  c.horizon = 3;
  EXPECT_NO_THROW(c.validate());
}

// Without bounds a horizon of 2^21 ended in std::bad_alloc from the (n_obs_steps + horizon)^2
// mask, and from about 3e9 the square overflowed int64.
TEST(PolicyConfig, BoundsTheSequenceLengthsNamingTheFieldAndTheLimit) {
  const std::string message =
      "policy config: n_obs_steps + horizon must be at most 16384 tokens (attention holds their "
      "square), got ";
  PolicyConfig c = tiny_policy();
  c.horizon = 2097152;
  EXPECT_EQ(test::error_of([&] { c.validate(); }), message + "2 + 2097152");
  EXPECT_EQ(test::error_of([] { PolicyConfig::from_json(R"({"horizon": 2097152})"); }),
            message + "2 + 2097152");
  c = tiny_policy();
  c.n_obs_steps = 3040000000;
  EXPECT_EQ(test::error_of([&] { c.validate(); }), message + "3040000000 + 5");
  // Near INT64_MAX the sum itself would overflow; the check does not form it.
  c.horizon = std::numeric_limits<int64_t>::max();
  EXPECT_EQ(test::error_of([&] { c.validate(); }), message + "3040000000 + 9223372036854775807");
  c = tiny_policy();
  c.n_obs_steps = 1000;
  c.horizon = 15385;
  EXPECT_EQ(test::error_of([&] { c.validate(); }), message + "1000 + 15385");
  c.horizon = 15384;
  EXPECT_EQ(test::error_of([&] { c.validate(); }), "(no mmdit::Error thrown)");
}

// A config too large for memory said only "out of memory allocating N bytes", not which sizes.
// A 12 TB projection (heads 1024 x dim_head 1024 x 3 over hidden_size 10^6) is refused at once
// under an address-space limit (a death test's child: without the limit, a kernel that
// overcommits would hand it out, and initialising it would exhaust the machine).
TEST(BCPolicyDeathTest, TooLargeForMemoryNamesTheSizes) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "AddressSanitizer's shadow memory does not fit an address-space limit";
#endif
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const auto build_past_the_limit = [] {
    PolicyConfig c = tiny_policy();
    c.hidden_size = 1000000;
    c.heads = 1024;
    c.dim_head = 1024;
    Rng rng(0);
    test::limit_address_space(size_t{256} << 20);
    try {
      BCPolicy p(c, rng);
    } catch (const OutOfMemory& e) {
      std::fprintf(stderr, "%s\n", e.what());
      std::exit(3);
    }
    std::exit(0);
  };
  EXPECT_EXIT(build_past_the_limit(), testing::ExitedWithCode(3),
              "BCPolicy with policy config .*\"heads\":1024.*\"hidden_size\":1000000.* does not "
              "fit in memory: out of memory allocating ");
}

// nlohmann's get<int64_t> wraps 2^64 - 1 to -1, which validate() then reported as "-1".
TEST(PolicyConfig, FromJsonRefusesIntegersPastInt64AsWritten) {
  EXPECT_EQ(test::error_of([] { PolicyConfig::from_json(R"({"horizon": 18446744073709551615})"); }),
            "policy config: 'horizon' must be an integer no larger than 9223372036854775807, got "
            "18446744073709551615");
  EXPECT_EQ(test::error_of([] { PolicyConfig::from_json(R"({"depth": -3})"); }),
            "policy config: depth must be positive, got -3");
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
            "flow_matching_loss: noise.x0 is float32 (1,5,2); expected the action's float32 "
            "(2,5,2)");
  in.noise.x0 = zeros({2, 5, 2}, DType::f64);
  EXPECT_EQ(flow_error(policy, in),
            "flow_matching_loss: noise.x0 is float64 (2,5,2); expected the action's float32 "
            "(2,5,2)");

  in = good;
  in.noise.t = full({1}, 0.5);
  EXPECT_EQ(flow_error(policy, in),
            "flow_matching_loss: noise.t is float32 (1,); expected float32 (B,) = (2,), one time "
            "per example");
  in.noise.t = Tensor();
  EXPECT_EQ(flow_error(policy, in),
            "flow_matching_loss: noise.t is undefined; expected float32 (B,) = (2,), one time per "
            "example");
  // A float64 time for a float32 policy said "mul: dtypes float64 and float32 differ".
  in.noise.t = full({2}, 0.5, DType::f64);
  EXPECT_EQ(flow_error(policy, in),
            "flow_matching_loss: noise.t is float64 (2,); expected float32 (B,) = (2,), one time "
            "per example");

  // A batch of the other float dtype than the policy's.
  in = good;
  in.state = zeros({2, 2, 3}, DType::f64);
  EXPECT_EQ(regression_error(policy, in),
            "regression_loss: action is float32 (2,5,2) and state is float64 (2,2,3); the policy "
            "is float32");
}

// Observation tokens of another length blamed the attention mask, of another width a product.
TEST(BCPolicy, VelocityNamesObservationTokensOfTheWrongShape) {
  Rng rng(0);
  const BCPolicy policy(tiny_policy(), rng);
  const Tensor x_t = zeros({2, 5, 2}), t = full({2}, 0.5);
  const Tensor good = policy.encode_observations(zeros({2, 2, 3}));
  EXPECT_EQ(test::error_of([&] { policy.velocity(good, x_t, t); }), "(no mmdit::Error thrown)");
  const std::string expected = str_cat("; expected (B, n_obs_steps, hidden_size) = (2,2,",
                                       policy.config.hidden_size, "), from encode_observations");
  EXPECT_EQ(test::error_of([&] {
              policy.velocity(zeros({2, 3, 8}), x_t, t);
            }),
            "policy: observation tokens have shape (2,3,8)" + expected);
  EXPECT_EQ(test::error_of([&] { policy.velocity(Tensor(), x_t, t); }),
            "policy: observation tokens are undefined" + expected);
}

TEST(FlowMatchingLoss, WithSigmaNeedsEpsOfTheActionsShape) {
  PolicyConfig c = tiny_policy();
  c.sigma = 0.1;
  Rng rng(0);
  const BCPolicy policy(c, rng);
  LossInputs in;
  EXPECT_EQ(flow_error(policy, in),
            "flow_matching_loss: noise.eps (sigma > 0) is undefined; expected the action's "
            "float32 (2,5,2)");
  in.noise.eps = zeros({1, 5, 2});
  EXPECT_EQ(flow_error(policy, in),
            "flow_matching_loss: noise.eps (sigma > 0) is float32 (1,5,2); expected the action's "
            "float32 (2,5,2)");
  in.noise.eps = zeros({2, 5, 2});
  EXPECT_EQ(flow_error(policy, in), "(no mmdit::Error thrown)");
}

// regress_actions is public API: it read state.shape()[0] before anything checked the rank, so a
// 0-d state indexed past an empty shape.
TEST(RegressActions, RejectsAStateOfTheWrongRankByName) {
  Rng rng(0);
  const BCPolicy policy(tiny_policy(), rng);
  EXPECT_EQ(test::error_of([&] { regress_actions(policy, scalar(1.0)); }),
            "regress_actions: state is float32 (); expected (B, n_obs_steps, state_dim) = "
            "(B,2,3)");
  EXPECT_EQ(test::error_of([&] {
              regress_actions(policy, zeros({2, 3}));
            }),
            "regress_actions: state is float32 (2,3); expected (B, n_obs_steps, state_dim) = "
            "(B,2,3)");
  EXPECT_EQ(test::error_of([&] { regress_actions(policy, Tensor()); }),
            "regress_actions: state is undefined; expected (B, n_obs_steps, state_dim) = (B,2,3)");
  EXPECT_EQ(regress_actions(policy, zeros({4, 2, 3})).shape(), (Shape{4, 5, 2}));
}

// ---------------------------------------------------------------- normaliser
TEST(Normalizer, FromJsonRejectsAModeThatIsNotAString) {
  EXPECT_THAT([] { Normalizer::from_json(R"({"mode": 3})"); },
              testing::ThrowsMessage<Error>(
                  HasSubstr(R"(normalizer: 'mode' must be "min_max" or "z_score", got 3)")));
}

// The reference agent's config gives each range as one (2, dim) array, [minima, maxima]; the
// statistics read from it equal the same numbers given key by key.
TEST(Normalizer, ReadsTheReferenceAgentsMinMaxPairs) {
  const Normalizer pairs = Normalizer::from_json(
      R"({"mode": "min_max", "state_min_max": [[0, -1, 0.5], [1, 1, 2]],
          "action_min_max": [[-2, 0], [2, 3]]})");
  const Normalizer keys = Normalizer::from_json(
      R"({"mode": "min_max", "state_min": [0, -1, 0.5], "state_max": [1, 1, 2],
          "action_min": [-2, 0], "action_max": [2, 3]})");
  pairs.validate(3, 2);
  EXPECT_EQ(pairs.to_json(), keys.to_json());
  EXPECT_EQ(pairs.state_max.to_vector<float>(), (std::vector<float>{1, 1, 2}));
  EXPECT_EQ(pairs.action_min.to_vector<float>(), (std::vector<float>{-2, 0}));
  EXPECT_EQ(test::error_of([] {
              Normalizer::from_json(
                  R"({"mode": "min_max", "state_min_max": [[0], [1]], "state_max": [1]})");
            }),
            "normalizer: 'state_min_max' and 'state_max' both give the range; keep one of them");
  EXPECT_EQ(test::error_of(
                [] { Normalizer::from_json(R"({"mode": "min_max", "action_min_max": [0, 1]})"); }),
            "normalizer: 'action_min_max' must be [[minima...], [maxima...]], two arrays of "
            "numbers");
  EXPECT_EQ(test::error_of([] {
              Normalizer::from_json(R"({"mode": "min_max", "action_min_max": [[0, 1], [2]]})");
            }),
            "normalizer: 'action_min_max' has 2 minima and 1 maxima");
  EXPECT_EQ(test::error_of([] {
              Normalizer::from_json(R"({"mode": "min_max", "action_min_max": [[0, 1], ["a", 2]]})");
            }),
            "normalizer: 'action_min_max' must be an array of numbers");
  // null is absent, as everywhere in these files (to_json writes the unused statistics so).
  EXPECT_EQ(Normalizer::from_json(
                R"({"mode": "min_max", "state_min_max": [[0], [1]], "state_min": null,
                    "state_max": null, "action_min_max": null, "action_min": [0],
                    "action_max": [1]})")
                .to_json(),
            Normalizer::from_json(R"({"mode": "min_max", "state_min": [0], "state_max": [1],
                                      "action_min": [0], "action_max": [1]})")
                .to_json());
  EXPECT_EQ(test::error_of([] {
              Normalizer::from_json(R"({"mode": "min_max", "action_min_max": [[0, 1]]})");
            }),
            "normalizer: 'action_min_max' must be [[minima...], [maxima...]], two arrays of "
            "numbers");
}

// A last axis of 1 would broadcast over every dimension, and the policy accept the result.
TEST(Normalizer, RefusesInputsWhoseLastAxisIsNotTheDimensions) {
  const Normalizer n = Normalizer::from_json(
      R"({"mode": "min_max", "state_min": [0, -1, 0, 0], "state_max": [1, 1, 2, 2],
          "action_min": [0, 0], "action_max": [2, 3]})");
  EXPECT_EQ(n.normalize_state(ones({1, 2, 4})).shape(), (Shape{1, 2, 4}));
  EXPECT_THAT(test::error_of([&] {
                n.normalize_state(ones({1, 2, 1}));
              }),
              HasSubstr("Normalizer::normalize_state: input has shape (1,2,1); its last axis must "
                        "be the 4 state dimensions"));
  EXPECT_THAT(test::error_of([&] { n.normalize_action(ones({3})); }),
              HasSubstr("Normalizer::normalize_action: input has shape (3,); its last axis must be "
                        "the 2 action dimensions"));
  EXPECT_THAT(test::error_of([&] {
                n.unnormalize_action(ones({1, 16, 1}));
              }),
              HasSubstr("Normalizer::unnormalize_action: input has shape (1,16,1)"));
  EXPECT_THAT(test::error_of([&] { n.normalize_action(ones({2}, DType::boolean)); }),
              HasSubstr("Normalizer::normalize_action"));
  EXPECT_THAT(test::error_of([&] { Normalizer().normalize_state(ones({4})); }),
              HasSubstr("Normalizer::normalize_state: the normalizer has no state statistics"));
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

// ---------------------------------------------------------------- flow matching and sampling
// A float64 policy with every weight random: adaLN-Zero would otherwise make the velocity 0 and
// the loss and sampler trivially equal to anything that ignores it.
std::unique_ptr<BCPolicy> random_f64_policy(const PolicyConfig& c, Rng& rng) {
  auto policy = std::make_unique<BCPolicy>(c, rng);
  policy->to(DType::f64);
  test::randomize(*policy, rng, 0.3);
  return policy;
}

// models.md: x_t = t z + (1 - t) x0, plus sigma eps when sigma > 0; u = z - x0; the loss is the
// mean over (B, horizon, act_dim) of (u - v)^2 for unpadded actions, padded ones counting in the
// denominator. Here x_t and the mean are written out as loops.
TEST(FlowMatchingLoss, WithSigmaIsTheMeanOverTheNoisedInterpolation) {
  PolicyConfig c = tiny_policy();
  c.sigma = 0.25;
  Rng rng(3);
  const auto policy = random_f64_policy(c, rng);
  const int64_t b = 2, h = c.horizon, a = c.act_dim;
  const Tensor state = rng.normal({b, c.n_obs_steps, c.state_dim}, DType::f64);
  const Tensor z = rng.normal({b, h, a}, DType::f64);
  const FlowNoise noise{rng.normal({b, h, a}, DType::f64),
                        from_vector(std::vector<double>{0.3, 0.8}, {b}, DType::f64),
                        rng.normal({b, h, a}, DType::f64)};
  std::vector<bool> pad(b * h, false);
  pad[h - 1] = pad[2 * h - 2] = pad[2 * h - 1] = true;  // the ends of both chunks
  const Tensor is_pad = from_vector(pad, {b, h});

  const std::vector<double> zv = z.to_vector<double>(), x0 = noise.x0.to_vector<double>(),
                            eps = noise.eps.to_vector<double>(), tv = noise.t.to_vector<double>();
  std::vector<double> x_t(b * h * a);
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 0; j < h * a; ++j) {
      const int64_t e = i * h * a + j;
      x_t[e] = tv[i] * zv[e] + (1 - tv[i]) * x0[e] + c.sigma * eps[e];
    }
  const std::vector<double> v =
      policy->velocity(policy->encode_observations(state), from_vector(x_t, {b, h, a}), noise.t)
          .to_vector<double>();
  double want = 0;
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 0; j < h; ++j)
      for (int64_t k = 0; k < a; ++k) {
        const int64_t e = (i * h + j) * a + k;
        const double r = zv[e] - x0[e] - v[e];
        if (!pad[i * h + j]) want += r * r;
      }
  want /= static_cast<double>(b * h * a);

  const double got = flow_matching_loss(*policy, state, z, is_pad, noise).item();
  EXPECT_NEAR(got, want, 1e-12 * want);
  // eps enters: the same draws without it give a loss a million times the tolerance away.
  FlowNoise no_eps = noise;
  no_eps.eps = zeros({b, h, a}, DType::f64);
  EXPECT_GT(std::abs(flow_matching_loss(*policy, state, z, is_pad, no_eps).item() - want),
            1e-6 * want);
}

// A random float64 tiny policy and a batch of 2 for it, the chunks' last steps padded (the last
// step of the first; with both_ends, the last two of the second too).
struct LossCase {
  std::unique_ptr<BCPolicy> policy;
  int64_t b, h, a;
  Tensor state, action, is_pad;
  std::vector<bool> pad;
};
LossCase loss_case(uint64_t seed, bool both_ends) {
  const PolicyConfig c = tiny_policy();
  Rng rng(seed);
  LossCase l;
  l.policy = random_f64_policy(c, rng);
  l.b = 2, l.h = c.horizon, l.a = c.act_dim;
  l.state = rng.normal({l.b, c.n_obs_steps, c.state_dim}, DType::f64);
  l.action = rng.normal({l.b, l.h, l.a}, DType::f64);
  l.pad.assign(l.b * l.h, false);
  l.pad[l.h - 1] = true;
  if (both_ends) l.pad[2 * l.h - 2] = l.pad[2 * l.h - 1] = true;
  l.is_pad = from_vector(l.pad, {l.b, l.h});
  return l;
}

// The MSE baseline: the velocity at t = 0 on zero actions is the prediction, and the loss the
// mean over (B, horizon, act_dim) of (action - pred)^2 for unpadded actions, padded ones counting
// in the denominator, written out as a loop.
TEST(RegressionLoss, IsTheMeanOverUnpaddedActionsOfTheZeroTimePrediction) {
  const LossCase l = loss_case(4, /*both_ends=*/true);
  const BCPolicy& policy = *l.policy;
  const std::vector<double> pred =
      policy
          .velocity(policy.encode_observations(l.state), zeros({l.b, l.h, l.a}, DType::f64),
                    zeros({l.b}, DType::f64))
          .to_vector<double>();
  const std::vector<double> z = l.action.to_vector<double>();
  double want = 0;
  for (int64_t i = 0; i < l.b * l.h; ++i)
    for (int64_t k = 0; k < l.a; ++k) {
      const double r = z[i * l.a + k] - pred[i * l.a + k];
      if (!l.pad[i]) want += r * r;
    }
  want /= static_cast<double>(l.b * l.h * l.a);
  EXPECT_EQ(regress_actions(policy, l.state).to_vector<double>(), pred);
  EXPECT_NEAR(regression_loss(policy, l.state, l.action, l.is_pad).item(), want, 1e-12 * want);
  // The padded steps matter: without the mask the loss is another number.
  const Tensor no_pad = zeros({l.b, l.h}, DType::boolean);
  EXPECT_GT(std::abs(regression_loss(policy, l.state, l.action, no_pad).item() - want),
            1e-3 * want);
}

// Both losses' gradients with respect to every parameter tensor of a float64 policy (three
// elements of each), against central differences.
TEST(PolicyLosses, GradientsMatchCentralDifferences) {
  const LossCase l = loss_case(5, /*both_ends=*/false);
  const BCPolicy& policy = *l.policy;
  Rng rng(6);
  const FlowNoise noise{rng.normal({l.b, l.h, l.a}, DType::f64),
                        from_vector(std::vector<double>{0.3, 0.8}, {l.b}, DType::f64), Tensor()};
  GradcheckOptions options;
  options.sample = 3;
  const NamedTensors params = l.policy->named_parameters();
  const GradcheckResult flow =
      gradcheck([&] { return flow_matching_loss(policy, l.state, l.action, l.is_pad, noise); },
                params, options);
  EXPECT_TRUE(flow.ok) << flow.report();
  int64_t sampled = 0;
  for (const auto& [name, p] : params) sampled += std::min<int64_t>(3, p.numel());
  EXPECT_EQ(flow.checked, sampled);
  const GradcheckResult mse = gradcheck(
      [&] { return regression_loss(policy, l.state, l.action, l.is_pad); }, params, options);
  EXPECT_TRUE(mse.ok) << mse.report();
}

// models.md: a = a0; a += v(a, t_k) (t_{k+1} - t_k) with t_k = k max_t / steps, written out
// here with the policy's velocity at max_t = 0.5.
TEST(EulerSampler, WithMaxTIsTheEulerLoopOverKMaxTOverSteps) {
  Rng rng(5);
  const PolicyConfig c = tiny_policy();
  const auto policy = random_f64_policy(c, rng);
  const int64_t b = 2, steps = 3;
  const double max_t = 0.5;
  const Tensor state = rng.normal({b, c.n_obs_steps, c.state_dim}, DType::f64);
  const Tensor a0 = rng.normal({b, c.horizon, c.act_dim}, DType::f64);
  const Tensor obs = policy->encode_observations(state);
  Tensor a = a0;
  for (int64_t k = 0; k < steps; ++k) {
    const double t_k = k * max_t / steps, t_next = (k + 1) * max_t / steps;
    a = a + policy->velocity(obs, a, full({b}, t_k, DType::f64)) * (t_next - t_k);
  }
  EXPECT_LT(test::max_abs_diff(sample_actions(*policy, state, a0, steps, max_t), a), 1e-12);
  EXPECT_LT(test::max_abs_diff(EulerSampler(*policy, steps, max_t, std::nullopt)(state, a0), a),
            1e-12);
  // max_t matters: the loop moved away from a0, and the full-length schedule ends elsewhere.
  EXPECT_GT(test::max_abs_diff(a, a0), 0.1);
  EXPECT_GT(test::max_abs_diff(sample_actions(*policy, state, a0, steps, 1.0), a), 0.1);
}

// With sigma > 0 the reference's sampler takes each velocity at a + sigma N(0, 1), fresh noise
// every step (conditional_prob_path(t, a, a)): a += v(a + sigma eps_k, t_k) (t_{k+1} - t_k),
// written out here with the draws of an Rng of the same seed.
TEST(EulerSampler, WithSigmaTakesEachVelocityAtTheNoisedAction) {
  Rng rng(6);
  PolicyConfig c = tiny_policy();
  c.sigma = 0.3;
  const auto policy = random_f64_policy(c, rng);
  const int64_t b = 2, steps = 3;
  const Tensor state = rng.normal({b, c.n_obs_steps, c.state_dim}, DType::f64);
  const Tensor a0 = rng.normal({b, c.horizon, c.act_dim}, DType::f64);
  const Tensor obs = policy->encode_observations(state);
  Rng draws(42);
  Tensor a = a0;
  for (int64_t k = 0; k < steps; ++k) {
    const double t_k = static_cast<double>(k) / steps, t_next = (k + 1.0) / steps;
    const Tensor x_t = a + draws.normal(a.shape(), DType::f64) * c.sigma;
    a = a + policy->velocity(obs, x_t, full({b}, t_k, DType::f64)) * (t_next - t_k);
  }
  Rng noise(42);
  EXPECT_LT(test::max_abs_diff(sample_actions(*policy, state, a0, steps, 1.0, &noise), a), 1e-12);
  Rng sampler_noise(42);
  EXPECT_LT(test::max_abs_diff(
                EulerSampler(*policy, steps, 1.0, std::nullopt)(state, a0, &sampler_noise), a),
            1e-12);
  // The noise matters, and without an Rng the policy is refused rather than sampled at sigma 0.
  Rng other(43);
  EXPECT_GT(test::max_abs_diff(sample_actions(*policy, state, a0, steps, 1.0, &other), a), 1e-3);
  EXPECT_THAT(test::error_of([&] { sample_actions(*policy, state, a0, steps); }),
              HasSubstr("sample: the policy's sigma is 0.3, so each step's velocity is taken at "
                        "a + sigma * N(0, 1), as the reference does; pass an Rng"));
  EXPECT_THAT(test::error_of([&] { EulerSampler(*policy, steps)(state, a0); }),
              HasSubstr("pass an Rng"));
}

// A packed sampler's actions as a constant target inside value_and_grad (the tape watches the
// policy's weights): its products run on the weights themselves there, and it was refused.
TEST(EulerSampler, RunsInsideValueAndGradAsAConstantTarget) {
  Rng rng(8);
  const PolicyConfig c = tiny_policy();
  BCPolicy policy(c, rng);
  test::randomize(policy, rng, 0.3);
  const Tensor state = rng.normal({2, c.n_obs_steps, c.state_dim});
  const Tensor a0 = rng.normal({2, c.horizon, c.act_dim});
  const Tensor outside = EulerSampler(policy, 2)(state, a0);
  Tensor target;
  const auto [loss, grads] = value_and_grad([&](const BCPolicy& p) {
    target = EulerSampler(p, 2)(state, a0);
    return mean(square(regress_actions(p, state) - target));
  })(policy);
  EXPECT_LT(test::max_abs_diff(target, outside), 1e-5);
  EXPECT_TRUE(std::isfinite(loss.item()));
  EXPECT_EQ(grads.size(), policy.named_parameters().size());
}

// bfloat16 weights asked for on a float64 policy were silently not used; a sampler whose policy
// changed dtype failed in layer_norm_modulate's dtype check.
TEST(EulerSampler, RefusesWhatItCannotDoForTheDtypeAndSaysSo) {
  Rng rng(0);
  BCPolicy policy(tiny_policy(), rng);
  const EulerSampler f32_sampler(policy, 2);
  policy.to(DType::f64);
  EXPECT_EQ(test::error_of([&] { EulerSampler(policy, 2, 1.0, WeightPrecision::bf16); }),
            "EulerSampler: bfloat16 packed weights need a float32 policy; this one is float64");
  const Tensor state = zeros({1, 2, 3}, DType::f64), a0 = zeros({1, 5, 2}, DType::f64);
  EXPECT_EQ(test::error_of([&] { f32_sampler(state, a0); }),
            "EulerSampler: the policy is now float64, its schedule was computed in float32; make "
            "a new sampler after policy.to(...) or load(...)");
  // float32 packing on a float64 policy runs the exact plain products.
  EXPECT_LT(
      test::max_abs_diff(EulerSampler(policy, 2)(state, a0), sample_actions(policy, state, a0, 2)),
      1e-15);
}

TEST(EulerSampler, RejectsAMaxTThatIsNotFiniteAndPositive) {
  Rng rng(0);
  const BCPolicy policy(tiny_policy(), rng);
  for (const double max_t : std::vector<double>{0.0, -0.5, NAN, INFINITY}) {
    std::ostringstream shown;
    shown << max_t;
    EXPECT_EQ(test::error_of([&] { EulerSampler(policy, 4, max_t); }),
              "sample: max_t must be finite and > 0, got " + shown.str());
    EXPECT_EQ(test::error_of([&] {
                sample_actions(policy, zeros({1, 2, 3}), zeros({1, 5, 2}), 4, max_t);
              }),
              "sample: max_t must be finite and > 0, got " + shown.str());
  }
}

// ---------------------------------------------------------------- position buffers
// models.md: sincos(d, L)[p] = timestep_embedding(p, d) = [cos(p f), sin(p f)], cos first,
// f_j = exp(-ln(10000) j / half), half = d / 2; the state rows at p = 0 .. n_obs - 1, the action
// rows at p = 100 .. 100 + horizon - 1. Written out in float64.
std::vector<double> hand_table(int64_t dim, int64_t first, int64_t length) {
  const int64_t half = dim / 2;
  std::vector<double> out(length * dim, 0.0);
  for (int64_t r = 0; r < length; ++r)
    for (int64_t j = 0; j < half; ++j) {
      const double angle = static_cast<double>(first + r) * std::exp(-std::log(10000.0) * j / half);
      out[r * dim + j] = std::cos(angle);
      out[r * dim + half + j] = std::sin(angle);
    }
  return out;
}

// max over the elements of |got - want| / bound(want).
template <class Bound>
double worst(const Tensor& got, const std::vector<double>& want, Bound bound) {
  const std::vector<double> g = got.to_vector<double>();
  EXPECT_EQ(g.size(), want.size());
  double w = 0;
  for (size_t i = 0; i < g.size() && i < want.size(); ++i)
    w = std::max(w, std::abs(g[i] - want[i]) / bound(want[i]));
  return w;
}

TEST(BCPolicy, PositionBuffersAreTheFloat64TableRoundedOnce) {
  PolicyConfig c = tiny_policy();
  c.hidden_size = 32;
  c.horizon = 16;
  Rng rng(0);
  BCPolicy policy(c, rng);
  const std::vector<double> state = hand_table(32, 0, c.n_obs_steps);
  const std::vector<double> action = hand_table(32, 100, c.horizon);
  // float32: within half an ulp of the exact value, |x| 2^-24 (plus float64's own rounding).
  const auto half_ulp_f32 = [](double x) { return std::ldexp(std::abs(x), -24) + 1e-15; };
  EXPECT_EQ(policy.state_pos_embed.dtype(), DType::f32);
  EXPECT_LE(worst(policy.state_pos_embed, state, half_ulp_f32), 1.0);
  EXPECT_LE(worst(policy.action_pos_embed, action, half_ulp_f32), 1.0);
  // float64: the table itself, not the float32 one widened.
  policy.to(DType::f64);
  const auto absolute = [](double) { return 1.0; };
  const NamedTensors buffers = policy.named_buffers();
  EXPECT_EQ(buffers.at("state_pos_embed").dtype(), DType::f64);
  EXPECT_LE(worst(buffers.at("state_pos_embed"), state, absolute), 1e-15);
  EXPECT_LE(worst(buffers.at("action_pos_embed"), action, absolute), 1e-15);
  // And back: float32 again is the table rounded once, whatever the policy was before.
  policy.to(DType::f32);
  EXPECT_LE(worst(policy.action_pos_embed, action, half_ulp_f32), 1.0);
  // The same through a module that holds the policy, as a user's wrapper would.
  struct Holder : nn::Module {
    BCPolicy& policy;
    explicit Holder(BCPolicy& p) : policy(p) { register_module("policy", policy); }
  } holder(policy);
  static_cast<nn::Module&>(holder).to(DType::f64);
  EXPECT_LE(worst(policy.action_pos_embed, action, absolute), 1e-15);
}

// ---------------------------------------------------------------- parity cases
const ParityRow* row_named(const ParityReport& report, const std::string& name) {
  for (const ParityRow& r : report.rows)
    if (r.name == name) return &r;
  return nullptr;
}

// The buffers the policy builds, compared with the case's before the case's replace them: the
// reference computes its tables in float32 (within a few 1e-6 of exact), the pure_f64 cases in
// float64.
TEST(PolicyParity, ComparesThePolicysOwnPositionBuffers) {
  const std::string data = MMDIT_TEST_DATA;
  for (const std::string kind : {"bc_train_step", "bc_sample"}) {
    struct Run {
      std::string path;
      DType dtype;
      std::optional<double> tolerance;
      double bound;
    };
    for (const Run& run :
         {Run{data + "/" + kind + ".safetensors", DType::f32, {}, 1e-5},
          Run{data + "/" + kind + ".safetensors", DType::f64, {}, 1e-5},
          Run{data + "/pure_f64/" + kind + ".safetensors", DType::f64, 1e-9, 1e-14}}) {
      const ParityReport report = run_parity(run.path, run.dtype, run.tolerance);
      EXPECT_TRUE(report.ok()) << report.table();
      for (const std::string buffer : {"state_pos_embed", "action_pos_embed"}) {
        const ParityRow* row = row_named(report, "buffer/" + buffer);
        ASSERT_NE(row, nullptr) << run.path << " has no row for " << buffer;
        EXPECT_TRUE(row->pass) << report.table();
        EXPECT_LT(row->rel_error, run.bound) << run.path << " " << buffer;
      }
    }
  }
}

// A case whose action buffer has its rows at positions 0.. instead of 100..: the row compares it
// with the policy's own table and fails by the difference, about 1.
TEST(PolicyParity, ABufferThatDiffersFromThePolicysFailsItsRow) {
  const SafetensorsFile f =
      load_safetensors(std::string(MMDIT_TEST_DATA) + "/bc_sample.safetensors");
  NamedTensors tensors = f.tensors;
  const Shape shape = tensors.at("buffer/action_pos_embed").shape();
  tensors.at("buffer/action_pos_embed") =
      from_vector(hand_table(shape[1], 0, shape[0]), shape, DType::f64);
  test::TempDir dir;
  save_safetensors(dir.file("case.safetensors"), tensors, f.metadata);
  const ParityReport report = run_parity(dir.file("case.safetensors"), DType::f64);
  EXPECT_FALSE(report.ok());
  const ParityRow* action = row_named(report, "buffer/action_pos_embed");
  ASSERT_NE(action, nullptr) << report.table();
  EXPECT_FALSE(action->pass);
  EXPECT_GT(action->rel_error, 0.5);
  const ParityRow* state = row_named(report, "buffer/state_pos_embed");
  ASSERT_NE(state, nullptr) << report.table();
  EXPECT_TRUE(state->pass);
}

TEST(Parity, ToleranceMustBeFiniteAndNonNegative) {
  const std::string path = std::string(MMDIT_TEST_DATA) + "/rms_norm.safetensors";
  for (const double tolerance : {-1.0, std::nan(""), std::numeric_limits<double>::infinity()})
    EXPECT_THAT([&] { run_parity(path, DType::f32, tolerance); },
                testing::ThrowsMessage<Error>(
                    HasSubstr("parity: the tolerance must be finite and >= 0, got ")))
        << tolerance;
  EXPECT_TRUE(run_parity(path, DType::f64, 1e-5).ok());
}

}  // namespace
}  // namespace mmdit
