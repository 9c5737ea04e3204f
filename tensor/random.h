// Seeded random numbers that do not depend on the thread count: element i of a draw is a pure
// function of (seed, stream counter, i), computed with the Philox-4x32-10 counter-based
// generator, so any thread may produce any element.
#pragma once

#include <cstdint>

#include "tensor/tensor.h"

namespace mmdit {

class Rng {
 public:
  explicit Rng(uint64_t seed = 0) : seed_(seed) {}
  uint64_t seed() const { return seed_; }
  // How many draws this generator has made; with the seed it is the whole state.
  uint64_t counter() const { return counter_; }
  void set_state(uint64_t seed, uint64_t counter) { seed_ = seed, counter_ = counter; }

  Tensor normal(const Shape& shape, DType dtype = DType::f32, double mean = 0, double stddev = 1);
  Tensor uniform(const Shape& shape, DType dtype = DType::f32, double low = 0, double high = 1);
  // An independent generator, e.g. one per data-loader worker.
  Rng split();
  uint64_t next_u64();

 private:
  uint64_t seed_;
  uint64_t counter_ = 0;
};

}  // namespace mmdit
