#include "tensor/packed_weight.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "tensor/ops.h"
#include "tensor/parallel.h"
#include "tensor/simd.h"

namespace mmdit {

const char* precision_name(WeightPrecision p) {
  return p == WeightPrecision::f32 ? "f32" : "bf16";
}

WeightPrecision parse_precision(const std::string& name) {
  if (name == "f32" || name == "float32") return WeightPrecision::f32;
  if (name == "bf16" || name == "bfloat16") return WeightPrecision::bf16;
  MMDIT_CHECK(false, "unknown weight precision '", name, "' (expected f32 or bf16)");
  return WeightPrecision::f32;
}

// Without branches, so that loops over it vectorise (round_to_bf16).
uint16_t to_bf16(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const uint32_t nearest_even = bits + 0x7FFF + ((bits >> 16) & 1);
  const uint32_t quiet_nan = bits | 0x400000;  // a NaN stays a NaN, and a quiet one
  return static_cast<uint16_t>((x != x ? quiet_nan : nearest_even) >> 16);
}

float from_bf16(uint16_t b) {
  return std::bit_cast<float>(static_cast<uint32_t>(b) << 16);
}

namespace {
constexpr int64_t kPanel = 16;
int64_t panels_for(int64_t out) {
  return (out + kPanel - 1) / kPanel;
}
}  // namespace

PackedWeight::PackedWeight(const Tensor& weight, WeightPrecision precision)
    : precision_(precision) {
  MMDIT_CHECK(weight.dim() == 2 && weight.dtype() == DType::f32,
              "PackedWeight: expected a float32 weight (out, in), got ", dtype_name(weight.dtype()),
              " ", shape_str(weight.shape()));
  out_ = weight.shape()[0];
  in_ = weight.shape()[1];
  MMDIT_CHECK(out_ > 0 && in_ > 0, "PackedWeight: empty weight ", shape_str(weight.shape()));
  const Tensor w = raw::contiguous(weight);
  const float* src = w.data<float>();
  const int64_t panels = panels_for(out_);
  // Columns past `out` in the last panel are zeros: the kernels compute them and never store them.
  if (precision_ == WeightPrecision::f32) {
    f32_ = hwy::AllocateAligned<float>(static_cast<size_t>(panels * in_ * kPanel));
    float* dst = f32_.get();
    for (int64_t p = 0; p < panels; ++p)
      for (int64_t k = 0; k < in_; ++k)
        for (int64_t c = 0; c < kPanel; ++c, ++dst) {
          const int64_t n = p * kPanel + c;
          *dst = n < out_ ? src[n * in_ + k] : 0.0f;
        }
  } else {
    const int64_t pairs = (in_ + 1) / 2;
    bf16_ = hwy::AllocateAligned<uint16_t>(static_cast<size_t>(panels * pairs * 2 * kPanel));
    uint16_t* dst = bf16_.get();
    for (int64_t p = 0; p < panels; ++p)
      for (int64_t q = 0; q < pairs; ++q)
        for (int64_t c = 0; c < kPanel; ++c)
          for (int64_t e = 0; e < 2; ++e, ++dst) {
            const int64_t n = p * kPanel + c, k = 2 * q + e;
            *dst = n < out_ && k < in_ ? to_bf16(src[n * in_ + k]) : 0;
          }
  }
}

size_t PackedWeight::bytes() const {
  const auto panels = static_cast<size_t>(panels_for(out_));
  return precision_ == WeightPrecision::f32
             ? panels * static_cast<size_t>(in_) * kPanel * sizeof(float)
             : panels * static_cast<size_t>((in_ + 1) / 2) * 2 * kPanel * sizeof(uint16_t);
}

std::string packed_kernel_name(WeightPrecision precision) {
  if (precision == WeightPrecision::f32) return "float32 panels";
  return simd::use_bf16_dot_kernel() ? "bfloat16 vdpbf16ps, inputs rounded too"
                                     : "bfloat16 widened to float32";
}

// Three panels (48 columns) per work item: one AVX-512 register tile.
constexpr int64_t kPanelsPerItem = 3;

int64_t PackedWeight::items() const {
  return (panels_for(out_) + kPanelsPerItem - 1) / kPanelsPerItem;
}

int64_t PackedWeight::item_cost(int64_t rows) const {
  return 2 * rows * kPanelsPerItem * kPanel * in_;
}

size_t PackedWeight::panel_bytes() const {
  return bytes() / static_cast<size_t>(panels_for(out_));
}

PackedWeight::Input PackedWeight::input(const float* x, int64_t ldx, int64_t rows) const {
  Input in{x, ldx, rows, {}, nullptr, 0};
  if (precision_ == WeightPrecision::bf16 && simd::use_bf16_dot_kernel()) {
    in.ldxb = (in_ + 1) / 2 * 2;
    // Through the caching allocator: no page faults for a buffer reused every step.
    in.buffer = empty({(rows * in.ldxb + 1) / 2}, DType::f32);
    auto* xb = static_cast<uint16_t*>(in.buffer.raw_data());
    in.xb = xb;
    parallel_for(rows, 4 * in_, [&](int64_t r) {
      simd::to_bf16_rows(x + r * ldx, ldx, 1, in_, xb + r * in.ldxb, in.ldxb);
    });
  }
  return in;
}

void PackedWeight::multiply_items(const Input& in, int64_t first, int64_t last, float* y,
                                  int64_t ldy, simd::PrefetchSpan ahead) const {
  const int64_t begin = first * kPanelsPerItem,
                end = std::min(panels_for(out_), last * kPanelsPerItem);
  if (begin >= end) return;
  if (precision_ == WeightPrecision::f32)
    simd::gemm_packed_f32(in.x, in.ldx, in.rows, f32_.get(), in_, y, ldy, out_, begin, end, ahead);
  else if (in.xb != nullptr)
    simd::gemm_packed_bf16_dot(in.xb, in.ldxb, in.rows, bf16_.get(), in_, y, ldy, out_, begin, end,
                               ahead);
  else
    simd::gemm_packed_bf16(in.x, in.ldx, in.rows, bf16_.get(), in_, y, ldy, out_, begin, end,
                           ahead);
}

void PackedWeight::multiply(const float* x, int64_t ldx, int64_t rows, float* y,
                            int64_t ldy) const {
  if (rows <= 0) return;
  const Input in = input(x, ldx, rows);
  parallel_for(items(), item_cost(rows),
               [&](int64_t i) { multiply_items(in, i, i + 1, y, ldy, {}); });
  raw::add_matmul_flops(2 * rows * out_ * in_);
}

void PackedWeight::multiply_pair(const PackedWeight& wide, const float* x_wide, int64_t ld_wide,
                                 int64_t rows_wide, float* y_wide, int64_t ldy_wide,
                                 const PackedWeight& narrow, const float* x_narrow,
                                 int64_t ld_narrow, int64_t rows_narrow, float* y_narrow,
                                 int64_t ldy_narrow) {
  if (rows_wide <= 0 || rows_narrow <= 0) {
    wide.multiply(x_wide, ld_wide, rows_wide, y_wide, ldy_wide);
    narrow.multiply(x_narrow, ld_narrow, rows_narrow, y_narrow, ldy_narrow);
    return;
  }
  const Input a = wide.input(x_wide, ld_wide, rows_wide);
  const Input b = narrow.input(x_narrow, ld_narrow, rows_narrow);
  const int64_t items = wide.items(), items_b = narrow.items();
  const auto* bytes_b = static_cast<const char*>(narrow.data());
  const size_t panel_bytes_b = narrow.panel_bytes();
  const int64_t panels_b = panels_for(narrow.out_);
  // Item i of the wide product is followed by its share of the narrow one, whose weights it
  // fetched into L2 while its last row tile computed from cache.
  parallel_for(items, wide.item_cost(rows_wide) + narrow.item_cost(rows_narrow) * items_b / items,
               [&](int64_t i) {
                 const int64_t first = items_b * i / items, last = items_b * (i + 1) / items;
                 const int64_t p0 = first * kPanelsPerItem,
                               p1 = std::min(panels_b, last * kPanelsPerItem);
                 const simd::PrefetchSpan ahead{
                     bytes_b + p0 * panel_bytes_b,
                     p1 > p0 ? static_cast<int64_t>((p1 - p0) * panel_bytes_b / 64) : 0};
                 wide.multiply_items(a, i, i + 1, y_wide, ldy_wide, ahead);
                 narrow.multiply_items(b, first, last, y_narrow, ldy_narrow, {});
               });
  raw::add_matmul_flops(2 * rows_wide * wide.out_ * wide.in_ +
                        2 * rows_narrow * narrow.out_ * narrow.in_);
}

const void* PackedWeight::data() const {
  return precision_ == WeightPrecision::f32 ? static_cast<const void*>(f32_.get())
                                            : static_cast<const void*>(bf16_.get());
}

const PackedWeight& FrozenWeights::get(const Tensor& weight) {
  MMDIT_CHECK(weight.dim() == 2 && weight.dtype() == DType::f32,
              "FrozenWeights: expected a float32 weight (out, in), got ",
              dtype_name(weight.dtype()), " ", shape_str(weight.shape()));
  // The address alone is not the weight: a transposed or narrowed view starts at the same
  // element, and so would a new weight in a freed one's block, were the entry not holding it.
  const Key key{reinterpret_cast<uintptr_t>(weight.raw_data()), weight.shape()[0],
                weight.shape()[1], weight.strides()[0], weight.strides()[1]};
  const std::lock_guard lock(mutex_);
  auto it = packed_.find(key);
  if (it == packed_.end())
    it = packed_.emplace(key, Entry{weight, std::make_unique<PackedWeight>(weight, precision_)})
             .first;
  return *it->second.packed;
}

size_t FrozenWeights::bytes() const {
  const std::lock_guard lock(mutex_);
  size_t total = 0;
  for (const auto& [key, entry] : packed_) total += entry.packed->bytes();
  return total;
}

namespace {
thread_local FrozenWeights* current_frozen = nullptr;
}

UseFrozenWeights::UseFrozenWeights(FrozenWeights& weights) : previous_(current_frozen) {
  current_frozen = &weights;
}
UseFrozenWeights::~UseFrozenWeights() {
  current_frozen = previous_;
}

FrozenWeights* frozen_weights() {
  return current_frozen;
}

namespace {
MMDIT_SIMD_CLONES void round_to_bf16(const float* __restrict src, float* __restrict dst,
                                     int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_bf16(to_bf16(src[i]));
}
}  // namespace

namespace raw {
namespace {
// x (..., in) as contiguous rows, and the output (..., out) they will be multiplied into.
struct PackedOperand {
  const PackedWeight& weight;
  Tensor rows, y;
  int64_t count() const { return rows.shape()[0]; }
  void multiply() const {
    weight.multiply(rows.data<float>(), weight.in_features(), count(), y.data<float>(),
                    weight.out_features());
  }
};
PackedOperand packed_operand(const Tensor& x, const PackedWeight& weight, const char* who) {
  MMDIT_CHECK(x.dtype() == DType::f32 && x.dim() >= 1 && x.shape().back() == weight.in_features(),
              who, ": input ", dtype_name(x.dtype()), " ", shape_str(x.shape()),
              " does not end in the packed weight's in-features ", weight.in_features());
  Shape out_shape = x.shape();
  out_shape.back() = weight.out_features();
  return {weight, contiguous(reshape(x, {-1, weight.in_features()})), empty(out_shape, DType::f32)};
}
}  // namespace

Tensor matmul_packed(const Tensor& x, const PackedWeight& weight) {
  const PackedOperand operand = packed_operand(x, weight, "matmul_packed");
  operand.multiply();
  return operand.y;
}

std::array<Tensor, 2> matmul_packed_pair(const Tensor& x0, const PackedWeight& w0, const Tensor& x1,
                                         const PackedWeight& w1) {
  const PackedOperand a = packed_operand(x0, w0, "matmul_packed_pair");
  const PackedOperand b = packed_operand(x1, w1, "matmul_packed_pair");
  // Only a product of one register tile of rows is memory-bound, and only one of more rows has
  // a last row tile that computes from cache while the other's weights stream in.
  const auto wide_with = [](const PackedOperand& wide, const PackedOperand& narrow) {
    return wide.count() > simd::kPackedTileRows && narrow.count() <= simd::kPackedTileRows;
  };
  if (wide_with(a, b) || wide_with(b, a)) {
    const PackedOperand& wide = wide_with(a, b) ? a : b;
    const PackedOperand& narrow = wide_with(a, b) ? b : a;
    PackedWeight::multiply_pair(wide.weight, wide.rows.data<float>(), wide.weight.in_features(),
                                wide.count(), wide.y.data<float>(), wide.weight.out_features(),
                                narrow.weight, narrow.rows.data<float>(),
                                narrow.weight.in_features(), narrow.count(), narrow.y.data<float>(),
                                narrow.weight.out_features());
  } else {
    a.multiply();
    b.multiply();
  }
  return {a.y, b.y};
}

Tensor matmul_bf16_rounded(const Tensor& x, const Tensor& weight) {
  MMDIT_CHECK(weight.dim() == 2 && weight.dtype() == DType::f32 && x.dtype() == DType::f32 &&
                  x.dim() >= 1 && x.shape().back() == weight.shape()[1],
              "matmul_bf16_rounded: input ", dtype_name(x.dtype()), " ", shape_str(x.shape()),
              " and weight ", dtype_name(weight.dtype()), " ", shape_str(weight.shape()),
              "; expected float32 (..., in) and (out, in)");
  const Tensor w = contiguous(weight);
  Tensor rounded = empty(w.shape(), DType::f32);
  constexpr int64_t kBlock = 16384;
  const int64_t n = w.numel();
  parallel_for((n + kBlock - 1) / kBlock, 2 * kBlock, [&](int64_t block) {
    const int64_t begin = block * kBlock;
    round_to_bf16(w.data<float>() + begin, rounded.data<float>() + begin,
                  std::min(kBlock, n - begin));
  });
  const Tensor y = matmul(reshape(x, {-1, weight.shape()[1]}), transpose(rounded, 0, 1));
  Shape out_shape = x.shape();
  out_shape.back() = weight.shape()[0];
  return reshape(y, out_shape);
}
}  // namespace raw

}  // namespace mmdit
