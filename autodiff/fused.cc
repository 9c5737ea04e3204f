// Each fused op: its forward kernel, its backward kernel, then the op that runs the first and
// records the second. Kernels are plain loops over contiguous rows, parallel across rows.
// Attention, the largest, has its own file (fused_attention.cc).
#include "autodiff/fused.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <string>
#include <vector>

#include "autodiff/fused_checks.h"
#include "autodiff/ops.h"
#include "tensor/ops.h"
#include "tensor/packed_weight.h"
#include "tensor/parallel.h"
#include "tensor/simd.h"

namespace mmdit {
namespace {

using detail::check_floats;

// x (..., S, D) seen as G groups of S rows; a per-group parameter (..., 1, D) as (G, D).
struct Groups {
  int64_t groups, rows_per_group, dim;
  Shape param_shape;  // x's shape with S replaced by 1
};

// Any dimension may be 0 (a batch of none, a modality of no tokens): the kernels then loop over
// no rows, and a per-group parameter's gradient is the sum over none, zeros.
Groups groups_of(const Tensor& x, const char* op) {
  MMDIT_CHECK(x.dim() >= 1, op, ": input has shape ", shape_str(x.shape()),
              "; expected (..., S, D)");
  Groups g;
  g.dim = x.shape().back();
  g.rows_per_group = x.dim() >= 2 ? x.shape()[x.dim() - 2] : 1;
  // The product of the leading dimensions, not numel / (S D), which divides by 0 when S or D is.
  g.groups = 1;
  for (int64_t i = 0; i + 2 < x.dim(); ++i) g.groups *= x.shape()[i];
  g.param_shape = x.shape();
  if (x.dim() >= 2) g.param_shape[x.dim() - 2] = 1;
  return g;
}

// Checks that the (..., 1, D) parameter `name` broadcasts to the groups' (G, 1, D) shape.
void check_per_group(const Tensor& p, const Groups& g, const char* op, const char* name) {
  MMDIT_CHECK(raw::broadcasts_to(p.shape(), g.param_shape), op, ": ", name, " has shape ",
              shape_str(p.shape()), ", which does not broadcast to ", shape_str(g.param_shape));
}

Tensor per_group(const Tensor& p, const Groups& g, const char* op, const char* name) {
  check_per_group(p, g, op, name);
  return raw::contiguous(raw::broadcast_to(p, g.param_shape));
}

// ---- row kernels ----
// The per-row loops of the kernels below, compiled for AVX-512 and AVX2 too (MMDIT_SIMD_CLONES):
// inside the templates they were baseline SSE2.

// xhat = (x - mean) inv; y = xhat (1 + scale) + shift
template <class T>
[[gnu::always_inline]] inline void normalize_modulate_row_impl(const T* __restrict x, T mean, T inv,
                                                               const T* __restrict shift,
                                                               const T* __restrict scale,
                                                               T* __restrict xhat, T* __restrict y,
                                                               int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    xhat[i] = (x[i] - mean) * inv;
    y[i] = xhat[i] * (1 + scale[i]) + shift[i];
  }
}
MMDIT_SIMD_CLONES void normalize_modulate_row(const float* x, float mean, float inv,
                                              const float* shift, const float* scale, float* xhat,
                                              float* y, int64_t n) {
  normalize_modulate_row_impl(x, mean, inv, shift, scale, xhat, y, n);
}
MMDIT_SIMD_CLONES void normalize_modulate_row(const double* x, double mean, double inv,
                                              const double* shift, const double* scale,
                                              double* xhat, double* y, int64_t n) {
  normalize_modulate_row_impl(x, mean, inv, shift, scale, xhat, y, n);
}

// gx = dy (1 + scale); dshift += dy; dscale += dy xhat
template <class T>
[[gnu::always_inline]] inline void modulate_backward_row_impl(
    const T* __restrict dy, const T* __restrict scale, const T* __restrict xhat, T* __restrict gx,
    T* __restrict dshift, T* __restrict dscale, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    gx[i] = dy[i] * (1 + scale[i]);
    dshift[i] += dy[i];
    dscale[i] += dy[i] * xhat[i];
  }
}
MMDIT_SIMD_CLONES void modulate_backward_row(const float* dy, const float* scale, const float* xhat,
                                             float* gx, float* dshift, float* dscale, int64_t n) {
  modulate_backward_row_impl(dy, scale, xhat, gx, dshift, dscale, n);
}
MMDIT_SIMD_CLONES void modulate_backward_row(const double* dy, const double* scale,
                                             const double* xhat, double* gx, double* dshift,
                                             double* dscale, int64_t n) {
  modulate_backward_row_impl(dy, scale, xhat, gx, dshift, dscale, n);
}

// out = a g - b k - c (c may be 0): the dx of LayerNorm (a = gx, b = xhat) and of RMSNorm.
// out may be a (RMSNorm's backward works in place), so neither is restrict.
template <class T>
[[gnu::always_inline]] inline void norm_dx_row_impl(const T* a, T g, const T* __restrict b, T k,
                                                    T c, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] * g - b[i] * k - c;
}
MMDIT_SIMD_CLONES void norm_dx_row(const float* a, float g, const float* b, float k, float c,
                                   float* out, int64_t n) {
  norm_dx_row_impl(a, g, b, k, c, out, n);
}
MMDIT_SIMD_CLONES void norm_dx_row(const double* a, double g, const double* b, double k, double c,
                                   double* out, int64_t n) {
  norm_dx_row_impl(a, g, b, k, c, out, n);
}

