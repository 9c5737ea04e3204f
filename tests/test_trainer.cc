// The trainer: optimiser arithmetic against closed forms, exact resume, checkpoints, configs,
// and `mmdit train` end to end on datasets the test writes (LeRobot .npz and robomimic HDF5).
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <hdf5.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include <bit>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include "autodiff/ops.h"
#include "autodiff/tape.h"
#include "tensor/file_io.h"
#include "tensor/parallel.h"
#include "tensor/safetensors.h"
#include "tests/test_util.h"
#include "train/demo_task.h"
#include "train/equinox.h"
#include "train/npy.h"
#include "train/trainer.h"
#include "train/training_state.h"

namespace mmdit {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
namespace fs = std::filesystem;

std::string temp_dir(const std::string& name) {
  const fs::path dir =
      fs::path(::testing::TempDir()) / ("mmdit_trainer_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

TrainConfig tiny_config(const Episodes& data) {
  TrainConfig c;
  c.policy.state_dim = data.state_dim();
  c.policy.act_dim = data.act_dim();
  c.policy.n_obs_steps = 2;
  c.policy.horizon = 4;
  c.policy.hidden_size = 16;
  c.policy.depth = 1;
  c.policy.dim_cond = 16;
  c.policy.timestep_embed_dim = 8;
  c.policy.dim_head = 8;
  c.policy.heads = 2;
  c.policy.ff_mult = 2;
  c.batch_size = 8;
  c.steps = 20;
  c.lr = 1e-3;
  c.weight_decay = 1e-2;
  c.grad_clip = 1.0;
  c.warmup_steps = 3;
  c.cosine_decay = true;
  c.seed = 7;
  return c;
}

Episodes demo_episodes(int64_t n = 6) {
  const DemoTask task;
  const DemoTask::Demos d = task.generate_demos(n, 3);
  return Episodes{d.states, d.actions, d.episode_starts};
}

// The checkpoint of an untrained tiny policy on `data`, saved as dir/c.safetensors.
std::string fresh_checkpoint(const Episodes& data, const test::TempDir& dir) {
  const std::string path = dir.file("c.safetensors");
  Trainer(tiny_config(data), data).save_checkpoint(path);
  return path;
}

// ---------------------------------------------------------------- optimiser arithmetic
TEST(AdamW, MatchesTheOptaxFormulaInFloat64) {
  Tensor p = from_vector(std::vector<double>{0.5, -1.0, 2.0}, {3});
  NamedTensors params;
  params.insert("p", p);
  AdamW opt(params, {/*lr=*/0.1, 0.9, 0.999, 1e-8, /*weight_decay=*/0.01});
  const std::vector<std::vector<double>> grads = {{0.3, -0.2, 0.0}, {0.1, 0.4, -0.5}};
  std::vector<double> ref = {0.5, -1.0, 2.0}, m(3, 0), v(3, 0);
  for (int t = 1; t <= 2; ++t) {
    NamedTensors g;
    g.insert("p", from_vector(grads[t - 1], {3}));
    opt.update(params, g);
    for (int i = 0; i < 3; ++i) {
      m[i] = 0.1 * grads[t - 1][i] + 0.9 * m[i];
      v[i] = 0.001 * grads[t - 1][i] * grads[t - 1][i] + 0.999 * v[i];
      const double u =
          (m[i] / (1 - std::pow(0.9, t))) / (std::sqrt(v[i] / (1 - std::pow(0.999, t))) + 1e-8);
      ref[i] -= 0.1 * (u + 0.01 * ref[i]);
    }
  }
  const auto got = p.to_vector<double>();
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(got[i], ref[i], 1e-15) << i;
  EXPECT_EQ(opt.step(), 2);
}

TEST(AdamW, WeightDecayAppliesWithZeroGradient) {
  Tensor p = from_vector(std::vector<float>{1.0f, -3.0f}, {2});
  NamedTensors params;
  params.insert("p", p);
  AdamW opt(params, {1e-2, 0.9, 0.999, 1e-8, 0.1});
  NamedTensors g;
  g.insert("p", zeros({2}));
  opt.update(params, g);
  EXPECT_FLOAT_EQ(p.to_vector<float>()[0], 1.0f - 1e-3f);
  EXPECT_FLOAT_EQ(p.to_vector<float>()[1], -3.0f + 3e-3f);
}

// optax.adamw(1e-2) decays by its default weight_decay 1e-4: with a zero gradient, one step
// takes p to p (1 - 1e-2 * 1e-4). AdamWConfig{.lr = 1e-2} is the same optimiser.
TEST(AdamW, DefaultsAreOptaxAdamws) {
  Tensor p = from_vector(std::vector<double>{1.0, -3.0}, {2});
  NamedTensors params;
  params.insert("p", p);
  AdamW opt(params, {.lr = 1e-2});
  NamedTensors g;
  g.insert("p", zeros({2}, DType::f64));
  opt.update(params, g);
  EXPECT_DOUBLE_EQ(p.to_vector<double>()[0], 1.0 - 1e-6);
  EXPECT_DOUBLE_EQ(p.to_vector<double>()[1], -3.0 + 3e-6);
  const AdamWConfig defaults;
  EXPECT_EQ(defaults.b1, 0.9);
  EXPECT_EQ(defaults.b2, 0.999);
  EXPECT_EQ(defaults.eps, 1e-8);
}

// In float32 the steps are the float64 formula rounded, to a few ulps: the first step is
// -lr g / (|g| + eps), and later steps follow a float64 recomputation. Large lr and p = 0 make
// the step itself the result, so a relative error in it shows.
TEST(AdamW, Float32FollowsTheFloat64Formula) {
  const std::vector<std::vector<double>> grads = {{1.0, -3.0, 0.5, 1e-3, 0.0},
                                                  {0.2, 0.7, -0.5, 2e-3, 1.0}};
  NamedTensors params;
  params.insert("p", zeros({5}));
  AdamW opt(params, {/*lr=*/1.0, 0.9, 0.999, 1e-8, /*weight_decay=*/0.0});
  std::vector<double> ref(5, 0.0), m(5, 0.0), v(5, 0.0);
  for (int t = 1; t <= 2; ++t) {
    NamedTensors g;
    g.insert("p", from_vector(grads[t - 1], {5}, DType::f32));
    opt.update(params, g);
    const std::vector<float> got = params.at("p").to_vector<float>();
    for (int i = 0; i < 5; ++i) {
      const double gi = static_cast<float>(grads[t - 1][i]);
      m[i] = 0.1 * gi + 0.9 * m[i];
      v[i] = 0.001 * gi * gi + 0.999 * v[i];
      ref[i] -=
          (m[i] / (1 - std::pow(0.9, t))) / (std::sqrt(v[i] / (1 - std::pow(0.999, t))) + 1e-8);
      if (t == 1 && gi != 0) {
        EXPECT_NEAR(ref[i], -gi / (std::abs(gi) + 1e-8), 1e-15);
      }
      EXPECT_NEAR(got[i], ref[i], 4 * 6e-8 * std::abs(ref[i])) << "step " << t << ", " << i;
    }
  }
}

TEST(Optim, GlobalNormClippingAndSchedule) {
  NamedTensors g;
  g.insert("a", from_vector({3.0f}, {1}));
  g.insert("b", from_vector({4.0f}, {1}));
  EXPECT_DOUBLE_EQ(clip_by_global_norm(g, 1.0), 5.0);
  EXPECT_NEAR(g.at("a").item(), 0.6, 1e-7);
  EXPECT_NEAR(g.at("b").item(), 0.8, 1e-7);
  EXPECT_NEAR(clip_by_global_norm(g, 10.0), 1.0, 1e-6);  // below the limit: unchanged
  EXPECT_NEAR(g.at("b").item(), 0.8, 1e-7);
  EXPECT_DOUBLE_EQ(warmup_cosine_lr(0, 1.0, 10, 110), 0.0);
  EXPECT_DOUBLE_EQ(warmup_cosine_lr(5, 1.0, 10, 110), 0.5);
  EXPECT_DOUBLE_EQ(warmup_cosine_lr(10, 1.0, 10, 110), 1.0);
  EXPECT_NEAR(warmup_cosine_lr(60, 1.0, 10, 110), 0.5, 1e-12);
  EXPECT_NEAR(warmup_cosine_lr(110, 1.0, 10, 110, 0.1), 0.1, 1e-12);
  // optax's cosine schedule stays at its end value past the last step (a library user may step
  // a Trainer past config.steps).
  for (int64_t step : {111, 160, 210, 10000})
    EXPECT_NEAR(warmup_cosine_lr(step, 1.0, 10, 110, 0.1), 0.1, 1e-12) << step;
  EXPECT_DOUBLE_EQ(warmup_cosine_lr(500, 2.0, 0, 0), 2.0);
}

// Sizes that leave a tail after the 8-wide loop and span several parallel chunks, in both
// dtypes, against a plain long-double sum.
TEST(Optim, GlobalNormMatchesPlainSum) {
  Rng rng(5);
  NamedTensors g;
  g.insert("one", rng.normal({1}));
  g.insert("tail", rng.normal({7, 3}));
  g.insert("chunks", rng.normal({16384 * 3 + 5}));
  g.insert("f64", rng.normal({1001}, DType::f64));
  long double expected = 0;
  for (const auto& [name, t] : g) {
    const Tensor d = raw::to_dtype(t, DType::f64);
    for (double x : d.to_vector<double>()) expected += static_cast<long double>(x) * x;
  }
  const double norm = global_norm(g);
  EXPECT_NEAR(norm, std::sqrt(static_cast<double>(expected)), 1e-13 * norm);
}

TEST(EMA, ClosedForm) {
  Tensor p = from_vector({1.0f, 2.0f}, {2});
  NamedTensors params;
  params.insert("p", p);
  EMA ema(params, 0.9);
  raw::copy_into(p, from_vector({3.0f, 0.0f}, {2}));
  ema.update(params);
  EXPECT_FLOAT_EQ(ema.params().at("p").to_vector<float>()[0], 0.9f * 1 + 0.1f * 3);
  EXPECT_FLOAT_EQ(ema.params().at("p").to_vector<float>()[1], 0.9f * 2);
}

// The EMA's rate is 1 - decay, rounded once: in float32, with decay 0.99999, from 0 towards 1 the
// EMA moves by 1e-5 (to an ulp), both alone and inside the fused update.
TEST(EMA, RateIsOneMinusDecayInFloat32) {
  NamedTensors params;
  params.insert("p", zeros({3}));
  EMA alone(params, 0.99999), fused(params, 0.99999);
  raw::copy_into(params.at("p"), full({3}, 1.0));
  alone.update(params);
  EXPECT_NEAR(alone.params().at("p").to_vector<float>()[0], 1e-5, 1e-5 * 1.2e-7);
  NamedTensors zero_grad;
  zero_grad.insert("p", zeros({3}));
  AdamW(params, {1e-3, 0.9, 0.999, 1e-8, 0.0}).update(params, zero_grad, 0.0, 1.0, &fused);
  EXPECT_NEAR(fused.params().at("p").to_vector<float>()[0], 1e-5, 1e-5 * 1.2e-7);
}

// The fused pass (clip scale and EMA inside AdamW::update, or update_clipped) against the three
// separate calls, bit for bit, on tensors large enough to be split into parallel chunks.
TEST(AdamW, FusedClipAndEmaEqualSeparateCalls) {
  Rng rng(3);
  auto make = [&](uint64_t seed) {
    Rng r(seed);
    NamedTensors t;
    t.insert("w", r.normal({300, 200}));
    t.insert("b", r.normal({7}));
    return t;
  };
  NamedTensors p1 = make(1), p2 = make(1), p3 = make(1);
  const AdamWConfig config{1e-2, 0.9, 0.999, 1e-8, 0.01};
  AdamW opt1(p1, config), opt2(p2, config), opt3(p3, config);
  EMA ema1(p1, 0.99), ema2(p2, 0.99), ema3(p3, 0.99);
  for (int step = 0; step < 3; ++step) {
    NamedTensors g1 = make(10 + step), g2 = make(10 + step), g3 = make(10 + step);
    const double norm = global_norm(g1);
    EXPECT_GT(norm, 1.0);
    EXPECT_NEAR(norm, clip_by_global_norm(g2, 1.0), 1e-9 * norm);
    EXPECT_EQ(opt1.update(p1, g1, 1e-2, clip_scale(norm, 1.0), &ema1), norm);
    opt2.update(p2, g2, 1e-2);
    ema2.update(p2);
    EXPECT_EQ(opt3.update_clipped(p3, g3, 1e-2, 1.0, &ema3), norm);
  }
  for (const char* name : {"w", "b"}) {
    EXPECT_TRUE(p3.at(name).to_vector<float>() == p1.at(name).to_vector<float>());
    EXPECT_TRUE(ema3.params().at(name).to_vector<float>() ==
                ema1.params().at(name).to_vector<float>());
    EXPECT_EQ(raw::max(raw::unary(raw::UnaryOp::abs, raw::sub(p1.at(name), p2.at(name)))).item(),
              0);
    EXPECT_EQ(raw::max(raw::unary(raw::UnaryOp::abs,
                                  raw::sub(ema1.params().at(name), ema2.params().at(name))))
                  .item(),
              0);
  }
}

// A gradient that is not finite, or an EMA of another dtype, is refused before anything changes:
// parameters, moments, step and EMA stay as they were, and the message names the tensor.
// The optimiser's in-place step counts as a change: a tape recorded before it refuses to
// compute gradients from the stepped parameters.
TEST(AdamW, AStepBeforeGradientIsRefusedByTheTape) {
  const Tensor w = from_vector(std::vector<double>{1.0, -2.0}, {2});
  NamedTensors params, grads;
  params.insert("w", w);
  grads.insert("w", from_vector(std::vector<double>{1.0, 1.0}, {2}));
  AdamW opt(params, {1e-2, 0.9, 0.999, 1e-8, 0.0});
  Tape tape;
  tape.watch(w);
  const Tensor loss = sum(square(w));
  opt.update(params, grads);
  EXPECT_THAT(test::error_of([&] { tape.gradient(loss, {w}); }),
              HasSubstr("square (node 0, recorded in scope '<root>') saved a (2,) float64 tensor"));
}

// Settings and states that would turn every parameter into NaN (b1 = 1, a NaN lr, a negative
// second moment), or reverse the gradients (a negative clipping norm), are refused: each did it
// without a word.
TEST(AdamW, RefusesSettingsAndStatesThatWouldCorruptTheParameters) {
  const auto one = [](std::vector<float> v) {
    NamedTensors t;
    t.insert("w", from_vector(v, {2}));
    return t;
  };
  const NamedTensors params = one({1, 2}), grads = one({1, 1});
  EXPECT_THAT(test::error_of([&] {
                AdamW(params, {1e-3, 1.0, 0.999, 1e-8, 0.0});
              }),
              HasSubstr("AdamW: b1 and b2 must be in [0, 1)"));
  EXPECT_THAT(test::error_of([&] {
                AdamW(params, {NAN, 0.9, 0.999, 1e-8, 0.0});
              }),
              HasSubstr("AdamW: lr must be finite and >= 0, got nan"));
  AdamW opt(params, {1e-3, 0.9, 0.999, 1e-8, 0.0});
  EXPECT_THAT(test::error_of([&] { opt.update(params, grads, NAN); }),
              HasSubstr("AdamW::update: lr must be finite and >= 0, got nan"));
  EXPECT_THAT(test::error_of([&] { opt.update_clipped(params, grads, 1e-3, -1.0); }),
              HasSubstr("max_norm must be finite and >= 0 (0: no clipping), got -1"));
  NamedTensors undefined, flags;
  undefined.insert("w", Tensor());
  flags.insert("w", ones({2}, DType::boolean));
  EXPECT_THAT(test::error_of([&] { opt.update(params, undefined); }),
              HasSubstr("AdamW::update: the tensor for 'w' is undefined"));
  EXPECT_THAT(test::error_of([&] { opt.update(params, flags); }),
              HasSubstr("AdamW::update: 'w' is bool; expected a float tensor"));
  EXPECT_THAT(test::error_of([&] {
                opt.set_state(1, one({0, 0}), one({-1, 0}));
              }),
              HasSubstr("AdamW::set_state: second moment 'w' holds a negative value"));
  EXPECT_THAT(test::error_of([&] {
                opt.set_state(1, one({NAN, 0}), one({0, 0}));
              }),
              HasSubstr("AdamW::set_state: first moment 'w' holds nan at (0,)"));
  EXPECT_EQ(opt.step(), 0);
  EXPECT_EQ(params.at("w").to_vector<float>(), (std::vector<float>{1, 2}));
  NamedTensors g = one({3, 4});
  EXPECT_THAT(test::error_of([&] { clip_by_global_norm(g, -1.0); }),
              HasSubstr("clip_by_global_norm: max_norm must be positive, got -1"));
  EXPECT_THAT(test::error_of([&] { clip_by_global_norm(g, 0.0); }), HasSubstr("got 0"));
  EXPECT_EQ(g.at("w").to_vector<float>(), (std::vector<float>{3, 4}));
}

TEST(AdamW, RefusesBadInputBeforeChangingAnything) {
  NamedTensors params;
  params.insert("a", from_vector({1.0f, -2.0f, 3.0f}, {3}));
  params.insert("b", from_vector({0.5f, 0.25f}, {2}));
  AdamW opt(params, {0.1, 0.9, 0.999, 1e-8, 0.01});
  EMA ema(params, 0.9);
  NamedTensors good;
  good.insert("a", from_vector({0.1f, 0.2f, 0.3f}, {3}));
  good.insert("b", from_vector({-0.1f, 0.4f}, {2}));
  opt.update(params, good, 0.1, 1.0, &ema);  // moments and EMA no longer trivial
  auto snapshot = [&] {
    std::vector<std::vector<float>> s;
    const NamedTensors& p = params;
    for (const NamedTensors* t : {&p, &opt.first_moments(), &opt.second_moments(), &ema.params()})
      for (const auto& [name, x] : *t) s.push_back(x.to_vector<float>());
    return s;
  };
  const auto before = snapshot();
  NamedTensors bad;
  bad.insert("a", from_vector({0.1f, 0.2f, 0.3f}, {3}));
  bad.insert("b", from_vector({-0.1f, NAN}, {2}));
  EXPECT_EQ(test::error_of([&] { opt.update(params, bad, 0.1, 1.0, &ema); }),
            "AdamW::update: the gradient of 'b' holds nan at (1,); nothing was updated");
  EXPECT_EQ(opt.step(), 1);
  EXPECT_EQ(snapshot(), before);
  NamedTensors mixed;
  mixed.insert("a", params.at("a"));
  mixed.insert("b", raw::to_dtype(params.at("b"), DType::f64));
  EMA other(mixed, 0.9);
  EXPECT_EQ(test::error_of([&] { opt.update(params, good, 0.1, 1.0, &other); }),
            "AdamW::update: the EMA of 'b' is float64, the parameter float32");
  EXPECT_EQ(opt.step(), 1);
  EXPECT_EQ(snapshot(), before);
  // A strided view would be updated in storage order, against the gradient's element order.
  NamedTensors square;
  square.insert("w", from_vector({1.0f, 2.0f, 3.0f, 4.0f}, {2, 2}));
  AdamW sq(square, {});
  NamedTensors view, grad;
  view.insert("w", raw::transpose(square.at("w"), 0, 1));
  grad.insert("w", from_vector({1.0f, 0.0f, 0.0f, 0.0f}, {2, 2}));
  EXPECT_EQ(test::error_of([&] { sq.update(view, grad); }),
            "AdamW::update: parameter 'w' must be a contiguous float tensor");
  EXPECT_EQ(sq.step(), 0);
}

// Resuming AdamW from its saved moments and step continues bit for bit: the bias correction
// of step 2 uses t = 2, not 1.
TEST(AdamW, SetStateContinuesBitForBit) {
  auto make = [](uint64_t seed) {
    Rng r(seed);
    NamedTensors t;
    t.insert("w", r.normal({40, 3}));
    t.insert("b", r.normal({3}, DType::f64));
    return t;
  };
  const AdamWConfig config{1e-2, 0.9, 0.999, 1e-8, 0.01};
  NamedTensors straight = make(1), resumed = make(1);
  AdamW a(straight, config), first(resumed, config);
  a.update(straight, make(10));
  first.update(resumed, make(10));
  AdamW second(resumed, config);
  second.set_state(first.step(), first.first_moments(), first.second_moments());
  for (uint64_t s = 11; s < 13; ++s) {
    a.update(straight, make(s));
    second.update(resumed, make(s));
  }
  EXPECT_EQ(second.step(), 3);
  for (const char* name : {"w", "b"}) {
    const Tensor x = raw::to_dtype(straight.at(name), DType::f64);
    const Tensor y = raw::to_dtype(resumed.at(name), DType::f64);
    EXPECT_EQ(x.to_vector<double>(), y.to_vector<double>()) << name;
  }
}

// The optimiser's arithmetic does not depend on the thread count: chunks are fixed in size and
// their partial sums added in order.
TEST(AdamW, SameResultOnOneAndTwoThreads) {
  auto run = [](int threads) {
    const int before = num_threads();
    set_num_threads(threads);
    Rng r(4);
    NamedTensors p;
    p.insert("w", r.normal({5, 16384 + 3}));
    p.insert("d", r.normal({70000}, DType::f64));
    AdamW opt(p, {1e-2, 0.9, 0.999, 1e-8, 0.01});
    EMA ema(p, 0.99);
    std::vector<double> norms;
    for (int step = 0; step < 2; ++step) {
      NamedTensors g;
      g.insert("w", r.normal({5, 16384 + 3}));
      g.insert("d", r.normal({70000}, DType::f64));
      norms.push_back(clip_by_global_norm(g, 100.0));
      norms.push_back(opt.update(p, g, 1e-2, 0.5, &ema));
    }
    std::vector<double> out = norms;
    const NamedTensors& params = p;
    for (const NamedTensors* t : {&params, &ema.params(), &opt.second_moments()})
      for (const auto& [name, x] : *t)
        for (double d : raw::to_dtype(x, DType::f64).to_vector<double>()) out.push_back(d);
    set_num_threads(before);
    return out;
  };
  EXPECT_TRUE(run(1) == run(2));
}

TEST(Normalizer, MinMaxRoundTripAndJson) {
  const Episodes data = demo_episodes();
  const Normalizer n = make_normalizer(data, "min_max");
  const Tensor a = n.normalize_action(data.actions);
  EXPECT_GE(raw::max(raw::unary(raw::UnaryOp::abs, a)).item(), 0.99);
  EXPECT_LE(raw::max(raw::unary(raw::UnaryOp::abs, a)).item(), 1.0 + 1e-6);
  const Tensor back = n.unnormalize_action(a);
  EXPECT_LT(raw::max(raw::unary(raw::UnaryOp::abs, raw::sub(back, data.actions))).item(), 1e-6);
  const Normalizer j = Normalizer::from_json(n.to_json());
  EXPECT_EQ(j.action_max.to_vector<float>(), n.action_max.to_vector<float>());
  EXPECT_EQ(j.state_std.to_vector<float>(), n.state_std.to_vector<float>());
  const Normalizer z = make_normalizer(data, "z_score");
  const Tensor zs = z.normalize_state(data.states);
  EXPECT_NEAR(raw::mean(zs, {0}).to_vector<float>()[1], 0.0, 1e-4);
}

// A constant dimension (an unused gripper) has std 0: z-score maps it to 0, not 0/0, and back.
TEST(Normalizer, ZScoreKeepsAConstantDimensionFinite) {
  Episodes data = demo_episodes();
  const int64_t frames = data.actions.shape()[0];
  raw::copy_into(raw::narrow(data.states, 1, 1, 1), full({frames, 1}, 0.25));
  raw::copy_into(raw::narrow(data.actions, 1, 0, 1), full({frames, 1}, -3.0));
  const Normalizer z = make_normalizer(data, "z_score");
  EXPECT_EQ(z.state_std.to_vector<float>()[1], 0.0f);
  const Tensor s = z.normalize_state(data.states), a = z.normalize_action(data.actions);
  EXPECT_EQ(raw::max(raw::unary(raw::UnaryOp::abs, raw::narrow(s, 1, 1, 1))).item(), 0.0);
  EXPECT_EQ(raw::max(raw::unary(raw::UnaryOp::abs, raw::narrow(a, 1, 0, 1))).item(), 0.0);
  const Tensor back = z.unnormalize_action(a);
  EXPECT_LT(test::max_abs_diff(back, data.actions), 1e-5);
}

// models.md: min-max is 2 (x - min) / (max - min + 1e-8) - 1 and back (a + 1) / 2 (max - min) +
// min, without the 1e-8. A constant dimension (min == max) is where the 1e-8 shows: at the constant
// itself -1, a step of 1e-3 off it 2e5 - 1, and back exactly the constant. No reference case has
// such a dimension.
TEST(Normalizer, MinMaxOfAConstantDimensionFollowsTheFormula) {
  Episodes data = demo_episodes();
  const int64_t frames = data.actions.shape()[0];
  raw::copy_into(raw::narrow(data.actions, 1, 0, 1), full({frames, 1}, 0.5));
  const Normalizer n = make_normalizer(data, "min_max");
  ASSERT_EQ(n.action_min.to_vector<float>()[0], 0.5f);
  ASSERT_EQ(n.action_max.to_vector<float>()[0], 0.5f);
  const Tensor off = from_vector({0.5f, 0.0f, 0.501f, 0.0f}, {2, 2});
  const std::vector<float> z = n.normalize_action(off).to_vector<float>();
  EXPECT_EQ(z[0], -1.0f);
  const double expected = 2.0 * (static_cast<double>(0.501f) - 0.5) / 1e-8 - 1.0;
  EXPECT_NEAR(z[2], expected, 1e-5 * expected);
  const std::vector<float> back =
      n.unnormalize_action(from_vector({-1.0f, 0.0f, 0.75f, 0.0f}, {2, 2})).to_vector<float>();
  EXPECT_EQ(back[0], 0.5f);
  EXPECT_EQ(back[2], 0.5f);
}

// Statistics finite each, whose range or spread overflows float32 in the maps (min -3e38 and max
// 3e38: every action came out inf), are refused naming the array and the index; and a trainer
// refuses data with such statistics before training on it.
TEST(Normalizer, RefusesStatisticsThatOverflowFloat32) {
  const Episodes data = demo_episodes();
  Normalizer n = make_normalizer(data, "min_max");
  n.action_min = from_vector({0.0f, -3e38f}, {2});
  n.action_max = from_vector({1.0f, 3e38f}, {2});
  EXPECT_EQ(test::error_of([&] { n.validate(2, 2); }),
            "normalizer: 'action_max'[1] - 'action_min'[1] = 3e+38 - -3e+38 is not finite in "
            "float32");
  Normalizer z = make_normalizer(data, "z_score");
  z.state_std = from_vector(std::vector<double>{1.0, 1e300}, {2}, DType::f64);
  EXPECT_EQ(test::error_of([&] { z.validate(2, 2); }),
            "normalizer: 'state_std'[1] + 1e-8 = 1e+300 + 1e-8 is not finite in float32");

  Episodes wide = demo_episodes();
  raw::copy_into(raw::narrow(wide.actions, 0, 0, 2),
                 from_vector({-3e38f, 0.0f, 3e38f, 0.0f}, {2, 2}));
  EXPECT_EQ(test::error_of([&] { Trainer(tiny_config(wide), wide); }),
            "train: the data's min_max statistics cannot normalise it: normalizer: "
            "'action_max'[0] - 'action_min'[0] = 3e+38 - -3e+38 is not finite in float32");
}

// ---------------------------------------------------------------- configs
// Every field survives the JSON a checkpoint and config.json keep, sigma and max_t among them
// (a reader that dropped sigma would load every sigma policy as a sigma-0 one).
TEST(TrainConfig, NonDefaultFieldsSurviveJson) {
  TrainConfig c;
  c.policy.sigma = 0.25;
  c.max_t = 0.75;
  c.ema_decay = 0.5;
  c.timestep_sampling = "logit_normal";
  c.sample_steps = 7;
  const TrainConfig back = TrainConfig::from_json(c.to_json());
  EXPECT_EQ(back.policy.sigma, 0.25);
  EXPECT_EQ(back.max_t, 0.75);
  EXPECT_EQ(back.ema_decay, 0.5);
  EXPECT_EQ(back.timestep_sampling, "logit_normal");
  EXPECT_EQ(back.sample_steps, 7);
  EXPECT_EQ(back.to_json(), c.to_json());
  EXPECT_EQ(PolicyConfig::from_json(R"({"sigma": 0.5})").sigma, 0.5);
  // t beyond 1 would extrapolate x_t = t z + (1 - t) x0 past the data.
  EXPECT_NO_THROW(TrainConfig::from_json(R"({"max_t": 1})"));
  EXPECT_THAT(test::error_of([] { TrainConfig::from_json(R"({"max_t": 1.5})"); }),
              HasSubstr("max_t must be in (0, 1]"));
}

TEST(TrainConfig, JsonRoundTripAndErrors) {
  TrainConfig c = tiny_config(demo_episodes());
  const TrainConfig back = TrainConfig::from_json(c.to_json());
  EXPECT_EQ(back.to_json(), c.to_json());
  EXPECT_THAT([] { TrainConfig::from_json(R"({"stepz": 3})"); },
              testing::ThrowsMessage<Error>(HasSubstr("unknown key 'stepz'")));
  EXPECT_THAT([] { TrainConfig::from_json(R"({"lr": "fast"})"); },
              testing::ThrowsMessage<Error>(HasSubstr("'lr' must be a number")));
  EXPECT_THAT([] { TrainConfig::from_json(R"({"policy": {"heads": 0}})"); },
              testing::ThrowsMessage<Error>(HasSubstr("heads must be positive")));
  EXPECT_THAT([] { TrainConfig::from_json("{not json"); },
              testing::ThrowsMessage<Error>(HasSubstr("not valid JSON")));
  EXPECT_THAT([] { TrainConfig::from_json(R"({"normalization": "l2"})"); },
              testing::ThrowsMessage<Error>(HasSubstr("normalization must be min_max or z_score")));
  EXPECT_THAT([] { TrainConfig::from_json(R"({"sample_steps": 1000000000000})"); },
              testing::ThrowsMessage<Error>(
                  HasSubstr("sample_steps must be in [1, 10000], got 1000000000000")));
}

// nlohmann's get<> wraps silently: a seed of -1 was stored as 18446744073709551615, and steps of
// 2^64 - 1 were refused as "steps must be >= 0, got -1".
TEST(TrainConfig, RefusesIntegersOutOfTheirFieldsRangeAsWritten) {
  EXPECT_EQ(test::error_of([] { TrainConfig::from_json(R"({"seed": -1})"); }),
            "train config: 'seed' must be an integer in [0, 18446744073709551615], got -1");
  EXPECT_EQ(test::error_of([] { TrainConfig::from_json(R"({"steps": 18446744073709551615})"); }),
            "train config: 'steps' must be an integer no larger than 9223372036854775807, got "
            "18446744073709551615");
  EXPECT_EQ(
      test::error_of([] { TrainConfig::from_json(R"({"batch_size": 9223372036854775808})"); }),
      "train config: 'batch_size' must be an integer no larger than 9223372036854775807, "
      "got 9223372036854775808");
  EXPECT_EQ(test::error_of(
                [] { TrainConfig::from_json(R"({"policy": {"heads": 18446744073709551615}})"); }),
            "policy config: 'heads' must be an integer no larger than 9223372036854775807, got "
            "18446744073709551615");
  // The whole unsigned range is a seed, and it is written back as it was read.
  const TrainConfig c = TrainConfig::from_json(R"({"seed": 18446744073709551615})");
  EXPECT_EQ(c.seed, 18446744073709551615ull);
  EXPECT_THAT(c.to_json(), HasSubstr("\"seed\": 18446744073709551615"));
  EXPECT_EQ(TrainConfig::from_json(R"({"steps": 9223372036854775807})").steps, INT64_MAX);
}

// `mmdit train --batch-size 1000000000000` ended in a bare std::bad_alloc from the sampler.
TEST(TrainConfig, BoundsTheBatchSize) {
  EXPECT_EQ(test::error_of([] { TrainConfig::from_json(R"({"batch_size": 1000000000000})"); }),
            "train config: batch_size must be in [1, 1048576], got 1000000000000");
  const Episodes data = demo_episodes();
  TrainConfig c = tiny_config(data);
  c.batch_size = 1048577;
  EXPECT_EQ(test::error_of([&] { Trainer(c, data); }),
            "train config: batch_size must be in [1, 1048576], got 1048577");
}

// Infinities pass "> 0": each number the optimiser uses must also be finite.
TEST(TrainConfig, RejectsInfiniteNumbers) {
  const TrainConfig ok = tiny_config(demo_episodes());
  for (const auto& [field, message] : std::vector<std::pair<double TrainConfig::*, std::string>>{
           {&TrainConfig::lr, "lr must be positive and finite, got inf"},
           {&TrainConfig::weight_decay, "weight_decay must be >= 0 and finite, got inf"},
           {&TrainConfig::eps, "eps must be positive and finite, got inf"},
           {&TrainConfig::grad_clip, "grad_clip must be >= 0 and finite (0 = off), got inf"}}) {
    TrainConfig c = ok;
    c.*field = INFINITY;
    EXPECT_EQ(test::error_of([&] { c.validate(); }), "train config: " + message);
  }
}

TEST(Trainer, RejectsDataOfTheWrongShape) {
  const Episodes data = demo_episodes();
  TrainConfig c = tiny_config(data);
  c.policy.state_dim = 5;
  EXPECT_THAT([&] { Trainer t(c, data); },
              testing::ThrowsMessage<Error>(HasSubstr(
                  "the data's states have 2 dimensions but the policy's state_dim is 5")));
}

// ---------------------------------------------------------------- training and resume
TEST(Trainer, LossFallsOnDemonstrations) {
  const Episodes data = demo_episodes(20);
  TrainConfig c = tiny_config(data);
  c.steps = 150;
  c.batch_size = 32;
  Trainer t(c, data);
  double first = 0, last = 0;
  for (int i = 0; i < 150; ++i) {
    const double loss = t.train_step().loss;
    if (i < 10) first += loss / 10;
    if (i >= 140) last += loss / 10;
  }
  EXPECT_LT(last, 0.75 * first) << "first " << first << " last " << last;
}

// With the same seed and thread count, 2N steps in one run give the same losses, bit for bit,
// as N steps + save + load + N steps.
TEST(Trainer, ResumeContinuesExactly) {
  const Episodes data = demo_episodes();
  const TrainConfig c = tiny_config(data);
  const std::string dir = temp_dir("resume");
  std::vector<double> straight, resumed;
  {
    Trainer t(c, data);
    for (int i = 0; i < 12; ++i) straight.push_back(t.train_step().loss);
  }
  {
    Trainer t(c, data);
    for (int i = 0; i < 6; ++i) resumed.push_back(t.train_step().loss);
    t.save_checkpoint(dir + "/ckpt.safetensors");
  }
  {
    auto t = Trainer::resume(dir + "/ckpt.safetensors", data);
    EXPECT_EQ(t->step(), 6);
    for (int i = 0; i < 6; ++i) resumed.push_back(t->train_step().loss);
  }
  ASSERT_EQ(straight.size(), resumed.size());
  for (size_t i = 0; i < straight.size(); ++i)
    EXPECT_EQ(straight[i], resumed[i]) << "step " << i + 1;
  fs::remove_all(dir);
}

// N steps, save, resume, M steps give the same parameters, EMA, moments and step statistics,
// bit for bit, as N + M steps in one run; N = 2 stops inside the warm-up of 3 steps, so the
// resumed run must take the schedule's step from the checkpoint.
TEST(Trainer, ResumeGivesBitIdenticalState) {
  const Episodes data = demo_episodes();
  const TrainConfig c = tiny_config(data);
  auto state = [](Trainer& t) {
    std::vector<std::vector<float>> s;
    for (const auto& [name, x] : t.policy().named_parameters()) s.push_back(x.to_vector<float>());
    for (const auto& [name, x] : t.ema().params()) s.push_back(x.to_vector<float>());
    return s;
  };
  auto stats = [](Trainer& t, int n) {
    std::vector<double> s;
    for (int i = 0; i < n; ++i) {
      const StepStats st = t.train_step();
      s.insert(s.end(), {st.loss, st.grad_norm, st.lr});
    }
    return s;
  };
  Trainer straight(c, data);
  std::vector<double> expected = stats(straight, 7);
  test::TempDir dir;
  std::vector<double> got;
  {
    Trainer t(c, data);
    got = stats(t, 2);
    t.save_checkpoint(dir.file("c.safetensors"));
  }
  auto resumed = Trainer::resume(dir.file("c.safetensors"), data);
  const std::vector<double> rest = stats(*resumed, 5);
  got.insert(got.end(), rest.begin(), rest.end());
  EXPECT_EQ(got, expected);
  EXPECT_EQ(resumed->step(), 7);
  EXPECT_TRUE(state(*resumed) == state(straight));
  straight.save_checkpoint(dir.file("straight.safetensors"));
  resumed->save_checkpoint(dir.file("resumed.safetensors"));
  EXPECT_TRUE(read_file(dir.file("straight.safetensors")) ==
              read_file(dir.file("resumed.safetensors")));
}

// A checkpoint of `mmdit train` is a TrainingState: user code reads the policy, its AdamW, EMA and
// random state from it, to go on in a loop of its own; or the EMA's weights alone, for acting.
TEST(Trainer, ItsCheckpointIsATrainingStateForUserCode) {
  const Episodes data = demo_episodes();
  const TrainConfig c = tiny_config(data);
  Trainer trainer(c, data);
  for (int i = 0; i < 3; ++i) trainer.train_step();
  test::TempDir dir;
  const std::string path = dir.file("c.safetensors");
  trainer.save_checkpoint(path);

  // As the README says: the policy is built from the checkpoint's config, then loaded.
  const TrainConfig config = read_checkpoint_info(path).config;
  Rng init(99);
  BCPolicy policy(config.policy, init);
  AdamW optimizer(policy.named_parameters(), {});
  EMA ema(policy.named_parameters(), config.ema_decay);
  Rng rng(0);
  const std::map<std::string, std::string> metadata =
      TrainingState{.model = policy, .optimizer = &optimizer, .ema = &ema, .rng = &rng}.load(path);
  EXPECT_EQ(TrainConfig::from_json(metadata.at("config")).to_json(), c.to_json());
  EXPECT_FALSE(metadata.contains("step"));
  const auto identical = [](const NamedTensors& a, const NamedTensors& b) {
    bool same = a.size() == b.size();
    for (const auto& [name, t] : a) same = same && test::max_abs_diff(t, b.at(name)) == 0;
    return same;
  };
  EXPECT_TRUE(identical(policy.named_parameters(), trainer.policy().named_parameters()));
  EXPECT_TRUE(identical(ema.params(), trainer.ema().params()));
  EXPECT_EQ(optimizer.step(), 3);
  EXPECT_EQ(rng_state_json(rng), load_safetensors_metadata(path).at("rng"));
  EXPECT_GT(rng.counter(), 0u);

  BCPolicy acting(config.policy, init);
  load_weights(path, acting);
  EXPECT_TRUE(identical(acting.named_parameters(), trainer.ema().params()));
  EXPECT_FALSE(identical(acting.named_parameters(), trainer.policy().named_parameters()));
}

// An exported policy holds one set of weights and the tables: exported as float32 it acts as its
// checkpoint does, bit for bit; as bfloat16, on its weights rounded to 8 significant bits. It
// cannot be resumed, and holds only what it was exported with.
TEST(Checkpoint, AnExportedPolicyActsAsItsCheckpoint) {
  const Episodes data = demo_episodes();
  Trainer trainer(tiny_config(data), data);
  trainer.train_step();
  Rng weights(8);  // a fresh policy's chunks do not depend on the observations
  test::randomize(trainer.policy(), weights);
  trainer.train_step();  // the EMA and the parameters now differ
  test::TempDir dir;
  const std::string ckpt = dir.file("c.safetensors"), f32 = dir.file("f32.safetensors"),
                    bf16 = dir.file("bf16.safetensors"), raw = dir.file("raw.safetensors");
  trainer.save_checkpoint(ckpt);
  export_policy(ckpt, f32);
  export_policy(ckpt, bf16, /*use_ema=*/true, StoredFloats::bf16);
  export_policy(ckpt, raw, /*use_ema=*/false);

  const Tensor observations = Rng(2).normal({3, 2, 2});
  const auto act = [&](const std::string& path, bool use_ema) {
    Rng noise(5);
    return load_policy(path, use_ema).act(observations, noise);
  };
  EXPECT_EQ(act(f32, true).to_vector<float>(), act(ckpt, true).to_vector<float>());
  EXPECT_EQ(act(raw, false).to_vector<float>(), act(ckpt, false).to_vector<float>());
  EXPECT_GT(test::max_abs_diff(act(bf16, true), act(ckpt, true)), 0.0);
  EXPECT_LT(test::max_abs_diff(act(bf16, true), act(ckpt, true)), 0.05);

  const LoadedPolicy rounded = load_policy(bf16);
  for (const auto& [name, w] : trainer.ema().params()) {
    const std::vector<float> exact = w.to_vector<float>();
    const std::vector<float> got = rounded.policy->named_parameters().at(name).to_vector<float>();
    for (size_t i = 0; i < exact.size(); ++i) {
      ASSERT_EQ(std::bit_cast<uint32_t>(got[i]) & 0xFFFF, 0u) << name;  // 8 significant bits
      ASSERT_LE(std::abs(got[i] - exact[i]), std::ldexp(std::abs(exact[i]), -8)) << name;
    }
  }
  EXPECT_EQ(rounded.step, 2);
  EXPECT_EQ(load_safetensors_metadata(bf16).at("exported"), "EMA in bfloat16");
  // One set of weights of the checkpoint's four, in half the bytes.
  EXPECT_LT(fs::file_size(bf16) * 6, fs::file_size(ckpt));  // 7 but for the headers
  EXPECT_LT(fs::file_size(f32) * 3, fs::file_size(ckpt));

  EXPECT_EQ(test::error_of([&] { Trainer::resume(bf16, data); }),
            bf16 +
                ": an exported policy (EMA in bfloat16, for acting) has no optimiser state to "
                "resume from: resume the checkpoint it was exported from");
  EXPECT_EQ(test::error_of([&] { load_policy(f32, /*use_ema=*/false); }),
            f32 +
                ": holds no 'param/*' weights (it was exported with the EMA's alone; load "
                "those, without --no-ema)");
  EXPECT_EQ(test::error_of([&] { load_policy(raw); }),
            raw +
                ": holds no 'ema/*' weights (it was exported without the EMA; load its "
                "parameters, --no-ema)");
}

// mmdit export writes what sample reads, refusing to write over its input.
TEST(Cli, ExportsAPolicyThatSamples) {
  const Episodes data = demo_episodes();
  Trainer trainer(tiny_config(data), data);
  Rng weights(8);
  test::randomize(trainer.policy(), weights);
  trainer.restart_ema();
  test::TempDir dir;
  const std::string ckpt = dir.file("c.safetensors"), out = dir.file("policy.safetensors");
  trainer.save_checkpoint(ckpt);
  const test::Command r = test::run_mmdit("export " + ckpt + " --out " + out + " --dtype bf16");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("wrote " + out + ": the EMA weights of " + ckpt +
                                  " (step 0) in bfloat16, "));
  EXPECT_EQ(load_safetensors_metadata(out).at("exported"), "EMA in bfloat16");
  const std::string sample = " --obs 0,-1,0,-0.98 --seed 3";
  const test::Command exported = test::run_mmdit("sample " + out + sample);
  ASSERT_EQ(exported.status, 0) << exported.output;
  EXPECT_NE(exported.output, test::run_mmdit("sample " + ckpt + sample).output);  // rounded
  const test::Command over = test::run_mmdit("export " + ckpt + " --out " + ckpt);
  EXPECT_NE(over.status, 0);
  EXPECT_THAT(over.output, HasSubstr("export: --out"));

  // Exported again, a bfloat16 export would claim float32.
  const test::Command again = test::run_mmdit("export " + out + " --out " + dir.file("x.st"));
  EXPECT_NE(again.status, 0);
  EXPECT_THAT(again.output, HasSubstr(out + " is an exported policy (EMA in bfloat16): export from "
                                            "the checkpoint it was exported from"));
  // info, sample and eval read whichever weights an export holds.
  const std::string raw = dir.file("raw.safetensors");
  ASSERT_EQ(test::run_mmdit("export " + ckpt + " --out " + raw + " --no-ema").status, 0);
  const test::Command raw_sample = test::run_mmdit("sample " + raw + sample);
  ASSERT_EQ(raw_sample.status, 0) << raw_sample.output;
  EXPECT_EQ(raw_sample.output, test::run_mmdit("sample " + ckpt + sample + " --no-ema").output);
  const test::Command info = test::run_mmdit("info " + raw);
  ASSERT_EQ(info.status, 0) << info.output;
  EXPECT_THAT(info.output, HasSubstr("exported policy: parameters (for acting; train --resume "
                                     "needs its checkpoint)"));
  const std::string trained_on =
      str_cat("trained on: ", data.num_frames(), " frames in ", data.num_episodes(),
              " episodes (data fingerprint ", data_fingerprint(data), ")\n");
  EXPECT_THAT(info.output, HasSubstr(trained_on));
  EXPECT_THAT(test::run_mmdit("info " + ckpt).output, HasSubstr(trained_on));
  // train --resume refuses an export before it reads the data.
  save_lerobot_npz(dir.file("demos.npz"), data);
  const test::Command resume =
      test::run_mmdit("train --data " + dir.file("demos.npz") + " --resume " + raw + " --steps 5");
  EXPECT_NE(resume.status, 0);
  EXPECT_THAT(resume.output, HasSubstr(raw + ": an exported policy (parameters, for acting) has no "
                                             "optimiser state to resume from"));
  EXPECT_THAT(resume.output, Not(HasSubstr("episodes")));
}

// info describes a training state of a loop of one's own: step, random state, the caller's
// metadata, the tensors by part, and each parameter's shape.
TEST(Cli, InfoDescribesATrainingState) {
  const Episodes data = demo_episodes();
  const TrainConfig c = tiny_config(data);
  Rng init(1);
  BCPolicy policy(c.policy, init);
  AdamW optimizer(policy.named_parameters(), {});
  EMA ema(policy.named_parameters(), 0.9);
  Rng rng(6);
  rng.normal({2});
  test::TempDir dir;
  const std::string path = dir.file("state.safetensors");
  TrainingState{.model = policy, .optimizer = &optimizer, .ema = &ema, .rng = &rng}.save(
      path, {{"epoch", "3"}});
  const test::Command r = test::run_mmdit("info " + path);
  ASSERT_EQ(r.status, 0) << r.output;
  const int64_t tensors = static_cast<int64_t>(policy.named_parameters().size());
  EXPECT_THAT(r.output, HasSubstr("training state: " + path + " (mmdit-training-state/1"));
  EXPECT_THAT(r.output, HasSubstr("AdamW step: 0\n"));
  EXPECT_THAT(r.output, HasSubstr(R"(random state: {"counter":1,"seed":6})"));
  EXPECT_THAT(r.output, HasSubstr("metadata epoch: 3\n"));
  EXPECT_THAT(r.output, testing::ContainsRegex(str_cat("param/ +", tensors, " tensors +",
                                                       policy.num_parameters(), " numbers")));
  EXPECT_THAT(r.output, testing::ContainsRegex(str_cat("adam_v/ +", tensors, " tensors")));
  EXPECT_THAT(r.output, testing::ContainsRegex(
                            str_cat("state_encoder.weight +\\(", c.policy.hidden_size, ",2\\)")));
}

// The learning rate of each step is optax's warmup_cosine_decay_schedule(0, lr, warmup, steps)
// at optax's count, which starts at 0: the first step has lr 0, step warmup + 1 the peak, and
// the cosine runs over steps - warmup; EMA starts equal to the parameters; buffers never change.
TEST(Trainer, ScheduleEmaStartAndBuffers) {
  const Episodes data = demo_episodes();
  TrainConfig c = tiny_config(data);  // lr 1e-3, warm-up 3, 20 steps, cosine
  Trainer t(c, data);
  for (const auto& [name, p] : t.policy().named_parameters())
    EXPECT_EQ(t.ema().params().at(name).to_vector<float>(), p.to_vector<float>()) << name;
  std::vector<std::vector<float>> buffers;
  for (const auto& [name, b] : t.policy().named_buffers()) buffers.push_back(b.to_vector<float>());
  ASSERT_FALSE(buffers.empty());
  const double pi = std::acos(-1.0);
  for (int count = 0; count < 20; ++count) {
    const double expected =
        count < 3 ? 1e-3 * count / 3 : 1e-3 * 0.5 * (1 + std::cos(pi * (count - 3) / 17.0));
    EXPECT_NEAR(t.train_step().lr, expected, 1e-18) << "count " << count;
  }
  std::vector<std::vector<float>> after;
  for (const auto& [name, b] : t.policy().named_buffers()) after.push_back(b.to_vector<float>());
  EXPECT_TRUE(after == buffers);
}

// A dimension that never changes (an unused gripper) has max == min; min-max statistics
// accept it, and training on it gives finite losses (the 1e-8 in max - min + 1e-8 keeps it at -1).
TEST(Trainer, TrainsWithAConstantMinMaxDimension) {
  Episodes data = demo_episodes();
  raw::copy_into(raw::narrow(data.states, 1, 1, 1), full({data.states.size(0), 1}, 0.25));
  Trainer trainer(tiny_config(data), data);
  EXPECT_EQ(trainer.normalizer().state_min.to_vector<float>()[1], 0.25f);
  EXPECT_EQ(trainer.normalizer().state_max.to_vector<float>()[1], 0.25f);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(std::isfinite(trainer.train_step().loss)) << i;
}

// Without cosine decay the learning rate stays at its peak after the warm-up, every step.
TEST(Trainer, WithoutCosineDecayTheRateStaysAtItsPeak) {
  const Episodes data = demo_episodes();
  TrainConfig c = tiny_config(data);  // lr 1e-3, warm-up 3, 20 steps
  c.cosine_decay = false;
  Trainer t(c, data);
  for (int count = 0; count < 20; ++count)
    EXPECT_DOUBLE_EQ(t.train_step().lr, count < 3 ? 1e-3 * count / 3 : 1e-3) << "count " << count;
}

// A step's loss is the objective's loss on the batch the trainer's sampler gives (a sampler of
// the config's seed) and noise drawn as the README says: from Rng(seed ^ 0x9E3779B97F4A7C15),
// x0 ~ N(0, 1), then t (uniform in [0, max_t), or max_t sigmoid(N(0, 1)) for logit_normal),
// then with sigma > 0 eps ~ N(0, 1). The weights are random: a fresh policy's output is zero
// whatever t, x_t and max_t are, so its loss could not tell them apart.
TEST(Trainer, AStepsLossIsTheObjectiveOnTheDocumentedNoise) {
  const Episodes data = demo_episodes();
  struct Case {
    const char* name;
    std::function<void(TrainConfig&)> edit;
  };
  const std::vector<Case> cases = {
      {"uniform, max_t 1", [](TrainConfig&) {}},
      {"uniform, max_t 0.5", [](TrainConfig& c) { c.max_t = 0.5; }},
      {"logit_normal, max_t 1", [](TrainConfig& c) { c.timestep_sampling = "logit_normal"; }},
      {"logit_normal, max_t 0.5",
       [](TrainConfig& c) {
         c.timestep_sampling = "logit_normal";
         c.max_t = 0.5;
       }},
      {"sigma 0.5", [](TrainConfig& c) { c.policy.sigma = 0.5; }},
      {"mse", [](TrainConfig& c) { c.objective = "mse"; }},
  };
  std::vector<double> losses;
  for (const Case& k : cases) {
    TrainConfig c = tiny_config(data);
    k.edit(c);
    Trainer trainer(c, data);
    Rng weights(11);
    test::randomize(trainer.policy(), weights);
    const Batch batch =
        WindowSampler(data, c.policy.n_obs_steps, c.policy.horizon, c.seed).next(c.batch_size);
    const Tensor state = trainer.normalizer().normalize_state(batch.state);
    const Tensor action = trainer.normalizer().normalize_action(batch.action);
    Tensor expected;
    if (c.objective == "mse") {
      expected = regression_loss(trainer.policy(), state, action, batch.action_is_pad);
    } else {
      Rng rng(c.seed ^ 0x9E3779B97F4A7C15ull);
      FlowNoise noise;
      noise.x0 = rng.normal(action.shape());
      std::vector<float> t(static_cast<size_t>(c.batch_size));
      if (c.timestep_sampling == "logit_normal") {
        const std::vector<float> z = rng.normal({c.batch_size}).to_vector<float>();
        for (size_t i = 0; i < t.size(); ++i)
          t[i] = static_cast<float>(c.max_t / (1 + std::exp(-static_cast<double>(z[i]))));
      } else {
        t = rng.uniform({c.batch_size}, DType::f32, 0, c.max_t).to_vector<float>();
      }
      noise.t = from_vector(t, {c.batch_size});
      if (c.policy.sigma > 0) noise.eps = rng.normal(action.shape());
      expected = flow_matching_loss(trainer.policy(), state, action, batch.action_is_pad, noise);
    }
    const double want = expected.item();
    EXPECT_NEAR(trainer.train_step().loss, want, 1e-5 * want) << k.name;
    losses.push_back(want);
  }
  // The settings change the loss: a trainer that ignored one would match its neighbour's.
  EXPECT_EQ(std::set<double>(losses.begin(), losses.end()).size(), losses.size());
}

// The first step against closed forms: a parameter the loss never uses has zero gradient and is
// still decayed, p (1 - lr wd); the EMA is decay p0 + (1 - decay) p1; and the reported norm is the
// one before clipping.
TEST(Trainer, FirstStepAgainstClosedForms) {
  const Episodes data = demo_episodes();
  TrainConfig c = tiny_config(data);
  c.warmup_steps = 0;
  c.cosine_decay = false;  // lr 1e-3, weight decay 1e-2
  c.grad_clip = 0;
  c.ema_decay = 0.9;
  Trainer plain(c, data);
  c.grad_clip = 1e-6;
  Trainer clipped(c, data);
  std::map<std::string, std::vector<float>> before;
  for (const auto& [name, p] : plain.policy().named_parameters())
    before[name] = p.to_vector<float>();
  const StepStats a = plain.train_step(), b = clipped.train_step();
  EXPECT_EQ(a.loss, b.loss);
  EXPECT_EQ(a.grad_norm, b.grad_norm);
  EXPECT_GT(b.grad_norm, 1e-3);
  // The observation stream's feed-forward in the last block feeds only the unused output.
  const std::string unused = "mmdit.blocks.0.feedforwards.0.linear_in.weight";
  ASSERT_GT(*std::max_element(before[unused].begin(), before[unused].end()), 0.01f);
  const std::vector<float> p1 = plain.policy().named_parameters().at(unused).to_vector<float>();
  for (size_t i = 0; i < p1.size(); ++i)
    EXPECT_NEAR(p1[i], before[unused][i] * (1 - 1e-3 * 1e-2), 6e-8 * std::abs(before[unused][i]))
        << i;
  for (const auto& [name, p] : plain.policy().named_parameters()) {
    const std::vector<float> now = p.to_vector<float>();
    const std::vector<float> ema = plain.ema().params().at(name).to_vector<float>();
    for (size_t i = 0; i < now.size(); ++i) {
      const double expected = 0.9 * before[name][i] + 0.1 * now[i];
      // float32's roundings of 0.9, 0.1, both products and the sum: a few units in the last
      // place of the terms' sizes (without FMA contraction, as in the sanitizer build, 2 ulp).
      const double terms = 0.9 * std::abs(before[name][i]) + 0.1 * std::abs(now[i]);
      EXPECT_NEAR(ema[i], expected, 3e-7 * terms + 1e-30) << name << " " << i;
    }
  }
  // Clipping: Adam's first step is u = g s / (|g s| + eps) for gradients scaled by s: the sign
  // of g as without clipping (s = 1), and smaller wherever |g s| falls towards eps (1e-8), as
  // clipping to 1e-6 does here (s < 1e-3). u is read back from p1 = p0 - lr (u + wd p0). At
  // initialisation (adaLN-Zero) few parameters have a gradient: every one that moved must shrink.
  int64_t moved = 0, shrunk = 0;
  for (const auto& [name, p] : plain.policy().named_parameters()) {
    const std::vector<float> p_plain = p.to_vector<float>();
    const std::vector<float> p_clipped =
        clipped.policy().named_parameters().at(name).to_vector<float>();
    for (size_t i = 0; i < p_plain.size(); ++i) {
      const double p0 = before[name][i];
      const double u_plain = (p0 - p_plain[i]) / 1e-3 - 1e-2 * p0;
      const double u_clipped = (p0 - p_clipped[i]) / 1e-3 - 1e-2 * p0;
      // float32 parameters of size |p0| read u to about 1e-7 |p0| / lr.
      const double slack = 2e-4 * (std::abs(p0) + 1e-3);
      ASSERT_LE(std::abs(u_clipped), std::abs(u_plain) + slack) << name << " " << i;
      ASSERT_GE(u_clipped * u_plain, -slack) << name << " " << i;
      if (std::abs(u_plain) > 0.5) {
        ++moved;
        if (std::abs(u_clipped) < std::abs(u_plain) - 0.01) ++shrunk;
      }
    }
  }
  EXPECT_GE(moved, 20);
  EXPECT_EQ(shrunk, moved);
}

// As README says, training gives the same losses and parameters for any thread count: a batch
// large enough that the kernels and products split across two threads.
TEST(Trainer, SameStepsOnOneAndTwoThreads) {
  if (raw::sgemm_library() == raw::SgemmLibrary::onednn &&
      raw::default_sgemm_library() != raw::SgemmLibrary::onednn)
    GTEST_SKIP() << "oneDNN chosen where it runs no AVX-512 kernels: its blocks of a product "
                    "round otherwise than the whole";
  const Episodes data = demo_episodes(20);
  TrainConfig c = tiny_config(data);
  c.batch_size = 1024;
  c.policy.hidden_size = 64;
  c.policy.dim_head = 16;
  c.policy.heads = 4;
  auto run = [&](int threads) {
    const int before = num_threads();
    set_num_threads(threads);
    Trainer t(c, data);
    std::vector<double> out;
    for (int i = 0; i < 2; ++i) {
      const StepStats s = t.train_step();
      out.insert(out.end(), {s.loss, s.grad_norm});
    }
    for (const auto& [name, p] : t.policy().named_parameters())
      for (float x : p.to_vector<float>()) out.push_back(x);
    set_num_threads(before);
    return out;
  };
  EXPECT_TRUE(run(1) == run(2));
}

TEST(Checkpoint, HoldsEverythingAndLoadsForInference) {
  const Episodes data = demo_episodes();
  TrainConfig c = tiny_config(data);
  Trainer t(c, data);
  for (int i = 0; i < 3; ++i) t.train_step();
  const std::string dir = temp_dir("ckpt");
  const std::string path = dir + "/c.safetensors";
  t.save_checkpoint(path);
  const SafetensorsFile f = load_safetensors(path);
  EXPECT_EQ(f.metadata.at("format"), "mmdit-checkpoint/1");
  EXPECT_EQ(f.metadata.at("step"), "3");
  for (const auto& [name, p] : t.policy().named_parameters()) {
    EXPECT_TRUE(f.tensors.contains("param/" + name)) << name;
    EXPECT_TRUE(f.tensors.contains("ema/" + name)) << name;
    EXPECT_TRUE(f.tensors.contains("adam_m/" + name)) << name;
    EXPECT_TRUE(f.tensors.contains("adam_v/" + name)) << name;
  }
  EXPECT_TRUE(f.tensors.contains("buffer/action_pos_embed"));
  const LoadedPolicy p = load_policy(path);
  EXPECT_EQ(p.step, 3);
  const NamedTensors ema = t.ema().params();
  EXPECT_EQ(p.policy->named_parameters().at("mmdit.blocks.0.to_cond.weight").to_vector<float>(),
            ema.at("mmdit.blocks.0.to_cond.weight").to_vector<float>());
  Rng rng(0);
  const Tensor actions = p.act(raw::reshape(raw::narrow(data.states, 0, 0, 2), {1, 2, 2}), rng);
  EXPECT_EQ(actions.shape(), (Shape{1, 4, 2}));
  EXPECT_THAT([&] { load_policy(dir + "/missing.safetensors"); },
              testing::ThrowsMessage<Error>(HasSubstr("missing.safetensors")));
  // A config that does not describe the tensors (here, one edited by hand) is refused before a
  // model of its size is built.
  for (const auto& [edit, message] :
       std::vector<std::pair<std::function<void(TrainConfig&)>, std::string>>{
           {[](TrainConfig& k) { k.policy.hidden_size = 200000; }, "hidden_size and state_dim"},
           {[](TrainConfig& k) { k.policy.heads = 1000; }, "heads and dim_head"},
           {[](TrainConfig& k) { k.policy.ff_mult = 64; }, "ff_mult"},
           {[](TrainConfig& k) { k.policy.horizon = 100000; }, "horizon"},
           {[](TrainConfig& k) { k.policy.depth = 40; }, "depth 40 does not match"}}) {
    TrainConfig edited = TrainConfig::from_json(f.metadata.at("config"));
    edit(edited);
    std::map<std::string, std::string> meta = f.metadata;
    meta["config"] = edited.to_json();
    save_safetensors(dir + "/edited.safetensors", f.tensors, meta);
    EXPECT_THAT([&] { load_policy(dir + "/edited.safetensors"); },
                testing::ThrowsMessage<Error>(HasSubstr(message)));
  }
  save_safetensors(dir + "/other.safetensors", f.tensors, {{"format", "something-else"}});
  EXPECT_THAT([&] { load_policy(dir + "/other.safetensors"); },
              testing::ThrowsMessage<Error>(HasSubstr("is not mmdit-checkpoint/1")));
  // A file of another kind is refused on its metadata, before its tensors are read: a large
  // model from another tool was read and converted whole first (1.6 GB for a 512 MB file). Here
  // a BOOL byte of 2, which reading would refuse, is never reached.
  {
    const std::string header =
        R"({"__metadata__":{"format":"pt"},"flag":{"dtype":"BOOL","shape":[1],"data_offsets":[0,1]}})";
    std::string bytes(8, '\0');
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
    write_file_atomically(dir + "/pt.safetensors", bytes + header + "\x02");
    EXPECT_THAT([&] { load_policy(dir + "/pt.safetensors"); },
                testing::ThrowsMessage<Error>(HasSubstr("checkpoint format 'pt' is not")));
  }
  fs::remove_all(dir);
}

// A checkpoint whose normaliser does not fit its policy (here one array of length 1, which would
// broadcast over every action dimension) is refused on load and on resume, naming the file and
// the array.
TEST(Checkpoint, RefusesANormalizerThatDoesNotFitThePolicy) {
  const Episodes data = demo_episodes();
  test::TempDir dir;
  const SafetensorsFile f = load_safetensors(fresh_checkpoint(data, dir));
  Normalizer bad = Normalizer::from_json(f.metadata.at("normalizer"));
  bad.action_min = raw::contiguous(raw::narrow(bad.action_min, 0, 0, 1));
  std::map<std::string, std::string> meta = f.metadata;
  meta["normalizer"] = bad.to_json();
  const std::string path = dir.file("bad.safetensors");
  save_safetensors(path, f.tensors, meta);
  const std::string message =
      path + ": normalizer: 'action_min' is float32 (1,); expected (act_dim,) = (2,)";
  EXPECT_EQ(test::error_of([&] { load_policy(path); }), message);
  EXPECT_EQ(test::error_of([&] { Trainer::resume(path, data); }), message);
}

// A diverged state never replaces the last good checkpoint, and a file with non-finite numbers,
// a negative second moment or a malformed step is refused naming the file and the tensor.
TEST(Checkpoint, RefusesNonFiniteStateOnSaveAndLoad) {
  const Episodes data = demo_episodes();
  Trainer t(tiny_config(data), data);
  test::TempDir dir;
  const std::string good = dir.file("c.safetensors");
  t.save_checkpoint(good);
  const std::string before = read_file(good);
  Tensor w = t.policy().named_parameters().at("state_encoder.weight");
  w.data<float>()[3] = NAN;
  EXPECT_THAT([&] { t.save_checkpoint(good); },
              testing::ThrowsMessage<Error>(
                  HasSubstr(good + ": not saved (the previous file, if any, is kept): tensor "
                                   "'param/state_encoder.weight' holds nan at (1,1)")));
  EXPECT_EQ(read_file(good), before);

  const SafetensorsFile f = load_safetensors(good);
  auto variant = [&](const std::string& name, auto change) {
    NamedTensors tensors = f.tensors;
    std::map<std::string, std::string> meta = f.metadata;
    change(tensors, meta);
    const std::string path = dir.file(name);
    save_safetensors(path, tensors, meta);
    return path;
  };
  const std::string nan_ema = variant("nan_ema.safetensors", [](NamedTensors& t, auto&) {
    Tensor e = raw::clone(t.at("ema/action_encoder.bias"));
    e.data<float>()[0] = INFINITY;
    t.at("ema/action_encoder.bias") = e;
  });
  // The whole file is refused, as the README says: a NaN in the parameters an eval did not
  // load (or in the moments) passed before.
  for (const bool use_ema : {true, false})
    EXPECT_EQ(test::error_of([&] { load_policy(nan_ema, use_ema); }),
              nan_ema + ": tensor 'ema/action_encoder.bias' holds inf at (0,)");
  const std::string nan_m = variant("nan_m.safetensors", [](NamedTensors& t, auto&) {
    Tensor m = raw::clone(t.at("adam_m/action_encoder.bias"));
    m.data<float>()[1] = NAN;
    t.at("adam_m/action_encoder.bias") = m;
  });
  EXPECT_EQ(test::error_of([&] { load_policy(nan_m); }),
            nan_m + ": tensor 'adam_m/action_encoder.bias' holds nan at (1,)");
  EXPECT_THAT([&] { Trainer::resume(nan_ema, data); },
              testing::ThrowsMessage<Error>(
                  HasSubstr(nan_ema + ": tensor 'ema/action_encoder.bias' holds inf")));
  const std::string negative_v = variant("neg_v.safetensors", [](NamedTensors& t, auto&) {
    t.at("adam_v/state_encoder.bias") = full(t.at("adam_v/state_encoder.bias").shape(), -1.0);
  });
  EXPECT_EQ(test::error_of([&] { Trainer::resume(negative_v, data); }),
            negative_v +
                ": tensors 'adam_m/*', 'adam_v/*': AdamW::set_state: second moment "
                "'state_encoder.bias' holds a negative value");
  const std::string bad_step =
      variant("step.safetensors",
              [](NamedTensors&, std::map<std::string, std::string>& m) { m["step"] = "5abc"; });
  EXPECT_EQ(test::error_of([&] { load_policy(bad_step); }),
            bad_step + ": bad step '5abc' in the checkpoint metadata");
  const std::string missing = variant("missing.safetensors", [](NamedTensors& t, auto&) {
    NamedTensors kept;
    for (const auto& [name, x] : t)
      if (name != "ema/action_encoder.bias") kept.insert(name, x);
    t = kept;
  });
  EXPECT_THAT([&] { load_policy(missing); },
              testing::ThrowsMessage<Error>(HasSubstr(
                  missing + ": tensors 'ema/*': load: missing parameter 'action_encoder.bias'")));
}

// Optimiser moments and EMA that do not fit the parameters are refused naming the tensor: the
// first missing one, else the first that is no parameter, else the first shape that differs.
TEST(Checkpoint, ResumeNamesAMissingUnexpectedOrMisshapenTensor) {
  const Episodes data = demo_episodes();
  test::TempDir dir;
  const SafetensorsFile f = load_safetensors(fresh_checkpoint(data, dir));
  auto variant = [&](const std::function<void(NamedTensors&)>& change) {
    NamedTensors tensors = f.tensors;
    change(tensors);
    const std::string path = dir.file("v.safetensors");
    save_safetensors(path, tensors, f.metadata);
    return test::error_of([&] { Trainer::resume(path, data); });
  };
  const std::string path = dir.file("v.safetensors");
  EXPECT_EQ(variant([](NamedTensors& t) {
              NamedTensors kept;
              for (const auto& [name, x] : t)
                if (name != "adam_m/action_encoder.bias") kept.insert(name, x);
              t = kept;
            }),
            path +
                ": tensors 'adam_m/*', 'adam_v/*': AdamW::set_state (first moments): no tensor "
                "for parameter 'action_encoder.bias'");
  EXPECT_EQ(variant([](NamedTensors& t) { t.insert("adam_v/bogus", zeros({1})); }),
            path +
                ": tensors 'adam_m/*', 'adam_v/*': AdamW::set_state (second moments): 'bogus' "
                "is not a parameter");
  EXPECT_EQ(variant([](NamedTensors& t) { t.at("adam_m/action_encoder.bias") = zeros({3}); }),
            path +
                ": tensors 'adam_m/*', 'adam_v/*': AdamW::set_state (first moments): "
                "'action_encoder.bias' has shape (3,), the parameter has (16,)");
  EXPECT_EQ(variant([](NamedTensors& t) { t.insert("ema/bogus", zeros({1})); }),
            path + ": tensors 'ema/*': EMA::set: 'bogus' is not a parameter");
}

// The random state and the data position must be whole numbers: read as they were, -1 became
// 2^64 - 1 and 2.5 became 2, and the run went on from another state than the one saved.
TEST(Checkpoint, ResumeRefusesARandomStateThatIsNotWholeNumbers) {
  const Episodes data = demo_episodes();
  test::TempDir dir;
  const SafetensorsFile f = load_safetensors(fresh_checkpoint(data, dir));
  const std::string path = dir.file("v.safetensors");
  auto with = [&](const std::string& key, const std::string& json) {
    auto metadata = f.metadata;
    metadata[key] = json;
    save_safetensors(path, f.tensors, metadata);
    return test::error_of([&] { Trainer::resume(path, data); });
  };
  EXPECT_EQ(with("rng", R"({"seed": -1, "counter": 0})"),
            path +
                ": checkpoint metadata rng: 'seed' must be an integer in [0, "
                "18446744073709551615], got -1");
  EXPECT_EQ(with("rng", R"({"seed": 0, "counter": 2.5})"),
            path +
                ": checkpoint metadata rng: 'counter' must be an integer in [0, "
                "18446744073709551615], got 2.5");
  EXPECT_EQ(with("sampler", R"({"epoch": 9223372036854775808, "offset": 0})"),
            path +
                ": checkpoint metadata sampler: 'epoch' must be an integer no larger than "
                "9223372036854775807, got 9223372036854775808");
  EXPECT_EQ(with("sampler", R"({"epoch": 0, "offset": -2})"),
            path + ": checkpoint metadata sampler: 'offset' must be >= 0, got -2");
  EXPECT_EQ(with("rng", R"({"seed": 18446744073709551615, "counter": 3})"),
            "(no mmdit::Error thrown)");
}

// A step that runs out of memory says at which step and batch size. The child process (a death
// test, re-run from scratch) limits its address space to what it has mapped plus 256 MB; a step of
// 2^20 examples needs more.
TEST(TrainerDeathTest, AStepOutOfMemoryNamesTheBatchSize) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "AddressSanitizer's shadow memory does not fit an address-space limit";
#endif
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const auto step_past_the_limit = [] {
    const Episodes data = demo_episodes(4);
    TrainConfig c = tiny_config(data);
    c.batch_size = 1 << 20;
    Trainer t(c, data);
    test::limit_address_space(size_t{256} << 20);
    try {
      t.train_step();
    } catch (const OutOfMemory& e) {
      std::fprintf(stderr, "%s\n", e.what());
      std::exit(t.step() == 0 ? 3 : 4);  // 3: refused, and nothing changed
    }
    std::exit(0);
  };
  EXPECT_EXIT(step_past_the_limit(), testing::ExitedWithCode(3),
              "training step 1 at batch_size 1048576: out of memory allocating");
}

// The checkpoint records the size of the data it was trained on; resuming on other data is
// refused instead of continuing on a different permutation.
TEST(Checkpoint, ResumeRefusesOtherData) {
  const Episodes data = demo_episodes(6), other = demo_episodes(5);
  Trainer t(tiny_config(data), data);
  t.train_step();
  test::TempDir dir;
  const std::string path = dir.file("c.safetensors");
  t.save_checkpoint(path);
  EXPECT_THAT(
      [&] { Trainer::resume(path, other); },
      testing::ThrowsMessage<Error>(HasSubstr(str_cat(
          path, " was trained on ", data.num_frames(), " frames in 6 episodes; this data has ",
          other.num_frames(), " in 5: resume with the run's own data"))));
  // Data of the same size with one action changed in its last bit.
  Episodes changed{raw::clone(data.states), raw::clone(data.actions), data.episode_starts};
  float& action = changed.actions.data<float>()[changed.actions.numel() - 1];
  action = std::nextafter(action, INFINITY);
  const std::string fingerprint = data_fingerprint(data);
  EXPECT_EQ(fingerprint.size(), 16u);
  EXPECT_NE(data_fingerprint(changed), fingerprint);
  EXPECT_EQ(test::error_of([&] { Trainer::resume(path, changed); }),
            str_cat(path, " was trained on other data of this size (data fingerprint ", fingerprint,
                    "; this data's is ", data_fingerprint(changed),
                    "): resume with the run's own data, or start a new run"));
  // The same data, read again (a copy), is the run's own.
  const Episodes copy{raw::clone(data.states), raw::clone(data.actions), data.episode_starts};
  EXPECT_EQ(data_fingerprint(copy), fingerprint);
  EXPECT_EQ(Trainer::resume(path, copy)->step(), 1);
  // Episode boundaries count too.
  Episodes regrouped = copy;
  regrouped.episode_starts[1] += 1;
  EXPECT_NE(data_fingerprint(regrouped), fingerprint);
}

// One example's observations (n_obs, state_dim), as the reference's policy takes them, give the
// chunk of the same observations as a batch of one, without the batch axis. Random weights (a
// fresh policy's chunk does not depend on the observations) and n_obs 3 x state_dim 2, so that
// observations used transposed or not at all would show.
TEST(LoadedPolicy, ActsOnOneExampleWithoutABatchAxis) {
  const Episodes data = demo_episodes();
  test::TempDir dir;
  TrainConfig c = tiny_config(data);
  c.policy.n_obs_steps = 3;
  Trainer trainer(c, data);
  Rng weights(11);
  test::randomize(trainer.policy(), weights);
  trainer.restart_ema();
  trainer.save_checkpoint(dir.file("c.safetensors"));
  const LoadedPolicy p = load_policy(dir.file("c.safetensors"));
  const Tensor observations = Rng(3).normal({3, 2}), other = Rng(4).normal({3, 2});
  Rng a(7), b(7), c2(7);
  const Tensor one = p.act(observations, a);
  const Tensor batch = p.act(raw::unsqueeze(observations, 0), b);
  EXPECT_EQ(one.shape(), (Shape{4, 2}));
  EXPECT_EQ(batch.shape(), (Shape{1, 4, 2}));
  EXPECT_EQ(one.to_vector<float>(), batch.to_vector<float>());
  EXPECT_GT(test::max_abs_diff(one, p.act(other, c2)), 1e-3);
  // Messages index the example's own axes.
  std::vector<float> with_nan = observations.to_vector<float>();
  with_nan[3] = NAN;
  EXPECT_EQ(test::error_of([&] {
              p.act(from_vector(with_nan, {3, 2}), a);
            }),
            "act: observation (1, 1) is nan");
  with_nan = observations.to_vector<float>();
  EXPECT_EQ(test::error_of([&] {
              std::vector<double> huge(with_nan.begin(), with_nan.end());
              huge[4] = 1e300;
              p.act(from_vector(huge, {3, 2}), a);
            }),
            "act: observation (2, 0) is 1e+300, past float32's range (the policy acts in float32)");
}

// A controller and a logger may act on one loaded policy at once, the first calls too (which
// pack the weights), each with its own Rng: the chunks are those of the same calls one by one.
TEST(LoadedPolicy, SeveralThreadsMayActAtOnce) {
  const Episodes data = demo_episodes();
  test::TempDir dir;
  const std::string path = fresh_checkpoint(data, dir);
  Rng inputs(5);
  std::vector<Tensor> observations;
  for (int64_t batch : {1, 3, 1, 7}) observations.push_back(inputs.normal({batch, 2, 2}));
  std::vector<std::vector<float>> one_by_one;
  {
    const LoadedPolicy p = load_policy(path);
    for (size_t i = 0; i < observations.size(); ++i) {
      Rng rng(i);
      one_by_one.push_back(p.act(observations[i], rng).to_vector<float>());
    }
  }
  for (const WeightPrecision weights : {WeightPrecision::f32, WeightPrecision::bf16}) {
    const LoadedPolicy p = load_policy(path, /*use_ema=*/true, weights);
    std::vector<std::vector<float>> together(observations.size());
    std::vector<std::thread> threads;
    for (size_t i = 0; i < observations.size(); ++i)
      threads.emplace_back([&, i] {
        Rng rng(i);
        for (int repeat = 0; repeat < 3; ++repeat) {
          Rng again = rng;
          together[i] = p.act(observations[i], again).to_vector<float>();
        }
      });
    for (std::thread& t : threads) t.join();
    if (weights == WeightPrecision::f32) {
      EXPECT_EQ(together, one_by_one);
    } else {  // bf16: the same calls one by one again
      for (size_t i = 0; i < observations.size(); ++i) {
        Rng rng(i);
        EXPECT_EQ(together[i], p.act(observations[i], rng).to_vector<float>()) << i;
      }
    }
  }
}

// act hands its Rng on to the sampler of a sigma > 0 policy: its actions are the sampler's with
// the noise drawn after a0 from the same generator.
TEST(LoadedPolicy, ActOfASigmaPolicyNoisesEachStepFromItsRng) {
  const Episodes data = demo_episodes();
  test::TempDir dir;
  TrainConfig c = tiny_config(data);
  c.policy.sigma = 0.2;
  const std::string path = dir.file("c.safetensors");
  {
    // Random weights: a fresh policy's velocity is zero, whatever noise it is taken at.
    Trainer trainer(c, data);
    Rng weights(11);
    test::randomize(trainer.policy(), weights);
    trainer.restart_ema();
    trainer.save_checkpoint(path);
  }
  const LoadedPolicy p = load_policy(path);
  ASSERT_EQ(p.config.policy.sigma, 0.2);
  const Tensor observations = Rng(5).normal({3, 2, 2});
  Rng rng(9);
  const Tensor acted = p.act(observations, rng);
  Rng same(9);
  const Tensor a0 = same.normal({3, c.policy.horizon, c.policy.act_dim});
  const Tensor want = p.normalizer.unnormalize_action(sample_actions(
      *p.policy, p.normalizer.normalize_state(observations), a0, c.sample_steps, c.max_t, &same));
  EXPECT_LT(test::max_abs_diff(acted, want), 1e-5);
}

// load_policy's sample_steps replaces the config's Euler steps: act is then the sampler of that
// many steps, and the config says so.
TEST(LoadedPolicy, SampleStepsReplaceTheConfigs) {
  const Episodes data = demo_episodes();
  test::TempDir dir;
  const TrainConfig c = tiny_config(data);
  Trainer trainer(c, data);
  // Enough steps that the velocity depends on the action and time (a fresh policy's is constant,
  // and every number of steps integrates it alike).
  for (int i = 0; i < 30; ++i) trainer.train_step();
  const std::string path = dir.file("c.safetensors");
  trainer.save_checkpoint(path);
  const Tensor observations = Rng(5).normal({3, 2, 2});
  for (const int64_t steps : {int64_t{1}, int64_t{3}}) {
    const LoadedPolicy p = load_policy(path, false, WeightPrecision::f32, steps);
    EXPECT_EQ(p.config.sample_steps, steps);
    Rng rng(9), same(9);
    const Tensor acted = p.act(observations, rng);
    const Tensor a0 = same.normal({3, c.policy.horizon, c.policy.act_dim});
    const Tensor want = p.normalizer.unnormalize_action(
        sample_actions(*p.policy, p.normalizer.normalize_state(observations), a0, steps, c.max_t));
    EXPECT_LT(test::max_abs_diff(acted, want), 1e-5) << steps;
  }
  ASSERT_NE(c.sample_steps, 1);
  Rng a(9), b(9);
  // The raw parameters (the EMA of 30 steps is still close to the fresh policy), whose velocity
  // is not yet far from linear in time: the steps change the chunk a little.
  EXPECT_GT(
      test::max_abs_diff(load_policy(path, false).act(observations, a),
                         load_policy(path, false, WeightPrecision::f32, 1).act(observations, b)),
      1e-6);  // rounding alone differs by 3e-8
  EXPECT_THAT([&] { load_policy(path, true, WeightPrecision::f32, -1); },
              testing::ThrowsMessage<Error>(HasSubstr("sample_steps must be in [1, 10000], or 0")));
  TrainConfig mse = c;
  mse.objective = "mse";
  Trainer(mse, data).save_checkpoint(dir.file("mse.safetensors"));
  EXPECT_THAT([&] { load_policy(dir.file("mse.safetensors"), true, WeightPrecision::f32, 3); },
              testing::ThrowsMessage<Error>(HasSubstr("sample_steps are for the flow")));
}

// A loaded policy integrates to its config's max_t: act() is the sampler's Euler integration
// over t_k = k max_t / steps, and another max_t gives other actions. Random weights, as a fresh
// policy's velocity is zero at every t.
TEST(LoadedPolicy, ActIntegratesToTheConfigsMaxT) {
  const Episodes data = demo_episodes();
  test::TempDir dir;
  TrainConfig c = tiny_config(data);
  c.max_t = 0.5;
  Trainer trainer(c, data);
  Rng weights(11);
  test::randomize(trainer.policy(), weights);
  trainer.restart_ema();
  const std::string path = dir.file("c.safetensors");
  trainer.save_checkpoint(path);
  const LoadedPolicy p = load_policy(path);
  const Tensor observations = Rng(5).normal({3, 2, 2});
  Rng rng(9);
  const Tensor acted = p.act(observations, rng);
  Rng same(9);
  const Tensor a0 = same.normal({3, c.policy.horizon, c.policy.act_dim});
  const Tensor state = p.normalizer.normalize_state(observations);
  const Tensor to_half =
      p.normalizer.unnormalize_action(sample_actions(*p.policy, state, a0, c.sample_steps, 0.5));
  const Tensor to_one =
      p.normalizer.unnormalize_action(sample_actions(*p.policy, state, a0, c.sample_steps, 1.0));
  EXPECT_LT(test::max_abs_diff(acted, to_half), 1e-5);
  EXPECT_GT(test::max_abs_diff(acted, to_one), 1e-3);
}

// Statistics change a run only before its first step: after it, the parameters were fitted to
// the old ones.
TEST(Trainer, SetNormalizerOnlyBeforeTheFirstStep) {
  const Episodes data = demo_episodes();
  Trainer trainer(tiny_config(data), data);
  Normalizer n = make_normalizer(data, "min_max").to(DType::f64);
  n.state_max = raw::mul_scalar(n.state_max, 2.0);
  trainer.set_normalizer(n);
  EXPECT_EQ(trainer.normalizer().state_max.dtype(), DType::f32);
  EXPECT_EQ(trainer.normalizer().state_max.to_vector<float>(),
            raw::to_dtype(n.state_max, DType::f32).to_vector<float>());
  trainer.train_step();
  EXPECT_THAT(test::error_of([&] { trainer.set_normalizer(n); }),
              HasSubstr("Trainer::set_normalizer: the run is at step 1; its statistics may change "
                        "only before the first step"));
}

// A trainer made from a config and statistics, without data, saves the checkpoint of a run that
// has not started: resumed on data, it trains exactly as a run started on that data with those
// statistics.
TEST(Trainer, WithoutDataSavesARunThatResumesOnAnyData) {
  const Episodes data = demo_episodes();
  const TrainConfig config = tiny_config(data);
  Normalizer n = make_normalizer(data, "min_max");
  n.action_max = raw::mul_scalar(n.action_max, 3.0);
  Trainer without_data(config, n);
  EXPECT_THAT(test::error_of([&] { without_data.train_step(); }),
              HasSubstr("Trainer::train_step: this trainer was made without data"));
  test::TempDir dir;
  without_data.save_checkpoint(dir.file("c.safetensors"));

  Trainer started(config, data);
  started.set_normalizer(n);
  const std::unique_ptr<Trainer> resumed = Trainer::resume(dir.file("c.safetensors"), data);
  EXPECT_EQ(resumed->step(), 0);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(resumed->train_step().loss, started.train_step().loss);
  EXPECT_EQ(resumed->normalizer().action_max.to_vector<float>(),
            started.normalizer().action_max.to_vector<float>());

  Normalizer z = n;
  z.mode = Normalizer::Mode::z_score;
  EXPECT_THAT(test::error_of([&] { Trainer(config, z); }),
              HasSubstr("the statistics are for z_score normalization, the config's is min_max"));
}

// A policy whose weights overflow returns an error, never NaN actions to a robot.
TEST(LoadedPolicy, ActRefusesNonFiniteActions) {
  const Episodes data = demo_episodes();
  test::TempDir dir;
  const LoadedPolicy p = load_policy(fresh_checkpoint(data, dir));
  const Tensor w = p.policy->named_parameters().at("mmdit.final_layers.1.linear_out.bias");
  raw::copy_into(w, full(w.shape(), 3e38));
  Rng rng(0);
  EXPECT_THAT(
      [&] {
        p.act(zeros({1, 2, 2}), rng);
      },
      testing::ThrowsMessage<Error>(HasSubstr("act: the policy's action (0, 0, 0) is ")));
}

// Statistics that pass validate (std 3e38 is finite, and so is 3e38 + 1e-8) can still overflow
// once a normalised action is unnormalised: act() returned inf actions. It checks them too.
TEST(LoadedPolicy, ActRefusesActionsThatOverflowOnceUnnormalised) {
  const Episodes data = demo_episodes();
  TrainConfig c = tiny_config(data);
  c.objective = "mse";
  c.normalization = "z_score";
  test::TempDir dir;
  Trainer(c, data).save_checkpoint(dir.file("c.safetensors"));
  LoadedPolicy p = load_policy(dir.file("c.safetensors"));
  // Zero output weights: every normalised action is the bias, 2.
  const NamedTensors params = p.policy->named_parameters();
  const Tensor& w = params.at("mmdit.final_layers.1.linear_out.weight");
  raw::copy_into(w, zeros(w.shape()));
  raw::copy_into(params.at("mmdit.final_layers.1.linear_out.bias"), from_vector({2.0f, 2.0f}, {2}));
  p.normalizer.action_std = from_vector({1.0f, 3e38f}, {2});
  p.normalizer.validate(2, 2);
  Rng rng(0);
  EXPECT_EQ(test::error_of([&] {
              p.act(zeros({1, 2, 2}), rng);
            }),
            "act: the policy's action (0, 0, 1) is inf in the data's units (2 normalised): the "
            "normalizer's action statistics for dimension 1 overflow float32 there");
}

// A regression policy whose last layer has zero weights acts with one constant chunk c (its
// bias, unnormalised), so its open-loop error is a closed form over the windows' unpadded steps.
TEST(ActionError, ConstantPolicyAgainstTheClosedForm) {
  Rng rng(9);
  Episodes data{rng.normal({24, 3}), rng.normal({24, 2}), {0, 7, 19, 24}};  // short: padding
  TrainConfig c = tiny_config(data);
  c.objective = "mse";
  test::TempDir dir;
  Trainer(c, data).save_checkpoint(dir.file("c.safetensors"));
  const LoadedPolicy p = load_policy(dir.file("c.safetensors"));
  const NamedTensors params = p.policy->named_parameters();
  raw::copy_into(params.at("mmdit.final_layers.1.linear_out.weight"),
                 zeros(params.at("mmdit.final_layers.1.linear_out.weight").shape()));
  const Tensor bias = from_vector(std::vector<float>{0.5f, -0.25f}, {2});
  raw::copy_into(params.at("mmdit.final_layers.1.linear_out.bias"), bias);
  const std::vector<float> chunk = p.normalizer.unnormalize_action(bias).to_vector<float>();

  const int64_t H = c.policy.horizon, now = c.policy.n_obs_steps - 1;
  const WindowSampler windows(data, c.policy.n_obs_steps, H, /*seed=*/3);
  for (const int64_t max_windows : {0, 5}) {
    std::vector<int64_t> chosen = windows.permutation(0);
    if (max_windows) chosen.resize(max_windows);
    const Batch b = windows.get(chosen);
    const std::vector<float> a = b.action.to_vector<float>();
    const std::vector<bool> pad = b.action_is_pad.to_vector<bool>();
    std::vector<double> per_dim(2, 0.0);
    double at_now = 0;
    int64_t steps = 0;
    for (size_t w = 0; w < chosen.size(); ++w)
      for (int64_t t = 0; t < H; ++t) {
        if (pad[w * H + t]) continue;
        ++steps;
        for (int64_t j = 0; j < 2; ++j) {
          const double d = chunk[j] - static_cast<double>(a[(w * H + t) * 2 + j]);
          per_dim[j] += d * d;
          if (t == now) at_now += d * d / 2;
        }
      }
    ASSERT_GT(static_cast<int64_t>(chosen.size()) * H, steps) << "no padded step to leave out";
    Rng noise(0);
    const ActionError e = action_error(p, data, max_windows, /*batch_size=*/4, 3, noise);
    EXPECT_EQ(e.windows, static_cast<int64_t>(chosen.size()));
    ASSERT_EQ(e.mse_per_dim.size(), 2u);
    for (int j = 0; j < 2; ++j)
      EXPECT_NEAR(e.mse_per_dim[j], per_dim[j] / steps, 1e-5 * per_dim[j] / steps);
    EXPECT_NEAR(e.mse, (per_dim[0] + per_dim[1]) / (2 * steps), 1e-5 * e.mse);
    EXPECT_NEAR(e.mse_now, at_now / static_cast<double>(chosen.size()), 1e-5 * e.mse_now);
  }
  Rng noise(0);
  Episodes other{rng.normal({10, 4}), rng.normal({10, 2}), {0, 10}};
  EXPECT_THAT([&] { action_error(p, other, 0, 4, 3, noise); },
              testing::ThrowsMessage<Error>(HasSubstr("the data's states and actions have 4 and 2 "
                                                      "dimensions; the policy's state_dim and "
                                                      "act_dim are 3 and 2")));
}

TEST(Cli, EvalOnDemonstrations) {
  const Episodes data = demo_episodes();
  test::TempDir dir;
  save_lerobot_npz(dir.file("demos.npz"), data);
  const std::string ckpt = fresh_checkpoint(data, dir);
  const test::Command r =
      test::run_mmdit("eval " + ckpt + " --data " + dir.file("demos.npz") + " --windows 20");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("20 windows of 6 episodes, 4-action chunks"));
  EXPECT_THAT(r.output, HasSubstr("action MSE "));
  EXPECT_THAT(r.output, HasSubstr("action for now (index 1): MSE "));
  const test::Command mixed =
      test::run_mmdit("eval " + ckpt + " --data " + dir.file("demos.npz") + " --episodes 5");
  EXPECT_NE(mixed.status, 0);
  EXPECT_THAT(mixed.output, HasSubstr("eval: --episodes is for the demo task's closed-loop"));
  const test::Command keys =
      test::run_mmdit("eval " + ckpt + " --data " + dir.file("demos.npz") + " --obs-keys state");
  EXPECT_NE(keys.status, 0);
  EXPECT_THAT(keys.output, HasSubstr("eval: --obs-keys selects HDF5 observation groups"));
  const test::Command alone = test::run_mmdit("eval " + ckpt + " --windows 5");
  EXPECT_NE(alone.status, 0);
  EXPECT_THAT(alone.output, HasSubstr("eval: --windows needs --data"));
}

