// Edge cases of the public APIs below the models: zero-size dimensions, scalars, element counts
// that overflow int64, extreme view arguments, views that overlap what they are added into,
// conversions out of range, and the gradients through them. Each case once crashed, tripped a
// sanitizer, threw something other than mmdit::Error or returned garbage; the expected values
// are NumPy's (or follow from the definitions by hand).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "autodiff/fused.h"
#include "autodiff/ops.h"
#include "mmdit/mmdit.h"
#include "nn/attention.h"
#include "nn/functional.h"
#include "nn/layers.h"
#include "nn/module.h"
#include "tensor/named_tensors.h"
#include "tensor/ops.h"
#include "tensor/random.h"
#include "tests/test_util.h"

namespace mmdit {
namespace {

using test::error_of;
using testing::HasSubstr;

constexpr int64_t kBig = int64_t{1} << 40;
constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
constexpr int64_t kMin = std::numeric_limits<int64_t>::min();

std::vector<double> values(const Tensor& t) {
  return t.to_vector<double>();
}

// ---- element counts ----

TEST(EdgeShapes, ElementCountsBeyondInt64AreErrors) {
  // 2^80 elements: the product wrapped (undefined behaviour) and sized a garbage allocation.
  EXPECT_THAT(error_of([] {
                empty({kBig, kBig});
              }),
              HasSubstr("shape (1099511627776,1099511627776) has more elements than int64 can "
                        "count"));
  // Empty, but its strides would still overflow (NumPy rejects these shapes too).
  EXPECT_THAT(error_of([] { zeros({0, kBig, kBig}); }), HasSubstr("more elements than int64"));
  EXPECT_THAT(error_of([] { zeros({kBig, kBig, 0}); }), HasSubstr("more elements than int64"));
  // 2^62 float64 are 2^65 bytes: the byte count wrapped to 0 and a 64-byte block was handed out.
  EXPECT_THAT(error_of([] { empty({int64_t{1} << 62}, DType::f64); }),
              HasSubstr("empty: shape (4611686018427387904,) of float64 needs more bytes than "
                        "int64 can count"));
  EXPECT_THAT(error_of([] { Storage s(std::numeric_limits<size_t>::max()); }),
              HasSubstr("bytes cannot be allocated"));
  // Views too: none of them may claim a count that does not exist.
  EXPECT_THAT(error_of([] {
                raw::broadcast_to(scalar(1), {kBig, kBig});
              }),
              HasSubstr("more elements than int64"));
  EXPECT_THAT(error_of([] {
                raw::reshape(zeros({6}), {kBig, kBig, -1});
              }),
              HasSubstr("reshape: (1099511627776,1099511627776,-1) has more elements than int64"));
  // A large but countable empty shape is fine.
  const Tensor e = zeros({0, int64_t{1} << 31, int64_t{1} << 31});
  EXPECT_EQ(e.numel(), 0);
  EXPECT_EQ(e.strides(), (Shape{int64_t{1} << 62, int64_t{1} << 31, 1}));
}

TEST(EdgeShapes, BroadcastToANegativeSizeIsAnError) {
  // A size-1 axis "broadcast" to -1 made a view whose numel() was -1, refused only later by
  // whatever copied it.
  EXPECT_FALSE(raw::broadcasts_to({1}, {-1}));
  EXPECT_FALSE(raw::broadcasts_to({}, {2, -3}));
  EXPECT_THAT(error_of([] { raw::broadcast_to(scalar(1), {-1}); }),
              HasSubstr("broadcast_to: cannot broadcast () to (-1,)"));
  EXPECT_THAT(error_of([] {
                broadcast_to(ones({1}), {2, -3});
              }),
              HasSubstr("broadcast_to: cannot broadcast (1,) to (2,-3)"));
  // 1 broadcasts to 0, as in NumPy.
  EXPECT_EQ(raw::broadcast_to(ones({1}), {0}).shape(), (Shape{0}));
}

// ---- views ----

TEST(EdgeViews, SliceNarrowSplitConcatWithExtremeArguments) {
  const Tensor x = arange(5);
  // NumPy: x[0:5:2**63-1] == [0], x[1:5:2**63-2] == [1]. end - start + step overflowed.
  EXPECT_EQ(values(raw::slice(x, 0, 0, 5, kMax)), (std::vector<double>{0}));
  EXPECT_EQ(values(raw::slice(x, 0, 1, 5, kMax - 1)), (std::vector<double>{1}));
  EXPECT_EQ(values(raw::slice(x, 0, 3, 5, kMax)), (std::vector<double>{3}));
  EXPECT_EQ(values(raw::slice(x, 0, kMin, kMax)), (std::vector<double>{0, 1, 2, 3, 4}));
  EXPECT_EQ(raw::slice(x, 0, kMax, kMin).shape(), (Shape{0}));
  // start + length overflowed before the bounds were compared.
  EXPECT_THAT(error_of([&] { raw::narrow(x, 0, 1, kMax); }),
              HasSubstr("narrow: start 1 + length 9223372036854775807 overflows int64"));
  EXPECT_THAT(error_of([&] { narrow(x, 0, 2, kMax); }), HasSubstr("overflows int64"));
  EXPECT_THAT(error_of([&] { raw::narrow(x, 0, -1, 1); }), HasSubstr("narrow: [-1, 0) is outside"));
  // The sizes' running total overflowed.
  EXPECT_THAT(error_of([&] {
                raw::split(x, {kMax, kMax, 3}, 0);
              }),
              HasSubstr("split: sizes add up to more than int64 can count, but axis 0 of shape "
                        "(5,) has 5"));
  const Tensor huge = raw::broadcast_to(scalar(1), {int64_t{1} << 62});
  EXPECT_THAT(error_of([&] {
                raw::concat({huge, huge, huge}, 0);
              }),
              HasSubstr("concat: the parts' sizes along axis 0 add up to more than int64"));
  // Zero sizes are ordinary parts.
  const std::vector<Tensor> parts = raw::split(x, {0, 5, 0}, 0);
  ASSERT_EQ(parts.size(), 3u);
  EXPECT_EQ(parts[0].shape(), (Shape{0}));
  EXPECT_EQ(values(parts[1]), (std::vector<double>{0, 1, 2, 3, 4}));
  EXPECT_EQ(values(raw::concat({zeros({0, 2}), ones({1, 2}), zeros({0, 2})}, 0)),
            (std::vector<double>{1, 1}));
}

TEST(EdgeViews, GradientOfASliceWithAStepPastTheEnd) {
  Tape tape;
  const Tensor x = arange(5);
  tape.watch(x);
  EXPECT_EQ(values(tape.gradient(sum(slice(x, 0, 1, 5, kMax)), {x})[0]),
            (std::vector<double>{0, 1, 0, 0, 0}));
}

// ---- in place ----

TEST(EdgeInPlace, WritesIntoEmptyTensorsWithATrailingZeroDimension) {
  // The contiguous strides of (3, 0) are (0, 1): every copy into such a tensor was refused as a
  // copy "into a broadcast view", so ones({3, 0}) threw, and with it everything that copies.
  EXPECT_EQ(ones({3, 0}).shape(), (Shape{3, 0}));
  EXPECT_EQ(full({2, 0, 4}, 7, DType::f64).shape(), (Shape{2, 0, 4}));
  EXPECT_EQ(raw::contiguous(raw::permute(zeros({0, 3}), {1, 0})).shape(), (Shape{3, 0}));
  EXPECT_EQ(raw::concat({zeros({2, 0}), zeros({2, 0})}, 1).shape(), (Shape{2, 0}));
  EXPECT_EQ(raw::sum(ones({2, 0, 3}), {0, 2}).shape(), (Shape{0}));
  EXPECT_EQ(raw::softmax(zeros({0, 3}), 0).shape(), (Shape{0, 3}));
  EXPECT_EQ(values(raw::matmul(ones({2, 0}), ones({0, 3}))), std::vector<double>(6, 0.0));
  Tensor e = zeros({3, 0});
  raw::add_into(e, ones({0}));
  EXPECT_EQ(e.shape(), (Shape{3, 0}));
  // A broadcast view with elements is still refused.
  EXPECT_THAT(error_of([] { raw::copy_into(raw::broadcast_to(ones({1}), {3}), ones({3})); }),
              HasSubstr("copy_into: the destination (3,) is a broadcast view"));
}

TEST(EdgeInPlace, AddIntoReadsAnOverlappingSourceBeforeWritingIt) {
  // NumPy (which buffers overlapping operands): a = arange(5); a[1:] += a[:-1] -> 0 1 3 5 7.
  // The in-place kernel read x's elements after writing them as dst's; within one SIMD vector
  // that went unseen, from the first block boundary on it did not (arange(100): a[17] was 48).
  Tensor a = arange(5);
  raw::add_into(raw::slice(a, 0, 1, 5), raw::slice(a, 0, 0, 4));
  EXPECT_EQ(values(a), (std::vector<double>{0, 1, 3, 5, 7}));
  // Long enough for the vector kernels: a[i] = i + (i - 1).
  Tensor b = arange(1000);
  raw::add_into(raw::slice(b, 0, 1, 1000), raw::slice(b, 0, 0, 999));
  const std::vector<double> got = values(b);
  for (int i = 1; i < 1000; ++i) ASSERT_EQ(got[i], 2 * i - 1) << "at " << i;
  // a += a[0], row 0 broadcast over the rows it is added into: [[1,2],[3,4]] -> [[2,4],[4,6]].
  Tensor c = from_vector({1.f, 2.f, 3.f, 4.f}, {2, 2});
  raw::add_into(c, raw::slice(c, 0, 0, 1));
  EXPECT_EQ(values(c), (std::vector<double>{2, 4, 4, 6}));
  // The destination itself as the source stays in place: every element read before written.
  Tensor d = arange(4);
  raw::add_into(d, d);
  EXPECT_EQ(values(d), (std::vector<double>{0, 2, 4, 6}));
}

// ---- conversions ----

TEST(EdgeConversions, ToVectorOfIntegersRejectsValuesOutOfRange) {
  // Converting NaN, an infinity or an out-of-range float to an integer is undefined behaviour
  // (UBSan's float-cast-overflow); NumPy gives INT64_MIN with a warning.
  EXPECT_THAT(error_of([] { full({2}, NAN).to_vector<int64_t>(); }),
              HasSubstr("to_vector: element 0 (nan) of a float32 tensor of shape (2,) does not "
                        "fit the integer type"));
  EXPECT_THAT(error_of([] { full({3}, 1e30, DType::f64).to_vector<int64_t>(); }),
              HasSubstr("to_vector: element 0 (1e+30)"));
  EXPECT_THAT(error_of([] {
                from_vector({1.f, 300.f}, {2}).to_vector<uint8_t>();
              }),
              HasSubstr("element 1 (300)"));
  EXPECT_THAT(error_of([] { from_vector({-1.f}, {1}).to_vector<uint8_t>(); }),
              HasSubstr("element 0 (-1)"));
  // In range, the conversion truncates toward zero as static_cast (and NumPy's astype) do.
  EXPECT_EQ(from_vector({-3.75f, 2.5f, -0.5f}, {3}).to_vector<int64_t>(),
            (std::vector<int64_t>{-3, 2, 0}));
  EXPECT_EQ(from_vector({0.f, 255.5f, -0.5f}, {3}).to_vector<uint8_t>(),
            (std::vector<uint8_t>{0, 255, 0}));
  EXPECT_EQ(from_vector(std::vector<bool>{true, false}, {2}).to_vector<int64_t>(),
            (std::vector<int64_t>{1, 0}));
}

// ---- reductions of nothing ----

TEST(EdgeReductions, EmptyAxesSumToZeroAndMeanMaxVarAreErrors) {
  // The sum of no elements is 0, as in NumPy.
  EXPECT_EQ(values(raw::sum(zeros({0}))), (std::vector<double>{0}));
  EXPECT_EQ(values(raw::sum(zeros({3, 0}), {1})), (std::vector<double>{0, 0, 0}));
  EXPECT_EQ(values(raw::sum(ones({0, 2}), {0}, true)), (std::vector<double>{0, 0}));
  EXPECT_EQ(raw::sum(ones({0, 5}), {1}).shape(), (Shape{0}));
  // Documented in tensor/ops.h: mean, max and var of no elements throw (NumPy: NaN, error, NaN).
  EXPECT_THAT(error_of([] {
                raw::mean(zeros({0, 5}), {0});
              }),
              HasSubstr("mean: reducing shape (0,5) over no elements"));
  EXPECT_THAT(error_of([] { raw::max(zeros({3, 0}), {1}); }), HasSubstr("over no elements"));
  EXPECT_THAT(error_of([] { raw::var(zeros({0})); }), HasSubstr("over no elements"));
  // Over a nonempty axis of an empty tensor they are empty.
  EXPECT_EQ(raw::mean(zeros({0, 5}), {1}).shape(), (Shape{0}));
  EXPECT_EQ(raw::max(zeros({3, 0}), {0}).shape(), (Shape{0}));
  EXPECT_EQ(raw::softmax(zeros({3, 0}), -1).shape(), (Shape{3, 0}));
  EXPECT_EQ(raw::log_softmax(zeros({0, 3}), 0).shape(), (Shape{0, 3}));
}

// ---- Rng ----

TEST(EdgeRng, ParametersThatGiveNoDistributionAreErrors) {
  Rng rng(5);
  // These returned values: -N(0, 1) for stddev -1, NaN for the infinite bounds, and draws from
  // (high, low) when low > high.
  EXPECT_THAT(error_of([&] { rng.normal({4}, DType::f32, 0, -1); }),
              HasSubstr("Rng::normal: mean must be finite and stddev finite and non-negative, "
                        "got mean 0 and stddev -1 (shape (4,))"));
  EXPECT_THAT(error_of([&] { rng.normal({4}, DType::f32, 0, NAN); }), HasSubstr("stddev nan"));
  EXPECT_THAT(error_of([&] { rng.uniform({4}, DType::f32, 1, 0); }),
              HasSubstr("Rng::uniform: bounds must be finite with low <= high, got low 1 and "
                        "high 0"));
  EXPECT_THAT(error_of([&] { rng.uniform({4}, DType::f64, -INFINITY, INFINITY); }),
              HasSubstr("got low -inf and high inf"));
  EXPECT_THAT(error_of([&] { rng.normal({-1}); }), HasSubstr("negative dimension"));
  // Every draw was FLT_MAX: the bounds are finite in double but not in float32.
  EXPECT_THAT(error_of([&] { rng.uniform({4}, DType::f32, 1e39, 2e39); }),
              HasSubstr("Rng::uniform: bounds low 1e+39 and high 2e+39 are outside float32's "
                        "range (shape (4,))"));
  EXPECT_EQ(rng.uniform({2}, DType::f64, 1e39, 2e39).shape(), (Shape{2}));
  // The degenerate but meaningful ones stay.
  EXPECT_EQ(values(rng.uniform({3}, DType::f32, 2, 2)), (std::vector<double>{2, 2, 2}));
  EXPECT_EQ(values(rng.normal({2}, DType::f64, 1.5, 0)), (std::vector<double>{1.5, 1.5}));
  EXPECT_EQ(rng.normal({3, 0}).shape(), (Shape{3, 0}));
}

TEST(EdgeRng, NormalFloat32DrawsOutsideItsRangeAreErrors) {
  Rng rng(6);
  // Finite in double, every draw was inf once stored as float32.
  EXPECT_THAT(error_of([&] { rng.normal({4}, DType::f32, 1e39, 1); }),
              HasSubstr("Rng::normal: mean 1e+39 and stddev 1 give draws outside float32's range "
                        "(they reach |mean| + 8.65 stddev) (shape (4,))"));
  EXPECT_THAT(error_of([&] { rng.normal({4}, DType::f32, 0, 1e39); }),
              HasSubstr("mean 0 and stddev 1e+39 give draws outside float32's range"));
  // Draws reach |mean| + 8.65 stddev (Box-Muller of the smallest uniform, 2^-54): 1e38 as the
  // stddev gave inf for one draw in 1500.
  EXPECT_THAT(error_of([&] { rng.normal({4}, DType::f32, 0, 1e38); }),
              HasSubstr("mean 0 and stddev 1e+38 give draws outside float32's range"));
  EXPECT_THAT(error_of([&] { rng.normal({4}, DType::f32, -3e38, 1e37); }),
              HasSubstr("mean -3e+38 and stddev 1e+37"));
  // In float64, and within float32's range with room for the farthest draw, they are values.
  EXPECT_EQ(rng.normal({2}, DType::f64, 1e39, 1e39).shape(), (Shape{2}));
  for (double v : values(rng.normal({100000}, DType::f32, 0, 3e37))) ASSERT_TRUE(std::isfinite(v));
  EXPECT_EQ(values(rng.normal({2}, DType::f32, -3e38, 0)),
            (std::vector<double>{static_cast<float>(-3e38), static_cast<float>(-3e38)}));
}

TEST(EdgeRng, Float64DrawsPastDoublesRangeAreErrors) {
  Rng rng(7);
  // high - low was inf, and every draw came out as the cap, DBL_MAX.
  EXPECT_THAT(error_of([&] { rng.uniform({4}, DType::f64, -DBL_MAX, DBL_MAX); }),
              HasSubstr("Rng::uniform: the width high - low of bounds low -1.79769e+308 and high "
                        "1.79769e+308 overflows double (shape (4,))"));
  EXPECT_THAT(
      error_of([&] { rng.normal({4}, DType::f64, 0, 1e308); }),
      HasSubstr("Rng::normal: mean 0 and stddev 1e+308 give draws outside float64's range"));
  for (double v : values(rng.uniform({1000}, DType::f64, -DBL_MAX / 2, DBL_MAX / 2)))
    ASSERT_TRUE(std::isfinite(v) && std::abs(v) <= DBL_MAX / 2);
}

// ---- named tensors ----

// Views into arrays of 8 GB and more have strides past int; OpenBLAS would have read them wrapped.
// One row is all the kernel could touch here, so the sizes are tried on small buffers.
TEST(EdgeMatmul, SizesPastOpenBlasIntegersAreErrors) {
  std::vector<double> a(4, 1.0), b(4, 1.0), c(4, 0.0);
  const int64_t past = int64_t{std::numeric_limits<int>::max()} + 1;
  EXPECT_THAT(
      error_of([&] { raw::gemm(false, false, 1, 1, 1, a.data(), past, b.data(), 1, c.data(), 1); }),
      HasSubstr("matmul: the product (1 x 1 by 1 x 1, leading dimensions 2147483648, 1, "
                "1) has a size past OpenBLAS's integers (at most 2147483647)"));
  raw::gemm(false, false, 2, 2, 2, a.data(), 2, b.data(), 2, c.data(), 2);
  EXPECT_EQ(c, (std::vector<double>{2, 2, 2, 2}));
}

TEST(EdgeNamedTensors, IndexOutOfRangeIsAnError) {
  NamedTensors n;
  n.insert("w", ones({1}));
  EXPECT_EQ(n[0].first, "w");
  EXPECT_THAT(error_of([&] { (void)n[1]; }),
              HasSubstr("NamedTensors: index 1 is out of range for 1 tensors"));
}

// ---- gradients through empty dimensions ----

TEST(EdgeGradients, MatmulWithAnEmptyDimensionAgainstASharedWeight) {
  // The weight's gradient folded the batch with reshape(., {-1, K}), which cannot infer -1 when K
  // (or N) is 0: the backward threw.
  {
    Tape tape;
    const Tensor a = ones({2, 3, 0}), b = ones({0, 4});
    tape.watch(a);
    tape.watch(b);
    const std::vector<Tensor> g = tape.gradient(sum(matmul(a, b)), {a, b});
    EXPECT_EQ(g[0].shape(), (Shape{2, 3, 0}));
    EXPECT_EQ(g[1].shape(), (Shape{0, 4}));
  }
  {
    Tape tape;
    const Tensor a = from_vector(std::vector<float>(24, 0.5f), {2, 3, 4}), b = ones({4, 0});
    tape.watch(a);
    tape.watch(b);
    const std::vector<Tensor> g = tape.gradient(matmul(a, b), {a, b}, zeros({2, 3, 0}));
    EXPECT_EQ(values(g[0]), std::vector<double>(24, 0.0));
    EXPECT_EQ(g[1].shape(), (Shape{4, 0}));
  }
  {
    // No rows at all: the weight's gradient is a sum over nothing, zeros of its shape.
    Tape tape;
    const Tensor a = ones({2, 0, 4}), b = ones({4, 3});
    tape.watch(a);
    tape.watch(b);
    const std::vector<Tensor> g = tape.gradient(sum(matmul(a, b)), {a, b});
    EXPECT_EQ(g[0].shape(), (Shape{2, 0, 4}));
    EXPECT_EQ(values(g[1]), std::vector<double>(12, 0.0));
  }
}

TEST(EdgeGradients, LinearWithNoInputOrNoOutputFeatures) {
  // x W^T + b with in = 0 is the bias on every row; the product's reshape(., {-1, 0}) threw.
  {
    Tape tape;
    const Tensor x = ones({2, 0}), w = ones({2, 0}), b = from_vector({1.f, 2.f}, {2});
    tape.watch(x);
    tape.watch(w);
    tape.watch(b);
    const Tensor y = linear_fused(x, w, b);
    EXPECT_EQ(y.shape(), (Shape{2, 2}));
    EXPECT_EQ(values(y), (std::vector<double>{1, 2, 1, 2}));
    const std::vector<Tensor> g = tape.gradient(sum(y), {x, w, b});
    EXPECT_EQ(g[0].shape(), (Shape{2, 0}));
    EXPECT_EQ(g[1].shape(), (Shape{2, 0}));
    EXPECT_EQ(values(g[2]), (std::vector<double>{2, 2}));  // one per row
  }
  {
    Tape tape;
    const Tensor x = ones({3, 4}), w = ones({0, 4});
    tape.watch(x);
    tape.watch(w);
    const Tensor y = nn::linear(x, w);
    EXPECT_EQ(y.shape(), (Shape{3, 0}));
    const std::vector<Tensor> g = tape.gradient(y, {x, w}, zeros({3, 0}));
    EXPECT_EQ(values(g[0]), std::vector<double>(12, 0.0));
    EXPECT_EQ(g[1].shape(), (Shape{0, 4}));
  }
  EXPECT_EQ(linear_fused_each({ones({3, 0})}, {ones({4, 0})}, {Tensor()})[0].shape(),
            (Shape{3, 4}));
}

TEST(EdgeGradients, OpsOnAWatchedEmptyTensor) {
  Tape tape;
  const Tensor x = zeros({0, 3});
  tape.watch(x);
  const Tensor y = sum(softmax(exp(x) * x + x, -1)) + sum(matmul(x, ones({3, 2}))) +
                   sum(concat({x, x}, 0)) + sum(transpose(x, 0, 1)) + sum(reshape(x, {3, 0})) +
                   sum(mul_scalar(sum(x, {0}), 2.0));
  EXPECT_EQ(values(y), (std::vector<double>{0}));
  const Tensor g = tape.gradient(y, {x})[0];
  EXPECT_EQ(g.shape(), (Shape{0, 3}));
}

TEST(EdgeFused, EmptyInputsGiveEmptyOutputsOrSayWhy) {
  EXPECT_EQ(rms_norm_fused(ones({0, 4}), ones({4})).shape(), (Shape{0, 4}));
  EXPECT_EQ(rms_norm_fused(ones({3, 0}), ones({0})).shape(), (Shape{3, 0}));
  EXPECT_EQ(swiglu(ones({0, 3}), ones({0, 3})).shape(), (Shape{0, 3}));
  EXPECT_EQ(rope(ones({1, 0, 2, 4}), ones({0, 4}), ones({0, 4})).shape(), (Shape{1, 0, 2, 4}));
  EXPECT_THAT(error_of([] { gated_residual(scalar(1), scalar(1), scalar(1)); }),
              HasSubstr("gated_residual: input has shape (); expected (..., S, D)"));
}

// The per-group ops with no rows: a group of no tokens (an empty modality) or no groups (a batch
// of none) give empty outputs, and the per-group parameters' gradients are sums over no rows,
// zeros of their shape. They were errors ("expected (..., S, D) with no dimension of size 0").
TEST(EdgeFused, PerGroupOpsWithNoRows) {
  for (const Shape& shape : {Shape{2, 0, 4}, Shape{0, 3, 4}, Shape{0, 4}}) {
    Shape param = shape;
    param[param.size() - 2] = 1;
    Shape packed = param;
    packed.back() = 8;
    const Tensor x = ones(shape, DType::f64), y = ones(shape, DType::f64);
    const Tensor ss = ones(packed, DType::f64), shift = ones(param, DType::f64),
                 scale = ones(param, DType::f64), gate = ones(param, DType::f64);
    Tape tape;
    for (const Tensor& t : {x, y, ss, shift, scale, gate}) tape.watch(t);
    const Tensor a = layer_norm_modulate(x, ss), b = layer_norm_modulate(x, shift, scale),
                 c = gated_residual(x, gate, y);
    for (const Tensor& out : {a, b, c}) EXPECT_EQ(out.shape(), shape) << shape_str(shape);
    const std::vector<Tensor> g =
        tape.gradient(sum(a) + sum(b) + sum(c), {x, y, ss, shift, scale, gate});
    const Shape want[] = {shape, shape, packed, param, param, param};
    for (size_t i = 0; i < g.size(); ++i) {
      EXPECT_EQ(g[i].shape(), want[i]) << shape_str(shape) << " input " << i;
      for (double v : values(g[i])) EXPECT_EQ(v, 0.0) << shape_str(shape) << " input " << i;
    }
  }
}

// ---- nn ----

// Their frequency and angle tables were std::vectors: an absurd size ended in std::bad_alloc,
// which names nothing, instead of the allocator's OutOfMemory.
TEST(EdgeNNDeathTest, TablesTooLargeForMemoryAreOutOfMemoryErrors) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "AddressSanitizer's shadow memory does not fit an address-space limit";
#endif
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const auto run_past_the_limit = [](auto&& f) {
    test::limit_address_space(size_t{256} << 20);
    try {
      f();
    } catch (const OutOfMemory& e) {
      std::fprintf(stderr, "%s\n", e.what());
      std::exit(3);
    }
    std::exit(0);
  };
  EXPECT_EXIT(run_past_the_limit([] { nn::timestep_embedding(ones({2}), int64_t{1} << 40); }),
              testing::ExitedWithCode(3), "out of memory allocating 4398046511104 bytes");
  EXPECT_EXIT(run_past_the_limit([] { nn::rope_tables(1 << 20, 1 << 20, DType::f32); }),
              testing::ExitedWithCode(3), "out of memory allocating 8796093022208 bytes");
}

TEST(EdgeNN, ShapesTheFunctionsCannotTakeAreErrors) {
  // x.shape().back() of a scalar read before the Shape's storage (undefined behaviour); the error
  // came later, from narrow.
  EXPECT_THAT(error_of([] { nn::apply_rope(scalar(1), scalar(1), scalar(0)); }),
              HasSubstr("apply_rope: input has shape (); expected (..., seq, dim_head) with "
                        "dim_head even"));
  EXPECT_THAT(error_of([] {
                nn::apply_rope(ones({2, 3}), ones({2, 3}), zeros({2, 3}));
              }),
              HasSubstr("apply_rope: input has shape (2,3)"));
  EXPECT_THAT(error_of([] { nn::attention(scalar(1), scalar(1), scalar(1), Tensor()); }),
              HasSubstr("attention: q, k, v have shapes (), (), (); expected (B, H, T, d)"));
  // The errors came from the inner ops: "mul: shapes ... cannot be broadcast" and "where:
  // condition must be bool".
  EXPECT_THAT(error_of([] {
                nn::apply_rope(ones({2, 4}), ones({3, 4}), zeros({3, 4}));
              }),
              HasSubstr("apply_rope: tables of shapes (3,4) and (3,4) do not broadcast to the "
                        "input's (2,4); expected one (seq, dim_head) shape"));
  EXPECT_THAT(error_of([] {
                nn::apply_rope(ones({2, 4}), ones({2, 4}), Tensor());
              }),
              HasSubstr("apply_rope: tables of shapes (2,4) and undefined"));
  EXPECT_THAT(
      error_of([] {
        nn::attention(ones({1, 2, 3, 4}), ones({1, 2, 3, 4}), ones({1, 2, 3, 4}), ones({3, 3}));
      }),
      HasSubstr("attention: mask has shape (3,3) and dtype float32; expected bool (3,3) "
                "or (1,3,3)"));
  // A negative length sized the tables' std::vectors: std::length_error.
  EXPECT_THAT(error_of([] { nn::rope_tables(-1, 4, DType::f32); }),
              HasSubstr("rope: seq and dim_head must be non-negative, got seq -1 and dim_head 4"));
  EXPECT_THAT(error_of([] { nn::rope_tables(3, -2, DType::f64); }),
              HasSubstr("got seq 3 and dim_head -2"));
  EXPECT_EQ(nn::rope_tables(0, 4, DType::f32).cos.shape(), (Shape{0, 4}));
  EXPECT_THAT(error_of([] { nn::rope_tables(2, 2, DType::boolean); }),
              HasSubstr("rope: tables must be float32 or float64, got bool"));
  // log(max_period) made the embedding NaN and infinities.
  EXPECT_THAT(error_of([] { nn::timestep_embedding(scalar(1), 4, 0); }),
              HasSubstr("timestep_embedding: max_period must be positive and finite, got 0"));
  EXPECT_THAT(error_of([] { nn::timestep_embedding(scalar(1), 4, -1); }), HasSubstr("got -1"));
  // dim 1 has no frequency: the one trailing zero. An empty batch gives an empty embedding.
  EXPECT_EQ(values(nn::timestep_embedding(scalar(1), 1)), (std::vector<double>{0}));
  EXPECT_EQ(nn::timestep_embedding(ones({0}), 4).shape(), (Shape{0, 4}));
}

// Layer widths are products of their sizes; one beyond int64 was undefined behaviour (UBSan) and
// wrapped: 2^32 * 2^32 to 0, which Linear refused as "in=4294967296 out=0", and 3 * (2^63 - 1)
// to 2^63 - 3, refused only by its weight's element count. Neither names the sizes given.
TEST(EdgeNN, LayerWidthsBeyondInt64AreErrors) {
  Rng rng(3);
  constexpr int64_t k2To31 = int64_t{1} << 31, k2To32 = int64_t{1} << 32;
  EXPECT_THAT(error_of([&] { nn::FeedForward(k2To32, k2To32, rng); }),
              HasSubstr("FeedForward: dim 4294967296 * mult 4294967296 overflows int64"));
  EXPECT_THAT(error_of([&] { nn::FeedForward(3, kMax, rng); }),
              HasSubstr("FeedForward: dim 3 * mult 9223372036854775807 overflows int64"));
  EXPECT_THAT(error_of([&] { nn::JointAttention({8}, k2To32, k2To32, rng); }),
              HasSubstr("JointAttention: heads 4294967296 * dim_head 4294967296 overflows int64"));
  // heads * dim_head = 2^62 fits; the three of q, k and v side by side do not.
  EXPECT_THAT(error_of([&] { nn::JointAttention({8}, k2To31, k2To31, rng); }),
              HasSubstr("JointAttention: 3 * heads * dim_head (3 * 4611686018427387904, heads "
                        "2147483648 * dim_head 2147483648) overflows int64"));
  constexpr int64_t k2To62 = int64_t{1} << 62;
  EXPECT_THAT(error_of([&] { nn::AdaptiveLayerNorm(k2To62, 8, rng); }),
              HasSubstr("AdaptiveLayerNorm: 2 * dim 4611686018427387904 overflows int64"));
  EXPECT_THAT(error_of([&] { ModulatedFinalLayer(k2To62, 2, 8, rng); }),
              HasSubstr("ModulatedFinalLayer: 2 * dim_in 4611686018427387904 overflows int64"));
  // Widths that fit still build the layers.
  EXPECT_EQ(nn::AdaptiveLayerNorm(5, 8, rng).to_modulation.weight.shape(), (Shape{10, 8}));
  const nn::FeedForward ff(4, 3, rng);
  EXPECT_EQ(ff.linear_in.weight.shape(), (Shape{12, 4}));
  const nn::JointAttention attention({8, 6}, 4, 2, rng);
  EXPECT_EQ(attention.to_qkv[1].weight.shape(), (Shape{24, 6}));
}

struct TwoLinears : nn::Module {
  explicit TwoLinears(Rng& rng) : a(2, 3, true, rng), b(3, 1, false, rng) {
    register_module("a", a);
    register_module("b", b);
  }
  nn::Linear a, b;
};

struct LinearWithBuffer : nn::Module {
  explicit LinearWithBuffer(Rng& rng) : a(2, 3, true, rng) {
    register_module("a", a);
    table = register_buffer("table", ones({4}));
  }
  nn::Linear a;
  Tensor table;
};

// A buffer's name given to a load of parameters only: "unknown parameter ... not in the model"
// was wrong, since the model has it.
TEST(EdgeModule, LoadingABufferAsAParameterSaysHowToLoadIt) {
  Rng rng(2);
  LinearWithBuffer m(rng);
  NamedTensors given;
  for (const auto& [name, t] : m.named_parameters()) given.insert(name, zeros(t.shape()));
  given.insert("table", zeros({4}));
  EXPECT_THAT(error_of([&] { m.load(given); }),
              HasSubstr("load: 'table' is a buffer of the model, not a parameter; "
                        "load(values, /*buffers=*/true) loads buffers too"));
  EXPECT_EQ(values(m.table), std::vector<double>(4, 1.0));
  m.load(given, /*buffers=*/true);
  EXPECT_EQ(values(m.table), std::vector<double>(4, 0.0));
}

// Two parameters of one name, or a parameter named like a child's, were accepted and refused
// only when the names were collected, with a message naming neither the module nor the name's
// maker.
TEST(EdgeModule, RegisteringANameTwiceIsRefusedAtOnce) {
  using Names = std::vector<std::pair<std::string, std::string>>;  // (kind, name)
  struct Registers : nn::Module {
    explicit Registers(const Names& names) {
      for (const auto& [kind, name] : names) {
        if (kind == "parameter") register_parameter(name, ones({2}));
        if (kind == "buffer") register_buffer(name, ones({2}));
        if (kind == "module") register_module(name, child);
      }
    }
    nn::Module child;
  };
  EXPECT_THAT(error_of([] {
                Registers({{"parameter", "w"}, {"parameter", "w"}});
              }),
              HasSubstr("Module: cannot register a parameter named 'w': this module already has "
                        "a parameter of that name"));
  EXPECT_THAT(error_of([] {
                Registers({{"module", "lin"}, {"buffer", "lin"}});
              }),
              HasSubstr("cannot register a buffer named 'lin': this module already has a module"));
  EXPECT_THAT(error_of([] {
                Registers({{"module", "lin"}, {"parameter", "lin.weight"}});
              }),
              HasSubstr("cannot register a parameter named 'lin.weight': a name is one non-empty "
                        "component, without '.'"));
  EXPECT_THAT(error_of([] {
                Registers(Names{{"parameter", ""}});
              }),
              HasSubstr("cannot register a parameter named ''"));
  EXPECT_EQ(
      Registers({{"parameter", "w"}, {"buffer", "b"}, {"module", "c"}}).named_parameters().size(),
      1u);
}

// Module::to puts new storage under the parameters' handles. A tape that saved a parameter
// before it compared version numbers across the two storages: the check passed by coincidence
// or reported a version going backwards.
TEST(EdgeModule, ConvertingAModuleBetweenRecordAndGradientIsNamed) {
  Rng rng(2);
  TwoLinears m(rng);
  m.to(DType::f64);
  Tape tape;
  for (const auto& [name, t] : m.named_parameters()) tape.watch(t);
  const Tensor x = ones({4, 2}, DType::f64);
  Tensor y = sum(m.b(m.a(x)));
  m.to(DType::f32);
  EXPECT_THAT(error_of([&] { tape.gradient(y, {m.a.weight}); }),
              HasSubstr("and its storage was replaced after the op ran (by Module::to"));
}

TEST(EdgeModule, ToANonFloatDTypeIsAnError) {
  Rng rng(2);
  TwoLinears m(rng);
  const std::vector<double> before = values(m.a.weight);
  // The parameters became bools (0 and 1) without a word.
  EXPECT_THAT(error_of([&] { m.to(DType::boolean); }),
              HasSubstr("Module::to: dtype must be float32 or float64, got bool"));
  EXPECT_EQ(m.a.weight.dtype(), DType::f32);
  EXPECT_EQ(values(m.a.weight), before);
}

TEST(EdgeModule, AFailedLoadLeavesTheParametersAsTheyWere) {
  Rng rng(2);
  TwoLinears m(rng);
  const std::vector<double> before = values(m.a.weight);
  ASSERT_NE(before, std::vector<double>(6, 0.0));
  // a.* come first and were overwritten before b.weight was found missing.
  NamedTensors partial;
  partial.insert("a.weight", zeros({3, 2}));
  partial.insert("a.bias", zeros({3}));
  EXPECT_THAT(error_of([&] { m.load(partial); }),
              HasSubstr("load: missing parameter 'b.weight' (shape (1,3))"));
  EXPECT_EQ(values(m.a.weight), before);
  // Every parameter given, plus one the model does not have: the known ones were overwritten.
  NamedTensors extra;
  for (const auto& [name, t] : m.named_parameters()) extra.insert(name, zeros(t.shape()));
  extra.insert("c.weight", zeros({1}));
  EXPECT_THAT(error_of([&] { m.load(extra); }),
              HasSubstr("load: unknown parameter 'c.weight' (shape (1,)) is not in the model"));
  EXPECT_EQ(values(m.a.weight), before);
  // An undefined value is named, not reported as a use of an undefined Tensor.
  NamedTensors undefined;
  for (const auto& [name, t] : m.named_parameters()) undefined.insert(name, Tensor());
  EXPECT_THAT(error_of([&] { m.load(undefined); }),
              HasSubstr("load: parameter 'a.weight' is an undefined tensor"));
  // A float64 value past float32's range was stored as inf.
  NamedTensors too_large;
  for (const auto& [name, t] : m.named_parameters())
    too_large.insert(name, zeros(t.shape(), DType::f64));
  too_large.at("b.weight").data<double>()[2] = 1e300;
  EXPECT_THAT(error_of([&] { m.load(too_large); }),
              HasSubstr("load: parameter 'b.weight' holds 1e+300 at (0,2), past float32's range"));
  EXPECT_EQ(values(m.a.weight), before);
  // A good load still converts dtypes.
  NamedTensors good;
  for (const auto& [name, t] : m.named_parameters()) good.insert(name, ones(t.shape(), DType::f64));
  m.load(good);
  EXPECT_EQ(m.a.weight.dtype(), DType::f32);
  EXPECT_EQ(values(m.a.weight), std::vector<double>(6, 1.0));
}

TEST(EdgeModule, ModuleListIndexOutOfRangeIsAnError) {
  Rng rng(2);
  nn::ModuleList<nn::Linear> list;
  list.emplace_back(1, 1, false, rng);
  EXPECT_EQ(list[0].weight.shape(), (Shape{1, 1}));
  // std::vector::at threw std::out_of_range.
  EXPECT_THAT(error_of([&] { (void)list[3]; }),
              HasSubstr("ModuleList: index 3 is out of range for 1 modules"));
}

}  // namespace
}  // namespace mmdit