// out = x + gate y
template <class T>
[[gnu::always_inline]] inline void gated_sum_row_impl(const T* __restrict x,
                                                      const T* __restrict gate,
                                                      const T* __restrict y, T* __restrict out,
                                                      int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] + gate[i] * y[i];
}
MMDIT_SIMD_CLONES void gated_sum_row(const float* x, const float* gate, const float* y, float* out,
                                     int64_t n) {
  gated_sum_row_impl(x, gate, y, out, n);
}
MMDIT_SIMD_CLONES void gated_sum_row(const double* x, const double* gate, const double* y,
                                     double* out, int64_t n) {
  gated_sum_row_impl(x, gate, y, out, n);
}

// dy_in = dy gate (if wanted); dgate += dy y (if wanted)
template <class T>
[[gnu::always_inline]] inline void gated_backward_row_impl(const T* __restrict dy,
                                                           const T* __restrict gate,
                                                           const T* __restrict y,
                                                           T* __restrict dy_in, T* __restrict dgate,
                                                           int64_t n) {
  if (dy_in)
    for (int64_t i = 0; i < n; ++i) dy_in[i] = dy[i] * gate[i];
  if (dgate)
    for (int64_t i = 0; i < n; ++i) dgate[i] += dy[i] * y[i];
}
MMDIT_SIMD_CLONES void gated_backward_row(const float* dy, const float* gate, const float* y,
                                          float* dy_in, float* dgate, int64_t n) {
  gated_backward_row_impl(dy, gate, y, dy_in, dgate, n);
}
MMDIT_SIMD_CLONES void gated_backward_row(const double* dy, const double* gate, const double* y,
                                          double* dy_in, double* dgate, int64_t n) {
  gated_backward_row_impl(dy, gate, y, dy_in, dgate, n);
}

// ---- layer_norm_modulate ----

// ss holds [shift | scale] per group: (G, 2D).
template <class T>
void layer_norm_modulate_forward(const T* x, const T* ss, T* y, T* xhat, T* rstd, const Groups& g,
                                 double eps) {
  const int64_t D = g.dim, S = g.rows_per_group;
  parallel_for(g.groups * S, 8 * D, [&](int64_t r) {
    const T* xr = x + r * D;
    const T* sh = ss + (r / S) * 2 * D;
    const T* sc = sh + D;
    const T mean = simd::sum(xr, D) / static_cast<T>(D);
    const T var = simd::sum_squared_deviation(xr, mean, D) / static_cast<T>(D);
    const T inv = static_cast<T>(1.0 / std::sqrt(var + eps));
    rstd[r] = inv;
    normalize_modulate_row(xr, mean, inv, sh, sc, xhat + r * D, y + r * D, D);
  });
}

// dx = rstd (gx - mean(gx) - xhat mean(gx xhat)), gx = dy (1 + scale); dscale = sum_S dy xhat;
// dshift = sum_S dy, into dss laid out like ss. One task per group, so the sums over its rows
// need no merging.
template <class T>
void layer_norm_modulate_backward(const T* dy, const T* xhat, const T* rstd, const T* ss, T* dx,
                                  T* dss, const Groups& g) {
  const int64_t D = g.dim, S = g.rows_per_group;
  parallel_for(g.groups, 12 * S * D, [&](int64_t grp) {
    const T* sc = ss + grp * 2 * D + D;
    T* dsh = dss + grp * 2 * D;
    T* dsc = dsh + D;
    std::vector<T> gx(static_cast<size_t>(D));
    for (int64_t i = 0; i < D; ++i) dsh[i] = dsc[i] = 0;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t r = grp * S + s;
      const T* dyr = dy + r * D;
      const T* xh = xhat + r * D;
      modulate_backward_row(dyr, sc, xh, gx.data(), dsh, dsc, D);
      const T mean_g = simd::sum(gx.data(), D) / static_cast<T>(D);
      const T mean_gx = simd::dot(gx.data(), xh, D) / static_cast<T>(D);
      // rstd (gx - mean_g - xhat mean_gx)
      norm_dx_row(gx.data(), rstd[r], xh, rstd[r] * mean_gx, rstd[r] * mean_g, dx + r * D, D);
    }
  });
}

}  // namespace

