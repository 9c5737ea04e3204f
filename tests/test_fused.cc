// The fused ops against their definitions: values equal the composition of plain ops (in
// float64, to rounding), gradients pass central differences, and the parallel paths (large
// inputs on two threads) agree with one thread.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cblas.h>

#include <cfloat>
#include <functional>
#include <thread>

#include "autodiff/fused.h"
#include "autodiff/gradcheck.h"
#include "autodiff/ops.h"
#include "nn/functional.h"
#include "tensor/blas_core.h"
#include "tensor/parallel.h"
#include "tensor/random.h"
#include "tests/test_util.h"

namespace mmdit {
namespace {

using test::error_of;
using test::max_abs_diff;
using testing::HasSubstr;

// The plain-op definitions the fused ops must equal.
Tensor reference_layer_norm_modulate(const Tensor& x, const Tensor& shift, const Tensor& scale) {
  return nn::layer_norm(x) * (1.0 + scale) + shift;
}
Tensor reference_rms_norm(const Tensor& x, const Tensor& gamma) {
  return x * rsqrt(mean(square(x), {-1}, true) + 1e-6) * gamma;
}
Tensor reference_swiglu(const Tensor& a, const Tensor& g) {
  return a * silu(g);
}
Tensor reference_gated_residual(const Tensor& x, const Tensor& gate, const Tensor& y) {
  return x + gate * y;
}
Tensor reference_rope(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  return nn::apply_rope(x, unsqueeze(cos, 1), unsqueeze(sin, 1));
}

// Token i may attend to tokens j <= i; with first_row_masked, token 0 to none (its row must come
// out uniform, with no gradient through it).
Tensor causal_mask(int64_t T, bool first_row_masked = false) {
  Tensor mask = ones({T, T}, DType::boolean);
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j < T; ++j)
      mask.data<bool>()[i * T + j] = j <= i && !(first_row_masked && i == 0);
  return mask;
}

// Central differences on every element of every float input (or `options.sample` of each): a
// gradcheck that silently covered fewer elements fails the count.
void expect_gradcheck(const std::function<Tensor(const std::vector<Tensor>&)>& f,
                      const std::vector<Tensor>& inputs, const GradcheckOptions& options = {}) {
  int64_t elements = 0;
  for (const Tensor& t : inputs)
    if (is_floating(t.dtype()))
      elements += options.sample < 0 ? t.numel() : std::min(options.sample, t.numel());
  const GradcheckResult r = gradcheck(f, inputs, options);
  EXPECT_TRUE(r.ok) << r.report();
  EXPECT_EQ(r.checked, elements) << r.report();
}

// The tape's gradients of sum(f(inputs) * dy) with respect to every input.
std::vector<Tensor> gradients_of(const std::function<Tensor(const std::vector<Tensor>&)>& f,
                                 const std::vector<Tensor>& inputs, const Tensor& dy) {
  Tape tape;
  for (const Tensor& x : inputs) tape.watch(x);
  return tape.gradient(sum(f(inputs) * dy), inputs);
}

// The fused op's gradients against the tape's gradients of its plain-op definition, input by
// input, on the same cotangent.
void expect_same_gradients(const char* name,
                           const std::function<Tensor(const std::vector<Tensor>&)>& fused,
                           const std::function<Tensor(const std::vector<Tensor>&)>& definition,
                           const std::vector<Tensor>& inputs, const Tensor& dy, double tolerance) {
  const std::vector<Tensor> got = gradients_of(fused, inputs, dy);
  const std::vector<Tensor> expected = gradients_of(definition, inputs, dy);
  for (size_t i = 0; i < inputs.size(); ++i)
    EXPECT_LT(max_abs_diff(got[i], expected[i]), tolerance) << name << ": gradient of input " << i;
}

TEST(Fused, LinearMatchesDefinitionAndGradients) {
  Rng rng(9);
  const Tensor w = rng.normal({5, 4}, DType::f64), b = rng.normal({5}, DType::f64);
  for (const Shape& x_shape : {Shape{4}, Shape{3, 4}, Shape{2, 3, 4}}) {
    const Tensor x = rng.normal(x_shape, DType::f64);
    const Tensor expected = x.dim() == 1
                                ? squeeze(matmul(unsqueeze(x, 0), transpose(w, 0, 1)), 0) + b
                                : matmul(x, transpose(w, 0, 1)) + b;
    EXPECT_LT(max_abs_diff(linear_fused(x, w, b), expected), 1e-13);
    expect_gradcheck(
        [](const std::vector<Tensor>& in) { return linear_fused(in[0], in[1], in[2]); }, {x, w, b});
    expect_gradcheck([](const std::vector<Tensor>& in) { return linear_fused(in[0], in[1]); },
                     {x, w});
  }
  // A transposed (non-contiguous) input and a row block of a weight, as JointAttention uses.
  const Tensor xt = transpose(rng.normal({4, 3}, DType::f64), 0, 1);
  const Tensor w_block = narrow(rng.normal({10, 4}, DType::f64), 0, 5, 5);
  EXPECT_LT(max_abs_diff(linear_fused(xt, w_block), matmul(xt, transpose(w_block, 0, 1))), 1e-13);
  EXPECT_THAT(error_of([&] {
                linear_fused(rng.normal({3, 5}), rng.normal({5, 4}));
              }),
              HasSubstr("linear: input (3,5) does not end in the weight's in-features 4 (weight "
                        "(5,4))"));
  EXPECT_THAT(error_of([&] {
                linear_fused(rng.normal({3, 4}), rng.normal({5, 4}), rng.normal({4}));
              }),
              HasSubstr("linear: bias has shape (4,) and dtype float32; expected (5,) float32"));
}

// Two modalities' linears in one call, one with a bias and one without: each output is its own
// linear, and gradients reach every input and parameter.
TEST(Fused, LinearEachMatchesTheSeparateLinearsAndGradients) {
  Rng rng(11);
  const Tensor x0 = rng.normal({2, 3, 4}, DType::f64), x1 = rng.normal({2, 5, 6}, DType::f64);
  const Tensor w0 = rng.normal({7, 4}, DType::f64), w1 = rng.normal({3, 6}, DType::f64);
  const Tensor b0 = rng.normal({7}, DType::f64);
  const std::vector<Tensor> ys = linear_fused_each({x0, x1}, {w0, w1}, {b0, Tensor()});
  // Against the definition, not linear_fused: both run the same checked_linear.
  EXPECT_LT(max_abs_diff(ys[0], matmul(x0, transpose(w0, 0, 1)) + b0), 1e-13);
  EXPECT_LT(max_abs_diff(ys[1], matmul(x1, transpose(w1, 0, 1))), 1e-13);
  EXPECT_FALSE(linear_fused_each({Tensor(), x1}, {w0, w1}, {b0, Tensor()})[0].defined());
  expect_gradcheck(
      [](const std::vector<Tensor>& in) {
        const std::vector<Tensor> y =
            linear_fused_each({in[0], in[1]}, {in[2], in[3]}, {in[4], Tensor()});
        return concat({reshape(y[0], {-1}), reshape(y[1], {-1})}, 0);
      },
      {x0, x1, w0, w1, b0});
}

TEST(Fused, LayerNormModulateMatchesDefinitionAndGradients) {
  Rng rng(1);
  for (const Shape& mod_shape : {Shape{3, 1, 6}, Shape{6}, Shape{1, 6}}) {
    const Tensor x = rng.normal({3, 4, 6}, DType::f64, 0.5, 2.0);
    const Tensor shift = rng.normal(mod_shape, DType::f64),
                 scale = rng.normal(mod_shape, DType::f64);
    EXPECT_LT(max_abs_diff(layer_norm_modulate(x, shift, scale),
                           reference_layer_norm_modulate(x, shift, scale)),
              1e-12);
    expect_gradcheck(
        [](const std::vector<Tensor>& in) { return layer_norm_modulate(in[0], in[1], in[2]); },
        {x, shift, scale});
  }
  // The packed form the models use, shift and scale from one modulation linear; a (1, 1, 2D)
  // one serves a batch of 3, as the sampler's batch-1 conditioning does.
  for (const Shape& packed_shape : {Shape{3, 1, 12}, Shape{1, 1, 12}, Shape{12}}) {
    SCOPED_TRACE(shape_str(packed_shape));
    const Tensor x = rng.normal({3, 4, 6}, DType::f64, 0.5, 2.0);
    const Tensor shift_scale = rng.normal(packed_shape, DType::f64);
    EXPECT_LT(max_abs_diff(layer_norm_modulate(x, shift_scale),
                           reference_layer_norm_modulate(x, narrow(shift_scale, -1, 0, 6),
                                                         narrow(shift_scale, -1, 6, 6))),
              1e-12);
    expect_gradcheck(
        [](const std::vector<Tensor>& in) { return layer_norm_modulate(in[0], in[1]); },
        {x, shift_scale});
  }
  // Unbatched (S, D) tokens with (1, D) parameters.
  const Tensor x = rng.normal({5, 8}, DType::f64);
  const Tensor shift = rng.normal({1, 8}, DType::f64), scale = rng.normal({1, 8}, DType::f64);
  EXPECT_LT(max_abs_diff(layer_norm_modulate(x, shift, scale),
                         reference_layer_norm_modulate(x, shift, scale)),
            1e-12);
}

TEST(Fused, RmsNormMatchesDefinitionAndGradients) {
  Rng rng(2);
  const Tensor x = rng.normal({2, 3, 2, 8}, DType::f64), gamma = rng.normal({8}, DType::f64);
  EXPECT_LT(max_abs_diff(rms_norm_fused(x, gamma), reference_rms_norm(x, gamma)), 1e-12);
  expect_gradcheck([](const std::vector<Tensor>& in) { return rms_norm_fused(in[0], in[1]); },
                   {x, gamma});
  // A non-contiguous input (a transposed view) gives the same values.
  const Tensor xt = transpose(rng.normal({8, 5}, DType::f64), 0, 1);
  EXPECT_LT(max_abs_diff(rms_norm_fused(xt, gamma), reference_rms_norm(xt, gamma)), 1e-12);
}

TEST(Fused, SwigluMatchesDefinitionAndGradients) {
  Rng rng(3);
  // 2500 elements: more than one of the kernel's 1024-element blocks.
  const Tensor a = rng.normal({50, 50}, DType::f64), g = rng.normal({50, 50}, DType::f64, 0, 3);
  EXPECT_LT(max_abs_diff(swiglu(a, g), reference_swiglu(a, g)), 1e-12);
  expect_gradcheck([](const std::vector<Tensor>& in) { return swiglu(in[0], in[1]); },
                   {rng.normal({3, 7}, DType::f64), rng.normal({3, 7}, DType::f64, 0, 3)});
}

TEST(Fused, GatedResidualMatchesDefinitionAndGradients) {
  Rng rng(4);
  const Tensor x = rng.normal({2, 3, 5}, DType::f64), y = rng.normal({2, 3, 5}, DType::f64);
  for (const Shape& gate_shape : {Shape{2, 1, 5}, Shape{5}}) {
    const Tensor gate = rng.normal(gate_shape, DType::f64);
    EXPECT_LT(max_abs_diff(gated_residual(x, gate, y), reference_gated_residual(x, gate, y)),
              1e-14);
    expect_gradcheck(
        [](const std::vector<Tensor>& in) { return gated_residual(in[0], in[1], in[2]); },
        {x, gate, y});
  }
}

// rms_norm sums dgamma in blocks of 256 rows, then the blocks in order: 600 rows make three
// blocks, the last one ragged.
TEST(Fused, RmsNormGradientsOverSeveralRowBlocks) {
  Rng rng(22);
  const Tensor x = rng.normal({600, 5}, DType::f64), gamma = rng.normal({5}, DType::f64);
  expect_same_gradients(
      "rms_norm", [](const auto& in) { return rms_norm_fused(in[0], in[1]); },
      [](const auto& in) { return reference_rms_norm(in[0], in[1]); }, {x, gamma},
      rng.normal({600, 5}, DType::f64), 1e-12);
}

// swiglu's backward runs in blocks of 1024 elements: 2500 make three, the last one ragged.
TEST(Fused, SwigluGradientsOverSeveralBlocks) {
  Rng rng(23);
  const Tensor a = rng.normal({50, 50}, DType::f64), g = rng.normal({50, 50}, DType::f64, 0, 3);
  expect_same_gradients(
      "swiglu", [](const auto& in) { return swiglu(in[0], in[1]); },
      [](const auto& in) { return reference_swiglu(in[0], in[1]); }, {a, g},
      rng.normal({50, 50}, DType::f64), 1e-12);
}

// gated_residual's backward takes another path when the tape needs only some of its gradients:
// with the gate constant, and with only the gate watched, each against the closed forms
// d/dx = dy, d/dy = dy gate, d/dgate = sum_S dy y.
TEST(Fused, GatedResidualGradientsOfSomeInputs) {
  Rng rng(24);
  const Tensor x = rng.normal({2, 3, 5}, DType::f64), y = rng.normal({2, 3, 5}, DType::f64);
  const Tensor dy = rng.normal({2, 3, 5}, DType::f64);
  for (const Shape& gate_shape : {Shape{2, 1, 5}, Shape{5}}) {
    SCOPED_TRACE("gate " + shape_str(gate_shape));
    const Tensor gate = rng.normal(gate_shape, DType::f64);
    {
      Tape tape;
      tape.watch(x), tape.watch(y);
      const std::vector<Tensor> g = tape.gradient(sum(gated_residual(x, gate, y) * dy), {x, y});
      EXPECT_EQ(max_abs_diff(g[0], dy), 0.0) << "d/dx with the gate constant";
      EXPECT_LT(max_abs_diff(g[1], raw::mul(dy, gate)), 1e-15) << "d/dy with the gate constant";
    }
    {
      Tape tape;
      tape.watch(gate);
      const Tensor g = tape.gradient(sum(gated_residual(x, gate, y) * dy), {gate})[0];
      const Tensor expected = gate_shape.size() == 3 ? raw::sum(raw::mul(dy, y), {1}, true)
                                                     : raw::sum(raw::mul(dy, y), {0, 1}, false);
      EXPECT_LT(max_abs_diff(g, expected), 1e-14) << "d/dgate with x and y constant";
    }
    // The same two paths by central differences.
    expect_gradcheck(
        [&](const std::vector<Tensor>& in) { return gated_residual(in[0], gate, in[1]); }, {x, y});
    expect_gradcheck([&](const std::vector<Tensor>& in) { return gated_residual(x, in[0], y); },
                     {gate});
  }
}

// Unbatched (S, D) tokens with (1, D) parameters, and one (D,) token with a (2D,) shift_scale.
TEST(Fused, LayerNormModulateGradientsOnUnbatchedInputs) {
  Rng rng(25);
  expect_gradcheck(
      [](const std::vector<Tensor>& in) { return layer_norm_modulate(in[0], in[1], in[2]); },
      {rng.normal({5, 8}, DType::f64), rng.normal({1, 8}, DType::f64),
       rng.normal({1, 8}, DType::f64)});
  const Tensor x = rng.normal({8}, DType::f64), shift_scale = rng.normal({16}, DType::f64);
  EXPECT_LT(max_abs_diff(layer_norm_modulate(x, shift_scale),
                         reference_layer_norm_modulate(x, narrow(shift_scale, 0, 0, 8),
                                                       narrow(shift_scale, 0, 8, 8))),
            1e-12);
  expect_gradcheck([](const std::vector<Tensor>& in) { return layer_norm_modulate(in[0], in[1]); },
                   {x, shift_scale});
}

// linear_fused reads a transposed input and a row block of a weight (as JointAttention does)
// through views: their gradients must land on the right elements of the underlying tensors.
TEST(Fused, LinearGradientsThroughNonContiguousInputs) {
  Rng rng(26);
  expect_gradcheck(
      [](const std::vector<Tensor>& in) {
        return linear_fused(transpose(in[0], 0, 1), narrow(in[1], 0, 5, 5));
      },
      {rng.normal({4, 3}, DType::f64), rng.normal({10, 4}, DType::f64)});
  expect_gradcheck(
      [](const std::vector<Tensor>& in) {
        return linear_fused(transpose(in[0], 0, 1), narrow(in[1], 0, 5, 5), in[2]);
      },
      {rng.normal({4, 3}, DType::f64), rng.normal({10, 4}, DType::f64),
       rng.normal({5}, DType::f64)});
}

// Each fused op makes a non-contiguous input contiguous before its kernel: the gradient must go
// back through that copy onto the right elements of the view (the models pass narrowed
// modulation chunks and permuted activations).
TEST(Fused, GradientsThroughNonContiguousInputs) {
  Rng rng(28);
  const auto t = [](const Tensor& x) { return transpose(x, 0, 1); };
  expect_gradcheck([&](const auto& in) { return rms_norm_fused(t(in[0]), in[1]); },
                   {rng.normal({3, 5}, DType::f64), rng.normal({3}, DType::f64)});
  expect_gradcheck([&](const auto& in) { return swiglu(t(in[0]), narrow(in[1], 1, 1, 3)); },
                   {rng.normal({3, 4}, DType::f64), rng.normal({4, 5}, DType::f64)});
  expect_gradcheck(
      [&](const auto& in) { return gated_residual(t(in[0]), narrow(in[1], 0, 2, 3), t(in[2])); },
      {rng.normal({3, 2}, DType::f64), rng.normal({6}, DType::f64),
       rng.normal({3, 2}, DType::f64)});
  // shift and scale as halves of one modulation output, x permuted.
  expect_gradcheck(
      [&](const auto& in) {
        return layer_norm_modulate(permute(in[0], {1, 0, 2}), narrow(in[1], 2, 0, 4),
                                   narrow(in[1], 2, 4, 4));
      },
      {rng.normal({3, 2, 4}, DType::f64), rng.normal({2, 1, 8}, DType::f64)});
  expect_gradcheck([&](const auto& in) { return layer_norm_modulate(t(in[0]), in[1]); },
                   {rng.normal({4, 3}, DType::f64), rng.normal({1, 8}, DType::f64)});
  const nn::RopeTables tables = nn::rope_tables(3, 4, DType::f64);
  expect_gradcheck(
      [&](const auto& in) {
        return rope(permute(in[0], {0, 2, 1, 3}), tables.cos, tables.sin);
      },
      {rng.normal({2, 2, 3, 4}, DType::f64)});
  // Every other token of a longer sequence: a stepped view.
  expect_gradcheck(
      [&](const auto& in) {
        return qk_norm_rope(slice(in[0], 1, 0, 6, 2), in[1], in[2], tables.cos, tables.sin);
      },
      {rng.normal({2, 6, 3, 2, 4}, DType::f64), rng.normal({4}, DType::f64),
       rng.normal({4}, DType::f64)});
  for (const int64_t blocked_from : {int64_t{1}, kBlockedAttentionFrom})
    expect_gradcheck(
        [&](const auto& in) {
          return attention_packed(slice(in[0], 1, 1, 5, 1), Tensor(), blocked_from);
        },
        {rng.normal({2, 5, 3, 2, 4}, DType::f64)});
  expect_gradcheck(
      [&](const auto& in) {
        return joint_attention_fused({slice(in[0], 1, 0, 6, 2), narrow(in[1], 1, 1, 2)},
                                     {in[2], in[2]}, {in[3], in[3]},
                                     {tables.cos, narrow(tables.cos, 0, 0, 2)},
                                     {tables.sin, narrow(tables.sin, 0, 0, 2)}, Tensor());
      },
      {rng.normal({2, 6, 3, 2, 4}, DType::f64), rng.normal({2, 3, 3, 2, 4}, DType::f64),
       rng.normal({4}, DType::f64), rng.normal({4}, DType::f64)});
}

// The rotary tables are constants of the fused ops. Watched (or computed from watched values),
// their gradient was silently 0 where the plain ops' composition gives one: refused instead.
TEST(Fused, RotaryTablesOnATapeAreRefused) {
  Rng rng(29);
  const Tensor x = rng.normal({1, 3, 2, 4}, DType::f64),
               qkv = rng.normal({1, 3, 3, 2, 4}, DType::f64);
  const Tensor gamma = rng.normal({4}, DType::f64);
  const nn::RopeTables tables = nn::rope_tables(3, 4, DType::f64);
  const Tensor cos = raw::clone(tables.cos), sin = raw::clone(tables.sin);
  Tape tape;
  tape.watch(cos);
  EXPECT_THAT(error_of([&] { rope(x, cos, tables.sin); }),
              HasSubstr("rope: cos (3,4) is on a tape, but rope takes it as a constant"));
  EXPECT_THAT(error_of([&] { qk_norm_rope(qkv, gamma, gamma, cos, sin); }),
              HasSubstr("qk_norm_rope: cos (3,4) is on a tape"));
  const Tensor derived = cos * 0.5;  // computed from a watched tensor
  EXPECT_THAT(error_of([&] {
                joint_attention_fused({qkv}, {gamma}, {gamma}, {tables.cos}, {derived}, Tensor());
              }),
              HasSubstr("joint_attention: sin[0] (3,4) is on a tape"));
  // A table another thread's tape recorded, while that tape can still record, is refused too.
  std::string other_thread = "(no mmdit::Error thrown)";
  std::thread([&] {
    try {
      rope(x, derived, tables.sin);
    } catch (const Error& e) {
      other_thread = e.what();
    }
  }).join();
  EXPECT_THAT(other_thread, HasSubstr("rope: input 0 (3,4) was recorded by a tape that is still "
                                      "recording on another thread"));
  // Off the tape (stop_gradient), the same tables are constants as documented.
  EXPECT_EQ(error_of([&] { rope(x, stop_gradient(cos), sin); }), "(no mmdit::Error thrown)");
}

// Every test above passes the default eps, which the references also default to: an op that
// ignored its eps argument would pass them. At eps 0.5 on inputs of scale 0.05 the outputs differ
// from the default-eps ones by O(1).
TEST(Fused, NonDefaultEpsMatchesTheComposition) {
  Rng rng(27);
  const double eps = 0.5;
  const Tensor x = rng.normal({3, 4, 6}, DType::f64, 0, 0.05);
  const Tensor shift = rng.normal({3, 1, 6}, DType::f64), scale = rng.normal({3, 1, 6}, DType::f64);
  const Tensor gamma = rng.normal({6}, DType::f64);
  const auto ln_definition = [eps](const std::vector<Tensor>& in) {
    return nn::layer_norm(in[0], eps) * (1.0 + in[2]) + in[1];
  };
  const auto rms_definition = [eps](const Tensor& x, const Tensor& gamma) {
    return x * rsqrt(mean(square(x), {-1}, true) + eps) * gamma;
  };
  const Tensor ln = layer_norm_modulate(x, shift, scale, eps);
  EXPECT_GT(max_abs_diff(ln, layer_norm_modulate(x, shift, scale)), 0.1) << "eps has no effect";
  EXPECT_LT(max_abs_diff(ln, ln_definition({x, shift, scale})), 1e-13) << "layer_norm_modulate";
  expect_same_gradients(
      "layer_norm_modulate",
      [eps](const auto& in) { return layer_norm_modulate(in[0], in[1], in[2], eps); },
      ln_definition, {x, shift, scale}, rng.normal({3, 4, 6}, DType::f64), 1e-12);

  const Tensor rms = rms_norm_fused(x, gamma, eps);
  EXPECT_GT(max_abs_diff(rms, rms_norm_fused(x, gamma)), 0.1) << "eps has no effect";
  EXPECT_LT(max_abs_diff(rms, rms_definition(x, gamma)), 1e-13) << "rms_norm";
  expect_same_gradients(
      "rms_norm", [eps](const auto& in) { return rms_norm_fused(in[0], in[1], eps); },
      [&](const auto& in) { return rms_definition(in[0], in[1]); }, {x, gamma},
      rng.normal({3, 4, 6}, DType::f64), 1e-12);
  expect_gradcheck(
      [eps](const std::vector<Tensor>& in) {
        return layer_norm_modulate(in[0], in[1], in[2], eps);
      },
      {x, shift, scale});
  expect_gradcheck(
      [eps](const std::vector<Tensor>& in) { return rms_norm_fused(in[0], in[1], eps); },
      {x, gamma});

  // qk_norm_rope and joint attention on (B, S, 3, H, d) = (2, 4, 3, 2, 6) and (2, 3, 3, 2, 6).
  const std::vector<Tensor> qkv = {rng.normal({2, 4, 3, 2, 6}, DType::f64, 0, 0.05),
                                   rng.normal({2, 3, 3, 2, 6}, DType::f64, 0, 0.05)};
  const std::vector<Tensor> gq = {rng.normal({6}, DType::f64), rng.normal({6}, DType::f64)},
                            gk = {rng.normal({6}, DType::f64), rng.normal({6}, DType::f64)};
  const std::vector<Tensor> cos = {rng.normal({4, 6}, DType::f64), rng.normal({3, 6}, DType::f64)},
                            sin = {rng.normal({4, 6}, DType::f64), rng.normal({3, 6}, DType::f64)};
  std::vector<Tensor> parts;
  for (size_t m = 0; m < 2; ++m) {
    auto part = [&](int64_t i) { return squeeze(narrow(qkv[m], 2, i, 1), 2); };
    parts.push_back(stack({reference_rope(rms_definition(part(0), gq[m]), cos[m], sin[m]),
                           reference_rope(rms_definition(part(1), gk[m]), cos[m], sin[m]), part(2)},
                          2));
    const Tensor got = qk_norm_rope(qkv[m], gq[m], gk[m], cos[m], sin[m], eps);
    EXPECT_GT(max_abs_diff(got, qk_norm_rope(qkv[m], gq[m], gk[m], cos[m], sin[m])), 0.1)
        << "eps has no effect";
    EXPECT_LT(max_abs_diff(got, parts[m]), 1e-13) << "qk_norm_rope, modality " << m;
  }
  const Tensor causal = causal_mask(7);
  for (const int64_t blocked_from : {int64_t{1}, kBlockedAttentionFrom})
    EXPECT_LT(max_abs_diff(joint_attention_fused(qkv, gq, gk, cos, sin, causal, eps, blocked_from),
                           attention_packed(concat(parts, 1), causal)),
              1e-13)
        << "joint attention, blocked from " << blocked_from;
  // Their backward passes recompute the normalisation, so eps must reach them too: a backward
  // that used the default eps passed everything above.
  for (size_t m = 0; m < 2; ++m)
    expect_gradcheck(
        [&, m](const std::vector<Tensor>& in) {
          return qk_norm_rope(in[0], in[1], in[2], cos[m], sin[m], eps);
        },
        {qkv[m], gq[m], gk[m]});
  for (const int64_t blocked_from : {int64_t{1}, kBlockedAttentionFrom})
    expect_gradcheck(
        [&](const std::vector<Tensor>& in) {
          return joint_attention_fused({in[0], in[1]}, {in[2], in[3]}, {in[4], in[5]}, cos, sin,
                                       causal, eps, blocked_from);
        },
        {qkv[0], qkv[1], gq[0], gq[1], gk[0], gk[1]});
}

TEST(Fused, RopeMatchesDefinitionAndGradients) {
  Rng rng(5);
  const nn::RopeTables t = nn::rope_tables(4, 6, DType::f64);
  const Tensor x = rng.normal({2, 4, 3, 6}, DType::f64);
  EXPECT_LT(max_abs_diff(rope(x, t.cos, t.sin), reference_rope(x, t.cos, t.sin)), 1e-14);
  expect_gradcheck([t](const std::vector<Tensor>& in) { return rope(in[0], t.cos, t.sin); }, {x});
}

// nn::rope_tables repeats each half (cos[j] == cos[j + d/2]), so with them a kernel reading the
// wrong half of a table gives the right numbers. The ops take any (S, d) tables: random ones have
// no such symmetry.
TEST(Fused, RopeAndQkNormRopeWithAsymmetricTables) {
  Rng rng(21);
  const int64_t S = 4, d = 6;
  const Tensor c = rng.normal({S, d}, DType::f64), s = rng.normal({S, d}, DType::f64);
  const Tensor x = rng.normal({2, S, 3, d}, DType::f64);
  EXPECT_LT(max_abs_diff(rope(x, c, s), reference_rope(x, c, s)), 1e-14);
  expect_gradcheck([&](const std::vector<Tensor>& in) { return rope(in[0], c, s); }, {x});

  const Tensor qkv = rng.normal({2, S, 3, 2, d}, DType::f64);
  const Tensor gq = rng.normal({d}, DType::f64), gk = rng.normal({d}, DType::f64);
  auto part = [&](int64_t i) { return squeeze(narrow(qkv, 2, i, 1), 2); };
  const Tensor expected = stack({reference_rope(reference_rms_norm(part(0), gq), c, s),
                                 reference_rope(reference_rms_norm(part(1), gk), c, s), part(2)},
                                2);
  EXPECT_LT(max_abs_diff(qk_norm_rope(qkv, gq, gk, c, s), expected), 1e-13);
  expect_gradcheck(
      [&](const std::vector<Tensor>& in) { return qk_norm_rope(in[0], in[1], in[2], c, s); },
      {qkv, gq, gk});
}

// nn::attention works on (B, H, T, d); the fused op on (B, T, H, d).
Tensor reference_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask) {
  auto heads_first = [](const Tensor& t) { return permute(t, {0, 2, 1, 3}); };
  return permute(nn::attention(heads_first(q), heads_first(k), heads_first(v), mask), {0, 2, 1, 3});
}

