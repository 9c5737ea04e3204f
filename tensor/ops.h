// The raw tensor operations: compute, never record. autodiff/ops.h wraps each differentiable
// one with its backward; use those in model code.
#pragma once

#include <vector>

#include "tensor/tensor.h"

namespace mmdit::raw {

// ---- views (no copy) ----
Tensor reshape(const Tensor& t, Shape shape);  // one -1 allowed; copies only if no view exists
Tensor permute(const Tensor& t, const std::vector<int64_t>& axes);
Tensor transpose(const Tensor& t, int64_t a, int64_t b);
// Python-style slice of one axis: negative start/end count from the end and are clamped.
Tensor slice(const Tensor& t, int64_t axis, int64_t start, int64_t end, int64_t step = 1);
Tensor narrow(const Tensor& t, int64_t axis, int64_t start, int64_t length);
Tensor squeeze(const Tensor& t, int64_t axis);
Tensor unsqueeze(const Tensor& t, int64_t axis);
Tensor broadcast_to(const Tensor& t, const Shape& shape);
// Whether broadcast_to(t, to) would succeed for t of shape `from`, without making the view.
bool broadcasts_to(const Shape& from, const Shape& to);

// ---- copies and conversion ----
Tensor contiguous(const Tensor& t);  // returns t itself when already contiguous
Tensor clone(const Tensor& t);       // always a fresh contiguous copy
Tensor to_dtype(const Tensor& t, DType dtype);
void copy_into(const Tensor& dst, const Tensor& src);  // src broadcast to dst's shape
void fill(const Tensor& dst, double value);

Tensor concat(const std::vector<Tensor>& parts, int64_t axis);
std::vector<Tensor> split(const Tensor& t, const std::vector<int64_t>& sizes, int64_t axis);
// The axis split() cuts (normalized), after checking that `sizes` add up to its extent.
int64_t split_axis(const Shape& shape, const std::vector<int64_t>& sizes, int64_t axis);
Tensor stack(const std::vector<Tensor>& parts, int64_t axis);
// The axis stack() inserts (normalized), after checking that `parts` has one shape.
int64_t stack_axis(const std::vector<Tensor>& parts, int64_t axis);

Shape broadcast_shapes(const Shape& a, const Shape& b, const char* op);

// ---- elementwise, NumPy broadcasting ----
enum class BinaryOp { add, sub, mul, div, maximum, minimum };
enum class UnaryOp { neg, exp, log, sqrt, rsqrt, square, abs, tanh, sigmoid, silu, sin, cos };
enum class CompareOp { eq, ne, lt, le, gt, ge };

Tensor binary(BinaryOp op, const Tensor& a, const Tensor& b);
// dst += x in place, x broadcast to dst's shape. dst is a float tensor or a view of one whose
// elements are all distinct (no broadcast axis); same dtype as x.
void add_into(const Tensor& dst, const Tensor& x);
Tensor unary(UnaryOp op, const Tensor& x);
Tensor compare(CompareOp op, const Tensor& a, const Tensor& b);  // bool result

inline Tensor add(const Tensor& a, const Tensor& b) {
  return binary(BinaryOp::add, a, b);
}
inline Tensor sub(const Tensor& a, const Tensor& b) {
  return binary(BinaryOp::sub, a, b);
}
inline Tensor mul(const Tensor& a, const Tensor& b) {
  return binary(BinaryOp::mul, a, b);
}
inline Tensor div(const Tensor& a, const Tensor& b) {
  return binary(BinaryOp::div, a, b);
}
Tensor add_scalar(const Tensor& x, double s);
Tensor mul_scalar(const Tensor& x, double s);
Tensor pow_scalar(const Tensor& x, double p);
Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b);
Tensor logical_not(const Tensor& x);
Tensor logical_and(const Tensor& a, const Tensor& b);

