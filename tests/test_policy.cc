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

}  // namespace
}  // namespace mmdit