TEST(Fused, AttentionMatchesDefinitionAndGradients) {
  Rng rng(10);
  const int64_t B = 2, T = 5, H = 3, d = 4;
  const Tensor causal = causal_mask(T, /*first_row_masked=*/true);
  Tensor per_example = ones({B, T, T}, DType::boolean);
  per_example.data<bool>()[T * T + 2] = false;
  for (const Tensor& mask : {Tensor(), causal, per_example}) {
    const Tensor q = rng.normal({B, T, H, d}, DType::f64), k = rng.normal({B, T, H, d}, DType::f64),
                 v = rng.normal({B, T, H, d}, DType::f64);
    EXPECT_LT(max_abs_diff(attention_fused(q, k, v, mask), reference_attention(q, k, v, mask)),
              1e-13);
    expect_gradcheck(
        [mask](const std::vector<Tensor>& in) {
          return attention_fused(in[0], in[1], in[2], mask);
        },
        {q, k, v});
  }
  const Tensor q = rng.normal({B, T, H, d});
  EXPECT_THAT(error_of([&] {
                attention_fused(q, q, rng.normal({B, T, H, 2}), Tensor());
              }),
              HasSubstr("attention: q, k, v have shapes (2,5,3,4), (2,5,3,4), (2,5,3,2); expected "
                        "one (B, T, H, d) shape"));
  EXPECT_THAT(error_of([&] {
                attention_fused(q, q, q, ones({T, T + 1}, DType::boolean));
              }),
              HasSubstr("attention: mask has shape (5,6) and dtype bool; expected bool (5,5) or "
                        "(2,5,5)"));
  EXPECT_THAT(error_of([&] {
                attention_fused(q, q, q, ones({T, T}));
              }),  // a float mask
              HasSubstr("attention: mask has shape (5,5) and dtype float32; expected bool (5,5) or "
                        "(2,5,5)"));
}

