// Attention as one fused op: softmax(mask(q k^T / sqrt(d))) v per head, forward and backward
// kernels over token-major q, k, v (three tensors, or one packed projection), with the
// probabilities saved for short sequences and recomputed from per-row statistics for long ones.
#include <algorithm>
#include <cmath>
#include <vector>

#include "autodiff/fused.h"
#include "autodiff/fused_checks.h"
#include "autodiff/ops.h"
#include "tensor/ops.h"
#include "tensor/parallel.h"
#include "tensor/simd.h"

namespace mmdit {
namespace {

using detail::check_floats;

// ---- attention ----

// Where q, k, v and the output live: token and batch strides, so that the same kernels read
// three (B, T, H, d) tensors or one packed (B, T, 3, H, d) tensor.
struct AttentionShape {
  int64_t B, T, H, d;
  int64_t in_token, in_batch;    // q, k, v and their gradients
  int64_t out_token, out_batch;  // the output and its gradient
};

// C (m x n) = op(A) op(B) for one head's products. The policy's sequences are 18 tokens: a
// product is then about 20k multiply-adds, less than a gemm call's fixed cost, and attention
// took 25 of policy-train's ~370 ms at 40 GFLOP/s. Up to 32 x 32 x 64 they run on register-tile
// kernels instead.
constexpr int64_t kSmallHeadWork = 32 * 32 * 64;

void head_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
               const float* b, int64_t ldb, float* c, int64_t ldc) {
  if (m * n * k > kSmallHeadWork || (ta && tb)) {
    raw::gemm(ta, tb, m, n, k, a, lda, b, ldb, c, ldc);
    return;
  }
  raw::add_matmul_flops(2 * m * n * k);
  if (tb)
    simd::gemm_nt(a, lda, b, ldb, c, ldc, m, 0, n, k);
  else
    simd::gemm_small_nn(ta, a, lda, b, ldb, c, ldc, m, n, k);
}
void head_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const double* a, int64_t lda,
               const double* b, int64_t ldb, double* c, int64_t ldc) {
  raw::gemm(ta, tb, m, n, k, a, lda, b, ldb, c, ldc);
}

// P[b, h] = softmax(mask ? scale q k^T : -0.7 FLT_MAX) and out[b, :, h] = P[b, h] v[b, :, h].
template <class T>
void attention_forward(const T* q, const T* k, const T* v, const T* allowed, int64_t mask_stride,
                       T* probs, T* out, const AttentionShape& s) {
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(s.d)));
  const int64_t n = s.T, ld = s.in_token;
  parallel_for(s.B * s.H, 4 * n * n * s.d, [&](int64_t bh) {
    const int64_t b = bh / s.H, h = bh % s.H;
    const int64_t in = b * s.in_batch + h * s.d, o = b * s.out_batch + h * s.d;
    T* p = probs + bh * n * n;
    head_gemm(false, true, n, n, s.d, q + in, ld, k + in, ld, p, n);
    const T* a = allowed ? allowed + b * mask_stride : nullptr;
    T row_max, row_sum;
    for (int64_t i = 0; i < n; ++i)
      simd::attention_softmax(p + i * n, n, a ? a + i * n : nullptr, scale, &row_max, &row_sum);
    head_gemm(false, false, n, s.d, n, p, n, v + in, ld, out + o, s.out_token);
  });
}

// dP = dO v^T, dv = P^T dO, dS = scale P (dP - rowsum(dP P)) (0 where masked), dq = dS k,
// dk = dS^T q; per (b, h), on a scratch T x T block.
template <class T>
void attention_backward(const T* dout, const T* q, const T* k, const T* v, const T* probs,
                        const T* allowed, int64_t mask_stride, T* dq, T* dk, T* dv,
                        const AttentionShape& s) {
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(s.d)));
  const int64_t n = s.T, ld = s.in_token;
  parallel_for(s.B * s.H, 10 * n * n * s.d, [&](int64_t bh) {
    const int64_t b = bh / s.H, h = bh % s.H;
    const int64_t in = b * s.in_batch + h * s.d, o = b * s.out_batch + h * s.d;
    const T* p = probs + bh * n * n;
    std::vector<T> ds(static_cast<size_t>(n * n));
    head_gemm(false, true, n, n, s.d, dout + o, s.out_token, v + in, ld, ds.data(), n);
    head_gemm(true, false, n, s.d, n, p, n, dout + o, s.out_token, dv + in, ld);
    const T* a = allowed ? allowed + b * mask_stride : nullptr;
    for (int64_t i = 0; i < n; ++i)
      simd::attention_softmax_backward(ds.data() + i * n, p + i * n, n, a ? a + i * n : nullptr,
                                       scale);
    head_gemm(false, false, n, s.d, n, ds.data(), n, k + in, ld, dq + in, ld);
    head_gemm(true, false, n, s.d, n, ds.data(), n, q + in, ld, dk + in, ld);
  });
}