// eval --json prints one JSON object: open-loop, the numbers action_error gives here on the same
// windows and noise; closed-loop, the counts the text output prints.
TEST(Cli, EvalPrintsOneJsonObjectForScripts) {
  const Episodes data = demo_episodes();
  test::TempDir dir;
  save_lerobot_npz(dir.file("demos.npz"), data);
  Trainer trainer(tiny_config(data), data);
  Rng weights(5);  // a fresh policy's chunks do not depend on the observations
  test::randomize(trainer.policy(), weights);
  trainer.restart_ema();
  const std::string ckpt = dir.file("c.safetensors");
  trainer.save_checkpoint(ckpt);

  const test::Command open = test::run_mmdit("eval " + ckpt + " --data " + dir.file("demos.npz") +
                                             " --windows 20 --batch-size 8 --seed 4 --json");
  ASSERT_EQ(open.status, 0) << open.output;
  const nlohmann::json j = nlohmann::json::parse(open.output);
  Rng rng(5);  // eval's noise: Rng(seed + 1)
  const ActionError e = action_error(load_policy(ckpt), data, 20, 8, 4, rng);
  EXPECT_EQ(j.at("mse").get<double>(), e.mse);
  EXPECT_EQ(j.at("rmse").get<double>(), std::sqrt(e.mse));
  EXPECT_EQ(j.at("mse_now").get<double>(), e.mse_now);
  EXPECT_EQ(j.at("mse_per_dim").get<std::vector<double>>(), e.mse_per_dim);
  EXPECT_EQ(j.at("windows").get<int64_t>(), 20);
  EXPECT_EQ(j.at("data_episodes").get<int64_t>(), 6);
  EXPECT_EQ(j.at("now_index").get<int64_t>(), 1);
  EXPECT_EQ(j.at("batch_size").get<int64_t>(), 8);
  EXPECT_EQ(j.at("checkpoint").get<std::string>(), ckpt);
  EXPECT_EQ(j.at("weights").get<std::string>(), "EMA");
  EXPECT_EQ(j.at("precision").get<std::string>(), "f32");
  EXPECT_EQ(j.at("sample_steps").get<int64_t>(), tiny_config(data).sample_steps);
  EXPECT_EQ(j.at("seed").get<int64_t>(), 4);
  const nlohmann::json other = nlohmann::json::parse(
      test::run_mmdit("eval " + ckpt + " --data " + dir.file("demos.npz") +
                      " --windows 5 --no-ema --weights bf16 --sample-steps 3 --json")
          .output);
  EXPECT_EQ(other.at("weights").get<std::string>(), "parameters");
  EXPECT_EQ(other.at("precision").get<std::string>(), "bf16");
  EXPECT_EQ(other.at("sample_steps").get<int64_t>(), 3);

  const std::string closed_args = "eval " + ckpt + " --episodes 6 --n-action-steps 2 --seed 2";
  const test::Command text = test::run_mmdit(closed_args);
  const test::Command closed = test::run_mmdit(closed_args + " --json");
  ASSERT_EQ(closed.status, 0) << closed.output;
  const nlohmann::json c = nlohmann::json::parse(closed.output);
  const int64_t successes = c.at("successes").get<int64_t>();
  EXPECT_THAT(text.output, HasSubstr(str_cat("6 episodes: ", successes, " succeeded, ",
                                             c.at("collisions").get<int64_t>(), " collided, ",
                                             c.at("timeouts").get<int64_t>(), " timed out")));
  EXPECT_EQ(c.at("success_rate").get<double>(), successes / 6.0);
  EXPECT_EQ(c.at("step").get<int64_t>(), 0);

  // A path that is not UTF-8 is printed with U+FFFD, not refused after the evaluation.
  const std::string latin1 = dir.file("caf\xE9.safetensors");
  fs::copy_file(ckpt, latin1);
  const test::Command odd =
      test::run_mmdit("eval '" + latin1 + "' --episodes 2 --n-action-steps 2 --json");
  ASSERT_EQ(odd.status, 0) << odd.output;
  EXPECT_EQ(nlohmann::json::parse(odd.output).at("checkpoint").get<std::string>(),
            dir.file("caf\xEF\xBF\xBD.safetensors"));
}