// Packed (B, T, 3, H, d) q/k/v give what the three separate tensors give.
TEST(Fused, PackedAttentionMatchesSeparateAndGradients) {
  Rng rng(11);
  const int64_t B = 2, T = 4, H = 2, d = 4;
  const Tensor causal = causal_mask(T);
  for (const Tensor& mask : {Tensor(), causal}) {
    const Tensor qkv = rng.normal({B, T, 3, H, d}, DType::f64);
    auto part = [&](int64_t i) { return squeeze(narrow(qkv, 2, i, 1), 2); };
    EXPECT_LT(max_abs_diff(attention_packed(qkv, mask),
                           reference_attention(part(0), part(1), part(2), mask)),
              1e-13);
    expect_gradcheck(
        [mask](const std::vector<Tensor>& in) { return attention_packed(in[0], mask); }, {qkv});
  }
  EXPECT_THAT(error_of([&] {
                attention_packed(rng.normal({B, T, 2, H, d}), Tensor());
              }),
              HasSubstr("attention: packed qkv has shape (2,4,2,2,4); expected (B, T, 3, H, d) "
                        "with d > 0"));
  EXPECT_THAT(error_of([&] {
                attention_packed(zeros({1, 2, 3, 1, 0}), Tensor());
              }),
              HasSubstr("attention: packed qkv has shape (1,2,3,1,0); expected (B, T, 3, H, d) "
                        "with d > 0"));
}

