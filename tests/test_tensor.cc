// Tests of the tensor layer (tensor/*.h) against independent truths: closed forms, values
// written out by hand, and naive loops in double that read the operands through their raw
// strides (never through the library's own copy or broadcast machinery).
#include <cblas.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <hwy/targets.h>
#include <omp.h>
#ifdef __linux__
#include <sched.h>
#endif

#include <array>
#include <atomic>
#include <bit>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "tensor/blas_core.h"
#include "tensor/named_tensors.h"
#include "tensor/ops.h"
#include "tensor/parallel.h"
#include "tensor/print.h"
#include "tensor/random.h"
#include "tensor/simd.h"
#include "tensor/tensor.h"
#include "tests/test_util.h"

namespace mmdit {
namespace {

using test::error_of;

using testing::HasSubstr;

constexpr double kInf = std::numeric_limits<double>::infinity();

// ---- helpers: independent reads of tensors and naive references ----

// For tests that run on one thread and on two: ctest sets OMP_NUM_THREADS=1, so the parallel
// paths run only where a test asks for two threads itself. Restores the thread count after.
class TensorThreadCount : public testing::Test {
 protected:
  void TearDown() override { set_num_threads(saved_); }
  int saved_ = num_threads();
};

// Uniform values in [lo, hi) from std::mt19937_64 (not the library's Rng).
Tensor uniform_tensor(const Shape& shape, DType dtype, uint64_t seed, double lo = -1,
                      double hi = 1) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> v(static_cast<size_t>(shape_numel(shape)));
  for (double& x : v) x = dist(gen);
  return from_vector(v, shape, dtype);
}

// The element at a multi-index, read through the tensor's own strides and offset.
double at(const Tensor& t, const Shape& idx) {
  int64_t off = 0;
  for (size_t i = 0; i < idx.size(); ++i) off += idx[i] * t.strides()[i];
  const char* base = static_cast<const char*>(t.raw_data());
  switch (t.dtype()) {
    case DType::f32:
      return reinterpret_cast<const float*>(base)[off];
    case DType::f64:
      return reinterpret_cast<const double*>(base)[off];
    case DType::boolean:
      return reinterpret_cast<const bool*>(base)[off] ? 1.0 : 0.0;
  }
  return 0;
}

// The element of `t` that NumPy broadcasting pairs with `out_idx` of a larger output.
double at_broadcast(const Tensor& t, const Shape& out_idx) {
  const size_t lead = out_idx.size() - t.shape().size();
  Shape idx(t.shape().size());
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = t.shape()[i] == 1 ? 0 : out_idx[lead + i];
  return at(t, idx);
}

// Calls fn(index) for every multi-index of `shape` in row-major order.
void for_each_index(const Shape& shape, const std::function<void(const Shape&)>& fn) {
  if (shape_numel(shape) == 0) return;
  Shape idx(shape.size(), 0);
  while (true) {
    fn(idx);
    int64_t d = static_cast<int64_t>(shape.size()) - 1;
    for (; d >= 0; --d) {
      if (++idx[d] < shape[d]) break;
      idx[d] = 0;
    }
    if (d < 0) return;
  }
}

// Compares every element of `got` with truth(index): |got - want| <= atol + rtol * |want|, with
// inf == inf and NaN == NaN. Reports the count and the first mismatch.
::testing::AssertionResult matches(const Tensor& got, const Shape& shape,
                                   const std::function<double(const Shape&)>& truth, double rtol,
                                   double atol) {
  if (got.shape() != shape)
    return ::testing::AssertionFailure()
           << "shape " << shape_str(got.shape()) << ", expected " << shape_str(shape);
  int64_t bad = 0;
  std::string first;
  for_each_index(shape, [&](const Shape& idx) {
    const double g = at(got, idx), w = truth(idx);
    const bool ok = (std::isnan(g) && std::isnan(w)) || g == w ||
                    (std::isfinite(w) && std::abs(g - w) <= atol + rtol * std::abs(w));
    if (!ok && bad++ == 0)
      first = str_cat("at ", shape_str(idx), ": got ", g, ", expected ", w, " (diff ",
                      std::abs(g - w), ")");
  });
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " mismatching elements; first " << first;
}

std::vector<double> values(const Tensor& t) {
  return t.to_vector<double>();
}

// ---- creation, dtypes, alignment ----

// ---- Shape ----

// Shape keeps up to kInline values in place and the rest on the heap; every edit, on either side
// of that limit and across it, must leave the same values a std::vector would hold.
TEST(ShapeSmallVector, BehavesAsAStdVectorAcrossTheInlineLimit) {
  std::mt19937_64 rng(1);
  for (int trial = 0; trial < 200; ++trial) {
    Shape shape;
    std::vector<int64_t> want;
    for (int step = 0; step < 40; ++step) {
      const int64_t value = static_cast<int64_t>(rng() % 1000);
      const size_t at = want.empty() ? 0 : rng() % (want.size() + 1);
      switch (rng() % 6) {
        case 0:
        case 1:
          shape.push_back(value);
          want.push_back(value);
          break;
        case 2:
          shape.insert(shape.begin() + at, value);
          want.insert(want.begin() + static_cast<std::ptrdiff_t>(at), value);
          break;
        case 3:
          if (!want.empty()) {
            const size_t i = at % want.size();
            shape.erase(shape.begin() + i);
            want.erase(want.begin() + static_cast<std::ptrdiff_t>(i));
          }
          break;
        case 4: {
          const size_t n = rng() % (2 * Shape::kInline + 2);
          shape.resize(n, value);
          want.resize(n, value);
          break;
        }
        default:
          if (!want.empty()) {
            shape.pop_back();
            want.pop_back();
          }
      }
      ASSERT_EQ(std::vector<int64_t>(shape), want) << "trial " << trial << " step " << step;
      ASSERT_EQ(shape.size(), want.size());
      ASSERT_EQ(shape.empty(), want.empty());
      if (!want.empty()) {
        ASSERT_EQ(shape.front(), want.front());
        ASSERT_EQ(shape.back(), want.back());
      }
      const Shape copy = shape;  // copies keep their values apart from the original
      Shape source = copy;
      Shape moved = std::move(source);
      ASSERT_EQ(moved, shape);
      ASSERT_TRUE(source.empty());  // NOLINT(bugprone-use-after-move): moving leaves it empty
      source.push_back(value);
      ASSERT_EQ(source, Shape{value});
      Shape assigned = {1, 2, 3, 4, 5, 6, 7, 8};
      assigned = copy;
      ASSERT_EQ(assigned, shape);
      if (!moved.empty()) moved[0] += 1;
      ASSERT_EQ(std::vector<int64_t>(copy), want);
      ASSERT_EQ(moved == shape, want.empty());
    }
  }
}

TEST(ShapeSmallVector, ConstructionAndComparison) {
  EXPECT_EQ(Shape(3), (Shape{0, 0, 0}));
  EXPECT_EQ(Shape(2, 7), (Shape{7, 7}));
  const std::vector<int64_t> long_dims = {1, 2, 3, 4, 5, 6, 7, 8};
  const Shape from_vector_dims = long_dims;
  EXPECT_EQ(std::vector<int64_t>(from_vector_dims), long_dims);
  EXPECT_EQ(Shape(long_dims.begin() + 2, long_dims.end()), (Shape{3, 4, 5, 6, 7, 8}));
  EXPECT_FALSE((Shape{1, 2}) == (Shape{1, 2, 3}));
  EXPECT_FALSE((Shape{1, 2}) == (Shape{1, 3}));
  EXPECT_EQ(shape_str(Shape{}), "()");
  Shape s = {1, 2};
  s.insert(s.end(), {3, 4});
  s.insert(s.begin(), {0});
  EXPECT_EQ(s, (Shape{0, 1, 2, 3, 4}));
  // A tensor with more dimensions than fit in place.
  const Tensor t = zeros({1, 2, 1, 2, 1, 2, 1, 2});
  EXPECT_EQ(t.numel(), 16);
  EXPECT_EQ(raw::reshape(t, {16}).shape(), (Shape{16}));
  EXPECT_EQ(t.strides(), (Shape{16, 8, 8, 4, 4, 2, 2, 1}));
}

TEST(TensorCreation, ZerosOnesFullScalar) {
  Tensor z = zeros({2, 3});
  EXPECT_EQ(z.dtype(), DType::f32);
  EXPECT_EQ(z.shape(), (Shape{2, 3}));
  EXPECT_EQ(z.strides(), (Shape{3, 1}));
  EXPECT_EQ(values(z), std::vector<double>(6, 0.0));

  Tensor o = ones({4}, DType::f64);
  EXPECT_EQ(o.dtype(), DType::f64);
  EXPECT_EQ(values(o), std::vector<double>(4, 1.0));

  Tensor f = full({2, 2, 2}, -2.5, DType::f32);
  EXPECT_EQ(f.numel(), 8);
  EXPECT_EQ(values(f), std::vector<double>(8, -2.5));

  Tensor b = full({3}, 1.0, DType::boolean);
  EXPECT_EQ(b.to_vector<bool>(), std::vector<bool>({true, true, true}));

  Tensor s = scalar(3.25, DType::f64);
  EXPECT_EQ(s.dim(), 0);
  EXPECT_EQ(s.numel(), 1);
  EXPECT_EQ(s.item(), 3.25);

  Tensor e = zeros({0, 5});
  EXPECT_EQ(e.numel(), 0);
  EXPECT_TRUE(values(e).empty());
}

TEST(TensorCreation, ArangeFromVectorLike) {
  EXPECT_EQ(values(arange(5)), (std::vector<double>{0, 1, 2, 3, 4}));
  EXPECT_EQ(values(arange(3, DType::f64)), (std::vector<double>{0, 1, 2}));
  EXPECT_EQ(arange(0).numel(), 0);

  Tensor a = from_vector({1.f, 2.f, 3.f, 4.f, 5.f, 6.f}, {2, 3});
  EXPECT_EQ(a.dtype(), DType::f32);
  EXPECT_EQ(at(a, {1, 0}), 4.0);
  EXPECT_EQ(at(a, {0, 2}), 3.0);

  Tensor d = from_vector(std::vector<double>{0.1, 0.2}, {2});
  EXPECT_EQ(d.dtype(), DType::f64);
  EXPECT_EQ(values(d), (std::vector<double>{0.1, 0.2}));

  // Converted to float32: the values round to the nearest float.
  Tensor c = from_vector(std::vector<double>{0.1, 1e10}, {2}, DType::f32);
  EXPECT_EQ(c.dtype(), DType::f32);
  EXPECT_EQ(at(c, {0}), static_cast<double>(0.1f));
  EXPECT_EQ(at(c, {1}), static_cast<double>(1e10f));

  Tensor m = from_vector(std::vector<bool>{true, false, true}, {3});
  EXPECT_EQ(m.dtype(), DType::boolean);
  EXPECT_EQ(m.to_vector<bool>(), (std::vector<bool>{true, false, true}));

  Tensor zl = zeros_like(a);
  EXPECT_EQ(zl.shape(), a.shape());
  EXPECT_EQ(zl.dtype(), a.dtype());
  EXPECT_EQ(values(zl), std::vector<double>(6, 0.0));
  EXPECT_FALSE(zl.shares_storage_with(a));
  EXPECT_EQ(empty_like(d).shape(), d.shape());
  EXPECT_EQ(empty_like(d).dtype(), DType::f64);
}

TEST(TensorCreation, DTypeSizesAndNames) {
  EXPECT_EQ(dtype_size(DType::f32), 4u);
  EXPECT_EQ(dtype_size(DType::f64), 8u);
  EXPECT_EQ(dtype_size(DType::boolean), 1u);
  EXPECT_STREQ(dtype_name(DType::f32), "float32");
  EXPECT_STREQ(dtype_name(DType::f64), "float64");
  EXPECT_STREQ(dtype_name(DType::boolean), "bool");
  EXPECT_EQ(zeros({3, 5}).nbytes(), 60u);
  EXPECT_EQ(zeros({3, 5}, DType::f64).nbytes(), 120u);
  EXPECT_EQ(zeros({3, 5}, DType::boolean).nbytes(), 15u);
  EXPECT_TRUE(is_floating(DType::f32));
  EXPECT_TRUE(is_floating(DType::f64));
  EXPECT_FALSE(is_floating(DType::boolean));
}

TEST(TensorCreation, DataIs64ByteAligned) {
  for (int64_t n : {1, 3, 7, 17, 63, 64, 65, 1000, 100003}) {
    for (DType t : {DType::f32, DType::f64, DType::boolean}) {
      Tensor x = empty({n}, t);
      EXPECT_EQ(reinterpret_cast<uintptr_t>(x.raw_data()) % 64, 0u)
          << "n=" << n << " dtype=" << dtype_name(t);
    }
  }
}

// ---- views ----

// Every position of a few sizes (one block, a ragged block after full ones), NaN and both
// infinities, both dtypes and a strided view: the index of the first, against a plain loop.
TEST(TensorCreation, FirstNonFiniteFindsTheFirstOne) {
  for (DType dtype : {DType::f32, DType::f64}) {
    for (int64_t n : {1, 17, 4096 * 2 + 33}) {
      for (int64_t at : {int64_t{0}, n / 2, n - 1}) {
        for (double bad : {std::nan(""), double{INFINITY}, -double{INFINITY}}) {
          std::vector<double> v(static_cast<size_t>(n), 1.5);
          v[static_cast<size_t>(at)] = bad;
          if (at + 1 < n) v[static_cast<size_t>(n - 1)] = bad;  // a later one does not count
          const auto found = first_non_finite(from_vector(v, {n}, dtype));
          ASSERT_TRUE(found.has_value()) << dtype_name(dtype) << " n " << n << " at " << at;
          EXPECT_EQ(found->index, (Shape{at}));
          EXPECT_EQ(std::isnan(found->value), std::isnan(bad));
        }
      }
      EXPECT_FALSE(first_non_finite(full({n}, 1e30, dtype)).has_value());
    }
  }
  Tensor m = zeros({3, 4}, DType::f64);
  m.data<double>()[1 * 4 + 2] = INFINITY;  // (1, 2), at (2, 1) of the transpose
  const auto found = first_non_finite(raw::transpose(m, 0, 1));
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->index, (Shape{2, 1}));
  EXPECT_FALSE(first_non_finite(ones({3}, DType::boolean)).has_value());
}

TEST(TensorCreation, UnravelIndexInvertsCOrderAndRefusesIndicesOutside) {
  const Shape shape = {2, 3, 4};
  for (int64_t flat = 0; flat < 24; ++flat)
    EXPECT_EQ(unravel_index(flat, shape), (Shape{flat / 12, flat / 4 % 3, flat % 4}));
  EXPECT_EQ(unravel_index(0, {}), Shape{});
  for (int64_t flat : {-1, 24})
    EXPECT_THAT(
        [&] { unravel_index(flat, shape); },
        testing::ThrowsMessage<Error>(testing::HasSubstr(str_cat(
            "unravel_index: index ", flat, " is outside the 24 elements of shape (2,3,4)"))));
  EXPECT_THROW(unravel_index(0, {2, 0}), Error);
}

TEST(TensorViews, ReshapeIsAViewAndInfersMinusOne) {
  Tensor x = arange(24);
  Tensor r = raw::reshape(x, {2, 3, 4});
  EXPECT_TRUE(r.shares_storage_with(x));
  EXPECT_EQ(r.shape(), (Shape{2, 3, 4}));
  EXPECT_EQ(r.strides(), (Shape{12, 4, 1}));
  EXPECT_EQ(at(r, {1, 2, 3}), 23.0);
  EXPECT_EQ(at(r, {1, 0, 2}), 14.0);

  Tensor m = raw::reshape(r, {4, -1});
  EXPECT_EQ(m.shape(), (Shape{4, 6}));
  EXPECT_TRUE(m.shares_storage_with(x));
  EXPECT_EQ(at(m, {3, 5}), 23.0);
  EXPECT_EQ(raw::reshape(x, {-1}).shape(), (Shape{24}));
  EXPECT_EQ(raw::reshape(x, {2, -1, 3}).shape(), (Shape{2, 4, 3}));
}