Tensor layer_norm_modulate(const Tensor& x_in, const Tensor& shift_scale_in, double eps) {
  const char* op = "layer_norm_modulate";
  check_floats(op, {{"x", x_in}, {"shift_scale", shift_scale_in}});
  Groups g = groups_of(x_in, op);
  g.param_shape.back() = 2 * g.dim;
  const Tensor x = raw::contiguous(x_in);
  const Tensor ss = per_group(shift_scale_in, g, op, "shift_scale");
  Tensor y = empty(x.shape(), x.dtype()), xhat = empty(x.shape(), x.dtype());
  Tensor rstd = empty({g.groups * g.rows_per_group}, x.dtype());
  visit_float_dtype(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    layer_norm_modulate_forward(x.data<T>(), ss.data<T>(), y.data<T>(), xhat.data<T>(),
                                rstd.data<T>(), g, eps);
  });
  return record(op, y, {x_in, shift_scale_in}, {xhat, rstd, ss}, [g](Backward& ctx) {
    const Tensor &xhat = ctx.saved[0], &rstd = ctx.saved[1], &ss = ctx.saved[2];
    const Tensor dy = raw::contiguous(ctx.grad);
    Tensor dx = empty(xhat.shape(), xhat.dtype()), dss = empty(g.param_shape, xhat.dtype());
    visit_float_dtype(xhat.dtype(), [&](auto tag) {
      using T = decltype(tag);
      layer_norm_modulate_backward(dy.data<T>(), xhat.data<T>(), rstd.data<T>(), ss.data<T>(),
                                   dx.data<T>(), dss.data<T>(), g);
    });
    ctx.input(0, [&] { return dx; });
    ctx.input(1, [&] { return dss; });
  });
}

Tensor layer_norm_modulate(const Tensor& x, const Tensor& shift, const Tensor& scale, double eps) {
  const char* op = "layer_norm_modulate";
  check_floats(op, {{"x", x}, {"shift", shift}, {"scale", scale}});
  const Groups g = groups_of(x, op);
  check_per_group(shift, g, op, "shift");
  check_per_group(scale, g, op, "scale");
  return layer_norm_modulate(
      x, concat({broadcast_to(shift, g.param_shape), broadcast_to(scale, g.param_shape)}, -1), eps);
}

namespace {

// ---- rms_norm ----

template <class T>
void rms_norm_forward(const T* x, const T* gamma, T* y, T* rstd, int64_t rows, int64_t D,
                      double eps) {
  parallel_for(rows, 4 * D, [&](int64_t r) {
    const T* xr = x + r * D;
    const T mean_square = simd::sum_squared_deviation(xr, T(0), D) / static_cast<T>(D);
    const T inv = static_cast<T>(1.0 / std::sqrt(mean_square + eps));
    rstd[r] = inv;
    T* yr = y + r * D;
    for (int64_t i = 0; i < D; ++i) yr[i] = xr[i] * inv * gamma[i];
  });
}

// gy = dy gamma; dx = rstd gy - x rstd^3 mean(gy x); dgamma = sum over rows of dy x rstd.
template <class T>
void rms_norm_backward(const T* dy, const T* x, const T* rstd, const T* gamma, T* dx, T* dgamma,
                       int64_t rows, int64_t D) {
  parallel_for(rows, 6 * D, [&](int64_t r) {
    const T* dyr = dy + r * D;
    const T* xr = x + r * D;
    T* dxr = dx + r * D;
    for (int64_t i = 0; i < D; ++i) dxr[i] = dyr[i] * gamma[i];  // gy, first
    const T inv = rstd[r];
    const T k = simd::dot(dxr, xr, D) / static_cast<T>(D) * inv * inv * inv;
    norm_dx_row(dxr, inv, xr, k, T(0), dxr, D);
  });
  // dgamma: partial sums over blocks of rows, then the blocks in order (the same bits on any
  // number of threads).
  const int64_t block = 256, blocks = (rows + block - 1) / block;
  std::vector<double> partial(static_cast<size_t>(blocks * D), 0.0);
  parallel_for(blocks, 2 * block * D, [&](int64_t b) {
    double* acc = partial.data() + b * D;
    for (int64_t r = b * block; r < std::min(rows, (b + 1) * block); ++r)
      for (int64_t i = 0; i < D; ++i)
        acc[i] += static_cast<double>(dy[r * D + i] * x[r * D + i]) * rstd[r];
  });
  detail::sum_in_order(partial.data(), blocks, D, dgamma);
}

}  // namespace

Tensor rms_norm_fused(const Tensor& x_in, const Tensor& gamma, double eps) {
  const char* op = "rms_norm";
  check_floats(op, {{"x", x_in}, {"gamma", gamma}});
  MMDIT_CHECK(x_in.dim() >= 1 && gamma.dim() == 1 && gamma.shape()[0] == x_in.shape().back(), op,
              ": gamma has shape ", shape_str(gamma.shape()), " for input ",
              shape_str(x_in.shape()), "; expected (", x_in.dim() ? x_in.shape().back() : 0, ",)");
  const Tensor x = raw::contiguous(x_in), gm = raw::contiguous(gamma);
  const int64_t D = x.shape().back(), rows = x.numel() / std::max<int64_t>(D, 1);
  Tensor y = empty(x.shape(), x.dtype()), rstd = empty({rows}, x.dtype());
  visit_float_dtype(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    rms_norm_forward(x.data<T>(), gm.data<T>(), y.data<T>(), rstd.data<T>(), rows, D, eps);
  });
  return record(op, y, {x_in, gamma}, {x, rstd, gm}, [rows, D](Backward& ctx) {
    const Tensor &x = ctx.saved[0], &rstd = ctx.saved[1], &gamma = ctx.saved[2];
    const Tensor dy = raw::contiguous(ctx.grad);
    Tensor dx = empty(x.shape(), x.dtype()), dgamma = empty({D}, x.dtype());
    visit_float_dtype(x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      rms_norm_backward(dy.data<T>(), x.data<T>(), rstd.data<T>(), gamma.data<T>(), dx.data<T>(),
                        dgamma.data<T>(), rows, D);
    });
    ctx.input(0, [&] { return dx; });
    ctx.input(1, [&] { return dgamma; });
  });
}

