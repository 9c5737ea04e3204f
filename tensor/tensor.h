// Tensor: a dtype, a shape and strides over shared, 64-byte-aligned storage.
//
// A Tensor is a cheap handle (one shared_ptr). Views (reshape, permute, slice, broadcast_to, ...)
// make a new handle over the same storage; nothing is copied until contiguous() or clone().
// This layer computes and never records: the differentiable versions of the ops live in
// autodiff/ and call the raw ones declared in ops.h.
#pragma once

#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tensor/dtype.h"
#include "tensor/error.h"
#include "tensor/shape.h"

namespace mmdit {

int64_t shape_numel(const Shape& shape);
// (..., n) as a matrix of rows, (product of the leading dims, n): the rows counted, not inferred
// with -1, which cannot be done when n is 0.
Shape rows_shape(const Shape& shape, int64_t n);
Shape contiguous_strides(const Shape& shape);
// Resolves a possibly negative axis against `ndim`; `op` names the caller in the error.
int64_t normalize_axis(int64_t axis, int64_t ndim, const char* op);
// The same, naming the shape in the error.
int64_t normalize_axis(int64_t axis, const Shape& shape, const char* op);

// A block of memory, 64-byte aligned. Freed blocks go back to a cache keyed by size so that a
// training loop, which asks for the same sizes every step, stops calling malloc (and stops
// page-faulting fresh pages in) after its first step. Requests are rounded up to size classes
// (4 per power of two above 4 KiB) so that nearby sizes share blocks, and the cache gives its least
// recently freed blocks back to the system beyond a limit, so that a program whose shapes vary does
// not hold ever more memory (tensor.cc says how the limit is chosen).
class Storage {
 public:
  explicit Storage(size_t bytes);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  // Counts the in-place writes made through the library (copy_into, add_into, an optimiser or
  // EMA step, Tensor::mark_changed), so that backward can tell a saved tensor changed under it.
  uint64_t version() const { return version_.load(std::memory_order_relaxed); }
  void bump_version() { version_.fetch_add(1, std::memory_order_relaxed); }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
  std::atomic<uint64_t> version_{0};
};

struct AllocatorStats {
  size_t live_bytes = 0;    // held by storages alive now
  size_t cached_bytes = 0;  // freed, kept for reuse
  size_t peak_live_bytes = 0;
  size_t system_allocs = 0;      // blocks obtained from the system
  size_t evictions = 0;          // cached blocks given back to the system to keep under the limit
  size_t cache_limit_bytes = 0;  // the most cached_bytes may be now: it grows with the peak
};
AllocatorStats allocator_stats();
// Gives every cached block back to malloc.
void release_cached_memory();

struct TensorImpl {
  std::shared_ptr<Storage> storage;
  DType dtype = DType::f32;
  Shape shape;
  Shape strides;       // in elements
  int64_t offset = 0;  // in elements
  // Autodiff bookkeeping for the result of a recorded op, written once by the tape that recorded
  // it: that tape's id and the value slot there. A tensor from an older tape has a stale tape_id
  // and counts as constant. Watched tensors are not marked (Tape keeps them).
  uint64_t tape_id = 0;
  int64_t tape_slot = -1;
};

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

  bool defined() const { return impl_ != nullptr; }
  DType dtype() const { return impl().dtype; }
  const Shape& shape() const { return impl().shape; }
  const Shape& strides() const { return impl().strides; }
  int64_t offset() const { return impl().offset; }
  int64_t dim() const { return static_cast<int64_t>(impl().shape.size()); }
  int64_t size(int64_t axis) const;
  int64_t numel() const { return shape_numel(impl().shape); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype()); }
  bool is_contiguous() const;

  // Pointer to the first element (offset applied). Throws if T does not match the dtype.
  template <class T>
  T* data() const {
    MMDIT_CHECK(dtype_of<T>() == dtype(), "data<", dtype_name(dtype_of<T>()),
                ">: tensor has dtype ", dtype_name(dtype()), " (shape ", shape_str(shape()), ")");
    return static_cast<T*>(impl().storage->data()) + impl().offset;
  }
  void* raw_data() const {
    return static_cast<char*>(impl().storage->data()) + impl().offset * dtype_size(dtype());
  }
  // Says that the memory was written in place through data<T>(): a tape that saved this tensor
  // (or another view of its storage) for backward then refuses to compute from the new values.
  // The library's own in-place writes (copy_into, add_into, the optimisers) do this themselves.
  void mark_changed() const { impl().storage->bump_version(); }

  // The single value of a one-element tensor, converted to double.
  double item() const;
  // All values in row-major order, converted to T.
  template <class T>
  std::vector<T> to_vector() const;

  TensorImpl& impl() const {
    MMDIT_CHECK(impl_, "use of an undefined (default-constructed) Tensor");
    return *impl_;
  }
  const std::shared_ptr<TensorImpl>& impl_ptr() const { return impl_; }
  bool shares_storage_with(const Tensor& other) const {
    return defined() && other.defined() && impl().storage == other.impl().storage;
  }

 private:
  std::shared_ptr<TensorImpl> impl_;
};

// ---- creation ----
Tensor empty(const Shape& shape, DType dtype = DType::f32);
Tensor zeros(const Shape& shape, DType dtype = DType::f32);
Tensor ones(const Shape& shape, DType dtype = DType::f32);
Tensor full(const Shape& shape, double value, DType dtype = DType::f32);
Tensor scalar(double value, DType dtype = DType::f32);  // shape ()
Tensor arange(int64_t n, DType dtype = DType::f32);
// Throws unless t is float32 or float64, naming op, the dtype and t's shape.
void check_float(const Tensor& t, const char* op);

// The multi-index of element `flat` of a C-order array of `shape`.
Shape unravel_index(int64_t flat, const Shape& shape);
// The first NaN or infinity of a float tensor in C order (none for other dtypes): where it is and
// what it is, for error messages.
struct NonFinite {
  Shape index;
  double value;
};
std::optional<NonFinite> first_non_finite(const Tensor& t);
// The first element that is finite in t but would not be in `dtype` (a float64 past float32's
// range, which a conversion would store as infinity), with its value as t holds it.
std::optional<NonFinite> first_overflow(const Tensor& t, DType dtype);

// Copies `values` (row-major) into a new tensor of `shape`.
template <class T>  // float, double or bool
Tensor from_vector(const std::vector<T>& values, const Shape& shape);
template <>
Tensor from_vector<bool>(const std::vector<bool>& values, const Shape& shape);
Tensor from_vector(std::initializer_list<float> values, const Shape& shape);
Tensor from_vector(const std::vector<double>& values, const Shape& shape, DType dtype);
Tensor empty_like(const Tensor& t);
Tensor zeros_like(const Tensor& t);
// A tensor over an existing storage; the caller guarantees the layout fits.
Tensor make_view(const Tensor& base, const Shape& shape, const Shape& strides, int64_t offset);

}  // namespace mmdit
