// An ordered list of named tensors: a model's parameters, its gradients, a checkpoint's
// contents. Order is insertion order; lookups name what is missing.
#pragma once

#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tensor/tensor.h"

namespace mmdit {

class NamedTensors {
 public:
  using Item = std::pair<std::string, Tensor>;

  void insert(std::string name, Tensor t) {
    MMDIT_CHECK(!index_.count(name), "duplicate tensor name '", name, "'");
    index_.emplace(name, items_.size());
    items_.emplace_back(std::move(name), std::move(t));
  }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  const Tensor& at(const std::string& name) const {
    auto it = index_.find(name);
    MMDIT_CHECK(it != index_.end(), "no tensor named '", name, "'");
    return items_[it->second].second;
  }
  Tensor& at(const std::string& name) {
    return const_cast<Tensor&>(static_cast<const NamedTensors&>(*this).at(name));
  }
  size_t size() const { return items_.size(); }
  bool empty() const { return items_.empty(); }
  auto begin() const { return items_.begin(); }
  auto end() const { return items_.end(); }
  auto begin() { return items_.begin(); }
  auto end() { return items_.end(); }
  const Item& operator[](size_t i) const {
    MMDIT_CHECK(i < items_.size(), "NamedTensors: index ", i, " is out of range for ",
                items_.size(), " tensors");
    return items_[i];
  }

 private:
  std::vector<Item> items_;
  std::unordered_map<std::string, size_t> index_;
};

}  // namespace mmdit
