// The differentiable ops: each computes with the raw kernel (tensor/ops.h) and records itself,
// with its backward, when an input is on the active tape. Model code uses these.
#pragma once

#include <vector>

#include "autodiff/tape.h"
#include "tensor/ops.h"

namespace mmdit {

// ---- elementwise, NumPy broadcasting ----
Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);
Tensor maximum(const Tensor& a, const Tensor& b);
Tensor minimum(const Tensor& a, const Tensor& b);
Tensor add_scalar(const Tensor& x, double s);
Tensor mul_scalar(const Tensor& x, double s);

Tensor neg(const Tensor& x);
Tensor exp(const Tensor& x);
Tensor log(const Tensor& x);
Tensor sqrt(const Tensor& x);
Tensor rsqrt(const Tensor& x);
Tensor square(const Tensor& x);
Tensor abs(const Tensor& x);
Tensor tanh(const Tensor& x);
Tensor sigmoid(const Tensor& x);
Tensor silu(const Tensor& x);
Tensor sin(const Tensor& x);
Tensor cos(const Tensor& x);
Tensor pow(const Tensor& x, double p);

// Differentiable in a and b; cond is a bool mask.
Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b);
// Comparisons give bool tensors and no gradient.
inline Tensor eq(const Tensor& a, const Tensor& b) {
  return raw::compare(raw::CompareOp::eq, a, b);
}
inline Tensor lt(const Tensor& a, const Tensor& b) {
  return raw::compare(raw::CompareOp::lt, a, b);
}
inline Tensor le(const Tensor& a, const Tensor& b) {
  return raw::compare(raw::CompareOp::le, a, b);
}
inline Tensor gt(const Tensor& a, const Tensor& b) {
  return raw::compare(raw::CompareOp::gt, a, b);
}
inline Tensor ge(const Tensor& a, const Tensor& b) {
  return raw::compare(raw::CompareOp::ge, a, b);
}

// ---- reductions (empty axes = all) ----
Tensor sum(const Tensor& x, std::vector<int64_t> axes = {}, bool keepdims = false);
Tensor mean(const Tensor& x, std::vector<int64_t> axes = {}, bool keepdims = false);
// The gradient is shared equally between tied maxima.
Tensor max(const Tensor& x, std::vector<int64_t> axes = {}, bool keepdims = false);
Tensor var(const Tensor& x, std::vector<int64_t> axes = {}, bool keepdims = false);
Tensor softmax(const Tensor& x, int64_t axis = -1);
Tensor log_softmax(const Tensor& x, int64_t axis = -1);

Tensor matmul(const Tensor& a, const Tensor& b);

// ---- views and copies ----
Tensor reshape(const Tensor& x, const Shape& shape);
Tensor permute(const Tensor& x, const std::vector<int64_t>& axes);
Tensor transpose(const Tensor& x, int64_t a, int64_t b);
Tensor slice(const Tensor& x, int64_t axis, int64_t start, int64_t end, int64_t step = 1);
Tensor narrow(const Tensor& x, int64_t axis, int64_t start, int64_t length);
Tensor squeeze(const Tensor& x, int64_t axis);
Tensor unsqueeze(const Tensor& x, int64_t axis);
Tensor broadcast_to(const Tensor& x, const Shape& shape);
Tensor contiguous(const Tensor& x);
Tensor to_dtype(const Tensor& x, DType dtype);
Tensor concat(const std::vector<Tensor>& parts, int64_t axis);
std::vector<Tensor> split(const Tensor& x, const std::vector<int64_t>& sizes, int64_t axis);
Tensor stack(const std::vector<Tensor>& parts, int64_t axis);

// ---- operators ----
inline Tensor operator+(const Tensor& a, const Tensor& b) {
  return add(a, b);
}
inline Tensor operator-(const Tensor& a, const Tensor& b) {
  return sub(a, b);
}
inline Tensor operator*(const Tensor& a, const Tensor& b) {
  return mul(a, b);
}
inline Tensor operator/(const Tensor& a, const Tensor& b) {
  return div(a, b);
}
inline Tensor operator-(const Tensor& x) {
  return neg(x);
}
inline Tensor operator+(const Tensor& a, double s) {
  return add_scalar(a, s);
}
inline Tensor operator+(double s, const Tensor& a) {
  return add_scalar(a, s);
}
inline Tensor operator-(const Tensor& a, double s) {
  return add_scalar(a, -s);
}
inline Tensor operator-(double s, const Tensor& a) {
  return add_scalar(neg(a), s);
}
inline Tensor operator*(const Tensor& a, double s) {
  return mul_scalar(a, s);
}
inline Tensor operator*(double s, const Tensor& a) {
  return mul_scalar(a, s);
}
inline Tensor operator/(const Tensor& a, double s) {
  return mul_scalar(a, 1.0 / s);
}

}  // namespace mmdit