TEST(TensorViews, ReshapeOfTransposedCopiesOnlyWhenNeeded) {
  Tensor x = raw::reshape(arange(6), {2, 3});  // [[0,1,2],[3,4,5]]
  Tensor t = raw::transpose(x, 0, 1);          // [[0,3],[1,4],[2,5]]
  EXPECT_FALSE(t.is_contiguous());
  Tensor flat = raw::reshape(t, {6});  // no strides express this: a copy
  EXPECT_FALSE(flat.shares_storage_with(x));
  EXPECT_EQ(values(flat), (std::vector<double>{0, 3, 1, 4, 2, 5}));

  // Splitting the contiguous last axis of a permuted tensor stays a view.
  Tensor y = raw::reshape(arange(24), {2, 3, 4});
  Tensor p = raw::transpose(y, 0, 1);  // (3,2,4)
  Tensor v = raw::reshape(p, {3, 2, 2, 2});
  EXPECT_TRUE(v.shares_storage_with(y));
  for_each_index(v.shape(), [&](const Shape& i) {
    EXPECT_EQ(at(v, i), at(y, {i[1], i[0], i[2] * 2 + i[3]}));
  });
  // Merging the two leading axes of the permuted tensor cannot be a view.
  Tensor merged = raw::reshape(p, {6, 4});
  EXPECT_FALSE(merged.shares_storage_with(y));
  for_each_index(merged.shape(), [&](const Shape& i) {
    EXPECT_EQ(at(merged, i), at(y, {i[0] % 2, i[0] / 2, i[1]}));
  });
}

TEST(TensorViews, PermuteAndTranspose) {
  Tensor x = uniform_tensor({2, 3, 4}, DType::f32, 1);
  Tensor p = raw::permute(x, {2, 0, 1});
  EXPECT_TRUE(p.shares_storage_with(x));
  EXPECT_EQ(p.shape(), (Shape{4, 2, 3}));
  EXPECT_EQ(p.strides(), (Shape{1, 12, 4}));
  for_each_index(p.shape(), [&](const Shape& i) {
    EXPECT_EQ(at(p, i), at(x, {i[1], i[2], i[0]}));
  });

  Tensor n = raw::permute(x, {-1, -3, -2});  // negative axes
  EXPECT_EQ(n.shape(), (Shape{4, 2, 3}));

  Tensor t = raw::transpose(x, 0, -1);
  EXPECT_TRUE(t.shares_storage_with(x));
  EXPECT_EQ(t.shape(), (Shape{4, 3, 2}));
  for_each_index(t.shape(), [&](const Shape& i) {
    EXPECT_EQ(at(t, i), at(x, {i[2], i[1], i[0]}));
  });
}

TEST(TensorViews, SliceWithStepAndNegativeIndices) {
  Tensor x = raw::reshape(arange(21), {3, 7});
  Tensor s = raw::slice(x, 1, 1, 7, 2);  // columns 1,3,5
  EXPECT_TRUE(s.shares_storage_with(x));
  EXPECT_EQ(s.shape(), (Shape{3, 3}));
  EXPECT_EQ(values(s), (std::vector<double>{1, 3, 5, 8, 10, 12, 15, 17, 19}));

  Tensor neg = raw::slice(x, -1, -4, -1, 2);  // columns 3,5
  EXPECT_EQ(neg.shape(), (Shape{3, 2}));
  EXPECT_EQ(values(neg), (std::vector<double>{3, 5, 10, 12, 17, 19}));

  Tensor rows = raw::slice(x, 0, -2, 100);  // rows 1,2; end clamped
  EXPECT_EQ(rows.shape(), (Shape{2, 7}));
  EXPECT_EQ(at(rows, {0, 0}), 7.0);
  EXPECT_EQ(raw::slice(x, 1, 5, 2).shape(), (Shape{3, 0}));  // empty, not negative

  Tensor n = raw::narrow(x, 1, 2, 3);  // columns 2..4
  EXPECT_TRUE(n.shares_storage_with(x));
  EXPECT_EQ(values(n), (std::vector<double>{2, 3, 4, 9, 10, 11, 16, 17, 18}));
  // A slice of a slice.
  Tensor ss = raw::slice(s, 0, 0, 3, 2);
  EXPECT_EQ(values(ss), (std::vector<double>{1, 3, 5, 15, 17, 19}));
}

TEST(TensorViews, SqueezeUnsqueeze) {
  Tensor x = uniform_tensor({2, 1, 3}, DType::f64, 2);
  Tensor s = raw::squeeze(x, 1);
  EXPECT_TRUE(s.shares_storage_with(x));
  EXPECT_EQ(s.shape(), (Shape{2, 3}));
  EXPECT_EQ(values(s), values(x));
  EXPECT_EQ(raw::squeeze(x, -2).shape(), (Shape{2, 3}));

  Tensor u0 = raw::unsqueeze(s, 0), u1 = raw::unsqueeze(s, 1), ul = raw::unsqueeze(s, -1);
  EXPECT_EQ(u0.shape(), (Shape{1, 2, 3}));
  EXPECT_EQ(u1.shape(), (Shape{2, 1, 3}));
  EXPECT_EQ(ul.shape(), (Shape{2, 3, 1}));
  for (const Tensor& u : {u0, u1, ul}) {
    EXPECT_TRUE(u.shares_storage_with(x));
    EXPECT_TRUE(u.is_contiguous());
    EXPECT_EQ(values(u), values(x));
  }
}

TEST(TensorViews, BroadcastToUsesZeroStrides) {
  Tensor x = from_vector({1.f, 2.f, 3.f}, {3, 1});
  Tensor b = raw::broadcast_to(x, {2, 3, 4});
  EXPECT_TRUE(b.shares_storage_with(x));
  EXPECT_EQ(b.shape(), (Shape{2, 3, 4}));
  EXPECT_EQ(b.strides()[0], 0);
  EXPECT_EQ(b.strides()[2], 0);
  for_each_index(b.shape(), [&](const Shape& i) { EXPECT_EQ(at(b, i), i[1] + 1.0); });
}

TEST(TensorViews, ContiguousCopiesOnlyNonContiguous) {
  Tensor x = uniform_tensor({3, 4}, DType::f32, 3);
  Tensor c = raw::contiguous(x);
  EXPECT_TRUE(c.shares_storage_with(x));
  Tensor t = raw::transpose(x, 0, 1);
  Tensor tc = raw::contiguous(t);
  EXPECT_FALSE(tc.shares_storage_with(x));
  EXPECT_TRUE(tc.is_contiguous());
  EXPECT_EQ(tc.shape(), (Shape{4, 3}));
  for_each_index(tc.shape(), [&](const Shape& i) { EXPECT_EQ(at(tc, i), at(x, {i[1], i[0]})); });
  Tensor cl = raw::clone(x);
  EXPECT_FALSE(cl.shares_storage_with(x));
  EXPECT_EQ(values(cl), values(x));
}

TEST(TensorViews, ConcatSplitStack) {
  Tensor a = raw::reshape(arange(6), {2, 3});
  Tensor b = raw::add_scalar(raw::reshape(arange(4), {2, 2}), 10);
  Tensor c = raw::concat({a, b}, 1);
  EXPECT_EQ(c.shape(), (Shape{2, 5}));
  EXPECT_EQ(values(c), (std::vector<double>{0, 1, 2, 10, 11, 3, 4, 5, 12, 13}));
  Tensor r = raw::concat({a, a}, -2);
  EXPECT_EQ(r.shape(), (Shape{4, 3}));
  EXPECT_EQ(values(r), (std::vector<double>{0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5}));
  // A non-contiguous part.
  Tensor ct = raw::concat({raw::transpose(a, 0, 1), full({1, 2}, 7)}, 0);
  EXPECT_EQ(values(ct), (std::vector<double>{0, 3, 1, 4, 2, 5, 7, 7}));

  std::vector<Tensor> parts = raw::split(c, {3, 1, 1}, 1);
  ASSERT_EQ(parts.size(), 3u);
  for (const Tensor& p : parts) EXPECT_TRUE(p.shares_storage_with(c));
  EXPECT_EQ(values(parts[0]), values(a));
  EXPECT_EQ(values(parts[1]), (std::vector<double>{10, 12}));
  EXPECT_EQ(values(parts[2]), (std::vector<double>{11, 13}));

  Tensor s0 = raw::stack({a, raw::add_scalar(a, 100)}, 0);
  EXPECT_EQ(s0.shape(), (Shape{2, 2, 3}));
  EXPECT_EQ(at(s0, {1, 1, 2}), 105.0);
  Tensor s2 = raw::stack({a, raw::add_scalar(a, 100)}, -1);
  EXPECT_EQ(s2.shape(), (Shape{2, 3, 2}));
  EXPECT_EQ(values(s2), (std::vector<double>{0, 100, 1, 101, 2, 102, 3, 103, 4, 104, 5, 105}));
}

// ---- elementwise binary ops ----

double apply_binary(raw::BinaryOp op, double a, double b) {
  switch (op) {
    case raw::BinaryOp::add:
      return a + b;
    case raw::BinaryOp::sub:
      return a - b;
    case raw::BinaryOp::mul:
      return a * b;
    case raw::BinaryOp::div:
      return a / b;
    case raw::BinaryOp::maximum:
      return std::max(a, b);
    case raw::BinaryOp::minimum:
      return std::min(a, b);
  }
  return 0;
}

const raw::BinaryOp kBinaryOps[] = {raw::BinaryOp::add,     raw::BinaryOp::sub,
                                    raw::BinaryOp::mul,     raw::BinaryOp::div,
                                    raw::BinaryOp::maximum, raw::BinaryOp::minimum};

// out = a op b against a naive loop. The reference is computed in double and rounded to the
// output dtype: for + - * / that is exactly the IEEE float32 result, so the match is exact.
void check_binary(const Tensor& a, const Tensor& b, const Shape& expected_shape) {
  for (raw::BinaryOp op : kBinaryOps) {
    Tensor out = raw::binary(op, a, b);
    EXPECT_EQ(out.dtype(), a.dtype());
    const bool f32 = a.dtype() == DType::f32;
    EXPECT_TRUE(matches(
        out, expected_shape,
        [&](const Shape& i) {
          const double r = apply_binary(op, at_broadcast(a, i), at_broadcast(b, i));
          return f32 ? static_cast<double>(static_cast<float>(r)) : r;
        },
        0, 0))
        << "op " << static_cast<int>(op) << " " << shape_str(a.shape()) << " with "
        << shape_str(b.shape());
  }
}

// OpenBLAS's OpenMP build shares our threads; a pthreads build (another alternative of the same
// library, which a program may load instead) must stay on one thread, or its own pool runs beside
// ours inside every split product.
TEST_F(TensorThreadCount, OpenBLASRunsInOurPoolOrOnOneThread) {
  const int mode = openblas_get_parallel();
  EXPECT_STREQ(openblas_threading(), mode == 0 ? "sequential" : mode == 1 ? "pthreads" : "OpenMP");
  for (const int n : {2, 1, 3}) {
    set_num_threads(n);
    EXPECT_EQ(num_threads(), n);
    EXPECT_EQ(openblas_get_num_threads(), mode == 2 ? n : 1) << openblas_threading() << ", " << n;
  }
}

// The count is the process's: OpenMP's own is per thread, so a count set in main did not reach a
// controller's std::thread, whose regions took OMP_NUM_THREADS (100000 made libgomp exit).
TEST_F(TensorThreadCount, TheCountHoldsOnEveryThread) {
  const auto team_sizes_on_a_new_thread = [](int thread_openmp_setting) {
    std::vector<int> sizes(64, 0);
    std::thread([&] {
      omp_set_num_threads(thread_openmp_setting);  // what this thread's OpenMP would use
      parallel_for(64, kParallelGrain, [&](int64_t i) { sizes[i] = omp_get_num_threads(); });
    }).join();
    return sizes;
  };
  set_num_threads(1);
  EXPECT_EQ(team_sizes_on_a_new_thread(4), std::vector<int>(64, 1));
  set_num_threads(2);
  EXPECT_EQ(team_sizes_on_a_new_thread(1), std::vector<int>(64, 2));
  EXPECT_EQ(team_sizes_on_a_new_thread(max_threads()), std::vector<int>(64, 2));
  // A product on one thread runs outside our regions, in OpenBLAS or oneDNN, which size a team
  // from the calling thread's OpenMP setting: they must not start threads of their own.
  set_num_threads(1);
  const auto os_threads = [] {
    int n = 0;
    for ([[maybe_unused]] const auto& task : std::filesystem::directory_iterator("/proc/self/task"))
      ++n;
    return n;
  };
  const raw::SgemmLibrary chosen = raw::sgemm_library();
  const Tensor a = full({256, 256}, 1.0, DType::f32), b = full({256, 256}, 0.5, DType::f32);
  const int before = os_threads();
  int during = 0;
  std::thread([&] {
    omp_set_num_threads(8);
    for (const raw::SgemmLibrary library :
         {raw::SgemmLibrary::openblas, raw::SgemmLibrary::onednn}) {
      raw::set_sgemm_library(library);
      EXPECT_EQ(raw::matmul(a, b).to_vector<float>()[0], 128.0f);
    }
    during = os_threads();
  }).join();
  raw::set_sgemm_library(chosen);
  EXPECT_EQ(during, before + 1);  // this std::thread alone
  EXPECT_EQ(openblas_get_num_threads(), 1);
}

// matmul_flops() is the calling thread's count: products another thread runs are not in it (a
// profiling tape credited them to its own nodes), and those a parallel_for's workers run are.
TEST_F(TensorThreadCount, MatmulFlopsAreTheCallingThreadsAndItsWorkers) {
  const Tensor a = full({64, 64}, 1.0, DType::f32);
  const int64_t before = raw::matmul_flops();
  std::thread([&] {
    const int64_t other_before = raw::matmul_flops();
    raw::matmul(a, a);
    EXPECT_EQ(raw::matmul_flops() - other_before, 2 * 64 * 64 * 64);
  }).join();
  EXPECT_EQ(raw::matmul_flops(), before);

  set_num_threads(2);
  std::vector<int> worker(8, -1);
  parallel_for(8, kParallelGrain, [&](int64_t i) {
    worker[i] = omp_get_thread_num();
    raw::add_matmul_flops(1000 + i);
  });
  ASSERT_EQ(worker, (std::vector<int>{0, 0, 0, 0, 1, 1, 1, 1}));
  EXPECT_EQ(raw::matmul_flops() - before, 8 * 1000 + 28);
}

// OpenBLAS's OpenMP build lowered a larger count to its MAX_THREADS behind our back, so that
// num_threads() and the count asked for disagreed; the clamp is ours now, and says where it is.
TEST_F(TensorThreadCount, CountsAreClampedToOpenBlasMaxThreads) {
  const std::string config = openblas_get_config();
  ASSERT_THAT(config, testing::HasSubstr("MAX_THREADS=" + std::to_string(max_threads())));
  set_num_threads(max_threads() + 1000);
  EXPECT_EQ(num_threads(), max_threads());
  set_num_threads(0);
  EXPECT_EQ(num_threads(), 1);
}

TEST_F(TensorThreadCount, BinaryBroadcastingShapes) {
  for (int threads : {1, 2})
    for (DType t : {DType::f32, DType::f64}) {
      set_num_threads(threads);
      SCOPED_TRACE(str_cat(dtype_name(t), ", ", threads, " thread(s)"));
      // b is kept away from 0 so div is well defined.
      // Other values on each thread count, so that a stale result from the last pass (the
      // allocator reuses blocks) cannot stand in for work a thread left undone.
      auto A = [&](const Shape& s, uint64_t seed) {
        return uniform_tensor(s, t, seed + 1000 * threads, -2, 2);
      };
      auto B = [&](const Shape& s, uint64_t seed) {
        return uniform_tensor(s, t, seed + 1000 * threads, 0.5, 2);
      };
      check_binary(A({2, 3}, 1), B({2, 3}, 2), {2, 3});
      check_binary(A({3, 1}, 3), B({1, 4}, 4), {3, 4});
      check_binary(A({2, 3, 4}, 5), B({4}, 6), {2, 3, 4});
      check_binary(A({4}, 7), B({2, 3, 4}, 8), {2, 3, 4});
      check_binary(A({2, 3, 4}, 9), B({3, 1}, 10), {2, 3, 4});
      check_binary(A({2, 3}, 11), B({}, 12), {2, 3});
      check_binary(A({}, 13), B({2, 3}, 14), {2, 3});
      check_binary(A({}, 15), B({}, 16), {});
      // Long rows (SIMD body plus tail); 8 x 40001 elements are enough to split over two threads.
      check_binary(A({8, 40001}, 17), B({40001}, 18), {8, 40001});
      check_binary(A({200003}, 19), B({200003}, 20), {200003});
    }
}