// train --stats: a new run normalises with the statistics given (the reference agent's config
// gives its ranges), which its checkpoint keeps; a resumed run keeps its own.
TEST(Cli, TrainTakesTheStatisticsGiven) {
  const Episodes data = demo_episodes();
  test::TempDir dir;
  save_lerobot_npz(dir.file("demos.npz"), data);
  TrainConfig config = tiny_config(data);
  config.steps = 2;
  std::ofstream(dir.file("config.json")) << config.to_json();
  std::ofstream(dir.file("stats.json")) << R"({"mode": "min_max", "state_min": [-2, -3],
      "state_max": [2, 3], "action_min": [-0.5, -0.5], "action_max": [0.5, 0.25]})";
  const std::string run = dir.file("run");
  test::Command r = test::run_mmdit("train --data " + dir.file("demos.npz") + " --config " +
                                    dir.file("config.json") + " --stats " + dir.file("stats.json") +
                                    " --out " + run + " --threads 1");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("normalisation (min_max) from " + dir.file("stats.json")));
  const LoadedPolicy p = load_policy(run + "/checkpoint.safetensors");
  EXPECT_EQ(p.normalizer.state_max.to_vector<float>(), (std::vector<float>{2, 3}));
  EXPECT_EQ(p.normalizer.action_max.to_vector<float>(), (std::vector<float>{0.5, 0.25}));
  r = test::run_mmdit("train --data " + dir.file("demos.npz") + " --resume " + run +
                      "/checkpoint.safetensors --steps 3 --stats " + dir.file("stats.json"));
  EXPECT_NE(r.status, 0);
  EXPECT_THAT(r.output, HasSubstr("train: --stats sets a new run's statistics; a resumed run "
                                  "keeps its checkpoint's"));
  std::ofstream(dir.file("short.json")) << R"({"mode": "min_max", "state_min": [0],
      "state_max": [1], "action_min": [0, 0], "action_max": [1, 1]})";
  r = test::run_mmdit("train --data " + dir.file("demos.npz") + " --config " +
                      dir.file("config.json") + " --stats " + dir.file("short.json") + " --out " +
                      dir.file("short"));
  EXPECT_NE(r.status, 0);
  EXPECT_THAT(r.output, HasSubstr("train: --stats " + dir.file("short.json") +
                                  ": normalizer: 'state_min' is float32 (1,); expected "
                                  "(state_dim,) = (2,)"));

  // The statistics' mode is the run's when --config does not set one; a --config that sets
  // another is refused before the data loads.
  std::ofstream(dir.file("z.json")) << R"({"mode": "z_score", "state_mean": [0, 1],
      "state_std": [1, 2], "action_mean": [0, 0], "action_std": [0.5, 0.5]})";
  std::string unset = config.to_json();
  const std::string key = "\"normalization\": \"min_max\",";
  ASSERT_NE(unset.find(key), std::string::npos) << unset;
  unset.erase(unset.find(key), key.size());
  std::ofstream(dir.file("unset.json")) << unset;
  r = test::run_mmdit("train --data " + dir.file("demos.npz") + " --config " +
                      dir.file("unset.json") + " --stats " + dir.file("z.json") + " --out " +
                      dir.file("z") + " --threads 1");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("normalisation (z_score) from " + dir.file("z.json")));
  EXPECT_EQ(load_policy(dir.file("z") + "/checkpoint.safetensors")
                .normalizer.state_std.to_vector<float>(),
            (std::vector<float>{1, 2}));
  r = test::run_mmdit("train --data " + dir.file("demos.npz") + " --config " +
                      dir.file("config.json") + " --stats " + dir.file("z.json") + " --out " +
                      dir.file("conflict"));
  EXPECT_NE(r.status, 0);
  EXPECT_THAT(r.output,
              HasSubstr("train: --stats " + dir.file("z.json") +
                        " holds z_score statistics, and --config " + dir.file("config.json") +
                        " sets \"normalization\": \"min_max\""));
  EXPECT_THAT(r.output, Not(HasSubstr("data: ")));
}

