#include "train/optim.h"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "tensor/ops.h"
#include "tensor/parallel.h"
#include "tensor/simd.h"

namespace mmdit {
namespace {

// Names the first parameter without a tensor, then the first tensor that is no parameter, then
// the first shape that differs.
void check_same_layout(const NamedTensors& params, const NamedTensors& other, const char* who) {
  for (const auto& [name, p] : params)
    MMDIT_CHECK(other.contains(name), who, ": no tensor for parameter '", name, "'");
  for (const auto& [name, o] : other)
    MMDIT_CHECK(params.contains(name), who, ": '", name, "' is not a parameter");
  for (const auto& [name, p] : params) {
    const Tensor& o = other.at(name);
    MMDIT_CHECK(o.defined(), who, ": the tensor for '", name, "' is undefined");
    MMDIT_CHECK(is_floating(o.dtype()), who, ": '", name, "' is ", dtype_name(o.dtype()),
                "; expected a float tensor");
    MMDIT_CHECK(o.shape() == p.shape(), who, ": '", name, "' has shape ", shape_str(o.shape()),
                ", the parameter has ", shape_str(p.shape()));
  }
}

// A value that would turn every parameter into NaN or move it the wrong way on the next step.
void check_config(const AdamWConfig& c) {
  MMDIT_CHECK(std::isfinite(c.lr) && c.lr >= 0, "AdamW: lr must be finite and >= 0, got ", c.lr);
  MMDIT_CHECK(c.b1 >= 0 && c.b1 < 1 && c.b2 >= 0 && c.b2 < 1,
              "AdamW: b1 and b2 must be in [0, 1) (bias correction divides by 1 - b^t); got b1 ",
              c.b1, ", b2 ", c.b2);
  MMDIT_CHECK(std::isfinite(c.eps) && c.eps >= 0, "AdamW: eps must be finite and >= 0, got ",
              c.eps);
  MMDIT_CHECK(std::isfinite(c.weight_decay) && c.weight_decay >= 0,
              "AdamW: weight_decay must be finite and >= 0, got ", c.weight_decay);
}

NamedTensors zeros_like_all(const NamedTensors& params) {
  NamedTensors out;
  for (const auto& [name, p] : params) out.insert(name, zeros_like(p));
  return out;
}

// Elementwise passes over a parameter split into chunks, one parallel task each; the loops
// inside take restrict pointers so that the compiler vectorises them.
constexpr int64_t kChunk = 16384;

template <class Fn>
void for_each_chunk(int64_t n, Fn fn) {
  parallel_for((n + kChunk - 1) / kChunk, 8 * kChunk, [&](int64_t c) {
    const int64_t begin = c * kChunk;
    fn(begin, std::min(n, begin + kChunk));
  });
}

// One chunk. Restrict pointers let the loop vectorise, and the clones compile it for AVX-512
// and AVX2 too, picked at load time: the divisions and square root are its cost.
template <class T>
inline void adamw_chunk_impl(T* __restrict p, const T* __restrict g, T* __restrict m,
                             T* __restrict v, int64_t n, T b1, T c1, T b2, T c2, T eps, T wd,
                             T rate, T bc1, T bc2, T gs) {
  for (int64_t i = 0; i < n; ++i) {
    const T gi = g[i] * gs;
    const T mi = c1 * gi + b1 * m[i];
    const T vi = c2 * (gi * gi) + b2 * v[i];
    m[i] = mi;
    v[i] = vi;
    const T u = (mi / bc1) / (std::sqrt(vi / bc2) + eps) + wd * p[i];
    p[i] = p[i] + (-rate * u);
  }
}
MMDIT_SIMD_CLONES void adamw_chunk(float* p, const float* g, float* m, float* v, int64_t n,
                                   float b1, float c1, float b2, float c2, float eps, float wd,
                                   float rate, float bc1, float bc2, float gs) {
  adamw_chunk_impl(p, g, m, v, n, b1, c1, b2, c2, eps, wd, rate, bc1, bc2, gs);
}
MMDIT_SIMD_CLONES void adamw_chunk(double* p, const double* g, double* m, double* v, int64_t n,
                                   double b1, double c1, double b2, double c2, double eps,
                                   double wd, double rate, double bc1, double bc2, double gs) {
  adamw_chunk_impl(p, g, m, v, n, b1, c1, b2, c2, eps, wd, rate, bc1, bc2, gs);
}

template <class T>
inline void ema_chunk_impl(T* __restrict ema, const T* __restrict p, int64_t n, T d, T c) {
  for (int64_t i = 0; i < n; ++i) ema[i] = d * ema[i] + c * p[i];
}
MMDIT_SIMD_CLONES void ema_chunk(float* ema, const float* p, int64_t n, float d, float c) {
  ema_chunk_impl(ema, p, n, d, c);
}
MMDIT_SIMD_CLONES void ema_chunk(double* ema, const double* p, int64_t n, double d, double c) {
  ema_chunk_impl(ema, p, n, d, c);
}

template <class T>
inline double sum_of_squares_chunk_impl(const T* __restrict x, int64_t n) {
  // Four vectors of eight doubles: one chain of dependent adds would wait on its latency.
  constexpr int kLanes = 32;
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<double>(x[i + j]) * x[i + j];
  for (; i < n; ++i) acc[0] += static_cast<double>(x[i]) * x[i];
  double s = 0;
  for (double a : acc) s += a;
  return s;
}
MMDIT_SIMD_CLONES double sum_of_squares_chunk(const float* x, int64_t n) {
  return sum_of_squares_chunk_impl(x, n);
}
MMDIT_SIMD_CLONES double sum_of_squares_chunk(const double* x, int64_t n) {
  return sum_of_squares_chunk_impl(x, n);
}

// g is scaled by grad_scale first (global-norm clipping folded into the same pass; a scale of 1
// is exact).
// With `ema`, each chunk's new parameters also go into the EMA while they are in cache.
template <class T>
void adamw_kernel(T* p, const T* g, T* m, T* v, int64_t n, const AdamWConfig& c, double lr,
                  int64_t step, double grad_scale, T* ema, double ema_decay) {
  // 1 - b is formed in double and then rounded, as the bias corrections are: 1 - float(0.999)
  // is 1.3e-5 (relative) away from float(1 - 0.999), and the first step would not be g / |g|.
  const T b1 = static_cast<T>(c.b1), b2 = static_cast<T>(c.b2), eps = static_cast<T>(c.eps);
  const T c1 = static_cast<T>(1 - c.b1), c2 = static_cast<T>(1 - c.b2);
  const T wd = static_cast<T>(c.weight_decay), rate = static_cast<T>(lr);
  const T bc1 = static_cast<T>(1 - std::pow(c.b1, static_cast<double>(step)));
  const T bc2 = static_cast<T>(1 - std::pow(c.b2, static_cast<double>(step)));
  const T gs = static_cast<T>(grad_scale);
  for_each_chunk(n, [&](int64_t begin, int64_t end) {
    adamw_chunk(p + begin, g + begin, m + begin, v + begin, end - begin, b1, c1, b2, c2, eps, wd,
                rate, bc1, bc2, gs);
    if (ema)
      ema_chunk(ema + begin, p + begin, end - begin, static_cast<T>(ema_decay),
                static_cast<T>(1 - ema_decay));
  });
}

template <class T>
double sum_of_squares(const T* x, int64_t n) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(chunks));
  for_each_chunk(n, [&](int64_t begin, int64_t end) {
    partial[static_cast<size_t>(begin / kChunk)] = sum_of_squares_chunk(x + begin, end - begin);
  });
  double s = 0;
  for (double p : partial) s += p;
  return s;
}

