// Attention's row kernels: the masked, scaled softmax of a row of logits and its backward, one
// pass each over a row that sits in L1 (as separate steps, a scalar mask-and-scale loop and then
// a softmax took 55% of the in-context model's attention forward, microbench); and QK-RMSNorm
// with the rotary embedding over a head's rows, forward and backward, one call for all of them
// (per row, the calls and dispatches cost more than the arithmetic of 64 values).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tensor/simd_attention.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep

#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>

#include "tensor/simd.h"
#include "tensor/simd_tail-inl.h"

HWY_BEFORE_NAMESPACE();
namespace mmdit::simd {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Calls body(i, count) for the vectors of a row [0, n): count == Lanes(d) but for the last.
template <class D, class Body>
HWY_INLINE void ForVectors(D d, int64_t n, Body body) {
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  for (int64_t i = 0; i < n; i += lanes) body(i, std::min(lanes, n - i));
}

template <class D>
HWY_INLINE hn::Vec<D> Load(D d, const hn::TFromD<D>* p, int64_t count, hn::TFromD<D> fill) {
  return count == static_cast<int64_t>(hn::Lanes(d)) ? hn::LoadU(d, p)
                                                     : LoadFirst(d, p, count, fill);
}

template <class D>
HWY_INLINE void Store(D d, hn::Vec<D> v, hn::TFromD<D>* p, int64_t count) {
  if (count == static_cast<int64_t>(hn::Lanes(d)))
    hn::StoreU(v, d, p);
  else
    hn::BlendedStore(v, hn::FirstN(d, static_cast<size_t>(count)), d, p);
}

// exp for x <= 0 (logits minus their row's max), NaN kept.
template <class D>
HWY_INLINE hn::Vec<D> ExpNonPositive(D d, hn::Vec<D> x) {
  return hn::IfThenElse(hn::IsNaN(x), x, hn::Exp(d, x));
}

// x[j] = allowed[j] != 0 ? scale x[j] : masked, returning the row's max.
template <class T>
T MaskAndScale(T* x, int64_t n, const T* allowed, T scale) {
  const hn::ScalableTag<T> d;
  // As the reference: a masked logit is -0.7 times float32's largest, so a row with every logit
  // masked is uniform rather than NaN.
  const auto masked = hn::Set(d, static_cast<T>(-0.7 * FLT_MAX));
  const auto scale_v = hn::Set(d, scale);
  auto row_max = hn::Set(d, -std::numeric_limits<T>::infinity());
  ForVectors(d, n, [&](int64_t i, int64_t count) {
    auto v = hn::Mul(Load(d, x + i, count, T(0)), scale_v);
    if (allowed)
      v = hn::IfThenElse(hn::Ne(Load(d, allowed + i, count, T(0)), hn::Zero(d)), v, masked);
    // A NaN logit may be lost from the max (x86's max returns its second operand then), but
    // not from the row: its exponential is NaN, and so is the sum.
    row_max =
        hn::IfThenElse(hn::FirstN(d, static_cast<size_t>(count)), hn::Max(row_max, v), row_max);
    Store(d, v, x + i, count);
  });
  return hn::GetLane(hn::MaxOfLanes(d, row_max));
}

template <class T>
void AttentionSoftmaxImpl(T* x, int64_t n, const T* allowed, T scale, T* max_out, T* sum_out) {
  const hn::ScalableTag<T> d;
  const T row_max = MaskAndScale(x, n, allowed, scale);
  const auto max_v = hn::Set(d, row_max);
  auto sum = hn::Zero(d);
  ForVectors(d, n, [&](int64_t i, int64_t count) {
    const auto e = ExpNonPositive(d, hn::Sub(Load(d, x + i, count, row_max), max_v));
    sum = hn::Add(sum, hn::IfThenElseZero(hn::FirstN(d, static_cast<size_t>(count)), e));
    Store(d, e, x + i, count);
  });
  const T row_sum = hn::GetLane(hn::SumOfLanes(d, sum));
  const auto inv = hn::Set(d, T(1) / row_sum);
  ForVectors(d, n, [&](int64_t i, int64_t count) {
    Store(d, hn::Mul(Load(d, x + i, count, T(0)), inv), x + i, count);
  });
  *max_out = row_max;
  *sum_out = row_sum;
}

template <class T>
void AttentionSoftmaxAgainImpl(T* x, int64_t n, const T* allowed, T scale, T row_max, T row_sum) {
  const hn::ScalableTag<T> d;
  MaskAndScale(x, n, allowed, scale);
  const auto max_v = hn::Set(d, row_max), inv = hn::Set(d, T(1) / row_sum);
  ForVectors(d, n, [&](int64_t i, int64_t count) {
    const auto e = ExpNonPositive(d, hn::Sub(Load(d, x + i, count, row_max), max_v));
    Store(d, hn::Mul(e, inv), x + i, count);
  });
}

template <class T>
void AttentionSoftmaxBackwardImpl(T* ds, const T* p, int64_t n, const T* allowed, T scale) {
  const hn::ScalableTag<T> d;
  auto dot = hn::Zero(d);
  ForVectors(d, n, [&](int64_t i, int64_t count) {
    dot = hn::MulAdd(Load(d, ds + i, count, T(0)), Load(d, p + i, count, T(0)), dot);
  });
  const auto dot_v = hn::Set(d, hn::GetLane(hn::SumOfLanes(d, dot))), scale_v = hn::Set(d, scale);
  ForVectors(d, n, [&](int64_t i, int64_t count) {
    const auto pv = Load(d, p + i, count, T(0));
    auto g = hn::Mul(scale_v, hn::Mul(pv, hn::Sub(Load(d, ds + i, count, T(0)), dot_v)));
    if (allowed) g = hn::IfThenElseZero(hn::Ne(Load(d, allowed + i, count, T(0)), hn::Zero(d)), g);
    Store(d, g, ds + i, count);
  });
}

// Rows r < rows of d values at x + r ld_x: y row r (ld_y apart) = rope(x * inv * gamma),
// inv[r] = 1 / sqrt(mean(x^2) + eps), with row r's cos and sin at cos + r d, sin + r d.
template <class T>
void QkNormRopeRowsImpl(const T* x, int64_t ld_x, int64_t rows, int64_t d, const T* gamma,
                        const T* cos, const T* sin, double eps, T* y, int64_t ld_y, T* inv) {
  const hn::ScalableTag<T> dt;
  const int64_t half = d / 2;
  for (int64_t r = 0; r < rows; ++r, x += ld_x, y += ld_y, cos += d, sin += d) {
    auto squares = hn::Zero(dt);
    ForVectors(dt, d, [&](int64_t j, int64_t count) {
      const auto v = Load(dt, x + j, count, T(0));
      squares = hn::MulAdd(v, v, squares);
    });
    const T mean_square = hn::GetLane(hn::SumOfLanes(dt, squares)) / static_cast<T>(d);
    const T row_inv = static_cast<T>(1.0 / std::sqrt(mean_square + eps));
    inv[r] = row_inv;
    const auto inv_v = hn::Set(dt, row_inv);
    ForVectors(dt, half, [&](int64_t j, int64_t count) {
      const auto lo =
          hn::Mul(hn::Mul(Load(dt, x + j, count, T(0)), inv_v), Load(dt, gamma + j, count, T(0)));
      const auto hi = hn::Mul(hn::Mul(Load(dt, x + half + j, count, T(0)), inv_v),
                              Load(dt, gamma + half + j, count, T(0)));
      Store(dt,
            hn::MulAdd(lo, Load(dt, cos + j, count, T(0)),
                       hn::Neg(hn::Mul(hi, Load(dt, sin + j, count, T(0))))),
            y + j, count);
      Store(dt,
            hn::MulAdd(hi, Load(dt, cos + half + j, count, T(0)),
                       hn::Mul(lo, Load(dt, sin + half + j, count, T(0)))),
            y + half + j, count);
    });
  }
}

// Its backward for the same rows: dz = rope^T(dy); dgamma += dz x inv; dz *= gamma; then
// dx (rows ld_x apart, as x) = inv dz - x inv^3 mean(dz x). dz is d scratch.
template <class T>
void QkNormRopeRowsBackwardImpl(const T* dy, int64_t ld_dy, const T* x, int64_t ld_x, int64_t rows,
                                int64_t d, const T* inv, const T* gamma, const T* cos, const T* sin,
                                T* dz, T* dgamma, T* dx) {
  const hn::ScalableTag<T> dt;
  const int64_t half = d / 2;
  for (int64_t r = 0; r < rows; ++r, dy += ld_dy, x += ld_x, dx += ld_x, cos += d, sin += d) {
    const auto inv_v = hn::Set(dt, inv[r]);
    ForVectors(dt, half, [&](int64_t j, int64_t count) {
      const auto dy_lo = Load(dt, dy + j, count, T(0)),
                 dy_hi = Load(dt, dy + half + j, count, T(0));
      Store(dt,
            hn::MulAdd(dy_lo, Load(dt, cos + j, count, T(0)),
                       hn::Mul(dy_hi, Load(dt, sin + half + j, count, T(0)))),
            dz + j, count);
      Store(dt,
            hn::Sub(hn::Mul(dy_hi, Load(dt, cos + half + j, count, T(0))),
                    hn::Mul(dy_lo, Load(dt, sin + j, count, T(0)))),
            dz + half + j, count);
    });
    auto dot = hn::Zero(dt);
    ForVectors(dt, d, [&](int64_t j, int64_t count) {
      const auto z = Load(dt, dz + j, count, T(0)), xv = Load(dt, x + j, count, T(0));
      Store(dt, hn::MulAdd(hn::Mul(z, xv), inv_v, Load(dt, dgamma + j, count, T(0))), dgamma + j,
            count);
      const auto zg = hn::Mul(z, Load(dt, gamma + j, count, T(0)));
      Store(dt, zg, dz + j, count);
      dot = hn::MulAdd(zg, xv, dot);
    });
    const T row_inv = inv[r];
    const auto k3 = hn::Set(
        dt, hn::GetLane(hn::SumOfLanes(dt, dot)) / static_cast<T>(d) * row_inv * row_inv * row_inv);
    ForVectors(dt, d, [&](int64_t j, int64_t count) {
      Store(dt,
            hn::Sub(hn::Mul(Load(dt, dz + j, count, T(0)), inv_v),
                    hn::Mul(Load(dt, x + j, count, T(0)), k3)),
            dx + j, count);
    });
  }
}

void QkNormRopeRowsF32(const float* x, int64_t ld_x, int64_t rows, int64_t d, const float* gamma,
                       const float* cos, const float* sin, double eps, float* y, int64_t ld_y,
                       float* inv) {
  QkNormRopeRowsImpl(x, ld_x, rows, d, gamma, cos, sin, eps, y, ld_y, inv);
}
void QkNormRopeRowsF64(const double* x, int64_t ld_x, int64_t rows, int64_t d, const double* gamma,
                       const double* cos, const double* sin, double eps, double* y, int64_t ld_y,
                       double* inv) {
  QkNormRopeRowsImpl(x, ld_x, rows, d, gamma, cos, sin, eps, y, ld_y, inv);
}
void QkNormRopeRowsBackwardF32(const float* dy, int64_t ld_dy, const float* x, int64_t ld_x,
                               int64_t rows, int64_t d, const float* inv, const float* gamma,
                               const float* cos, const float* sin, float* dz, float* dgamma,
                               float* dx) {
  QkNormRopeRowsBackwardImpl(dy, ld_dy, x, ld_x, rows, d, inv, gamma, cos, sin, dz, dgamma, dx);
}
void QkNormRopeRowsBackwardF64(const double* dy, int64_t ld_dy, const double* x, int64_t ld_x,
                               int64_t rows, int64_t d, const double* inv, const double* gamma,
                               const double* cos, const double* sin, double* dz, double* dgamma,
                               double* dx) {
  QkNormRopeRowsBackwardImpl(dy, ld_dy, x, ld_x, rows, d, inv, gamma, cos, sin, dz, dgamma, dx);
}

void AttentionSoftmaxF32(float* x, int64_t n, const float* allowed, float scale, float* max_out,
                         float* sum_out) {
  AttentionSoftmaxImpl(x, n, allowed, scale, max_out, sum_out);
}
void AttentionSoftmaxF64(double* x, int64_t n, const double* allowed, double scale, double* max_out,
                         double* sum_out) {
  AttentionSoftmaxImpl(x, n, allowed, scale, max_out, sum_out);
}
void AttentionSoftmaxAgainF32(float* x, int64_t n, const float* allowed, float scale, float row_max,
                              float row_sum) {
  AttentionSoftmaxAgainImpl(x, n, allowed, scale, row_max, row_sum);
}
void AttentionSoftmaxAgainF64(double* x, int64_t n, const double* allowed, double scale,
                              double row_max, double row_sum) {
  AttentionSoftmaxAgainImpl(x, n, allowed, scale, row_max, row_sum);
}
void AttentionSoftmaxBackwardF32(float* ds, const float* p, int64_t n, const float* allowed,
                                 float scale) {
  AttentionSoftmaxBackwardImpl(ds, p, n, allowed, scale);
}
void AttentionSoftmaxBackwardF64(double* ds, const double* p, int64_t n, const double* allowed,
                                 double scale) {
  AttentionSoftmaxBackwardImpl(ds, p, n, allowed, scale);
}

}  // namespace HWY_NAMESPACE
}  // namespace mmdit::simd
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace mmdit::simd {

HWY_EXPORT(AttentionSoftmaxF32);
HWY_EXPORT(AttentionSoftmaxF64);
HWY_EXPORT(AttentionSoftmaxAgainF32);
HWY_EXPORT(AttentionSoftmaxAgainF64);
HWY_EXPORT(AttentionSoftmaxBackwardF32);
HWY_EXPORT(AttentionSoftmaxBackwardF64);
HWY_EXPORT(QkNormRopeRowsF32);
HWY_EXPORT(QkNormRopeRowsF64);
HWY_EXPORT(QkNormRopeRowsBackwardF32);
HWY_EXPORT(QkNormRopeRowsBackwardF64);

void qk_norm_rope_rows(const float* x, int64_t ld_x, int64_t rows, int64_t d, const float* gamma,
                       const float* cos, const float* sin, double eps, float* y, int64_t ld_y,
                       float* inv) {
  HWY_DYNAMIC_DISPATCH(QkNormRopeRowsF32)(x, ld_x, rows, d, gamma, cos, sin, eps, y, ld_y, inv);
}
void qk_norm_rope_rows(const double* x, int64_t ld_x, int64_t rows, int64_t d, const double* gamma,
                       const double* cos, const double* sin, double eps, double* y, int64_t ld_y,
                       double* inv) {
  HWY_DYNAMIC_DISPATCH(QkNormRopeRowsF64)(x, ld_x, rows, d, gamma, cos, sin, eps, y, ld_y, inv);
}
void qk_norm_rope_rows_backward(const float* dy, int64_t ld_dy, const float* x, int64_t ld_x,
                                int64_t rows, int64_t d, const float* inv, const float* gamma,
                                const float* cos, const float* sin, float* dz, float* dgamma,
                                float* dx) {
  HWY_DYNAMIC_DISPATCH(QkNormRopeRowsBackwardF32)
  (dy, ld_dy, x, ld_x, rows, d, inv, gamma, cos, sin, dz, dgamma, dx);
}
void qk_norm_rope_rows_backward(const double* dy, int64_t ld_dy, const double* x, int64_t ld_x,
                                int64_t rows, int64_t d, const double* inv, const double* gamma,
                                const double* cos, const double* sin, double* dz, double* dgamma,
                                double* dx) {
  HWY_DYNAMIC_DISPATCH(QkNormRopeRowsBackwardF64)
  (dy, ld_dy, x, ld_x, rows, d, inv, gamma, cos, sin, dz, dgamma, dx);
}

void attention_softmax(float* x, int64_t n, const float* allowed, float scale, float* max_out,
                       float* sum_out) {
  HWY_DYNAMIC_DISPATCH(AttentionSoftmaxF32)(x, n, allowed, scale, max_out, sum_out);
}
void attention_softmax(double* x, int64_t n, const double* allowed, double scale, double* max_out,
                       double* sum_out) {
  HWY_DYNAMIC_DISPATCH(AttentionSoftmaxF64)(x, n, allowed, scale, max_out, sum_out);
}
void attention_softmax_again(float* x, int64_t n, const float* allowed, float scale, float row_max,
                             float row_sum) {
  HWY_DYNAMIC_DISPATCH(AttentionSoftmaxAgainF32)(x, n, allowed, scale, row_max, row_sum);
}
void attention_softmax_again(double* x, int64_t n, const double* allowed, double scale,
                             double row_max, double row_sum) {
  HWY_DYNAMIC_DISPATCH(AttentionSoftmaxAgainF64)(x, n, allowed, scale, row_max, row_sum);
}
void attention_softmax_backward(float* ds, const float* p, int64_t n, const float* allowed,
                                float scale) {
  HWY_DYNAMIC_DISPATCH(AttentionSoftmaxBackwardF32)(ds, p, n, allowed, scale);
}
void attention_softmax_backward(double* ds, const double* p, int64_t n, const double* allowed,
                                double scale) {
  HWY_DYNAMIC_DISPATCH(AttentionSoftmaxBackwardF64)(ds, p, n, allowed, scale);
}

}  // namespace mmdit::simd
#endif  // HWY_ONCE