TEST(TensorBinary, NonContiguousInputs) {
  for (DType t : {DType::f32, DType::f64}) {
    SCOPED_TRACE(dtype_name(t));
    Tensor a_store = uniform_tensor({5, 3}, t, 21, -2, 2);
    Tensor b_store = uniform_tensor({3, 11}, t, 22, 0.5, 2);
    Tensor a = raw::transpose(a_store, 0, 1);     // (3,5), strides (1,3)
    Tensor b = raw::slice(b_store, 1, 1, 11, 2);  // (3,5), stride 2 along the row
    ASSERT_FALSE(a.is_contiguous());
    ASSERT_FALSE(b.is_contiguous());
    check_binary(a, b, {3, 5});
    check_binary(b, a, {3, 5});
    // Non-contiguous and broadcast at once.
    Tensor col = raw::slice(uniform_tensor({6, 1}, t, 23, 0.5, 2), 0, 0, 6, 2);  // (3,1)
    check_binary(a, col, {3, 5});
    Tensor big = raw::transpose(uniform_tensor({4, 3, 2}, t, 24, 0.5, 2), 0, 2);  // (2,3,4)
    check_binary(big, raw::slice(uniform_tensor({8}, t, 25, 0.5, 2), 0, 1, 8, 2), {2, 3, 4});
  }
}

// Copying a tensor onto a shifted view of itself reads every element before any is written;
// a broadcast destination has no distinct elements to copy into.
TEST(TensorCopy, CopyIntoAnOverlappingViewAndIntoABroadcastView) {
  Tensor x = from_vector(std::vector<double>{0, 1, 2, 3, 4, 5, 6, 7}, {8});
  raw::copy_into(raw::narrow(x, 0, 1, 7), raw::narrow(x, 0, 0, 7));
  EXPECT_EQ(x.to_vector<double>(), (std::vector<double>{0, 0, 1, 2, 3, 4, 5, 6}));
  Tensor y = from_vector(std::vector<double>{0, 1, 2, 3, 4, 5, 6, 7}, {8});
  raw::copy_into(raw::narrow(y, 0, 0, 7), raw::narrow(y, 0, 1, 7));
  EXPECT_EQ(y.to_vector<double>(), (std::vector<double>{1, 2, 3, 4, 5, 6, 7, 7}));
  raw::copy_into(y, y);
  EXPECT_EQ(y.to_vector<double>(), (std::vector<double>{1, 2, 3, 4, 5, 6, 7, 7}));
  EXPECT_THAT(
      error_of([] {
        raw::copy_into(raw::broadcast_to(zeros({1, 3}), {2, 3}), ones({2, 3}));
      }),
      HasSubstr("copy_into: the destination (2,3) is a broadcast view (axis 0 has stride 0)"));
}

// A source that does not broadcast to the destination is named as copy_into's error, not as
// the broadcast_to the caller never called; one that does is copied into every row.
TEST(TensorCopy, ASourceOfTheWrongShapeIsNamedAsCopyIntos) {
  EXPECT_THAT(error_of([] { raw::copy_into(zeros({3}), ones({4})); }),
              HasSubstr("copy_into: cannot copy (4,) into (3,)"));
  EXPECT_THAT(error_of([] {
                raw::copy_into(zeros({2, 3}), ones({2, 1, 3}));
              }),
              HasSubstr("copy_into: cannot copy (2,1,3) into (2,3)"));
  Tensor rows = zeros({2, 3}, DType::f64);
  raw::copy_into(rows, from_vector(std::vector<double>{1, 2, 3}, {3}));
  EXPECT_EQ(rows.to_vector<double>(), (std::vector<double>{1, 2, 3, 1, 2, 3}));
}

TEST_F(TensorThreadCount, BinaryAddIntoAddsInPlace) {
  for (int threads : {1, 2})
    for (DType t : {DType::f32, DType::f64}) {
      set_num_threads(threads);
      SCOPED_TRACE(str_cat(dtype_name(t), ", ", threads, " thread(s)"));
      // Contiguous, with x broadcast; long enough for SIMD body, tail and (on two threads)
      // parallel chunks.
      Tensor dst = uniform_tensor({3, 100003}, t, 27, -2, 2);
      const Tensor x = uniform_tensor({100003}, t, 28, -2, 2);
      // The sums in a plain loop, rounded to the dtype (exact IEEE addition).
      const std::vector<double> d0 = dst.to_vector<double>(), xv = x.to_vector<double>();
      std::vector<double> want(d0.size());
      for (size_t i = 0; i < d0.size(); ++i) {
        const double sum = d0[i] + xv[i % xv.size()];
        want[i] = t == DType::f32 ? static_cast<double>(static_cast<float>(sum)) : sum;
      }
      const void* storage = dst.raw_data();
      raw::add_into(dst, x);
      EXPECT_EQ(dst.raw_data(), storage);
      EXPECT_EQ(dst.to_vector<double>(), want);
      // A strided view: only its elements change.
      Tensor base = uniform_tensor({4, 6}, t, 29, -2, 2);
      const std::vector<double> before = base.to_vector<double>();
      raw::add_into(raw::slice(base, 1, 1, 6, 2), full({4, 3}, 0.5, t));
      const std::vector<double> after = base.to_vector<double>();
      for (size_t i = 0; i < after.size(); ++i) {
        const double sum = before[i] + (i % 6 % 2 == 1 ? 0.5 : 0.0);
        EXPECT_EQ(after[i], t == DType::f32 ? static_cast<double>(static_cast<float>(sum)) : sum)
            << "element " << i;
      }
    }
  EXPECT_THAT(
      error_of([] {
        raw::add_into(raw::broadcast_to(zeros({1, 3}), {2, 3}), zeros({2, 3}));
      }),
      HasSubstr("add_into: the destination (2,3) is a broadcast view (axis 0 has stride 0)"));
  EXPECT_THAT(error_of([] {
                raw::add_into(zeros({2, 3}), zeros({3, 2}));
              }),
              HasSubstr("add_into: cannot add (3,2) into (2,3)"));
  EXPECT_THAT(error_of([] { raw::add_into(zeros({2}), zeros({2}, DType::f64)); }),
              HasSubstr("add_into: dtypes float32 and float64 differ"));
}

// A row longer than 4 * kParallelGrain = 524288 elements is cut into chunks (on two threads,
// split between them); each chunk starts `begin * inner_stride` into its operands. A strided
// (step 2) and a broadcast (step 0) operand of 600001 elements, against plain loops over the
// doubles.
TEST_F(TensorThreadCount, LongStridedRowsAreCutIntoChunksCorrectly) {
  const int64_t n = 600001;
  static_assert(600001 > 4 * kParallelGrain);
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    SCOPED_TRACE(str_cat(threads, " thread(s)"));
    const Tensor a = uniform_tensor({n}, DType::f64, 301, -2, 2);
    const Tensor bs = uniform_tensor({2 * n}, DType::f64, 302, -2, 2);
    const std::vector<double> av = a.to_vector<double>(), bsv = bs.to_vector<double>();
    const Tensor strided = raw::slice(bs, 0, 0, 2 * n, 2);
    const Tensor broadcast = raw::broadcast_to(full({}, 0.75, DType::f64), {n});
    for (const Tensor& b : {strided, broadcast}) {
      const bool step0 = b.strides()[0] == 0;
      SCOPED_TRACE(step0 ? "broadcast operand" : "strided operand");
      const auto b_at = [&](int64_t i) { return step0 ? 0.75 : bsv[2 * i]; };
      const std::vector<double> sum = raw::add(a, b).to_vector<double>();
      const std::vector<double> exp = raw::unary(raw::UnaryOp::exp, b).to_vector<double>();
      const std::vector<double> copy = raw::contiguous(b).to_vector<double>();
      ASSERT_EQ(sum.size(), static_cast<size_t>(n));
      ASSERT_EQ(exp.size(), static_cast<size_t>(n));
      ASSERT_EQ(copy.size(), static_cast<size_t>(n));
      int64_t bad_sum = 0, bad_exp = 0, bad_copy = 0;
      for (int64_t i = 0; i < n; ++i) {
        if (sum[i] != av[i] + b_at(i) && bad_sum++ == 0)
          ADD_FAILURE() << "add: element " << i << " is " << sum[i] << ", expected "
                        << av[i] + b_at(i);
        if (std::abs(exp[i] - std::exp(b_at(i))) > 1e-14 * std::exp(b_at(i)) && bad_exp++ == 0)
          ADD_FAILURE() << "exp: element " << i << " is " << exp[i] << ", expected "
                        << std::exp(b_at(i));
        if (copy[i] != b_at(i) && bad_copy++ == 0)
          ADD_FAILURE() << "contiguous: element " << i << " is " << copy[i] << ", expected "
                        << b_at(i);
      }
      EXPECT_EQ(bad_sum + bad_exp + bad_copy, 0);
    }
  }
}

TEST(TensorBinary, ScalarHelpersAndPow) {
  Tensor x = uniform_tensor({3, 7}, DType::f64, 26, 0.1, 3);
  EXPECT_TRUE(matches(
      raw::add_scalar(x, 2.5), x.shape(), [&](const Shape& i) { return at(x, i) + 2.5; }, 0, 0));
  EXPECT_TRUE(matches(
      raw::mul_scalar(x, -3), x.shape(), [&](const Shape& i) { return at(x, i) * -3; }, 0, 0));
  EXPECT_TRUE(matches(
      raw::mul_scalar(raw::transpose(x, 0, 1), 0.5), {7, 3},
      [&](const Shape& i) {
        return at(x, {i[1], i[0]}) * 0.5;
      },
      0, 0));
}

// ---- unary ops ----

struct UnaryCase {
  const char* name;
  raw::UnaryOp op;
  double (*ref)(double);
  double lo, hi;  // input range
};

const UnaryCase kUnaryCases[] = {
    {"neg", raw::UnaryOp::neg, [](double x) { return -x; }, -10, 10},
    {"exp", raw::UnaryOp::exp, [](double x) { return std::exp(x); }, -20, 20},
    {"log", raw::UnaryOp::log, [](double x) { return std::log(x); }, 1e-3, 100},
    {"sqrt", raw::UnaryOp::sqrt, [](double x) { return std::sqrt(x); }, 0, 100},
    {"rsqrt", raw::UnaryOp::rsqrt, [](double x) { return 1 / std::sqrt(x); }, 1e-3, 100},
    {"square", raw::UnaryOp::square, [](double x) { return x * x; }, -10, 10},
    {"abs", raw::UnaryOp::abs, [](double x) { return std::abs(x); }, -10, 10},
    {"tanh", raw::UnaryOp::tanh, [](double x) { return std::tanh(x); }, -6, 6},
    {"sigmoid", raw::UnaryOp::sigmoid, [](double x) { return 1 / (1 + std::exp(-x)); }, -20, 20},
    {"silu", raw::UnaryOp::silu, [](double x) { return x / (1 + std::exp(-x)); }, -20, 20},
    {"sin", raw::UnaryOp::sin, [](double x) { return std::sin(x); }, -10, 10},
    {"cos", raw::UnaryOp::cos, [](double x) { return std::cos(x); }, -10, 10},
};

// Highway's math functions are accurate to a few ulp; sin/cos lose absolute accuracy near
// their zeros to the argument reduction.
double unary_rtol(DType t) {
  return t == DType::f32 ? 2e-6 : 1e-13;
}
double unary_atol(DType t) {
  return t == DType::f32 ? 1e-6 : 1e-14;
}

TEST(TensorUnary, EveryOpAgainstStdOnSimdTails) {
  for (const UnaryCase& c : kUnaryCases) {
    for (DType t : {DType::f32, DType::f64}) {
      for (int64_t n : {1, 7, 17, 1000, 100003, 300007}) {
        SCOPED_TRACE(str_cat(c.name, " ", dtype_name(t), " n=", n));
        Tensor x = uniform_tensor({n}, t, 100 + n, c.lo, c.hi);
        Tensor y = raw::unary(c.op, x);
        EXPECT_EQ(y.dtype(), t);
        EXPECT_TRUE(matches(
            y, {n}, [&](const Shape& i) { return c.ref(at(x, i)); }, unary_rtol(t), unary_atol(t)));
      }
    }
  }
}

TEST(TensorUnary, NonContiguousAndBroadcastInputs) {
  for (DType t : {DType::f32, DType::f64}) {
    Tensor store = uniform_tensor({9, 4}, t, 31, 0.1, 3);
    Tensor tr = raw::transpose(store, 0, 1);                                // (4,9)
    Tensor st = raw::slice(store, 0, 1, 9, 3);                              // (3,4), row step 3
    Tensor bc = raw::broadcast_to(raw::slice(store, 0, 0, 1), {5, 4});      // stride-0 rows
    Tensor bc_col = raw::broadcast_to(raw::slice(store, 1, 0, 1), {9, 6});  // stride-0 inner
    for (const UnaryCase& c : kUnaryCases) {
      SCOPED_TRACE(str_cat(c.name, " ", dtype_name(t)));
      for (const Tensor& in : {tr, st, bc, bc_col}) {
        EXPECT_TRUE(matches(
            raw::unary(c.op, in), in.shape(), [&](const Shape& i) { return c.ref(at(in, i)); },
            unary_rtol(t), unary_atol(t)));
      }
    }
  }
}

// n = 100003 splits over two threads when the test sets two.
TEST_F(TensorThreadCount, UnaryPowScalar) {
  for (int threads : {1, 2})
    for (DType t : {DType::f32, DType::f64}) {
      set_num_threads(threads);
      for (double p : {3.0, 2.0, 0.5, -0.5, 1.7, -1.0, 0.0}) {
        for (int64_t n : {1, 17, 100003}) {
          SCOPED_TRACE(str_cat(dtype_name(t), " p=", p, " n=", n, ", ", threads, " thread(s)"));
          Tensor x = uniform_tensor({n}, t, 200 + n, 0.05, 4);
          EXPECT_TRUE(matches(
              raw::pow_scalar(x, p), {n}, [&](const Shape& i) { return std::pow(at(x, i), p); },
              unary_rtol(t), unary_atol(t)));
        }
      }
      // Non-contiguous input.
      Tensor x = raw::transpose(uniform_tensor({3, 5}, t, 41, 0.05, 4), 0, 1);
      EXPECT_TRUE(matches(
          raw::pow_scalar(x, 3.0), {5, 3}, [&](const Shape& i) { return std::pow(at(x, i), 3.0); },
          unary_rtol(t), unary_atol(t)));
    }
}

// pow(x, 0.5) once ran sqrt and pow(x, -0.5) 1 / sqrt, which differ from std::pow at -0 (-0 and
// -inf for 0 and inf) and at -inf (NaN for inf and 0).
TEST(Tensor, PowScalarMatchesStdPowAtSignedZerosAndInfinities) {
  const std::vector<double> specials{-0.0, 0.0, -INFINITY, INFINITY, -1.0, NAN};
  for (DType t : {DType::f32, DType::f64})
    for (double p : {0.5, -0.5, 2.0, -1.0, 1.5, 3.0}) {
      SCOPED_TRACE(str_cat(dtype_name(t), " p=", p));
      const std::vector<double> y =
          raw::pow_scalar(raw::to_dtype(from_vector(specials, {6}), t), p).to_vector<double>();
      for (size_t i = 0; i < specials.size(); ++i) {
        const double expected =
            t == DType::f32 ? std::pow(static_cast<float>(specials[i]), static_cast<float>(p))
                            : std::pow(specials[i], p);
        SCOPED_TRACE(str_cat("x=", specials[i]));
        if (std::isnan(expected)) {
          EXPECT_TRUE(std::isnan(y[i])) << y[i];
        } else {
          EXPECT_EQ(y[i], expected);
          EXPECT_EQ(std::signbit(y[i]), std::signbit(expected));
        }
      }
    }
}

// Every element of op(full(17, v)): 17 exercises both the SIMD body and the padded tail.
std::vector<double> unary_of(raw::UnaryOp op, double v, DType t) {
  return values(raw::unary(op, full({17}, v, t)));
}

MATCHER(IsNan, "is NaN") {
  return std::isnan(arg);
}