// train --val-data: rows at every --val-every steps and at the end, each the action error of the
// policy the checkpoint of that step holds; a resumed run keeps the rows up to its checkpoint.
TEST(Cli, TrainValidatesOnHeldOutDemonstrations) {
  const Episodes data = demo_episodes(6), held_out = demo_episodes(3);
  test::TempDir dir;
  save_lerobot_npz(dir.file("demos.npz"), data);
  save_lerobot_npz(dir.file("val.npz"), held_out);
  TrainConfig c = tiny_config(data);
  std::ofstream(dir.file("config.json")) << c.to_json();
  const std::string out = dir.file("run");
  const auto train = [&](const std::string& args) {
    return test::run_mmdit("train --data " + dir.file("demos.npz") + " --val-data " +
                           dir.file("val.npz") + " --val-windows 12 --out " + out + " " + args);
  };
  test::Command r = train("--config " + dir.file("config.json") + " --steps 5 --val-every 2");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("step      4  validation: action MSE "));
  const auto rows = [&] {
    std::vector<std::vector<double>> values;
    std::ifstream csv(out + "/val.csv");
    std::string line;
    std::getline(csv, line);
    EXPECT_EQ(line, "step,windows,mse,mse_now");
    while (std::getline(csv, line)) {
      std::vector<double> v(4);
      EXPECT_EQ(std::sscanf(line.c_str(), "%lf,%lf,%lf,%lf", &v[0], &v[1], &v[2], &v[3]), 4)
          << line;
      values.push_back(v);
    }
    return values;
  };
  std::vector<std::vector<double>> v = rows();
  ASSERT_EQ(v.size(), 3u);
  EXPECT_EQ(v[0][0], 2);
  EXPECT_EQ(v[1][0], 4);
  EXPECT_EQ(v[2][0], 5);
  EXPECT_EQ(v[2][1], 12);
  Rng noise(c.seed);
  const ActionError e =
      action_error(load_policy(out + "/checkpoint.safetensors"), held_out, 12, 64, c.seed, noise);
  EXPECT_NEAR(v[2][2], e.mse, 1e-5 * e.mse);
  EXPECT_NEAR(v[2][3], e.mse_now, 1e-5 * e.mse_now);

  r = train("--resume " + out + "/checkpoint.safetensors --steps 8 --val-every 3");
  ASSERT_EQ(r.status, 0) << r.output;
  v = rows();
  ASSERT_EQ(v.size(), 5u);
  EXPECT_EQ(v[3][0], 6);
  EXPECT_EQ(v[4][0], 8);
  // A run killed after validating past its last checkpoint left a row that a resumed run, even
  // one that does not validate, drops.
  std::ofstream(out + "/val.csv", std::ios::app) << "9,12,0.5,0.5\n";
  r = test::run_mmdit("train --data " + dir.file("demos.npz") + " --resume " + out +
                      "/checkpoint.safetensors --steps 9");
  ASSERT_EQ(r.status, 0) << r.output;
  v = rows();
  ASSERT_EQ(v.size(), 5u);
  EXPECT_EQ(v[4][0], 8);
  // A new run over this one without --val-data leaves no val.csv of the old run behind.
  r = test::run_mmdit("train --data " + dir.file("demos.npz") + " --config " +
                      dir.file("config.json") + " --steps 2 --overwrite --out " + out);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_FALSE(std::filesystem::exists(out + "/val.csv"));
  r = test::run_mmdit("train --data " + dir.file("demos.npz") + " --val-every 3 --out " +
                      dir.file("other"));
  EXPECT_NE(r.status, 0);
  EXPECT_THAT(r.output, HasSubstr("--val-every and --val-windows need --val-data"));
}