namespace {

// ---- swiglu ----

// The sigmoid comes from the SIMD kernel, a block of it at a time on the stack; the rest of each
// block is a plain loop, compiled for AVX-512 and AVX2 too (MMDIT_SIMD_CLONES).
constexpr int64_t kBlock = 1024;
// parallel_for's cost per block: the sigmoid's exponential and division cost about as much as 16
// simple operations per value (16 x 1024 values take 10 us on one thread), so that the policy's
// feed-forward at batch 1 is split across the threads (policy-act 26.7-27.2 -> 25.9-26.6 ms).
constexpr int64_t kSwigluCost = 16 * kBlock;

template <class T>
inline void swiglu_block_impl(const T* __restrict a, const T* __restrict g, const T* __restrict s,
                              T* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = a[i] * (g[i] * s[i]);
}
MMDIT_SIMD_CLONES void swiglu_block(const float* a, const float* g, const float* s, float* y,
                                    int64_t n) {
  swiglu_block_impl(a, g, s, y, n);
}
MMDIT_SIMD_CLONES void swiglu_block(const double* a, const double* g, const double* s, double* y,
                                    int64_t n) {
  swiglu_block_impl(a, g, s, y, n);
}

template <class T>
void swiglu_forward(const T* a, const T* g, T* y, int64_t n) {
  parallel_for((n + kBlock - 1) / kBlock, kSwigluCost, [&](int64_t b) {
    const int64_t begin = b * kBlock, len = std::min(kBlock, n - begin);
    T s[kBlock];
    simd::unary(raw::UnaryOp::sigmoid, g + begin, s, len);
    swiglu_block(a + begin, g + begin, s, y + begin, len);
  });
}

// da = dy silu(g); dg = dy a s (1 + g (1 - s)), s = sigmoid(g).
template <class T>
inline void swiglu_backward_block_impl(const T* __restrict dy, const T* __restrict a,
                                       const T* __restrict g, const T* __restrict s,
                                       T* __restrict da, T* __restrict dg, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    da[i] = dy[i] * (g[i] * s[i]);
    dg[i] = dy[i] * a[i] * (s[i] * (1 + g[i] * (1 - s[i])));
  }
}
MMDIT_SIMD_CLONES void swiglu_backward_block(const float* dy, const float* a, const float* g,
                                             const float* s, float* da, float* dg, int64_t n) {
  swiglu_backward_block_impl(dy, a, g, s, da, dg, n);
}
MMDIT_SIMD_CLONES void swiglu_backward_block(const double* dy, const double* a, const double* g,
                                             const double* s, double* da, double* dg, int64_t n) {
  swiglu_backward_block_impl(dy, a, g, s, da, dg, n);
}

template <class T>
void swiglu_backward(const T* dy, const T* a, const T* g, T* da, T* dg, int64_t n) {
  parallel_for((n + kBlock - 1) / kBlock, kSwigluCost + 2 * kBlock, [&](int64_t b) {
    const int64_t begin = b * kBlock, len = std::min(kBlock, n - begin);
    T s[kBlock];
    simd::unary(raw::UnaryOp::sigmoid, g + begin, s, len);
    swiglu_backward_block(dy + begin, a + begin, g + begin, s, da + begin, dg + begin, len);
  });
}

}  // namespace

Tensor swiglu(const Tensor& a_in, const Tensor& g_in) {
  const char* op = "swiglu";
  check_floats(op, {{"a", a_in}, {"g", g_in}});
  MMDIT_CHECK(a_in.shape() == g_in.shape(), op, ": shapes ", shape_str(a_in.shape()), " and ",
              shape_str(g_in.shape()), " differ");
  const Tensor a = raw::contiguous(a_in), g = raw::contiguous(g_in);
  Tensor y = empty(a.shape(), a.dtype());
  visit_float_dtype(a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    swiglu_forward(a.data<T>(), g.data<T>(), y.data<T>(), a.numel());
  });
  return record(op, y, {a_in, g_in}, {a, g}, [](Backward& ctx) {
    const Tensor &a = ctx.saved[0], &g = ctx.saved[1];
    const Tensor dy = raw::contiguous(ctx.grad);
    Tensor da = empty(a.shape(), a.dtype()), dg = empty(a.shape(), a.dtype());
    visit_float_dtype(a.dtype(), [&](auto tag) {
      using T = decltype(tag);
      swiglu_backward(dy.data<T>(), a.data<T>(), g.data<T>(), da.data<T>(), dg.data<T>(),
                      a.numel());
    });
    ctx.input(0, [&] { return da; });
    ctx.input(1, [&] { return dg; });
  });
}

