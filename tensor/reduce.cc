// Reductions and softmax. The reduced axes are brought to the end (a view; a copy only when the
// layout needs one) so that every kernel reduces contiguous rows.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "tensor/ops.h"
#include "tensor/parallel.h"
#include "tensor/simd.h"

namespace mmdit::raw {
namespace {

struct Reduction {
  std::vector<int64_t> axes;  // sorted, unique
  Shape out_shape;            // with keepdims applied
  Shape kept_shape;           // without the reduced axes
  int64_t inner = 1;          // elements reduced into each output
};

Reduction plan_reduction(const Tensor& x, std::vector<int64_t> axes, bool keepdims,
                         const char* op) {
  Reduction r;
  if (axes.empty())
    for (int64_t i = 0; i < x.dim(); ++i) axes.push_back(i);
  for (int64_t& a : axes) a = normalize_axis(a, x.shape(), op);
  std::sort(axes.begin(), axes.end());
  MMDIT_CHECK(std::adjacent_find(axes.begin(), axes.end()) == axes.end(), op,
              ": an axis is repeated in the reduction over shape ", shape_str(x.shape()));
  r.axes = axes;
  for (int64_t i = 0; i < x.dim(); ++i) {
    const bool reduced = std::binary_search(axes.begin(), axes.end(), i);
    if (reduced)
      r.inner *= x.shape()[i];
    else
      r.kept_shape.push_back(x.shape()[i]);
    if (!reduced)
      r.out_shape.push_back(x.shape()[i]);
    else if (keepdims)
      r.out_shape.push_back(1);
  }
  return r;
}

// x as a contiguous (outer, inner) matrix with the reduced axes last.
Tensor reduced_last(const Tensor& x, const Reduction& r) {
  std::vector<int64_t> order;
  for (int64_t i = 0; i < x.dim(); ++i)
    if (!std::binary_search(r.axes.begin(), r.axes.end(), i)) order.push_back(i);
  order.insert(order.end(), r.axes.begin(), r.axes.end());
  return reshape(contiguous(permute(x, order)), {shape_numel(r.kept_shape), r.inner});
}

// True when the reduced axes are exactly the leading ones and x is contiguous: then the
// reduction is a sum of contiguous rows, done without a transposed copy.
bool reduces_leading(const Tensor& x, const Reduction& r) {
  if (!x.is_contiguous() || r.axes.empty() || r.axes.size() == static_cast<size_t>(x.dim()))
    return false;
  for (size_t i = 0; i < r.axes.size(); ++i)
    if (r.axes[i] != static_cast<int64_t>(i)) return false;
  return true;
}

template <class T, class RowFn>
Tensor reduce_rows(const Tensor& x, const Reduction& r, RowFn row) {
  Tensor m = reduced_last(x, r);
  Tensor out = empty(r.out_shape, x.dtype());
  const T* in = m.data<T>();
  T* o = out.data<T>();
  const int64_t inner = r.inner;
  parallel_for(m.shape()[0], inner, [&](int64_t i) { o[i] = row(in + i * inner, inner); });
  return out;
}

// The rows are added a group at a time into a partial sum in T, and the partials into a total in
// double: one running float32 sum over all the rows stops growing once it outweighs a row by
// 2^24 (2^25 ones summed to 2^24) and drifts long before (the mean over 2e6 rows near 100 was
// 98.68). A group of 128 rows keeps the float32 error near that of the SIMD row sums, and the
// adds into double are 1/128 of the work. The partial is 64-byte aligned: a vector store that
// straddles two cache lines on every row made the (1024, 512) bias gradient 20% slower.
template <class T>
Tensor sum_leading(const Tensor& x, const Reduction& r) {
  Tensor out = zeros(r.out_shape, x.dtype());
  const int64_t cols = shape_numel(r.kept_shape), rows = r.inner;
  const T* in = x.data<T>();
  T* o = out.data<T>();
  constexpr int64_t kBlock = 4096, kGroup = 128;
  const int64_t blocks = (cols + kBlock - 1) / kBlock;
  parallel_for(blocks, rows * std::min(cols, kBlock), [&](int64_t b) {
    const int64_t c0 = b * kBlock, n = std::min(kBlock, cols - c0);
    if (rows <= kGroup) {  // one group: its partial is the sum
      for (int64_t row = 0; row < rows; ++row) simd::axpy(T(1), in + row * cols + c0, o + c0, n);
      return;
    }
    // From the tensor allocator: aligned, and cached across steps.
    const Tensor partial_buffer = empty({n}, x.dtype()), total_buffer = zeros({n}, DType::f64);
    T* partial = partial_buffer.data<T>();
    double* total = total_buffer.data<double>();
    for (int64_t first = 0; first < rows; first += kGroup) {
      const int64_t last = std::min(rows, first + kGroup);
      std::copy_n(in + first * cols + c0, n, partial);
      for (int64_t row = first + 1; row < last; ++row)
        simd::axpy(T(1), in + row * cols + c0, partial, n);
      for (int64_t j = 0; j < n; ++j) total[j] += partial[j];
    }
    for (int64_t j = 0; j < n; ++j) o[c0 + j] = static_cast<T>(total[j]);
  });
  return out;
}

}  // namespace

Tensor sum(const Tensor& x, std::vector<int64_t> axes, bool keepdims) {
  check_float(x, "sum");
  Reduction r = plan_reduction(x, std::move(axes), keepdims, "sum");
  return visit_float_dtype(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    if (reduces_leading(x, r)) return sum_leading<T>(x, r);
    return reduce_rows<T>(x, r, [](const T* p, int64_t n) { return simd::sum(p, n); });
  });
}

