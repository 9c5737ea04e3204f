// Highway kernels. This file is compiled once per SIMD target through foreach_target.h; the
// HWY_ONCE part at the end holds the dispatching entry points declared in simd.h.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tensor/simd.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep

#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "tensor/simd.h"
#include "tensor/simd_tail-inl.h"

HWY_BEFORE_NAMESPACE();
namespace mmdit::simd {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using raw::BinaryOp;
using raw::UnaryOp;

template <class D>
using V = hn::Vec<D>;

// Keeps NaN inputs NaN in lanes where a clamped evaluation would have hidden them.
template <class D>
HWY_INLINE V<D> KeepNaN(D, V<D> x, V<D> r) {
  // Not Ne(x, x): Highway's Ne is an ordered compare (_CMP_NEQ_OQ), false for NaN.
  return hn::IfThenElse(hn::IsNaN(x), x, r);
}

// exp over the whole real line (Highway's Exp is valid up to +104 / +706 only).
template <class D>
HWY_INLINE V<D> SafeExp(D d, V<D> x) {
  using T = hn::TFromD<D>;
  // The largest inputs whose exp is still finite (ln(FLT_MAX), ln(DBL_MAX) rounded down).
  const T hi = sizeof(T) == 4 ? T(88.72283172607421875) : T(709.782712893384);
  const auto inf = hn::Set(d, std::numeric_limits<T>::infinity());
  V<D> r = hn::Exp(d, hn::Min(x, hn::Set(d, hi)));
  r = hn::IfThenElse(hn::Gt(x, hn::Set(d, hi)), inf, r);
  return KeepNaN(d, x, r);
}

template <class D>
HWY_INLINE V<D> SafeLog(D d, V<D> x) {
  using T = hn::TFromD<D>;
  const auto zero = hn::Zero(d);
  V<D> r = hn::Log(d, x);
  r = hn::IfThenElse(hn::Eq(x, zero), hn::Set(d, -std::numeric_limits<T>::infinity()), r);
  r = hn::IfThenElse(hn::Lt(x, zero), hn::Set(d, std::numeric_limits<T>::quiet_NaN()), r);
  r = hn::IfThenElse(hn::Eq(x, hn::Set(d, std::numeric_limits<T>::infinity())), x, r);
  return KeepNaN(d, x, r);
}

template <class D>
HWY_INLINE V<D> Sigmoid(D d, V<D> x) {
  const auto one = hn::Set(d, hn::TFromD<D>(1));
  return hn::Div(one, hn::Add(one, SafeExp(d, hn::Neg(x))));
}

template <UnaryOp OP, class D>
HWY_INLINE V<D> Unary1(D d, V<D> x) {
  using T = hn::TFromD<D>;
  if constexpr (OP == UnaryOp::neg) return hn::Neg(x);
  if constexpr (OP == UnaryOp::exp) return SafeExp(d, x);
  if constexpr (OP == UnaryOp::log) return SafeLog(d, x);
  if constexpr (OP == UnaryOp::sqrt) return hn::Sqrt(x);
  if constexpr (OP == UnaryOp::rsqrt) return hn::Div(hn::Set(d, T(1)), hn::Sqrt(x));
  if constexpr (OP == UnaryOp::square) return hn::Mul(x, x);
  if constexpr (OP == UnaryOp::abs) return hn::Abs(x);
  if constexpr (OP == UnaryOp::tanh) return hn::Tanh(d, x);
  if constexpr (OP == UnaryOp::sigmoid) return Sigmoid(d, x);
  if constexpr (OP == UnaryOp::silu) return hn::Mul(x, Sigmoid(d, x));
  if constexpr (OP == UnaryOp::sin) return hn::Sin(d, x);
  if constexpr (OP == UnaryOp::cos) return hn::Cos(d, x);
}

template <BinaryOp OP, class D>
HWY_INLINE V<D> Binary1(D, V<D> a, V<D> b) {
  if constexpr (OP == BinaryOp::add) return hn::Add(a, b);
  if constexpr (OP == BinaryOp::sub) return hn::Sub(a, b);
  if constexpr (OP == BinaryOp::mul) return hn::Mul(a, b);
  if constexpr (OP == BinaryOp::div) return hn::Div(a, b);
  // x86's max and min return the second operand when either is NaN, which would hide a NaN in a
  // (relu as maximum(x, 0)); NaN propagates from either side, as in NumPy and JAX.
  if constexpr (OP == BinaryOp::maximum || OP == BinaryOp::minimum) {
    const auto either_nan = hn::Or(hn::IsNaN(a), hn::IsNaN(b));
    const auto result = OP == BinaryOp::maximum ? hn::Max(a, b) : hn::Min(a, b);
    return hn::IfThenElse(either_nan, hn::Add(a, b), result);
  }
}

// Applies `body(vector) -> vector` to n contiguous elements; the tail goes through a zero-padded
// buffer so every element gets the same vector arithmetic.
template <class T, class Body>
HWY_INLINE void MapContiguous(const T* x, T* out, int64_t n, Body body) {
  const hn::ScalableTag<T> d;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  int64_t i = 0;
  for (; i + lanes <= n; i += lanes) hn::StoreU(body(d, hn::LoadU(d, x + i)), d, out + i);
  if (i < n) {
    HWY_ALIGN T buf[HWY_MAX_BYTES / sizeof(T)] = {};
    std::copy(x + i, x + n, buf);
    hn::Store(body(d, hn::Load(d, buf)), d, buf);
    std::copy(buf, buf + (n - i), out + i);
  }
}

// Highway's Sin and Cos reduce their argument correctly for |x| up to about 39000 only; past that
// they return values outside [-1, 1], even infinities. Such elements (and NaN, inf) go through
// the C library's, which reduces exactly. Each block's inputs are copied first, since out may be x.
template <UnaryOp OP, class T>
void TrigLoop(const T* x, T* out, int64_t n) {
  constexpr int64_t kBlock = 256;
  constexpr T kVectorLimit = 32768;
  T in[kBlock];
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    const int64_t count = std::min(kBlock, n - begin);
    std::copy(x + begin, x + begin + count, in);
    MapContiguous(in, out + begin, count, [](auto d, auto v) { return Unary1<OP>(d, v); });
    for (int64_t i = 0; i < count; ++i)
      if (!(std::abs(in[i]) <= kVectorLimit))
        out[begin + i] = OP == UnaryOp::sin ? std::sin(in[i]) : std::cos(in[i]);
  }
}

