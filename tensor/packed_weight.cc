#include "tensor/packed_weight.h"

#include <bit>
#include <cmath>
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

uint16_t to_bf16(float x) {
  uint32_t bits = std::bit_cast<uint32_t>(x);
  if (std::isnan(x)) return static_cast<uint16_t>((bits >> 16) | 0x40);  // stays a quiet NaN
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
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
  return simd::has_avx512_bf16() ? "bfloat16 vdpbf16ps, inputs rounded too"
                                 : "bfloat16 widened to float32";
}

void PackedWeight::multiply(const float* x, int64_t ldx, int64_t rows, float* y,
                            int64_t ldy) const {
  if (rows <= 0) return;
  const int64_t panels = panels_for(out_);
  // Three panels (48 columns) per work item: one AVX-512 register tile.
  const int64_t per_item = 3, items = (panels + per_item - 1) / per_item;
  const int64_t cost = 2 * rows * per_item * kPanel * in_;
  const auto columns = [&](int64_t i) {
    return std::pair{i * per_item, std::min(panels, (i + 1) * per_item)};
  };
  if (precision_ == WeightPrecision::f32) {
    parallel_for(items, cost, [&](int64_t i) {
      const auto [begin, end] = columns(i);
      simd::gemm_packed_f32(x, ldx, rows, f32_.get(), in_, y, ldy, out_, begin, end);
    });
  } else if (simd::has_avx512_bf16()) {
    const int64_t ldxb = (in_ + 1) / 2 * 2;
    // Through the caching allocator: no page faults for a buffer reused every step.
    const Tensor buffer = empty({(rows * ldxb + 1) / 2}, DType::f32);
    auto* xb = static_cast<uint16_t*>(buffer.raw_data());
    parallel_for(rows, 4 * in_, [&](int64_t r) {
      simd::to_bf16_rows(x + r * ldx, ldx, 1, in_, xb + r * ldxb, ldxb);
    });
    parallel_for(items, cost, [&](int64_t i) {
      const auto [begin, end] = columns(i);
      simd::gemm_packed_bf16_dot(xb, ldxb, rows, bf16_.get(), in_, y, ldy, out_, begin, end);
    });
  } else {
    parallel_for(items, cost, [&](int64_t i) {
      const auto [begin, end] = columns(i);
      simd::gemm_packed_bf16(x, ldx, rows, bf16_.get(), in_, y, ldy, out_, begin, end);
    });
  }
  raw::add_matmul_flops(2 * rows * out_ * in_);
}

const PackedWeight& FrozenWeights::get(const Tensor& weight) {
  const std::lock_guard lock(mutex_);
  const void* key = weight.raw_data();
  auto it = packed_.find(key);
  if (it == packed_.end())
    it = packed_.emplace(key, std::make_unique<PackedWeight>(weight, precision_)).first;
  const PackedWeight& p = *it->second;
  MMDIT_CHECK(p.out_features() == weight.shape()[0] && p.in_features() == weight.shape()[1],
              "FrozenWeights: a weight of shape ", shape_str(weight.shape()),
              " reuses the memory of a packed (", p.out_features(), ", ", p.in_features(),
              ") weight: the model changed while its weights were frozen");
  return p;
}

size_t FrozenWeights::bytes() const {
  const std::lock_guard lock(mutex_);
  size_t total = 0;
  for (const auto& [key, p] : packed_) total += p->bytes();
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

namespace raw {
Tensor matmul_packed(const Tensor& x, const PackedWeight& weight) {
  MMDIT_CHECK(x.dtype() == DType::f32 && x.dim() >= 1 && x.shape().back() == weight.in_features(),
              "matmul_packed: input ", dtype_name(x.dtype()), " ", shape_str(x.shape()),
              " does not end in the packed weight's in-features ", weight.in_features());
  const Tensor x2 = contiguous(reshape(x, {-1, weight.in_features()}));
  const int64_t rows = x2.shape()[0];
  Shape out_shape = x.shape();
  out_shape.back() = weight.out_features();
  Tensor y = empty(out_shape, DType::f32);
  weight.multiply(x2.data<float>(), weight.in_features(), rows, y.data<float>(),
                  weight.out_features());
  return y;
}
}  // namespace raw

}  // namespace mmdit