// ---- reductions over any axes (empty = all) ----
// The sum of no elements is 0. mean, max and var of no elements (a reduced axis of size 0) throw:
// NumPy's max does too, where its mean and var warn and give NaN; one rule serves all three, and
// a NaN from an empty batch would only surface later, far from its cause.
Tensor sum(const Tensor& x, std::vector<int64_t> axes = {}, bool keepdims = false);
Tensor mean(const Tensor& x, std::vector<int64_t> axes = {}, bool keepdims = false);
Tensor max(const Tensor& x, std::vector<int64_t> axes = {}, bool keepdims = false);
Tensor var(const Tensor& x, std::vector<int64_t> axes = {}, bool keepdims = false);  // biased
// Sums `g` down to `shape`: the adjoint of broadcast_to(., g.shape()).
Tensor sum_to(const Tensor& g, const Shape& shape);

// A row holding +inf, or only -inf, gives NaN throughout, as in PyTorch (a fully masked row of
// attention scores is not: masked logits are -0.7 FLT_MAX there, so such a row is uniform).
Tensor softmax(const Tensor& x, int64_t axis);
Tensor log_softmax(const Tensor& x, int64_t axis);

// ---- matrix products through OpenBLAS ----
// (..., M, K) @ (..., K, N) -> (..., M, N); leading dims broadcast. Transposed views are passed
// to gemm as transpose flags, not copied. A large product is split into blocks of rows or
// columns across the threads: float64, and float32 on kernels that round a block as the whole
// (oneDNN's and OpenBLAS's AVX-512 ones), give the same bits on any number of threads; OpenBLAS's
// Haswell kernels (AVX2 CPUs) do not, and differ from one thread by float32 rounding.
Tensor matmul(const Tensor& a, const Tensor& b);

// C = op(A) op(B), or C += op(A) op(B) with `accumulate`, on row-major memory with leading
// dimensions, for fused kernels; counted in matmul_flops(). Inside a parallel region, or an
// item of a parallel_for, it runs on the calling thread; a team (run_as_team) splits it.
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
          const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate = false);
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const double* a, int64_t lda,
          const double* b, int64_t ldb, double* c, int64_t ldc, bool accumulate = false);
// C = op(A) op(B) on the calling thread whatever num_threads(), as one product: for one of many
// products that run side by side (attention's heads), whose values must not change with the
// thread count when there is only one of them (a library's blocks may round otherwise than the
// whole).
void gemm_on_this_thread(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a,
                         int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc);
void gemm_on_this_thread(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const double* a,
                         int64_t lda, const double* b, int64_t ldb, double* c, int64_t ldc);

// The library that runs float32 products of at least 64 x 64 x 128 multiply-adds (but x W^T of
// up to 16 rows, which runs on simd::gemm_nt). oneDNN's sgemm generates its kernels for the
// shape at hand and ran the training steps' products 5-30% faster than OpenBLAS's
// (docs/performance.md); OpenBLAS runs the smaller ones and every float64 product.
// MMDIT_SGEMM=openblas|onednn chooses at the first such product, set_sgemm_library() at any
// time between products (and then MMDIT_SGEMM is not read); else default_sgemm_library().
enum class SgemmLibrary { onednn, openblas };
SgemmLibrary sgemm_library();
void set_sgemm_library(SgemmLibrary library);
const char* sgemm_library_name(SgemmLibrary library);
SgemmLibrary parse_sgemm_library(std::string_view name);  // "onednn" or "openblas"
// oneDNN where it runs its AVX-512 kernels, else OpenBLAS. It was measured faster only there, and
// only there do its blocks of a product round as the whole product: with its AVX2 kernels
// (DNNL_MAX_CPU_ISA=AVX2) a product's values changed with the number of threads.
SgemmLibrary default_sgemm_library();

// Floating-point operations done by the matrix products the calling thread ran since it started
// (2 per multiply-add; fused kernels that multiply matrices add theirs, also what the workers of
// its parallel_for did), for profiles and benchmarks' GFLOP/s.
int64_t matmul_flops();
void add_matmul_flops(int64_t flops);

}  // namespace mmdit::raw