namespace {

// ---- gated_residual ----

template <class T>
void gated_residual_forward(const T* x, const T* gate, const T* y, T* out, const Groups& g) {
  const int64_t D = g.dim, S = g.rows_per_group;
  parallel_for(g.groups * S, 2 * D, [&](int64_t r) {
    gated_sum_row(x + r * D, gate + (r / S) * D, y + r * D, out + r * D, D);
  });
}

// dy_in = dy gate; dgate = sum_S dy y (dx is dy itself).
template <class T>
void gated_residual_backward(const T* dy, const T* gate, const T* y, T* dy_in, T* dgate,
                             const Groups& g) {
  const int64_t D = g.dim, S = g.rows_per_group;
  parallel_for(g.groups, 4 * S * D, [&](int64_t grp) {
    const T* gt = gate + grp * D;
    T* dg = dgate ? dgate + grp * D : nullptr;
    if (dg)
      for (int64_t i = 0; i < D; ++i) dg[i] = 0;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t r = grp * S + s;
      gated_backward_row(dy + r * D, gt, y + r * D, dy_in ? dy_in + r * D : nullptr, dg, D);
    }
  });
}

}  // namespace

Tensor gated_residual(const Tensor& x_in, const Tensor& gate_in, const Tensor& y_in) {
  const char* op = "gated_residual";
  check_floats(op, {{"x", x_in}, {"gate", gate_in}, {"y", y_in}});
  MMDIT_CHECK(x_in.shape() == y_in.shape(), op, ": residual ", shape_str(x_in.shape()),
              " and branch ", shape_str(y_in.shape()), " differ");
  const Groups g = groups_of(x_in, op);
  const Tensor x = raw::contiguous(x_in), y = raw::contiguous(y_in);
  const Tensor gate = per_group(gate_in, g, op, "gate");
  Tensor out = empty(x.shape(), x.dtype());
  visit_float_dtype(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    gated_residual_forward(x.data<T>(), gate.data<T>(), y.data<T>(), out.data<T>(), g);
  });
  return record(op, out, {x_in, gate_in, y_in}, {gate, y}, [g](Backward& ctx) {
    const Tensor &gate = ctx.saved[0], &y = ctx.saved[1];
    const Tensor dy = raw::contiguous(ctx.grad);
    Tensor dy_in = ctx.needs(2) ? empty(y.shape(), y.dtype()) : Tensor();
    Tensor dgate = ctx.needs(1) ? empty(g.param_shape, y.dtype()) : Tensor();
    visit_float_dtype(y.dtype(), [&](auto tag) {
      using T = decltype(tag);
      gated_residual_backward(dy.data<T>(), gate.data<T>(), y.data<T>(),
                              dy_in.defined() ? dy_in.data<T>() : nullptr,
                              dgate.defined() ? dgate.data<T>() : nullptr, g);
    });
    ctx.input(0, [&] { return ctx.grad; });
    ctx.input(1, [&] { return dgate; });
    ctx.input(2, [&] { return dy_in; });
  });
}

namespace {

// ---- rope ----

// out = x cos + rotate_half(x) sin per row of d; with `transposed`, the adjoint:
// out = x cos + rotate_half^T(x sin), rotate_half^T([a1 | a2]) = [a2 | -a1].
template <class T>
void rope_rows(const T* x, const T* cos, const T* sin, T* out, int64_t rows, int64_t S, int64_t H,
               int64_t d, bool transposed) {
  const int64_t half = d / 2;
  parallel_for(rows, 4 * d, [&](int64_t r) {
    const int64_t s = (r / H) % S;
    const T* xr = x + r * d;
    const T* c = cos + s * d;
    const T* sn = sin + s * d;
    T* o = out + r * d;
    if (!transposed) {
      for (int64_t j = 0; j < half; ++j) o[j] = xr[j] * c[j] + (-xr[j + half]) * sn[j];
      for (int64_t j = half; j < d; ++j) o[j] = xr[j] * c[j] + xr[j - half] * sn[j];
    } else {
      for (int64_t j = 0; j < half; ++j) o[j] = xr[j] * c[j] + xr[j + half] * sn[j + half];
      for (int64_t j = half; j < d; ++j) o[j] = xr[j] * c[j] - xr[j - half] * sn[j - half];
    }
  });
}

}  // namespace

Tensor rope(const Tensor& x_in, const Tensor& cos_in, const Tensor& sin_in) {
  const char* op = "rope";
  check_floats(op, {{"x", x_in}, {"cos", cos_in}, {"sin", sin_in}});
  refuse_constant_on_tape(op, "cos", cos_in);
  refuse_constant_on_tape(op, "sin", sin_in);
  MMDIT_CHECK(x_in.dim() == 4 && x_in.shape()[3] > 0 && x_in.shape()[3] % 2 == 0, op,
              ": input has shape ", shape_str(x_in.shape()),
              "; expected (B, S, H, d) with d even and positive");
  const int64_t S = x_in.shape()[1], H = x_in.shape()[2], d = x_in.shape()[3];
  MMDIT_CHECK(cos_in.shape() == Shape({S, d}) && sin_in.shape() == Shape({S, d}), op,
              ": tables have shapes ", shape_str(cos_in.shape()), " and ",
              shape_str(sin_in.shape()), "; expected (", S, ",", d, ") for input ",
              shape_str(x_in.shape()));
  const Tensor x = raw::contiguous(x_in);
  const Tensor c = raw::contiguous(cos_in), s = raw::contiguous(sin_in);
  const int64_t rows = x.numel() / d;
  Tensor y = empty(x.shape(), x.dtype());
  visit_float_dtype(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    rope_rows(x.data<T>(), c.data<T>(), s.data<T>(), y.data<T>(), rows, S, H, d, false);
  });
  // The tables are constants: only x gets a gradient.
  return record(op, y, {x_in}, {c, s}, [rows, S, H, d](Backward& ctx) {
    const Tensor &c = ctx.saved[0], &s = ctx.saved[1];
    ctx.input(0, [&] {
      const Tensor dy = raw::contiguous(ctx.grad);
      Tensor dx = empty(dy.shape(), dy.dtype());
      visit_float_dtype(dy.dtype(), [&](auto tag) {
        using T = decltype(tag);
        rope_rows(dy.data<T>(), c.data<T>(), s.data<T>(), dx.data<T>(), rows, S, H, d, true);
      });
      return dx;
    });
  });
}

