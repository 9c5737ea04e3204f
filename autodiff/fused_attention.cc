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

// C (m x n) = op(A) op(B) for one head's products. The policy's sequences are 18 tokens: a
// product is then about 20k multiply-adds, less than a gemm call's fixed cost, and attention
// took 25 of policy-train's ~370 ms at 40 GFLOP/s. Up to 32 x 32 x 64 they run on register-tile
// kernels instead.
constexpr int64_t kSmallHeadWork = 32 * 32 * 64;

void head_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
               const float* b, int64_t ldb, float* c, int64_t ldc) {
  if (m * n * k > kSmallHeadWork || (ta && tb)) {
    raw::gemm_on_this_thread(ta, tb, m, n, k, a, lda, b, ldb, c, ldc);
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
  raw::gemm_on_this_thread(ta, tb, m, n, k, a, lda, b, ldb, c, ldc);
}

// One head: its n query, key and value rows of d values, `ld` apart (q, k, v and their
// gradients), and its output rows, `ld_out` apart (the output and its gradient). allowed: the
// head's n x n mask as 1/0, or null.
template <class T>
struct Head {
  const T *q, *k, *v;
  int64_t ld;
  const T* allowed;
  int64_t n, d;
  int64_t ld_out;
  T scale() const { return static_cast<T>(1.0 / std::sqrt(static_cast<double>(d))); }
  const T* allowed_row(int64_t i) const { return allowed ? allowed + i * n : nullptr; }
};

// The gradients of one head's q, k, v rows, `ld` apart.
template <class T>
struct HeadGrads {
  T *dq, *dk, *dv;
  int64_t ld;
};

// P = softmax(allowed ? scale q k^T : -0.7 FLT_MAX) into p (n x n), out = P v.
template <class T>
void head_forward(const Head<T>& h, T* p, T* out) {
  const int64_t n = h.n;
  head_gemm(false, true, n, n, h.d, h.q, h.ld, h.k, h.ld, p, n);
  T row_max, row_sum;
  for (int64_t i = 0; i < n; ++i)
    simd::attention_softmax(p + i * n, n, h.allowed_row(i), h.scale(), &row_max, &row_sum);
  head_gemm(false, false, n, h.d, n, p, n, h.v, h.ld, out, h.ld_out);
}

// dP = dO v^T, dv = P^T dO, dS = scale P (dP - rowsum(dP P)) (0 where masked), dq = dS k,
// dk = dS^T q; ds is n x n scratch.
template <class T>
void head_backward(const Head<T>& h, const T* dout, const T* p, T* ds, const HeadGrads<T>& g) {
  const int64_t n = h.n, d = h.d;
  head_gemm(false, true, n, n, d, dout, h.ld_out, h.v, h.ld, ds, n);
  head_gemm(true, false, n, d, n, p, n, dout, h.ld_out, g.dv, g.ld);
  for (int64_t i = 0; i < n; ++i)
    simd::attention_softmax_backward(ds + i * n, p + i * n, n, h.allowed_row(i), h.scale());
  head_gemm(false, false, n, d, n, ds, n, h.k, h.ld, g.dq, g.ld);
  head_gemm(true, false, n, d, n, ds, n, h.q, h.ld, g.dk, g.ld);
}

// Long sequences: the T x T probabilities of every head would be the largest thing a step keeps
// (B H T^2 values: 2 GB for 8 heads of 4096 tokens at batch 4). Here the queries go in blocks of
// kQueryBlock rows through a kQueryBlock x T scratch, and only each row's max and sum of
// exponentials are saved; backward recomputes the block's probabilities from them (one more
// q k^T product), as FlashAttention does.
constexpr int64_t kQueryBlock = 64;

template <class T>
void head_forward_blocked(const Head<T>& h, T* row_max, T* row_sum, T* p, T* out) {
  const int64_t n = h.n;
  for (int64_t r0 = 0; r0 < n; r0 += kQueryBlock) {
    const int64_t rows = std::min(kQueryBlock, n - r0);
    head_gemm(false, true, rows, n, h.d, h.q + r0 * h.ld, h.ld, h.k, h.ld, p, n);
    for (int64_t i = 0; i < rows; ++i)
      simd::attention_softmax(p + i * n, n, h.allowed_row(r0 + i), h.scale(), row_max + r0 + i,
                              row_sum + r0 + i);
    head_gemm(false, false, rows, h.d, n, p, n, h.v, h.ld, out + r0 * h.ld_out, h.ld_out);
  }
}

// head_backward block by block: dq for the block's rows, dk and dv summed over blocks. p and ds
// are kQueryBlock x n scratch.
template <class T>
void head_backward_blocked(const Head<T>& h, const T* dout, const T* row_max, const T* row_sum,
                           T* p, T* ds, const HeadGrads<T>& g) {
  const int64_t n = h.n, d = h.d;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t j = 0; j < d; ++j) g.dk[t * g.ld + j] = g.dv[t * g.ld + j] = T(0);
  for (int64_t r0 = 0; r0 < n; r0 += kQueryBlock) {
    const int64_t rows = std::min(kQueryBlock, n - r0);
    const T* dout_block = dout + r0 * h.ld_out;
    head_gemm(false, true, rows, n, d, h.q + r0 * h.ld, h.ld, h.k, h.ld, p, n);
    for (int64_t i = 0; i < rows; ++i)
      simd::attention_softmax_again(p + i * n, n, h.allowed_row(r0 + i), h.scale(), row_max[r0 + i],
                                    row_sum[r0 + i]);
    head_gemm(false, true, rows, n, d, dout_block, h.ld_out, h.v, h.ld, ds, n);
    raw::gemm(true, false, n, d, rows, p, n, dout_block, h.ld_out, g.dv, g.ld,
              /*accumulate=*/true);
    for (int64_t i = 0; i < rows; ++i)
      simd::attention_softmax_backward(ds + i * n, p + i * n, n, h.allowed_row(r0 + i), h.scale());
    head_gemm(false, false, rows, d, n, ds, n, h.k, h.ld, g.dq + r0 * g.ld, g.ld);
    raw::gemm(true, false, n, d, rows, ds, n, h.q + r0 * h.ld, h.ld, g.dk, g.ld,
              /*accumulate=*/true);
  }
}

