#include "nn/module.h"

#include <algorithm>
#include <cmath>

#include "tensor/ops.h"

namespace mmdit::nn {

void Module::check_new_name(const std::string& name, const char* kind) const {
  MMDIT_CHECK(!name.empty() && name.find('.') == std::string::npos, "Module: cannot register a ",
              kind, " named '", name, "': a name is one non-empty component, without '.'");
  const auto taken = [&](const auto& list) {
    return std::any_of(list.begin(), list.end(),
                       [&](const auto& entry) { return entry.first == name; });
  };
  const char* holder = taken(parameters_) ? "parameter"
                       : taken(buffers_)  ? "buffer"
                       : taken(children_) ? "module"
                                          : nullptr;
  MMDIT_CHECK(!holder, "Module: cannot register a ", kind, " named '", name,
              "': this module already has a ", holder, " of that name");
}

Tensor Module::register_parameter(const std::string& name, Tensor t) {
  check_new_name(name, "parameter");
  MMDIT_CHECK(t.defined(), "Module: parameter '", name, "' is an undefined tensor");
  parameters_.emplace_back(name, t);
  return t;
}

Tensor Module::register_buffer(const std::string& name, Tensor t) {
  check_new_name(name, "buffer");
  MMDIT_CHECK(t.defined(), "Module: buffer '", name, "' is an undefined tensor");
  buffers_.emplace_back(name, t);
  return t;
}

void Module::collect(const std::string& prefix, bool buffers, NamedTensors& out) const {
  for (const auto& [name, t] : buffers ? buffers_ : parameters_) out.insert(prefix + name, t);
  for (const auto& [name, child] : children_) child->collect(prefix + name + ".", buffers, out);
}

NamedTensors Module::named_parameters() const {
  NamedTensors out;
  collect("", false, out);
  return out;
}

NamedTensors Module::named_buffers() const {
  NamedTensors out;
  collect("", true, out);
  return out;
}

int64_t Module::num_parameters() const {
  int64_t n = 0;
  for (const auto& [name, t] : named_parameters()) n += t.numel();
  return n;
}

void Module::to(DType dtype) {
  // Parameters converted to bool would silently become 0 and 1.
  MMDIT_CHECK(is_floating(dtype), "Module::to: dtype must be float32 or float64, got ",
              dtype_name(dtype));
  auto convert = [dtype](const std::vector<std::pair<std::string, Tensor>>& tensors) {
    for (const auto& [name, t] : tensors) {
      if (t.dtype() == dtype || !is_floating(t.dtype())) continue;
      Tensor converted = raw::to_dtype(t, dtype);
      TensorImpl& impl = t.impl();
      impl.storage = converted.impl().storage;
      impl.dtype = dtype;
      impl.strides = converted.strides();
      impl.offset = converted.offset();
    }
  };
  convert(parameters_);
  convert(buffers_);
  for (const auto& [name, child] : children_) child->to(dtype);  // a child may override to()
}

DType Module::dtype() const {
  const Tensor* first = first_parameter();
  return first ? first->dtype() : DType::f32;
}

const Tensor* Module::first_parameter() const {
  if (!parameters_.empty()) return &parameters_[0].second;
  for (const auto& [name, child] : children_)
    if (const Tensor* t = child->first_parameter()) return t;
  return nullptr;
}

void Module::load(const NamedTensors& values, bool buffers) {
  NamedTensors targets = named_parameters();
  if (buffers)
    for (const auto& [name, t] : named_buffers()) targets.insert(name, t);
  // Everything is checked before anything is copied: a load that fails leaves the model as it
  // was, not half overwritten.
  for (const auto& [name, target] : targets) {
    MMDIT_CHECK(values.contains(name), "load: missing parameter '", name, "' (shape ",
                shape_str(target.shape()), ")");
    const Tensor& v = values.at(name);
    MMDIT_CHECK(v.defined(), "load: parameter '", name, "' is an undefined tensor");
    MMDIT_CHECK(v.shape() == target.shape(), "load: parameter '", name, "' has shape ",
                shape_str(v.shape()), " but the model expects ", shape_str(target.shape()));
    MMDIT_CHECK(is_floating(v.dtype()), "load: parameter '", name, "' has dtype ",
                dtype_name(v.dtype()), ", expected a float tensor");
    // Past float32's range a float64 value would be stored as inf without a word.
    if (const std::optional<NonFinite> big = first_overflow(v, target.dtype()))
      fail("load: parameter '", name, "' holds ", big->value, " at ", shape_str(big->index),
           ", past float32's range");
  }
  const NamedTensors frozen = buffers ? NamedTensors() : named_buffers();
  for (const auto& [name, v] : values) {
    MMDIT_CHECK(!frozen.contains(name), "load: '", name,
                "' is a buffer of the model, not a parameter; load(values, /*buffers=*/true) "
                "loads buffers too");
    MMDIT_CHECK(targets.contains(name), "load: unknown parameter '", name, "' (shape ",
                v.defined() ? shape_str(v.shape()) : std::string("undefined"),
                ") is not in the model");
  }
  for (const auto& [name, target] : targets) raw::copy_into(target, values.at(name));
}

}  // namespace mmdit::nn