// A held-out state far outside the training data's range (a dimension constant in training)
// makes the actions overflow: the step's validation fails, says so, and training goes on to its
// checkpoint.
TEST(Cli, TrainGoesOnWhenValidationFails) {
  Rng rng(10);
  Tensor states = rng.normal({30, 2});
  raw::copy_into(raw::narrow(states, 1, 0, 1), zeros({30, 1}));
  Episodes data{states, rng.normal({30, 2}), {0, 15, 30}};
  Episodes held_out{full({12, 2}, 1e35), rng.normal({12, 2}), {0, 12}};
  test::TempDir dir;
  save_lerobot_npz(dir.file("demos.npz"), data);
  save_lerobot_npz(dir.file("val.npz"), held_out);
  std::ofstream(dir.file("config.json")) << tiny_config(data).to_json();
  const test::Command r = test::run_mmdit(
      "train --data " + dir.file("demos.npz") + " --val-data " + dir.file("val.npz") +
      " --config " + dir.file("config.json") + " --steps 2 --val-every 1 --out " + dir.file("run"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_THAT(r.output,
              HasSubstr("warning: validation at step 1 failed: act: the policy's action"));
  EXPECT_EQ(load_policy(dir.file("run/checkpoint.safetensors")).step, 2);
  EXPECT_THAT(read_file(dir.file("run/val.csv")), HasSubstr("\n1,"));
  EXPECT_THAT(read_file(dir.file("run/val.csv")), HasSubstr(",nan,nan\n"));
}

// A learning rate of 1e30 blows the parameters up in one step, and the next loss is not
// finite: that step throws, naming itself, before it touches the parameters.
TEST(Trainer, NonFiniteLossStopsBeforeTheUpdate) {
  const Episodes data = demo_episodes();
  TrainConfig c = tiny_config(data);
  c.lr = 1e30;
  c.warmup_steps = 0;
  c.cosine_decay = false;
  c.grad_clip = 0;
  Trainer t(c, data);
  t.train_step();
  const std::vector<float> after_one =
      t.policy().named_parameters().at("state_encoder.weight").to_vector<float>();
  test::TempDir dir;
  t.save_checkpoint(dir.file("before.safetensors"));
  EXPECT_THAT([&] { t.train_step(); },
              testing::ThrowsMessage<Error>(HasSubstr("training step 2: the loss is ")));
  EXPECT_EQ(t.step(), 1);
  EXPECT_EQ(t.policy().named_parameters().at("state_encoder.weight").to_vector<float>(), after_one);
  // The batch and noise drawn for the failed step are given back too: a checkpoint saved now is
  // the one of step 1, random state and data order included.
  t.save_checkpoint(dir.file("after.safetensors"));
  EXPECT_TRUE(read_file(dir.file("after.safetensors")) ==
              read_file(dir.file("before.safetensors")));
}

// A finite loss whose gradients overflow: the time embedding's hidden units at 3.4e38 with the
// next layer's weights scaled down keep the forward finite, while the gradient of that layer's
// weights (3.4e38 times the conditioning's gradient, made large) is inf. With or without
// clipping, the step throws naming itself and the tensor, and the trainer is left exactly as it
// was: a checkpoint saved after the throw is byte for byte the one saved before.
TEST(Trainer, NonFiniteGradientStopsBeforeTheUpdate) {
  const Episodes data = demo_episodes();
  for (const double clip : {0.0, 1.0}) {
    SCOPED_TRACE(clip);
    TrainConfig c = tiny_config(data);
    c.lr = 1e-2;
    c.warmup_steps = 0;
    c.grad_clip = clip;
    Trainer t(c, data);
    for (int i = 0; i < 5; ++i) t.train_step();
    const NamedTensors p = t.policy().named_parameters();
    const Tensor bias = p.at("mmdit.timestep_embeds.0.linear1.bias");
    raw::copy_into(bias, full(bias.shape(), 3.4e38));
    auto scale = [&](const char* name, double s) {
      raw::copy_into(p.at(name), raw::mul_scalar(p.at(name), s));
    };
    scale("mmdit.timestep_embeds.0.linear2.weight", 1 / 3.4e38);
    scale("mmdit.blocks.0.to_cond.weight", 1000);
    scale("mmdit.final_layers.1.adaLN_modulation.weight", 1000);
    test::TempDir dir;
    t.save_checkpoint(dir.file("before.safetensors"));
    EXPECT_THAT([&] { t.train_step(); },
                testing::ThrowsMessage<Error>(testing::AllOf(
                    testing::StartsWith("training step 6: AdamW::update: the gradient of "
                                        "'mmdit.timestep_embeds.0.linear2.weight' "
                                        "holds inf at "),
                    testing::EndsWith("; nothing was updated"))));
    EXPECT_EQ(t.step(), 5);
    t.save_checkpoint(dir.file("after.safetensors"));
    EXPECT_TRUE(read_file(dir.file("after.safetensors")) ==
                read_file(dir.file("before.safetensors")));
  }
}

TEST(LoadedPolicy, ActRejectsObservationsOfTheWrongShapeOrNotFinite) {
  const Episodes data = demo_episodes();
  Trainer t(tiny_config(data), data);
  const std::string dir = temp_dir("act");
  t.save_checkpoint(dir + "/c.safetensors");
  const LoadedPolicy p = load_policy(dir + "/c.safetensors");
  Rng rng(0);
  EXPECT_THAT([&] { p.act(zeros({4}), rng); },
              testing::ThrowsMessage<Error>(
                  HasSubstr("act: observations have shape (4,); the policy takes (B, 2, 2), B >= "
                            "1, or (2, 2) for one example")));
  EXPECT_THAT(
      [&] {
        p.act(zeros({3, 2}), rng);
      },
      testing::ThrowsMessage<Error>(HasSubstr("act: observations have shape (3,2)")));
  EXPECT_THAT(
      [&] {
        p.act(zeros({0, 2, 2}), rng);
      },
      testing::ThrowsMessage<Error>(HasSubstr("shape (0,2,2)")));
  EXPECT_THAT(
      [&] {
        p.act(zeros({1, 2, 2}, DType::boolean), rng);
      },
      testing::ThrowsMessage<Error>(HasSubstr("act: observations are bool")));
  Tensor obs = zeros({2, 2, 2});
  obs.data<float>()[6] = INFINITY;
  EXPECT_THAT([&] { p.act(obs, rng); },
              testing::ThrowsMessage<Error>(HasSubstr("act: observation (1, 1, 0) is inf")));
  EXPECT_EQ(p.act(zeros({2, 2, 2}, DType::f64), rng).shape(), (Shape{2, 4, 2}));
  // A finite float64 past float32's range is named as the number it is, not as the inf it becomes.
  Tensor huge = zeros({2, 2, 2}, DType::f64);
  huge.data<double>()[5] = -1e300;
  EXPECT_EQ(test::error_of([&] { p.act(huge, rng); }),
            "act: observation (1, 0, 1) is -1e+300, past float32's range (the policy acts in "
            "float32)");
  fs::remove_all(dir);
}

// ---------------------------------------------------------------- the CLI on files a test writes
// A robomimic file of `data`'s episodes: data.actions, and the observation groups `obs_groups`,
// each (frames, width) ({"state", data.states} by default).
void write_robomimic(const std::string& path, const Episodes& data,
                     std::vector<std::pair<std::string, Tensor>> obs_groups = {}) {
  if (obs_groups.empty()) obs_groups = {{"state", data.states}};
  const hid_t file = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  const hid_t root = H5Gcreate2(file, "data", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  for (int64_t e = 0; e < data.num_episodes(); ++e) {
    const int64_t a = data.episode_starts[e], n = data.episode_starts[e + 1] - a;
    const std::string demo = "demo_" + std::to_string(e);
    const hid_t g = H5Gcreate2(root, demo.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    const hid_t obs = H5Gcreate2(g, "obs", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    auto write = [&](hid_t parent, const char* name, const Tensor& rows) {
      const Tensor c = raw::contiguous(raw::narrow(rows, 0, a, n));
      const hsize_t dims[2] = {static_cast<hsize_t>(n), static_cast<hsize_t>(rows.shape()[1])};
      const hid_t space = H5Screate_simple(2, dims, nullptr);
      const hid_t set =
          H5Dcreate2(parent, name, H5T_IEEE_F32LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
      H5Dwrite(set, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, c.data<float>());
      H5Dclose(set);
      H5Sclose(space);
    };
    for (const auto& group : obs_groups) write(obs, group.first.c_str(), group.second);
    write(g, "actions", data.actions);
    H5Gclose(obs);
    H5Gclose(g);
  }
  H5Gclose(root);
  H5Fclose(file);
}

// The first field of each row of a metrics.csv or val.csv: the steps it holds.
std::vector<int64_t> csv_steps(const std::string& path) {
  std::istringstream csv(read_file(path));
  std::string line;
  std::getline(csv, line);
  std::vector<int64_t> steps;
  while (std::getline(csv, line)) steps.push_back(std::stoll(line));
  return steps;
}

// dir/demos.npz with `episodes` demo episodes, and dir/config.json with a tiny policy's sizes.
void write_tiny_run(const std::string& dir, int episodes, const std::string& policy_sizes,
                    int batch_size) {
  save_lerobot_npz(dir + "/demos.npz", demo_episodes(episodes));
  std::ofstream cfg(dir + "/config.json");
  cfg << R"({"policy": {"hidden_size": 16, "depth": 1, "dim_cond": 16, "timestep_embed_dim": 8,
             "dim_head": 8, "heads": 2, "ff_mult": 2, )"
      << policy_sizes << "}, \"batch_size\": " << batch_size << "}";
}

int run(const std::string& command) {
  return std::system((command + " > /dev/null 2>&1").c_str());
}

TEST(Cli, TrainsOnNpzAndHdf5AndResumes) {
  const Episodes data = demo_episodes(8);
  const std::string dir = temp_dir("cli");
  save_lerobot_npz(dir + "/demos.npz", data);
  write_robomimic(dir + "/demos.hdf5", data);
  {
    std::ofstream cfg(dir + "/config.json");
    cfg << R"({"policy": {"horizon": 4, "hidden_size": 16, "depth": 1, "dim_cond": 16,
               "timestep_embed_dim": 8, "dim_head": 8, "heads": 2, "ff_mult": 2},
              "batch_size": 8, "lr": 0.001})";
  }
  const std::string mmdit = MMDIT_BINARY;
  for (const char* file : {"demos.npz", "demos.hdf5"}) {
    const std::string out = dir + "/run_" + file;
    ASSERT_EQ(run(mmdit + " train --data " + dir + "/" + file + " --config " + dir +
                  "/config.json --steps 6 --log-every 2 --out " + out),
              0)
        << file;
    EXPECT_TRUE(fs::exists(out + "/checkpoint.safetensors"));
    EXPECT_TRUE(fs::exists(out + "/loss.svg"));
    std::ifstream csv(out + "/metrics.csv");
    std::string header, line;
    std::getline(csv, header);
    EXPECT_EQ(header, "step,loss,grad_norm,lr,steps_per_s");
    int rows = 0;
    while (std::getline(csv, line)) ++rows;
    EXPECT_EQ(rows, 6);
  }
  const std::string out = dir + "/run_demos.npz";
  const auto train = [&](const std::string& args) {
    return run(mmdit + " train --data " + dir + "/demos.npz " + args);
  };
  // A resumed run keeps its config; only --steps may raise the total.
  EXPECT_NE(train("--resume " + out + "/checkpoint.safetensors --lr 0.1 --out " + out), 0);
  EXPECT_EQ(load_policy(out + "/checkpoint.safetensors").step, 6);
  ASSERT_EQ(train("--resume " + out + "/checkpoint.safetensors --steps 10 --out " + out), 0);
  EXPECT_EQ(load_policy(out + "/checkpoint.safetensors").step, 10);
  EXPECT_EQ(csv_steps(out + "/metrics.csv"), (std::vector<int64_t>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}));
  // Without --out a resumed run goes on in its own directory, and never over another run's.
  const std::string other = dir + "/run_demos.hdf5";
  EXPECT_NE(train("--resume " + out + "/checkpoint.safetensors --steps 12 --out " + other), 0);
  EXPECT_EQ(load_policy(other + "/checkpoint.safetensors").step, 6);
  ASSERT_EQ(train("--resume " + out + "/checkpoint.safetensors --steps 12"), 0);
  EXPECT_EQ(load_policy(out + "/checkpoint.safetensors").step, 12);
  // A new run does not silently replace a run's checkpoint.
  EXPECT_NE(train("--config " + dir + "/config.json --steps 2 --out " + out), 0);
  EXPECT_EQ(load_policy(out + "/checkpoint.safetensors").step, 12);
  ASSERT_EQ(train("--config " + dir + "/config.json --steps 2 --overwrite --out " + out), 0);
  EXPECT_EQ(load_policy(out + "/checkpoint.safetensors").step, 2);
  // --overwrite removes the old run's checkpoint first: a new run that dies before its first
  // save leaves no checkpoint beside its own config.json and metrics.
  const std::string replaced = dir + "/replaced";
  ASSERT_EQ(train("--config " + dir + "/config.json --steps 2 --out " + replaced), 0);
  EXPECT_EQ(
      train("--config " + dir + "/config.json --lr 1e30 --steps 5 --overwrite --out " + replaced),
      1 << 8);
  EXPECT_FALSE(fs::exists(replaced + "/checkpoint.safetensors"));
  EXPECT_THAT(read_file(replaced + "/config.json"), HasSubstr("1e+30"));
  EXPECT_NE(train("--log-every 0 --out " + dir + "/y"), 0);
  // Diverging (lr 1e30 makes the second loss non-finite) stops without writing a checkpoint.
  EXPECT_EQ(
      train("--config " + dir + "/config.json --lr 1e30 --steps 5 --out " + dir + "/diverged"),
      1 << 8);
  EXPECT_FALSE(fs::exists(dir + "/diverged/checkpoint.safetensors"));
  EXPECT_EQ(run(mmdit + " info " + out + "/checkpoint.safetensors"), 0);
  EXPECT_EQ(run(mmdit + " sample " + out + "/checkpoint.safetensors --obs 0,-1,0,-0.95"), 0);
  EXPECT_NE(run(mmdit + " sample " + out + "/checkpoint.safetensors --obs 0,-1"), 0);
  EXPECT_NE(run(mmdit + " sample " + out + "/checkpoint.safetensors --obs 0,-1abc,0,-0.95"), 0);
  EXPECT_NE(run(mmdit + " sample " + out + "/checkpoint.safetensors --obs 0,nan,0,-0.95"), 0);
  // bfloat16 sampler weights: the same noise gives actions within bfloat16's precision. The raw
  // parameters, not the EMA: two steps in, the EMA has barely left its zero-initialised output
  // layer, and with it the actions came out bit for bit the same in both precisions.
  for (const char* w : {"f32", "bf16"})
    ASSERT_EQ(run(mmdit + " sample " + out + "/checkpoint.safetensors --obs 0,-1,0,-0.95 --seed 3" +
                  " --no-ema --weights " + w + " --out-npy " + dir + "/a_" + w + ".npy"),
              0)
        << w;
  const Tensor a32 = load_npy(dir + "/a_f32.npy"), a16 = load_npy(dir + "/a_bf16.npy");
  EXPECT_EQ(a32.shape(), (Shape{1, 4, 2}));
  // Close, and not equal: --weights bf16 that fell back to float32 would pass the first alone.
  EXPECT_LT(test::max_abs_diff(a32, a16), 0.05);
  EXPECT_GT(test::max_abs_diff(a32, a16), 0);
  EXPECT_NE(run(mmdit + " sample " + out + "/checkpoint.safetensors --obs 0,-1,0,-0.95" +
                " --weights fp8"),
            0);
  // --sample-steps: the library's sampler of that many steps, on the same noise.
  ASSERT_EQ(run(mmdit + " sample " + out + "/checkpoint.safetensors --obs 0,-1,0,-0.95 --seed 3" +
                " --no-ema --sample-steps 2 --out-npy " + dir + "/two_steps.npy"),
            0);
  {
    const LoadedPolicy two = load_policy(out + "/checkpoint.safetensors", false,
                                         WeightPrecision::f32, /*sample_steps=*/2);
    Rng rng(3);
    EXPECT_EQ(load_npy(dir + "/two_steps.npy").to_vector<float>(),
              two.act(from_vector(std::vector<float>{0, -1, 0, -0.95f}, {1, 2, 2}), rng)
                  .to_vector<float>());
  }
  EXPECT_NE(run(mmdit + " sample " + out + "/checkpoint.safetensors --obs 0,-1,0,-0.95" +
                " --sample-steps 0"),
            0);
  EXPECT_NE(run(mmdit + " train --data " + dir + "/missing.npz --out " + dir + "/x"), 0);
  EXPECT_NE(run(mmdit + " train --data " + dir + "/demos.hdf5 --obs-keys nope --out " + dir + "/x"),
            0);
  fs::remove_all(dir);
}

// The loss plot comes after the final checkpoint: a plot that cannot be written (a full disk;
// here a directory in its place) warns, and the run still succeeds, or stops by its signal.
TEST(Cli, ALossPlotThatCannotBeWrittenDoesNotFailTheRun) {
  const std::string dir = temp_dir("cli_plot");
  write_tiny_run(dir, 8, R"("horizon": 4)", 8);
  fs::create_directories(dir + "/run/loss.svg");
  const test::Command r = test::run_mmdit("train --data " + dir + "/demos.npz --config " + dir +
                                          "/config.json --steps 3 --out " + dir + "/run");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("warning: the loss plot was not written: "));
  EXPECT_THAT(r.output, HasSubstr("into " + dir + "/run/checkpoint.safetensors; Ctrl-C saves it"));
  EXPECT_EQ(load_policy(dir + "/run/checkpoint.safetensors").step, 3);
}