TEST(TensorUnary, EdgeValues) {
  using raw::UnaryOp;
  using testing::Each;
  using testing::Eq;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (DType t : {DType::f32, DType::f64}) {
    SCOPED_TRACE(dtype_name(t));
    EXPECT_THAT(unary_of(UnaryOp::exp, 1000, t), Each(Eq(kInf)));
    EXPECT_THAT(unary_of(UnaryOp::exp, kInf, t), Each(Eq(kInf)));
    EXPECT_THAT(unary_of(UnaryOp::exp, -1000, t), Each(Eq(0.0)));
    EXPECT_THAT(unary_of(UnaryOp::exp, -kInf, t), Each(Eq(0.0)));
    EXPECT_THAT(unary_of(UnaryOp::exp, nan, t), Each(IsNan()));
    EXPECT_THAT(unary_of(UnaryOp::log, 0, t), Each(Eq(-kInf)));
    EXPECT_THAT(unary_of(UnaryOp::log, -1, t), Each(IsNan()));
    EXPECT_THAT(unary_of(UnaryOp::log, kInf, t), Each(Eq(kInf)));
    EXPECT_THAT(unary_of(UnaryOp::log, nan, t), Each(IsNan()));
    EXPECT_THAT(unary_of(UnaryOp::sigmoid, -1000, t), Each(Eq(0.0)));
    EXPECT_THAT(unary_of(UnaryOp::sigmoid, 1000, t), Each(Eq(1.0)));
    EXPECT_THAT(unary_of(UnaryOp::sigmoid, nan, t), Each(IsNan()));
    EXPECT_THAT(unary_of(UnaryOp::silu, -1000, t), Each(Eq(0.0)));
    EXPECT_THAT(unary_of(UnaryOp::silu, 1000, t), Each(Eq(1000.0)));
    EXPECT_THAT(unary_of(UnaryOp::tanh, 1000, t), Each(Eq(1.0)));
    EXPECT_THAT(unary_of(UnaryOp::tanh, -1000, t), Each(Eq(-1.0)));
    EXPECT_THAT(unary_of(UnaryOp::sqrt, -1, t), Each(IsNan()));
    EXPECT_THAT(unary_of(UnaryOp::sqrt, 0, t), Each(Eq(0.0)));
    EXPECT_THAT(unary_of(UnaryOp::rsqrt, 0, t), Each(Eq(kInf)));
    EXPECT_THAT(unary_of(UnaryOp::abs, -kInf, t), Each(Eq(kInf)));
  }
  // Just below the overflow threshold exp is still finite and accurate (float32 overflows
  // above ln(FLT_MAX) = 88.7228, float64 above ln(DBL_MAX) = 709.7827).
  for (double v : {88.71, 88.722}) {
    const float x = static_cast<float>(v);
    const double want = std::exp(static_cast<double>(x));
    for (double got : unary_of(raw::UnaryOp::exp, x, DType::f32)) {
      EXPECT_TRUE(std::isfinite(got)) << "exp(" << x << ")";
      EXPECT_NEAR(got, want, 1e-6 * want);
    }
  }
  EXPECT_THAT(unary_of(raw::UnaryOp::exp, 88.73, DType::f32), Each(Eq(kInf)));
  for (double v : {709.75, 709.78}) {
    for (double got : unary_of(raw::UnaryOp::exp, v, DType::f64)) {
      EXPECT_TRUE(std::isfinite(got)) << "exp(" << v << ")";
      EXPECT_NEAR(got, std::exp(v), 1e-13 * std::exp(v));
    }
  }
  EXPECT_THAT(unary_of(raw::UnaryOp::exp, 709.79, DType::f64), Each(Eq(kInf)));
}

// Highway's Sin and Cos reduce arguments correctly only up to |x| of about 39000: sin(1e9) was
// -2.855 in float32 and cos(4e9) 4.5e169 in float64. Past that the C library's take over.
TEST(TensorUnary, SinAndCosOfLargeArgumentsMatchTheCLibrary) {
  const std::vector<double> xs = {0.5,  3e4,  -3.2e4, 3.3e4, 4e4, -1e5, 3e7,  1e9,
                                  -4e9, 1e12, 1e17,   -1e20, 3.0, 1e6,  -2.5, 7e8};
  for (DType t : {DType::f32, DType::f64}) {
    SCOPED_TRACE(dtype_name(t));
    const Tensor x = from_vector(xs, {static_cast<int64_t>(xs.size())}, t);
    const std::vector<double> input = values(x), sin = values(raw::unary(raw::UnaryOp::sin, x)),
                              cos = values(raw::unary(raw::UnaryOp::cos, x));
    for (size_t i = 0; i < xs.size(); ++i) {
      // The input as stored, its sine to the dtype's precision (a few ulp of the vector code).
      const double tol = t == DType::f32 ? 1e-6 : 1e-14;
      EXPECT_NEAR(sin[i], std::sin(input[i]), tol) << "sin(" << input[i] << ")";
      EXPECT_NEAR(cos[i], std::cos(input[i]), tol) << "cos(" << input[i] << ")";
    }
    // In place (simd::unary allows out == x): the fallback reads the inputs, not the outputs
    // already written over them.
    Tensor y = raw::clone(x);
    visit_float_dtype(t, [&](auto tag) {
      using T = decltype(tag);
      simd::unary(raw::UnaryOp::sin, y.data<T>(), y.data<T>(), y.numel());
    });
    EXPECT_EQ(values(y), sin);
  }
  EXPECT_THAT(values(raw::unary(raw::UnaryOp::sin, full({5}, kInf))), testing::Each(IsNan()));
}

// x86's max and min return the second operand when either is NaN: maximum(NaN, 1) was 1, and a
// NaN vanished or not by argument order. It propagates from either side, as in NumPy and JAX.
TEST(TensorBinary, MaximumAndMinimumPropagateNaN) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (DType t : {DType::f32, DType::f64}) {
    SCOPED_TRACE(dtype_name(t));
    const Tensor a = from_vector({nan, 1, nan, 2, 5, -kInf, 0, 3, nan}, {9}, t);
    const Tensor b = from_vector({1, nan, 3, nan, 4, 7, -0.0, 3, nan}, {9}, t);
    for (const auto op : {raw::BinaryOp::maximum, raw::BinaryOp::minimum}) {
      const bool is_max = op == raw::BinaryOp::maximum;
      for (const auto& [first, second] : {std::pair{a, b}, std::pair{b, a}}) {
        const std::vector<double> got = values(raw::binary(op, first, second));
        const std::vector<double> x = values(first), y = values(second);
        for (size_t i = 0; i < got.size(); ++i) {
          if (std::isnan(x[i]) || std::isnan(y[i])) {
            EXPECT_TRUE(std::isnan(got[i])) << i;
          } else {
            EXPECT_EQ(got[i], is_max ? std::max(x[i], y[i]) : std::min(x[i], y[i])) << i;
          }
        }
      }
    }
  }
}

// ---- compare, where, logical ----

TEST(TensorCompare, AllOpsWithBroadcasting) {
  // Small integers so that ties occur.
  Tensor a = from_vector({1.f, 2.f, 3.f, 2.f, 0.f, 5.f}, {2, 3});
  Tensor b = from_vector({2.f, 2.f, 2.f}, {3});
  struct Case {
    raw::CompareOp op;
    bool (*ref)(double, double);
  };
  const Case cases[] = {
      {raw::CompareOp::eq, [](double x, double y) { return x == y; }},
      {raw::CompareOp::ne, [](double x, double y) { return x != y; }},
      {raw::CompareOp::lt, [](double x, double y) { return x < y; }},
      {raw::CompareOp::le, [](double x, double y) { return x <= y; }},
      {raw::CompareOp::gt, [](double x, double y) { return x > y; }},
      {raw::CompareOp::ge, [](double x, double y) { return x >= y; }},
  };
  for (const Case& c : cases) {
    Tensor r = raw::compare(c.op, a, b);
    EXPECT_EQ(r.dtype(), DType::boolean);
    EXPECT_TRUE(matches(
        r, {2, 3}, [&](const Shape& i) { return c.ref(at(a, i), at_broadcast(b, i)) ? 1 : 0; }, 0,
        0));
  }
  EXPECT_EQ(raw::compare(raw::CompareOp::lt, a, b).to_vector<bool>(),
            (std::vector<bool>{true, false, false, false, true, false}));
  // Transposed operands, float64.
  Tensor x = uniform_tensor({3, 4}, DType::f64, 51), y = uniform_tensor({4, 3}, DType::f64, 52);
  Tensor r = raw::compare(raw::CompareOp::gt, x, raw::transpose(y, 0, 1));
  EXPECT_TRUE(matches(
      r, {3, 4},
      [&](const Shape& i) {
        return at(x, i) > at(y, {i[1], i[0]}) ? 1 : 0;
      },
      0, 0));
}

TEST(TensorCompare, WhereAndLogical) {
  Tensor cond = from_vector(std::vector<bool>{true, false, true}, {3, 1});
  Tensor a = uniform_tensor({1, 4}, DType::f32, 61);
  Tensor b = scalar(-7, DType::f32);
  Tensor w = raw::where(cond, a, b);
  EXPECT_EQ(w.dtype(), DType::f32);
  EXPECT_TRUE(matches(
      w, {3, 4},
      [&](const Shape& i) { return at_broadcast(cond, i) != 0 ? at_broadcast(a, i) : -7.0; }, 0,
      0));

  Tensor m = from_vector(std::vector<bool>{true, false, false, true}, {2, 2});
  EXPECT_EQ(raw::logical_not(m).to_vector<bool>(), (std::vector<bool>{false, true, true, false}));
  Tensor n = from_vector(std::vector<bool>{true, true}, {2});
  EXPECT_EQ(raw::logical_and(m, n).to_vector<bool>(),
            (std::vector<bool>{true, false, false, true}));
  Tensor col = from_vector(std::vector<bool>{false, true}, {2, 1});
  EXPECT_EQ(raw::logical_and(m, col).to_vector<bool>(),
            (std::vector<bool>{false, false, false, true}));
  EXPECT_EQ(raw::logical_not(raw::transpose(m, 0, 1)).to_vector<bool>(),
            (std::vector<bool>{false, true, true, false}));
}

// ---- reductions ----

enum class Red { sum, mean, max, var };

// The reduction of x over `axes` (empty = all) in double, as a function of the output index.
std::function<double(const Shape&)> naive_reduce(const Tensor& x, std::vector<int64_t> axes,
                                                 bool keepdims, Red kind) {
  const int64_t n = x.dim();
  if (axes.empty())
    for (int64_t i = 0; i < n; ++i) axes.push_back(i);
  std::vector<bool> reduced(n, false);
  for (int64_t a : axes) reduced[a < 0 ? a + n : a] = true;
  Shape rshape;
  for (int64_t i = 0; i < n; ++i)
    if (reduced[i]) rshape.push_back(x.shape()[i]);
  return [=](const Shape& out) {
    // The input index: kept axes from `out`, reduced ones from the inner loop.
    std::vector<double> v;
    for_each_index(rshape, [&](const Shape& r) {
      Shape idx(n);
      size_t o = 0, k = 0;
      for (int64_t i = 0; i < n; ++i) {
        if (reduced[i]) {
          idx[i] = r[k++];
          if (keepdims) ++o;
        } else {
          idx[i] = out[o++];
        }
      }
      v.push_back(at(x, idx));
    });
    double s = 0, m = -kInf;
    for (double e : v) s += e, m = std::max(m, e);
    const double mean = s / static_cast<double>(v.size());
    double ss = 0;
    for (double e : v) ss += (e - mean) * (e - mean);
    switch (kind) {
      case Red::sum:
        return s;
      case Red::mean:
        return mean;
      case Red::max:
        return m;
      case Red::var:
        return ss / static_cast<double>(v.size());
    }
    return 0.0;
  };
}

Shape reduced_shape(const Shape& shape, std::vector<int64_t> axes, bool keepdims) {
  const int64_t n = static_cast<int64_t>(shape.size());
  if (axes.empty())
    for (int64_t i = 0; i < n; ++i) axes.push_back(i);
  Shape out;
  for (int64_t i = 0; i < n; ++i) {
    bool r = false;
    for (int64_t a : axes) r |= (a < 0 ? a + n : a) == i;
    if (!r)
      out.push_back(shape[i]);
    else if (keepdims)
      out.push_back(1);
  }
  return out;
}

Tensor reduce(Red kind, const Tensor& x, const std::vector<int64_t>& axes, bool keepdims) {
  switch (kind) {
    case Red::sum:
      return raw::sum(x, axes, keepdims);
    case Red::mean:
      return raw::mean(x, axes, keepdims);
    case Red::max:
      return raw::max(x, axes, keepdims);
    case Red::var:
      return raw::var(x, axes, keepdims);
  }
  return {};
}

const char* red_name(Red r) {
  const char* names[] = {"sum", "mean", "max", "var"};
  return names[static_cast<int>(r)];
}

TEST(TensorReduce, EveryAxisSetOf3DTensor) {
  const std::vector<std::vector<int64_t>> axis_sets = {
      {0}, {1}, {2}, {-1}, {0, 1}, {0, 2}, {1, 2}, {2, 0}, {}, {0, 1, 2}, {-3, -1}};
  for (DType t : {DType::f32, DType::f64}) {
    Tensor base = uniform_tensor({3, 4, 5}, t, 71, -3, 3);
    // The same values through a non-contiguous view: (5,4,3) permuted back to (3,4,5).
    Tensor perm = raw::permute(raw::contiguous(raw::permute(base, {2, 1, 0})), {2, 1, 0});
    ASSERT_FALSE(perm.is_contiguous());
    for (const Tensor& x : {base, perm}) {
      for (Red kind : {Red::sum, Red::mean, Red::max, Red::var}) {
        for (const auto& axes : axis_sets) {
          for (bool keepdims : {false, true}) {
            SCOPED_TRACE(str_cat(red_name(kind), " ", dtype_name(t), " axes ", shape_str(axes),
                                 " keepdims ", keepdims, " contiguous ", x.is_contiguous()));
            Tensor r = reduce(kind, x, axes, keepdims);
            EXPECT_EQ(r.dtype(), t);
            const double rtol = t == DType::f32 ? 2e-6 : 1e-13;
            const double atol = t == DType::f32 ? 2e-5 : 1e-13;
            EXPECT_TRUE(matches(r, reduced_shape(x.shape(), axes, keepdims),
                                naive_reduce(x, axes, keepdims, kind), rtol, atol));
          }
        }
      }
    }
  }
}

TEST_F(TensorThreadCount, ReduceLargeTensorsParallelPath) {
  // Integer values: every partial sum is exact in float32 (all below 2^24), so sum and max must
  // match the naive double loop exactly, whatever the order of accumulation. On two threads
  // (1000,1000) over axis 1 and (100,10000) over axis 0 run on both.
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    SCOPED_TRACE(str_cat(threads, " thread(s)"));
    for (const Shape& shape : {Shape{1000, 1000}, Shape{100, 10000}}) {
      const int64_t size = shape_numel(shape);
      std::vector<float> ints(size);
      for (int64_t i = 0; i < size; ++i) ints[i] = static_cast<float>((i * 7919) % 13 - 6);
      Tensor xi = from_vector(ints, shape);
      for (const auto& axes : std::vector<std::vector<int64_t>>{{0}, {1}, {}}) {
        SCOPED_TRACE(str_cat(shape_str(shape), " axes ", shape_str(axes)));
        EXPECT_TRUE(matches(raw::sum(xi, axes), reduced_shape(shape, axes, false),
                            naive_reduce(xi, axes, false, Red::sum), 0, 0));
        EXPECT_TRUE(matches(raw::max(xi, axes), reduced_shape(shape, axes, false),
                            naive_reduce(xi, axes, false, Red::max), 0, 0));
      }
    }
    const int64_t n = 1000;
    // Random values for mean and var, in both dtypes, over a non-contiguous view as well.
    for (DType t : {DType::f32, DType::f64}) {
      Tensor x = uniform_tensor({n, n}, t, 72, -1, 3);
      const double tol = t == DType::f32 ? 2e-5 : 1e-12;
      for (const Tensor& v : {x, raw::transpose(x, 0, 1)}) {
        for (const auto& axes : std::vector<std::vector<int64_t>>{{0}, {1}, {}}) {
          for (Red kind : {Red::sum, Red::mean, Red::max, Red::var}) {
            SCOPED_TRACE(str_cat(red_name(kind), " ", dtype_name(t), " ", shape_str(axes)));
            EXPECT_TRUE(matches(reduce(kind, v, axes, true), reduced_shape({n, n}, axes, true),
                                naive_reduce(v, axes, true, kind), tol, tol));
          }
        }
      }
    }
  }
}

