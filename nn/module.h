// Module: named parameters, frozen buffers and child modules, in the manner of PyTorch's C++
// frontend. Parameter names are dotted paths (`blocks.0.joint_attn.to_qkv.1.weight`), exactly
// the names the reference's parity files use.
//
// A module holds Tensor handles that share their TensorImpl with its registry, so conversions
// and loads happen in place and every handle sees them. A handle assigned a new tensor after
// registering leaves the registry behind (the forward would read a tensor no optimiser, load or
// checkpoint sees), as would a tensor or child never registered: register every one, once.
// Modules are neither copyable nor movable: children register by address.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tensor/named_tensors.h"
#include "tensor/random.h"

namespace mmdit::nn {

class Module {
 public:
  Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;
  virtual ~Module() = default;

  NamedTensors named_parameters() const;  // trainable
  NamedTensors named_buffers() const;     // frozen: never trained, never given gradients
  int64_t num_parameters() const;
  const std::vector<std::pair<std::string, Module*>>& children() const { return children_; }

  // Converts every parameter and buffer to `dtype`, in place, through each child's to(): a
  // module whose buffers are computed (BCPolicy's position tables) recomputes them.
  virtual void to(DType dtype);
  // The parameters' dtype (to() keeps them all one), float32 for a module without parameters.
  DType dtype() const;
  // Copies values into the parameters (and buffers, if `buffers` is true). Strict: a missing,
  // unknown or mis-shaped name is an error naming it.
  void load(const NamedTensors& values, bool buffers = false);

 protected:
  Tensor register_parameter(const std::string& name, Tensor t);
  Tensor register_buffer(const std::string& name, Tensor t);
  template <class M>
  M& register_module(const std::string& name, M& child) {
    check_new_name(name, "module");
    children_.emplace_back(name, &child);
    return child;
  }

 private:
  // A name is one non-empty path component, not yet taken by a parameter, buffer or child: a
  // clash ("w" twice, or "lin.weight" beside a child "lin") would otherwise surface only when
  // the names are collected, without saying which module made it.
  void check_new_name(const std::string& name, const char* kind) const;
  void collect(const std::string& prefix, bool buffers, NamedTensors& out) const;
  const Tensor* first_parameter() const;  // in named_parameters() order
  std::vector<std::pair<std::string, Tensor>> parameters_;
  std::vector<std::pair<std::string, Tensor>> buffers_;
  std::vector<std::pair<std::string, Module*>> children_;
};

// An indexed list of modules; the children are named 0, 1, 2, ...
template <class M>
class ModuleList : public Module {
 public:
  ModuleList() = default;
  M& push_back(std::unique_ptr<M> m) {
    items_.push_back(std::move(m));
    return register_module(std::to_string(items_.size() - 1), *items_.back());
  }
  template <class... Args>
  M& emplace_back(Args&&... args) {
    return push_back(std::make_unique<M>(std::forward<Args>(args)...));
  }
  M& operator[](size_t i) { return *items_[checked(i)]; }
  const M& operator[](size_t i) const { return *items_[checked(i)]; }
  size_t size() const { return items_.size(); }

 private:
  size_t checked(size_t i) const {
    MMDIT_CHECK(i < items_.size(), "ModuleList: index ", i, " is out of range for ", items_.size(),
                " modules");
    return i;
  }
  std::vector<std::unique_ptr<M>> items_;
};

}  // namespace mmdit::nn