// float32 attention runs its per-head products on register-tile kernels up to 32 x 32 x 64
// (simd::gemm_nt, simd::gemm_small_nn) and on gemm above: both against the float64 result, values
// and the gradients of q, k and v.
TEST(Fused, Float32AttentionMatchesFloat64OnBothProductPaths) {
  Rng rng(13);
  for (const int64_t T : {18, 7, 40}) {  // the policy's 18 tokens, a ragged size, gemm's side
    const int64_t B = 2, H = 3, d = 64;
    const Tensor causal = causal_mask(T);
    const Tensor qkv64 = rng.normal({B, T, 3, H, d}, DType::f64, 0, 0.3);
    const Tensor dy64 = rng.normal({B, T, H, d}, DType::f64);
    const auto run = [&](const Tensor& qkv, const Tensor& dy) {
      Tape tape;
      tape.watch(qkv);
      const Tensor y = attention_packed(qkv, causal);
      return std::pair{y, tape.gradient(sum(y * dy), {qkv})[0]};
    };
    const auto [y64, g64] = run(qkv64, dy64);
    const auto [y32, g32] = run(to_dtype(qkv64, DType::f32), to_dtype(dy64, DType::f32));
    EXPECT_LT(max_abs_diff(y32, y64), 2e-6) << T;
    EXPECT_LT(max_abs_diff(g32, g64), 2e-5) << T;
  }
}