// Options that cannot work are refused before any work, naming the option; and a run resumed into
// a new directory does not take over the logs of whatever ran there before.
TEST(Cli, RefusesBadOptionsEarlyAndKeepsLogsApart) {
  const std::string dir = temp_dir("cli_options");
  write_tiny_run(dir, 8, R"("horizon": 4)", 8);
  const std::string train = "train --data " + dir + "/demos.npz --config " + dir + "/config.json ";
  // An empty --out (an unset variable in a script) used to mean the root directory. Missing data
  // keeps a regression from writing there: the option must be refused before the data is read.
  const test::Command empty_out =
      test::run_mmdit("train --data " + dir + "/missing.npz --steps 1 --out ''");
  EXPECT_NE(empty_out.status, 0);
  EXPECT_THAT(empty_out.output, HasSubstr("--out: must not be empty"));
  // A negative seed used to wrap to 2^64 - 1.
  const test::Command negative_seed =
      test::run_mmdit(train + "--steps 1 --seed -1 --out " + dir + "/s");
  EXPECT_NE(negative_seed.status, 0);
  EXPECT_THAT(negative_seed.output, HasSubstr("--seed: must be at least 0, got -1"));
  // -0 is 0.
  EXPECT_EQ(test::run_mmdit(train + "--steps 1 --seed -0 --out " + dir + "/zero").status, 0);
  EXPECT_FALSE(fs::exists(dir + "/s"));
  // Decimal as written: CLI11 alone read "010" as octal 8.
  ASSERT_EQ(test::run_mmdit(train + "--steps 1 --seed 010 --out " + dir + "/decimal").status, 0);
  EXPECT_THAT(read_file(dir + "/decimal/config.json"), HasSubstr("\"seed\": 10"));
  // demo checked --n-action-steps against the horizon only after training.
  const test::Command demo =
      test::run_mmdit("demo --steps 2 --demos 3 --n-action-steps 100 --out " + dir + "/demo");
  EXPECT_NE(demo.status, 0);
  EXPECT_THAT(demo.output, HasSubstr("--n-action-steps 100 exceeds"));
  EXPECT_FALSE(fs::exists(dir + "/demo/demos.npz")) << demo.output;

  // Resumed into a directory that holds another run's logs but no checkpoint: the logs start
  // afresh at the resumed step (they kept the other run's rows 1-3 before).
  ASSERT_EQ(test::run_mmdit(train + "--steps 3 --out " + dir + "/a").status, 0);
  fs::create_directories(dir + "/b");
  write_file_atomically(dir + "/b/metrics.csv",
                        "step,loss,grad_norm,lr,steps_per_s\n1,9,9,9,9\n2,9,9,9,9\n3,9,9,9,9\n");
  write_file_atomically(dir + "/b/val.csv", "step,windows,mse,mse_now\n3,8,9,9\n");
  const test::Command resumed =
      test::run_mmdit("train --data " + dir + "/demos.npz --resume " + dir +
                      "/a/checkpoint.safetensors --steps 5 --out " + dir + "/b");
  ASSERT_EQ(resumed.status, 0) << resumed.output;
  EXPECT_EQ(csv_steps(dir + "/b/metrics.csv"), (std::vector<int64_t>{4, 5}));
  EXPECT_FALSE(fs::exists(dir + "/b/val.csv"));
  // In its own directory a resumed run keeps its rows.
  ASSERT_EQ(test::run_mmdit("train --data " + dir + "/demos.npz --resume " + dir +
                            "/a/checkpoint.safetensors --steps 4")
                .status,
            0);
  EXPECT_EQ(csv_steps(dir + "/a/metrics.csv"), (std::vector<int64_t>{1, 2, 3, 4}));
  fs::remove_all(dir);
}