template <UnaryOp OP, class T>
void UnaryLoop(const T* x, T* out, int64_t n) {
  if constexpr (OP == UnaryOp::sin || OP == UnaryOp::cos)
    TrigLoop<OP>(x, out, n);
  else
    MapContiguous(x, out, n, [](auto d, auto v) { return Unary1<OP>(d, v); });
}

template <class T>
void UnaryImpl(UnaryOp op, const T* x, T* out, int64_t n) {
  switch (op) {
#define MMDIT_UNARY_CASE(name) \
  case UnaryOp::name:          \
    return UnaryLoop<UnaryOp::name>(x, out, n);
    MMDIT_UNARY_CASE(neg)
    MMDIT_UNARY_CASE(exp)
    MMDIT_UNARY_CASE(log)
    MMDIT_UNARY_CASE(sqrt)
    MMDIT_UNARY_CASE(rsqrt)
    MMDIT_UNARY_CASE(square)
    MMDIT_UNARY_CASE(abs)
    MMDIT_UNARY_CASE(tanh)
    MMDIT_UNARY_CASE(sigmoid)
    MMDIT_UNARY_CASE(silu)
    MMDIT_UNARY_CASE(sin)
    MMDIT_UNARY_CASE(cos)
#undef MMDIT_UNARY_CASE
  }
}