// Long sequences go through blocks of 64 queries and save only each row's max and sum of
// exponentials. Forced here from 1 token (blocked_from) on 70 tokens: two blocks, the second
// ragged; masks as above, including a fully masked row and a per-example mask.
TEST(Fused, BlockedAttentionMatchesDefinitionAndGradients) {
  Rng rng(14);
  const int64_t B = 2, T = 70, H = 2, d = 4;
  const Tensor causal = causal_mask(T, /*first_row_masked=*/true);
  Tensor per_example = ones({B, T, T}, DType::boolean);
  for (int64_t j = 0; j < T; j += 3) per_example.data<bool>()[T * T + 65 * T + j] = false;
  for (const Tensor& mask : {Tensor(), causal, per_example}) {
    const Tensor qkv = rng.normal({B, T, 3, H, d}, DType::f64);
    auto part = [&](int64_t i) { return squeeze(narrow(qkv, 2, i, 1), 2); };
    EXPECT_LT(max_abs_diff(attention_packed(qkv, mask, 1),
                           reference_attention(part(0), part(1), part(2), mask)),
              1e-13);
    // Gradients: blocked against the probabilities-saving path, both float64.
    const Tensor dy = rng.normal({B, T, H, d}, DType::f64);
    const auto gradient = [&](int64_t blocked_from) {
      Tape tape;
      tape.watch(qkv);
      const Tensor y = attention_packed(qkv, mask, blocked_from);
      return tape.gradient(sum(y * dy), {qkv})[0];
    };
    EXPECT_LT(max_abs_diff(gradient(1), gradient(kBlockedAttentionFrom)), 1e-12);
  }
  // Central differences on a smaller case: one block and a ragged second one, with and without
  // a fully masked first row.
  const Tensor small = rng.normal({1, 66, 3, 1, 4}, DType::f64);
  for (const bool first_row_masked : {false, true}) {
    const Tensor causal66 = causal_mask(66, first_row_masked);
    expect_gradcheck(
        [causal66](const std::vector<Tensor>& in) { return attention_packed(in[0], causal66, 1); },
        {small});
  }
}

// At the default threshold a long sequence saves its input and two numbers per row and head, not
// the B H T^2 probabilities; float32 against float64 as for the short path.
TEST(Fused, LongSequenceAttentionSavesNoProbabilities) {
  Rng rng(15);
  const int64_t B = 1, T = kBlockedAttentionFrom + 88, H = 2, d = 16;
  const Tensor qkv64 = rng.normal({B, T, 3, H, d}, DType::f64, 0, 0.3);
  const Tensor dy64 = rng.normal({B, T, H, d}, DType::f64);
  const auto run = [&](const Tensor& qkv, const Tensor& dy, size_t* saved) {
    Tape tape;
    tape.watch(qkv);
    const Tensor y = attention_packed(qkv, Tensor());
    if (saved) *saved = tape.saved_bytes();
    return std::pair{y, tape.gradient(sum(y * dy), {qkv})[0]};
  };
  size_t saved = 0;
  const auto [y64, g64] = run(qkv64, dy64, nullptr);
  const auto [y32, g32] = run(to_dtype(qkv64, DType::f32), to_dtype(dy64, DType::f32), &saved);
  EXPECT_EQ(saved, static_cast<size_t>(B * T * 3 * H * d + 2 * B * H * T) * sizeof(float));
  EXPECT_LT(max_abs_diff(y32, y64), 2e-6);
  EXPECT_LT(max_abs_diff(g32, g64), 2e-5);
}

TEST(Fused, QkNormRopeMatchesDefinitionAndGradients) {
  Rng rng(12);
  const int64_t B = 2, S = 3, H = 2, d = 6;
  const nn::RopeTables t = nn::rope_tables(S, d, DType::f64);
  const Tensor qkv = rng.normal({B, S, 3, H, d}, DType::f64);
  const Tensor gq = rng.normal({d}, DType::f64), gk = rng.normal({d}, DType::f64);
  auto part = [&](int64_t i) { return squeeze(narrow(qkv, 2, i, 1), 2); };
  const Tensor expected =
      stack({reference_rope(reference_rms_norm(part(0), gq), t.cos, t.sin),
             reference_rope(reference_rms_norm(part(1), gk), t.cos, t.sin), part(2)},
            2);
  EXPECT_LT(max_abs_diff(qk_norm_rope(qkv, gq, gk, t.cos, t.sin), expected), 1e-13);
  expect_gradcheck(
      [t](const std::vector<Tensor>& in) {
        return qk_norm_rope(in[0], in[1], in[2], t.cos, t.sin);
      },
      {qkv, gq, gk});
  EXPECT_THAT(
      error_of([&] { qk_norm_rope(qkv, gq, rng.normal({d + 1}, DType::f64), t.cos, t.sin); }),
      HasSubstr("qk_norm_rope: gammas have shapes (6,) and (7,); expected (6,)"));
  EXPECT_THAT(error_of([&] {
                qk_norm_rope(qkv, gq, gk, t.cos, rng.normal({S + 1, d}, DType::f64));
              }),
              HasSubstr("qk_norm_rope: tables have shapes (3,6) and (4,6); expected (3,6)"));
}

