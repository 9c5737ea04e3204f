// Shape: the dimensions (or strides) of a tensor. It behaves as a std::vector<int64_t> and keeps
// up to kInline values in place, as PyTorch's sizes and strides do (SmallVector<int64_t, 5>).
// Every tensor and every view holds two of them, and a step makes and drops tens of thousands of
// views: as std::vectors they were two heap blocks each, and the allocator a fifth of a small
// model's gradient check.
// As with std::vector, operator[], front(), back() and pop_back() are unchecked (they are on every
// hot path): the caller keeps indices below size() and does not pop an empty Shape.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <iterator>
#include <utility>
#include <vector>

namespace mmdit {

class Shape {
 public:
  static constexpr size_t kInline = 6;  // the models use at most 5 dimensions

  using value_type = int64_t;
  using size_type = size_t;
  using difference_type = std::ptrdiff_t;
  using reference = int64_t&;
  using const_reference = const int64_t&;
  using iterator = int64_t*;
  using const_iterator = const int64_t*;

  Shape() = default;
  explicit Shape(size_t n, int64_t value = 0) { resize(n, value); }
  Shape(std::initializer_list<int64_t> values) : Shape(values.begin(), values.end()) {}
  template <std::input_iterator It>
  Shape(It first, It last) {
    for (; first != last; ++first) push_back(static_cast<int64_t>(*first));
  }
  Shape(const std::vector<int64_t>& values) : Shape(values.begin(), values.end()) {}  // NOLINT
  Shape(const Shape& other) { *this = other; }
  Shape(Shape&& other) noexcept { *this = std::move(other); }
  Shape& operator=(const Shape& other) {
    if (other.heap_.empty()) {  // the common case: no std::vector to copy
      std::copy(other.inline_.begin(), other.inline_.begin() + other.size_, inline_.begin());
      heap_.clear();
    } else {
      heap_ = other.heap_;
    }
    size_ = other.size_;
    return *this;
  }
  Shape& operator=(Shape&& other) noexcept {  // leaves `other` empty
    if (this != &other) {
      inline_ = other.inline_;
      heap_ = std::move(other.heap_);
      size_ = other.size_;
      other.heap_.clear();
      other.size_ = 0;
    }
    return *this;
  }
  ~Shape() = default;
  // Explicit, so that no call quietly copies a shape onto the heap.
  explicit operator std::vector<int64_t>() const { return {begin(), end()}; }

  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  int64_t* data() { return heap_.empty() ? inline_.data() : heap_.data(); }
  const int64_t* data() const { return heap_.empty() ? inline_.data() : heap_.data(); }
  iterator begin() { return data(); }
  iterator end() { return data() + size_; }
  const_iterator begin() const { return data(); }
  const_iterator end() const { return data() + size_; }
  int64_t& operator[](size_t i) { return data()[i]; }
  const int64_t& operator[](size_t i) const { return data()[i]; }
  int64_t& front() { return data()[0]; }
  const int64_t& front() const { return data()[0]; }
  int64_t& back() { return data()[size_ - 1]; }
  const int64_t& back() const { return data()[size_ - 1]; }

  void clear() { resize(0); }
  void resize(size_t n, int64_t value = 0) {
    if (n > kInline && heap_.empty()) heap_.assign(begin(), end());
    if (!heap_.empty() || n > kInline) {
      heap_.resize(n, value);
      if (n <= kInline) {  // back in place
        std::copy(heap_.begin(), heap_.end(), inline_.begin());
        heap_.clear();
        heap_.shrink_to_fit();
      }
    } else {
      for (size_t i = size_; i < n; ++i) inline_[i] = value;
    }
    size_ = n;
  }
  void push_back(int64_t value) {
    if (size_ < kInline && heap_.empty()) {
      inline_[size_++] = value;
      return;
    }
    resize(size_ + 1);
    back() = value;
  }
  void pop_back() { resize(size_ - 1); }
  iterator insert(const_iterator pos, int64_t value) {
    const size_t at = static_cast<size_t>(pos - begin());
    resize(size_ + 1);
    std::copy_backward(begin() + at, end() - 1, end());
    (*this)[at] = value;
    return begin() + at;
  }
  template <std::input_iterator It>
  iterator insert(const_iterator pos, It first, It last) {
    size_t at = static_cast<size_t>(pos - begin());
    const size_t start = at;
    for (; first != last; ++first) insert(begin() + at++, static_cast<int64_t>(*first));
    return begin() + start;
  }
  iterator insert(const_iterator pos, std::initializer_list<int64_t> values) {
    return insert(pos, values.begin(), values.end());
  }
  iterator erase(const_iterator pos) {
    const size_t at = static_cast<size_t>(pos - begin());
    std::copy(begin() + at + 1, end(), begin() + at);
    resize(size_ - 1);
    return begin() + at;
  }

  friend bool operator==(const Shape& a, const Shape& b) {
    return std::equal(a.begin(), a.end(), b.begin(), b.end());
  }

 private:
  std::array<int64_t, kInline> inline_{};
  std::vector<int64_t> heap_;  // holds every value instead once there are more than kInline
  size_t size_ = 0;
};

}  // namespace mmdit