template <BinaryOp OP, class T>
void BinaryLoop(const T* a, int64_t a_step, const T* b, int64_t b_step, T* out, int64_t n) {
  const hn::ScalableTag<T> d;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  auto load = [&](const T* p, int64_t step, int64_t i) {
    return step ? hn::LoadU(d, p + i) : hn::Set(d, p[0]);
  };
  int64_t i = 0;
  for (; i + lanes <= n; i += lanes)
    hn::StoreU(Binary1<OP>(d, load(a, a_step, i), load(b, b_step, i)), d, out + i);
  if (i < n) {
    HWY_ALIGN T bufa[HWY_MAX_BYTES / sizeof(T)] = {};
    HWY_ALIGN T bufb[HWY_MAX_BYTES / sizeof(T)] = {};
    for (int64_t j = i; j < n; ++j) {
      bufa[j - i] = a[j * a_step];
      bufb[j - i] = b[j * b_step];
    }
    hn::Store(Binary1<OP>(d, hn::Load(d, bufa), hn::Load(d, bufb)), d, bufa);
    std::copy(bufa, bufa + (n - i), out + i);
  }
}

template <class T>
void BinaryImpl(BinaryOp op, const T* a, int64_t as, const T* b, int64_t bs, T* out, int64_t n) {
  switch (op) {
    case BinaryOp::add:
      return BinaryLoop<BinaryOp::add>(a, as, b, bs, out, n);
    case BinaryOp::sub:
      return BinaryLoop<BinaryOp::sub>(a, as, b, bs, out, n);
    case BinaryOp::mul:
      return BinaryLoop<BinaryOp::mul>(a, as, b, bs, out, n);
    case BinaryOp::div:
      return BinaryLoop<BinaryOp::div>(a, as, b, bs, out, n);
    case BinaryOp::maximum:
      return BinaryLoop<BinaryOp::maximum>(a, as, b, bs, out, n);
    case BinaryOp::minimum:
      return BinaryLoop<BinaryOp::minimum>(a, as, b, bs, out, n);
  }
}

template <class T>
void AxpyImpl(T scale, const T* x, T* out, int64_t n) {
  const hn::ScalableTag<T> d;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  const auto s = hn::Set(d, scale);
  int64_t i = 0;
  for (; i + lanes <= n; i += lanes)
    hn::StoreU(hn::MulAdd(hn::LoadU(d, x + i), s, hn::LoadU(d, out + i)), d, out + i);
  for (; i < n; ++i) out[i] += scale * x[i];
}

// Sum of f(x[i]) with four independent accumulators (latency hiding, and a pairwise-like
// accuracy gain over one running sum).
template <class T, class F>
HWY_INLINE T SumMapped(const T* x, int64_t n, F f) {
  const hn::ScalableTag<T> d;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  auto s0 = hn::Zero(d), s1 = hn::Zero(d), s2 = hn::Zero(d), s3 = hn::Zero(d);
  int64_t i = 0;
  for (; i + 4 * lanes <= n; i += 4 * lanes) {
    s0 = hn::Add(s0, f(d, hn::LoadU(d, x + i)));
    s1 = hn::Add(s1, f(d, hn::LoadU(d, x + i + lanes)));
    s2 = hn::Add(s2, f(d, hn::LoadU(d, x + i + 2 * lanes)));
    s3 = hn::Add(s3, f(d, hn::LoadU(d, x + i + 3 * lanes)));
  }
  for (; i + lanes <= n; i += lanes) s0 = hn::Add(s0, f(d, hn::LoadU(d, x + i)));
  if (i < n) {
    HWY_ALIGN T buf[HWY_MAX_BYTES / sizeof(T)] = {};
    std::copy(x + i, x + n, buf);
    const auto valid = hn::FirstN(d, static_cast<size_t>(n - i));
    s1 = hn::Add(s1, hn::IfThenElseZero(valid, f(d, hn::Load(d, buf))));
  }
  return hn::GetLane(hn::SumOfLanes(d, hn::Add(hn::Add(s0, s1), hn::Add(s2, s3))));
}