namespace {

// ---- qk_norm_rope ----

// Task (b, part, h) of the qk_norm_rope kernels, one per head of (B, S, 3, H, d): part 0 is q,
// 1 is k, 2 is v. offset: the head's first value in the packed tensor; stats: its S entries of
// rstd (B, 2, H, S), for q and k heads.
struct QkvHeadTask {
  int64_t b, part, h, offset, stats;
  QkvHeadTask(int64_t task, int64_t S, int64_t H, int64_t d)
      : b(task / (3 * H)),
        part(task / H % 3),
        h(task % H),
        offset(b * S * 3 * H * d + part * H * d + h * d),
        stats(((b * 2 + part) * H + h) * S) {}
};

// Copies a v head's S rows of d values, `ld` apart, unchanged (forward) or its gradient (backward).
template <class T>
void copy_head_rows(const T* from, T* to, int64_t S, int64_t d, int64_t ld) {
  for (int64_t s = 0; s < S; ++s) std::copy_n(from + s * ld, d, to + s * ld);
}

// One task per head: the S rows of a q or k head become rope(rms_norm(x) * gamma) in one call of
// the row kernel joint attention uses too, and rstd gets their 1 / rms; a v head is copied.
template <class T>
void qk_norm_rope_forward(const T* x, const T* gq, const T* gk, const T* cos, const T* sin, T* y,
                          T* rstd, int64_t B, int64_t S, int64_t H, int64_t d, double eps) {
  const int64_t ld = 3 * H * d;
  parallel_for(B * 3 * H, 18 * S * d, [&](int64_t task) {
    const QkvHeadTask t(task, S, H, d);
    if (t.part == 2) return copy_head_rows(x + t.offset, y + t.offset, S, d, ld);
    simd::qk_norm_rope_rows(x + t.offset, ld, S, d, t.part == 0 ? gq : gk, cos, sin, eps,
                            y + t.offset, ld, rstd + t.stats);
  });
}

// The row kernel's backward on every q and k head; v heads pass dy through.
template <class T>
void qk_norm_rope_backward(const T* dy, const T* x, const T* rstd, const T* gq, const T* gk,
                           const T* cos, const T* sin, T* dx, T* dgq, T* dgk, int64_t B, int64_t S,
                           int64_t H, int64_t d) {
  const int64_t ld = 3 * H * d, heads = B * H;
  // Each q or k head's gamma gradient apart, (2, B H, d), summed in order after: the same bits on
  // any number of threads.
  std::vector<T> partial(static_cast<size_t>(2 * heads * d), T(0));
  parallel_for(B * 3 * H, 30 * S * d, [&](int64_t task) {
    const QkvHeadTask t(task, S, H, d);
    if (t.part == 2) return copy_head_rows(dy + t.offset, dx + t.offset, S, d, ld);
    thread_local std::vector<T> dz;
    if (static_cast<int64_t>(dz.size()) < d) dz.resize(static_cast<size_t>(d));
    simd::qk_norm_rope_rows_backward(
        dy + t.offset, ld, x + t.offset, ld, S, d, rstd + t.stats, t.part == 0 ? gq : gk, cos, sin,
        dz.data(), partial.data() + (t.part * heads + t.b * H + t.h) * d, dx + t.offset);
  });
  detail::sum_in_order(partial.data(), heads, d, dgq);
  detail::sum_in_order(partial.data() + heads * d, heads, d, dgk);
}

}  // namespace