// Sums over the leading axes of a contiguous tensor add whole rows at a time. Kept as one
// running float32 sum per column they lost the rows' low bits once the sum outgrew them: the
// mean over 2e6 rows near 100 came out 98.68, and a sum of 2^25 ones stopped at 2^24. The sum,
// the mean and sum_to (which bias gradients go through) against sums in double.
TEST(TensorReduce, LeadingAxesOfMillionsOfRowsMatchTheSumInDouble) {
  const Shape shape = {int64_t{1} << 20, 2, 3};  // 2^21 rows of 3 columns over the axes {0, 1}
  std::mt19937_64 gen(74);
  std::uniform_real_distribution<float> dist(99, 101);
  std::vector<float> v(static_cast<size_t>(shape_numel(shape)));
  for (float& e : v) e = dist(gen);
  std::vector<double> want_sum(3, 0.0);
  for (size_t i = 0; i < v.size(); ++i) want_sum[i % 3] += v[i];
  const double rows = static_cast<double>(shape[0] * shape[1]);
  const Tensor x = from_vector(v, shape);
  const std::vector<double> sum = values(raw::sum(x, {0, 1}));
  const std::vector<double> mean = values(raw::mean(x, {0, 1}, true));
  const std::vector<double> sum_to = values(raw::sum_to(x, {3}));
  ASSERT_EQ(sum.size(), 3u);
  ASSERT_EQ(mean.size(), 3u);
  ASSERT_EQ(sum_to.size(), 3u);
  for (size_t c = 0; c < 3; ++c) {
    SCOPED_TRACE(str_cat("column ", c));
    // A few float32 roundings of the result: a relative error of about 1e-7.
    EXPECT_NEAR(sum[c], want_sum[c], 1e-6 * want_sum[c]);
    EXPECT_NEAR(mean[c], want_sum[c] / rows, 1e-6 * want_sum[c] / rows);
    EXPECT_NEAR(sum_to[c], want_sum[c], 1e-6 * want_sum[c]);
  }
}

// The same sums over many column blocks and a partial last group of rows, on one thread and
// on two: every column is summed once, whichever block and thread it falls in.
TEST_F(TensorThreadCount, LeadingAxesOverWideRowsMatchNaive) {
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    for (DType t : {DType::f32, DType::f64}) {
      const Tensor x = uniform_tensor({300, 9000}, t, 75, -1, 3);
      SCOPED_TRACE(str_cat(threads, " thread(s), ", dtype_name(t)));
      const double tol = t == DType::f32 ? 1e-4 : 1e-11;
      EXPECT_TRUE(
          matches(raw::sum(x, {0}), {9000}, naive_reduce(x, {0}, false, Red::sum), tol, tol));
    }
  }
}

// A NaN anywhere, in a full vector or in the tail, makes the max NaN (NumPy's rule), whichever
// values come after it in its lane.
TEST(TensorReduce, MaxPropagatesNaNFromAnyPosition) {
  for (DType t : {DType::f32, DType::f64})
    for (int64_t n : {1, 7, 16, 37, 100})
      for (int64_t at = 0; at < n; at += 3) {
        std::vector<double> v(n);
        for (int64_t i = 0; i < n; ++i) v[i] = std::sin(1.0 + i);
        v[at] = std::nan("");
        EXPECT_TRUE(std::isnan(raw::max(from_vector(v, {n}, t)).item()))
            << dtype_name(t) << " n " << n << " NaN at " << at;
        v[at] = 5.0;
        EXPECT_EQ(raw::max(from_vector(v, {n}, t)).item(), 5.0);
      }
}

TEST(TensorReduce, SumTo) {
  Tensor g = uniform_tensor({2, 3, 4}, DType::f64, 81);
  struct Case {
    Shape target;
    std::vector<int64_t> axes;  // the axes of g summed, keepdims
  };
  const Case cases[] = {{{3, 1}, {0, 2}}, {{4}, {0, 1}},   {{1, 1, 4}, {0, 1}},
                        {{2, 1, 4}, {1}}, {{}, {0, 1, 2}}, {{3, 4}, {0}}};
  for (const Case& c : cases) {
    SCOPED_TRACE(shape_str(c.target));
    auto full_sum = naive_reduce(g, c.axes, true, Red::sum);
    EXPECT_TRUE(matches(
        raw::sum_to(g, c.target), c.target,
        [&](const Shape& i) {
          // Left-pad the target index to g's rank.
          Shape idx(3 - i.size(), 0);
          idx.insert(idx.end(), i.begin(), i.end());
          return full_sum(idx);
        },
        1e-13, 1e-13));
  }
  Tensor same = raw::sum_to(g, {2, 3, 4});
  EXPECT_EQ(values(same), values(g));
}

// ---- softmax ----

TEST(TensorSoftmax, EveryAxisMatchesNaive) {
  for (DType t : {DType::f32, DType::f64}) {
    Tensor x = uniform_tensor({3, 4, 5}, t, 91, -5, 5);
    const double tol = t == DType::f32 ? 1e-6 : 1e-14;
    for (int64_t axis : {0, 1, 2, -1, -2}) {
      SCOPED_TRACE(str_cat(dtype_name(t), " axis ", axis));
      const int64_t a = axis < 0 ? axis + 3 : axis;
      auto lse = [&](Shape i) {  // log-sum-exp along `a` at i
        double m = -kInf, s = 0;
        for (i[a] = 0; i[a] < x.shape()[a]; ++i[a]) m = std::max(m, at(x, i));
        for (i[a] = 0; i[a] < x.shape()[a]; ++i[a]) s += std::exp(at(x, i) - m);
        return m + std::log(s);
      };
      Tensor sm = raw::softmax(x, axis);
      EXPECT_TRUE(matches(
          sm, x.shape(), [&](const Shape& i) { return std::exp(at(x, i) - lse(i)); }, tol, tol));
      EXPECT_TRUE(matches(
          raw::sum(sm, {axis}), reduced_shape(x.shape(), {axis}, false),
          [](const Shape&) { return 1.0; }, 0, tol * 5));
      EXPECT_TRUE(matches(
          raw::log_softmax(x, axis), x.shape(), [&](const Shape& i) { return at(x, i) - lse(i); },
          tol, tol));
    }
    // A non-contiguous input.
    Tensor tr = raw::transpose(x, 0, 2);  // (5,4,3)
    Tensor sm = raw::softmax(tr, -1);
    EXPECT_TRUE(matches(
        sm, tr.shape(),
        [&](const Shape& i) {
          double s = 0;
          for (int64_t k = 0; k < 3; ++k) s += std::exp(at(tr, {i[0], i[1], k}));
          return std::exp(at(tr, i)) / s;
        },
        tol, tol));
  }
}

// Rows of up to four vectors take a one-pass path (simd.cc: SoftmaxShort), longer rows the
// general one; lengths on both sides of the boundary for either dtype and vector width.
TEST(TensorSoftmax, ShortAndLongRowsMatchNaive) {
  for (DType t : {DType::f32, DType::f64}) {
    const double tol = t == DType::f32 ? 1e-6 : 1e-14;
    for (int64_t n : {1, 7, 16, 18, 31, 32, 33, 64, 65, 130}) {
      SCOPED_TRACE(str_cat(dtype_name(t), " n=", n));
      const Tensor x = uniform_tensor({2, n}, t, 92 + n, -8, 8);
      const Tensor sm = raw::softmax(x, -1);
      for (int64_t r = 0; r < 2; ++r) {
        double m = -kInf, s = 0;
        for (int64_t j = 0; j < n; ++j) m = std::max(m, at(x, {r, j}));
        for (int64_t j = 0; j < n; ++j) s += std::exp(at(x, {r, j}) - m);
        for (int64_t j = 0; j < n; ++j)
          EXPECT_NEAR(at(sm, {r, j}), std::exp(at(x, {r, j}) - m) / s, tol) << r << "," << j;
      }
    }
  }
}

// 2000 rows of 130: on two threads the rows are split between them.
TEST_F(TensorThreadCount, SoftmaxManyRowsMatchNaive) {
  for (int threads : {1, 2})
    for (DType t : {DType::f32, DType::f64}) {
      set_num_threads(threads);
      SCOPED_TRACE(str_cat(dtype_name(t), ", ", threads, " thread(s)"));
      const double tol = t == DType::f32 ? 1e-6 : 1e-14;
      const int64_t rows = 2000, n = 130;
      const Tensor x = uniform_tensor({rows, n}, t, 93, -8, 8);
      const std::vector<double> xv = x.to_vector<double>();
      const std::vector<double> sm = raw::softmax(x, -1).to_vector<double>();
      const std::vector<double> lsm = raw::log_softmax(x, -1).to_vector<double>();
      int64_t bad = 0;
      for (int64_t r = 0; r < rows; ++r) {
        double m = -kInf, s = 0;
        for (int64_t j = 0; j < n; ++j) m = std::max(m, xv[r * n + j]);
        for (int64_t j = 0; j < n; ++j) s += std::exp(xv[r * n + j] - m);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t i = r * n + j;
          const double want = std::exp(xv[i] - m) / s, want_log = xv[i] - m - std::log(s);
          if ((std::abs(sm[i] - want) > tol || std::abs(lsm[i] - want_log) > 10 * tol) &&
              bad++ == 0)
            ADD_FAILURE() << "row " << r << ", column " << j << ": softmax " << sm[i]
                          << ", log_softmax " << lsm[i] << "; expected " << want << " and "
                          << want_log;
        }
      }
      EXPECT_EQ(bad, 0);
    }
}

TEST(TensorSoftmax, MaskedEntriesGiveNoNaN) {
  const double masked = -0.7 * FLT_MAX;
  for (DType t : {DType::f32, DType::f64}) {
    SCOPED_TRACE(dtype_name(t));
    // Row 0: two live entries; row 1: all masked; row 2: one live entry; 19 columns (tail).
    const int64_t cols = 19;
    std::vector<double> v(3 * cols, masked);
    v[0 * cols + 3] = 1.0;
    v[0 * cols + 17] = 2.0;
    v[2 * cols + 5] = -50.0;
    Tensor x = from_vector(v, {3, cols}, t);
    Tensor sm = raw::softmax(x, 1), lsm = raw::log_softmax(x, 1);
    for (double e : values(sm)) EXPECT_FALSE(std::isnan(e));
    for (double e : values(lsm)) EXPECT_FALSE(std::isnan(e));
    const double p3 = 1 / (1 + std::exp(1.0));  // e^1 / (e^1 + e^2)
    const double tol = t == DType::f32 ? 1e-6 : 1e-14;
    EXPECT_TRUE(matches(
        sm, {3, cols},
        [&](const Shape& i) -> double {
          if (i[0] == 0) return i[1] == 3 ? p3 : i[1] == 17 ? 1 - p3 : 0.0;
          if (i[0] == 1) return 1.0 / cols;  // all equal: uniform
          return i[1] == 5 ? 1.0 : 0.0;
        },
        tol, tol));
    EXPECT_NEAR(at(lsm, {0, 3}), std::log(p3), tol);
    EXPECT_NEAR(at(lsm, {0, 17}), std::log(1 - p3), tol);
    EXPECT_NEAR(at(lsm, {1, 0}), -std::log(static_cast<double>(cols)), tol);
    EXPECT_NEAR(at(lsm, {2, 5}), 0.0, tol);
    EXPECT_LT(at(lsm, {0, 0}), -1e30);  // hugely negative, but a number
    // The same along axis 0 (through the transposed path).
    Tensor smt = raw::softmax(raw::transpose(x, 0, 1), 0);
    EXPECT_TRUE(matches(
        smt, {cols, 3},
        [&](const Shape& i) {
          return at(sm, {i[1], i[0]});
        },
        0, tol));
  }
}

TEST(TensorSoftmax, LargeLogitsKeepTheirLogSumExp) {
  // log_softmax is shift invariant: of n equal logits it is -log(n) however large they are, and
  // of big + (0,1,2,3,4) it is log_softmax(0,1,2,3,4). big + k is exact in both dtypes.
  for (DType t : {DType::f32, DType::f64}) {
    SCOPED_TRACE(dtype_name(t));
    const double big = t == DType::f32 ? 1e6 : 1e15;
    const double tol = t == DType::f32 ? 2e-6 : 1e-13;
    EXPECT_TRUE(matches(
        raw::log_softmax(full({2, 5}, big, t), 1), {2, 5},
        [](const Shape&) { return -std::log(5.0); }, tol, tol));
    Tensor x = raw::add_scalar(raw::reshape(arange(10, t), {2, 5}), big);
    double lse = 0;
    for (int k = 0; k < 5; ++k) lse += std::exp(k - 4.0);
    lse = 4 + std::log(lse);
    EXPECT_TRUE(matches(
        raw::log_softmax(x, -1), {2, 5},
        [&](const Shape& i) { return static_cast<double>(i[1]) - lse; }, tol, tol));
    EXPECT_TRUE(matches(
        raw::softmax(x, -1), {2, 5},
        [&](const Shape& i) { return std::exp(static_cast<double>(i[1]) - lse); }, tol, tol));
  }
}

// ---- every compiled SIMD target ----

// The row kernels the fused ops call directly (no raw op reaches them on a chosen target):
// dot, sum_squared_deviation and axpy against double loops, on every tail length; axpy must
// write nothing past the row.
template <class T>
void simd_row_kernels() {
  const DType dtype = std::is_same_v<T, float> ? DType::f32 : DType::f64;
  const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-13;
  for (int64_t n : {1, 3, 5, 7, 9, 17, 33, 63, 130}) {
    SCOPED_TRACE(str_cat(dtype_name(dtype), " n=", n));
    const std::vector<T> a = uniform_tensor({n}, dtype, 1200 + n, -2, 2).template to_vector<T>();
    const std::vector<T> b = uniform_tensor({n}, dtype, 1300 + n, -2, 2).template to_vector<T>();
    double dot = 0, ssd = 0;
    const T mean = T(0.25);
    for (int64_t i = 0; i < n; ++i) {
      dot += static_cast<double>(a[i]) * b[i];
      ssd += (static_cast<double>(a[i]) - mean) * (static_cast<double>(a[i]) - mean);
    }
    EXPECT_NEAR(simd::dot(a.data(), b.data(), n), dot, tol * n) << "dot";
    EXPECT_NEAR(simd::sum_squared_deviation(a.data(), mean, n), ssd, tol * n)
        << "sum_squared_deviation";
    std::vector<T> out(b);
    out.push_back(T(-1));  // guard
    simd::axpy(T(0.75), a.data(), out.data(), n);
    for (int64_t i = 0; i < n; ++i)
      EXPECT_NEAR(out[i], b[i] + 0.75 * static_cast<double>(a[i]), tol) << "axpy " << i;
    EXPECT_EQ(out[n], T(-1)) << "axpy wrote past its row";
  }
}

// The kernels of tensor/simd.cc are compiled for every x86 target Highway supports and picked at
// run time, so the other tests run only the one this machine picks. Each target this CPU can run
// is forced in turn (the pattern of test_packed.cc) and held to the naive loops above: every
// unary op, the binary ops with a step-1 and a step-0 (broadcast) operand, sum, mean, max and
// var of a row, max's NaN rule, softmax and log_softmax, and (simd_row_kernels) the kernels
// only the fused ops call. The lengths leave every tail length
// of 4-, 8- and 16-lane vectors, and 130 takes softmax's long-row path.
TEST(TensorSimdTargets, EveryCompiledTargetMatchesTheNaiveLoops) {
  int tested = 0;
  for (const int64_t target : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(target);
    hwy::GetChosenTarget().Update(hwy::SupportedTargets());
    SCOPED_TRACE(hwy::TargetName(target));
    for (DType t : {DType::f32, DType::f64})
      for (int64_t n : {1, 3, 5, 7, 9, 17, 33, 63, 130}) {
        SCOPED_TRACE(str_cat(dtype_name(t), " n=", n));
        for (const UnaryCase& c : kUnaryCases) {
          const Tensor x = uniform_tensor({n}, t, 500 + n, c.lo, c.hi);
          EXPECT_TRUE(matches(
              raw::unary(c.op, x), {n}, [&](const Shape& i) { return c.ref(at(x, i)); },
              unary_rtol(t), unary_atol(t)))
              << c.name;
        }
        const Tensor a = uniform_tensor({2, n}, t, 600 + n, -2, 2);
        check_binary(a, uniform_tensor({2, n}, t, 700 + n, 0.5, 2), {2, n});
        check_binary(a, uniform_tensor({}, t, 800 + n, 0.5, 2), {2, n});
        check_binary(uniform_tensor({1}, t, 900 + n, -2, 2),
                     uniform_tensor({2, n}, t, 1000 + n, 0.5, 2), {2, n});
        for (Red kind : {Red::sum, Red::mean, Red::max, Red::var}) {
          const double rtol = t == DType::f32 ? 2e-6 : 1e-13, atol = t == DType::f32 ? 2e-5 : 1e-13;
          EXPECT_TRUE(matches(reduce(kind, a, {1}, false), {2}, naive_reduce(a, {1}, false, kind),
                              rtol, atol))
              << red_name(kind);
        }
        std::vector<double> v(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) v[i] = std::sin(1.0 + i);
        for (int64_t pos = 0; pos < n; ++pos) {
          const double kept = v[pos];
          v[pos] = std::nan("");
          EXPECT_TRUE(std::isnan(raw::max(from_vector(v, {n}, t)).item())) << "NaN at " << pos;
          v[pos] = kept;
        }
        const Tensor x = uniform_tensor({2, n}, t, 1100 + n, -8, 8);
        const std::vector<double> xv = x.to_vector<double>();
        const std::vector<double> sm = raw::softmax(x, -1).to_vector<double>();
        const std::vector<double> lsm = raw::log_softmax(x, -1).to_vector<double>();
        const double tol = t == DType::f32 ? 1e-6 : 1e-14;
        for (int64_t r = 0; r < 2; ++r) {
          double m = -kInf, s = 0;
          for (int64_t j = 0; j < n; ++j) m = std::max(m, xv[r * n + j]);
          for (int64_t j = 0; j < n; ++j) s += std::exp(xv[r * n + j] - m);
          for (int64_t j = 0; j < n; ++j) {
            const int64_t i = r * n + j;
            EXPECT_NEAR(sm[i], std::exp(xv[i] - m) / s, tol) << "softmax " << r << "," << j;
            EXPECT_NEAR(lsm[i], xv[i] - m - std::log(s), 10 * tol)
                << "log_softmax " << r << "," << j;
          }
        }
      }
    simd_row_kernels<float>();
    simd_row_kernels<double>();
    ++tested;
  }
  hwy::SetSupportedTargetsForTest(0);
  hwy::GetChosenTarget().Update(hwy::SupportedTargets());
  EXPECT_GE(tested, 2);  // at least AVX2 and one other on any x86-64 CPU this project targets
}