// Per-thread scratch that outlives the call: a head's blocks are too large to allocate per head
// from the small-object caches, and too small to be worth a page-faulting allocation each.
template <class T>
T* scratch(std::vector<T>& buffer, int64_t size) {
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(static_cast<size_t>(size));
  return buffer.data();
}

// What forward keeps for backward: the probabilities (B, H, n, n), or for long sequences each
// row's max and sum of exponentials, (B, H, n) each.
struct AttentionStats {
  bool blocked;
  Tensor probs, row_max, row_sum;
};

AttentionStats attention_stats(int64_t B, int64_t H, int64_t n, int64_t blocked_from, DType dtype) {
  if (n < blocked_from) return {false, empty({B, H, n, n}, dtype), Tensor(), Tensor()};
  return {true, Tensor(), empty({B, H, n}, dtype), empty({B, H, n}, dtype)};
}

// Head bh (b H + h) of a forward: its output rows, and its stats into `stats`.
template <class T>
void forward_head(const Head<T>& h, int64_t bh, const AttentionStats& stats, T* out) {
  const int64_t n = h.n;
  if (!stats.blocked) return head_forward(h, stats.probs.data<T>() + bh * n * n, out);
  thread_local std::vector<T> p;
  head_forward_blocked(h, stats.row_max.data<T>() + bh * n, stats.row_sum.data<T>() + bh * n,
                       scratch(p, kQueryBlock * n), out);
}