// Of a contiguous float tensor.
double sum_of_squares(const Tensor& x) {
  return visit_float_dtype(x.dtype(), [&](auto type) {
    using T = decltype(type);
    return sum_of_squares(x.data<T>(), x.numel());
  });
}

template <class T>
void scale_chunk(T* __restrict x, int64_t n, T s) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] * s;
}

template <class T>
void scale_in_place(T* x, int64_t n, double scale) {
  for_each_chunk(n, [&](int64_t begin, int64_t end) {
    scale_chunk(x + begin, end - begin, static_cast<T>(scale));
  });
}

template <class T>
void ema_kernel(T* ema, const T* p, int64_t n, double decay) {
  for_each_chunk(n, [&](int64_t begin, int64_t end) {
    ema_chunk(ema + begin, p + begin, end - begin, static_cast<T>(decay),
              static_cast<T>(1 - decay));
  });
}

}  // namespace

AdamW::AdamW(const NamedTensors& params, AdamWConfig config)
    : config_(config), m_(zeros_like_all(params)), v_(zeros_like_all(params)) {
  check_config(config);
  for (const auto& [name, p] : params)
    MMDIT_CHECK(p.is_contiguous() && is_floating(p.dtype()), "AdamW: parameter '", name,
                "' must be a contiguous float tensor");
}

