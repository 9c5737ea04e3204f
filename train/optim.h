// AdamW as optax computes it, global-norm clipping, a warm-up + cosine schedule, and the EMA of
// the parameters. Updates are in place, on contiguous parameter memory, outside any tape.
#pragma once

#include <string>

#include "tensor/named_tensors.h"

namespace mmdit {

// optax.adamw's defaults (its weight_decay is 1e-4, not 0). optax has no default lr; 1e-4 is the
// reference agent's.
struct AdamWConfig {
  double lr = 1e-4;
  double b1 = 0.9, b2 = 0.999, eps = 1e-8;
  double weight_decay = 1e-4;
};

class EMA;

// optax.adamw = chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate):
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   u = m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd p
//   p = p - lr u
// The decay stays inside u, not as p (1 - lr wd): in float32, 1 - 1e-4 * 1e-2 rounds to 1 and
// the decay would vanish.
class AdamW {
 public:
  // Throws unless lr, eps and weight_decay are finite and >= 0 and b1, b2 in [0, 1).
  AdamW(const NamedTensors& params, AdamWConfig config);
  // One step over every parameter, including those whose gradient is zero (weight decay still
  // applies).
  // - lr: this step's learning rate (a schedule's), instead of config.lr.
  // - grad_scale: multiplies every gradient first, in the same pass (the factor of global-norm
  //   clipping, clip_scale), so the gradients themselves are not rewritten.
  // - ema: advanced in the same pass too, as ema->update(params) after this call would.
  // Returns global_norm(grads) of the gradients as given, before grad_scale. Gradients of the
  // other float dtype are converted.
  // Everything is checked, and that norm read, before anything changes: a gradient not finite,
  // undefined, not float, or of names or shapes that do not fit, or an lr or grad_scale negative
  // or not finite, throws naming what is wrong, leaving parameters, moments, step and EMA as they
  // were.
  double update(const NamedTensors& params, const NamedTensors& grads, double lr,
                double grad_scale = 1.0, EMA* ema = nullptr) {
    return update_impl(params, grads, lr, grad_scale, 0.0, ema);
  }
  double update(const NamedTensors& params, const NamedTensors& grads) {
    return update(params, grads, config_.lr);
  }
  // update() after clip_by_global_norm(grads, max_norm) (max_norm 0: no clipping), with the
  // norm read once, by the pass that checks the gradients; the gradients are not modified.
  double update_clipped(const NamedTensors& params, const NamedTensors& grads, double lr,
                        double max_norm, EMA* ema = nullptr) {
    return update_impl(params, grads, lr, 1.0, max_norm, ema);
  }

  int64_t step() const { return step_; }
  const NamedTensors& first_moments() const { return m_; }
  const NamedTensors& second_moments() const { return v_; }
  // Restores a saved state; names and shapes must match the parameters, the moments be finite
  // and the second moments >= 0 (else it throws naming the tensor, and nothing changes).
  void set_state(int64_t step, const NamedTensors& m, const NamedTensors& v);
  const AdamWConfig& config() const { return config_; }

 private:
  double update_impl(const NamedTensors& params, const NamedTensors& grads, double lr,
                     double grad_scale, double max_norm, EMA* ema);

  AdamWConfig config_;
  int64_t step_ = 0;
  NamedTensors m_, v_;
};

// Scales all gradients by min(1, max_norm / global_norm), as optax.clip_by_global_norm (max_norm
// must be positive); returns the global norm before clipping.
double clip_by_global_norm(const NamedTensors& grads, double max_norm);
double global_norm(const NamedTensors& grads);  // accumulated in float64
// The factor clip_by_global_norm scales by: min(1, max_norm / norm).
double clip_scale(double norm, double max_norm);

// Linear warm-up from 0 to peak over warmup_steps, then cosine decay to end_lr at total_steps
// (optax.warmup_cosine_decay_schedule). With total_steps == 0: constant peak after warm-up.
double warmup_cosine_lr(int64_t step, double peak, int64_t warmup_steps, int64_t total_steps,
                        double end_lr = 0.0);

// ema = decay ema + (1 - decay) p, for every trainable parameter (never the buffers); 1 - decay
// is formed in double, then rounded to the parameters' dtype (in float32, 1 - float(0.9999) is
// 1.7e-4 (relative) away from 1e-4).
class EMA {
 public:
  EMA(const NamedTensors& params, double decay);  // starts equal to params (copies)
  void update(const NamedTensors& params);
  const NamedTensors& params() const { return ema_; }
  void set(const NamedTensors& values);  // strict: same names and shapes
  double decay() const { return decay_; }

 private:
  double decay_;
  NamedTensors ema_;
};

}  // namespace mmdit
