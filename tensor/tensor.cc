#include "tensor/tensor.h"

#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <mutex>
#include <type_traits>
#include <unordered_map>

#include "tensor/ops.h"
#include "tensor/simd.h"

namespace mmdit {

int64_t shape_numel(const Shape& shape) {
  // The product of the nonzero dims must fit, even when a zero dim makes the tensor empty:
  // strides are computed from it (the rule safetensors.cc applies to files too).
  int64_t n = 1;
  bool has_zero = false;
  for (int64_t d : shape) {
    if (d == 0)
      has_zero = true;
    else if (__builtin_mul_overflow(n, d, &n))
      fail("shape ", shape_str(shape), " has more elements than int64 can count");
  }
  return has_zero ? 0 : n;
}

Shape rows_shape(const Shape& shape, int64_t n) {
  MMDIT_CHECK(!shape.empty(), "rows_shape: a scalar has no rows");
  return {shape_numel(Shape(shape.begin(), shape.end() - 1)), n};
}

Shape contiguous_strides(const Shape& shape) {
  Shape strides(shape.size());
  int64_t s = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = s;
    s *= shape[i];
  }
  return strides;
}

int64_t normalize_axis(int64_t axis, int64_t ndim, const char* op) {
  int64_t a = axis < 0 ? axis + ndim : axis;
  MMDIT_CHECK(a >= 0 && a < ndim, op, ": axis ", axis, " is out of range for a tensor with ", ndim,
              " dimensions");
  return a;
}

int64_t normalize_axis(int64_t axis, const Shape& shape, const char* op) {
  const int64_t ndim = static_cast<int64_t>(shape.size());
  MMDIT_CHECK(axis >= -ndim && axis < ndim, op, ": axis ", axis,
              " is out of range for a tensor with ", ndim, " dimensions (shape ", shape_str(shape),
              ")");
  return axis < 0 ? axis + ndim : axis;
}

// ---- the caching allocator ----
namespace {

struct FreeBlock {
  uint64_t freed_at;  // the cache's count of frees when this one was freed
  void* data;
};

struct BlockCache {
  std::mutex mutex;
  // Per block size, in the order they were freed: reuse takes the newest (its lines may still be
  // in the CPU's caches), the limit evicts the oldest of all sizes.
  std::unordered_map<size_t, std::deque<FreeBlock>> free_blocks;
  uint64_t frees = 0;
  AllocatorStats stats;
};

BlockCache& cache() {
  static BlockCache* c = new BlockCache;  // never destroyed: storages may outlive static teardown
  return *c;
}

// The size of the block that serves a request. Up to 4 KiB, the request rounded up to 64 bytes
// (the alignment): at most 64 sizes. Above, 4 sizes per power of two, 1.25, 1.5, 1.75 and 2 times
// 2^k for a request in (2^k, 2^(k+1)]: at most 20% of a block goes unused, and a shape that
// varies from step to step (a sequence length, an odd last batch) meets a block it can reuse
// instead of asking the system for one of its exact size.
size_t block_bytes(size_t bytes) {
  // Rounding would wrap to a small block that claims to hold them.
  MMDIT_CHECK(bytes <= size_t{1} << 63, "Storage: ", bytes, " bytes cannot be allocated");
  if (bytes <= 4096) return (bytes + 63) / 64 * 64;
  const size_t quarter = std::bit_floor(bytes - 1) / 4;
  return (bytes + quarter - 1) / quarter * quarter;
}

constexpr size_t kMinCacheLimit = size_t{256} << 20;

// How many freed bytes the cache may hold. A program of fixed shapes must keep all of its blocks
// (a training step that page-faults fresh memory in runs much slower on these machines). Between
// steps its cache holds, summed over the size classes, the most blocks of each it had live at once,
// less what stays live (parameters, optimiser state): policy-train and incontext-train hold 0.37
// and 0.81 GB free between steps after peaks of 1.05 and 1.33 GB live. That is 1.4 and 1.5
// times their activations' peak (0.27 and 0.53 GB; the classes peak at different times), so at a
// larger batch, where activations outweigh the parameters, a limit of one peak would evict blocks
// every step; twice the peak keeps them. A program whose shapes vary then holds at most three
// times what it ever had live at once, and the fixed part lets a small program keep sizes it uses
// one after the other.
size_t cache_limit(const AllocatorStats& stats) {
  return std::max(kMinCacheLimit, 2 * stats.peak_live_bytes);
}

// Takes the least recently freed blocks out of the cache until it fits its limit, and returns
// them, to be freed outside the lock.
std::vector<void*> evict_over_limit(BlockCache& c) {
  std::vector<void*> evicted;
  const size_t limit = cache_limit(c.stats);
  while (c.stats.cached_bytes > limit) {
    // Sizes are few (a few hundred at most), and evictions rare: no index over all the blocks.
    std::deque<FreeBlock>* oldest = nullptr;
    size_t oldest_bytes = 0;
    for (auto& [bytes, blocks] : c.free_blocks)
      if (!blocks.empty() && (!oldest || blocks.front().freed_at < oldest->front().freed_at)) {
        oldest = &blocks;
        oldest_bytes = bytes;
      }
    evicted.push_back(oldest->front().data);
    oldest->pop_front();
    c.stats.cached_bytes -= oldest_bytes;
    ++c.stats.evictions;
  }
  return evicted;
}

}  // namespace