double AdamW::update_impl(const NamedTensors& params, const NamedTensors& grads, double lr,
                          double grad_scale, double max_norm, EMA* ema) {
  // Everything is checked, and the gradients' norm read, before anything changes: a throw leaves
  // the parameters, moments, step and EMA as they were.
  MMDIT_CHECK(std::isfinite(lr) && lr >= 0, "AdamW::update: lr must be finite and >= 0, got ", lr);
  MMDIT_CHECK(std::isfinite(grad_scale) && grad_scale >= 0,
              "AdamW::update: grad_scale must be finite and >= 0, got ", grad_scale);
  MMDIT_CHECK(std::isfinite(max_norm) && max_norm >= 0,
              "AdamW::update_clipped: max_norm must be finite and >= 0 (0: no clipping), got ",
              max_norm);
  check_same_layout(params, grads, "AdamW::update");
  check_same_layout(params, m_, "AdamW::update (optimiser state)");
  if (ema) check_same_layout(params, ema->params(), "AdamW::update (EMA)");
  struct Item {
    Tensor p, g, e;
  };
  std::vector<Item> items;
  items.reserve(params.size());
  double squares = 0;
  for (const auto& [name, p] : params) {
    MMDIT_CHECK(p.is_contiguous() && is_floating(p.dtype()), "AdamW::update: parameter '", name,
                "' must be a contiguous float tensor");
    // The EMA's tensor is updated in place, so it must already have the parameter's dtype.
    Tensor e = ema ? ema->params().at(name) : Tensor();
    MMDIT_CHECK(!e.defined() || (e.dtype() == p.dtype() && e.is_contiguous()),
                "AdamW::update: ", "the EMA of '", name, "' is ",
                e.defined() ? dtype_name(e.dtype()) : "", ", the parameter ",
                dtype_name(p.dtype()));
    Tensor g = raw::contiguous(raw::to_dtype(grads.at(name), p.dtype()));
    squares += sum_of_squares(g);
    items.push_back({p, std::move(g), std::move(e)});
  }
  if (!std::isfinite(squares)) {
    for (const auto& [name, g] : grads)
      if (const std::optional<NonFinite> bad = first_non_finite(g))
        fail("AdamW::update: the gradient of '", name, "' holds ", bad->value, " at ",
             shape_str(bad->index), "; nothing was updated");
    fail("AdamW::update: the gradients' global norm overflows; nothing was updated");
  }
  const double norm = std::sqrt(squares);
  if (max_norm > 0) grad_scale *= clip_scale(norm, max_norm);
  // The moments follow their parameter's dtype. Converted before the step counts, since the
  // conversion allocates: running out of memory here must leave the step undone.
  size_t i = 0;
  for (const auto& [name, unused] : params) {
    Tensor &m = m_.at(name), &v = v_.at(name);
    const DType dtype = items[i++].p.dtype();
    if (m.dtype() != dtype) {
      Tensor m_converted = raw::to_dtype(m, dtype), v_converted = raw::to_dtype(v, dtype);
      m = std::move(m_converted), v = std::move(v_converted);
    }
  }
  ++step_;
  const double ema_decay = ema ? ema->decay() : 0.0;
  i = 0;
  for (const auto& [name, unused] : params) {
    const Item& it = items[i++];
    Tensor &m = m_.at(name), &v = v_.at(name);
    for (const Tensor& changed : {it.p, m, v, it.e})
      if (changed.defined()) changed.mark_changed();
    visit_float_dtype(it.p.dtype(), [&](auto type) {
      using T = decltype(type);
      adamw_kernel(it.p.data<T>(), it.g.data<T>(), m.data<T>(), v.data<T>(), it.p.numel(), config_,
                   lr, step_, grad_scale, it.e.defined() ? it.e.data<T>() : nullptr, ema_decay);
    });
  }
  return norm;
}