template <class T>
void backward_head(const Head<T>& h, int64_t bh, const AttentionStats& stats, const T* dout,
                   const HeadGrads<T>& g) {
  const int64_t n = h.n;
  thread_local std::vector<T> p, ds;
  if (!stats.blocked)
    return head_backward(h, dout, stats.probs.data<T>() + bh * n * n, scratch(ds, n * n), g);
  head_backward_blocked(h, dout, stats.row_max.data<T>() + bh * n, stats.row_sum.data<T>() + bh * n,
                        scratch(p, kQueryBlock * n), scratch(ds, kQueryBlock * n), g);
}

// The mask as 1 (may attend) and 0 in the kernels' dtype (or undefined), and its per-example
// stride: the row kernels then select with a vector compare.
std::pair<Tensor, int64_t> attention_mask(const Tensor& mask, int64_t B, int64_t T, DType dtype,
                                          const char* op) {
  if (!mask.defined()) return {Tensor(), 0};
  MMDIT_CHECK(
      mask.dtype() == DType::boolean && ((mask.dim() == 2 && mask.shape() == Shape({T, T})) ||
                                         (mask.dim() == 3 && mask.shape() == Shape({B, T, T}))),
      op, ": mask has shape ", shape_str(mask.shape()), " and dtype ", dtype_name(mask.dtype()),
      "; expected bool (", T, ",", T, ") or (", B, ",", T, ",", T, ")");
  return {raw::to_dtype(raw::contiguous(mask), dtype), mask.dim() == 3 ? T * T : 0};
}

template <class T>
const T* allowed_of(const Tensor& allowed, int64_t stride, int64_t b) {
  return allowed.defined() ? allowed.data<T>() + b * stride : nullptr;
}

// ---- joint attention ----

// Joint attention's inputs, contiguous, per modality m: qkv (B, S_m, 3, H, d), the gammas (d,)
// and the rotary tables (S_m, d); modality m's tokens are [start[m], start[m + 1]) of the joint
// sequence of T.
struct JointInputs {
  std::vector<Tensor> qkv = {}, gamma_q = {}, gamma_k = {}, cos = {}, sin = {};
  std::vector<int64_t> start;
  int64_t B, H, d, T;
  double eps;

  size_t modalities() const { return qkv.size(); }
  // qkv..., gamma_q..., gamma_k..., cos..., sin..., for the tape's saved list and back.
  std::vector<Tensor> tensors() const {
    std::vector<Tensor> all;
    for (const auto* group : {&qkv, &gamma_q, &gamma_k, &cos, &sin})
      all.insert(all.end(), group->begin(), group->end());
    return all;
  }
  JointInputs with_tensors(std::span<const Tensor> all) const {
    JointInputs in = *this;
    const size_t M = modalities();
    size_t i = 0;
    for (auto* group : {&in.qkv, &in.gamma_q, &in.gamma_k, &in.cos, &in.sin})
      for (size_t m = 0; m < M; ++m) (*group)[m] = all[i++];
    return in;
  }
};

// Head (b, h)'s rows of every modality in sequence order into three T x d blocks: q and k
// normalised and rotated (QK-RMSNorm, then the rotary embedding of the token's position in its
// modality), v copied. inv (2 T: q then k) gets each q and k row's 1 / rms.
template <class T>
void gather_head(const JointInputs& in, int64_t b, int64_t h, T* rows, T* inv) {
  const int64_t hd = in.H * in.d, d = in.d, n = in.T;
  for (size_t m = 0; m < in.modalities(); ++m) {
    const int64_t S = in.start[m + 1] - in.start[m], t = in.start[m];
    const T* x = in.qkv[m].data<T>() + b * S * 3 * hd + h * d;
    const T *c = in.cos[m].data<T>(), *sn = in.sin[m].data<T>();
    simd::qk_norm_rope_rows(x, 3 * hd, S, d, in.gamma_q[m].data<T>(), c, sn, in.eps, rows + t * d,
                            d, inv + t);
    simd::qk_norm_rope_rows(x + hd, 3 * hd, S, d, in.gamma_k[m].data<T>(), c, sn, in.eps,
                            rows + (n + t) * d, d, inv + n + t);
    for (int64_t s = 0; s < S; ++s)
      std::copy_n(x + s * 3 * hd + 2 * hd, d, rows + (2 * n + t + s) * d);
  }
}

