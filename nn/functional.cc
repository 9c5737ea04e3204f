#include "nn/functional.h"

#include <cfloat>
#include <cmath>
#include <map>
#include <mutex>
#include <tuple>

namespace mmdit::nn {

Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  return linear_fused(x, weight, bias);  // matmul(x, transpose(weight, 0, 1)) + bias
}

Tensor layer_norm(const Tensor& x, double eps) {
  Tensor centered = x - mean(x, {-1}, true);
  return centered * rsqrt(mean(square(centered), {-1}, true) + eps);
}

Tensor rms_norm(const Tensor& x, const Tensor& gamma, double eps) {
  return rms_norm_fused(x, gamma, eps);  // x * rsqrt(mean(square(x), {-1}, true) + eps) * gamma
}

Tensor timestep_embedding(const Tensor& t, int64_t dim, double max_period) {
  MMDIT_CHECK(t.dim() <= 1, "timestep_embedding: timestep must be () or (B,), got ",
              shape_str(t.shape()));
  MMDIT_CHECK(dim >= 1, "timestep_embedding: dim must be positive, got ", dim);
  // log(max_period) of 0, a negative or an infinite period makes every frequency NaN (the
  // reference's math.log raises for the first two).
  MMDIT_CHECK(max_period > 0 && std::isfinite(max_period),
              "timestep_embedding: max_period must be positive and finite, got ", max_period);
  const int64_t half = dim / 2;
  // Computed in a tensor, not a std::vector: an absurd dim then ends in OutOfMemory, which names
  // the size, rather than std::bad_alloc.
  const Tensor f = empty({half}, DType::f64);
  for (int64_t j = 0; j < half; ++j)
    f.data<double>()[j] = std::exp(-std::log(max_period) * j / half);
  const Tensor freqs = raw::to_dtype(f, t.dtype());
  const Tensor args = unsqueeze(t, -1) * freqs;
  std::vector<Tensor> parts = {cos(args), sin(args)};
  if (dim % 2) {
    Shape pad = args.shape();
    pad.back() = 1;
    parts.push_back(zeros(pad, t.dtype()));
  }
  return concat(parts, -1);
}

Tensor sincos_table(int64_t dim, int64_t length, DType dtype) {
  return timestep_embedding(raw::to_dtype(arange(length, DType::f64), dtype), dim);
}

namespace {

RopeTables compute_rope_tables(int64_t seq, int64_t dim_head, DType dtype) {
  const int64_t half = dim_head / 2;
  // In tensors rather than std::vectors, as in timestep_embedding.
  const Tensor cos_table = empty({seq, dim_head}, DType::f64),
               sin_table = empty({seq, dim_head}, DType::f64);
  double *c = cos_table.data<double>(), *s = sin_table.data<double>();
  for (int64_t p = 0; p < seq; ++p)
    for (int64_t j = 0; j < half; ++j) {
      const double angle = p / std::pow(10000.0, 2.0 * j / dim_head);
      c[p * dim_head + j] = c[p * dim_head + j + half] = std::cos(angle);
      s[p * dim_head + j] = s[p * dim_head + j + half] = std::sin(angle);
    }
  return {raw::to_dtype(cos_table, dtype), raw::to_dtype(sin_table, dtype)};
}

}  // namespace

RopeTables rope_tables(int64_t seq, int64_t dim_head, DType dtype) {
  MMDIT_CHECK(dim_head % 2 == 0, "rope: dim_head must be even, got ", dim_head);
  MMDIT_CHECK(is_floating(dtype), "rope: tables must be float32 or float64, got ",
              dtype_name(dtype));
  // Before the tables are allocated, whose own error would name neither rope nor these sizes.
  MMDIT_CHECK(seq >= 0 && dim_head >= 0, "rope: seq and dim_head must be non-negative, got seq ",
              seq, " and dim_head ", dim_head);
  shape_numel({seq, dim_head});  // throws if they cannot be counted
  // Every block of every forward asks for the same few tables: keep them (a sampler's 10 Euler
  // steps would otherwise spend a tenth of their serial time in pow, cos and sin).
  static std::mutex mutex;
  static std::map<std::tuple<int64_t, int64_t, DType>, RopeTables> cache;
  const auto key = std::make_tuple(seq, dim_head, dtype);
  std::lock_guard<std::mutex> lock(mutex);
  if (const auto found = cache.find(key); found != cache.end()) return found->second;
  if (cache.size() >= 64) cache.clear();
  return cache.emplace(key, compute_rope_tables(seq, dim_head, dtype)).first->second;
}

Tensor apply_rope(const Tensor& x, const Tensor& cos_table, const Tensor& sin_table) {
  MMDIT_CHECK(x.dim() >= 1 && x.shape().back() % 2 == 0, "apply_rope: input has shape ",
              shape_str(x.shape()), "; expected (..., seq, dim_head) with dim_head even");
  MMDIT_CHECK(cos_table.defined() && sin_table.defined() &&
                  cos_table.shape() == sin_table.shape() &&
                  raw::broadcasts_to(cos_table.shape(), x.shape()),
              "apply_rope: tables of shapes ",
              cos_table.defined() ? shape_str(cos_table.shape()) : "undefined", " and ",
              sin_table.defined() ? shape_str(sin_table.shape()) : "undefined",
              " do not broadcast to the input's ", shape_str(x.shape()),
              "; expected one (seq, dim_head) shape");
  const int64_t half = x.shape().back() / 2;
  const Tensor rotated = concat({-narrow(x, -1, half, half), narrow(x, -1, 0, half)}, -1);
  return x * cos_table + rotated * sin_table;
}

Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask) {
  MMDIT_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: q, k, v have shapes ",
              shape_str(q.shape()), ", ", shape_str(k.shape()), ", ", shape_str(v.shape()),
              "; expected (B, H, T, d)");
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.shape().back()));
  Tensor logits = matmul(q, transpose(k, -1, -2)) * scale;
  if (mask.defined()) {
    const int64_t T = q.shape()[2];
    MMDIT_CHECK(
        mask.dtype() == DType::boolean && (mask.shape() == Shape({T, k.shape()[2]}) ||
                                           mask.shape() == Shape({q.shape()[0], T, k.shape()[2]})),
        "attention: mask has shape ", shape_str(mask.shape()), " and dtype ",
        dtype_name(mask.dtype()), "; expected bool (", T, ",", k.shape()[2], ") or (", q.shape()[0],
        ",", T, ",", k.shape()[2], ")");
    const Tensor m = mask.dim() == 3 ? unsqueeze(mask, 1) : mask;
    logits = where(m, logits, scalar(-0.7 * FLT_MAX, logits.dtype()));
  }
  return matmul(softmax(logits, -1), v);
}

}  // namespace mmdit::nn