void AdamW::set_state(int64_t step, const NamedTensors& m, const NamedTensors& v) {
  check_same_layout(m_, m, "AdamW::set_state (first moments)");
  check_same_layout(v_, v, "AdamW::set_state (second moments)");
  MMDIT_CHECK(step >= 0, "AdamW::set_state: negative step ", step);
  // The next update would turn every parameter into NaN: refused before anything changes.
  for (const auto& [which, moments] :
       {std::pair{"first moment", &m}, std::pair{"second moment", &v}})
    for (const auto& [name, t] : *moments) {
      if (const std::optional<NonFinite> bad = first_non_finite(t))
        fail("AdamW::set_state: ", which, " '", name, "' holds ", bad->value, " at ",
             shape_str(bad->index));
      if (moments == &v && t.numel() > 0) {
        const Tensor negated = raw::mul_scalar(raw::to_dtype(t, DType::f64), -1.0);
        MMDIT_CHECK(raw::max(negated).item() <= 0, "AdamW::set_state: second moment '", name,
                    "' holds a negative value");
      }
    }
  // The moments keep their dtype (their parameter's): update() converts only a pair whose first
  // moment differs, and a float64 value past float32's range would become infinity.
  for (const auto& [which, given, held] :
       {std::tuple{"first moment", &m, &m_}, std::tuple{"second moment", &v, &v_}})
    for (const auto& [name, t] : *given)
      if (const std::optional<NonFinite> big = first_overflow(t, held->at(name).dtype()))
        fail("AdamW::set_state: ", which, " '", name, "' holds ", big->value, " at ",
             shape_str(big->index), ", past ", dtype_name(held->at(name).dtype()), "'s range");
  step_ = step;
  for (const auto& [name, t] : m) m_.at(name) = raw::clone(raw::to_dtype(t, m_.at(name).dtype()));
  for (const auto& [name, t] : v) v_.at(name) = raw::clone(raw::to_dtype(t, v_.at(name).dtype()));
}

double global_norm(const NamedTensors& grads) {
  double sq = 0;
  for (const auto& [name, g] : grads) {
    sq +=
        sum_of_squares(raw::contiguous(g.dtype() == DType::f32 ? g : raw::to_dtype(g, DType::f64)));
  }
  return std::sqrt(sq);
}

double clip_scale(double norm, double max_norm) {
  return norm > max_norm ? max_norm / norm : 1.0;
}

double clip_by_global_norm(const NamedTensors& grads, double max_norm) {
  // 0 would zero every gradient and a negative norm reverse them (update_clipped takes 0 for
  // no clipping).
  MMDIT_CHECK(std::isfinite(max_norm) && max_norm > 0,
              "clip_by_global_norm: max_norm must be positive, got ", max_norm);
  const double norm = global_norm(grads);
  const double scale = clip_scale(norm, max_norm);
  if (scale == 1.0) return norm;
  for (const auto& entry : grads) {
    const Tensor& g = entry.second;  // not a structured binding: Clang 14 cannot capture one
    g.mark_changed();
    if (g.is_contiguous())
      visit_float_dtype(g.dtype(), [&](auto type) {
        using T = decltype(type);
        scale_in_place(g.data<T>(), g.numel(), scale);
      });
    else
      raw::copy_into(g, raw::mul_scalar(g, scale));
  }
  return norm;
}

double warmup_cosine_lr(int64_t step, double peak, int64_t warmup_steps, int64_t total_steps,
                        double end_lr) {
  if (warmup_steps > 0 && step < warmup_steps) return peak * step / warmup_steps;
  if (total_steps <= warmup_steps) return peak;
  const double progress =
      std::min(1.0, static_cast<double>(step - warmup_steps) / (total_steps - warmup_steps));
  return end_lr + (peak - end_lr) * 0.5 * (1 + std::cos(M_PI * progress));
}

EMA::EMA(const NamedTensors& params, double decay) : decay_(decay) {
  MMDIT_CHECK(decay >= 0 && decay <= 1, "EMA: decay must be in [0, 1], got ", decay);
  for (const auto& [name, p] : params) ema_.insert(name, raw::clone(p));
}

void EMA::update(const NamedTensors& params) {
  check_same_layout(ema_, params, "EMA::update");
  for (const auto& [name, p] : params) {
    Tensor& e = ema_.at(name);
    const Tensor pc = raw::contiguous(raw::to_dtype(p, e.dtype()));
    e.mark_changed();
    visit_float_dtype(e.dtype(), [&](auto type) {
      using T = decltype(type);
      ema_kernel(e.data<T>(), pc.data<T>(), e.numel(), decay_);
    });
  }
}

void EMA::set(const NamedTensors& values) {
  check_same_layout(ema_, values, "EMA::set");
  for (const auto& [name, t] : values)
    if (const std::optional<NonFinite> big = first_overflow(t, ema_.at(name).dtype()))
      fail("EMA::set: '", name, "' holds ", big->value, " at ", shape_str(big->index), ", past ",
           dtype_name(ema_.at(name).dtype()), "'s range");
  for (const auto& [name, t] : values)
    ema_.at(name) = raw::clone(raw::to_dtype(t, ema_.at(name).dtype()));
}

}  // namespace mmdit