Tensor mean(const Tensor& x, std::vector<int64_t> axes, bool keepdims) {
  check_float(x, "mean");
  Reduction r = plan_reduction(x, axes, keepdims, "mean");
  MMDIT_CHECK(r.inner > 0, "mean: reducing shape ", shape_str(x.shape()), " over no elements");
  return mul_scalar(sum(x, axes, keepdims), 1.0 / static_cast<double>(r.inner));
}

Tensor max(const Tensor& x, std::vector<int64_t> axes, bool keepdims) {
  check_float(x, "max");
  Reduction r = plan_reduction(x, std::move(axes), keepdims, "max");
  MMDIT_CHECK(r.inner > 0, "max: reducing shape ", shape_str(x.shape()), " over no elements");
  return visit_float_dtype(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    return reduce_rows<T>(x, r, [](const T* p, int64_t n) { return simd::max(p, n); });
  });
}

Tensor var(const Tensor& x, std::vector<int64_t> axes, bool keepdims) {
  check_float(x, "var");
  Reduction r = plan_reduction(x, std::move(axes), keepdims, "var");
  MMDIT_CHECK(r.inner > 0, "var: reducing shape ", shape_str(x.shape()), " over no elements");
  return visit_float_dtype(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    return reduce_rows<T>(x, r, [](const T* p, int64_t n) {
      const T m = simd::sum(p, n) / static_cast<T>(n);
      return simd::sum_squared_deviation(p, m, n) / static_cast<T>(n);
    });
  });
}

Tensor sum_to(const Tensor& g, const Shape& shape) {
  if (g.shape() == shape) return g;
  MMDIT_CHECK(g.dim() >= static_cast<int64_t>(shape.size()), "sum_to: cannot reduce ",
              shape_str(g.shape()), " to ", shape_str(shape));
  const int64_t lead = g.dim() - static_cast<int64_t>(shape.size());
  std::vector<int64_t> axes;
  for (int64_t i = 0; i < g.dim(); ++i) {
    if (i < lead)
      axes.push_back(i);
    else if (shape[i - lead] == 1 && g.shape()[i] != 1)
      axes.push_back(i);
    else
      MMDIT_CHECK(shape[i - lead] == g.shape()[i], "sum_to: cannot reduce ", shape_str(g.shape()),
                  " to ", shape_str(shape));
  }
  if (axes.empty()) return reshape(g, shape);
  return reshape(sum(g, axes, true), shape);
}

namespace {

template <bool kLog>
Tensor softmax_impl(const Tensor& x, int64_t axis, const char* op) {
  check_float(x, op);
  axis = normalize_axis(axis, x.shape(), op);
  const bool last = axis == x.dim() - 1;
  Tensor moved = last ? contiguous(x) : contiguous(transpose(x, axis, -1));
  Tensor out = empty(moved.shape(), x.dtype());
  const int64_t n = moved.shape().back(), rows = n == 0 ? 0 : moved.numel() / n;
  visit_float_dtype(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* in = moved.data<T>();
    T* o = out.data<T>();
    parallel_for(rows, 4 * n, [&](int64_t r) {
      if constexpr (kLog)
        simd::log_softmax(in + r * n, o + r * n, n);
      else
        simd::softmax(in + r * n, o + r * n, n);
    });
    return out;
  });
  return last ? out : contiguous(transpose(out, axis, -1));
}

}  // namespace

Tensor softmax(const Tensor& x, int64_t axis) {
  return softmax_impl<false>(x, axis, "softmax");
}
Tensor log_softmax(const Tensor& x, int64_t axis) {
  return softmax_impl<true>(x, axis, "log_softmax");
}

}  // namespace mmdit::raw
