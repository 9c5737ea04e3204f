#include "autodiff/gradcheck.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "autodiff/tape.h"
#include "tensor/ops.h"
#include "tensor/random.h"

namespace mmdit {

std::string GradcheckResult::report() const {
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "%s: %lld elements checked%s; worst %s%s: analytic %.10g, numeric %.10g, "
                "|diff| %.3g vs tolerance %.3g",
                ok ? "ok" : "FAILED", static_cast<long long>(checked),
                zero > 0 ? str_cat(" (", zero,
                                   " of them 0 on both sides, which any backward "
                                   "passes)")
                               .c_str()
                         : "",
                name.c_str(), shape_str(index).c_str(), analytic, numeric,
                std::abs(analytic - numeric), tolerance);
  return buf;
}

GradcheckResult gradcheck(const std::function<Tensor()>& f, const NamedTensors& wrt,
                          const GradcheckOptions& options) {
  // Tolerances that no difference can fail, or no element checked, would pass any gradient.
  MMDIT_CHECK(options.eps > 0 && std::isfinite(options.eps),
              "gradcheck: the step eps must be a positive number, got ", options.eps);
  MMDIT_CHECK(options.atol >= 0 && options.rtol >= 0 && options.atol + options.rtol > 0 &&
                  std::isfinite(options.atol + options.rtol),
              "gradcheck: atol and rtol must be finite and >= 0, not both 0; got atol ",
              options.atol, ", rtol ", options.rtol);
  MMDIT_CHECK(options.sample == -1 || options.sample >= 1,
              "gradcheck: sample must be -1 (every element) or at least 1, got ", options.sample);
  MMDIT_CHECK(!wrt.empty(), "gradcheck: no tensors to check");
  for (size_t k = 0; k < wrt.size(); ++k) {
    const auto& [name, t] = wrt[k];
    MMDIT_CHECK(t.dtype() == DType::f64, "gradcheck: '", name, "' must be a float64 tensor, got ",
                dtype_name(t.dtype()), " ", shape_str(t.shape()));
    MMDIT_CHECK(t.is_contiguous(), "gradcheck: '", name, "' ", shape_str(t.shape()),
                " is not contiguous; gradcheck perturbs its elements in memory order");
    // Perturbing one would move the other too, and the numeric derivative with it. Both are
    // contiguous: their elements are the ranges [offset, offset + numel) of their storages.
    for (size_t j = 0; j < k; ++j) {
      const Tensor& u = wrt[j].second;
      MMDIT_CHECK(!t.shares_storage_with(u) || t.offset() + t.numel() <= u.offset() ||
                      u.offset() + u.numel() <= t.offset(),
                  "gradcheck: '", name, "' and '", wrt[j].first,
                  "' overlap in memory; check tensors that do not");
    }
  }
  Rng rng(options.seed);
  Tensor cotangent;
  auto scalar_loss = [&](const Tensor& out) {
    MMDIT_CHECK(out.dtype() == DType::f64, "gradcheck: f must return float64, got ",
                dtype_name(out.dtype()));
    if (!cotangent.defined()) cotangent = rng.normal(out.shape(), DType::f64);
    return raw::sum(raw::mul(out, cotangent)).item();
  };

  std::vector<Tensor> analytic;
  {
    Tape tape;
    std::vector<Tensor> leaves;
    for (const auto& [name, t] : wrt) {
      tape.watch(t);
      leaves.push_back(t);
    }
    Tensor out = f();
    MMDIT_CHECK(out.defined(), "gradcheck: f returned an undefined tensor");
    MMDIT_CHECK(out.dtype() == DType::f64, "gradcheck: f must return float64, got ",
                dtype_name(out.dtype()), " ", shape_str(out.shape()));
    MMDIT_CHECK(tape.is_on_tape(out),
                "gradcheck: f's output was not computed from the checked tensors (",
                wrt.size() == 1 ? wrt.begin()->first : str_cat(wrt.size(), " tensors"),
                "), so every derivative would be 0 = 0; with the overload taking inputs, f "
                "must use its argument, which holds copies of them");
    scalar_loss(out);
    // A copy: a backward that wrongly wrote into its incoming gradient would otherwise change
    // the cotangent the central differences use too, and pass.
    analytic = tape.gradient(out, leaves, raw::clone(cotangent));
  }

  GradcheckResult result;
  for (size_t k = 0; k < wrt.size(); ++k) {
    const auto& [name, t] = wrt[k];
    double* p = t.data<double>();
    const double* g = analytic[k].data<double>();
    std::vector<int64_t> elements(t.numel());
    for (int64_t i = 0; i < t.numel(); ++i) elements[i] = i;
    if (options.sample >= 0 && options.sample < t.numel()) {
      for (int64_t i = 0; i < options.sample; ++i)
        std::swap(elements[i], elements[i + rng.next_u64() % (t.numel() - i)]);
      elements.resize(options.sample);
    }
    for (int64_t i : elements) {
      // The tensors are the caller's (a model's parameters): an f that throws must not leave
      // one of them perturbed.
      struct Restore {
        double* element;
        double saved;
        ~Restore() { *element = saved; }
      } restore{p + i, p[i]};
      p[i] = restore.saved + options.eps;
      const double plus = scalar_loss(f());
      p[i] = restore.saved - options.eps;
      const double minus = scalar_loss(f());
      p[i] = restore.saved;
      const double numeric = (plus - minus) / (2 * options.eps);
      const double tolerance = options.atol + options.rtol * std::abs(numeric);
      const double diff = std::abs(g[i] - numeric);
      // An infinite or NaN derivative on either side would make the ratio NaN, which compares
      // false and passed: it passes only where both sides are the same infinity.
      const double ratio = std::isfinite(g[i]) && std::isfinite(numeric) ? diff / tolerance
                           : g[i] == numeric                             ? 0.0
                                                                         : INFINITY;
      ++result.checked;
      if (g[i] == 0 && numeric == 0) ++result.zero;
      if (ratio > 1) result.ok = false;
      if (ratio >= result.worst_ratio) {
        result.worst_ratio = ratio;
        result.name = name;
        result.index = unravel_index(i, t.shape());
        result.analytic = g[i];
        result.numeric = numeric;
        result.tolerance = tolerance;
      }
    }
  }
  return result;
}

GradcheckResult gradcheck(const std::function<Tensor(const std::vector<Tensor>&)>& f,
                          const std::vector<Tensor>& inputs, const GradcheckOptions& options) {
  NamedTensors wrt;
  std::vector<Tensor> copies;
  for (size_t i = 0; i < inputs.size(); ++i) {
    copies.push_back(raw::clone(inputs[i]));
    if (is_floating(inputs[i].dtype())) wrt.insert("input" + std::to_string(i), copies.back());
  }
  MMDIT_CHECK(!wrt.empty(), "gradcheck: none of the ", inputs.size(),
              " inputs is a float tensor; there is nothing to check");
  return gradcheck([&] { return f(copies); }, wrt, options);
}

}  // namespace mmdit