// A policy whose chunks end before "now" (horizon < n_obs_steps) trained, and then no controller
// could act on it: the deploy example called act() forever without executing an action, and
// eval --data printed an MSE of nan for the action for now. train refuses its config.
TEST(Cli, TrainRefusesAPolicyWithNoActionForNow) {
  const std::string dir = temp_dir("no_action_for_now");
  write_tiny_run(dir, 4, R"("n_obs_steps": 2, "horizon": 1)", 4);
  const test::Command r = test::run_mmdit("train --data " + dir + "/demos.npz --config " + dir +
                                          "/config.json --steps 1 --out " + dir + "/run");
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("horizon 1 is shorter than n_obs_steps 2")) << r.output;
  EXPECT_FALSE(fs::exists(dir + "/run"));
  fs::remove_all(dir);
}

// Data of other sizes than the policy's were refused as "train: the data's states have 3
// dimensions but the policy's state_dim is 2" by import-eqx too, and by eval as "action_error:
// ...", naming neither the data nor the policy's file.
TEST(Cli, DataOfOtherSizesIsRefusedNamingBothFiles) {
  const Episodes data = demo_episodes();
  test::TempDir dir;
  const std::string ckpt = fresh_checkpoint(data, dir);
  Rng rng(1);
  const Episodes wider{
      rng.normal({10, data.state_dim() + 1}), rng.normal({10, data.act_dim()}), {0, 10}};
  const std::string other = dir.file("wider.npz");
  save_lerobot_npz(other, wider);
  const std::string sizes = str_cat(" has state_dim ", data.state_dim() + 1, " and act_dim ",
                                    data.act_dim(), ", but the policy of ");
  const std::string policy_sizes =
      str_cat(" has state_dim ", data.state_dim(), " and act_dim ", data.act_dim());
  const std::string eqx = dir.file("p.eqx");
  ASSERT_EQ(test::run_mmdit("export-eqx " + ckpt + " --out " + eqx).status, 0);
  for (const auto& [args, message] : std::vector<std::pair<std::string, std::string>>{
           {"eval " + ckpt + " --data " + other,
            "eval: --data " + other + sizes + ckpt + policy_sizes},
           {"train --resume " + ckpt + " --steps 10 --data " + other,
            "train: --data " + other + sizes + ckpt + policy_sizes},
           {"import-eqx " + eqx + " --data " + other + " --out " + dir.file("imported"),
            "import-eqx: --data " + other + sizes + "the .eqx file " + eqx + policy_sizes}}) {
    const test::Command r = test::run_mmdit(args);
    EXPECT_NE(r.status, 0) << args;
    EXPECT_THAT(r.output, HasSubstr(message)) << r.output;
  }
}

// The README says train --help lists every default; --lr, --seed and the config's other keys
// showed none.
TEST(Cli, TrainHelpListsEveryDefault) {
  const test::Command r = test::run_mmdit("train --help");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr(TrainConfig().to_json()));
  EXPECT_THAT(r.output, HasSubstr(str_cat("peak learning rate (default: the config's, else ",
                                          TrainConfig().lr, ")")));
}

// An output path naming a directory failed only at the final rename, after the whole evaluation
// or sampling had run ("renaming 'plots.tmp.8445.0' failed: Is a directory").
TEST(Cli, RefusesAnOutputPathThatIsADirectoryBeforeWorking) {
  const Episodes data = demo_episodes();
  test::TempDir dir;
  save_lerobot_npz(dir.file("demos.npz"), data);
  const std::string ckpt = fresh_checkpoint(data, dir);
  fs::create_directories(dir.file("plots"));
  for (const auto& [args, flag] : std::vector<std::pair<std::string, std::string>>{
           {"eval " + ckpt + " --episodes 1 --svg ", "--svg"},
           {"sample " + ckpt + " --obs 0,-1,0,-0.95 --out-npy ", "--out-npy"},
           {"export-eqx " + ckpt + " --out ", "--out"}})
    for (const std::string& out : {dir.file("plots"), dir.file("plots") + "/"}) {
      const test::Command r = test::run_mmdit(args + out);
      EXPECT_NE(r.status, 0) << args << out;
      EXPECT_THAT(r.output, HasSubstr(flag + " " + out + ": is a directory; name a file to write"))
          << r.output;
      EXPECT_THAT(r.output, Not(HasSubstr("success rate"))) << r.output;
    }
  EXPECT_TRUE(fs::is_empty(dir.file("plots")));
}

// OMP_NUM_THREADS=100000 crashed in libgomp at the first parallel region (it could not start the
// threads), and --threads took any count, which OpenBLAS silently lowered to its MAX_THREADS.
TEST(Cli, ThreadCountsStopAtOpenBlasMaxThreads) {
  const std::string most = std::to_string(max_threads());
  test::Command r = test::run_mmdit("inspect --model mmdit --profile", "OMP_NUM_THREADS=100000 ");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("one forward and backward pass, " + most + " thread(s)"));
  for (const char* command : {"train --data demos.npz", "eval x.safetensors", "demo",
                              "bench --workload tiny-gradcheck"}) {
    r = test::run_mmdit(str_cat(command, " --threads ", max_threads() + 1));
    EXPECT_NE(r.status, 0) << command;
    EXPECT_THAT(r.output, HasSubstr(str_cat("--threads: must be from 1 to ", most,
                                            " (OpenBLAS's MAX_THREADS), got ", max_threads() + 1)))
        << command;
  }
}

// train --overwrite removes the old run when the new one starts (README); data the new run
// refuses, whose statistics overflow float32, used to start it (and remove the old run) anyway.
TEST(Cli, OverwriteKeepsTheOldRunWhenTheNewDataIsRefused) {
  const std::string dir = temp_dir("overwrite_refused");
  write_tiny_run(dir, 4, R"("horizon": 4)", 4);
  const std::string config = " --config " + dir + "/config.json --steps 2 --out " + dir + "/run";
  ASSERT_EQ(test::run_mmdit("train --data " + dir + "/demos.npz" + config).status, 0);
  Episodes wide = demo_episodes(4);
  raw::copy_into(raw::narrow(wide.actions, 0, 0, 2),
                 from_vector({-3e38f, 0.0f, 3e38f, 0.0f}, {2, 2}));
  save_lerobot_npz(dir + "/wide.npz", wide);
  const test::Command r =
      test::run_mmdit("train --data " + dir + "/wide.npz" + config + " --overwrite");
  EXPECT_NE(r.status, 0);
  EXPECT_THAT(r.output, HasSubstr("train: the data's min_max statistics cannot normalise it: "
                                  "normalizer: 'action_max'[0] - 'action_min'[0]"));
  EXPECT_EQ(load_policy(dir + "/run/checkpoint.safetensors").step, 2);
  EXPECT_EQ(csv_steps(dir + "/run/metrics.csv"), (std::vector<int64_t>{1, 2}));
  fs::remove_all(dir);
}

// CLI11 alone read a leading 0 as octal and 0x as hexadecimal: --steps 0100 trained 64 steps.
// Every whole-number option of every command reads decimal digits, or is refused naming it.
TEST(Cli, WholeNumberOptionsAreDecimal) {
  const std::string dir = temp_dir("decimal");
  write_tiny_run(dir, 4, R"("horizon": 4)", 4);
  const std::string train = "train --data " + dir + "/demos.npz --config " + dir + "/config.json ";
  const test::Command r = test::run_mmdit(
      train + "--steps 0100 --log-every 050 --checkpoint-every 0 --out " + dir + "/run");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(load_policy(dir + "/run/checkpoint.safetensors").step, 100);
  EXPECT_THAT(r.output, HasSubstr("step     50/100 "));
  // Stopped after 5 s, as below: read as a number, each would train (the second for ever).
  const std::string stop = "timeout 5 ";
  const test::Command hex =
      test::run_mmdit(train + "--batch-size 0x10 --out " + dir + "/hex", stop);
  EXPECT_NE(hex.status, 0);
  EXPECT_THAT(
      hex.output,
      HasSubstr("--batch-size: must be a whole number written in decimal digits, got 0x10"));
  EXPECT_FALSE(fs::exists(dir + "/hex"));
  const test::Command huge =
      test::run_mmdit(train + "--steps 99999999999999999999 --out " + dir + "/huge", stop);
  EXPECT_THAT(huge.output,
              HasSubstr("--steps: must be at most 9223372036854775807, got 99999999999999999999"));
  // Every INT and UINT option that `--help` lists, in every command.
  std::istringstream commands(test::run_mmdit("--help").output);
  int options = 0;
  bool listing = false;
  for (std::string line; std::getline(commands, line);) {
    if (line.rfind("Subcommands:", 0) == 0) {
      listing = true;
      continue;
    }
    std::istringstream words(line);
    std::string command;
    if (!listing || !(words >> command)) continue;
    const std::string help = test::run_mmdit(command + " --help").output;
    const std::regex integer_option(R"((--[a-z0-9-]+) U?INT\b)");
    for (std::sregex_iterator m(help.begin(), help.end(), integer_option), end; m != end; ++m) {
      const std::string option = (*m)[1];
      // In the test's directory, and stopped after 5 s: read as 16, the option would let demo
      // or bench run in earnest.
      const test::Command refused =
          test::run_mmdit(command + " " + option + " 0x10", "cd " + dir + " && " + stop);
      EXPECT_NE(refused.status, 0) << command << " " << option;
      EXPECT_THAT(
          refused.output,
          HasSubstr(option + ": must be a whole number written in decimal digits, got 0x10"))
          << command;
      ++options;
    }
  }
  EXPECT_GE(options, 40);  // the help's format changed, or the list is not what it was
  fs::remove_all(dir);
}

// sample prints the whole chunk, as README says; the library's printer elides the middle of a
// tensor above 1000 numbers, and sample printed "..." in place of most actions.
TEST(Cli, SamplePrintsEveryAction) {
  const Episodes data = demo_episodes();
  test::TempDir dir;
  const std::string ckpt = fresh_checkpoint(data, dir);  // horizon 4, act_dim 2
  Rng rng(1);
  save_npy(dir.file("obs.npy"), rng.normal({126, 2, 2}, DType::f32, 0, 0.5));  // 1008 actions
  const test::Command r = test::run_mmdit("sample " + ckpt + " --obs-npy " + dir.file("obs.npy"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("shape=(126,4,2))"));
  EXPECT_THAT(r.output, Not(HasSubstr("...")));
  std::string values = r.output.substr(0, r.output.find(", dtype="));
  values = values.substr(values.find('(') + 1);
  for (char& ch : values)
    if (ch == '[' || ch == ']' || ch == ',') ch = ' ';
  std::istringstream numbers(values);
  int count = 0;
  for (std::string token; numbers >> token; ++count)
    EXPECT_TRUE(std::isfinite(std::stod(token))) << token;
  EXPECT_EQ(count, 126 * 4 * 2);
}

// info prints the checkpoint's statistics as --stats reads them, so that a policy exported to
// the reference can be normalised as it was trained.
TEST(Cli, InfoPrintsTheStatisticsAsStatsTakesThem) {
  const Episodes data = demo_episodes();
  test::TempDir dir;
  const std::string ckpt = fresh_checkpoint(data, dir);
  const test::Command r = test::run_mmdit("info " + ckpt);
  ASSERT_EQ(r.status, 0) << r.output;
  const std::string header = "normalisation statistics (the JSON --stats takes):\n";
  const size_t at = r.output.find(header);
  ASSERT_NE(at, std::string::npos) << r.output;
  const size_t begin = at + header.size();
  const std::string json = r.output.substr(begin, r.output.find('\n', begin) - begin);
  const Normalizer printed = Normalizer::from_json(json);
  const Normalizer stored = load_policy(ckpt).normalizer;
  EXPECT_EQ(printed.to_json(), stored.to_json());
  EXPECT_EQ(printed.state_min.to_vector<float>(), stored.state_min.to_vector<float>());
  EXPECT_EQ(printed.action_std.to_vector<float>(), stored.action_std.to_vector<float>());
}

// --weights bf16 packs the flow objective's sampler; a regression policy acted with its float32
// weights whatever it said. It is refused, by the commands and by load_policy.
TEST(Cli, RefusesBf16WeightsForARegressionPolicy) {
  const Episodes data = demo_episodes();
  TrainConfig c = tiny_config(data);
  c.objective = "mse";
  test::TempDir dir;
  const std::string ckpt = dir.file("mse.safetensors");
  Trainer(c, data).save_checkpoint(ckpt);
  for (const std::string command : {"sample", "eval"}) {
    const std::string args =
        command == "sample" ? " --obs 0,-1,0,-0.95" : " --episodes 1 --n-action-steps 1";
    const test::Command r = test::run_mmdit(command + " " + ckpt + args + " --weights bf16");
    EXPECT_NE(r.status, 0);
    EXPECT_THAT(r.output,
                HasSubstr(command +
                          ": --weights bf16 packs the weights of the flow objective's "
                          "sampler; " +
                          ckpt +
                          " holds a policy of objective 'mse', which acts with float32 weights "
                          "(leave --weights out)"));
    EXPECT_EQ(test::run_mmdit(command + " " + ckpt + args + " --weights f32").status, 0);
    const test::Command steps = test::run_mmdit(command + " " + ckpt + args + " --sample-steps 3");
    EXPECT_NE(steps.status, 0);
    EXPECT_THAT(steps.output, HasSubstr(command +
                                        ": --sample-steps sets the flow objective's Euler "
                                        "steps; " +
                                        ckpt + " holds a policy of objective 'mse'"));
  }
  EXPECT_EQ(test::error_of([&] { load_policy(ckpt, true, WeightPrecision::bf16); }),
            ckpt +
                ": the policy's objective is 'mse', which acts with float32 weights; bf16 "
                "weights are for the flow objective's sampler only (load it with f32)");
}

// Two runs started into one new --out both passed the "already holds a checkpoint" check, both
// reported success, and the directory was left with the later run's files over the other's. A
// command writing a run directory holds its lock; another is refused before writing anything.
TEST(Cli, ARunDirectoryIsWrittenByOneCommandAtATime) {
  const Episodes data = demo_episodes();
  test::TempDir dir;
  save_lerobot_npz(dir.file("demos.npz"), data);
  const std::string run = dir.file("run");
  fs::create_directories(run);
  const std::string train = "train --data " + dir.file("demos.npz") + " --out " + run +
                            " --steps 2 --threads 1 --config ";
  write_file_atomically(dir.file("tiny.json"), tiny_config(data).to_json());
  {
    const DirectoryLock other(run);
    const test::Command r = test::run_mmdit(train + dir.file("tiny.json"));
    EXPECT_NE(r.status, 0);
    EXPECT_THAT(r.output, HasSubstr("train: --out " + run +
                                    ": another process holds its lock (another mmdit command is "
                                    "writing a run there): wait for it, or give another --out"));
    EXPECT_TRUE(dir.entries() == std::vector<std::string>({"demos.npz", "run", "tiny.json"}));
    EXPECT_TRUE(fs::is_empty(run));
    EXPECT_THAT(test::run_mmdit("demo --demos 2 --steps 1 --out " + run).output,
                HasSubstr("demo: --out " + run + ": another process holds its lock"));
    EXPECT_THAT(test::error_of([&] { DirectoryLock again(run); }),
                HasSubstr(run + ": another process holds its lock"));
    write_file_atomically(dir.file("stats.json"),
                          R"({"mode": "min_max", "state_min": [0, 0, 0], "state_max": [1, 1, 1],
                              "action_min": [0, 0], "action_max": [1, 1]})");
    const test::Command import =
        test::run_mmdit("import-eqx " + std::string(MMDIT_TEST_DATA) + "/bc_train_step.eqx" +
                        " --stats " + dir.file("stats.json") + " --out " + run);
    EXPECT_THAT(import.output,
                HasSubstr("import-eqx: --out " + run + ": another process holds its lock"));
    EXPECT_TRUE(fs::is_empty(run));
  }
  {
    // demo writes its runs into subdirectories of --out, each locked too.
    fs::create_directories(dir.file("d/flow"));
    const DirectoryLock other(dir.file("d/flow"));
    const test::Command r = test::run_mmdit("demo --demos 2 --steps 1 --out " + dir.file("d"));
    EXPECT_NE(r.status, 0);
    EXPECT_THAT(r.output, HasSubstr("demo: --out " + dir.file("d/flow") +
                                    ": another process holds its lock"));
    EXPECT_TRUE(fs::is_empty(dir.file("d/flow")));
  }
  // A run file that is a symbolic link is refused before the steps, not when the run saves.
  fs::create_directories(dir.file("linked"));
  write_file_atomically(dir.file("kept.csv"), "kept");
  fs::create_symlink(dir.file("kept.csv"), dir.file("linked/metrics.csv"));
  const test::Command linked =
      test::run_mmdit("train --data " + dir.file("demos.npz") + " --out " + dir.file("linked") +
                      " --steps 2 --threads 1 --config " + dir.file("tiny.json"));
  EXPECT_NE(linked.status, 0);
  EXPECT_THAT(linked.output, HasSubstr("train: --out " + dir.file("linked/metrics.csv") +
                                       ": is a symbolic link, which a save would replace"));
  EXPECT_THAT(linked.output, Not(HasSubstr("step ")));
  EXPECT_EQ(fs::directory_iterator(dir.file("linked"))->path().filename(), "metrics.csv");
  EXPECT_EQ(read_file(dir.file("kept.csv")), "kept");
  const test::Command r = test::run_mmdit(train + dir.file("tiny.json"));
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(fs::exists(run + "/checkpoint.safetensors"));
}