// Long sequences: the T x T probabilities of every head would be the largest thing a step keeps
// (B H T^2 values: 2 GB for 8 heads of 4096 tokens at batch 4). Here the queries go in blocks of
// kQueryBlock rows through a per-thread R x T scratch, and only each row's max and sum of
// exponentials are saved; backward recomputes the block's probabilities from them (one more
// q k^T product), as FlashAttention does.
constexpr int64_t kQueryBlock = 64;

template <class T>
void attention_forward_blocked(const T* q, const T* k, const T* v, const T* allowed,
                               int64_t mask_stride, T* row_max, T* row_sum, T* out,
                               const AttentionShape& s) {
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(s.d)));
  const int64_t n = s.T, ld = s.in_token;
  parallel_for(s.B * s.H, 4 * n * n * s.d, [&](int64_t bh) {
    const int64_t b = bh / s.H, h = bh % s.H;
    const int64_t in = b * s.in_batch + h * s.d, o = b * s.out_batch + h * s.d;
    std::vector<T> p(static_cast<size_t>(kQueryBlock * n));
    for (int64_t r0 = 0; r0 < n; r0 += kQueryBlock) {
      const int64_t rows = std::min(kQueryBlock, n - r0);
      head_gemm(false, true, rows, n, s.d, q + in + r0 * ld, ld, k + in, ld, p.data(), n);
      const T* a = allowed ? allowed + b * mask_stride + r0 * n : nullptr;
      for (int64_t i = 0; i < rows; ++i)
        simd::attention_softmax(p.data() + i * n, n, a ? a + i * n : nullptr, scale,
                                row_max + bh * n + r0 + i, row_sum + bh * n + r0 + i);
      head_gemm(false, false, rows, s.d, n, p.data(), n, v + in, ld, out + o + r0 * s.out_token,
                s.out_token);
    }
  });
}

// attention_backward block by block: dq for the block's rows, dk and dv summed over blocks.
template <class T>
void attention_backward_blocked(const T* dout, const T* q, const T* k, const T* v, const T* row_max,
                                const T* row_sum, const T* allowed, int64_t mask_stride, T* dq,
                                T* dk, T* dv, const AttentionShape& s) {
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(s.d)));
  const int64_t n = s.T, ld = s.in_token;
  parallel_for(s.B * s.H, 12 * n * n * s.d, [&](int64_t bh) {
    const int64_t b = bh / s.H, h = bh % s.H;
    const int64_t in = b * s.in_batch + h * s.d, o = b * s.out_batch + h * s.d;
    std::vector<T> p(static_cast<size_t>(kQueryBlock * n)), ds(p.size());
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = 0; j < s.d; ++j) dk[in + t * ld + j] = dv[in + t * ld + j] = T(0);
    for (int64_t r0 = 0; r0 < n; r0 += kQueryBlock) {
      const int64_t rows = std::min(kQueryBlock, n - r0);
      const T* a = allowed ? allowed + b * mask_stride + r0 * n : nullptr;
      const T* dout_block = dout + o + r0 * s.out_token;
      head_gemm(false, true, rows, n, s.d, q + in + r0 * ld, ld, k + in, ld, p.data(), n);
      for (int64_t i = 0; i < rows; ++i)
        simd::attention_softmax_again(p.data() + i * n, n, a ? a + i * n : nullptr, scale,
                                      row_max[bh * n + r0 + i], row_sum[bh * n + r0 + i]);
      head_gemm(false, true, rows, n, s.d, dout_block, s.out_token, v + in, ld, ds.data(), n);
      raw::gemm(true, false, n, s.d, rows, p.data(), n, dout_block, s.out_token, dv + in, ld,
                /*accumulate=*/true);
      for (int64_t i = 0; i < rows; ++i)
        simd::attention_softmax_backward(ds.data() + i * n, p.data() + i * n, n,
                                         a ? a + i * n : nullptr, scale);
      head_gemm(false, false, rows, s.d, n, ds.data(), n, k + in, ld, dq + in + r0 * ld, ld);
      raw::gemm(true, false, n, s.d, rows, ds.data(), n, q + in + r0 * ld, ld, dk + in, ld,
                /*accumulate=*/true);
    }
  });
}