Storage::Storage(size_t bytes) : bytes_(block_bytes(bytes == 0 ? 1 : bytes)) {
  BlockCache& c = cache();
  const auto count_live = [&] {
    c.stats.live_bytes += bytes_;
    c.stats.peak_live_bytes = std::max(c.stats.peak_live_bytes, c.stats.live_bytes);
  };
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    auto it = c.free_blocks.find(bytes_);
    if (it != c.free_blocks.end() && !it->second.empty()) {
      data_ = it->second.back().data;
      it->second.pop_back();
      c.stats.cached_bytes -= bytes_;
      count_live();
      return;
    }
  }
  data_ = std::aligned_alloc(64, bytes_);  // outside the lock: the system may take its time
  if (!data_) {
    // Blocks of other sizes may hold what is missing, as PyTorch's allocator retries too.
    const size_t cached = allocator_stats().cached_bytes;
    release_cached_memory();
    data_ = std::aligned_alloc(64, bytes_);
    if (!data_)
      throw OutOfMemory(str_cat("out of memory allocating ", bytes_, " bytes (after returning ",
                                cached, " cached bytes to the system)"));
  }
  // Pages this request leaves untouched would fault in later, in a training step, when a larger
  // request of the class reuses the block: 100 faults a policy-train step (against 12) with the
  // products on OpenBLAS and tcmalloc keeping its pages, until each block had served its class's
  // largest request.
  volatile char* block = static_cast<char*>(data_);
  for (size_t at = bytes; at < bytes_; at += 4096) block[at] = 0;
  block[bytes_ - 1] = 0;
  std::lock_guard<std::mutex> lock(c.mutex);
  ++c.stats.system_allocs;
  count_live();
}

Storage::~Storage() {
  BlockCache& c = cache();
  std::vector<void*> evicted;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    c.stats.live_bytes -= bytes_;
    c.stats.cached_bytes += bytes_;
    c.free_blocks[bytes_].push_back({c.frees++, data_});
    if (c.stats.cached_bytes > cache_limit(c.stats)) evicted = evict_over_limit(c);
  }
  for (void* p : evicted) std::free(p);  // outside the lock: giving pages back takes time
}

AllocatorStats allocator_stats() {
  std::lock_guard<std::mutex> lock(cache().mutex);
  AllocatorStats stats = cache().stats;
  stats.cache_limit_bytes = cache_limit(stats);
  return stats;
}

void release_cached_memory() {
  BlockCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  for (auto& [size, blocks] : c.free_blocks)
    for (const FreeBlock& b : blocks) std::free(b.data);
  c.free_blocks.clear();
  c.stats.cached_bytes = 0;
}

void check_float(const Tensor& t, const char* op) {
  MMDIT_CHECK(is_floating(t.dtype()), op, ": expected a float32 or float64 tensor, got ",
              dtype_name(t.dtype()), " of shape ", shape_str(t.shape()));
}

Shape unravel_index(int64_t flat, const Shape& shape) {
  const int64_t n = shape_numel(shape);
  MMDIT_CHECK(flat >= 0 && flat < n, "unravel_index: index ", flat, " is outside the ", n,
              " elements of shape ", shape_str(shape));
  Shape index(shape.size());
  for (size_t d = shape.size(); d-- > 0;) {
    index[d] = shape[d] ? flat % shape[d] : 0;
    flat = shape[d] ? flat / shape[d] : 0;
  }
  return index;
}

