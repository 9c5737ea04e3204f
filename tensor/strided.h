// Walks tensors of one shape (already broadcast) as rows: the dims are coalesced where the
// layouts allow, the last dim becomes a contiguous-or-strided "row", and a row function sees
// raw pointers. Elementwise kernels only ever deal with rows.
#pragma once

#include <array>
#include <cstdint>

#include "tensor/parallel.h"
#include "tensor/tensor.h"

namespace mmdit::detail {

template <int N>
struct RowPlan {
  Shape outer;                            // sizes of the dims outside the row
  std::array<Shape, N> outer_strides;     // per operand, in elements
  int64_t inner = 1;                      // row length
  std::array<int64_t, N> inner_stride{};  // per operand, in elements
};

template <int N>
RowPlan<N> plan_rows(const Shape& shape, const std::array<const Shape*, N>& strides) {
  Shape dims;
  std::array<Shape, N> st;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == 1) continue;
    const bool merge = !dims.empty() && [&] {
      for (int k = 0; k < N; ++k)
        if (st[k].back() != (*strides[k])[i] * shape[i]) return false;
      return true;
    }();
    if (merge) {
      dims.back() *= shape[i];
      for (int k = 0; k < N; ++k) st[k].back() = (*strides[k])[i];
    } else {
      dims.push_back(shape[i]);
      for (int k = 0; k < N; ++k) st[k].push_back((*strides[k])[i]);
    }
  }
  RowPlan<N> plan;
  if (dims.empty()) return plan;
  plan.inner = dims.back();
  dims.pop_back();
  plan.outer = dims;
  for (int k = 0; k < N; ++k) {
    plan.inner_stride[k] = st[k].back();
    st[k].pop_back();
    plan.outer_strides[k] = st[k];
  }
  return plan;
}

// Calls row(ptrs, inner_strides, n) over every row (long rows in chunks), in parallel when
// large. `base` holds each operand's first-element pointer and `elem` its element size.
template <int N, class RowFn>
void for_each_row(const RowPlan<N>& plan, const std::array<char*, N>& base,
                  const std::array<size_t, N>& elem, RowFn&& row) {
  const int64_t rows = shape_numel(plan.outer);
  const int64_t chunk = plan.inner > 4 * kParallelGrain ? kParallelGrain : plan.inner;
  const int64_t chunks = plan.inner == 0 ? 0 : (plan.inner + chunk - 1) / chunk;
  parallel_for(rows * chunks, chunk, [&](int64_t task) {
    int64_t r = task / chunks, c = task % chunks;
    std::array<char*, N> ptrs = base;
    for (int64_t d = static_cast<int64_t>(plan.outer.size()) - 1; d >= 0; --d) {
      const int64_t idx = r % plan.outer[d];
      r /= plan.outer[d];
      for (int k = 0; k < N; ++k)
        ptrs[k] += idx * plan.outer_strides[k][d] * static_cast<int64_t>(elem[k]);
    }
    const int64_t begin = c * chunk;
    for (int k = 0; k < N; ++k)
      ptrs[k] += begin * plan.inner_stride[k] * static_cast<int64_t>(elem[k]);
    row(ptrs, plan.inner_stride, std::min(chunk, plan.inner - begin));
  });
}

}  // namespace mmdit::detail