// Joint attention's fused core against what it replaces: qk_norm_rope per modality, concat, then
// attention_packed; on both the saved-probabilities and the blocked path, with no mask, a
// block-causal mask with a fully masked row, and a per-example mask; gradients of every qkv and
// gamma.
TEST(Fused, JointAttentionMatchesTheCompositionAndGradients) {
  Rng rng(16);
  const int64_t B = 2, H = 2, d = 6;
  const std::vector<int64_t> lengths = {3, 5};
  const int64_t T = 8;
  std::vector<Tensor> qkv, gq, gk, cos, sin;
  for (const int64_t S : lengths) {
    qkv.push_back(rng.normal({B, S, 3, H, d}, DType::f64));
    gq.push_back(rng.normal({d}, DType::f64));
    gk.push_back(rng.normal({d}, DType::f64));
    // Random tables: the models' halves-repeating ones would hide a half-swapped index.
    cos.push_back(rng.normal({S, d}, DType::f64));
    sin.push_back(rng.normal({S, d}, DType::f64));
  }
  const auto composition = [&](const std::vector<Tensor>& in, const Tensor& mask) {
    std::vector<Tensor> parts;
    for (size_t m = 0; m < lengths.size(); ++m)
      parts.push_back(qk_norm_rope(in[m], in[2 + m], in[4 + m], cos[m], sin[m]));
    return attention_packed(concat(parts, 1), mask);
  };
  const auto fused = [&](const std::vector<Tensor>& in, const Tensor& mask, int64_t blocked_from) {
    return joint_attention_fused({in[0], in[1]}, {in[2], in[3]}, {in[4], in[5]}, cos, sin, mask,
                                 1e-6, blocked_from);
  };
  const std::vector<Tensor> inputs = {qkv[0], qkv[1], gq[0], gq[1], gk[0], gk[1]};
  const auto gradients = [&](const auto& f, const Tensor& dy) {
    Tape tape;
    for (const Tensor& x : inputs) tape.watch(x);
    return tape.gradient(sum(f(inputs) * dy), inputs);
  };
  Tensor per_example = ones({B, T, T}, DType::boolean);
  for (int64_t j = 0; j < T; j += 3) per_example.data<bool>()[T * T + 6 * T + j] = false;
  for (const Tensor& mask : {Tensor(), causal_mask(T, /*first_row_masked=*/true), per_example}) {
    const Tensor expected = composition(inputs, mask);
    const Tensor dy = rng.normal(expected.shape(), DType::f64);
    const std::vector<Tensor> expected_grads =
        gradients([&](const auto& in) { return composition(in, mask); }, dy);
    for (const int64_t blocked_from : {int64_t{1}, kBlockedAttentionFrom}) {
      EXPECT_LT(max_abs_diff(fused(inputs, mask, blocked_from), expected), 1e-13);
      const std::vector<Tensor> grads =
          gradients([&](const auto& in) { return fused(in, mask, blocked_from); }, dy);
      for (size_t i = 0; i < inputs.size(); ++i)
        EXPECT_LT(max_abs_diff(grads[i], expected_grads[i]), 1e-12)
            << "input " << i << ", blocked from " << blocked_from;
    }
  }
  for (const Tensor& mask : {Tensor(), causal_mask(T), per_example})
    for (const int64_t blocked_from : {int64_t{1}, kBlockedAttentionFrom})
      expect_gradcheck([&](const std::vector<Tensor>& in) { return fused(in, mask, blocked_from); },
                       inputs);
}

TEST(Fused, JointAttentionBadInputsAreErrors) {
  Rng rng(17);
  const int64_t B = 2, H = 2, d = 4;
  const nn::RopeTables t3 = nn::rope_tables(3, d, DType::f32),
                       t5 = nn::rope_tables(5, d, DType::f32);
  const Tensor q3 = rng.normal({B, 3, 3, H, d}), q5 = rng.normal({B, 5, 3, H, d});
  const Tensor g = rng.normal({d});
  const auto message = [](const auto& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message([&] {
              joint_attention_fused({q3, rng.normal({B, 5, 3, H + 1, d})}, {g, g}, {g, g},
                                    {t3.cos, t5.cos}, {t3.sin, t5.sin}, Tensor());
            }).find("packed qkv of modality 1 has shape (2,5,3,3,4)"),
            std::string::npos);
  EXPECT_NE(message([&] {
              joint_attention_fused({q3, q5}, {g, g}, {g, g}, {t3.cos, t3.cos}, {t3.sin, t5.sin},
                                    Tensor());
            }).find("rotary tables of modality 1"),
            std::string::npos);
  EXPECT_NE(
      message([&] {
        joint_attention_fused({q3, q5}, {g}, {g, g}, {t3.cos, t5.cos}, {t3.sin, t5.sin}, Tensor());
      }).find("expected one of each per modality"),
      std::string::npos);
  EXPECT_NE(message([&] {
              joint_attention_fused({q3, q5}, {g, g}, {g, g}, {t3.cos, t5.cos}, {t3.sin, t5.sin},
                                    ones({7, 7}, DType::boolean));
            }).find("mask has shape (7,7)"),
            std::string::npos);
  EXPECT_THAT(message([&] {
                joint_attention_fused({q3, to_dtype(q5, DType::f64)}, {g, g}, {g, g},
                                      {t3.cos, t5.cos}, {t3.sin, t5.sin}, Tensor());
              }),
              HasSubstr("joint_attention: inputs must share one float dtype, got float32 "
                        "(qkv[0]) and float64 (qkv[1])"));
  EXPECT_THAT(message([&] {
                joint_attention_fused({q3, q5}, {rng.normal({3}), g}, {g, g}, {t3.cos, t5.cos},
                                      {t3.sin, t5.sin}, Tensor());
              }),
              HasSubstr("joint_attention: gammas of modality 0 have shapes (3,) and (4,); "
                        "expected (4,)"));
  EXPECT_THAT(message([&] {
                joint_attention_fused({Tensor(), q5}, {g, g}, {g, g}, {t3.cos, t5.cos},
                                      {t3.sin, t5.sin}, Tensor());
              }),
              HasSubstr("joint_attention: qkv[0] is an undefined tensor"));
}

TEST(Fused, Float32AgreesWithTheComposition) {
  Rng rng(6);
  const Tensor x = rng.normal({4, 16, 64}), shift = rng.normal({4, 1, 64}),
               scale = rng.normal({4, 1, 64});
  EXPECT_LT(max_abs_diff(layer_norm_modulate(x, shift, scale),
                         reference_layer_norm_modulate(x, shift, scale)),
            1e-5);
  const Tensor gamma = rng.normal({64});
  EXPECT_LT(max_abs_diff(rms_norm_fused(x, gamma), reference_rms_norm(x, gamma)), 1e-5);
  EXPECT_LT(max_abs_diff(swiglu(x, shift * x), reference_swiglu(x, shift * x)), 1e-5);
  // D = 37 is no multiple of any vector width: the kernels' remainder iterations run.
  const Tensor x37 = rng.normal({3, 5, 37}), shift_scale37 = rng.normal({3, 1, 74});
  const Tensor shift37 = narrow(shift_scale37, -1, 0, 37),
               scale37 = narrow(shift_scale37, -1, 37, 37);
  EXPECT_LT(max_abs_diff(layer_norm_modulate(x37, shift_scale37),
                         reference_layer_norm_modulate(x37, shift37, scale37)),
            1e-5)
      << "layer_norm_modulate, D = 37";
  const Tensor gamma37 = rng.normal({37});
  EXPECT_LT(max_abs_diff(rms_norm_fused(x37, gamma37), reference_rms_norm(x37, gamma37)), 1e-5)
      << "rms_norm, D = 37";
  const Tensor y37 = rng.normal({3, 5, 37});
  EXPECT_LT(
      max_abs_diff(gated_residual(x37, scale37, y37), reference_gated_residual(x37, scale37, y37)),
      1e-5)
      << "gated_residual, D = 37";
}