Tensor qk_norm_rope(const Tensor& qkv_in, const Tensor& gamma_q, const Tensor& gamma_k,
                    const Tensor& cos_in, const Tensor& sin_in, double eps) {
  const char* op = "qk_norm_rope";
  check_floats(op, {{"qkv", qkv_in},
                    {"gamma_q", gamma_q},
                    {"gamma_k", gamma_k},
                    {"cos", cos_in},
                    {"sin", sin_in}});
  refuse_constant_on_tape(op, "cos", cos_in);
  refuse_constant_on_tape(op, "sin", sin_in);
  MMDIT_CHECK(qkv_in.dim() == 5 && qkv_in.shape()[2] == 3 && qkv_in.shape()[4] > 0 &&
                  qkv_in.shape()[4] % 2 == 0,
              op, ": packed qkv has shape ", shape_str(qkv_in.shape()),
              "; expected (B, S, 3, H, d) with d even and positive");
  const int64_t B = qkv_in.shape()[0], S = qkv_in.shape()[1], H = qkv_in.shape()[3],
                d = qkv_in.shape()[4];
  MMDIT_CHECK(gamma_q.shape() == Shape({d}) && gamma_k.shape() == Shape({d}), op,
              ": gammas have shapes ", shape_str(gamma_q.shape()), " and ",
              shape_str(gamma_k.shape()), "; expected (", d, ",)");
  MMDIT_CHECK(cos_in.shape() == Shape({S, d}) && sin_in.shape() == Shape({S, d}), op,
              ": tables have shapes ", shape_str(cos_in.shape()), " and ",
              shape_str(sin_in.shape()), "; expected (", S, ",", d, ")");
  const Tensor x = raw::contiguous(qkv_in), gq = raw::contiguous(gamma_q),
               gk = raw::contiguous(gamma_k), c = raw::contiguous(cos_in),
               sn = raw::contiguous(sin_in);
  Tensor y = empty(x.shape(), x.dtype()), rstd = empty({B * S * 2 * H}, x.dtype());
  visit_float_dtype(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    qk_norm_rope_forward(x.data<T>(), gq.data<T>(), gk.data<T>(), c.data<T>(), sn.data<T>(),
                         y.data<T>(), rstd.data<T>(), B, S, H, d, eps);
  });
  const Tensor saved[] = {x, rstd, gq, gk, c, sn};
  const Tensor inputs[] = {qkv_in, gamma_q, gamma_k};
  return record(op, y, std::span<const Tensor>(inputs), std::span<const Tensor>(saved),
                [B, S, H, d](Backward& ctx) {
                  const Tensor &x = ctx.saved[0], &rstd = ctx.saved[1], &gq = ctx.saved[2],
                               &gk = ctx.saved[3], &c = ctx.saved[4], &sn = ctx.saved[5];
                  const Tensor dy = raw::contiguous(ctx.grad);
                  Tensor dx = empty(x.shape(), x.dtype()), dgq = empty({d}, x.dtype()),
                         dgk = empty({d}, x.dtype());
                  visit_float_dtype(x.dtype(), [&](auto tag) {
                    using T = decltype(tag);
                    qk_norm_rope_backward(dy.data<T>(), x.data<T>(), rstd.data<T>(), gq.data<T>(),
                                          gk.data<T>(), c.data<T>(), sn.data<T>(), dx.data<T>(),
                                          dgq.data<T>(), dgk.data<T>(), B, S, H, d);
                  });
                  ctx.input(0, [&] { return dx; });
                  ctx.input(1, [&] { return dgq; });
                  ctx.input(2, [&] { return dgk; });
                });
}

namespace {

// ---- linear ----

template <class T>
void add_bias_rows(T* y, const T* bias, int64_t rows, int64_t out) {
  parallel_for(rows, out, [&](int64_t r) {
    for (int64_t j = 0; j < out; ++j) y[r * out + j] += bias[j];
  });
}

void check_linear(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  const char* op = "linear";
  check_floats(op, {{"x", x}, {"weight", weight}});
  MMDIT_CHECK(weight.dim() == 2 && x.dim() >= 1 && x.shape().back() == weight.shape()[1], op,
              ": input ", shape_str(x.shape()), " does not end in the weight's in-features ",
              weight.dim() == 2 ? weight.shape()[1] : -1, " (weight ", shape_str(weight.shape()),
              ")");
  const int64_t out = weight.shape()[0];
  MMDIT_CHECK(!bias.defined() || (bias.dtype() == x.dtype() && bias.shape() == Shape({out})), op,
              ": bias has shape ", bias.defined() ? shape_str(bias.shape()) : "", " and dtype ",
              bias.defined() ? dtype_name(bias.dtype()) : "", "; expected (", out, ",) ",
              dtype_name(x.dtype()));
}

// From this many rows a product is bound by its multiply-adds rather than by reading the
// weight, and the sgemm on the weight as it is ran policy-act-b64 4-5% faster than the packed
// kernel (the action tokens' 1024-row products; medians 1007-1045 -> 954-970 ms), though alone
// the two ran level. A bfloat16 weight is rounded into a float32 copy for each such product, as
// its products must see the rounded weight (policy-act-b64-bf16 on the Intel machine, alternating:
// 1134-1164 -> 1019-1049 ms), except where the packed kernel multiplies bfloat16 pairs
// (vdpbf16ps), twice as many per instruction as the sgemm.
constexpr int64_t kUnpackedFromRows = 512;

// How the frozen model (UseFrozenWeights, as EulerSampler sets) multiplies x by `weight`: by
// the packed copy, by the weight rounded to bfloat16 on the sgemm, or as outside the scope.
struct FrozenProduct {
  const PackedWeight* packed = nullptr;
  bool bf16_rounded = false;
};

FrozenProduct frozen_product(const Tensor& x, const Tensor& weight) {
  FrozenWeights* frozen = frozen_weights();
  if (!frozen || x.dtype() != DType::f32 || weight.dtype() != DType::f32) return {};
  // A product the tape records multiplies by the weight itself: its backward does, and a packed
  // copy may be rounded to bfloat16 or older than the weight.
  const Tape* tape = Tape::active();
  const Tensor operands[] = {x, weight};
  if (tape && detail::any_on_tape(*tape, operands)) return {};
  const int64_t rows = weight.shape()[1] > 0 ? x.numel() / weight.shape()[1] : 0;
  if (rows >= kUnpackedFromRows && frozen->precision() == WeightPrecision::f32) return {};
  if (rows >= kUnpackedFromRows && !simd::use_bf16_dot_kernel()) return {nullptr, true};
  return {&frozen->get(weight), false};
}

// linear_fused given the product y = x2 W^T of x's rows x2: the bias, the output's shape and the
// tape node.
Tensor finish_linear(const Tensor& x, const Tensor& x2, const Tensor& weight, const Tensor& bias,
                     Tensor y) {
  const int64_t in = weight.shape()[1], out = weight.shape()[0];
  if (bias.defined()) {
    const Tensor b = raw::contiguous(bias);
    visit_float_dtype(x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      add_bias_rows(y.data<T>(), b.data<T>(), y.shape()[0], out);
    });
  }
  Shape out_shape = x.shape();
  out_shape.back() = out;
  y = raw::reshape(y, out_shape);
  std::vector<Tensor> inputs = {x, weight};
  if (bias.defined()) inputs.push_back(bias);
  const Tensor saved[] = {x2, weight};
  return record("linear", y, std::span<const Tensor>(inputs), std::span<const Tensor>(saved),
                [in, out](Backward& ctx) {
                  const Tensor &x2 = ctx.saved[0], &weight = ctx.saved[1];
                  const Tensor dy = raw::reshape(ctx.grad, rows_shape(ctx.grad.shape(), out));
                  ctx.input(0, [&] {
                    Shape shape = ctx.grad.shape();
                    shape.back() = in;
                    return raw::reshape(raw::matmul(dy, weight), shape);
                  });
                  ctx.input(1, [&] { return raw::matmul(raw::transpose(dy, 0, 1), x2); });
                  if (ctx.num_inputs() > 2) ctx.input(2, [&] { return raw::sum(dy, {0}); });
                });
}