// ---- matmul ----

// C = A @ B in double by a triple loop, with the leading dims broadcast; `abs_out` gets
// sum_k |a_ik b_kj| for the tolerance.
Tensor naive_matmul(const Tensor& a, const Tensor& b, std::vector<double>* abs_out) {
  const int64_t M = a.shape()[a.dim() - 2], K = a.shape()[a.dim() - 1];
  const int64_t N = b.shape()[b.dim() - 1];
  Shape ab(a.shape().begin(), a.shape().end() - 2), bb(b.shape().begin(), b.shape().end() - 2);
  const size_t nb = std::max(ab.size(), bb.size());
  Shape batch(nb);
  for (size_t i = 0; i < nb; ++i) {
    const int64_t da = i + ab.size() >= nb ? ab[i + ab.size() - nb] : 1;
    const int64_t db = i + bb.size() >= nb ? bb[i + bb.size() - nb] : 1;
    batch[i] = da == 1 ? db : da;
  }
  Shape out_shape = batch;
  out_shape.push_back(M);
  out_shape.push_back(N);
  std::vector<double> out(static_cast<size_t>(shape_numel(out_shape)));
  abs_out->assign(out.size(), 0.0);
  size_t flat = 0;
  for_each_index(out_shape, [&](const Shape& o) {
    Shape ia(a.dim()), ib(b.dim());
    for (size_t i = 0; i + 2 < ia.size(); ++i) {
      const size_t oi = i + nb - ab.size();
      ia[i] = a.shape()[i] == 1 ? 0 : o[oi];
    }
    for (size_t i = 0; i + 2 < ib.size(); ++i) {
      const size_t oi = i + nb - bb.size();
      ib[i] = b.shape()[i] == 1 ? 0 : o[oi];
    }
    double s = 0, sa = 0;
    for (int64_t k = 0; k < K; ++k) {
      ia[a.dim() - 2] = o[nb], ia[a.dim() - 1] = k;
      ib[b.dim() - 2] = k, ib[b.dim() - 1] = o[nb + 1];
      const double p = at(a, ia) * at(b, ib);
      s += p;
      sa += std::abs(p);
    }
    out[flat] = s;
    (*abs_out)[flat++] = sa;
  });
  return from_vector(out, out_shape);
}

void check_matmul(const Tensor& a, const Tensor& b) {
  std::vector<double> abs_sum;
  Tensor want = naive_matmul(a, b, &abs_sum);
  Tensor got = raw::matmul(a, b);
  ASSERT_EQ(got.shape(), want.shape()) << shape_str(a.shape()) << " @ " << shape_str(b.shape());
  EXPECT_EQ(got.dtype(), a.dtype());
  const std::vector<double> g = values(got), w = values(want);
  const double eps = a.dtype() == DType::f32 ? 1e-6 : 1e-14;
  int64_t bad = 0;
  for (size_t i = 0; i < g.size(); ++i)
    if (std::abs(g[i] - w[i]) > 4 * eps * (abs_sum[i] + 1)) {
      if (bad++ == 0)
        ADD_FAILURE() << shape_str(a.shape()) << " @ " << shape_str(b.shape()) << ": element " << i
                      << " is " << g[i] << ", expected " << w[i];
    }
  EXPECT_EQ(bad, 0);
}

// x as a (…, rows, cols) operand; transposed: the same values read through a transposed view of
// a (…, cols, rows) tensor.
Tensor operand(const Shape& shape, DType t, uint64_t seed, bool transposed) {
  if (!transposed) return uniform_tensor(shape, t, seed);
  Shape st = shape;
  std::swap(st[st.size() - 1], st[st.size() - 2]);
  return raw::transpose(uniform_tensor(st, t, seed), -1, -2);
}

TEST(TensorMatmul, EveryTransposeCombination) {
  for (DType t : {DType::f32, DType::f64}) {
    for (bool ta : {false, true}) {
      for (bool tb : {false, true}) {
        SCOPED_TRACE(str_cat(dtype_name(t), " a^T=", ta, " b^T=", tb));
        check_matmul(operand({7, 5}, t, 1, ta), operand({5, 9}, t, 2, tb));
        check_matmul(operand({1, 5}, t, 3, ta), operand({5, 9}, t, 4, tb));  // M = 1
        check_matmul(operand({7, 5}, t, 5, ta), operand({5, 1}, t, 6, tb));  // N = 1
        check_matmul(operand({7, 1}, t, 7, ta), operand({1, 9}, t, 8, tb));  // K = 1
        check_matmul(operand({2, 3, 4, 5}, t, 9, ta), operand({5, 6}, t, 10, tb));
        check_matmul(operand({4, 5}, t, 11, ta), operand({2, 5, 6}, t, 12, tb));
        check_matmul(operand({2, 1, 3, 4}, t, 13, ta), operand({1, 5, 4, 6}, t, 14, tb));
        check_matmul(operand({64, 48}, t, 15, ta), operand({48, 80}, t, 16, tb));
      }
    }
  }
}

// raw::gemm with accumulate adds op(A) op(B) to C: against a float64 sum, on the serial path and
// (130 x 96 x 72 on two threads) on the one split over threads, with its transposed operands and
// C's leading dimension wider than its rows.
TEST_F(TensorThreadCount, GemmAccumulatesIntoC) {
  Rng rng(31);
  for (int threads : {1, 2})
    for (const auto [m, n, k] : {std::array<int64_t, 3>{7, 5, 3}, {130, 96, 72}})
      for (bool ta : {false, true})
        for (bool tb : {false, true}) {
          set_num_threads(threads);
          const auto a = rng.normal({m * k}).to_vector<float>();
          const auto b = rng.normal({k * n}).to_vector<float>();
          const int64_t ldc = n + 3;
          std::vector<float> c = rng.normal({m * ldc}).to_vector<float>();
          std::vector<double> want(c.begin(), c.end());
          for (int64_t i = 0; i < m; ++i)
            for (int64_t j = 0; j < n; ++j)
              for (int64_t p = 0; p < k; ++p)
                want[i * ldc + j] += static_cast<double>(ta ? a[p * m + i] : a[i * k + p]) *
                                     (tb ? b[j * k + p] : b[p * n + j]);
          raw::gemm(ta, tb, m, n, k, a.data(), ta ? m : k, b.data(), tb ? k : n, c.data(), ldc,
                    /*accumulate=*/true);
          for (size_t i = 0; i < c.size(); ++i)
            ASSERT_NEAR(c[i], want[i], 1e-4) << m << "x" << n << "x" << k << " " << ta << tb << " "
                                             << i << ", " << threads << " thread(s)";
        }
}

// raw::gemm into a C whose leading dimension is wider than its rows, from operands whose leading
// dimensions are wider than theirs, against a float64 sum; C's padding must stay as it was.
template <class T>
void check_gemm_padded(bool ta, bool tb, int64_t m, int64_t n, int64_t k, Rng& rng) {
  const int64_t lda = (ta ? m : k) + 5, ldb = (tb ? k : n) + 3, ldc = n + 7;
  const DType dtype = std::is_same_v<T, float> ? DType::f32 : DType::f64;
  const auto a = rng.normal({(ta ? k : m) * lda}, dtype).template to_vector<T>();
  const auto b = rng.normal({(tb ? n : k) * ldb}, dtype).template to_vector<T>();
  const T sentinel = T(12345);
  std::vector<T> c(static_cast<size_t>(m * ldc), sentinel);
  raw::gemm(ta, tb, m, n, k, a.data(), lda, b.data(), ldb, c.data(), ldc);
  const double tol = std::is_same_v<T, float> ? 1e-4 : 1e-12;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double want = 0;
      for (int64_t p = 0; p < k; ++p)
        want += static_cast<double>(ta ? a[p * lda + i] : a[i * lda + p]) *
                static_cast<double>(tb ? b[j * ldb + p] : b[p * ldb + j]);
      ASSERT_NEAR(c[i * ldc + j], want, tol * std::sqrt(static_cast<double>(k)))
          << m << "x" << n << "x" << k << " a^T=" << ta << " b^T=" << tb << " at " << i << "," << j;
    }
    for (int64_t j = n; j < ldc; ++j) ASSERT_EQ(c[i * ldc + j], sentinel) << "padding of row " << i;
  }
}

TEST_F(TensorThreadCount, MatmulBatchedBroadcastAndStridedOperands) {
  for (int threads : {1, 2})
    for (DType t : {DType::f32, DType::f64}) {
      set_num_threads(threads);
      SCOPED_TRACE(str_cat(dtype_name(t), ", ", threads, " thread(s)"));
      // Other values on each thread count: a stale result from the last pass (the allocator
      // reuses blocks) cannot stand in for a product a thread left undone.
      const uint64_t s0 = 1000 * threads;
      check_matmul(uniform_tensor({2, 3, 4, 5}, t, s0 + 21), uniform_tensor({5, 6}, t, s0 + 22));
      check_matmul(uniform_tensor({4, 5}, t, s0 + 23), uniform_tensor({2, 5, 6}, t, s0 + 24));
      check_matmul(uniform_tensor({2, 1, 3, 4}, t, s0 + 25),
                   uniform_tensor({1, 5, 4, 6}, t, s0 + 26));
      check_matmul(uniform_tensor({3, 4, 5}, t, s0 + 27), uniform_tensor({3, 5, 2}, t, s0 + 28));
      // Many small products: on two threads the batch-parallel path, each gemm inside the region.
      check_matmul(uniform_tensor({16, 24, 32}, t, s0 + 29),
                   uniform_tensor({16, 32, 20}, t, s0 + 30));
      // Operands gemm cannot read directly: stepped slices, a broadcast row.
      Tensor a_step = raw::slice(uniform_tensor({6, 10}, t, s0 + 31), 1, 0, 10, 2);  // (6,5)
      Tensor b_step = raw::slice(uniform_tensor({10, 4}, t, s0 + 32), 0, 1, 10, 2);  // (5,4)
      check_matmul(a_step, b_step);
      check_matmul(raw::broadcast_to(uniform_tensor({1, 5}, t, s0 + 33), {3, 5}), b_step);
      // A sliced batch (offset and batch stride not the contiguous ones).
      Tensor batch = raw::slice(uniform_tensor({5, 3, 4}, t, s0 + 34), 0, 1, 5, 2);  // (2,3,4)
      check_matmul(batch, uniform_tensor({4, 2}, t, s0 + 35));
      check_matmul(raw::transpose(batch, -1, -2), uniform_tensor({2, 3, 2}, t, s0 + 36));
    }
}

// x W^T with at most 16 rows runs on simd::gemm_nt, not OpenBLAS: every row count of its 4 x 4
// tiles, column counts with partial tiles and blocks, and K with a SIMD tail, against float64.
TEST(TensorMatmul, FewRowsTimesTransposedWeight) {
  Rng rng(21);
  for (int64_t m : {1, 2, 3, 4, 5, 7, 16})
    for (int64_t n : {1, 6, 67, 130})
      for (int64_t k : {1, 15, 16, 37, 256}) {
        const Tensor x = rng.normal({m, k}), w = rng.normal({n, k});
        const Tensor got = raw::matmul(x, raw::transpose(w, 0, 1));
        const Tensor want = raw::matmul(raw::to_dtype(x, DType::f64),
                                        raw::transpose(raw::to_dtype(w, DType::f64), 0, 1));
        const Tensor err = raw::sub(raw::to_dtype(got, DType::f64), want);
        EXPECT_LT(raw::max(raw::unary(raw::UnaryOp::abs, err)).item(), 2e-5 * std::sqrt(k))
            << m << "x" << k << " @ (" << n << "x" << k << ")^T";
      }
  // A strided input (every other row of a bigger matrix) and a row block of a weight.
  const Tensor x = raw::slice(rng.normal({8, 40}), 0, 0, 8, 2);
  const Tensor w = raw::narrow(rng.normal({30, 40}), 0, 10, 9);
  const Tensor got = raw::matmul(x, raw::transpose(w, 0, 1));
  const Tensor want = raw::matmul(raw::contiguous(x), raw::contiguous(raw::transpose(w, 0, 1)));
  EXPECT_LT(raw::max(raw::unary(raw::UnaryOp::abs, raw::sub(got, want))).item(), 1e-5);
}

TEST(TensorMatmul, EmptyInnerDimensionGivesZeros) {
  for (DType t : {DType::f32, DType::f64}) {
    Tensor c = raw::matmul(zeros({3, 0}, t), zeros({0, 4}, t));
    EXPECT_EQ(c.shape(), (Shape{3, 4}));
    EXPECT_EQ(values(c), std::vector<double>(12, 0.0));
    Tensor cb = raw::matmul(zeros({2, 3, 0}, t), zeros({0, 4}, t));
    EXPECT_EQ(cb.shape(), (Shape{2, 3, 4}));
    EXPECT_EQ(values(cb), std::vector<double>(24, 0.0));
    EXPECT_EQ(raw::matmul(zeros({0, 5}, t), zeros({5, 4}, t)).shape(), (Shape{0, 4}));
  }
}

// ---- Rng ----

// Both ways of splitting a product across threads (by columns: 40 x 300; by rows: 300 x 40), with
// every transpose flag, on 1 and 2 threads.
TEST_F(TensorThreadCount, GemmWithPaddedLeadingDimensions) {
  Rng rng(47);
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    SCOPED_TRACE(str_cat(threads, " thread(s)"));
    for (bool ta : {false, true})
      for (bool tb : {false, true}) {
        check_gemm_padded<float>(ta, tb, 40, 300, 260, rng);
        check_gemm_padded<double>(ta, tb, 40, 300, 260, rng);
        check_gemm_padded<float>(ta, tb, 300, 40, 260, rng);
        check_gemm_padded<double>(ta, tb, 300, 40, 260, rng);
      }
  }
}