// The float32 backward kernels have SIMD loops of their own, which the float64 gradchecks never
// run: their gradients must agree with float64's on the same inputs and cotangent.
TEST(Fused, Float32GradientsAgreeWithFloat64) {
  using Fn = std::function<Tensor(const std::vector<Tensor>&)>;
  const auto gradients = [](const Fn& f, std::vector<Tensor> inputs, DType dtype, uint64_t seed) {
    for (Tensor& x : inputs) x = raw::to_dtype(x, dtype);
    Tape tape;
    for (const Tensor& x : inputs) tape.watch(x);
    const Tensor y = f(inputs);
    Rng rng(seed);
    return tape.gradient(y, inputs, raw::to_dtype(rng.normal(y.shape(), DType::f64), dtype));
  };
  const auto expect_agreement = [&](const char* name, const Fn& f,
                                    const std::vector<Tensor>& inputs) {
    const std::vector<Tensor> g64 = gradients(f, inputs, DType::f64, 99);
    const std::vector<Tensor> g32 = gradients(f, inputs, DType::f32, 99);
    for (size_t i = 0; i < inputs.size(); ++i) {
      const double scale = raw::max(raw::unary(raw::UnaryOp::abs, g64[i])).item();
      EXPECT_LT(max_abs_diff(raw::to_dtype(g32[i], DType::f64), g64[i]), 2e-5 * scale)
          << name << ", input " << i;
    }
  };
  Rng rng(12);
  const Tensor x = rng.normal({4, 16, 64}, DType::f64, 0.3, 1.5);
  expect_agreement("layer_norm_modulate",
                   [](const auto& in) { return layer_norm_modulate(in[0], in[1]); },
                   {x, rng.normal({4, 1, 128}, DType::f64)});
  expect_agreement("rms_norm", [](const auto& in) { return rms_norm_fused(in[0], in[1]); },
                   {x, rng.normal({64}, DType::f64)});
  expect_agreement("swiglu", [](const auto& in) { return swiglu(in[0], in[1]); },
                   {x, rng.normal({4, 16, 64}, DType::f64)});
  expect_agreement("gated_residual",
                   [](const auto& in) { return gated_residual(in[0], in[1], in[2]); },
                   {x, rng.normal({4, 1, 64}, DType::f64), rng.normal({4, 16, 64}, DType::f64)});
  // D = 37 is no multiple of any vector width: the kernels' remainder iterations run.
  const Tensor x37 = rng.normal({3, 5, 37}, DType::f64, 0.3, 1.5);
  expect_agreement("layer_norm_modulate, D = 37",
                   [](const auto& in) { return layer_norm_modulate(in[0], in[1]); },
                   {x37, rng.normal({3, 1, 74}, DType::f64)});
  expect_agreement("rms_norm, D = 37", [](const auto& in) { return rms_norm_fused(in[0], in[1]); },
                   {x37, rng.normal({37}, DType::f64)});
  expect_agreement("gated_residual, D = 37",
                   [](const auto& in) { return gated_residual(in[0], in[1], in[2]); },
                   {x37, rng.normal({3, 1, 37}, DType::f64), rng.normal({3, 5, 37}, DType::f64)});
  // Random rotary tables (nn::rope_tables repeats its halves, which would hide a kernel reading
  // the wrong half) and separate gammas for q and k (the same tensor would let a swap pass).
  const std::vector<Tensor> cos = {rng.normal({2, 16}, DType::f64),
                                   rng.normal({16, 16}, DType::f64),
                                   rng.normal({6, 16}, DType::f64)},
                            sin = {rng.normal({2, 16}, DType::f64),
                                   rng.normal({16, 16}, DType::f64),
                                   rng.normal({6, 16}, DType::f64)};
  const auto in_dtype = [](const Tensor& table, const Tensor& like) {
    return raw::to_dtype(table, like.dtype());
  };
  expect_agreement(
      "joint_attention",
      [&](const auto& in) {
        return joint_attention_fused({in[0], in[1]}, {in[2], in[3]}, {in[4], in[5]},
                                     {in_dtype(cos[0], in[0]), in_dtype(cos[1], in[0])},
                                     {in_dtype(sin[0], in[0]), in_dtype(sin[1], in[0])}, Tensor());
      },
      {rng.normal({3, 2, 3, 4, 16}, DType::f64), rng.normal({3, 16, 3, 4, 16}, DType::f64),
       rng.normal({16}, DType::f64), rng.normal({16}, DType::f64), rng.normal({16}, DType::f64),
       rng.normal({16}, DType::f64)});
  expect_agreement("qk_norm_rope",
                   [&](const auto& in) {
                     return qk_norm_rope(in[0], in[1], in[2], in_dtype(cos[2], in[0]),
                                         in_dtype(sin[2], in[0]));
                   },
                   {rng.normal({2, 6, 3, 4, 16}, DType::f64), rng.normal({16}, DType::f64),
                    rng.normal({16}, DType::f64)});
}

// Big enough for the kernels' parallel paths: two threads give what one gives, bit for bit.
// Whether OpenBLAS gives the same bits for an (m, k) x (k, n) product computed whole and as two
// blocks of rows, and as two blocks of columns (as matmul splits it across threads). Its AVX-512
// and SSE kernels do; its Haswell kernels, which it also runs on AMD Zen, do not: there an
// element's rounding depends on the size of the block it is computed in.
bool openblas_splits_exactly(int m, int n, int k) {
  Rng rng(11);
  const Tensor a = rng.normal({m, k}), b = rng.normal({k, n});
  const Tensor whole = zeros({m, n}), by_rows = zeros({m, n}), by_columns = zeros({m, n});
  const float *pa = a.data<float>(), *pb = b.data<float>();
  const auto gemm = [&](int rows, int cols, const float* x, const float* y, float* c) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, cols, k, 1.0f, x, k, y, n, 0.0f, c,
                n);
  };
  gemm(m, n, pa, pb, whole.data<float>());
  const int half_m = m / 2 / 16 * 16, half_n = n / 2 / 16 * 16;
  gemm(half_m, n, pa, pb, by_rows.data<float>());
  gemm(m - half_m, n, pa + half_m * k, pb, by_rows.data<float>() + half_m * n);
  gemm(m, half_n, pa, pb, by_columns.data<float>());
  gemm(m, n - half_n, pa, pb + half_n, by_columns.data<float>() + half_n);
  return max_abs_diff(whole, by_rows) == 0.0 && max_abs_diff(whole, by_columns) == 0.0;
}