// Brings the q, k and v rows (of every modality) of the head after head bh towards the cache,
// while bh computes. The rows lie 3 H d values apart, a stride the hardware prefetchers do not
// follow, and gather_head waited on each row's first load (policy-train's shape on an AVX2 Zen 3:
// forward and backward about 8% faster with it).
template <class T>
void prefetch_next_head(const JointInputs& in, int64_t bh) {
  if (bh + 1 >= in.B * in.H) return;
  const int64_t b = (bh + 1) / in.H, h = (bh + 1) % in.H;
  const int64_t hd = in.H * in.d, d = in.d;
  constexpr int64_t kLine = 64 / sizeof(T);
  for (size_t m = 0; m < in.modalities(); ++m) {
    const int64_t S = in.start[m + 1] - in.start[m];
    const T* x = in.qkv[m].data<T>() + b * S * 3 * hd + h * d;
    for (int64_t s = 0; s < S; ++s)
      for (int64_t part = 0; part < 3; ++part)
        for (int64_t j = 0; j < d; j += kLine) __builtin_prefetch(x + s * 3 * hd + part * hd + j);
  }
}

// The gradients of head (b, h)'s gathered rows (three T x d blocks) back through the rotation and
// normalisation into dqkv[m]; the gammas' gradients are added to dgamma (per modality, q's d
// values then k's).
template <class T>
void scatter_head_grads(const JointInputs& in, int64_t b, int64_t h, const T* grads, const T* inv,
                        const std::vector<Tensor>& dqkv, T* dgamma) {
  const int64_t hd = in.H * in.d, d = in.d, n = in.T;
  thread_local std::vector<T> dz_buffer;
  T* dz = scratch(dz_buffer, d);
  for (size_t m = 0; m < in.modalities(); ++m) {
    const int64_t S = in.start[m + 1] - in.start[m], t = in.start[m];
    const int64_t offset = b * S * 3 * hd + h * d;
    const T* x = in.qkv[m].data<T>() + offset;
    T* dx = dqkv[m].data<T>() + offset;
    const T *c = in.cos[m].data<T>(), *sn = in.sin[m].data<T>();
    T* dgq = dgamma + 2 * m * d;
    simd::qk_norm_rope_rows_backward(grads + t * d, d, x, 3 * hd, S, d, inv + t,
                                     in.gamma_q[m].data<T>(), c, sn, dz, dgq, dx);
    simd::qk_norm_rope_rows_backward(grads + (n + t) * d, d, x + hd, 3 * hd, S, d, inv + n + t,
                                     in.gamma_k[m].data<T>(), c, sn, dz, dgq + d, dx + hd);
    for (int64_t s = 0; s < S; ++s)
      std::copy_n(grads + (2 * n + t + s) * d, d, dx + s * 3 * hd + 2 * hd);
  }
}

}  // namespace

Tensor attention_fused(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask) {
  check_floats("attention", {{"q", q}, {"k", k}, {"v", v}});
  MMDIT_CHECK(q.dim() == 4 && k.shape() == q.shape() && v.shape() == q.shape(),
              "attention: q, k, v have shapes ", shape_str(q.shape()), ", ", shape_str(k.shape()),
              ", ", shape_str(v.shape()), "; expected one (B, T, H, d) shape");
  // For callers with q, k, v apart (the models project them packed): one packed copy, then the
  // same kernels.
  return attention_packed(stack({q, k, v}, 2), mask);
}