template <class T>
T SumImpl(const T* x, int64_t n) {
  return SumMapped(x, n, [](auto, auto v) { return v; });
}

template <class T>
T SumSquaredDeviationImpl(const T* x, T mean, int64_t n) {
  return SumMapped(x, n, [mean](auto d, auto v) {
    auto c = hn::Sub(v, hn::Set(d, mean));
    return hn::Mul(c, c);
  });
}

template <class T>
T DotImpl(const T* a, const T* b, int64_t n) {
  const hn::ScalableTag<T> d;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  auto acc0 = hn::Zero(d), acc1 = hn::Zero(d);
  int64_t i = 0;
  for (; i + 2 * lanes <= n; i += 2 * lanes) {
    acc0 = hn::MulAdd(hn::LoadU(d, a + i), hn::LoadU(d, b + i), acc0);
    acc1 = hn::MulAdd(hn::LoadU(d, a + i + lanes), hn::LoadU(d, b + i + lanes), acc1);
  }
  for (; i + lanes <= n; i += lanes)
    acc0 = hn::MulAdd(hn::LoadU(d, a + i), hn::LoadU(d, b + i), acc0);
  T sum = hn::GetLane(hn::SumOfLanes(d, hn::Add(acc0, acc1)));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

template <class T>
T MaxImpl(const T* x, int64_t n) {
  const hn::ScalableTag<T> d;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  auto m = hn::Set(d, -std::numeric_limits<T>::infinity());
  // x86's max returns its second operand when either is NaN, so a NaN would be dropped by the
  // next load in its lane: it is tracked apart, as NumPy's max propagates it.
  auto nan = hn::FirstN(d, 0);
  int64_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    const auto v = hn::LoadU(d, x + i);
    nan = hn::Or(nan, hn::IsNaN(v));
    m = hn::Max(m, v);
  }
  T result = hn::GetLane(hn::MaxOfLanes(d, m));
  if (!hn::AllFalse(d, nan)) return std::numeric_limits<T>::quiet_NaN();
  for (; i < n; ++i) {
    if (std::isnan(x[i])) return x[i];
    result = std::max(result, x[i]);
  }
  return result;
}

// A row of at most 4 vectors (attention over the policy's 18 tokens) in one pass: loaded once,
// the max, exps, sum and scaling in registers. The four passes over memory of the general case,
// each with its own tail, took 3% of policy-act.
template <class T>
void SoftmaxShort(const T* x, T* out, int64_t n) {
  const hn::ScalableTag<T> d;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  const int64_t count = (n + lanes - 1) / lanes;
  const auto lowest = hn::Set(d, -std::numeric_limits<T>::infinity());
  V<decltype(d)> v[4];
  auto m = lowest;
  for (int64_t k = 0; k < count; ++k) {
    const int64_t rest = std::min(lanes, n - k * lanes);
    v[k] = rest == lanes ? hn::LoadU(d, x + k * lanes)
                         : LoadFirst(d, x + k * lanes, rest, -std::numeric_limits<T>::infinity());
    m = hn::Max(m, v[k]);
  }
  const T row_max = hn::GetLane(hn::MaxOfLanes(d, m));
  const auto mv = hn::Set(d, row_max);
  auto sum = hn::Zero(d);
  for (int64_t k = 0; k < count; ++k) {
    const int64_t rest = std::min(lanes, n - k * lanes);
    v[k] = SafeExp(d, hn::Sub(v[k], mv));
    // Padding lanes hold -inf - max: exp gives 0, unless max is itself -inf or NaN.
    if (rest < lanes) v[k] = hn::IfThenElseZero(hn::FirstN(d, static_cast<size_t>(rest)), v[k]);
    sum = hn::Add(sum, v[k]);
  }
  const auto inv = hn::Set(d, T(1) / hn::GetLane(hn::SumOfLanes(d, sum)));
  for (int64_t k = 0; k < count; ++k) {
    const int64_t rest = std::min(lanes, n - k * lanes);
    const auto r = hn::Mul(v[k], inv);
    if (rest == lanes)
      hn::StoreU(r, d, out + k * lanes);
    else
      hn::BlendedStore(r, hn::FirstN(d, static_cast<size_t>(rest)), d, out + k * lanes);
  }
}

