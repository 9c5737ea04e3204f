// Every differentiable op of autodiff/ops.h against central differences in float64
// (mmdit::gradcheck with its default tolerances unless a case says otherwise): with
// broadcasting, on non-contiguous views, over every reduction axis, and for every transpose
// combination of matmul. One table, one named test per case.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "autodiff/gradcheck.h"
#include "autodiff/ops.h"
#include "autodiff/tape.h"
#include "tests/test_util.h"

namespace mmdit {
namespace {

using testing::HasSubstr;
using Inputs = std::vector<Tensor>;
using Fn = std::function<Tensor(const Inputs&)>;

// ---- inputs (float64, contiguous, from std::mt19937_64) ----

Tensor uniform(const Shape& shape, uint64_t seed, double lo = -1, double hi = 1) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> v(static_cast<size_t>(shape_numel(shape)));
  for (double& x : v) x = dist(gen);
  return from_vector(v, shape);
}

// |x| in [0.5, 2] with a random sign: away from the kinks and poles (abs, div).
Tensor away_from_zero(const Shape& shape, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(0.5, 2);
  std::vector<double> v(static_cast<size_t>(shape_numel(shape)));
  for (double& x : v) x = gen() % 2 ? dist(gen) : -dist(gen);
  return from_vector(v, shape);
}

// Distinct values on the grid offset + 0.3 k, shuffled: no two elements tie (max), and values
// from grids with offsets 0 and 0.15 are at least 0.15 apart (maximum, minimum), far more than
// gradcheck's step of 1e-6.
Tensor grid(const Shape& shape, uint64_t seed, double offset = 0) {
  const int64_t n = shape_numel(shape);
  std::vector<int64_t> k(static_cast<size_t>(n));
  std::iota(k.begin(), k.end(), 0);
  std::shuffle(k.begin(), k.end(), std::mt19937_64(seed));
  std::vector<double> v(k.size());
  for (size_t i = 0; i < k.size(); ++i) v[i] = offset + 0.3 * static_cast<double>(k[i] - n / 2);
  return from_vector(v, shape);
}

Tensor mask(const std::vector<bool>& m, const Shape& shape) {
  return from_vector(m, shape);
}

// ---- the table ----

struct Case {
  std::string name;  // the test name: letters, digits and '_'
  Fn f;
  Inputs inputs;
  GradcheckOptions options = {};
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.name;
}

std::string dims(const Shape& s) {
  if (s.empty()) return "scalar";
  std::string r;
  for (size_t i = 0; i < s.size(); ++i) r += str_cat(i ? "x" : "", s[i]);
  return r;
}

std::string axes_name(const std::vector<int64_t>& axes) {
  if (axes.empty()) return "all";
  std::string r = "axis";
  for (int64_t a : axes) r += a < 0 ? str_cat("m", -a) : str_cat(a);
  return r;
}

// Input makers per op: the domain each op is differentiable on.
using Maker = std::function<Tensor(const Shape&, uint64_t)>;
Tensor any_values(const Shape& s, uint64_t seed) {
  return uniform(s, seed, -2, 2);
}
Tensor positive(const Shape& s, uint64_t seed) {
  return uniform(s, seed, 0.5, 3);
}

struct BinaryOp {
  const char* name;
  Tensor (*op)(const Tensor&, const Tensor&);
  Maker a, b;
};

struct UnaryOp {
  std::string name;
  std::function<Tensor(const Tensor&)> op;
  Maker make;
};

void add_binary_cases(std::vector<Case>& cases) {
  const Maker lo_grid = [](const Shape& s, uint64_t seed) { return grid(s, seed, 0); };
  const Maker hi_grid = [](const Shape& s, uint64_t seed) { return grid(s, seed, 0.15); };
  const BinaryOp ops[] = {
      {"add", add, any_values, any_values},   {"sub", sub, any_values, any_values},
      {"mul", mul, any_values, any_values},   {"div", div, any_values, away_from_zero},
      {"maximum", maximum, lo_grid, hi_grid}, {"minimum", minimum, lo_grid, hi_grid},
  };
  const std::pair<Shape, Shape> shapes[] = {
      {{2, 3}, {2, 3}}, {{3, 1}, {1, 4}}, {{2, 3, 4}, {4}},
      {{4}, {2, 3, 4}}, {{2, 3}, {}},     {{2, 1, 4}, {3, 1}},
  };
  uint64_t seed = 1000;
  for (const BinaryOp& op : ops) {
    for (const auto& [sa, sb] : shapes) {
      cases.push_back({str_cat(op.name, "_", dims(sa), "_with_", dims(sb)),
                       [f = op.op](const Inputs& x) { return f(x[0], x[1]); },
                       {op.a(sa, seed), op.b(sb, seed + 1)}});
      seed += 2;
    }
    // Non-contiguous operands: a transposed view with a stepped slice, both inside f.
    cases.push_back(
        {str_cat(op.name, "_transposed_with_stepped_slice"),
         [f = op.op](const Inputs& x) { return f(transpose(x[0], 0, 1), slice(x[1], 1, 1, 8, 2)); },
         {op.a({4, 3}, seed), op.b({3, 8}, seed + 1)}});
    // ...and a stepped slice broadcast against a transposed view.
    cases.push_back(
        {str_cat(op.name, "_stepped_slice_broadcast_with_transposed"),
         [f = op.op](const Inputs& x) { return f(slice(x[0], 0, 0, 6, 2), transpose(x[1], 0, 1)); },
         {op.a({6, 1}, seed + 2), op.b({4, 3}, seed + 3)}});
    seed += 4;
  }
}

void add_unary_cases(std::vector<Case>& cases) {
  std::vector<UnaryOp> ops = {
      {"neg", neg, any_values},
      {"exp", exp, any_values},
      {"log", log, positive},
      {"sqrt", sqrt, positive},
      {"rsqrt", rsqrt, positive},
      {"square", square, any_values},
      {"abs", abs, away_from_zero},
      {"tanh", tanh, any_values},
      {"sigmoid", sigmoid, any_values},
      {"silu", silu, any_values},
      {"sin", sin, any_values},
      {"cos", cos, any_values},
      {"add_scalar", [](const Tensor& x) { return add_scalar(x, 1.75); }, any_values},
      {"mul_scalar", [](const Tensor& x) { return mul_scalar(x, -2.5); }, any_values},
  };
  // pow through both of its paths (std::pow, and x * x for p = 2), and the exponents that once
  // took sqrt and rsqrt.
  for (const auto& [exponent, name] : std::vector<std::pair<double, std::string>>{
           {3.0, "3"}, {2.5, "2p5"}, {2.0, "2"}, {0.5, "0p5"}, {-0.5, "m0p5"}, {-1.5, "m1p5"}})
    ops.push_back({"pow_" + name, [p = exponent](const Tensor& x) { return pow(x, p); }, positive});

  uint64_t seed = 2000;
  for (const UnaryOp& op : ops) {
    cases.push_back(
        {op.name, [f = op.op](const Inputs& x) { return f(x[0]); }, {op.make({2, 3, 4}, seed)}});
    cases.push_back({op.name + "_transposed",
                     [f = op.op](const Inputs& x) { return f(transpose(x[0], 0, 1)); },
                     {op.make({4, 3}, seed + 1)}});
    cases.push_back({op.name + "_stepped_slice",
                     [f = op.op](const Inputs& x) { return f(slice(x[0], 1, 0, 7, 3)); },
                     {op.make({2, 7}, seed + 2)}});
    seed += 3;
  }
  // where: gradients for a and b, with cond, a and b broadcast against each other.
  cases.push_back({"where",
                   [](const Inputs& x) { return where(x[0], x[1], x[2]); },
                   {mask({true, false, false, true, true, false}, {2, 3}), uniform({2, 3}, 2100),
                    uniform({2, 3}, 2101)}});
  cases.push_back({"where_broadcast_3x1_1x4_scalar",
                   [](const Inputs& x) { return where(x[0], x[1], x[2]); },
                   {mask({true, false, true}, {3, 1}), uniform({1, 4}, 2102), uniform({}, 2103)}});
  cases.push_back(
      {"where_transposed_operands",
       [](const Inputs& x) { return where(x[0], transpose(x[1], 0, 1), slice(x[2], 1, 0, 6, 2)); },
       {mask({true, false, true, true, false, false}, {2, 3}), uniform({3, 2}, 2104),
        uniform({2, 6}, 2105)}});
}

void add_reduction_cases(std::vector<Case>& cases) {
  using Reduce = Tensor (*)(const Tensor&, std::vector<int64_t>, bool);
  const std::pair<const char*, Reduce> ops[] = {
      {"sum", sum}, {"mean", mean}, {"max", max}, {"var", var}};
  const std::vector<std::vector<int64_t>> axis_sets = {{0},    {1},    {2},    {-1},
                                                       {0, 2}, {1, 2}, {0, 1}, {}};
  uint64_t seed = 3000;
  for (const auto& [name, reduce] : ops) {
    const Reduce op =
        reduce;  // a copy the lambdas can capture (Clang < 16 cannot capture a binding)
    for (const auto& axes : axis_sets) {
      for (bool keepdims : {false, true}) {
        cases.push_back({str_cat(name, "_", axes_name(axes), keepdims ? "_keepdims" : ""),
                         [op, axes, keepdims](const Inputs& x) { return op(x[0], axes, keepdims); },
                         {grid({2, 3, 4}, seed++)}});
      }
    }
    // Over a permuted (non-contiguous) view.
    cases.push_back({str_cat(name, "_permuted_axis1"),
                     [op](const Inputs& x) {
                       return op(permute(x[0], {2, 0, 1}), {1}, false);
                     },
                     {grid({2, 3, 4}, seed++)}});
  }
  for (const char* name : {"softmax", "log_softmax"}) {
    const bool log = std::string(name) == "log_softmax";
    for (int64_t axis : {0, 1, 2, -1}) {
      cases.push_back({str_cat(name, "_axis", axis < 0 ? "m1" : std::to_string(axis)),
                       [log, axis](const Inputs& x) {
                         return log ? log_softmax(x[0], axis) : softmax(x[0], axis);
                       },
                       {uniform({2, 3, 4}, seed++, -2, 2)}});
    }
    cases.push_back({str_cat(name, "_transposed"),
                     [log](const Inputs& x) {
                       const Tensor t = transpose(x[0], 0, 1);
                       return log ? log_softmax(t, -1) : softmax(t, -1);
                     },
                     {uniform({4, 3}, seed++, -2, 2)}});
  }
}

// x[i] as a matmul operand of `shape`; transposed: stored with the last two dims swapped and
// transposed inside f.
Tensor mm_input(const Shape& shape, bool transposed, uint64_t seed) {
  Shape s = shape;
  if (transposed) std::swap(s[s.size() - 1], s[s.size() - 2]);
  return uniform(s, seed);
}

void add_matmul_cases(std::vector<Case>& cases) {
  const std::pair<Shape, Shape> shapes[] = {
      {{3, 4}, {4, 5}},       {{2, 3, 4}, {4, 5}},
      {{3, 4}, {2, 4, 5}},    {{2, 1, 3, 4}, {1, 2, 4, 5}},
      {{2, 3, 4}, {2, 4, 5}}, {{1, 4}, {4, 1}},
  };
  uint64_t seed = 4000;
  for (const auto& [sa, sb] : shapes) {
    for (bool ta : {false, true}) {
      for (bool tb : {false, true}) {
        cases.push_back({str_cat("matmul_", dims(sa), ta ? "T" : "", "_", dims(sb), tb ? "T" : ""),
                         [ta, tb](const Inputs& x) {
                           return matmul(ta ? transpose(x[0], -1, -2) : x[0],
                                         tb ? transpose(x[1], -1, -2) : x[1]);
                         },
                         {mm_input(sa, ta, seed), mm_input(sb, tb, seed + 1)}});
        seed += 2;
      }
    }
  }
  cases.push_back(
      {"matmul_stepped_slice_operands",
       [](const Inputs& x) { return matmul(slice(x[0], 1, 0, 8, 2), slice(x[1], 0, 1, 8, 2)); },
       {uniform({3, 8}, seed), uniform({8, 5}, seed + 1)}});
  cases.push_back({"matmul_same_tensor_twice",
                   [](const Inputs& x) { return matmul(x[0], transpose(x[0], 0, 1)); },
                   {uniform({3, 4}, seed + 2)}});
  // An attention-like composite: softmax(q k^T / 2) v.
  cases.push_back(
      {"attention_composite",
       [](const Inputs& x) {
         return matmul(softmax(matmul(x[0], transpose(x[1], -1, -2)) / 2.0, -1), x[2]);
       },
       {uniform({2, 3, 4}, seed + 3), uniform({2, 5, 4}, seed + 4), uniform({2, 5, 2}, seed + 5)}});
}

void add_view_cases(std::vector<Case>& cases) {
  auto one = [&](std::string name, std::function<Tensor(const Tensor&)> f, Tensor in) {
    cases.push_back({std::move(name), [f](const Inputs& x) { return f(x[0]); }, {std::move(in)}});
  };
  uint64_t seed = 5000;
  auto u = [&](const Shape& s) { return uniform(s, seed++); };
  one(
      "reshape",
      [](const Tensor& x) {
        return reshape(x, {6, 4});
      },
      u({2, 3, 4}));
  one(
      "reshape_minus_one",
      [](const Tensor& x) {
        return reshape(x, {4, -1});
      },
      u({2, 3, 4}));
  one(
      "reshape_of_transposed", [](const Tensor& x) { return reshape(transpose(x, 0, 1), {-1}); },
      u({2, 3}));
  one(
      "reshape_of_stepped_slice",
      [](const Tensor& x) {
        return reshape(slice(x, 0, 0, 4, 2), {3, 2});
      },
      u({4, 3}));
  one(
      "permute",
      [](const Tensor& x) {
        return permute(x, {2, 0, 1});
      },
      u({2, 3, 4}));
  one(
      "permute_negative_axes",
      [](const Tensor& x) {
        return permute(x, {-1, -3, -2});
      },
      u({2, 3, 4}));
  one(
      "transpose", [](const Tensor& x) { return transpose(x, 0, 2); }, u({2, 3, 4}));
  one(
      "transpose_negative_axes", [](const Tensor& x) { return transpose(x, -1, -2); },
      u({2, 3, 4}));
  one(
      "slice_step2", [](const Tensor& x) { return slice(x, 1, 1, 7, 2); }, u({2, 7, 3}));
  one(
      "slice_negative_indices", [](const Tensor& x) { return slice(x, -1, -3, -1); }, u({2, 3, 5}));
  one(
      "slice_step3_of_transposed",
      [](const Tensor& x) { return slice(transpose(x, 0, 1), 0, 0, 7, 3); }, u({2, 7}));
  one(
      "narrow", [](const Tensor& x) { return narrow(x, 1, 1, 2); }, u({2, 4, 3}));
  one(
      "squeeze", [](const Tensor& x) { return squeeze(x, 1); }, u({2, 1, 3}));
  one(
      "squeeze_negative_axis", [](const Tensor& x) { return squeeze(x, -1); }, u({3, 1}));
  one(
      "unsqueeze_front", [](const Tensor& x) { return unsqueeze(x, 0); }, u({2, 3}));
  one(
      "unsqueeze_back", [](const Tensor& x) { return unsqueeze(x, -1); }, u({2, 3}));
  one(
      "unsqueeze_of_transposed", [](const Tensor& x) { return unsqueeze(transpose(x, 0, 1), 1); },
      u({2, 3}));
  one(
      "broadcast_to_3x1_to_2x3x4",
      [](const Tensor& x) {
        return broadcast_to(x, {2, 3, 4});
      },
      u({3, 1}));
  one(
      "broadcast_to_4_to_3x4",
      [](const Tensor& x) {
        return broadcast_to(x, {3, 4});
      },
      u({4}));
  one(
      "contiguous", [](const Tensor& x) { return contiguous(x); }, u({2, 3}));
  one(
      "contiguous_of_transposed", [](const Tensor& x) { return contiguous(transpose(x, 0, 1)); },
      u({2, 3}));
  one(
      "to_dtype_f64_to_f64", [](const Tensor& x) { return to_dtype(x, DType::f64); }, u({2, 3}));
  {
    // Through float32 and back: the forward rounds to float32 (relative error 6e-8), which at the
    // default step of 1e-6 would swamp the central difference. A step of 1e-3 keeps the rounding
    // error of the difference near 6e-8 / 1e-3 = 6e-5, hence atol/rtol of 1e-3; the analytic
    // gradient (the cotangent rounded through float32) is within 1e-7 relative.
    GradcheckOptions loose;
    loose.eps = 1e-3;
    loose.atol = 1e-3;
    loose.rtol = 1e-3;
    cases.push_back(
        {"to_dtype_f64_f32_f64_round_trip",
         [](const Inputs& x) { return to_dtype(to_dtype(x[0], DType::f32), DType::f64); },
         {u({2, 3})},
         loose});
  }
  cases.push_back({"concat_axis0_three_parts",
                   [](const Inputs& x) {
                     return concat({x[0], x[1], x[2]}, 0);
                   },
                   {u({1, 3}), u({2, 3}), u({3, 3})}});
  cases.push_back({"concat_axis1_with_transposed_part",
                   [](const Inputs& x) {
                     return concat({x[0], transpose(x[1], 0, 1)}, 1);
                   },
                   {u({2, 3}), u({4, 2})}});
  cases.push_back({"concat_negative_axis_same_tensor_twice",
                   [](const Inputs& x) {
                     return concat({x[0], x[0]}, -1);
                   },
                   {u({2, 3})}});
  cases.push_back({"split_axis1_uneven",
                   [](const Inputs& x) {
                     std::vector<Tensor> p = split(x[0], {1, 3, 2}, 1);
                     // Each part weighted differently, so a misrouted gradient shows.
                     return concat({mul_scalar(p[2], 2.0), p[0], square(p[1])}, 1);
                   },
                   {u({2, 6})}});
  cases.push_back({"split_axis0_of_transposed",
                   [](const Inputs& x) {
                     std::vector<Tensor> p = split(transpose(x[0], 0, 1), {2, 1}, 0);
                     return p[0] * 3.0 + sum(p[1]);
                   },
                   {u({2, 3})}});
  for (int64_t axis : {0, 1, -1}) {
    cases.push_back({str_cat("stack_axis", axis < 0 ? "m1" : std::to_string(axis)),
                     [axis](const Inputs& x) {
                       return stack({x[0], x[1], x[2]}, axis);
                     },
                     {u({2, 3}), u({2, 3}), u({2, 3})}});
  }
}

void add_operator_cases(std::vector<Case>& cases) {
  uint64_t seed = 6000;
  auto two = [&](std::string name, Fn f, const Shape& sa, const Shape& sb) {
    cases.push_back(
        {std::move(name), std::move(f), {uniform(sa, seed), away_from_zero(sb, seed + 1)}});
    seed += 2;
  };
  two("operator_plus", [](const Inputs& x) { return x[0] + x[1]; }, {3, 1}, {1, 4});
  two("operator_minus", [](const Inputs& x) { return x[0] - x[1]; }, {2, 3, 4}, {4});
  two("operator_times", [](const Inputs& x) { return x[0] * x[1]; }, {3, 1}, {1, 4});
  two("operator_divide", [](const Inputs& x) { return x[0] / x[1]; }, {2, 3, 4}, {4});
  two("operator_chain", [](const Inputs& x) { return (x[0] * x[1] - x[0]) / (x[1] + x[1]); },
      {2, 3}, {2, 3});
  auto one = [&](std::string name, Fn f) {
    cases.push_back({std::move(name), std::move(f), {uniform({2, 3}, seed++)}});
  };
  one("operator_tensor_plus_scalar", [](const Inputs& x) { return x[0] + 2.5; });
  one("operator_scalar_plus_tensor", [](const Inputs& x) { return 2.5 + x[0]; });
  one("operator_tensor_minus_scalar", [](const Inputs& x) { return x[0] - 1.5; });
  one("operator_scalar_minus_tensor", [](const Inputs& x) { return 1.5 - x[0]; });
  one("operator_tensor_times_scalar", [](const Inputs& x) { return x[0] * 3.0; });
  one("operator_scalar_times_tensor", [](const Inputs& x) { return -3.0 * x[0]; });
  one("operator_tensor_divided_by_scalar", [](const Inputs& x) { return x[0] / 4.0; });
  one("operator_unary_minus", [](const Inputs& x) { return -x[0]; });
  one("operator_unary_minus_of_transposed", [](const Inputs& x) { return -transpose(x[0], 0, 1); });
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  add_binary_cases(cases);
  add_unary_cases(cases);
  add_reduction_cases(cases);
  add_matmul_cases(cases);
  add_view_cases(cases);
  add_operator_cases(cases);
  return cases;
}

class Gradcheck : public testing::TestWithParam<Case> {};

TEST_P(Gradcheck, MatchesCentralDifferences) {
  const Case& c = GetParam();
  int64_t elements = 0;
  for (const Tensor& t : c.inputs)
    if (is_floating(t.dtype())) elements += t.numel();
  const GradcheckResult result = gradcheck(c.f, c.inputs, c.options);
  EXPECT_TRUE(result.ok) << c.name << ": " << result.report();
  EXPECT_EQ(result.checked, elements) << result.report();
}

INSTANTIATE_TEST_SUITE_P(Ops, Gradcheck, testing::ValuesIn(all_cases()),
                         [](const testing::TestParamInfo<Case>& info) { return info.param.name; });

// The float32 kernels (vectorised, with their own remainder loops) have backward paths of their
// own: every case's float32 gradients agree with its float64 ones, which central differences
// checked above, to float32 rounding.
class Float32Gradients : public testing::TestWithParam<Case> {};

TEST_P(Float32Gradients, AgreeWithFloat64) {
  const Case& c = GetParam();
  const auto gradients = [&](DType dtype) {
    Inputs inputs;
    for (const Tensor& t : c.inputs)
      inputs.push_back(is_floating(t.dtype()) ? raw::to_dtype(t, dtype) : t);
    Tape tape;
    Inputs wrt;
    for (const Tensor& t : inputs)
      if (is_floating(t.dtype())) {
        tape.watch(t);
        wrt.push_back(t);
      }
    const Tensor y = c.f(inputs);
    Rng rng(7);
    return tape.gradient(y, wrt, raw::to_dtype(rng.normal(y.shape(), DType::f64), y.dtype()));
  };
  const std::vector<Tensor> g64 = gradients(DType::f64), g32 = gradients(DType::f32);
  ASSERT_EQ(g32.size(), g64.size());
  for (size_t i = 0; i < g64.size(); ++i) {
    EXPECT_EQ(g32[i].dtype(), DType::f32);
    const double scale =
        g64[i].numel() ? raw::max(raw::unary(raw::UnaryOp::abs, g64[i])).item() : 0;
    EXPECT_LE(test::max_abs_diff(raw::to_dtype(g32[i], DType::f64), g64[i]), 1e-5 * (1 + scale))
        << c.name << ", input " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Ops, Float32Gradients, testing::ValuesIn(all_cases()),
                         [](const testing::TestParamInfo<Case>& info) { return info.param.name; });

// ---- beyond the table ----

// max shares the gradient equally between tied maxima (the documented rule; central
// differences are undefined at a tie, so the analytic value is checked directly).
TEST(GradcheckOps, MaxSplitsTheGradientBetweenTies) {
  Tensor x = from_vector(std::vector<double>{1, 3, 3, 2, 5, 0, 5, 5}, {2, 4});
  Tape tape;
  tape.watch(x);
  Tensor y = sum(max(x, {1}));
  const std::vector<double> g = tape.gradient(y, {x})[0].to_vector<double>();
  EXPECT_EQ(g, (std::vector<double>{0, 0.5, 0.5, 0, 1.0 / 3, 0, 1.0 / 3, 1.0 / 3}));
}

// maximum and minimum send the gradient of a tie to a.
TEST(GradcheckOps, MaximumAndMinimumTiesGoToTheFirstOperand) {
  Tensor a = from_vector(std::vector<double>{1, 2, 3}, {3});
  Tensor b = from_vector(std::vector<double>{1, 0, 4}, {3});
  for (bool is_max : {true, false}) {
    Tape tape;
    tape.watch(a);
    tape.watch(b);
    Tensor y = sum(is_max ? maximum(a, b) : minimum(a, b));
    const std::vector<Tensor> g = tape.gradient(y, {a, b});
    EXPECT_EQ(g[0].to_vector<double>(),
              is_max ? std::vector<double>({1, 1, 0}) : std::vector<double>({1, 0, 1}));
    EXPECT_EQ(g[1].to_vector<double>(),
              is_max ? std::vector<double>({0, 0, 1}) : std::vector<double>({0, 1, 0}));
  }
}

// x^0 is 1 everywhere, x = 0 included (std::pow(0, 0) = 1), so its gradient is 0 everywhere, as
// JAX and PyTorch give. The backward p x^(p-1) made it 0 * 0^-1 = NaN at x = 0. Central
// differences at 0 agree (both sides are 1), so gradcheck checks it too.
TEST(GradcheckOps, PowOfZeroHasZeroGradientAtZero) {
  for (DType t : {DType::f32, DType::f64}) {
    SCOPED_TRACE(dtype_name(t));
    Tensor x = from_vector(std::vector<double>{0, -0.0, 2, -3}, {4}, t);
    Tape tape;
    tape.watch(x);
    Tensor y = pow(x, 0.0);
    EXPECT_EQ(y.to_vector<double>(), (std::vector<double>{1, 1, 1, 1}));
    const std::vector<double> g = tape.gradient(sum(y), {x})[0].to_vector<double>();
    EXPECT_EQ(g, (std::vector<double>{0, 0, 0, 0}));
  }
  const GradcheckResult r = gradcheck([](const std::vector<Tensor>& x) { return pow(x[0], 0.0); },
                                      {from_vector(std::vector<double>{0, 0.5}, {2})});
  EXPECT_TRUE(r.ok) << r.report();
}

// square with a deliberately wrong backward: correct everywhere except element (1,2) of the
// input, whose gradient is off by 1.
Tensor bad_square(const Tensor& x) {
  return record("bad_square", raw::unary(raw::UnaryOp::square, x), {x}, {x}, [](Backward& ctx) {
    ctx.input(0, [&] {
      Tensor g = raw::mul_scalar(raw::mul(ctx.grad, ctx.saved[0]), 2.0);
      Tensor bump = zeros(g.shape(), g.dtype());
      bump.data<double>()[1 * 3 + 2] = 1.0;
      return raw::add(g, bump);
    });
  });
}

TEST(GradcheckOps, DetectsAWrongBackward) {
  const Tensor x = uniform({2, 3}, 7000);
  const GradcheckResult bad =
      gradcheck([](const Inputs& in) { return bad_square(in[0]); }, Inputs{x});
  EXPECT_FALSE(bad.ok) << bad.report();
  EXPECT_EQ(bad.checked, 6);
  EXPECT_EQ(bad.name, "input0");
  EXPECT_EQ(bad.index, (Shape{1, 2}));
  EXPECT_NEAR(bad.analytic - bad.numeric, 1.0, 1e-6);
  EXPECT_GT(bad.worst_ratio, 1e3);
  EXPECT_NE(bad.report().find("FAILED"), std::string::npos) << bad.report();
  EXPECT_NE(bad.report().find("input0(1,2)"), std::string::npos) << bad.report();

  // The same function with the correct backward passes: the failure above is the bump.
  const GradcheckResult good = gradcheck([](const Inputs& in) { return square(in[0]); }, Inputs{x});
  EXPECT_TRUE(good.ok) << good.report();
  EXPECT_NE(good.report().find("ok"), std::string::npos);
}

// An f that reads the caller's tensor instead of its argument (the copies under check) was
// checked vacuously: every derivative 0 = 0, "ok" whatever the backward did.
TEST(GradcheckOps, RefusesAnOutputNotComputedFromTheCheckedTensors) {
  const Tensor x = uniform({2, 3}, 7001);
  EXPECT_THAT([&] { gradcheck([&](const Inputs&) { return bad_square(x); }, Inputs{x}); },
              testing::ThrowsMessage<Error>(
                  HasSubstr("gradcheck: f's output was not computed from the checked tensors "
                            "(input0), so every derivative would be 0 = 0")));
}

TEST(GradcheckOps, DetectsAMissingFactorInEveryElement) {
  // A backward that forgets the factor 2 of d(x^2): every element is wrong by half.
  auto half_square = [](const Inputs& in) {
    const Tensor& x = in[0];
    return record("half_square", raw::unary(raw::UnaryOp::square, x), {x}, {x}, [](Backward& ctx) {
      ctx.input(0, [&] { return raw::mul(ctx.grad, ctx.saved[0]); });
    });
  };
  const GradcheckResult r = gradcheck(half_square, Inputs{uniform({4}, 7001, 0.5, 1)});
  EXPECT_FALSE(r.ok);
  EXPECT_NEAR(r.analytic, r.numeric / 2, 1e-6) << r.report();
}

// exp overflows at x + eps: the numeric derivative is inf, its tolerance inf, and the NaN ratio
// compared false, so this passed with "analytic 0, numeric 0" as the worst element.
TEST(GradcheckOps, AnInfiniteDerivativeFails) {
  const Tensor x = from_vector({709.782712893384, 0.5}, {2}, DType::f64);
  const GradcheckResult r = gradcheck([](const Inputs& in) { return exp(in[0]); }, Inputs{x});
  EXPECT_FALSE(r.ok) << r.report();
  EXPECT_EQ(r.index, (Shape{0}));
  EXPECT_TRUE(std::isinf(r.numeric)) << r.report();
  EXPECT_GT(std::abs(r.analytic), 1e307) << r.report();
}

// The checked tensors are the caller's (a model's parameters): an f that throws on a perturbed
// value must leave them as they were.
TEST(GradcheckOps, AThrowingFunctionLeavesTheTensorsAsTheyWere) {
  NamedTensors wrt;
  wrt.insert("w", from_vector({1.0, 2.0}, {2}, DType::f64));
  int calls = 0;
  const auto f = [&] {
    if (++calls == 3) fail("f failed");  // at w - eps, after the tape's and w + eps's
    return wrt.at("w") * wrt.at("w");
  };
  EXPECT_THAT(test::error_of([&] { gradcheck(f, wrt); }), HasSubstr("f failed"));
  EXPECT_EQ(wrt.at("w").to_vector<double>(), (std::vector<double>{1.0, 2.0}));
}

TEST(GradcheckOps, SampledElementsAndNamedTensors) {
  // The NamedTensors form, checking a random sample of 5 elements of each tensor.
  NamedTensors wrt;
  wrt.insert("w", uniform({4, 6}, 7002));
  wrt.insert("b", uniform({6}, 7003));
  const Tensor x = uniform({3, 4}, 7004);
  GradcheckOptions options;
  options.sample = 5;
  const GradcheckResult r =
      gradcheck([&] { return tanh(matmul(x, wrt.at("w")) + wrt.at("b")); }, wrt, options);
  EXPECT_TRUE(r.ok) << r.report();
  EXPECT_EQ(r.checked, 10);
}

// An identity whose backward doubles its incoming gradient in place. At f's output that gradient
// was the cotangent itself, which the central differences then used too: derivative 2 "ok".
TEST(GradcheckOps, ABackwardThatWritesIntoItsIncomingGradientIsCaught) {
  const auto doubling_identity = [](const Inputs& in) {
    const Tensor& x = in[0];
    return record("doubling_identity", raw::clone(x), {x}, {}, [](Backward& ctx) {
      raw::add_into(ctx.grad, ctx.grad);
      ctx.input(0, [&] { return ctx.grad; });
    });
  };
  EXPECT_THAT(test::error_of([&] { gradcheck(doubling_identity, Inputs{uniform({3}, 7006)}); }),
              HasSubstr("gradient: the backward of doubling_identity (node 0, recorded in scope "
                        "'<root>') changed its incoming gradient (ctx.grad) in place"));
  // Written through data<T>(), which the tape cannot see: gradcheck's own cotangent is a copy, so
  // the doubled derivative is compared with the true one and fails.
  const auto doubling_unseen = [](const Inputs& in) {
    const Tensor& x = in[0];
    return record("doubling_unseen", raw::clone(x), {x}, {}, [](Backward& ctx) {
      double* g = ctx.grad.data<double>();
      for (int64_t i = 0; i < ctx.grad.numel(); ++i) g[i] *= 2;
      ctx.input(0, [&] { return ctx.grad; });
    });
  };
  const GradcheckResult r = gradcheck(doubling_unseen, Inputs{uniform({3}, 7006)});
  EXPECT_FALSE(r.ok) << r.report();
  EXPECT_NEAR(r.analytic, 2 * r.numeric, 1e-6) << r.report();
}

TEST(GradcheckOps, MessagesNameWhatIsWrong) {
  const Tensor x = uniform({4, 3}, 7007);
  EXPECT_THAT(test::error_of([&] { gradcheck([](const Inputs&) { return Tensor(); }, Inputs{x}); }),
              HasSubstr("gradcheck: f returned an undefined tensor"));
  EXPECT_THAT(test::error_of([&] {
                gradcheck([](const Inputs& in) { return to_dtype(in[0], DType::boolean); },
                          Inputs{x});
              }),
              HasSubstr("gradcheck: f must return float64, got bool (4,3)"));
  const Tensor flags = to_dtype(x, DType::boolean);
  EXPECT_THAT(test::error_of([&] {
                gradcheck([](const Inputs& in) { return to_dtype(in[0], DType::f64); },
                          Inputs{flags});
              }),
              HasSubstr("gradcheck: none of the 1 inputs is a float tensor"));
  NamedTensors transposed;
  transposed.insert("w", raw::transpose(x, 0, 1));
  EXPECT_THAT(
      test::error_of([&] { gradcheck([&] { return square(transposed.at("w")); }, transposed); }),
      HasSubstr("gradcheck: 'w' (3,4) is not contiguous"));
  NamedTensors overlapping;
  overlapping.insert("w", x);
  overlapping.insert("row", raw::slice(x, 0, 1, 2));
  EXPECT_THAT(test::error_of([&] {
                gradcheck([&] { return square(overlapping.at("row")) * overlapping.at("w"); },
                          overlapping);
              }),
              HasSubstr("gradcheck: 'row' and 'w' overlap in memory"));
  // Two halves of one buffer (parameters sliced from one fused weight) do not overlap.
  const Tensor buffer = uniform({6}, 7010);
  NamedTensors halves;
  halves.insert("a", raw::narrow(buffer, 0, 0, 3));
  halves.insert("b", raw::narrow(buffer, 0, 3, 3));
  const GradcheckResult r = gradcheck([&] { return halves.at("a") * sin(halves.at("b")); }, halves);
  EXPECT_TRUE(r.ok) << r.report();
  EXPECT_EQ(r.checked, 6);
}

// Elements whose derivatives are 0 on both sides pass whatever the backward does: the report
// says how many of the checked ones they are.
TEST(GradcheckOps, TheReportCountsElementsThatAreZeroOnBothSides) {
  NamedTensors wrt;
  wrt.insert("used", uniform({3}, 7008));
  wrt.insert("unused", uniform({2}, 7009));
  const GradcheckResult r = gradcheck([&] { return square(wrt.at("used")); }, wrt);
  EXPECT_TRUE(r.ok) << r.report();
  EXPECT_EQ(r.zero, 2);
  EXPECT_THAT(r.report(), HasSubstr("ok: 5 elements checked (2 of them 0 on both sides"));
}

// Options under which any gradient would pass (negative tolerances made every ratio negative;
// no sampled element checked nothing) are refused, naming the option.
TEST(GradcheckOps, RefusesOptionsThatCannotFail) {
  NamedTensors wrt;
  wrt.insert("w", uniform({4}, 7005));
  const auto f = [&] { return wrt.at("w") * wrt.at("w"); };
  const auto error_with = [&](auto&& set) {
    GradcheckOptions options;
    set(options);
    return test::error_of([&] { gradcheck(f, wrt, options); });
  };
  EXPECT_THAT(error_with([](GradcheckOptions& o) { o.atol = -1, o.rtol = -1; }),
              HasSubstr("atol and rtol must be finite and >= 0, not both 0; got atol -1, rtol -1"));
  EXPECT_THAT(error_with([](GradcheckOptions& o) { o.atol = 0, o.rtol = 0; }),
              HasSubstr("not both 0"));
  EXPECT_THAT(error_with([](GradcheckOptions& o) { o.eps = 0; }),
              HasSubstr("the step eps must be a positive number, got 0"));
  EXPECT_THAT(error_with([](GradcheckOptions& o) { o.sample = 0; }),
              HasSubstr("sample must be -1 (every element) or at least 1, got 0"));
  // atol 0 with rtol > 0 is a strict but meaningful check.
  EXPECT_EQ(error_with([](GradcheckOptions& o) { o.atol = 0; }), "(no mmdit::Error thrown)");
  // Nothing to check is refused before f runs.
  bool ran = false;
  EXPECT_EQ(test::error_of(
                [&] { gradcheck([&] { return ran = true, wrt.at("w") * 2.0; }, NamedTensors()); }),
            "gradcheck: no tensors to check");
  EXPECT_FALSE(ran);
}

}  // namespace
}  // namespace mmdit