Tensor attention_packed(const Tensor& qkv_in, const Tensor& mask_in, int64_t blocked_from) {
  const char* op = "attention";
  check_floats(op, {{"qkv", qkv_in}});
  MMDIT_CHECK(qkv_in.dim() == 5 && qkv_in.shape()[2] == 3 && qkv_in.shape()[4] > 0, op,
              ": packed qkv has shape ", shape_str(qkv_in.shape()),
              "; expected (B, T, 3, H, d) with d > 0");
  const int64_t B = qkv_in.shape()[0], n = qkv_in.shape()[1], H = qkv_in.shape()[3],
                d = qkv_in.shape()[4], hd = H * d;
  // Not a structured binding: Clang before 16 cannot capture one in the backward closure.
  const auto mask_and_stride = attention_mask(mask_in, B, n, qkv_in.dtype(), op);
  const Tensor& allowed = mask_and_stride.first;
  const int64_t mask_stride = mask_and_stride.second;
  const Tensor qkv = raw::contiguous(qkv_in);
  const AttentionStats stats = attention_stats(B, H, n, blocked_from, qkv.dtype());
  // Head bh's rows in the packed qkv (B, n, 3, H, d) and in the output (B, n, H, d).
  const auto head_of = [=](const auto* base, int64_t bh) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(base)>>;
    const int64_t b = bh / H, in = b * n * 3 * hd + (bh % H) * d;
    return Head<T>{.q = base + in,
                   .k = base + in + hd,
                   .v = base + in + 2 * hd,
                   .ld = 3 * hd,
                   .allowed = allowed_of<T>(allowed, mask_stride, b),
                   .n = n,
                   .d = d,
                   .ld_out = hd};
  };
  const auto out_offset = [=](int64_t bh) { return (bh / H) * n * hd + (bh % H) * d; };
  Tensor out = empty({B, n, H, d}, qkv.dtype());
  visit_float_dtype(qkv.dtype(), [&](auto tag) {
    using T = decltype(tag);
    parallel_for(B * H, 4 * n * n * d, [&](int64_t bh) {
      forward_head(head_of(qkv.data<T>(), bh), bh, stats, out.data<T>() + out_offset(bh));
    });
  });
  const Tensor inputs[] = {qkv_in};
  const Tensor saved[] = {qkv, allowed, stats.probs, stats.row_max, stats.row_sum};
  return record(op, out, std::span<const Tensor>(inputs), std::span<const Tensor>(saved),
                [=, blocked = stats.blocked](Backward& ctx) {
                  ctx.input(0, [&] {
                    const Tensor& qkv = ctx.saved[0];
                    const AttentionStats stats{blocked, ctx.saved[2], ctx.saved[3], ctx.saved[4]};
                    const Tensor dout = raw::contiguous(ctx.grad);
                    Tensor dqkv = empty(qkv.shape(), qkv.dtype());
                    visit_float_dtype(qkv.dtype(), [&](auto tag) {
                      using T = decltype(tag);
                      parallel_for(B * H, (stats.blocked ? 12 : 10) * n * n * d, [&](int64_t bh) {
                        const Head<T> h = head_of(qkv.data<T>(), bh);
                        T* dbase = dqkv.data<T>() + (h.q - qkv.data<T>());
                        backward_head(h, bh, stats, dout.data<T>() + out_offset(bh),
                                      HeadGrads<T>{dbase, dbase + hd, dbase + 2 * hd, 3 * hd});
                      });
                    });
                    return dqkv;
                  });
                });
}

