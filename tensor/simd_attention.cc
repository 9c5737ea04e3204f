// Attention's row kernels: the masked, scaled softmax of a row of logits and its backward, one
// pass each over a row that sits in L1. As separate steps (a scalar mask-and-scale loop, then a
// softmax) they took 55% of the in-context model's attention forward (microbench).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tensor/simd_attention.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep

#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

#include <cfloat>
#include <limits>

#include "tensor/simd.h"
#include "tensor/simd_tail-inl.h"

HWY_BEFORE_NAMESPACE();
namespace mmdit::simd {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Calls body(d, i, count) for vectors of the row [0, n): count == Lanes(d) but for the last.
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
