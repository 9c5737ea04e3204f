#include "train/optim.h"

#include <cmath>

#include "tensor/ops.h"
#include "tensor/parallel.h"

namespace mmdit {
namespace {

void check_same_layout(const NamedTensors& params, const NamedTensors& other, const char* who) {
  MMDIT_CHECK(params.size() == other.size(), who, ": ", other.size(), " tensors given for ",
              params.size(), " parameters");
  for (const auto& [name, p] : params) {
    MMDIT_CHECK(other.contains(name), who, ": no tensor for parameter '", name, "'");
    const Tensor& o = other.at(name);
    MMDIT_CHECK(o.shape() == p.shape(), who, ": '", name, "' has shape ", shape_str(o.shape()),
                ", the parameter has ", shape_str(p.shape()));
  }
}

NamedTensors zeros_like_all(const NamedTensors& params) {
  NamedTensors out;
  for (const auto& [name, p] : params) out.insert(name, zeros_like(p));
  return out;
}

template <class T, class Fn>
void for_each_element(int64_t n, Fn fn) {
  parallel_for(n, 8, fn);
}

template <class T>
void adamw_kernel(T* p, const T* g, T* m, T* v, int64_t n, const AdamWConfig& c, double lr,
                  int64_t step) {
  const T b1 = static_cast<T>(c.b1), b2 = static_cast<T>(c.b2), eps = static_cast<T>(c.eps);
  const T wd = static_cast<T>(c.weight_decay), rate = static_cast<T>(lr);
  const T bc1 = static_cast<T>(1 - std::pow(c.b1, static_cast<double>(step)));
  const T bc2 = static_cast<T>(1 - std::pow(c.b2, static_cast<double>(step)));
  for_each_element<T>(n, [&](int64_t i) {
    m[i] = (1 - b1) * g[i] + b1 * m[i];
    v[i] = (1 - b2) * (g[i] * g[i]) + b2 * v[i];
    const T m_hat = m[i] / bc1, v_hat = v[i] / bc2;
    const T u = m_hat / (std::sqrt(v_hat) + eps) + wd * p[i];
    p[i] = p[i] + (-rate * u);
  });
}

}  // namespace

AdamW::AdamW(const NamedTensors& params, AdamWConfig config)
    : config_(config), m_(zeros_like_all(params)), v_(zeros_like_all(params)) {
  for (const auto& [name, p] : params)
    MMDIT_CHECK(p.is_contiguous() && is_floating(p.dtype()), "AdamW: parameter '", name,
                "' must be a contiguous float tensor");
}

void AdamW::update(const NamedTensors& params, const NamedTensors& grads, double lr) {
  check_same_layout(params, grads, "AdamW::update");
  check_same_layout(params, m_, "AdamW::update (optimiser state)");
  ++step_;
  for (const auto& [name, p] : params) {
    const Tensor g = raw::contiguous(raw::to_dtype(grads.at(name), p.dtype()));
    Tensor &m = m_.at(name), &v = v_.at(name);
    if (m.dtype() != p.dtype()) m = raw::to_dtype(m, p.dtype()), v = raw::to_dtype(v, p.dtype());
    if (p.dtype() == DType::f32)
      adamw_kernel(p.data<float>(), g.data<float>(), m.data<float>(), v.data<float>(), p.numel(),
                   config_, lr, step_);
    else
      adamw_kernel(p.data<double>(), g.data<double>(), m.data<double>(), v.data<double>(),
                   p.numel(), config_, lr, step_);
  }
}

void AdamW::set_state(int64_t step, const NamedTensors& m, const NamedTensors& v) {
  check_same_layout(m_, m, "AdamW::set_state (first moments)");
  check_same_layout(v_, v, "AdamW::set_state (second moments)");
  MMDIT_CHECK(step >= 0, "AdamW::set_state: negative step ", step);
  step_ = step;
  for (const auto& [name, t] : m) m_.at(name) = raw::clone(t);
  for (const auto& [name, t] : v) v_.at(name) = raw::clone(t);
}

double global_norm(const NamedTensors& grads) {
  double sq = 0;
  for (const auto& [name, g] : grads)
    sq += raw::sum(raw::unary(raw::UnaryOp::square, raw::to_dtype(g, DType::f64))).item();
  return std::sqrt(sq);
}

double clip_by_global_norm(const NamedTensors& grads, double max_norm) {
  const double norm = global_norm(grads);
  if (norm > max_norm) {
    const double scale = max_norm / norm;
    for (const auto& [name, g] : grads) raw::copy_into(g, raw::mul_scalar(g, scale));
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
    auto run = [&](auto* ev, const auto* pv) {
      using T = std::remove_pointer_t<decltype(ev)>;
      const T d = static_cast<T>(decay_);
      parallel_for(e.numel(), 4, [&](int64_t i) { ev[i] = d * ev[i] + (1 - d) * pv[i]; });
    };
    if (e.dtype() == DType::f32)
      run(e.data<float>(), pc.data<float>());
    else
      run(e.data<double>(), pc.data<double>());
  }
}

void EMA::set(const NamedTensors& values) {
  check_same_layout(ema_, values, "EMA::set");
  for (const auto& [name, t] : values)
    ema_.at(name) = raw::clone(raw::to_dtype(t, ema_.at(name).dtype()));
}

}  // namespace mmdit