TEST(Fused, ThreadCountDoesNotChangeResults) {
  Rng rng(7);
  const Tensor x = rng.normal({16, 64, 256}), shift = rng.normal({16, 1, 256}),
               scale = rng.normal({16, 1, 256}), gamma = rng.normal({256});
  auto run = [&] {
    Tape tape;
    tape.watch(x), tape.watch(shift), tape.watch(scale), tape.watch(gamma);
    const Tensor y = gated_residual(
        x, scale, swiglu(layer_norm_modulate(x, shift, scale), rms_norm_fused(x, gamma)));
    std::vector<Tensor> out = tape.gradient(sum(y), {x, shift, scale, gamma});
    out.push_back(y);
    return out;
  };
  // Joint attention: heads in parallel, the gammas' gradients summed over heads after.
  const std::vector<Tensor> qkv = {rng.normal({4, 6, 3, 4, 32}), rng.normal({4, 10, 3, 4, 32})};
  const std::vector<Tensor> gq = {rng.normal({32}), rng.normal({32})},
                            gk = {rng.normal({32}), rng.normal({32})};
  const nn::RopeTables t6 = nn::rope_tables(6, 32, DType::f32),
                       t10 = nn::rope_tables(10, 32, DType::f32);
  auto run_attention = [&] {
    Tape tape;
    for (const Tensor& x : {qkv[0], qkv[1], gq[0], gq[1], gk[0], gk[1]}) tape.watch(x);
    const Tensor y =
        joint_attention_fused(qkv, gq, gk, {t6.cos, t10.cos}, {t6.sin, t10.sin}, causal_mask(16));
    std::vector<Tensor> out =
        tape.gradient(sum(y * y), {qkv[0], qkv[1], gq[0], gq[1], gk[0], gk[1]});
    out.push_back(y);
    return out;
  };
  // The value and the gradients of sum(f(inputs) * dy) (the value last).
  const auto value_and_gradients = [](const std::function<Tensor(const std::vector<Tensor>&)>& f,
                                      const std::vector<Tensor>& inputs, const Tensor& dy) {
    Tape tape;
    for (const Tensor& x : inputs) tape.watch(x);
    const Tensor y = f(inputs);
    std::vector<Tensor> out = tape.gradient(sum(y * dy), inputs);
    out.push_back(y);
    return out;
  };
  // Packed attention on 70 tokens, blocked (per-thread scratch) and saving probabilities.
  const Tensor qkv70 = rng.normal({2, 70, 3, 2, 8}), dy70 = rng.normal({2, 70, 2, 8});
  const Tensor causal70 = causal_mask(70);
  const auto run_packed = [&](int64_t blocked_from) {
    return value_and_gradients(
        [&](const auto& in) { return attention_packed(in[0], causal70, blocked_from); }, {qkv70},
        dy70);
  };
  // One head of one example: the heads' loop has one task, and its products (64 x 64 x 64, past
  // the register-tile kernels) ran split across the threads (OpenBLAS's Haswell kernels round
  // the blocks otherwise than the whole).
  const Tensor qkv_one = rng.normal({1, 64, 3, 1, 64}), dy_one = rng.normal({1, 64, 1, 64});
  const auto run_one_head = [&] {
    return value_and_gradients([&](const auto& in) { return attention_packed(in[0], Tensor()); },
                               {qkv_one}, dy_one);
  };
  // qk_norm_rope: heads in parallel, the gammas' gradients summed over heads after; random
  // tables. 24 tokens: fewer would leave each of the 24 head tasks too small to split.
  const Tensor qkv6 = rng.normal({2, 24, 3, 4, 32}), dy6 = rng.normal({2, 24, 3, 4, 32});
  const Tensor gq6 = rng.normal({32}), gk6 = rng.normal({32});
  const Tensor cos6 = rng.normal({24, 32}), sin6 = rng.normal({24, 32});
  const auto run_qk = [&] {
    return value_and_gradients(
        [&](const auto& in) { return qk_norm_rope(in[0], in[1], in[2], cos6, sin6); },
        {qkv6, gq6, gk6}, dy6);
  };
  const Tensor x_rope = rng.normal({8, 64, 4, 32}), dy_rope = rng.normal({8, 64, 4, 32});
  const Tensor cos64 = rng.normal({64, 32}), sin64 = rng.normal({64, 32});
  const auto run_rope = [&] {
    return value_and_gradients([&](const auto& in) { return rope(in[0], cos64, sin64); }, {x_rope},
                               dy_rope);
  };
  // 520 x 512 outputs: enough for the bias rows, not just the product, to split.
  const Tensor x_lin = rng.normal({520, 256}), w_lin = rng.normal({512, 256}),
               b_lin = rng.normal({512}), dy_lin = rng.normal({520, 512});
  const auto run_linear = [&] {
    return value_and_gradients([](const auto& in) { return linear_fused(in[0], in[1], in[2]); },
                               {x_lin, w_lin, b_lin}, dy_lin);
  };
  const std::vector<std::pair<const char*, std::function<std::vector<Tensor>()>>> cases = {
      {"norms, swiglu and gated residual", run},
      {"joint attention", run_attention},
      {"attention_packed blocked from 1", [&] { return run_packed(1); }},
      {"attention_packed blocked from 512", [&] { return run_packed(512); }},
      {"attention_packed, one head", run_one_head},
      {"qk_norm_rope", run_qk},
      {"rope", run_rope},
      {"linear_fused", run_linear}};
  // Our kernels split at fixed boundaries, so one and two threads give the same bits. The
  // product's blocks are the sgemm library's. oneDNN's AVX-512 kernels (where it is the default)
  // round these shapes as the whole product
  // (TensorThreadCount.EverySgemmLibraryMatchesFloat64OnOneAndTwoThreads); OpenBLAS's give the
  // same bits only where its kernels are split-invariant; otherwise the two are equal to float32
  // rounding (4e-5 of values up to 80 with OpenBLAS's Haswell kernels).
  const bool exact_products = raw::sgemm_library() == raw::SgemmLibrary::onednn
                                  ? raw::default_sgemm_library() == raw::SgemmLibrary::onednn
                                  : openblas_splits_exactly(520, 512, 256);
  if (!exact_products)
    std::printf(
        "OpenBLAS core %s rounds a product's blocks differently from the whole: "
        "linear_fused checked to float32 rounding\n",
        openblas_core().c_str());
  const int threads = num_threads();
  for (const auto& [name, f] : cases) {
    set_num_threads(1);
    const std::vector<Tensor> one = f();
    set_num_threads(2);
    const std::vector<Tensor> two = f();
    set_num_threads(threads);
    ASSERT_EQ(one.size(), two.size()) << name;
    const bool rounding_allowed = !exact_products && std::string(name) == "linear_fused";
    for (size_t i = 0; i < one.size(); ++i) {
      const double tolerance =
          rounding_allowed ? 1e-6 * max_abs_diff(one[i], zeros_like(one[i])) : 0.0;
      EXPECT_LE(max_abs_diff(one[i], two[i]), tolerance)
          << name << ": " << (i + 1 == one.size() ? "value" : str_cat("gradient ", i));
    }
  }
}

TEST(Fused, BadShapesAreErrors) {
  Rng rng(8);
  const Tensor x = rng.normal({2, 3, 4});
  EXPECT_THROW(
      {
        try {
          layer_norm_modulate(x, rng.normal({3, 1, 4}), rng.normal({2, 1, 4}));
        } catch (const Error& e) {
          EXPECT_NE(std::string(e.what()).find("shift has shape (3,1,4)"), std::string::npos)
              << e.what();
          throw;
        }
      },
      Error);
  EXPECT_THAT(error_of([&] { rms_norm_fused(x, rng.normal({3})); }),
              HasSubstr("rms_norm: gamma has shape (3,) for input (2,3,4); expected (4,)"));
  EXPECT_THAT(error_of([&] {
                swiglu(x, rng.normal({2, 3, 5}));
              }),
              HasSubstr("swiglu: shapes (2,3,4) and (2,3,5) differ"));
  EXPECT_THAT(
      error_of([&] {
        swiglu(x, rng.normal({2, 3, 4}, DType::f64));
      }),
      HasSubstr("swiglu: inputs must share one float dtype, got float32 (a) and float64 (g)"));
  // A bool first input was named against itself ("bool (x) and bool (x)").
  EXPECT_THAT(error_of([&] {
                linear_fused(ones({1, 3}, DType::boolean), rng.normal({2, 3}));
              }),
              HasSubstr("linear: x is bool (1,3); expected float32 or float64"));
  EXPECT_THAT(error_of([&] {
                swiglu(Tensor(), rng.normal({2, 3}));
              }),
              HasSubstr("swiglu: a is an undefined tensor"));
  EXPECT_THAT(error_of([&] {
                gated_residual(x, rng.normal({2, 1, 4}), rng.normal({2, 4, 4}));
              }),
              HasSubstr("gated_residual: residual (2,3,4) and branch (2,4,4) differ"));
  EXPECT_THAT(error_of([&] {
                gated_residual(x, rng.normal({3, 1, 4}), rng.normal({2, 3, 4}));
              }),
              HasSubstr("gated_residual: gate has shape (3,1,4), which does not broadcast to "
                        "(2,1,4)"));
  EXPECT_THAT(error_of([&] {
                rope(x, rng.normal({3, 4}), rng.normal({3, 4}));
              }),
              HasSubstr("rope: input has shape (2,3,4); expected (B, S, H, d) with d even and "
                        "positive"));
  EXPECT_THAT(error_of([&] {
                rope(rng.normal({1, 2, 1, 3}), rng.normal({2, 3}), rng.normal({2, 3}));
              }),
              HasSubstr("rope: input has shape (1,2,1,3); expected (B, S, H, d) with d even and "
                        "positive"));
  EXPECT_THAT(error_of([&] {
                rope(rng.normal({2, 3, 1, 4}), rng.normal({5, 4}), rng.normal({3, 4}));
              }),
              HasSubstr("rope: tables have shapes (5,4) and (3,4); expected (3,4) for input "
                        "(2,3,1,4)"));
}

}  // namespace
}  // namespace mmdit
