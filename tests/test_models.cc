// The intent of the reference's model tests, plus float64 gradient checks of every module.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <functional>

#include "autodiff/gradcheck.h"
#include "autodiff/value_and_grad.h"
#include "mmdit/incontext.h"
#include "mmdit/mmdit.h"
#include "tests/test_util.h"

namespace mmdit {
namespace {

using test::max_abs_diff;

using ::testing::HasSubstr;

double max_abs(const Tensor& a) {
  return max_abs_diff(a, zeros_like(a));
}

using test::randomize;

MMDiTConfig small_mmdit(std::vector<int64_t> dims, std::vector<int64_t> outs) {
  MMDiTConfig c;
  c.depth = 2;
  c.dim_modalities = std::move(dims);
  c.dim_outs = std::move(outs);
  c.dim_cond = 16;
  c.timestep_embed_dims = {8};
  c.dim_head = 4;
  c.heads = 2;
  c.ff_mult = 2;
  return c;
}

InContextMMDiTConfig small_incontext(std::vector<int64_t> dims, std::vector<int64_t> outs) {
  InContextMMDiTConfig c;
  c.depth = 2;
  c.dim_modalities = std::move(dims);
  c.dim_outs = std::move(outs);
  c.dim_head = 4;
  c.heads = 2;
  c.ff_mult = 2;
  return c;
}

// obs rows see everything; action rows see all obs and earlier-or-same actions.
Tensor obs_full_action_causal(int64_t n_obs, int64_t n_act) {
  const int64_t total = n_obs + n_act;
  std::vector<bool> m(total * total, true);
  for (int64_t i = n_obs; i < total; ++i)
    for (int64_t j = n_obs; j < total; ++j) m[i * total + j] = j <= i;
  return from_vector(m, {total, total});
}

// ---------------------------------------------------------------- module plumbing
TEST(Module, ParameterNamesMatchTheReference) {
  Rng rng(0);
  MMDiT model(small_mmdit({16, 8}, {16, 4}), rng);
  const NamedTensors p = model.named_parameters();
  for (const char* name :
       {"timestep_embeds.0.linear1.weight", "timestep_embeds.0.linear2.bias",
        "blocks.0.attn_layernorms.1.to_modulation.weight", "blocks.1.joint_attn.to_qkv.1.weight",
        "blocks.0.joint_attn.q_rmsnorms.0.gamma", "blocks.0.joint_attn.to_out.0.weight",
        "blocks.1.feedforwards.0.linear_gate.weight", "blocks.0.to_cond.bias",
        "final_layers.1.adaLN_modulation.weight", "final_layers.1.linear_out.bias"})
    EXPECT_TRUE(p.contains(name)) << name;
  EXPECT_EQ(p.at("blocks.1.joint_attn.to_qkv.1.weight").shape(), (Shape{24, 8}));
  EXPECT_EQ(p.at("final_layers.1.linear_out.weight").shape(), (Shape{4, 8}));
}

// The count from models.md's tables, module by module, for small_mmdit({16, 8}, {16, 4}).
TEST(Module, ParameterCountFollowsTheSpec) {
  Rng rng(0);
  const MMDiTConfig c = small_mmdit({16, 8}, {16, 4});
  MMDiT model(c, rng);
  auto linear = [](int64_t in, int64_t out, bool bias = true) {
    return in * out + (bias ? out : 0);
  };
  const int64_t C = c.dim_cond, inner = c.heads * c.dim_head, sum_d = 16 + 8;
  int64_t expected = linear(c.timestep_embed_dims[0], C) + linear(C, C);  // TimestepEmbedding
  for (int64_t i = 0; i < c.depth; ++i) {
    for (int64_t D : c.dim_modalities) {
      expected += 2 * linear(C, 2 * D);                                   // two adaLN
      expected += linear(D, 3 * inner, false) + linear(inner, D, false);  // to_qkv, to_out
      expected += 2 * c.dim_head;                                         // q, k RMSNorm
      expected += 2 * linear(D, c.ff_mult * D, false) + linear(c.ff_mult * D, D, false);  // SwiGLU
    }
    expected += linear(C, 2 * sum_d);  // to_cond
  }
  for (size_t m = 0; m < 2; ++m)
    expected += linear(C, 2 * c.dim_modalities[m]) + linear(c.dim_modalities[m], c.dim_outs[m]);
  EXPECT_EQ(expected, 11844);
  EXPECT_EQ(model.num_parameters(), expected);
}

TEST(Module, LinearInitIsUniformInInverseSqrtFanIn) {
  Rng rng(1);
  nn::Linear lin(100, 400, true, rng);
  const double bound = 0.1;
  double lo = 1, hi = -1;
  for (float v : lin.weight.to_vector<float>())
    lo = std::min<double>(lo, v), hi = std::max<double>(hi, v);
  EXPECT_GE(lo, -bound);
  EXPECT_LE(hi, bound);
  EXPECT_LT(lo, -0.95 * bound);  // the whole range is used
  EXPECT_GT(hi, 0.95 * bound);
  double bias_lo = 1, bias_hi = -1;
  for (float v : lin.bias.to_vector<float>())
    bias_lo = std::min<double>(bias_lo, v), bias_hi = std::max<double>(bias_hi, v);
  EXPECT_GE(bias_lo, -bound);
  EXPECT_LE(bias_hi, bound);
  EXPECT_LT(bias_lo, -0.5 * bound);  // drawn from the same range, not zero
  EXPECT_GT(bias_hi, 0.5 * bound);
}

TEST(Module, ToFloat64ConvertsInPlaceAndKeepsValues) {
  Rng rng(2);
  nn::FeedForward ff(8, 2, rng);
  const std::vector<float> before = ff.linear_in.weight.to_vector<float>();
  ff.to(DType::f64);
  EXPECT_EQ(ff.linear_in.weight.dtype(), DType::f64);
  EXPECT_EQ(ff.named_parameters().at("linear_in.weight").dtype(), DType::f64);
  const std::vector<double> after = ff.linear_in.weight.to_vector<double>();
  for (size_t i = 0; i < before.size(); ++i) EXPECT_EQ(after[i], static_cast<double>(before[i]));
}

TEST(Module, LoadIsStrict) {
  Rng rng(3);
  nn::FeedForward ff(8, 2, rng);
  NamedTensors values = ff.named_parameters();
  NamedTensors missing;
  missing.insert("linear_in.weight", values.at("linear_in.weight"));
  EXPECT_THAT([&] { ff.load(missing); },
              testing::ThrowsMessage<Error>(HasSubstr("missing parameter 'linear_gate.weight'")));
  NamedTensors extra = ff.named_parameters();
  extra.insert("linear_in.bias", zeros({16}));
  EXPECT_THAT([&] { ff.load(extra); },
              testing::ThrowsMessage<Error>(HasSubstr("unknown parameter 'linear_in.bias'")));
  NamedTensors wrong;
  for (const auto& [n, t] : values) wrong.insert(n, n == "linear_out.weight" ? zeros({8, 8}) : t);
  EXPECT_THAT([&] { ff.load(wrong); },
              testing::ThrowsMessage<Error>(
                  HasSubstr("'linear_out.weight' has shape (8,8) but the model expects (8,16)")));
}

// ---------------------------------------------------------------- shapes and adaLN-Zero
TEST(MMDiT, OutputShapesForTwoAndThreeModalities) {
  Rng rng(4);
  MMDiT two(small_mmdit({16, 8}, {5, 3}), rng);
  auto out = two({rng.normal({7, 16}), rng.normal({4, 8})}, {scalar(0.5)});
  EXPECT_EQ(out[0].shape(), (Shape{7, 5}));
  EXPECT_EQ(out[1].shape(), (Shape{4, 3}));
  MMDiT three(small_mmdit({16, 8, 12}, {16, 8, 2}), rng);
  auto out3 = three({rng.normal({2, 7, 16}), rng.normal({2, 4, 8}), rng.normal({2, 3, 12})},
                    {from_vector({0.1f, 0.9f}, {2})});
  EXPECT_EQ(out3[2].shape(), (Shape{2, 3, 2}));
  InContextMMDiT ic(small_incontext({16, 8, 12}, {4, 4, 4}), rng);
  auto outic = ic({rng.normal({7, 16}), rng.normal({4, 8}), rng.normal({3, 12})});
  EXPECT_EQ(outic[1].shape(), (Shape{4, 4}));
}

TEST(MMDiT, FreshBlockIsTheIdentity) {
  Rng rng(5);
  MMDiTBlock block({16, 8}, 12, 4, 2, 2, rng);
  const Tensor a = rng.normal({2, 5, 16}), b = rng.normal({2, 3, 8});
  auto out = block({a, b}, rng.normal({2, 12}));
  EXPECT_EQ(max_abs_diff(out[0], a), 0.0);
  EXPECT_EQ(max_abs_diff(out[1], b), 0.0);
}

TEST(MMDiT, FreshFinalLayersOutputZeros) {
  Rng rng(6);
  MMDiT model(small_mmdit({16, 8}, {16, 4}), rng);
  auto out = model({rng.normal({5, 16}), rng.normal({3, 8})}, {scalar(0.3)});
  EXPECT_EQ(max_abs(out[0]), 0.0);
  EXPECT_EQ(max_abs(out[1]), 0.0);
  SimpleFinalLayer simple(16, 4, rng);
  EXPECT_EQ(max_abs(simple(rng.normal({5, 16}))), 0.0);
  InContextMMDiT ic(small_incontext({16, 8}, {16, 4}), rng);
  auto outic = ic({rng.normal({5, 16}), rng.normal({3, 8})});
  EXPECT_EQ(max_abs(outic[1]), 0.0);
}

TEST(MMDiT, ConditioningChangesTheOutput) {
  Rng rng(7);
  MMDiT model(small_mmdit({16, 8}, {16, 4}), rng);
  randomize(model, rng);
  const Tensor a = rng.normal({5, 16}), b = rng.normal({3, 8});
  auto o1 = model({a, b}, {scalar(0.1)});
  auto o2 = model({a, b}, {scalar(0.9)});
  EXPECT_GT(max_abs_diff(o1[1], o2[1]), 1e-3);
}

// Conditioning for another batch, or from a model of other widths, failed in layer_norm_modulate
// with a broadcast error that did not say it was the conditioning.
TEST(MMDiT, ConditioningOfAnotherBatchOrModelIsNamed) {
  Rng rng(7);
  MMDiT model(small_mmdit({16, 8}, {16, 4}), rng);
  MMDiT wider(small_mmdit({16, 12}, {16, 4}), rng);
  const Tensor a = rng.normal({2, 5, 16}), b = rng.normal({2, 3, 8});
  EXPECT_THAT(test::error_of([&] {
                model.forward({a, b}, model.condition({rng.uniform({3})}));
              }),
              HasSubstr("MMDiT::forward: the conditioning of modality 0's final layer has shape "
                        "(3,1,32); expected (1 or 2, 1, 32)"));
  EXPECT_THAT(test::error_of([&] {
                model.forward({a, b}, wider.condition({rng.uniform({2})}));
              }),
              HasSubstr("the conditioning of modality 1's final layer has shape (2,1,24); "
                        "expected (1 or 2, 1, 16)"));
  // One timestep for the whole batch, or one per example, are both right.
  EXPECT_EQ(test::error_of([&] {
              model.forward({a, b}, model.condition({rng.uniform({1})}));
            }),
            "(no mmdit::Error thrown)");
  EXPECT_EQ(test::error_of([&] {
              model.forward({a, b}, model.condition({rng.uniform({2})}));
            }),
            "(no mmdit::Error thrown)");
}

// Too large for memory said only "out of memory allocating N bytes", naming no size (as BCPolicy's
// TooLargeForMemoryNamesTheSizes, in a child process under an address-space limit).
TEST(MMDiTDeathTest, TooLargeForMemoryNamesTheConfig) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "AddressSanitizer's shadow memory does not fit an address-space limit";
#endif
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const auto build = [](bool incontext) {
    Rng rng(0);
    test::limit_address_space(size_t{256} << 20);
    try {
      if (incontext) {
        InContextMMDiTConfig c = small_incontext({16, 8}, {16, 4});
        c.heads = int64_t{1} << 20;
        InContextMMDiT m(c, rng);
      } else {
        MMDiTConfig c = small_mmdit({16, 8}, {16, 4});
        c.heads = int64_t{1} << 20;
        MMDiT m(c, rng);
      }
    } catch (const OutOfMemory& e) {
      std::fprintf(stderr, "%s\n", e.what());
      std::exit(3);
    }
    std::exit(0);
  };
  EXPECT_EXIT(build(false), testing::ExitedWithCode(3),
              "MMDiT with config depth 2, dim_modalities \\(16,8\\), .*heads 1048576.* does not "
              "fit in memory: out of memory allocating ");
  EXPECT_EXIT(build(true), testing::ExitedWithCode(3),
              "InContextMMDiT with config depth .*heads 1048576.* does not fit in memory");
}

TEST(MMDiT, MultipleConditioningVariables) {
  Rng rng(8);
  MMDiTConfig cfg = small_mmdit({16, 8}, {16, 4});
  cfg.timestep_embed_dims = {8, 6};
  MMDiT model(cfg, rng);
  EXPECT_TRUE(model.named_parameters().contains("timestep_embeds.1.linear1.weight"));
  EXPECT_EQ(model.named_parameters().at("timestep_embeds.1.linear1.weight").shape(),
            (Shape{16, 6}));
  randomize(model, rng);
  const Tensor a = rng.normal({5, 16}), b = rng.normal({3, 8});
  auto o1 = model({a, b}, {scalar(0.5), scalar(0.1)});
  auto o2 = model({a, b}, {scalar(0.5), scalar(0.7)});
  auto o3 = model({a, b}, {scalar(0.2), scalar(0.1)});
  EXPECT_GT(max_abs_diff(o1[1], o2[1]), 1e-4);
  EXPECT_GT(max_abs_diff(o1[1], o3[1]), 1e-4);
  // c = sum_c linear2(silu(linear1(timestep_embedding(t_c)))), each written out from the weights.
  const Tensor t0 = from_vector({0.5f, 0.3f}, {2}), t1 = from_vector({0.1f, 0.9f}, {2});
  auto embed = [&](size_t i, const Tensor& t) {
    const nn::TimestepEmbedding& e = model.timestep_embeds[i];
    const Tensor h = nn::linear(nn::timestep_embedding(t, cfg.timestep_embed_dims[i]),
                                e.linear1.weight, e.linear1.bias);
    return nn::linear(silu(h), e.linear2.weight, e.linear2.bias);
  };
  EXPECT_LT(max_abs_diff(model.embed_timesteps({t0, t1}), embed(0, t0) + embed(1, t1)), 1e-6);
}

TEST(MMDiT, BatchedEqualsPerExample) {
  Rng rng(9);
  MMDiT model(small_mmdit({16, 8}, {16, 4}), rng);
  randomize(model, rng);
  const Tensor a = rng.normal({3, 5, 16}), b = rng.normal({3, 4, 8});
  const Tensor t = from_vector({0.1f, 0.5f, 0.8f}, {3});
  const Tensor mask = obs_full_action_causal(5, 4);
  auto batched = model({a, b}, {t}, mask);
  for (int64_t i = 0; i < 3; ++i) {
    auto single =
        model({raw::squeeze(raw::narrow(a, 0, i, 1), 0), raw::squeeze(raw::narrow(b, 0, i, 1), 0)},
              {raw::squeeze(raw::narrow(t, 0, i, 1), 0)}, mask);
    for (int m = 0; m < 2; ++m)
      EXPECT_LT(max_abs_diff(raw::squeeze(raw::narrow(batched[m], 0, i, 1), 0), single[m]), 1e-5);
  }
  // A per-example mask (B, T, T) equal to the shared one gives the same result.
  auto per_example = model({a, b}, {t}, raw::contiguous(raw::broadcast_to(mask, {3, 9, 9})));
  EXPECT_LT(max_abs_diff(per_example[1], batched[1]), 1e-6);
}

// The README's "MMDiT in user code": the reference guide's MMDiT example, smaller. Quoted there
// from here, where it compiles and runs.
TEST(MMDiT, TheReadmesExampleRuns) {
  Rng rng(0);
  const MMDiT model({.depth = 2,                  // required, as in the reference
                     .dim_modalities = {64, 32},  // e.g. image and text tokens
                     .dim_outs = {64, 32},
                     .dim_cond = 128,
                     .timestep_embed_dims = {64},  // one per conditioning variable
                     .dim_head = 16,
                     .heads = 4},
                    rng);
  // One example, as the reference takes it: (S, D) per modality and a () timestep.
  const Tensor image = rng.normal({10, 64}), text = rng.normal({6, 32});
  const std::vector<Tensor> out = model({image, text}, {scalar(0.5)});  // (10, 64), (6, 32)
  // A batch: (B, S, D) tokens and a (B,) timestep. The mask is over all tokens, in modality
  // order, true where a row may attend: here text attends to text only.
  const Tensor images = rng.normal({4, 10, 64}), texts = rng.normal({4, 6, 32});
  const Tensor t = from_vector(std::vector<float>{0.1f, 0.4f, 0.7f, 1.0f}, {4});
  std::vector<bool> allowed(16 * 16, true);
  for (int i = 10; i < 16; ++i)
    for (int j = 0; j < 10; ++j) allowed[i * 16 + j] = false;
  const std::vector<Tensor> outs = model({images, texts}, {t}, from_vector(allowed, {16, 16}));

  EXPECT_EQ(out[0].shape(), (Shape{10, 64}));
  EXPECT_EQ(out[1].shape(), (Shape{6, 32}));
  EXPECT_EQ(outs[0].shape(), (Shape{4, 10, 64}));
  EXPECT_EQ(outs[1].shape(), (Shape{4, 6, 32}));
}

// Reading only some outputs skips the rest of the last block and the final layers for the
// others; what is read is the same, bit for bit.
TEST(MMDiT, ForwardComputesOnlyTheOutputsAskedFor) {
  Rng rng(19);
  MMDiT model(small_mmdit({16, 8}, {16, 4}), rng);
  randomize(model, rng);
  const Tensor a = rng.normal({2, 5, 16}), b = rng.normal({2, 4, 8});
  const MMDiTConditioning cond = model.condition({from_vector({0.2f, 0.7f}, {2})});
  const Tensor mask = obs_full_action_causal(5, 4);
  const auto all = model.forward({a, b}, cond, mask);
  int64_t flops0 = raw::matmul_flops();
  const auto second = model.forward({a, b}, cond, mask, {false, true});
  const int64_t fewer = raw::matmul_flops() - flops0;
  EXPECT_FALSE(second[0].defined());
  EXPECT_EQ(second[1].to_vector<float>(), all[1].to_vector<float>());
  flops0 = raw::matmul_flops();
  model.forward({a, b}, cond, mask);
  EXPECT_LT(fewer, raw::matmul_flops() - flops0);  // the skipped products were not run
  EXPECT_THROW(model.forward({a, b}, cond, mask, {true}), Error);
}

TEST(InContextMMDiT, BatchedEqualsPerExample) {
  Rng rng(10);
  InContextMMDiT model(small_incontext({16, 8}, {16, 4}), rng);
  randomize(model, rng);
  const Tensor a = rng.normal({2, 5, 16}), b = rng.normal({2, 4, 8});
  auto batched = model({a, b});
  for (int64_t i = 0; i < 2; ++i) {
    auto single =
        model({raw::squeeze(raw::narrow(a, 0, i, 1), 0), raw::squeeze(raw::narrow(b, 0, i, 1), 0)});
    for (int m = 0; m < 2; ++m)
      EXPECT_LT(max_abs_diff(raw::squeeze(raw::narrow(batched[m], 0, i, 1), 0), single[m]), 1e-5);
  }
}

// `mmdit inspect` lists each op under the NameScope it ran in: the norm before a feed-forward is
// ff_norms.m's (as MMDiTBlock's is ff_layernorms.m's), and the residual add is the block's own.
TEST(InContextMMDiT, TheFeedForwardNormAndResidualAreNotScopedAsTheFeedForward) {
  Rng rng(12);
  InContextMMDiTBlock block({16, 8}, 4, 2, 2, rng);
  Tape tape;
  for (const auto& [name, p] : block.named_parameters()) tape.watch(p);
  block({rng.normal({5, 16}), rng.normal({3, 8})});
  for (size_t m = 0; m < 2; ++m) {
    const int64_t gamma = tape.slot_of(block.ff_norms[m].gamma);
    int readers = 0;
    for (const Node& node : tape.nodes())
      for (const NodeInput& in : node.inputs)
        if (in.slot == gamma) {
          ++readers;
          EXPECT_EQ(node.scope, str_cat("ff_norms.", m)) << node.op;
        }
    EXPECT_GT(readers, 0) << "ff_norms." << m << ".gamma is read by no op";
  }
  // The last op is modality 1's residual add.
  ASSERT_FALSE(tape.nodes().empty());
  EXPECT_EQ(tape.nodes().back().op, "add");
  EXPECT_EQ(tape.nodes().back().scope, "");
}

// ---------------------------------------------------------------- masks
// In one attention layer under the policy's mask, action i reads only the observations and
// actions 0..i; through a whole model the same holds once observations cannot read actions
// (otherwise later actions reach earlier ones through the observation tokens of the next block).
TEST(Masks, CausalActionsDoNotSeeLaterActions) {
  Rng rng(11);
  nn::JointAttention attn({16, 8}, 4, 2, rng);
  const Tensor obs = rng.normal({5, 16}), act = rng.normal({4, 8});
  Tensor changed = raw::clone(act);
  raw::copy_into(raw::narrow(changed, 0, 3, 1), rng.normal({1, 8}));  // only the last action
  const Tensor mask = obs_full_action_causal(5, 4);
  auto before = attn({obs, act}, mask), after = attn({obs, changed}, mask);
  EXPECT_LT(max_abs_diff(raw::narrow(before[1], 0, 0, 3), raw::narrow(after[1], 0, 0, 3)), 1e-6);
  EXPECT_GT(max_abs_diff(raw::narrow(before[1], 0, 3, 1), raw::narrow(after[1], 0, 3, 1)), 1e-4);
  EXPECT_GT(max_abs_diff(before[0], after[0]), 1e-5);  // observations see every action

  InContextMMDiT model(small_incontext({16, 8}, {16, 4}), rng);
  randomize(model, rng);
  std::vector<bool> m = obs_full_action_causal(5, 4).to_vector<bool>();
  for (int i = 0; i < 5; ++i)
    for (int j = 5; j < 9; ++j) m[i * 9 + j] = false;
  const Tensor strict = from_vector(m, {9, 9});
  auto b2 = model({obs, act}, strict), a2 = model({obs, changed}, strict);
  EXPECT_LT(max_abs_diff(raw::narrow(b2[1], 0, 0, 3), raw::narrow(a2[1], 0, 0, 3)), 1e-6);
  EXPECT_GT(max_abs_diff(raw::narrow(b2[1], 0, 3, 1), raw::narrow(a2[1], 0, 3, 1)), 1e-4);
  EXPECT_LT(max_abs_diff(b2[0], a2[0]), 1e-6);
}

TEST(Masks, BlockedModalityIsInvisible) {
  Rng rng(12);
  MMDiT model(small_mmdit({16, 8}, {16, 4}), rng);
  randomize(model, rng);
  std::vector<bool> m(9 * 9, true);
  for (int i = 0; i < 5; ++i)
    for (int j = 5; j < 9; ++j) m[i * 9 + j] = false;  // obs cannot see actions
  const Tensor mask = from_vector(m, {9, 9});
  const Tensor obs = rng.normal({5, 16});
  auto o1 = model({obs, rng.normal({4, 8})}, {scalar(0.4)}, mask);
  auto o2 = model({obs, rng.normal({4, 8})}, {scalar(0.4)}, mask);
  EXPECT_LT(max_abs_diff(o1[0], o2[0]), 1e-6);
  EXPECT_GT(max_abs_diff(o1[1], o2[1]), 1e-4);
}

// The models' path: a query row with every key masked reads the plain mean of v over all the
// modalities' tokens (v is neither normalised nor rotated), then to_out; in both dtypes, on the
// path that saves probabilities and on the blocked one (from kBlockedAttentionFrom tokens).
TEST(Masks, FullyMaskedRowReadsTheMeanOfV) {
  Rng rng(13);
  nn::JointAttention attn({16, 8}, 4, 2, rng);
  randomize(attn, rng);
  const int64_t inner = 8;
  for (DType dtype : {DType::f32, DType::f64}) {
    attn.to(dtype);
    static_assert(300 + 260 >= kBlockedAttentionFrom);
    for (const auto& [S0, S1] : {std::pair<int64_t, int64_t>{5, 4}, {300, 260}}) {
      const Tensor x0 = rng.normal({S0, 16}, dtype), x1 = rng.normal({S1, 8}, dtype);
      const int64_t total = S0 + S1, row = S0 + 2;  // an action token
      Tensor mask = ones({total, total}, DType::boolean);
      for (int64_t j = 0; j < total; ++j) mask.data<bool>()[row * total + j] = false;
      const auto out = attn({x0, x1}, mask);
      auto values = [&](size_t m, const Tensor& x) {
        return narrow(nn::linear(x, attn.to_qkv[m].weight), -1, 2 * inner, inner);
      };
      const Tensor mean_v = mean(concat({values(0, x0), values(1, x1)}, 0), {0});
      const Tensor expected = nn::linear(mean_v, attn.to_out[1].weight);
      const Tensor got = raw::squeeze(raw::narrow(out[1], 0, 2, 1), 0);
      EXPECT_LT(max_abs_diff(got, expected), dtype == DType::f32 ? 1e-5 : 1e-12)
          << dtype_name(dtype) << ", " << total << " tokens";
    }
  }
}

// The same property of the plain composition the fused attention is tested against.
TEST(Masks, FullyMaskedRowIsUniformNotNaN) {
  Rng rng(13);
  for (DType dtype : {DType::f32, DType::f64}) {
    const Tensor q = rng.normal({1, 1, 3, 4}, dtype), k = rng.normal({1, 1, 3, 4}, dtype),
                 v = rng.normal({1, 1, 3, 4}, dtype);
    std::vector<bool> m(9, true);
    m[0] = m[1] = m[2] = false;  // row 0 attends to nothing
    const Tensor out = nn::attention(q, k, v, from_vector(m, {3, 3}));
    const Tensor mean_v = raw::mean(v, {2});
    EXPECT_LT(max_abs_diff(raw::narrow(out, 2, 0, 1), raw::unsqueeze(mean_v, 2)), 1e-6);
  }
}

// ---------------------------------------------------------------- gradients
TEST(MMDiT, GradientsReachEveryParameter) {
  Rng rng(14);
  MMDiT model(small_mmdit({16, 8}, {16, 4}), rng);
  randomize(model, rng);
  const Tensor a = rng.normal({2, 5, 16}), b = rng.normal({2, 3, 8}),
               t = from_vector({0.2f, 0.7f}, {2});
  auto loss_fn = [&](MMDiT& m) {
    auto out = m({a, b}, {t});
    return sum(square(out[0])) + sum(square(out[1]));
  };
  auto [loss, grads] = value_and_grad(loss_fn)(model);
  EXPECT_EQ(grads.size(), model.named_parameters().size());
  for (const auto& [name, g] : grads) EXPECT_GT(max_abs(g), 0.0) << name;
}

TEST(InContextMMDiT, GradientsReachEveryParameter) {
  Rng rng(15);
  InContextMMDiT model(small_incontext({16, 8}, {16, 4}), rng);
  randomize(model, rng);
  const Tensor a = rng.normal({2, 5, 16}), b = rng.normal({2, 3, 8});
  auto [loss, grads] = value_and_grad([&](InContextMMDiT& m) {
    auto out = m({a, b}, obs_full_action_causal(5, 3));
    return sum(square(out[0])) + sum(square(out[1]));
  })(model);
  EXPECT_EQ(grads.size(), model.named_parameters().size());
  for (const auto& [name, g] : grads) EXPECT_GT(max_abs(g), 0.0) << name;
}

// A modality of no tokens, or a batch of none, as InContextMMDiT and the reference take them:
// empty outputs and gradients, not an error from a fused op inside. With modality 1 empty,
// modality 0 attends to itself alone, as it does with modality 1's tokens masked from its rows:
// both runs give modality 0 the same output, and the parameters the same gradients from it.
TEST(MMDiT, AModalityOfNoTokensAndABatchOfNone) {
  Rng rng(31);
  MMDiT model(small_mmdit({16, 8}, {16, 4}), rng);
  randomize(model, rng);
  model.to(DType::f64);
  const Tensor a = rng.normal({2, 5, 16}, DType::f64), b = rng.normal({2, 3, 8}, DType::f64);
  const Tensor t = from_vector({0.2, 0.7}, {2}, DType::f64);
  std::vector<bool> blocked(8 * 8, true);  // modality 0's rows do not see modality 1's columns
  for (int64_t i = 0; i < 5; ++i)
    for (int64_t j = 5; j < 8; ++j) blocked[i * 8 + j] = false;
  const Tensor mask = from_vector(blocked, {8, 8});
  const Tensor none = zeros({2, 0, 8}, DType::f64);

  const auto empty = model({a, none}, {t});
  EXPECT_EQ(empty[1].shape(), (Shape{2, 0, 4}));
  EXPECT_LT(max_abs_diff(empty[0], model({a, b}, {t}, mask)[0]), 1e-12);

  auto grads_of_output_0 = [&](const Tensor& tokens, const Tensor& m) {
    return value_and_grad([&](MMDiT& mm) {
             return sum(square(mm({a, tokens}, {t}, m)[0]));
           })(model)
        .grads;
  };
  const NamedTensors with_none = grads_of_output_0(none, Tensor());
  const NamedTensors masked = grads_of_output_0(b, mask);
  ASSERT_EQ(with_none.size(), model.named_parameters().size());
  for (const auto& [name, g] : with_none)
    EXPECT_LT(max_abs_diff(g, masked.at(name)), 1e-10) << name;
  EXPECT_GT(max_abs(with_none.at("final_layers.0.linear_out.weight")), 0.0);

  // A batch of none: empty outputs, and every gradient zero.
  const Tensor a0 = zeros({0, 5, 16}, DType::f64), b0 = zeros({0, 3, 8}, DType::f64);
  const Tensor t0 = zeros({0}, DType::f64);
  const auto outs = model({a0, b0}, {t0}, mask);
  EXPECT_EQ(outs[0].shape(), (Shape{0, 5, 16}));
  EXPECT_EQ(outs[1].shape(), (Shape{0, 3, 4}));
  const auto [loss, grads] = value_and_grad([&](MMDiT& mm) {
    const auto o = mm({a0, b0}, {t0}, mask);
    return sum(square(o[0])) + sum(square(o[1]));
  })(model);
  EXPECT_EQ(loss.item(), 0.0);
  ASSERT_EQ(grads.size(), model.named_parameters().size());
  for (const auto& [name, g] : grads) {
    EXPECT_EQ(g.shape(), model.named_parameters().at(name).shape()) << name;
    EXPECT_EQ(max_abs(g), 0.0) << name;
  }
}

// ---------------------------------------------------------------- errors
TEST(Errors, WrongModalityCount) {
  Rng rng(16);
  MMDiT model(small_mmdit({16, 8}, {16, 4}), rng);
  EXPECT_THAT(
      [&] {
        model({rng.normal({5, 16})}, {scalar(0.5)});
      },
      testing::ThrowsMessage<Error>(HasSubstr("expected 2 modalities, got 1")));
}

TEST(Errors, WrongFeatureDim) {
  Rng rng(17);
  InContextMMDiT model(small_incontext({16, 8}, {16, 4}), rng);
  EXPECT_THAT(
      [&] {
        model({rng.normal({5, 16}), rng.normal({3, 9})});
      },
      testing::ThrowsMessage<Error>(
          HasSubstr("modality 1 has feature dim 9 (shape (3,9)), expected 8")));
}

TEST(Errors, WrongMaskShape) {
  Rng rng(18);
  MMDiT model(small_mmdit({16, 8}, {16, 4}), rng);
  EXPECT_THAT(
      [&] {
        model({rng.normal({5, 16}), rng.normal({3, 8})}, {scalar(0.5)},
              ones({7, 7}, DType::boolean));
      },
      testing::ThrowsMessage<Error>(HasSubstr("mask has shape (7,7); expected (8,8)")));
  EXPECT_THAT(
      [&] {
        model({rng.normal({5, 16}), rng.normal({3, 8})}, {scalar(0.5)}, ones({8, 8}));
      },
      testing::ThrowsMessage<Error>(HasSubstr("mask must be bool")));
}

TEST(Errors, WrongNumberOfTimesteps) {
  Rng rng(19);
  MMDiT model(small_mmdit({16, 8}, {16, 4}), rng);
  EXPECT_THAT(
      [&] {
        model({rng.normal({5, 16}), rng.normal({3, 8})}, {scalar(0.5), scalar(0.1)});
      },
      testing::ThrowsMessage<Error>(
          HasSubstr("expected 1 timestep(s), one per conditioning variable, got 2")));
  EXPECT_THAT(
      [&] {
        model({rng.normal({2, 5, 16}), rng.normal({2, 3, 8})},
              {from_vector({0.1f, 0.2f, 0.3f}, {3})});
      },
      testing::ThrowsMessage<Error>(
          HasSubstr("timestep 0 has shape (3,); expected () or (2,) for a batch of 2")));
  // None at all is a wrong count too, not an error about timestep 0's shape.
  EXPECT_EQ(test::error_of([&] {
              model({rng.normal({5, 16}), rng.normal({3, 8})}, {});
            }),
            "MMDiT: expected 1 timestep(s), one per conditioning variable, got 0");
  EXPECT_EQ(test::error_of([&] { model.condition({}); }),
            "MMDiT: expected 1 timestep(s), one per conditioning variable, got 0");
}

// A conditioning built for one model, given to another: an error, not a read past a vector.
TEST(Errors, ConditioningOfAnotherModel) {
  Rng rng(22);
  MMDiT two(small_mmdit({16, 8}, {16, 4}), rng), three(small_mmdit({16, 8, 4}, {16, 4, 4}), rng);
  const Tensor t = from_vector({0.3f}, {1});
  const std::vector<Tensor> xs = {rng.normal({1, 5, 16}), rng.normal({1, 3, 8}),
                                  rng.normal({1, 2, 4})};
  EXPECT_THAT([&] { three.forward(xs, two.condition({t})); },
              testing::ThrowsMessage<Error>(HasSubstr(
                  "conditioning for 2 blocks and 2 final layers, the model has 2 and 3")));
  MMDiTConditioning mixed = three.condition({t});
  mixed.blocks = two.condition({t}).blocks;
  EXPECT_THAT([&] { three.forward(xs, mixed); },
              testing::ThrowsMessage<Error>(HasSubstr(
                  "MMDiTBlock: conditioning for 2, 2, 2 and 2 modalities (attn_layernorms, "
                  "ff_layernorms, attn_gates, ff_gates), the block has 3")));
  EXPECT_THAT([&] { three.blocks[0].forward(xs, mixed.blocks[0]); },
              testing::ThrowsMessage<Error>(HasSubstr("the block has 3")));
}

// Tokens, timesteps or conditioning of a dtype the model is not: named by the model and the
// argument, not by the inner op that first meets them ("mul: expected a float32 or float64
// tensor, got bool of shape (3,1)", a layer_norm_modulate dtype error).
TEST(Errors, DtypesOtherThanTheModelsAreNamed) {
  Rng rng(24);
  MMDiT model(small_mmdit({16, 8}, {16, 4}), rng);
  const Tensor a = rng.normal({3, 5, 16}), b = rng.normal({3, 4, 8});
  const Tensor t = from_vector({0.1f, 0.5f, 0.8f}, {3});
  const auto throws = [](const std::string& message) {
    return testing::ThrowsMessage<Error>(HasSubstr(message));
  };
  EXPECT_THAT(
      [&] {
        model({a, b}, {ones({3}, DType::boolean)});
      },
      throws("MMDiT: timestep 0 is bool, the model is float32"));
  EXPECT_THAT(
      [&] {
        model({a, b}, {raw::to_dtype(t, DType::f64)});
      },
      throws("MMDiT: timestep 0 is float64, the model is float32"));
  EXPECT_THAT(
      [&] {
        model({raw::to_dtype(a, DType::f64), raw::to_dtype(b, DType::f64)}, {t});
      },
      throws("MMDiT: modality 0 is float64, the model is float32"));
  EXPECT_THAT([&] { model.condition({ones({3}, DType::boolean)}); },
              throws("MMDiT: timestep 0 is bool, the model is float32"));
  EXPECT_THAT([&] { model.embed_timesteps({raw::to_dtype(t, DType::f64)}); },
              throws("MMDiT: timestep 0 is float64, the model is float32"));
  EXPECT_THAT(
      [&] {
        model.forward({raw::to_dtype(a, DType::f64), raw::to_dtype(b, DType::f64)},
                      model.condition({t}));
      },
      throws("MMDiT: modality 0 is float64, the model is float32"));
  // The model in float64 and float32 tokens or timesteps.
  model.to(DType::f64);
  EXPECT_THAT(
      [&] {
        model({raw::to_dtype(a, DType::f64), raw::to_dtype(b, DType::f64)}, {t});
      },
      throws("MMDiT: timestep 0 is float32, the model is float64"));
  EXPECT_THAT(
      [&] {
        model({a, b}, {raw::to_dtype(t, DType::f64)});
      },
      throws("MMDiT: modality 0 is float32, the model is float64"));

  MMDiTBlock block({16, 8}, 16, 4, 2, 2, rng);
  EXPECT_THAT(
      [&] {
        block({a, b}, rng.normal({3, 16}, DType::f64));
      },
      throws("MMDiTBlock: the conditioning is float64, the model is float32"));
  EXPECT_THAT(
      [&] {
        block({a, b}, ones({3, 16}, DType::boolean));
      },
      throws("MMDiTBlock: the conditioning is bool, the model is float32"));
  EXPECT_THAT(
      [&] {
        block({raw::to_dtype(a, DType::f64), raw::to_dtype(b, DType::f64)}, rng.normal({3, 16}));
      },
      throws("MMDiTBlock: modality 0 is float64, the model is float32"));

  InContextMMDiT incontext(small_incontext({16, 8}, {16, 4}), rng);
  EXPECT_THAT(
      [&] {
        incontext({raw::to_dtype(a, DType::f64), raw::to_dtype(b, DType::f64)});
      },
      throws("InContextMMDiT: modality 0 is float64, the model is float32"));
}

// embed_timesteps with a 0-d timestep 0 built its message from timesteps[0].shape()[0], a read
// past the end of an empty Shape.
TEST(Errors, EmbedTimestepsOfAScalar) {
  Rng rng(25);
  MMDiTConfig c = small_mmdit({16, 8}, {16, 4});
  c.timestep_embed_dims = {8, 4};
  MMDiT model(c, rng);
  EXPECT_EQ(test::error_of([&] {
              model.embed_timesteps({scalar(0.5), ones({2})});
            }),
            "MMDiT: timestep 0 has shape (); expected (B,)");
  EXPECT_EQ(test::error_of([&] {
              model.embed_timesteps({ones({2}), scalar(0.5)});
            }),
            "MMDiT: timestep 1 has shape (); expected (2,) like timestep 0");
}

// Each field out of range is named before anything is built.
TEST(Errors, ModelConfigFieldsAreNamed) {
  Rng rng(23);
  const std::vector<std::pair<std::function<void(MMDiTConfig&)>, std::string>> mmdit_cases = {
      {[](MMDiTConfig& c) { c.depth = -3; },
       "MMDiT config: depth (the number of blocks) must be set, and positive; got -3"},
      {[](MMDiTConfig& c) { c.dim_head = 5; }, "MMDiT config: dim_head must be even (RoPE), got 5"},
      {[](MMDiTConfig& c) { c.heads = 0; }, "MMDiT config: heads must be positive, got 0"},
      {[](MMDiTConfig& c) {
         c.timestep_embed_dims = {8, 0};
       },
       "MMDiT config: timestep_embed_dims[1] must be positive, got 0"},
      {[](MMDiTConfig& c) { c.dim_modalities = {16}, c.dim_outs = {16}; },
       "MMDiT config: dim_modalities needs at least two modalities, got 1"},
      {[](MMDiTConfig& c) {
         c.dim_outs = {16, -4};
       },
       "MMDiT config: dim_outs[1] must be positive, got -4"},
      {[](MMDiTConfig& c) { c.dim_cond = 0; }, "MMDiT config: dim_cond must be positive, got 0"},
      {[](MMDiTConfig& c) { c.ff_mult = 0; }, "MMDiT config: ff_mult must be positive, got 0"}};
  // The reference has no default depth; a forgotten one must not build a one-block model.
  EXPECT_THAT(
      [&] {
        MMDiT({.dim_modalities = {16, 8}, .dim_outs = {16, 4}}, rng);
      },
      testing::ThrowsMessage<Error>(HasSubstr(
          "MMDiT config: depth (the number of blocks) must be set, and positive; got 0")));
  EXPECT_THAT(
      [&] {
        InContextMMDiT({.dim_modalities = {16, 8}, .dim_outs = {16, 4}}, rng);
      },
      testing::ThrowsMessage<Error>(HasSubstr(
          "InContextMMDiT config: depth (the number of blocks) must be set, and positive; got 0")));
  for (const auto& [change, message] : mmdit_cases) {
    MMDiTConfig c = small_mmdit({16, 8}, {16, 4});
    change(c);
    EXPECT_THAT([&] { MMDiT(c, rng); }, testing::ThrowsMessage<Error>(HasSubstr(message)));
  }
  const std::vector<std::pair<std::function<void(InContextMMDiTConfig&)>, std::string>>
      incontext_cases = {{[](InContextMMDiTConfig& c) { c.depth = -1; },
                          "InContextMMDiT config: depth (the number of blocks) must be set, and "
                          "positive; got -1"},
                         {[](InContextMMDiTConfig& c) { c.dim_head = 3; },
                          "InContextMMDiT config: dim_head must be even (RoPE), got 3"},
                         {[](InContextMMDiTConfig& c) {
                            c.dim_modalities = {16, 0};
                          },
                          "InContextMMDiT config: dim_modalities[1] must be positive, got 0"}};
  for (const auto& [change, message] : incontext_cases) {
    InContextMMDiTConfig c = small_incontext({16, 8}, {16, 4});
    change(c);
    EXPECT_THAT([&] { InContextMMDiT(c, rng); }, testing::ThrowsMessage<Error>(HasSubstr(message)));
  }
  EXPECT_THAT(
      [&] {
        nn::JointAttention({16, 8}, 4, -2, rng);
      },
      testing::ThrowsMessage<Error>(HasSubstr("JointAttention: heads must be positive")));
  EXPECT_THAT(
      [&] { nn::check_modalities({rng.normal({8})}, {8}, "MMDiT"); },
      testing::ThrowsMessage<Error>(HasSubstr("modality 0 has shape (8,); expected (S, D) or")));
  EXPECT_THAT(
      [&] {
        nn::JointAttention({4, 6}, 2, 2, rng)({rng.normal({3, 4}), Tensor()});
      },
      testing::ThrowsMessage<Error>(HasSubstr("JointAttention: modality 1 is an undefined")));
}

// Each layer names itself and the argument at fault, not the inner Linear or tensor it builds.
TEST(Errors, LayerSizesAreNamed) {
  Rng rng(0);
  const std::pair<std::function<void()>, std::string> cases[] = {
      {[&] { nn::RMSNorm(-1); }, "RMSNorm: dim must be positive, got -1"},
      {[&] { nn::RMSNorm(0); }, "RMSNorm: dim must be positive, got 0"},
      {[&] { nn::MultiHeadRMSNorm(-3); }, "MultiHeadRMSNorm: dim_head must be positive, got -3"},
      {[&] { nn::AdaptiveLayerNorm(0, 4, rng); }, "AdaptiveLayerNorm: dim must be positive, got 0"},
      {[&] { nn::AdaptiveLayerNorm(4, -2, rng); },
       "AdaptiveLayerNorm: dim_cond must be positive, got -2"},
      {[&] { nn::FeedForward(4, -1, rng); }, "FeedForward: mult must be positive, got -1"},
      {[&] { nn::FeedForward(0, 4, rng); }, "FeedForward: dim must be positive, got 0"},
      {[&] { nn::TimestepEmbedding(0, 4, rng); },
       "TimestepEmbedding: dim_embed must be positive, got 0"},
      {[&] { nn::TimestepEmbedding(4, 0, rng); },
       "TimestepEmbedding: dim_out must be positive, got 0"},
      // These reported their inner Linear: "Linear: sizes must be positive, got in=0 out=32".
      {[&] { ModulatedFinalLayer(16, 6, 0, rng); },
       "ModulatedFinalLayer: dim_cond must be positive, got 0"},
      {[&] { ModulatedFinalLayer(-1, 6, 4, rng); },
       "ModulatedFinalLayer: dim_in must be positive, got -1"},
      {[&] { ModulatedFinalLayer(16, 0, 4, rng); },
       "ModulatedFinalLayer: dim_out must be positive, got 0"},
      {[&] { SimpleFinalLayer(16, 0, rng); }, "SimpleFinalLayer: dim_out must be positive, got 0"},
      {[&] { SimpleFinalLayer(0, 4, rng); }, "SimpleFinalLayer: dim_in must be positive, got 0"},
      {[&] {
         MMDiTBlock({16, 12}, 0, 8, 2, 2, rng);
       },
       "MMDiTBlock: dim_cond must be positive, got 0"},
      {[&] {
         MMDiTBlock({16, 0}, 16, 8, 2, 2, rng);
       },
       "MMDiTBlock: dim_modalities[1] must be positive, got 0"},
      {[&] {
         MMDiTBlock({16, 12}, 16, 8, 2, 0, rng);
       },
       "MMDiTBlock: ff_mult must be positive, got 0"},
      // This reported its inner FeedForward: "FeedForward: mult must be positive, got 0".
      {[&] {
         InContextMMDiTBlock({16, 12}, 8, 2, 0, rng);
       },
       "InContextMMDiTBlock: ff_mult must be positive, got 0"},
      {[&] {
         InContextMMDiTBlock({16, -3}, 8, 2, 2, rng);
       },
       "InContextMMDiTBlock: dim_modalities[1] must be positive, got -3"},
      {[&] { InContextMMDiTBlock({}, 8, 2, 2, rng); },
       "InContextMMDiTBlock: dim_modalities is empty"},
  };
  for (const auto& [make, message] : cases)
    EXPECT_THAT(make, testing::ThrowsMessage<Error>(HasSubstr(message)));
}

// ---------------------------------------------------------------- RoPE and timestep embedding
// nn::apply_rope is the plain composition; the models' fused rotation is held to it in
// test_fused.cc, with these tables.
TEST(Rope, IdentityAtPositionZeroAndNormPreserving) {
  Rng rng(20);
  const Tensor x = rng.normal({6, 8}, DType::f64);
  const nn::RopeTables t = nn::rope_tables(6, 8, DType::f64);
  const Tensor y = nn::apply_rope(x, t.cos, t.sin);
  EXPECT_LT(max_abs_diff(raw::narrow(y, 0, 0, 1), raw::narrow(x, 0, 0, 1)), 1e-15);
  const Tensor nx = raw::sum(raw::unary(raw::UnaryOp::square, x), {-1});
  const Tensor ny = raw::sum(raw::unary(raw::UnaryOp::square, y), {-1});
  EXPECT_LT(max_abs_diff(nx, ny), 1e-12);
}

TEST(Rope, ScoresDependOnlyOnRelativePosition) {
  Rng rng(21);
  const Tensor q = rng.normal({1, 8}, DType::f64), k = rng.normal({1, 8}, DType::f64);
  const nn::RopeTables t = nn::rope_tables(12, 8, DType::f64);
  auto score = [&](int64_t pq, int64_t pk) {
    const Tensor rq = nn::apply_rope(q, raw::narrow(t.cos, 0, pq, 1), raw::narrow(t.sin, 0, pq, 1));
    const Tensor rk = nn::apply_rope(k, raw::narrow(t.cos, 0, pk, 1), raw::narrow(t.sin, 0, pk, 1));
    return raw::sum(raw::mul(rq, rk)).item();
  };
  EXPECT_NEAR(score(3, 1), score(7, 5), 1e-12);
  EXPECT_NEAR(score(0, 4), score(6, 10), 1e-12);
  EXPECT_GT(std::abs(score(3, 1) - score(3, 2)), 1e-6);
}

// models.md: angle(p, j) = p / 10000^(2j / d) for j < d/2, the same in both halves; the
// properties above hold for any frequencies, so the tables are checked entry by entry too.
TEST(Rope, TablesAreTheClosedForm) {
  const int64_t seq = 5, d = 8;
  const nn::RopeTables t = nn::rope_tables(seq, d, DType::f64);
  const std::vector<double> c = t.cos.to_vector<double>(), s = t.sin.to_vector<double>();
  for (int64_t p = 0; p < seq; ++p)
    for (int64_t j = 0; j < d; ++j) {
      const double angle = static_cast<double>(p) / std::pow(10000.0, 2.0 * (j % (d / 2)) / d);
      EXPECT_NEAR(c[p * d + j], std::cos(angle), 1e-15) << p << "," << j;
      EXPECT_NEAR(s[p * d + j], std::sin(angle), 1e-15) << p << "," << j;
    }
}

// The spec's plain compositions that the fused ops are held to have gradients of their own.
TEST(Gradcheck, PlainRopeAndAttention) {
  Rng rng(22);
  const Tensor cos = rng.normal({3, 4}, DType::f64), sin = rng.normal({3, 4}, DType::f64);
  const GradcheckResult rope =
      gradcheck([&](const std::vector<Tensor>& in) { return nn::apply_rope(in[0], cos, sin); },
                {rng.normal({2, 3, 4}, DType::f64)});
  EXPECT_TRUE(rope.ok) << rope.report();
  EXPECT_EQ(rope.checked, 24);
  Tensor mask = ones({3, 3}, DType::boolean);
  mask.data<bool>()[1] = mask.data<bool>()[2] = false;  // query 0 attends only to key 0
  const GradcheckResult attention = gradcheck(
      [&](const std::vector<Tensor>& in) { return nn::attention(in[0], in[1], in[2], mask); },
      {rng.normal({1, 2, 3, 4}, DType::f64), rng.normal({1, 2, 3, 4}, DType::f64),
       rng.normal({1, 2, 3, 4}, DType::f64)});
  EXPECT_TRUE(attention.ok) << attention.report();
  EXPECT_EQ(attention.checked, 72);
}

TEST(TimestepEmbedding, CosThenSinLayoutOddDimsAndBounds) {
  const Tensor t = scalar(0.7, DType::f64);
  const Tensor e = nn::timestep_embedding(t, 9, 10000);
  ASSERT_EQ(e.shape(), (Shape{9}));
  const auto v = e.to_vector<double>();
  for (int j = 0; j < 4; ++j) {
    const double f = std::exp(-std::log(10000.0) * j / 4);
    EXPECT_NEAR(v[j], std::cos(0.7 * f), 1e-15);
    EXPECT_NEAR(v[4 + j], std::sin(0.7 * f), 1e-15);
  }
  EXPECT_EQ(v[8], 0.0);
  const Tensor batch =
      nn::timestep_embedding(from_vector(std::vector<double>{0, 1, 100, 1e4}, {4}), 16);
  EXPECT_EQ(batch.shape(), (Shape{4, 16}));
  for (double x : batch.to_vector<double>()) EXPECT_LE(std::abs(x), 1.0);
}

// ---------------------------------------------------------------- float64 gradchecks
// Every trainable parameter (given random values first) and every float input.
template <class M, class F>
void gradcheck_module(M& module, NamedTensors inputs, F forward) {
  Rng rng(99);
  module.to(DType::f64);
  randomize(module, rng);
  NamedTensors wrt = module.named_parameters();
  for (const auto& [name, t] : inputs) wrt.insert("input:" + name, t);
  const GradcheckResult r = gradcheck([&] { return forward(module, inputs); }, wrt);
  EXPECT_TRUE(r.ok) << r.report();
}

TEST(Gradcheck, Layers) {
  Rng rng(30);
  auto f64 = [&](Shape s) { return rng.normal(s, DType::f64); };
  {
    nn::Linear m(5, 3, true, rng);
    NamedTensors in;
    in.insert("x", f64({2, 4, 5}));
    gradcheck_module(m, in, [](auto& mod, const NamedTensors& i) { return mod(i.at("x")); });
  }
  {
    nn::RMSNorm m(6);
    NamedTensors in;
    in.insert("x", f64({3, 6}));
    gradcheck_module(m, in, [](auto& mod, const NamedTensors& i) { return mod(i.at("x")); });
  }
  {
    nn::MultiHeadRMSNorm m(4);
    NamedTensors in;
    in.insert("x", f64({2, 3, 4}));
    gradcheck_module(m, in, [](auto& mod, const NamedTensors& i) { return mod(i.at("x")); });
  }
  {
    nn::TimestepEmbedding m(7, 6, rng);
    NamedTensors in;
    in.insert("t", from_vector(std::vector<double>{0.3, 0.8}, {2}));
    gradcheck_module(m, in, [](auto& mod, const NamedTensors& i) { return mod(i.at("t")); });
  }
  {
    nn::AdaptiveLayerNorm m(6, 5, rng);
    NamedTensors in;
    in.insert("x", f64({2, 3, 6}));
    in.insert("cond", f64({2, 5}));
    gradcheck_module(m, in,
                     [](auto& mod, const NamedTensors& i) { return mod(i.at("x"), i.at("cond")); });
  }
  {
    nn::FeedForward m(6, 2, rng);
    NamedTensors in;
    in.insert("x", f64({3, 6}));
    gradcheck_module(m, in, [](auto& mod, const NamedTensors& i) { return mod(i.at("x")); });
  }
}

TEST(Gradcheck, JointAttentionWithMask) {
  Rng rng(31);
  nn::JointAttention m({6, 4}, 4, 2, rng);
  NamedTensors in;
  in.insert("0", rng.normal({2, 3, 6}, DType::f64));
  in.insert("1", rng.normal({2, 2, 4}, DType::f64));
  const Tensor mask = obs_full_action_causal(3, 2);
  gradcheck_module(m, in, [&](auto& mod, const NamedTensors& i) {
    auto out = mod({i.at("0"), i.at("1")}, mask);
    return concat({reshape(out[0], {-1}), reshape(out[1], {-1})}, 0);
  });
}

TEST(Gradcheck, FinalLayers) {
  Rng rng(32);
  {
    ModulatedFinalLayer m(6, 3, 5, rng);
    NamedTensors in;
    in.insert("x", rng.normal({2, 3, 6}, DType::f64));
    in.insert("c", rng.normal({2, 5}, DType::f64));
    gradcheck_module(m, in,
                     [](auto& mod, const NamedTensors& i) { return mod(i.at("x"), i.at("c")); });
  }
  {
    SimpleFinalLayer m(6, 3, rng);
    NamedTensors in;
    in.insert("x", rng.normal({3, 6}, DType::f64));
    gradcheck_module(m, in, [](auto& mod, const NamedTensors& i) { return mod(i.at("x")); });
  }
}

TEST(Gradcheck, MMDiTBlockAndModel) {
  Rng rng(33);
  {
    MMDiTBlock m({6, 4}, 5, 4, 2, 2, rng);
    NamedTensors in;
    in.insert("0", rng.normal({2, 3, 6}, DType::f64));
    in.insert("1", rng.normal({2, 2, 4}, DType::f64));
    in.insert("c", rng.normal({2, 5}, DType::f64));
    gradcheck_module(m, in, [](auto& mod, const NamedTensors& i) {
      auto out = mod({i.at("0"), i.at("1")}, i.at("c"));
      return concat({reshape(out[0], {-1}), reshape(out[1], {-1})}, 0);
    });
  }
  {
    MMDiTConfig cfg = small_mmdit({6, 4}, {3, 2});
    cfg.dim_cond = 6;
    MMDiT m(cfg, rng);
    NamedTensors in;
    in.insert("0", rng.normal({2, 3, 6}, DType::f64));
    in.insert("1", rng.normal({2, 2, 4}, DType::f64));
    in.insert("t", from_vector(std::vector<double>{0.25, 0.6}, {2}));
    gradcheck_module(m, in, [](auto& mod, const NamedTensors& i) {
      auto out = mod({i.at("0"), i.at("1")}, {i.at("t")}, obs_full_action_causal(3, 2));
      return concat({reshape(out[0], {-1}), reshape(out[1], {-1})}, 0);
    });
  }
}

TEST(Gradcheck, InContextBlockAndModel) {
  Rng rng(34);
  {
    InContextMMDiTBlock m({6, 4}, 4, 2, 2, rng);
    NamedTensors in;
    in.insert("0", rng.normal({3, 6}, DType::f64));
    in.insert("1", rng.normal({2, 4}, DType::f64));
    gradcheck_module(m, in, [](auto& mod, const NamedTensors& i) {
      auto out = mod({i.at("0"), i.at("1")});
      return concat({reshape(out[0], {-1}), reshape(out[1], {-1})}, 0);
    });
  }
  {
    InContextMMDiT m(small_incontext({6, 4}, {3, 2}), rng);
    NamedTensors in;
    in.insert("0", rng.normal({2, 3, 6}, DType::f64));
    in.insert("1", rng.normal({2, 2, 4}, DType::f64));
    gradcheck_module(m, in, [](auto& mod, const NamedTensors& i) {
      auto out = mod({i.at("0"), i.at("1")}, obs_full_action_causal(3, 2));
      return concat({reshape(out[0], {-1}), reshape(out[1], {-1})}, 0);
    });
  }
}

}  // namespace
}  // namespace mmdit