// linear_fused after its checks, multiplying as the frozen model says.
Tensor checked_linear(const Tensor& x, const Tensor& weight, const Tensor& bias,
                      const FrozenProduct& frozen) {
  // (..., in) as rows: a view when x is contiguous.
  const Tensor x2 = raw::reshape(x, rows_shape(x.shape(), weight.shape()[1]));
  Tensor y = frozen.packed         ? raw::matmul_packed(x2, *frozen.packed)
             : frozen.bf16_rounded ? raw::matmul_bf16_rounded(x2, weight)
                                   : raw::matmul(x2, raw::transpose(weight, 0, 1));
  return finish_linear(x, x2, weight, bias, std::move(y));
}
}  // namespace

Tensor linear_fused(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  check_linear(x, weight, bias);
  return checked_linear(x, weight, bias, frozen_product(x, weight));
}

std::vector<Tensor> linear_fused_each(const std::vector<Tensor>& xs,
                                      const std::vector<Tensor>& weights,
                                      const std::vector<Tensor>& biases,
                                      const std::vector<std::string>& scopes) {
  const size_t n = xs.size();
  MMDIT_CHECK(weights.size() == n && biases.size() == n && (scopes.empty() || scopes.size() == n),
              "linear_fused_each: ", n, " inputs, ", weights.size(), " weights, ", biases.size(),
              " biases and ", scopes.size(), " scopes");
  std::vector<Tensor> ys(n);
  const auto scoped = [&](size_t i, auto&& f) {
    if (scopes.empty()) return f();
    NameScope scope(scopes[i]);
    return f();
  };
  // A packed product waits here (n: none) for a partner to multiply with.
  size_t waiting = n;
  const PackedWeight* waiting_packed = nullptr;
  for (size_t i = 0; i < n; ++i) {
    if (!xs[i].defined()) continue;
    check_linear(xs[i], weights[i], biases[i]);
    const FrozenProduct frozen = frozen_product(xs[i], weights[i]);
    const PackedWeight* packed = frozen.packed;
    if (!packed) {
      ys[i] = scoped(i, [&] { return checked_linear(xs[i], weights[i], biases[i], frozen); });
      continue;
    }
    if (waiting == n) {
      waiting = i;
      waiting_packed = packed;
      continue;
    }
    const size_t j = waiting;
    waiting = n;
    const Tensor xj = raw::reshape(xs[j], rows_shape(xs[j].shape(), weights[j].shape()[1]));
    const Tensor xi = raw::reshape(xs[i], rows_shape(xs[i].shape(), weights[i].shape()[1]));
    // Not a structured binding: Clang before 16 cannot capture one in the lambdas below.
    const std::array<Tensor, 2> y = raw::matmul_packed_pair(xj, *waiting_packed, xi, *packed);
    ys[j] = scoped(j, [&] { return finish_linear(xs[j], xj, weights[j], biases[j], y[0]); });
    ys[i] = scoped(i, [&] { return finish_linear(xs[i], xi, weights[i], biases[i], y[1]); });
  }
  if (waiting != n)
    ys[waiting] = scoped(waiting, [&] {
      return checked_linear(xs[waiting], weights[waiting], biases[waiting], {waiting_packed});
    });
  return ys;
}

}  // namespace mmdit