namespace {

// x * 0 is 0 for a finite x and NaN otherwise, so a block's products sum to 0 exactly when all
// of it is finite: a loop that vectorises, at memory speed on checkpoints of 10^8 numbers.
template <class T>
inline bool block_is_finite_impl(const T* __restrict x, int64_t n) {
  T acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += x[i + j] * T(0);
  for (; i < n; ++i) acc[0] += x[i] * T(0);
  T sum = 0;
  for (T a : acc) sum += a;
  return sum == 0;
}
MMDIT_SIMD_CLONES bool block_is_finite(const float* x, int64_t n) {
  return block_is_finite_impl(x, n);
}
MMDIT_SIMD_CLONES bool block_is_finite(const double* x, int64_t n) {
  return block_is_finite_impl(x, n);
}

template <class T>
std::optional<int64_t> first_non_finite_index(const T* x, int64_t n) {
  constexpr int64_t kBlock = 4096;
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    const int64_t end = std::min(n, begin + kBlock);
    if (block_is_finite(x + begin, end - begin)) continue;
    for (int64_t i = begin; i < end; ++i)
      if (!std::isfinite(x[i])) return i;
  }
  return std::nullopt;
}

}  // namespace

std::optional<NonFinite> first_non_finite(const Tensor& t) {
  if (!is_floating(t.dtype())) return std::nullopt;
  const Tensor c = raw::contiguous(t);
  const std::optional<int64_t> i = c.dtype() == DType::f32
                                       ? first_non_finite_index(c.data<float>(), c.numel())
                                       : first_non_finite_index(c.data<double>(), c.numel());
  if (!i) return std::nullopt;
  const double value =
      c.dtype() == DType::f32 ? static_cast<double>(c.data<float>()[*i]) : c.data<double>()[*i];
  return NonFinite{unravel_index(*i, t.shape()), value};
}

std::optional<NonFinite> first_overflow(const Tensor& t, DType dtype) {
  if (t.dtype() != DType::f64 || dtype != DType::f32) return std::nullopt;
  const Tensor c = raw::contiguous(t);
  const double* x = c.data<double>();
  for (int64_t i = 0; i < c.numel(); ++i)
    if (std::isfinite(x[i]) && !std::isfinite(static_cast<float>(x[i])))
      return NonFinite{unravel_index(i, t.shape()), x[i]};
  return std::nullopt;
}

// ---- Tensor ----
int64_t Tensor::size(int64_t axis) const {
  return shape()[normalize_axis(axis, shape(), "size")];
}

bool Tensor::is_contiguous() const {
  int64_t expected = 1;
  for (size_t i = shape().size(); i-- > 0;) {
    if (shape()[i] != 1 && strides()[i] != expected) return false;
    expected *= shape()[i];
  }
  return true;
}

double Tensor::item() const {
  MMDIT_CHECK(numel() == 1, "item: tensor of shape ", shape_str(shape()), " has ", numel(),
              " elements, expected 1");
  switch (dtype()) {
    case DType::f32:
      return *data<float>();
    case DType::f64:
      return *data<double>();
    case DType::boolean:
      return *data<bool>() ? 1.0 : 0.0;
  }
  return 0;
}

template <class T>
std::vector<T> Tensor::to_vector() const {
  Tensor c = raw::contiguous(*this);
  const int64_t n = c.numel();
  std::vector<T> out(n);
  auto convert = [&](auto* src) {
    using Src = std::remove_const_t<std::remove_pointer_t<decltype(src)>>;
    if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                  std::is_floating_point_v<Src>) {
      // Converting a float outside T's range (or NaN) to an integer is undefined behaviour.
      constexpr double low = std::is_signed_v<T>
                                 ? static_cast<double>(std::numeric_limits<T>::min())
                                 : -1.0;  // exclusive below, for unsigned
      constexpr double end = std::is_signed_v<T>
                                 ? -static_cast<double>(std::numeric_limits<T>::min())
                                 : static_cast<double>(std::numeric_limits<T>::max()) + 1.0;
      for (int64_t i = 0; i < n; ++i) {
        const double v = static_cast<double>(src[i]);
        const bool above_low = std::is_signed_v<T> ? v >= low : v > low;
        MMDIT_CHECK(above_low && v < end, "to_vector: element ", i, " (", v, ") of a ",
                    dtype_name(c.dtype()), " tensor of shape ", shape_str(shape()),
                    " does not fit the integer type");
        out[i] = static_cast<T>(src[i]);
      }
    } else {
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(src[i]);
    }
  };
  switch (c.dtype()) {
    case DType::f32:
      convert(c.data<float>());
      break;
    case DType::f64:
      convert(c.data<double>());
      break;
    case DType::boolean:
      convert(c.data<bool>());
      break;
  }
  return out;
}
template std::vector<float> Tensor::to_vector<float>() const;
template std::vector<double> Tensor::to_vector<double>() const;
template std::vector<bool> Tensor::to_vector<bool>() const;
template std::vector<int64_t> Tensor::to_vector<int64_t>() const;
template std::vector<uint8_t> Tensor::to_vector<uint8_t>() const;