// Both libraries that run float32 products, on shapes large enough for oneDNN, every transpose
// flag, with and without accumulating into C, against a float64 sum; and with oneDNN's AVX-512
// kernels (where it is the default) on 1 and 2 threads bit-identical, each thread's block summed
// in the order the whole product is. That holds for splits by rows (288 x 40; 33 and 1025 rows,
// whose tails of 1 row join the block before), by columns of 288 or 33, and for the policy's
// conditioning path (64 x 1536 x 1024, B^T: 64 x 384 here), but not for 40 x 128 x 1024 with B
// transposed, whose column blocks round otherwise than the whole. OpenBLAS's blocks round as
// the whole only with some of its kernels (test_fused.cc, openblas_splits_exactly).
TEST_F(TensorThreadCount, EverySgemmLibraryMatchesFloat64OnOneAndTwoThreads) {
  struct Case {
    int64_t m, n, k;
    bool same_bits;
  };
  const raw::SgemmLibrary chosen = raw::sgemm_library();
  Rng rng(53);
  for (const raw::SgemmLibrary library : {raw::SgemmLibrary::onednn, raw::SgemmLibrary::openblas})
    for (const bool exact = library == raw::SgemmLibrary::onednn &&
                            raw::default_sgemm_library() == raw::SgemmLibrary::onednn;
         const Case& s :
         {Case{288, 40, 72, exact}, Case{40, 288, 72, exact}, Case{33, 20, 1000, exact},
          Case{1025, 48, 64, exact}, Case{20, 33, 1000, exact}, Case{64, 384, 1024, exact},
          Case{40, 128, 1024, false}})
      for (bool ta : {false, true})
        for (bool tb : {false, true})
          for (bool accumulate : {false, true}) {
            const auto [m, n, k, same_bits] = s;
            SCOPED_TRACE(str_cat(raw::sgemm_library_name(library), " ", m, "x", n, "x", k,
                                 " a^T=", ta, " b^T=", tb, " accumulate=", accumulate));
            const auto a = rng.normal({m * k}).to_vector<float>();
            const auto b = rng.normal({k * n}).to_vector<float>();
            const auto c0 = rng.normal({m * n}).to_vector<float>();
            raw::set_sgemm_library(library);
            std::vector<std::vector<float>> results;
            for (int threads : {1, 2}) {
              set_num_threads(threads);
              std::vector<float> c = c0;
              raw::gemm(ta, tb, m, n, k, a.data(), ta ? m : k, b.data(), tb ? k : n, c.data(), n,
                        accumulate);
              results.push_back(c);
            }
            raw::set_sgemm_library(chosen);
            if (same_bits) {
              EXPECT_TRUE(results[0] == results[1]) << "1 and 2 threads differ";
            }
            for (int r = 0; r < (same_bits ? 1 : 2); ++r)  // with the same bits, one suffices
              for (int64_t i = 0; i < m; ++i)
                for (int64_t j = 0; j < n; ++j) {
                  double want = accumulate ? c0[i * n + j] : 0.0;
                  for (int64_t p = 0; p < k; ++p)
                    want += static_cast<double>(ta ? a[p * m + i] : a[i * k + p]) *
                            (tb ? b[j * k + p] : b[p * n + j]);
                  ASSERT_NEAR(results[r][i * n + j], want, 1e-4 * std::sqrt(static_cast<double>(k)))
                      << "at " << i << "," << j << ", " << r + 1 << " thread(s)";
                }
          }
}

// The two libraries round differently: products that are not bit-identical show that oneDNN,
// when chosen, runs (a refused call is an error, never OpenBLAS in its place).
TEST(TensorMatmul, TheChosenSgemmLibraryRunsTheProduct) {
  const raw::SgemmLibrary chosen = raw::sgemm_library();
  Rng rng(59);
  const Tensor a = rng.normal({256, 1024}), b = rng.normal({1024, 96});
  raw::set_sgemm_library(raw::SgemmLibrary::onednn);
  const std::vector<float> onednn = raw::matmul(a, b).to_vector<float>();
  raw::set_sgemm_library(raw::SgemmLibrary::openblas);
  const std::vector<float> openblas = raw::matmul(a, b).to_vector<float>();
  raw::set_sgemm_library(chosen);
  EXPECT_NE(onednn, openblas);
  EXPECT_LT(test::max_abs_diff(from_vector(onednn, {256, 96}), from_vector(openblas, {256, 96})),
            1e-3);
}

TEST(TensorMatmul, AnUnknownSgemmLibraryIsNamed) {
  EXPECT_EQ(raw::parse_sgemm_library("openblas"), raw::SgemmLibrary::openblas);
  EXPECT_EQ(raw::parse_sgemm_library("onednn"), raw::SgemmLibrary::onednn);
  EXPECT_THAT([] { raw::parse_sgemm_library("mkl"); },
              testing::ThrowsMessage<Error>(
                  testing::HasSubstr("unknown sgemm library 'mkl': choose onednn or openblas")));
}

// A body that throws on one thread: the exception comes out of parallel_for, after every other
// item has run, instead of ending the program from inside the OpenMP region.
TEST_F(TensorThreadCount, ParallelForRethrowsAnExceptionAfterTheRegion) {
  set_num_threads(2);
  std::atomic<int> done{0};
  EXPECT_THAT(
      [&] {
        parallel_for(64, kParallelGrain, [&](int64_t i) {
          if (i == 17) fail("item ", i, " failed");
          ++done;
        });
      },
      testing::ThrowsMessage<Error>(testing::HasSubstr("item 17 failed")));
  EXPECT_EQ(done.load(), 63);
}

// run_as_team: one region for many loops. Each loop's items run once each, split across the
// team's threads as OpenMP's static schedule splits them, and a worker's products are counted
// for the thread that leads.
TEST_F(TensorThreadCount, ATeamRunsEachLoopOnAllItsThreads) {
  set_num_threads(2);
  std::vector<int> runs(64, 0), thread(64, -1);
  int regions_seen = -1;
  const int64_t flops_before = raw::matmul_flops();
  run_as_team([&] {
    for (int loop = 0; loop < 3; ++loop)
      parallel_for(64, kParallelGrain, [&](int64_t i) {
        ++runs[i];
        thread[i] = omp_get_thread_num();
        raw::add_matmul_flops(1);
      });
    regions_seen = omp_get_level();
  });
  EXPECT_EQ(runs, std::vector<int>(64, 3));
  EXPECT_EQ(std::count(thread.begin(), thread.begin() + 32, 0), 32);
  EXPECT_EQ(std::count(thread.begin() + 32, thread.end(), 1), 32);
  EXPECT_EQ(regions_seen, 1);  // one region, entered once, for all three loops
  EXPECT_EQ(raw::matmul_flops() - flops_before, 3 * 64);
}

TEST_F(TensorThreadCount, ATeamOnOneThreadOrInsideAnotherIsTheCallAlone) {
  set_num_threads(1);
  int level = -1;
  run_as_team([&] { level = omp_get_level(); });
  EXPECT_EQ(level, 0);
  set_num_threads(2);
  std::vector<int> inner_levels;
  run_as_team([&] { run_as_team([&] { inner_levels.push_back(omp_get_level()); }); });
  EXPECT_EQ(inner_levels, std::vector<int>{1});
}

// An exception from either thread's share comes out of the loop, after the other items ran, and
// the team goes on; one from the call itself comes out of run_as_team.
TEST_F(TensorThreadCount, ATeamRethrowsFromEitherThreadAndGoesOn) {
  set_num_threads(2);
  for (const int64_t failing : {5, 50}) {
    SCOPED_TRACE(failing);
    std::atomic<int> done{0};
    int after = 0;
    run_as_team([&] {
      EXPECT_THAT(
          [&] {
            parallel_for(64, kParallelGrain, [&](int64_t i) {
              if (i == failing) fail("item ", i, " failed");
              ++done;
            });
          },
          testing::ThrowsMessage<Error>(testing::HasSubstr(str_cat("item ", failing, " failed"))));
      parallel_for(64, kParallelGrain, [&](int64_t) { ++done; });
      after = done.load();
    });
    EXPECT_EQ(after, 63 + 64);
  }
  EXPECT_THAT([] { run_as_team([] { fail("the call failed"); }); },
              testing::ThrowsMessage<Error>(testing::HasSubstr("the call failed")));
}

// A product inside a team is split by the team, with the values it has outside one.
TEST_F(TensorThreadCount, AProductInsideATeamIsTheProductOutside) {
  set_num_threads(2);
  for (const auto& [m, k, n] : {std::array<int64_t, 3>{256, 192, 320}, {40, 1024, 128}}) {
    const Tensor a = uniform_tensor({m, k}, DType::f32, 1),
                 b = uniform_tensor({k, n}, DType::f32, 2);
    const Tensor outside = raw::matmul(a, b);
    Tensor inside;
    run_as_team([&] { inside = raw::matmul(a, b); });
    EXPECT_EQ(inside.to_vector<float>(), outside.to_vector<float>())
        << m << " x " << k << " x " << n;
  }
}

// A loop or a split product inside an item of a team's loop runs on the thread of the item. The
// leader once posted such an inner loop to the team while the workers still ran the outer one:
// items were lost or run twice, and the team could wait forever.
TEST_F(TensorThreadCount, ALoopInsideATeamLoopRunsOnItsThread) {
  set_num_threads(2);
  constexpr int64_t kOuter = 2, kInner = 64, kReps = 200;
  std::vector<std::atomic<int>> runs(kOuter * kInner);
  run_as_team([&] {
    for (int64_t rep = 0; rep < kReps; ++rep)
      parallel_for(kOuter, kParallelGrain, [&](int64_t i) {
        parallel_for(kInner, kParallelGrain, [&](int64_t j) { ++runs[i * kInner + j]; });
      });
  });
  for (size_t i = 0; i < runs.size(); ++i) EXPECT_EQ(runs[i].load(), kReps) << "item " << i;
  // A batched product: a parallel_for over the batch whose items each split a gemm.
  const Tensor a = uniform_tensor({4, 96, 96}, DType::f32, 3),
               b = uniform_tensor({4, 96, 96}, DType::f32, 4);
  const Tensor outside = raw::matmul(a, b);
  for (int rep = 0; rep < 20; ++rep) {
    Tensor inside;
    run_as_team([&] { inside = raw::matmul(a, b); });
    ASSERT_EQ(inside.to_vector<float>(), outside.to_vector<float>()) << "rep " << rep;
  }
}

#ifdef __linux__
// Under OMP_PROC_BIND the runtime binds this thread to the first place before main; a program
// started unbound runs on every place, and the thread's binding is back afterwards. Without the
// variable the test runs itself again with it.
TEST(ThreadAffinity, AProgramStartedUnboundSeesEveryPlace) {
  if (omp_get_num_places() == 0) {
    ASSERT_EQ(std::getenv("MMDIT_AFFINITY_CHILD"), nullptr)
        << "OMP_PROC_BIND=true made no places in the child";
    const testing::TestInfo* test = testing::UnitTest::GetInstance()->current_test_info();
    const std::string command =
        str_cat("MMDIT_AFFINITY_CHILD=1 OMP_PROC_BIND=true '",
                std::filesystem::read_symlink("/proc/self/exe").string(),
                "' --gtest_filter=", test->test_suite_name(), ".", test->name(), " 2>&1");
    FILE* child = popen(command.c_str(), "r");
    ASSERT_NE(child, nullptr) << command;
    std::string out;
    char line[512];
    while (std::fgets(line, sizeof line, child)) out += line;
    ASSERT_EQ(pclose(child), 0) << command << "\n" << out;
    EXPECT_THAT(out, testing::HasSubstr("[  PASSED  ] 1 test.")) << out;
    return;
  }
  cpu_set_t places, bound, started, after;
  CPU_ZERO(&places);
  for (int p = 0; p < omp_get_num_places(); ++p) {
    std::vector<int> ids(static_cast<size_t>(omp_get_place_num_procs(p)));
    omp_get_place_proc_ids(p, ids.data());
    for (const int id : ids) CPU_SET(id, &places);
  }
  ASSERT_EQ(sched_getaffinity(0, sizeof bound, &bound), 0);
  if (CPU_COUNT(&places) > 1) {
    EXPECT_EQ(CPU_COUNT(&bound), 1) << "the runtime bound nothing";
  }
  start_program_unbound([&] { ASSERT_EQ(sched_getaffinity(0, sizeof started, &started), 0); });
  ASSERT_EQ(sched_getaffinity(0, sizeof after, &after), 0);
  EXPECT_TRUE(CPU_EQUAL(&started, &places))
      << CPU_COUNT(&started) << " CPUs for the program, " << CPU_COUNT(&places) << " places";
  EXPECT_TRUE(CPU_EQUAL(&after, &bound)) << "the binding was not restored";
}
#endif

TEST_F(TensorThreadCount, RngIsReproducibleAndThreadIndependent) {
  Rng a(42), b(42), c(43);
  const std::vector<double> va = values(a.normal({1000})), vb = values(b.normal({1000}));
  EXPECT_EQ(va, vb);
  EXPECT_NE(va, values(c.normal({1000})));
  EXPECT_NE(va, values(a.normal({1000})));  // the next draw differs
  EXPECT_EQ(a.counter(), 2u);

  // 1e6 draws go through the parallel path.
  for (DType t : {DType::f32, DType::f64}) {
    set_num_threads(1);
    Rng r1(7);
    const std::vector<double> n1 = values(r1.normal({1000, 1000}, t));
    const std::vector<double> u1 = values(r1.uniform({1000001}, t, -2, 3));
    set_num_threads(2);
    Rng r2(7);
    EXPECT_EQ(n1, values(r2.normal({1000, 1000}, t)));
    EXPECT_EQ(u1, values(r2.uniform({1000001}, t, -2, 3)));
  }
  // set_state reproduces a generator's stream.
  Rng s(9);
  s.normal({3});
  Rng s2(0);
  s2.set_state(9, 1);
  EXPECT_EQ(values(s.uniform({5})), values(s2.uniform({5})));
  // Prefixes agree: element i does not depend on the total size.
  Rng p1(11), p2(11);
  const std::vector<double> small = values(p1.normal({5})), big = values(p2.normal({6}));
  EXPECT_EQ(small, std::vector<double>(big.begin(), big.begin() + 5));
}

TEST(TensorRng, NormalMomentsAndUniformRange) {
  Rng rng(123);
  const std::vector<double> n = values(rng.normal({1000000}, DType::f64));
  double s = 0, ss = 0;
  for (double v : n) s += v, ss += v * v;
  const double mean = s / 1e6, var = ss / 1e6 - mean * mean;
  EXPECT_NEAR(mean, 0.0, 0.01);  // standard error 0.001
  EXPECT_NEAR(std::sqrt(var), 1.0, 0.01);
  const std::vector<double> m = values(rng.normal({100000}, DType::f32, 5, 2));
  s = ss = 0;
  for (double v : m) s += v, ss += v * v;
  EXPECT_NEAR(s / 1e5, 5.0, 0.05);
  EXPECT_NEAR(std::sqrt(ss / 1e5 - (s / 1e5) * (s / 1e5)), 2.0, 0.05);

  for (DType t : {DType::f32, DType::f64}) {
    const std::vector<double> u = values(rng.uniform({1000000}, t, -2, 3));
    double lo = kInf, hi = -kInf, sum = 0;
    for (double v : u) lo = std::min(lo, v), hi = std::max(hi, v), sum += v;
    EXPECT_GE(lo, -2.0);
    EXPECT_LT(hi, 3.0);
    EXPECT_LT(lo, -1.99);  // the range is covered
    EXPECT_GT(hi, 2.99);
    EXPECT_NEAR(sum / 1e6, 0.5, 0.01);
  }
}

TEST(TensorRng, UniformFloat32NeverReachesHigh) {
  // Regression: element 295652 of this draw is within 2^-25 of 1 in double, and used to round
  // to exactly 1.0f.
  Rng rng;
  rng.set_state(1, 6);
  const std::vector<float> u = rng.uniform({295653}, DType::f32, 0, 1).to_vector<float>();
  EXPECT_LT(u.back(), 1.0f);
  EXPECT_GT(u.back(), 0.999999f);
  // A high that float32 cannot represent: values stay below it as doubles too.
  Rng r2(3);
  for (double v : values(r2.uniform({100000}, DType::f32, 0, 0.1))) ASSERT_LT(v, 0.1);
}

TEST(TensorRng, SplitGivesIndependentGenerators) {
  Rng a(5);
  Rng c1 = a.split(), c2 = a.split();
  EXPECT_NE(c1.seed(), c2.seed());
  EXPECT_NE(values(c1.normal({100})), values(c2.normal({100})));
  Rng b(5);
  EXPECT_EQ(b.split().seed(), c1.seed());
}

// ---- printing ----

TEST(TensorPrint, SmallTensors) {
  Tensor x = from_vector({1.f, 2.f, 3.f, 4.f, 5.f, 6.5f}, {2, 3});
  const std::string s = to_string(x);
  EXPECT_THAT(s, HasSubstr("dtype=float32, shape=(2,3)"));
  EXPECT_EQ(s,
            "tensor([[1.0000, 2.0000, 3.0000],\n"
            "        [4.0000, 5.0000, 6.5000]], dtype=float32, shape=(2,3))");
  EXPECT_EQ(to_string(from_vector(std::vector<double>{-1.5, 2}, {2})),
            "tensor([-1.5000,  2.0000], dtype=float64, shape=(2,))");
  EXPECT_EQ(to_string(scalar(2)), "tensor(2.0000, dtype=float32, shape=())");
  EXPECT_EQ(to_string(from_vector(std::vector<bool>{true, false}, {2})),
            "tensor([ True, False], dtype=bool, shape=(2,))");
  EXPECT_THAT(to_string(from_vector({1e-6f, 1.f}, {2})), HasSubstr("1.0000e-06"));
  // A view prints its own values.
  EXPECT_THAT(to_string(raw::transpose(x, 0, 1)), HasSubstr("[[1.0000, 4.0000],"));
  std::ostringstream os;
  os << x;
  EXPECT_EQ(os.str(), s);
  EXPECT_EQ(to_string(Tensor()), "tensor(undefined)");
}

