// A weight frozen for inference, repacked once for the products y = x W^T that sampling runs
// at every Euler step. At batch 1 these products have 2-16 rows, so each weight element is used
// a handful of times per read: the step is bound by how fast the weights stream from memory
// (84 MB of float32 per step for the reference policy) and by a kernel that keeps its
// accumulators in registers. The packed layout serves both: 16 output columns of W^T side by
// side, so the kernel broadcasts one input value and multiply-adds a whole row of outputs, with
// no horizontal sums; bfloat16 halves the bytes and, on CPUs with AVX-512 BF16, doubles the
// multiply-adds per instruction (vdpbf16ps).
#pragma once

#include <hwy/aligned_allocator.h>

#include <array>
#include <compare>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>

#include "tensor/simd.h"
#include "tensor/tensor.h"

namespace mmdit {

enum class WeightPrecision {
  f32,   // exact: the same products as the unpacked path, summed in another order
  bf16,  // weights rounded to bfloat16; inputs too where the kernel uses vdpbf16ps (AMD Zen 4/5,
         // or MMDIT_BF16_KERNEL=dot; simd.h)
};
const char* precision_name(WeightPrecision p);
WeightPrecision parse_precision(const std::string& name);  // "f32" | "bf16", else throws

class PackedWeight {
 public:
  // weight: (out, in) float32, the layout nn::Linear keeps.
  PackedWeight(const Tensor& weight, WeightPrecision precision);

  int64_t out_features() const { return out_; }
  int64_t in_features() const { return in_; }
  WeightPrecision precision() const { return precision_; }
  size_t bytes() const;

  // y (rows, out) = x (rows, in) W^T, both row-major float32 with row strides ldx, ldy.
  void multiply(const float* x, int64_t ldx, int64_t rows, float* y, int64_t ldy) const;

  // Two independent products in one pass, the same values as two multiply calls: a wide one
  // (many rows, bound by its multiply-adds) and a narrow one (a few rows, bound by the memory
  // that streams its weights), whose reads the first hides (packed_weight.cc).
  static void multiply_pair(const PackedWeight& wide, const float* x_wide, int64_t ld_wide,
                            int64_t rows_wide, float* y_wide, int64_t ldy_wide,
                            const PackedWeight& narrow, const float* x_narrow, int64_t ld_narrow,
                            int64_t rows_narrow, float* y_narrow, int64_t ldy_narrow);
  const void* data() const;  // the panels, bytes() long

 private:
  struct Input {  // x, and its bfloat16 copy for the vdpbf16ps kernel
    const float* x;
    int64_t ldx, rows;
    Tensor buffer;
    const uint16_t* xb;
    int64_t ldxb;
  };
  Input input(const float* x, int64_t ldx, int64_t rows) const;
  int64_t items() const;  // units of parallel work, a few panels each
  int64_t item_cost(int64_t rows) const;
  size_t panel_bytes() const;
  void multiply_items(const Input& in, int64_t first, int64_t last, float* y, int64_t ldy,
                      simd::PrefetchSpan ahead) const;

  int64_t out_, in_;
  WeightPrecision precision_;
  hwy::AlignedFreeUniquePtr<float[]> f32_;      // [panel][k][16]
  hwy::AlignedFreeUniquePtr<uint16_t[]> bf16_;  // [panel][k / 2][16][2]
};

// Which kernel packed products of this precision run on this CPU, for reports.
std::string packed_kernel_name(WeightPrecision precision);

// Rounds to the nearest bfloat16, ties to even (NaN stays NaN).
uint16_t to_bf16(float x);
float from_bf16(uint16_t b);

// Packed copies of the weights a forward pass multiplies by, made the first time each is used
// and kept while this object lives. It assumes the weights do not change meanwhile: it is for
// a frozen model (EulerSampler makes one). Each copy is found by the weight's view (address,
// shape, strides) and holds the weight's storage, so that no other tensor can be given the
// same address while the copy is kept.
class FrozenWeights {
 public:
  explicit FrozenWeights(WeightPrecision precision) : precision_(precision) {}
  WeightPrecision precision() const { return precision_; }
  // The packed form of `weight` (out, in) float32, packed now if this is its first use.
  const PackedWeight& get(const Tensor& weight);
  size_t bytes() const;

 private:
  struct Key {
    uintptr_t address;  // of the first element
    int64_t out, in, out_stride, in_stride;
    auto operator<=>(const Key&) const = default;
  };
  struct Entry {
    Tensor weight;  // keeps its storage, and so its address, taken
    std::unique_ptr<PackedWeight> packed;
  };
  WeightPrecision precision_;
  mutable std::mutex mutex_;
  std::map<Key, Entry> packed_;
};

// While alive, linear layers on this thread multiply float32 inputs by `weights`' packed copies;
// but a product the active tape records (its input or weight watched, or made by recorded ops)
// multiplies by the weight itself, as its backward does.
class UseFrozenWeights {
 public:
  explicit UseFrozenWeights(FrozenWeights& weights);
  ~UseFrozenWeights();
  UseFrozenWeights(const UseFrozenWeights&) = delete;
  UseFrozenWeights& operator=(const UseFrozenWeights&) = delete;

 private:
  FrozenWeights* previous_;
};

// The FrozenWeights in use on this thread, or null.
FrozenWeights* frozen_weights();

namespace raw {
// x (..., in) float32 times the packed weight's W^T: (..., out).
Tensor matmul_packed(const Tensor& x, const PackedWeight& weight);
// Two independent products, the same values as two matmul_packed calls. When one has at most a
// register tile of rows (memory-bound) and the other more (compute-bound), they run together
// (PackedWeight::multiply_pair); otherwise one after the other.
std::array<Tensor, 2> matmul_packed_pair(const Tensor& x0, const PackedWeight& w0, const Tensor& x1,
                                         const PackedWeight& w1);
// x (..., in) float32 times W^T, W (out, in) float32 rounded to bfloat16 first: the values of
// matmul_packed with W packed as bfloat16 by the widening kernel (not vdpbf16ps, which rounds x
// too), summed in another order, on the float32 sgemm. For products of many rows, bound by their
// multiply-adds, which the sgemm runs faster than the packed kernel.
Tensor matmul_bf16_rounded(const Tensor& x, const Tensor& weight);
}  // namespace raw

}  // namespace mmdit