template <class T>
void SoftmaxImpl(const T* x, T* out, int64_t n) {
  if (n > 0 && n <= 4 * static_cast<int64_t>(hn::Lanes(hn::ScalableTag<T>())))
    return SoftmaxShort(x, out, n);
  const T m = MaxImpl(x, n);
  MapContiguous(x, out, n, [m](auto d, auto v) { return SafeExp(d, hn::Sub(v, hn::Set(d, m))); });
  const T inv = T(1) / SumImpl(out, n);
  MapContiguous(out, out, n, [inv](auto d, auto v) { return hn::Mul(v, hn::Set(d, inv)); });
}

template <class T>
void LogSoftmaxImpl(const T* x, T* out, int64_t n) {
  const T m = MaxImpl(x, n);
  const T s =
      SumMapped(x, n, [m](auto d, auto v) { return SafeExp(d, hn::Sub(v, hn::Set(d, m))); });
  // (x - m) - log(s), not x - (m + log(s)): for |m| >> 1 the sum m + log(s) rounds to m.
  const T log_s = std::log(s);
  MapContiguous(x, out, n, [m, log_s](auto d, auto v) {
    return hn::Sub(hn::Sub(v, hn::Set(d, m)), hn::Set(d, log_s));
  });
}

void BinaryF32(BinaryOp op, const float* a, int64_t as, const float* b, int64_t bs, float* out,
               int64_t n) {
  BinaryImpl(op, a, as, b, bs, out, n);
}
void BinaryF64(BinaryOp op, const double* a, int64_t as, const double* b, int64_t bs, double* out,
               int64_t n) {
  BinaryImpl(op, a, as, b, bs, out, n);
}
void UnaryF32(UnaryOp op, const float* x, float* out, int64_t n) {
  UnaryImpl(op, x, out, n);
}
void UnaryF64(UnaryOp op, const double* x, double* out, int64_t n) {
  UnaryImpl(op, x, out, n);
}
float SumF32(const float* x, int64_t n) {
  return SumImpl(x, n);
}
double SumF64(const double* x, int64_t n) {
  return SumImpl(x, n);
}
float DotF32(const float* a, const float* b, int64_t n) {
  return DotImpl(a, b, n);
}
double DotF64(const double* a, const double* b, int64_t n) {
  return DotImpl(a, b, n);
}
float MaxF32(const float* x, int64_t n) {
  return MaxImpl(x, n);
}
double MaxF64(const double* x, int64_t n) {
  return MaxImpl(x, n);
}
float SsdF32(const float* x, float m, int64_t n) {
  return SumSquaredDeviationImpl(x, m, n);
}
double SsdF64(const double* x, double m, int64_t n) {
  return SumSquaredDeviationImpl(x, m, n);
}
void SoftmaxF32(const float* x, float* out, int64_t n) {
  SoftmaxImpl(x, out, n);
}
void SoftmaxF64(const double* x, double* out, int64_t n) {
  SoftmaxImpl(x, out, n);
}
void LogSoftmaxF32(const float* x, float* out, int64_t n) {
  LogSoftmaxImpl(x, out, n);
}
void LogSoftmaxF64(const double* x, double* out, int64_t n) {
  LogSoftmaxImpl(x, out, n);
}
void AxpyF32(float s, const float* x, float* out, int64_t n) {
  AxpyImpl(s, x, out, n);
}
void AxpyF64(double s, const double* x, double* out, int64_t n) {
  AxpyImpl(s, x, out, n);
}

}  // namespace HWY_NAMESPACE
}  // namespace mmdit::simd
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace mmdit::simd {

HWY_EXPORT(BinaryF32);
HWY_EXPORT(BinaryF64);
HWY_EXPORT(UnaryF32);
HWY_EXPORT(UnaryF64);
HWY_EXPORT(SumF32);
HWY_EXPORT(SumF64);
HWY_EXPORT(DotF32);
HWY_EXPORT(DotF64);
HWY_EXPORT(MaxF32);
HWY_EXPORT(MaxF64);
HWY_EXPORT(SsdF32);
HWY_EXPORT(SsdF64);
HWY_EXPORT(SoftmaxF32);
HWY_EXPORT(SoftmaxF64);
HWY_EXPORT(LogSoftmaxF32);
HWY_EXPORT(LogSoftmaxF64);
HWY_EXPORT(AxpyF32);
HWY_EXPORT(AxpyF64);

void binary(raw::BinaryOp op, const float* a, int64_t as, const float* b, int64_t bs, float* out,
            int64_t n) {
  HWY_DYNAMIC_DISPATCH(BinaryF32)(op, a, as, b, bs, out, n);
}
void binary(raw::BinaryOp op, const double* a, int64_t as, const double* b, int64_t bs, double* out,
            int64_t n) {
  HWY_DYNAMIC_DISPATCH(BinaryF64)(op, a, as, b, bs, out, n);
}
void unary(raw::UnaryOp op, const float* x, float* out, int64_t n) {
  HWY_DYNAMIC_DISPATCH(UnaryF32)(op, x, out, n);
}
void unary(raw::UnaryOp op, const double* x, double* out, int64_t n) {
  HWY_DYNAMIC_DISPATCH(UnaryF64)(op, x, out, n);
}
float sum(const float* x, int64_t n) {
  return HWY_DYNAMIC_DISPATCH(SumF32)(x, n);
}
double sum(const double* x, int64_t n) {
  return HWY_DYNAMIC_DISPATCH(SumF64)(x, n);
}
float dot(const float* a, const float* b, int64_t n) {
  return HWY_DYNAMIC_DISPATCH(DotF32)(a, b, n);
}
double dot(const double* a, const double* b, int64_t n) {
  return HWY_DYNAMIC_DISPATCH(DotF64)(a, b, n);
}
float max(const float* x, int64_t n) {
  return HWY_DYNAMIC_DISPATCH(MaxF32)(x, n);
}
double max(const double* x, int64_t n) {
  return HWY_DYNAMIC_DISPATCH(MaxF64)(x, n);
}
float sum_squared_deviation(const float* x, float m, int64_t n) {
  return HWY_DYNAMIC_DISPATCH(SsdF32)(x, m, n);
}
double sum_squared_deviation(const double* x, double m, int64_t n) {
  return HWY_DYNAMIC_DISPATCH(SsdF64)(x, m, n);
}
void softmax(const float* x, float* out, int64_t n) {
  HWY_DYNAMIC_DISPATCH(SoftmaxF32)(x, out, n);
}
void softmax(const double* x, double* out, int64_t n) {
  HWY_DYNAMIC_DISPATCH(SoftmaxF64)(x, out, n);
}
void log_softmax(const float* x, float* out, int64_t n) {
  HWY_DYNAMIC_DISPATCH(LogSoftmaxF32)(x, out, n);
}
void log_softmax(const double* x, double* out, int64_t n) {
  HWY_DYNAMIC_DISPATCH(LogSoftmaxF64)(x, out, n);
}
void axpy(float s, const float* x, float* out, int64_t n) {
  HWY_DYNAMIC_DISPATCH(AxpyF32)(s, x, out, n);
}
void axpy(double s, const double* x, double* out, int64_t n) {
  HWY_DYNAMIC_DISPATCH(AxpyF64)(s, x, out, n);
}

}  // namespace mmdit::simd
#endif  // HWY_ONCE