TEST(TensorPrint, LargeTensorsAreElided) {
  const std::string s = to_string(arange(2000));
  EXPECT_THAT(s,
              HasSubstr("[   0.0000,    1.0000,    2.0000, ..., 1997.0000, 1998.0000, 1999.0000]"));
  EXPECT_THAT(s, HasSubstr("shape=(2000,)"));
  EXPECT_LT(s.size(), 200u);
}

// ---- errors ----

TEST(TensorErrors, MessagesNameTheOpAndShapes) {
  const Tensor a = zeros({2, 3}), x3 = zeros({2, 3, 4});
  EXPECT_THAT(error_of([] {
                raw::matmul(zeros({3, 4}), zeros({5, 6}));
              }),
              HasSubstr("matmul: shapes (3,4) and (5,6) are incompatible"));
  EXPECT_THAT(error_of([] {
                raw::matmul(zeros({2, 3, 4}), zeros({3, 4, 5}));
              }),
              HasSubstr("matmul: shapes (2,3,4) and (3,4,5) are incompatible (their batch "
                        "dimensions do not broadcast)"));
  EXPECT_THAT(error_of([] {
                raw::matmul(zeros({4}), zeros({4, 2}));
              }),
              HasSubstr("matmul: shapes (4,) and (4,2) are incompatible (both need at least 2 "
                        "dimensions)"));
  EXPECT_THAT(error_of([] {
                raw::matmul(zeros({2, 2}), zeros({2, 2}, DType::f64));
              }),
              HasSubstr("matmul: dtypes float32 and float64"));
  EXPECT_THAT(error_of([&] { raw::add(a, zeros({4})); }),
              HasSubstr("add: shapes (2,3) and (4,) cannot be broadcast together"));
  EXPECT_THAT(error_of([&] {
                raw::mul(x3, zeros({3, 1, 4}));
              }),
              HasSubstr("mul: shapes (2,3,4) and (3,1,4) cannot be broadcast together"));
  EXPECT_THAT(error_of([&] {
                raw::add(a, zeros({2, 3}, DType::f64));
              }),
              HasSubstr("add: dtypes float32 and float64 differ (shapes (2,3) and (2,3))"));
  EXPECT_THAT(
      error_of([&] { raw::sum(x3, {3}); }),
      HasSubstr("sum: axis 3 is out of range for a tensor with 3 dimensions (shape (2,3,4))"));
  EXPECT_THAT(error_of([&] { raw::max(x3, {-4}); }),
              HasSubstr("max: axis -4 is out of range for a tensor with 3 dimensions"));
  EXPECT_THAT(error_of([&] {
                raw::sum(x3, {1, -2});
              }),
              HasSubstr("sum: an axis is repeated in the reduction over shape (2,3,4)"));
  EXPECT_THAT(error_of([&] {
                raw::permute(x3, {0, 1});
              }),
              HasSubstr("permute: 2 axes given for a tensor of shape (2,3,4)"));
  EXPECT_THAT(error_of([&] {
                raw::permute(x3, {0, 1, 3});
              }),
              HasSubstr("permute: axis 3 is out of range for a tensor with 3 dimensions"));
  EXPECT_THAT(error_of([&] {
                raw::permute(x3, {0, 1, 1});
              }),
              HasSubstr("permute: axis 1 repeated"));
  EXPECT_THAT(error_of([&] { raw::squeeze(x3, 1); }),
              HasSubstr("squeeze: axis 1 of shape (2,3,4) has size 3, not 1"));
  EXPECT_THAT(error_of([&] { raw::squeeze(x3, 3); }),
              HasSubstr("squeeze: axis 3 is out of range for a tensor with 3 dimensions"));
  EXPECT_THAT(error_of([&] {
                raw::reshape(a, {4, 2});
              }),
              HasSubstr("reshape: cannot reshape (2,3) (6 elements) to (4,2)"));
  EXPECT_THAT(error_of([&] {
                raw::reshape(a, {4, -1});
              }),
              HasSubstr("reshape: cannot reshape (2,3) to (4,-1)"));
  EXPECT_THAT(error_of([&] {
                raw::reshape(a, {-1, -1});
              }),
              HasSubstr("reshape: more than one -1 in (-1,-1)"));
  EXPECT_THAT(error_of([&] { a.data<double>(); }),
              HasSubstr("data<float64>: tensor has dtype float32"));
  EXPECT_THAT(error_of([&] {
                raw::broadcast_to(zeros({3}), {2, 4});
              }),
              HasSubstr("broadcast_to: cannot broadcast (3,) to (2,4)"));
  EXPECT_THAT(error_of([&] {
                raw::broadcast_to(zeros({2, 3, 4}), {3, 4});
              }),
              HasSubstr("broadcast_to: cannot broadcast (2,3,4) to (3,4)"));
  EXPECT_TRUE(raw::broadcasts_to({3, 1}, {2, 3, 4}));
  EXPECT_TRUE(raw::broadcasts_to({}, {2}));
  EXPECT_FALSE(raw::broadcasts_to({3}, {2, 4}));
  EXPECT_FALSE(raw::broadcasts_to({2, 3, 4}, {3, 4}));
  EXPECT_THAT(error_of([&] {
                raw::concat({a, zeros({3, 4})}, 0);
              }),
              HasSubstr("concat: shapes (2,3) and (3,4) differ outside axis 0"));
  EXPECT_THAT(error_of([&] {
                raw::split(a, {1, 1}, 1);
              }),
              HasSubstr("split: sizes add up to 2 but axis 1 of shape (2,3) has 3"));
  EXPECT_THAT(error_of([&] {
                raw::stack({a, zeros({3, 2})}, 0);
              }),
              HasSubstr("stack: shapes (2,3) and (3,2) differ"));
  // The axis ranges name the positions the new axis may take, not the input's rank.
  EXPECT_THAT(
      error_of([] {
        raw::unsqueeze(zeros({2, 3, 4}), 4);
      }),
      HasSubstr("unsqueeze: axis 4 is out of range [-4, 3] for unsqueeze of shape (2,3,4)"));
  EXPECT_THAT(
      error_of([] {
        raw::unsqueeze(zeros({2, 3, 4}), -5);
      }),
      HasSubstr("unsqueeze: axis -5 is out of range [-4, 3] for unsqueeze of shape (2,3,4)"));
  EXPECT_THAT(
      error_of([&] {
        raw::stack({a, a}, 3);
      }),
      HasSubstr("stack: axis 3 is out of range [-3, 2] for stacking tensors of shape (2,3)"));
  EXPECT_THAT(error_of([&] {
                raw::split(a, {4, -1}, 1);
              }),
              HasSubstr("split: size -1 (part 1) is negative"));
  EXPECT_THAT(error_of([&] { raw::narrow(a, 1, 2, 2); }),
              HasSubstr("narrow: [2, 4) is outside axis 1 of shape (2,3)"));
  EXPECT_THAT(error_of([&] { raw::slice(a, 0, 0, 2, 0); }),
              HasSubstr("slice: step must be positive, got 0"));
  EXPECT_THAT(error_of([&] { raw::where(a, a, a); }),
              HasSubstr("where: condition must be bool, got float32"));
  EXPECT_THAT(error_of([&] { raw::unary(raw::UnaryOp::exp, zeros({2}, DType::boolean)); }),
              HasSubstr("expected a float32 or float64 tensor, got bool of shape (2,)"));
  EXPECT_THAT(error_of([&] { a.item(); }),
              HasSubstr("item: tensor of shape (2,3) has 6 elements, expected 1"));
  EXPECT_THAT(error_of([] {
                from_vector({1.f, 2.f}, {3});
              }),
              HasSubstr("from_vector: 2 values do not fill shape (3,)"));
  EXPECT_THAT(error_of([] { Tensor().shape(); }), HasSubstr("undefined"));
  EXPECT_THAT(error_of([] {
                NamedTensors n;
                n.at("w");
              }),
              HasSubstr("no tensor named 'w'"));
}

// ---- allocator ----

TEST(TensorAllocator, CachedBlocksAreReused) {
  const Shape shape{12347};
  const size_t rounded = Storage(12347 * 4).bytes();  // and leaves a block of that size cached
  EXPECT_EQ(rounded, 57344u);                         // 7 * 8192: 4 classes from 32 to 64 KiB
  const AllocatorStats s0 = allocator_stats();
  EXPECT_GE(s0.cached_bytes, rounded);
  {
    Tensor t = empty(shape);
    const AllocatorStats s1 = allocator_stats();
    EXPECT_EQ(s1.system_allocs, s0.system_allocs);  // taken from the cache
    EXPECT_EQ(s1.cached_bytes, s0.cached_bytes - rounded);
    EXPECT_EQ(s1.live_bytes, s0.live_bytes + rounded);
    EXPECT_GE(s1.peak_live_bytes, s1.live_bytes);
  }
  for (int i = 0; i < 10; ++i) Tensor t = empty(shape);
  EXPECT_EQ(allocator_stats().system_allocs, s0.system_allocs);
  const AllocatorStats s2 = allocator_stats();
  EXPECT_EQ(s2.live_bytes, s0.live_bytes);
  EXPECT_EQ(s2.cached_bytes, s0.cached_bytes);

  // After the cache is released, the same request goes to the system again.
  release_cached_memory();
  EXPECT_EQ(allocator_stats().cached_bytes, 0u);
  const size_t before = allocator_stats().system_allocs;
  { Tensor t = empty(shape); }
  EXPECT_EQ(allocator_stats().system_allocs, before + 1);
}

TEST(TensorAllocator, SizeClasses) {
  EXPECT_EQ(Storage(0).bytes(), 64u);
  EXPECT_EQ(Storage(65).bytes(), 128u);
  EXPECT_EQ(Storage(4096).bytes(), 4096u);
  EXPECT_EQ(Storage(4097).bytes(), 5120u);
  EXPECT_EQ(Storage(6000).bytes(), 6144u);
  EXPECT_EQ(Storage(8192).bytes(), 8192u);
  EXPECT_EQ(Storage((size_t{1} << 20) + 1).bytes(), size_t{5} << 18);
}

// A shape that grows by a row each step, as a sequence length or batch size varies: every size
// was a new block, kept forever (200 system allocations, 127.7 MiB cached and nothing live).
TEST(TensorAllocator, VaryingShapesShareBlocks) {
  const AllocatorStats s0 = allocator_stats();
  for (int64_t step = 0; step < 200; ++step) {
    { Tensor t = empty({1024 * (64 + step)}); }
    const AllocatorStats s = allocator_stats();
    ASSERT_LE(s.cached_bytes, s.cache_limit_bytes);
  }
  const AllocatorStats s1 = allocator_stats();
  EXPECT_EQ(s1.live_bytes, s0.live_bytes);
  // 256 KiB to 1.03 MiB fall in 10 classes: 256, 320, 384, 448, 512, 640, 768, 896, 1024 and
  // 1280 KiB, 6528 KiB in all.
  EXPECT_LE(s1.system_allocs - s0.system_allocs, 10u);
  EXPECT_LE(s1.cached_bytes, s0.cached_bytes + (size_t{6528} << 10));
}

// A training step of fixed shapes takes all its blocks from the cache after the first step. This
// one frees 334 MiB between steps, more than the cache's fixed minimum (256 MiB) and more than it
// ever had live at once (its temporaries are of different classes): a limit of one peak evicted
// blocks every step.
TEST(TensorAllocator, FixedShapesReuseTheirBlocksEveryStep) {
  const auto step = [] {
    // Activations, kept for backward (never written, so hardly paged in).
    std::vector<Tensor> saved;
    for (int i = 0; i < 8; ++i) saved.push_back(empty({10 << 20}));  // 40 MiB each
    for (int64_t n : {5, 3000, 70000, 70001, 123457}) saved.push_back(empty({n}));
    for (int64_t n : {999, 250000, 250000, 3 << 20}) Tensor temporary = empty({n});
  };
  step();
  const AllocatorStats s0 = allocator_stats();
  for (int i = 0; i < 10; ++i) step();
  const AllocatorStats s1 = allocator_stats();
  EXPECT_EQ(s1.system_allocs, s0.system_allocs);
  EXPECT_EQ(s1.evictions, s0.evictions);
  EXPECT_EQ(s1.cached_bytes, s0.cached_bytes);
}

// Sizes used one after the other, each freed before the next is asked for: the peak stays at one
// block while the freed blocks add up past the limit, and the least recently freed ones go.
TEST(TensorAllocator, TheLeastRecentlyFreedBlocksGoBeyondTheLimit) {
  release_cached_memory();
  const AllocatorStats s0 = allocator_stats();
  std::vector<int64_t> sizes;  // in floats: 4 size classes per power of two from 1.25 MiB up
  size_t freed = 0;
  for (int64_t n = int64_t{5} << 16; freed <= s0.cache_limit_bytes;
       n += static_cast<int64_t>(std::bit_floor(static_cast<uint64_t>(n)) / 4)) {
    { Tensor t = empty({n}); }
    sizes.push_back(n);
    freed += static_cast<size_t>(n) * 4;
    const AllocatorStats s = allocator_stats();
    ASSERT_LE(s.cached_bytes, s.cache_limit_bytes);
  }
  const AllocatorStats s1 = allocator_stats();
  EXPECT_EQ(s1.cache_limit_bytes, s0.cache_limit_bytes);  // the peak stayed below it
  EXPECT_GT(s1.evictions, s0.evictions);
  EXPECT_EQ(s1.system_allocs, s0.system_allocs + sizes.size());
  { Tensor newest = empty({sizes.back()}); }
  EXPECT_EQ(allocator_stats().system_allocs, s1.system_allocs);
  { Tensor oldest = empty({sizes.front()}); }
  EXPECT_EQ(allocator_stats().system_allocs, s1.system_allocs + 1);
  release_cached_memory();
}

// Debian 12's OpenBLAS runs its SSE3 Prescott kernels on CPUs newer than itself; mmdit starts
// again with the widest core the CPU can run, and leaves a core that already uses them alone.
TEST(BlasCore, ChoosesTheWidestKernelsTheCpuRuns) {
  const mmdit::CpuFeatures none{};
  const mmdit::CpuFeatures avx2{.avx2_fma = true};
  const mmdit::CpuFeatures avx512{.avx2_fma = true, .avx512 = true};
  const mmdit::CpuFeatures bf16{.avx2_fma = true, .avx512 = true, .avx512_bf16 = true};
  EXPECT_EQ(mmdit::better_openblas_core("Prescott", bf16), "Cooperlake");
  EXPECT_EQ(mmdit::better_openblas_core("Prescott", avx512), "SkylakeX");
  EXPECT_EQ(mmdit::better_openblas_core("Haswell", bf16), "Cooperlake");
  EXPECT_EQ(mmdit::better_openblas_core("Nehalem", avx2), "Haswell");
  EXPECT_EQ(mmdit::better_openblas_core("Prescott", none), "");
  EXPECT_EQ(mmdit::better_openblas_core("Haswell", avx2), "");
  EXPECT_EQ(mmdit::better_openblas_core("Zen", avx2), "");
  for (const char* core : {"SkylakeX", "Cooperlake", "SapphireRapids"})
    EXPECT_EQ(mmdit::better_openblas_core(core, bf16), "") << core;
  // This machine: a CPU that reports AVX-512 also reports AVX2 and FMA.
  const mmdit::CpuFeatures here = mmdit::cpu_features();
  if (here.avx512) {
    EXPECT_TRUE(here.avx2_fma);
  }
  if (here.avx512_bf16) {
    EXPECT_TRUE(here.avx512);
  }
}

// ---- messages ----

TEST(StrCat, FormatsEveryArgumentAsOperatorShiftDoes) {
  const std::string name = "blocks";
  const char* scope = "attn";
  const uint8_t byte = 65;  // a char type: printed as the character, as ostream does
  std::ostringstream expected;
  expected << name << "." << 3 << scope << ' ' << -7L << " " << 2.5 << " " << 1e-300 << " " << true
           << " " << byte << " " << int64_t{1} - (int64_t{1} << 62) << " "
           << uint64_t{18446744073709551615u} << std::string_view("|");
  EXPECT_EQ(str_cat(name, ".", 3, scope, ' ', -7L, " ", 2.5, " ", 1e-300, " ", true, " ", byte, " ",
                    int64_t{1} - (int64_t{1} << 62), " ", uint64_t{18446744073709551615u},
                    std::string_view("|")),
            expected.str());
  EXPECT_EQ(str_cat("x", static_cast<const char*>(nullptr), 0), "x(null)0");
}

}  // namespace
}  // namespace mmdit