// An output that is one of the command's inputs destroyed it: export-eqx --out naming its own
// checkpoint replaced the checkpoint with the .eqx. The same file by any path is refused.
TEST(Cli, RefusesToWriteOverItsOwnInput) {
  const Episodes data = demo_episodes();
  test::TempDir dir;
  save_lerobot_npz(dir.file("demos.npz"), data);
  const std::string ckpt = fresh_checkpoint(data, dir);
  const std::string link = dir.file("link.safetensors");
  fs::create_symlink(ckpt, link);
  const std::string before = read_file(ckpt);
  const auto expect_refused = [&](const std::string& args, const std::string& message) {
    const test::Command r = test::run_mmdit(args);
    EXPECT_NE(r.status, 0) << args;
    EXPECT_THAT(r.output, HasSubstr(message + " (the same file); writing it would destroy that"))
        << args;
  };
  for (const std::string& out : {ckpt, link})
    expect_refused("export-eqx " + ckpt + " --out " + out,
                   "export-eqx: --out " + out + " is the checkpoint " + ckpt);
  expect_refused("sample " + ckpt + " --obs 0,-1,0,-0.95 --out-npy " + link,
                 "sample: --out-npy " + link + " is the checkpoint " + ckpt);
  save_npy(dir.file("obs.npy"), zeros({1, 2, 2}));
  expect_refused(
      "sample " + ckpt + " --obs-npy " + dir.file("obs.npy") + " --out-npy " + dir.file("obs.npy"),
      "sample: --out-npy " + dir.file("obs.npy") + " is the --obs-npy " + dir.file("obs.npy"));
  expect_refused("eval " + ckpt + " --episodes 1 --svg " + ckpt,
                 "eval: --svg " + ckpt + " is the checkpoint " + ckpt);
  // Nor is anything but a regular file replaced (run as root, --out-npy /dev/null replaced the
  // device), refused before sampling.
  const std::string fifo = dir.file("fifo");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0644), 0);
  for (const std::string& args : {"sample " + ckpt + " --obs 0,-1,0,-0.95 --out-npy " + fifo,
                                  "export-eqx " + ckpt + " --out " + fifo}) {
    const test::Command r = test::run_mmdit(args);
    EXPECT_NE(r.status, 0);
    EXPECT_THAT(r.output, HasSubstr(fifo + ": is a FIFO, which a save would replace with a "
                                           "regular file; give the path of a regular file"));
  }
  EXPECT_TRUE(read_file(ckpt) == before);
  // import-eqx writes checkpoint.safetensors and config.json into --out.
  fs::create_directories(dir.file("imp"));
  const std::string eqx = dir.file("imp/checkpoint.safetensors");
  Rng rng(0);
  save_equinox(BCPolicy(tiny_config(data).policy, rng), eqx);
  const std::string eqx_bytes = read_file(eqx);
  expect_refused("import-eqx " + eqx + " --data " + dir.file("demos.npz") + " --overwrite --out " +
                     dir.file("imp"),
                 "import-eqx: --out " + eqx + " is the .eqx file " + eqx);
  EXPECT_TRUE(read_file(eqx) == eqx_bytes);
  // train writes config.json into --out: a --config there is an input it would rewrite.
  const std::string config = dir.file("run/config.json");
  fs::create_directories(dir.file("run"));
  write_file_atomically(config, R"({"steps": 20})");
  expect_refused("train --data " + dir.file("demos.npz") + " --config " + config + " --out " +
                     dir.file("run") + " --steps 5",
                 "train: --out " + config + " is the --config " + config);
  EXPECT_EQ(read_file(config), R"({"steps": 20})");
  // Files that are not the input are written as before.
  EXPECT_EQ(test::run_mmdit("export-eqx " + ckpt + " --out " + dir.file("p.eqx")).status, 0);
}

// What a script relies on: a failure shows in the exit status, and the message names it.
TEST(Cli, ScriptsSeeEveryFailure) {
  const Episodes data = demo_episodes();
  test::TempDir dir;
  save_lerobot_npz(dir.file("demos.npz"), data);
  const std::string ckpt = fresh_checkpoint(data, dir);
  write_file_atomically(dir.file("tiny.json"),
                        R"({"policy": {"horizon": 4, "hidden_size": 16, "depth": 1, "dim_cond": 16,
                            "timestep_embed_dim": 8, "dim_head": 8, "heads": 2, "ff_mult": 2}})");
  // Output lost on a full disk exited 0.
  const std::string err = dir.file("err.txt");
  const int full =
      std::system((std::string(MMDIT_BINARY) + " info " + ckpt + " > /dev/full 2> " + err).c_str());
  EXPECT_TRUE(WIFEXITED(full) && WEXITSTATUS(full) == 1);
  EXPECT_THAT(read_file(err), HasSubstr("error: writing the output failed: No space left"));
  // A command whose own flush failed first: the cause is gone from errno by the end (it named
  // a stale one, "No such file or directory").
  const int full_train =
      std::system((std::string(MMDIT_BINARY) + " train --data " + dir.file("demos.npz") +
                   " --config " + dir.file("tiny.json") + " --steps 2 --log-every 1 --out " +
                   dir.file("full_run") + " > /dev/full 2> " + err)
                      .c_str());
  EXPECT_TRUE(WIFEXITED(full_train) && WEXITSTATUS(full_train) == 1);
  EXPECT_THAT(read_file(err), HasSubstr("error: writing the output failed"));
  EXPECT_THAT(read_file(err), Not(HasSubstr("No such file")));
  // A misspelt command was "A subcommand is required".
  const test::Command typo = test::run_mmdit("trian --data x");
  EXPECT_EQ(typo.status, 1);
  EXPECT_THAT(typo.output, HasSubstr("error: unknown command 'trian' (commands: demo, train, "));
  // An --out that is a file blamed another mmdit command holding its lock, after loading data.
  write_file_atomically(dir.file("a_file"), "x");
  const test::Command file_out = test::run_mmdit("train --data " + dir.file("demos.npz") +
                                                 " --steps 1 --out " + dir.file("a_file"));
  EXPECT_NE(file_out.status, 0);
  EXPECT_THAT(file_out.output,
              HasSubstr("train: --out " + dir.file("a_file") + " is not a directory"));
  EXPECT_THAT(file_out.output, Not(HasSubstr("episodes")));
  // demo --config into its own run directory rewrote the user's config.
  fs::create_directories(dir.file("d/flow"));
  const std::string config = dir.file("d/flow/config.json");
  write_file_atomically(config, R"({"steps": 7})");
  const test::Command demo = test::run_mmdit("demo --demos 2 --eval-episodes 1 --config " + config +
                                             " --out " + dir.file("d"));
  EXPECT_NE(demo.status, 0);
  EXPECT_THAT(demo.output, HasSubstr("demo: --out " + config + " is the --config " + config));
  EXPECT_THAT(demo.output, Not(HasSubstr("generated")));
  EXPECT_EQ(read_file(config), R"({"steps": 7})");
  // A directory given with a trailing slash names its files without a double one.
  const test::Command slash =
      test::run_mmdit("train --data " + dir.file("demos.npz") + " --config " +
                      dir.file("tiny.json") + " --steps 1 --out " + dir.file("run") + "/");
  EXPECT_EQ(slash.status, 0) << slash.output;
  EXPECT_THAT(slash.output, HasSubstr(dir.file("run") + "/checkpoint.safetensors"));
  EXPECT_THAT(slash.output, Not(HasSubstr("//")));
}

// The HDF5 observation keys a run was trained with are recorded in its checkpoint: train --resume
// and eval --data read the data with them (both used "state", silently, however the run was
// trained), an --obs-keys that differs is refused, import-eqx records them too, and a checkpoint
// without the record (an older one) still loads and reads "state".
TEST(Cli, RecordsTheHdf5ObservationKeys) {
  const Episodes data = demo_episodes(4);
  const std::string dir = temp_dir("obs_keys");
  write_tiny_run(dir, 4, R"("horizon": 4)", 4);
  // The EMA is the parameters, trained far enough from adaLN-Zero's start for the actions to
  // depend on the observations.
  std::ofstream(dir + "/config.json")
      << R"({"policy": {"hidden_size": 16, "depth": 1, "dim_cond": 16, "timestep_embed_dim": 8,
                        "dim_head": 8, "heads": 2, "ff_mult": 2, "horizon": 4},
             "batch_size": 4, "lr": 0.01, "ema_decay": 0})";
  // Two groups of one width: the policy trains on "other", and "state" would fit it as well.
  const std::string h5 = dir + "/two.hdf5";
  write_robomimic(h5, data,
                  {{"state", data.states},
                   {"other", raw::add_scalar(raw::mul_scalar(data.states, -3.0), 0.5)}});
  const std::string train = "train --data " + h5 + " --config " + dir + "/config.json ";
  test::Command r = test::run_mmdit(train + "--obs-keys other --steps 10 --out " + dir + "/run");
  ASSERT_EQ(r.status, 0) << r.output;
  const std::vector<std::string> other = {"other"};
  const std::string ckpt = dir + "/run/checkpoint.safetensors";
  EXPECT_EQ(load_policy(ckpt).obs_keys, other);
  EXPECT_EQ(read_checkpoint_info(ckpt).obs_keys, other);
  EXPECT_THAT(test::run_mmdit("info " + ckpt).output, HasSubstr("HDF5 observation keys: other\n"));

  // Copies of the step-10 checkpoint: "a" as written, "b", "d" and "old" without the record,
  // "c" without it and without the data's fingerprint (as checkpoints before either was kept).
  const SafetensorsFile f = load_safetensors(ckpt);
  std::map<std::string, std::string> unrecorded = f.metadata;
  ASSERT_EQ(unrecorded.erase("obs_keys"), 1u);
  std::map<std::string, std::string> older = unrecorded;
  nlohmann::json sampler = nlohmann::json::parse(older.at("sampler"));
  ASSERT_EQ(sampler.erase("fingerprint"), 1u);
  older["sampler"] = sampler.dump();
  for (const char* copy : {"a", "b", "c", "d", "old"}) {
    fs::create_directories(dir + "/" + copy);
    const std::string name = copy;
    save_safetensors(dir + "/" + copy + "/checkpoint.safetensors", f.tensors,
                     name == "a"   ? f.metadata
                     : name == "c" ? older
                                   : unrecorded);
  }
  const auto at = [&](const char* copy) { return dir + "/" + copy + "/checkpoint.safetensors"; };
  EXPECT_TRUE(load_policy(at("old")).obs_keys.empty());
  EXPECT_TRUE(read_checkpoint_info(at("old")).obs_keys.empty());

  // eval --data: the recorded keys are the default; without a record, "state" (whose action
  // error differs, so the test tells the keys apart).
  const std::string eval_args = " --data " + h5 + " --windows 20";
  const test::Command recorded = test::run_mmdit("eval " + ckpt + eval_args);
  ASSERT_EQ(recorded.status, 0) << recorded.output;
  EXPECT_EQ(test::run_mmdit("eval " + at("old") + eval_args + " --obs-keys other").output,
            recorded.output);
  EXPECT_NE(test::run_mmdit("eval " + at("old") + eval_args).output, recorded.output);
  r = test::run_mmdit("eval " + ckpt + eval_args + " --obs-keys state");
  EXPECT_NE(r.status, 0);
  EXPECT_THAT(r.output,
              HasSubstr("eval: --obs-keys state differs from the observation keys " + ckpt +
                        " was trained with (other); leave --obs-keys out to "
                        "use those"));

  // train --resume: the same steps from the recorded keys as from --obs-keys other.
  const std::string resume = "train --data " + h5 + " --resume ";
  ASSERT_EQ(test::run_mmdit(resume + at("a") + " --steps 12").status, 0);
  ASSERT_EQ(test::run_mmdit(resume + at("b") + " --steps 12 --obs-keys other").status, 0);
  ASSERT_EQ(test::run_mmdit(resume + at("c") + " --steps 12").status, 0);
  // Without the record, "state" is read: other data of the same size, which the fingerprint
  // tells apart.
  r = test::run_mmdit(resume + at("d") + " --steps 12");
  EXPECT_NE(r.status, 0);
  EXPECT_THAT(r.output, HasSubstr(at("d") + " was trained on other data of this size"));
  EXPECT_EQ(load_policy(at("d")).step, 10);
  const auto params = [&](const char* copy) {
    std::vector<float> all;
    for (const auto& [name, t] : load_safetensors(at(copy)).tensors)
      if (name.rfind("param/", 0) == 0) {
        const std::vector<float> v = t.to_vector<float>();
        all.insert(all.end(), v.begin(), v.end());
      }
    return all;
  };
  EXPECT_EQ(load_policy(at("a")).step, 12);
  EXPECT_TRUE(params("a") == params("b"));
  EXPECT_FALSE(params("a") == params("c"));  // trained on "state"
  EXPECT_EQ(load_policy(at("a")).obs_keys, other);
  EXPECT_EQ(load_policy(at("b")).obs_keys, other);  // now recorded
  r = test::run_mmdit(resume + at("a") + " --steps 13 --obs-keys state");
  EXPECT_NE(r.status, 0);
  EXPECT_THAT(r.output, HasSubstr("train: --obs-keys state differs from the observation keys " +
                                  at("a") + " was trained with (other)"));
  EXPECT_EQ(load_policy(at("a")).step, 12);

  // import-eqx records the keys its --data was read with.
  Rng rng(0);
  save_equinox(BCPolicy(tiny_config(data).policy, rng), dir + "/p.eqx");
  r = test::run_mmdit("import-eqx " + dir + "/p.eqx --data " + h5 + " --obs-keys other --out " +
                      dir + "/imported");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(load_policy(dir + "/imported/checkpoint.safetensors").obs_keys, other);
  // A run on an .npz records none; a malformed record is refused naming the file.
  ASSERT_EQ(test::run_mmdit("train --data " + dir + "/demos.npz --config " + dir +
                            "/config.json --steps 1 --out " + dir + "/npz")
                .status,
            0);
  EXPECT_TRUE(load_policy(dir + "/npz/checkpoint.safetensors").obs_keys.empty());
  std::map<std::string, std::string> malformed = f.metadata;
  malformed["obs_keys"] = R"(["state", ""])";
  save_safetensors(dir + "/bad.safetensors", f.tensors, malformed);
  EXPECT_EQ(test::error_of([&] { load_policy(dir + "/bad.safetensors"); }),
            dir +
                "/bad.safetensors: the checkpoint metadata's obs_keys must be a JSON array of "
                "observation key names, got '[\"state\", \"\"]'");
  fs::remove_all(dir);
}

// Ctrl-C or SIGTERM during `mmdit train` stops after the current step, saves a checkpoint and
// exits with 128 + the signal's number, as a shell reports a process the signal killed.
class CliStopSignal : public testing::TestWithParam<int> {
 protected:
  // Starts `mmdit train` for 100000 steps and returns once it has printed its first progress
  // line, so that its stop handlers are in place.
  // stderr_too: stderr goes to the same pipe; ignore_hangup: started as nohup starts a program.
  pid_t start_training(const std::string& policy_json = kTinyPolicy, const char* batch = "4",
                       bool stderr_too = false, bool ignore_hangup = false) {
    const Episodes data = demo_episodes(4);
    dir_ = temp_dir("signal" + std::to_string(GetParam()) + "_" +
                    testing::UnitTest::GetInstance()->current_test_info()->name());
    save_lerobot_npz(dir_ + "/demos.npz", data);
    {
      std::ofstream cfg(dir_ + "/config.json");
      cfg << R"({"policy": )" << policy_json << "}";
    }
    int out[2];
    EXPECT_EQ(::pipe(out), 0);
    const pid_t pid = ::fork();
    EXPECT_GE(pid, 0);
    if (pid == 0) {
      ::dup2(out[1], 1);
      if (stderr_too) ::dup2(out[1], 2);
      if (ignore_hangup) std::signal(SIGHUP, SIG_IGN);
      ::close(out[0]);
      ::execl(MMDIT_BINARY, "mmdit", "train", "--data", (dir_ + "/demos.npz").c_str(), "--steps",
              "100000", "--log-every", "1", "--batch-size", batch, "--config",
              (dir_ + "/config.json").c_str(), "--out", (dir_ + "/my run").c_str(),
              static_cast<char*>(nullptr));
      ::_exit(127);
    }
    ::close(out[1]);
    output_ = out[0];
    char buf[256];
    while (seen_.find(" loss ") == std::string::npos) {
      const ssize_t n = ::read(output_, buf, sizeof buf);
      if (n <= 0) break;
      seen_.append(buf, n);
    }
    return pid;
  }
  int wait_for(pid_t pid) {
    char buf[256];
    for (ssize_t n; (n = ::read(output_, buf, sizeof buf)) > 0;) seen_.append(buf, n);
    int status = 0;
    ::waitpid(pid, &status, 0);
    ::close(output_);
    return status;
  }
  void TearDown() override { fs::remove_all(dir_); }

  static constexpr const char* kTinyPolicy =
      R"({"horizon": 4, "hidden_size": 16, "depth": 1, "dim_cond": 16, "timestep_embed_dim": 8,
          "dim_head": 8, "heads": 2, "ff_mult": 2})";

  std::string dir_, seen_;
  int output_ = -1;
};

TEST_P(CliStopSignal, SavesACheckpoint) {
  const int signal = GetParam();
  const pid_t pid = start_training();
  ::kill(pid, signal);
  const int status = wait_for(pid);
  ASSERT_TRUE(WIFEXITED(status)) << seen_;
  EXPECT_EQ(WEXITSTATUS(status), 128 + signal);
  const LoadedPolicy p = load_policy(dir_ + "/my run/checkpoint.safetensors");
  EXPECT_GE(p.step, 1);
  EXPECT_LT(p.step, 100000);
  // The command it suggests works when pasted: the run's directory has a space.
  if (signal != SIGPIPE) {
    EXPECT_THAT(seen_,
                HasSubstr("(continue with --resume '" + dir_ + "/my run/checkpoint.safetensors')"));
  }
}

// A second signal, while the first still waits for the step to end, stops the program at once
// (the signal's default action), as a user pressing Ctrl-C again expects. The policy is big
// enough for a step (or the save after it) to take far longer than the 30 ms between the
// signals; two signals sent together would be merged into one by the kernel.
TEST_P(CliStopSignal, ASecondSignalStopsAtOnce) {
  const int signal = GetParam();
  const pid_t pid = start_training(R"({"horizon": 16, "hidden_size": 256, "depth": 4,
      "dim_cond": 256, "timestep_embed_dim": 64, "dim_head": 32, "heads": 8, "ff_mult": 4})",
                                   "64");
  ::kill(pid, signal);
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  ::kill(pid, signal);
  const int status = wait_for(pid);
  if (signal == SIGPIPE) {
    // Not a user's: a later SIGPIPE comes from the program's own writes to the closed pipe, and
    // the run finishes its save.
    ASSERT_TRUE(WIFEXITED(status)) << seen_;
    EXPECT_EQ(WEXITSTATUS(status), 128 + SIGPIPE);
    return;
  }
  ASSERT_TRUE(WIFSIGNALED(status)) << "exit status " << WEXITSTATUS(status) << "\n" << seen_;
  EXPECT_EQ(WTERMSIG(status), signal);
}

// SIGHUP (an ssh session that closed) and SIGPIPE (the reader of stdout that left) killed the
// run, losing every step since its last checkpoint.
class CliClosedPipe : public CliStopSignal {};

// With stderr on the same pipe (`2>&1 | head -1`), the stop message raised a second SIGPIPE,
// taken for a user's second signal: the run died before writing its loss plot.
TEST_P(CliClosedPipe, StopsAndSaves) {
  for (const bool stderr_too : {false, true}) {
    seen_.clear();
    const pid_t pid = start_training(kTinyPolicy, "4", stderr_too);
    ::close(output_);  // as `mmdit train ... | head -1` does once it has its line
    int status = 0;
    ::waitpid(pid, &status, 0);
    ASSERT_TRUE(WIFEXITED(status)) << seen_;
    EXPECT_EQ(WEXITSTATUS(status), 128 + SIGPIPE);
    EXPECT_GE(load_policy(dir_ + "/my run/checkpoint.safetensors").step, 1);
    EXPECT_TRUE(fs::exists(dir_ + "/my run/loss.svg")) << "stderr_too " << stderr_too;
    fs::remove_all(dir_ + "/my run");
  }
}

INSTANTIATE_TEST_SUITE_P(Pipe, CliClosedPipe, testing::Values(SIGPIPE));

// Under nohup, SIGHUP is ignored when the program starts, and a closed terminal must not stop the
// run (the handler replaced the ignore).
class CliNohup : public CliStopSignal {};

TEST_P(CliNohup, AnIgnoredHangupStaysIgnored) {
  const pid_t pid = start_training(kTinyPolicy, "4", false, /*ignore_hangup=*/true);
  ::kill(pid, SIGHUP);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  ::kill(pid, SIGINT);
  const int status = wait_for(pid);
  ASSERT_TRUE(WIFEXITED(status)) << seen_;
  EXPECT_EQ(WEXITSTATUS(status), 128 + SIGINT) << seen_;
  EXPECT_THAT(seen_, Not(HasSubstr("SIGHUP")));
}

INSTANTIATE_TEST_SUITE_P(Hangup, CliNohup, testing::Values(SIGHUP));

INSTANTIATE_TEST_SUITE_P(Stop, CliStopSignal, testing::Values(SIGINT, SIGTERM, SIGHUP, SIGPIPE),
                         [](const testing::TestParamInfo<int>& info) {
                           return std::string(sigabbrev_np(info.param));
                         });

}  // namespace
}  // namespace mmdit