// The mask as 1 (may attend) and 0 in the kernels' dtype (or undefined), and its per-example
// stride: the row kernels then select with a vector compare.
std::pair<Tensor, int64_t> attention_mask(const Tensor& mask, const AttentionShape& s, DType dtype,
                                          const char* op) {
  if (!mask.defined()) return {Tensor(), 0};
  MMDIT_CHECK(mask.dtype() == DType::boolean &&
                  ((mask.dim() == 2 && mask.shape() == Shape({s.T, s.T})) ||
                   (mask.dim() == 3 && mask.shape() == Shape({s.B, s.T, s.T}))),
              op, ": mask has shape ", shape_str(mask.shape()), " and dtype ",
              dtype_name(mask.dtype()), "; expected bool (", s.T, ",", s.T, ") or (", s.B, ",", s.T,
              ",", s.T, ")");
  return {raw::to_dtype(raw::contiguous(mask), dtype), mask.dim() == 3 ? s.T * s.T : 0};
}

}  // namespace

Tensor attention_fused(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask) {
  check_floats("attention", {q, k, v});
  MMDIT_CHECK(q.dim() == 4 && k.shape() == q.shape() && v.shape() == q.shape(),
              "attention: q, k, v have shapes ", shape_str(q.shape()), ", ", shape_str(k.shape()),
              ", ", shape_str(v.shape()), "; expected one (B, T, H, d) shape");
  // For callers with q, k, v apart (the models project them packed): one packed copy, then the
  // same kernels.
  return attention_packed(stack({q, k, v}, 2), mask);
}

Tensor attention_packed(const Tensor& qkv_in, const Tensor& mask_in, int64_t blocked_from) {
  const char* op = "attention";
  check_floats(op, {qkv_in});
  MMDIT_CHECK(qkv_in.dim() == 5 && qkv_in.shape()[2] == 3 && qkv_in.shape()[4] > 0, op,
              ": packed qkv has shape ", shape_str(qkv_in.shape()),
              "; expected (B, T, 3, H, d) with d > 0");
  const int64_t B = qkv_in.shape()[0], T_ = qkv_in.shape()[1], H = qkv_in.shape()[3],
                d = qkv_in.shape()[4], hd = H * d;
  const AttentionShape s{B, T_, H, d, 3 * hd, T_ * 3 * hd, hd, T_ * hd};
  // Not a structured binding: Clang before 16 cannot capture one in the backward closure.
  const auto mask_and_stride = attention_mask(mask_in, s, qkv_in.dtype(), op);
  const Tensor& mask = mask_and_stride.first;
  const int64_t mask_stride = mask_and_stride.second;
  const Tensor qkv = raw::contiguous(qkv_in);
  // Saved for backward: the probabilities, or for long sequences each row's max and sum of
  // exponentials, from which backward recomputes them.
  const bool blocked = T_ >= blocked_from;
  std::vector<Tensor> saved = {qkv, mask};
  if (blocked) {
    saved.push_back(empty({B, H, T_}, qkv.dtype()));
    saved.push_back(empty({B, H, T_}, qkv.dtype()));
  } else {
    saved.push_back(empty({B, H, T_, T_}, qkv.dtype()));
  }
  Tensor out = empty({B, T_, H, d}, qkv.dtype());
  visit_float_dtype(qkv.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* base = qkv.data<T>();
    const T* m = mask.defined() ? mask.data<T>() : nullptr;
    if (blocked)
      attention_forward_blocked(base, base + hd, base + 2 * hd, m, mask_stride, saved[2].data<T>(),
                                saved[3].data<T>(), out.data<T>(), s);
    else
      attention_forward(base, base + hd, base + 2 * hd, m, mask_stride, saved[2].data<T>(),
                        out.data<T>(), s);
  });
  const Tensor inputs[] = {qkv_in};
  return record(
      op, out, std::span<const Tensor>(inputs), std::span<const Tensor>(saved),
      [s, mask_stride, hd, blocked](Backward& ctx) {
        const Tensor &qkv = ctx.saved[0], &mask = ctx.saved[1];
        ctx.input(0, [&] {
          const Tensor dout = raw::contiguous(ctx.grad);
          Tensor dqkv = empty(qkv.shape(), qkv.dtype());
          visit_float_dtype(qkv.dtype(), [&](auto tag) {
            using T = decltype(tag);
            const T *base = qkv.data<T>(), *dy = dout.data<T>();
            const T* m = mask.defined() ? mask.data<T>() : nullptr;
            T* dbase = dqkv.data<T>();
            if (blocked)
              attention_backward_blocked(dy, base, base + hd, base + 2 * hd, ctx.saved[2].data<T>(),
                                         ctx.saved[3].data<T>(), m, mask_stride, dbase, dbase + hd,
                                         dbase + 2 * hd, s);
            else
              attention_backward(dy, base, base + hd, base + 2 * hd, ctx.saved[2].data<T>(), m,
                                 mask_stride, dbase, dbase + hd, dbase + 2 * hd, s);
          });
          return dqkv;
        });
      });
}

}  // namespace mmdit
