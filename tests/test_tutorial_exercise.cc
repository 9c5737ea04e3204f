// The solution to the exercise of docs/autodiff.md: a new differentiable op, softplus, written
// outside the library the same way autodiff/ops.cc writes its ops (raw forward, then record()
// with the backward), and checked the way every op is checked. The tutorial quotes this file,
// so it is kept short and plain.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "autodiff/gradcheck.h"
#include "autodiff/ops.h"
#include "autodiff/tape.h"
#include "autodiff/value_and_grad.h"

namespace mmdit {
namespace tutorial {

// softplus(x) = log(1 + exp(x)), computed as max(x, 0) + log(1 + exp(-|x|)) so that exp never
// overflows: its argument is <= 0. The log term lies in (0, log 2], so the result is accurate to
// rounding in absolute terms for every x (there is no raw log1p kernel; see the doc).
Tensor softplus(const Tensor& x) {
  const Tensor zero = scalar(0, x.dtype());
  const Tensor neg_abs = raw::unary(raw::UnaryOp::neg, raw::unary(raw::UnaryOp::abs, x));
  const Tensor out = raw::add(
      raw::binary(raw::BinaryOp::maximum, x, zero),
      raw::unary(raw::UnaryOp::log, raw::add_scalar(raw::unary(raw::UnaryOp::exp, neg_abs), 1.0)));
  // Backward reads x (saved), not the output: d softplus / dx = sigmoid(x).
  return record("softplus", out, {x}, {x}, [](Backward& ctx) {
    ctx.input(0,
              [&] { return raw::mul(ctx.grad, raw::unary(raw::UnaryOp::sigmoid, ctx.saved[0])); });
  });
}

namespace {

TEST(TutorialExercise, SoftplusGradcheck) {
  // ±800 too: exp(800) overflows a double, so a naive log(1 + exp(x)) fails here.
  const Tensor x = from_vector<double>(
      {-800.0, -40.0, -5.0, -1.0, -0.3, 0.0, 0.2, 1.5, 4.0, 12.0, 50.0, 800.0}, {3, 4});
  const GradcheckResult r =
      gradcheck([](const std::vector<Tensor>& in) { return softplus(in[0]); }, {x});
  EXPECT_TRUE(r.ok) << r.report();
  EXPECT_EQ(r.checked, 12);
}

TEST(TutorialExercise, SoftplusMatchesLog1pExp) {
  const std::vector<double> xs = {-30.0, -3.0, -0.5, 0.0, 0.7, 4.0, 30.0};
  const std::vector<double> got = softplus(from_vector<double>(xs, {7})).to_vector<double>();
  for (size_t i = 0; i < xs.size(); ++i)
    EXPECT_NEAR(got[i], std::log1p(std::exp(xs[i])), 1e-14 * (1 + std::abs(xs[i]))) << xs[i];
  // Where std::log1p(std::exp(x)) is inf: softplus(800) = 800 + log1p(exp(-800)), and the
  // second term is below the smallest double, as is softplus(-800).
  EXPECT_EQ(softplus(from_vector<double>({800.0, -800.0}, {2})).to_vector<double>(),
            (std::vector<double>{800.0, 0.0}));
}

TEST(TutorialExercise, ValueAndGradThroughSoftplus) {
  NamedTensors params;
  params.insert("w", from_vector<double>({-2.0, 0.0, 3.0}, {3}));
  auto loss_fn = [](const NamedTensors& p) { return sum(softplus(p.at("w"))); };
  auto [loss, grads] = value_and_grad(loss_fn)(params);
  double expected_loss = 0;
  for (double w : {-2.0, 0.0, 3.0}) expected_loss += std::log1p(std::exp(w));
  EXPECT_NEAR(loss.to_vector<double>()[0], expected_loss, 1e-12);
  // d/dw sum(softplus(w)) = sigmoid(w), elementwise.
  const std::vector<double> g = grads.at("w").to_vector<double>();
  const std::vector<double> w = {-2.0, 0.0, 3.0};
  ASSERT_EQ(g.size(), 3u);
  for (size_t i = 0; i < g.size(); ++i) EXPECT_NEAR(g[i], 1 / (1 + std::exp(-w[i])), 1e-12);
}

}  // namespace
}  // namespace tutorial
}  // namespace mmdit