// ---- creation ----
Tensor empty(const Shape& shape, DType dtype) {
  for (int64_t d : shape)
    MMDIT_CHECK(d >= 0, "empty: negative dimension in shape ", shape_str(shape));
  const int64_t numel = shape_numel(shape);
  // Kernels address elements by byte offsets in int64: a larger size would wrap to a small
  // allocation that they then write past.
  const int64_t elem = static_cast<int64_t>(dtype_size(dtype));
  MMDIT_CHECK(numel <= std::numeric_limits<int64_t>::max() / elem, "empty: shape ",
              shape_str(shape), " of ", dtype_name(dtype),
              " needs more bytes than int64 can count");
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = std::make_shared<Storage>(static_cast<size_t>(numel * elem));
  impl->dtype = dtype;
  impl->shape = shape;
  impl->strides = contiguous_strides(shape);
  return Tensor(std::move(impl));
}

Tensor full(const Shape& shape, double value, DType dtype) {
  Tensor t = empty(shape, dtype);
  raw::fill(t, value);
  return t;
}
Tensor zeros(const Shape& shape, DType dtype) {
  Tensor t = empty(shape, dtype);
  std::memset(t.raw_data(), 0, t.nbytes());
  return t;
}
Tensor ones(const Shape& shape, DType dtype) {
  return full(shape, 1.0, dtype);
}
Tensor scalar(double value, DType dtype) {
  return full({}, value, dtype);
}
Tensor empty_like(const Tensor& t) {
  return empty(t.shape(), t.dtype());
}
Tensor zeros_like(const Tensor& t) {
  return zeros(t.shape(), t.dtype());
}

Tensor arange(int64_t n, DType dtype) {
  Tensor t = empty({n}, dtype);
  for (int64_t i = 0; i < n; ++i) {
    if (dtype == DType::f32)
      t.data<float>()[i] = static_cast<float>(i);
    else if (dtype == DType::f64)
      t.data<double>()[i] = static_cast<double>(i);
    else
      t.data<bool>()[i] = i != 0;
  }
  return t;
}

template <class T>
Tensor from_vector(const std::vector<T>& values, const Shape& shape) {
  MMDIT_CHECK(static_cast<int64_t>(values.size()) == shape_numel(shape),
              "from_vector: ", values.size(), " values do not fill shape ", shape_str(shape));
  Tensor t = empty(shape, dtype_of<T>());
  std::copy(values.begin(), values.end(), t.data<T>());
  return t;
}
template Tensor from_vector<float>(const std::vector<float>&, const Shape&);
template Tensor from_vector<double>(const std::vector<double>&, const Shape&);
template <>
Tensor from_vector<bool>(const std::vector<bool>& values, const Shape& shape) {
  MMDIT_CHECK(static_cast<int64_t>(values.size()) == shape_numel(shape),
              "from_vector: ", values.size(), " values do not fill shape ", shape_str(shape));
  Tensor t = empty(shape, DType::boolean);
  for (size_t i = 0; i < values.size(); ++i) t.data<bool>()[i] = values[i];
  return t;
}

Tensor from_vector(std::initializer_list<float> values, const Shape& shape) {
  return from_vector(std::vector<float>(values), shape);
}

Tensor from_vector(const std::vector<double>& values, const Shape& shape, DType dtype) {
  Tensor t = from_vector(values, shape);
  return dtype == DType::f64 ? t : raw::to_dtype(t, dtype);
}

Tensor make_view(const Tensor& base, const Shape& shape, const Shape& strides, int64_t offset) {
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = base.impl().storage;
  impl->dtype = base.dtype();
  impl->shape = shape;
  impl->strides = strides;
  impl->offset = offset;
  return Tensor(std::move(impl));
}

}  // namespace mmdit