Tensor joint_attention_fused(const std::vector<Tensor>& qkv, const std::vector<Tensor>& gamma_q,
                             const std::vector<Tensor>& gamma_k, const std::vector<Tensor>& cos,
                             const std::vector<Tensor>& sin, const Tensor& mask, double eps,
                             int64_t blocked_from) {
  const char* op = "joint_attention";
  const size_t M = qkv.size();
  MMDIT_CHECK(
      M >= 1 && gamma_q.size() == M && gamma_k.size() == M && cos.size() == M && sin.size() == M,
      op, ": ", M, " qkv tensors, ", gamma_q.size(), " and ", gamma_k.size(), " gammas, ",
      cos.size(), " and ", sin.size(), " rotary tables; expected one of each per modality");
  check_floats(op, {{"qkv[0]", qkv[0]}});
  MMDIT_CHECK(qkv[0].dim() == 5 && qkv[0].shape()[2] == 3 && qkv[0].shape()[4] > 0 &&
                  qkv[0].shape()[4] % 2 == 0,
              op, ": packed qkv of modality 0 has shape ", shape_str(qkv[0].shape()),
              "; expected (B, S, 3, H, d) with d even and positive");
  JointInputs in{.start = {0},
                 .B = qkv[0].shape()[0],
                 .H = qkv[0].shape()[3],
                 .d = qkv[0].shape()[4],
                 .T = 0,
                 .eps = eps};
  for (size_t m = 0; m < M; ++m) {
    const std::string i = str_cat("[", m, "]");
    check_floats(op, {{"qkv[0]", qkv[0]},
                      {"qkv" + i, qkv[m]},
                      {"gamma_q" + i, gamma_q[m]},
                      {"gamma_k" + i, gamma_k[m]},
                      {"cos" + i, cos[m]},
                      {"sin" + i, sin[m]}});
    refuse_constant_on_tape(op, ("cos" + i).c_str(), cos[m]);
    refuse_constant_on_tape(op, ("sin" + i).c_str(), sin[m]);
    const Shape& shape = qkv[m].shape();
    MMDIT_CHECK(shape.size() == 5 && shape[0] == in.B && shape[2] == 3 && shape[3] == in.H &&
                    shape[4] == in.d,
                op, ": packed qkv of modality ", m, " has shape ", shape_str(shape), "; expected (",
                in.B, ", S, 3, ", in.H, ", ", in.d, ") as modality 0");
    const int64_t S = shape[1];
    MMDIT_CHECK(gamma_q[m].shape() == Shape({in.d}) && gamma_k[m].shape() == Shape({in.d}), op,
                ": gammas of modality ", m, " have shapes ", shape_str(gamma_q[m].shape()), " and ",
                shape_str(gamma_k[m].shape()), "; expected (", in.d, ",)");
    MMDIT_CHECK(cos[m].shape() == Shape({S, in.d}) && sin[m].shape() == Shape({S, in.d}), op,
                ": rotary tables of modality ", m, " have shapes ", shape_str(cos[m].shape()),
                " and ", shape_str(sin[m].shape()), "; expected (", S, ",", in.d, ")");
    in.qkv.push_back(raw::contiguous(qkv[m]));
    in.gamma_q.push_back(raw::contiguous(gamma_q[m]));
    in.gamma_k.push_back(raw::contiguous(gamma_k[m]));
    in.cos.push_back(raw::contiguous(cos[m]));
    in.sin.push_back(raw::contiguous(sin[m]));
    in.start.push_back(in.start.back() + S);
  }
  const int64_t B = in.B, H = in.H, d = in.d, n = in.T = in.start.back(), hd = H * d;
  const DType dtype = qkv[0].dtype();
  const auto mask_and_stride = attention_mask(mask, B, n, dtype, op);
  const Tensor& allowed = mask_and_stride.first;
  const int64_t mask_stride = mask_and_stride.second;
  const AttentionStats stats = attention_stats(B, H, n, blocked_from, dtype);
  // Head bh's gathered rows: q, k, v blocks of n x d in `rows`; its output rows in (B, n, H, d).
  const auto head_of = [=](const auto* rows, int64_t bh) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(rows)>>;
    return Head<T>{.q = rows,
                   .k = rows + n * d,
                   .v = rows + 2 * n * d,
                   .ld = d,
                   .allowed = allowed_of<T>(allowed, mask_stride, bh / H),
                   .n = n,
                   .d = d,
                   .ld_out = hd};
  };
  const auto out_offset = [=](int64_t bh) { return (bh / H) * n * hd + (bh % H) * d; };
  Tensor out = empty({B, n, H, d}, dtype);
  visit_float_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    parallel_for(B * H, 4 * n * n * d + 20 * n * d, [&](int64_t bh) {
      thread_local std::vector<T> rows_buffer, inv_buffer;
      T* rows = scratch(rows_buffer, 3 * n * d);
      prefetch_next_head<T>(in, bh);
      gather_head(in, bh / H, bh % H, rows, scratch(inv_buffer, 2 * n));
      forward_head(head_of(rows, bh), bh, stats, out.data<T>() + out_offset(bh));
    });
  });

  std::vector<Tensor> inputs = qkv;
  inputs.insert(inputs.end(), gamma_q.begin(), gamma_q.end());
  inputs.insert(inputs.end(), gamma_k.begin(), gamma_k.end());
  std::vector<Tensor> saved = {allowed, stats.probs, stats.row_max, stats.row_sum};
  const std::vector<Tensor> in_tensors = in.tensors();
  saved.insert(saved.end(), in_tensors.begin(), in_tensors.end());
  // The closure keeps the shapes; the tensors come back through ctx.saved.
  JointInputs shapes = in.with_tensors(std::vector<Tensor>(in_tensors.size()));
  return record(
      op, out, std::span<const Tensor>(inputs), std::span<const Tensor>(saved),
      [=, blocked = stats.blocked](Backward& ctx) {
        const JointInputs in = shapes.with_tensors(ctx.saved.all().subspan(4));
        const AttentionStats stats{blocked, ctx.saved[1], ctx.saved[2], ctx.saved[3]};
        const Tensor dout = raw::contiguous(ctx.grad);
        std::vector<Tensor> dqkv;
        for (const Tensor& x : in.qkv) dqkv.push_back(empty(x.shape(), dtype));
        // Each head's gamma gradients apart, summed in head order after: the same bits on any
        // number of threads.
        const int64_t gammas = 2 * static_cast<int64_t>(M);
        Tensor dgamma_heads = zeros({B * H, gammas, d}, dtype);
        // (2 M, d): per modality the gradients of gamma_q, then of gamma_k.
        Tensor dgamma = empty({gammas, d}, dtype);
        visit_float_dtype(dtype, [&](auto tag) {
          using T = decltype(tag);
          parallel_for(B * H, (blocked ? 12 : 10) * n * n * d + 40 * n * d, [&](int64_t bh) {
            thread_local std::vector<T> rows_buffer, grads_buffer, inv_buffer;
            T* rows = scratch(rows_buffer, 3 * n * d);
            T* grads = scratch(grads_buffer, 3 * n * d);
            T* inv = scratch(inv_buffer, 2 * n);
            prefetch_next_head<T>(in, bh);
            gather_head(in, bh / H, bh % H, rows, inv);
            backward_head(head_of(static_cast<const T*>(rows), bh), bh, stats,
                          dout.data<T>() + out_offset(bh),
                          HeadGrads<T>{grads, grads + n * d, grads + 2 * n * d, d});
            scatter_head_grads(in, bh / H, bh % H, static_cast<const T*>(grads),
                               static_cast<const T*>(inv), dqkv,
                               dgamma_heads.data<T>() + bh * gammas * d);
          });
          detail::sum_in_order(dgamma_heads.data<T>(), B * H, gammas * d, dgamma.data<T>());
        });
        for (size_t m = 0; m < M; ++m) {
          const int64_t i = static_cast<int64_t>(m);
          ctx.input(m, [&] { return dqkv[m]; });
          ctx.input(M + m, [&] { return raw::reshape(raw::narrow(dgamma, 0, 2 * i, 1), {d}); });
          ctx.input(2 * M + m,
                    [&] { return raw::reshape(raw::narrow(dgamma, 0, 2 * i + 1, 1), {d}); });
        }
      });
}

}  // namespace mmdit
