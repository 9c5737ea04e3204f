// value_and_grad: the C++ counterpart of eqx.filter_value_and_grad.
//
//   auto [loss, grads] = value_and_grad(loss_fn)(model, batch...);
//
// loss_fn(model, batch...) returns a scalar Tensor. grads holds one tensor per trainable
// parameter, under the parameter's name and with its shape. As Equinox partitions a model with
// is_inexact_array, only float parameters are differentiated: frozen buffers (not returned by
// named_parameters()), bool tensors and non-tensor fields get no gradient.
#pragma once

#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "autodiff/tape.h"
#include "tensor/named_tensors.h"

namespace mmdit {

// The trainable tensors of `model`: its named_parameters() (an nn::Module), the float entries
// of a NamedTensors, or a single Tensor (named "").
template <class Model>
NamedTensors trainable_parameters(Model& model) {
  NamedTensors candidates;
  if constexpr (requires { model.named_parameters(); }) {
    candidates = model.named_parameters();
  } else if constexpr (std::is_same_v<std::remove_cv_t<Model>, NamedTensors>) {
    candidates = model;
  } else {
    static_assert(std::is_same_v<std::remove_cv_t<Model>, Tensor>,
                  "value_and_grad: the model must have named_parameters(), or be NamedTensors "
                  "or a Tensor");
    candidates.insert("", model);
  }
  NamedTensors params;
  for (const auto& [name, t] : candidates)
    if (t.defined() && is_floating(t.dtype())) params.insert(name, t);
  return params;
}

// Watches each of `params` on `tape`, in order; returns them, the wrt of tape.gradient().
inline std::vector<Tensor> watch_all(Tape& tape, const NamedTensors& params) {
  std::vector<Tensor> leaves;
  for (const auto& [name, t] : params) {
    tape.watch(t);
    leaves.push_back(t);
  }
  return leaves;
}

struct ValueAndGrad {
  Tensor value;
  NamedTensors grads;
};

template <class F>
auto value_and_grad(F loss_fn) {
  return [loss_fn](auto&& model, auto&&... args) -> ValueAndGrad {
    const NamedTensors params = trainable_parameters(model);
    Tape tape;
    const std::vector<Tensor> leaves = watch_all(tape, params);
    Tensor value = loss_fn(model, std::forward<decltype(args)>(args)...);
    // Tape::gradient would ask for a cotangent, which value_and_grad has no way to take.
    MMDIT_CHECK(value.defined() && value.numel() == 1,
                "value_and_grad: the loss function must return a scalar, got ",
                value.defined() ? "shape " + shape_str(value.shape()) : "an undefined tensor");
    std::vector<Tensor> grads = tape.gradient(value, leaves);
    ValueAndGrad result{stop_gradient(value), {}};
    for (size_t i = 0; i < leaves.size(); ++i) result.grads.insert(params[i].first, grads[i]);
    return result;
  };
}

// The trainable parameters that loss_fn(model, batch...) is not computed from, by name: their
// gradients are zero by construction (a layer the forward leaves out, a tensor reassigned after
// registering it), and a training loop would only decay them. Runs the forward once, on a tape,
// without a backward pass; a check for a new model's first batch:
//
//   EXPECT_TRUE(unused_parameters(loss_fn)(model, batch).empty());
template <class F>
auto unused_parameters(F loss_fn) {
  return [loss_fn](auto&& model, auto&&... args) -> std::vector<std::string> {
    const NamedTensors params = trainable_parameters(model);
    Tape tape;
    const std::vector<Tensor> leaves = watch_all(tape, params);
    const Tensor value = loss_fn(model, std::forward<decltype(args)>(args)...);
    const std::vector<bool> used = tape.depends_on(value, leaves);
    std::vector<std::string> unused;
    for (size_t i = 0; i < leaves.size(); ++i)
      if (!used[i]) unused.push_back(params[i].first);
    return unused;
  };
}

}  // namespace mmdit
