#include "tensor/random.h"

#include <algorithm>
#include <cfloat>
#include <cmath>

#include "tensor/parallel.h"

namespace mmdit {
namespace {

struct Block {
  uint32_t v[4];
};

// Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11).
Block philox(uint64_t key, uint64_t stream, uint64_t index) {
  uint32_t c[4] = {static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32),
                   static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32)};
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t{0xD2511F53} * c[0];
    const uint64_t p1 = uint64_t{0xCD9E8D57} * c[2];
    const uint32_t hi0 = p0 >> 32, lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = p1 >> 32, lo1 = static_cast<uint32_t>(p1);
    c[0] = hi1 ^ c[1] ^ k0;
    c[1] = lo1;
    c[2] = hi0 ^ c[3] ^ k1;
    c[3] = lo0;
    k0 += 0x9E3779B9;
    k1 += 0xBB67AE85;
  }
  return {{c[0], c[1], c[2], c[3]}};
}

// A double in (0, 1), never exactly 0 (log(u) must be finite).
double unit(uint32_t hi, uint32_t lo) {
  const uint64_t bits = (uint64_t{hi} << 32 | lo) >> 11;
  return (static_cast<double>(bits) + 0.5) * 0x1.0p-53;
}

template <class Fill>
Tensor generate(const Shape& shape, DType dtype, const char* what, Fill fill) {
  MMDIT_CHECK(is_floating(dtype), "Rng::", what, ": dtype must be float32 or float64, got ",
              dtype_name(dtype));
  Tensor t = empty(shape, dtype);
  const int64_t n = t.numel();
  auto run = [&](auto* out) {
    parallel_for((n + 1) / 2, 40, [&](int64_t pair) {
      double v[2];
      fill(pair, v);
      out[2 * pair] = static_cast<std::remove_reference_t<decltype(*out)>>(v[0]);
      if (2 * pair + 1 < n)
        out[2 * pair + 1] = static_cast<std::remove_reference_t<decltype(*out)>>(v[1]);
    });
  };
  if (dtype == DType::f32)
    run(t.data<float>());
  else
    run(t.data<double>());
  return t;
}

}  // namespace

Tensor Rng::normal(const Shape& shape, DType dtype, double mean, double stddev) {
  // A negative or NaN stddev would give values, not an error (NumPy's normal rejects them).
  MMDIT_CHECK(std::isfinite(mean) && std::isfinite(stddev) && stddev >= 0,
              "Rng::normal: mean must be finite and stddev finite and non-negative, got mean ",
              mean, " and stddev ", stddev, " (shape ", shape_str(shape), ")");
  // Beyond float32's range a draw is stored as inf. The farthest draw is |mean| + r_max stddev,
  // r_max = sqrt(-2 log u) of the smallest u that unit() gives, 2^-54: 8.65.
  static const double max_radius = std::sqrt(-2.0 * std::log(0x1.0p-54));
  const double range = dtype == DType::f32 ? FLT_MAX : DBL_MAX;
  MMDIT_CHECK(std::abs(mean) + max_radius * stddev <= range, "Rng::normal: mean ", mean,
              " and stddev ", stddev, " give draws outside ", dtype_name(dtype),
              "'s range (they reach |mean| + 8.65 stddev) (shape ", shape_str(shape), ")");
  const uint64_t key = seed_, stream = counter_++;
  return generate(shape, dtype, "normal", [=](int64_t pair, double* v) {
    const Block b = philox(key, stream, static_cast<uint64_t>(pair));
    const double r = std::sqrt(-2.0 * std::log(unit(b.v[0], b.v[1])));
    const double theta = 2.0 * M_PI * unit(b.v[2], b.v[3]);
    v[0] = mean + stddev * r * std::cos(theta);
    v[1] = mean + stddev * r * std::sin(theta);
  });
}

Tensor Rng::uniform(const Shape& shape, DType dtype, double low, double high) {
  // Infinite bounds make low + (high - low) u NaN; with low > high the cap below would pile the
  // values onto low.
  MMDIT_CHECK(std::isfinite(low) && std::isfinite(high) && low <= high,
              "Rng::uniform: bounds must be finite with low <= high, got low ", low, " and high ",
              high, " (shape ", shape_str(shape), ")");
  // Beyond float32's range every draw would be stored as +-FLT_MAX or inf.
  MMDIT_CHECK(dtype != DType::f32 || (std::abs(low) <= FLT_MAX && std::abs(high) <= FLT_MAX),
              "Rng::uniform: bounds low ", low, " and high ", high,
              " are outside float32's range (shape ", shape_str(shape), ")");
  // Past double's range, high - low is inf and every draw would be capped at the top.
  MMDIT_CHECK(std::isfinite(high - low), "Rng::uniform: the width high - low of bounds low ", low,
              " and high ", high, " overflows double (shape ", shape_str(shape), ")");
  const uint64_t key = seed_, stream = counter_++;
  // low + (high - low) * u can round up to high (in double rarely; once stored as float32 for
  // every u > 1 - 2^-25), so cap at the largest value of the dtype below high: [low, high).
  double top = std::nextafter(high, -INFINITY);
  if (dtype == DType::f32) {
    float f = static_cast<float>(high);
    if (static_cast<double>(f) >= high) f = std::nextafter(f, -INFINITY);
    top = f;
  }
  top = std::max(top, low);
  return generate(shape, dtype, "uniform", [=](int64_t pair, double* v) {
    const Block b = philox(key, stream, static_cast<uint64_t>(pair));
    v[0] = std::min(low + (high - low) * unit(b.v[0], b.v[1]), top);
    v[1] = std::min(low + (high - low) * unit(b.v[2], b.v[3]), top);
  });
}

uint64_t Rng::next_u64() {
  const Block b = philox(seed_, counter_++, ~uint64_t{0});
  return uint64_t{b.v[0]} << 32 | b.v[1];
}

Rng Rng::split() {
  return Rng(next_u64());
}

}  // namespace mmdit
