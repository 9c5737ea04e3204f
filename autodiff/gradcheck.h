// Gradient checking: compares the tape's gradients with central differences in float64.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "tensor/named_tensors.h"

namespace mmdit {

struct GradcheckOptions {
  double eps = 1e-6;   // central-difference step
  double atol = 1e-7;  // pass when |analytic - numeric| <= atol + rtol * |numeric|
  double rtol = 1e-5;
  int64_t sample = -1;  // check this many random elements per tensor (-1: every element)
  uint64_t seed = 0;    // for the cotangent and the sampled elements
};

struct GradcheckResult {
  bool ok = true;
  int64_t checked = 0;  // elements compared
  // Elements whose analytic and numeric derivatives are both exactly 0: they pass whatever the
  // backward does, so a tensor with only such elements was not really checked.
  int64_t zero = 0;
  // The worst element: the largest |analytic - numeric| / tolerance.
  std::string name;
  Shape index;
  double analytic = 0, numeric = 0, tolerance = 0;
  double worst_ratio = 0;
  std::string report() const;  // one line
};

// f's output is reduced to a scalar with a fixed random cotangent, L = sum(f() * c), so every
// output element is exercised. `wrt` must be contiguous float64 tensors that f reads; they are
// perturbed in place and restored. An output computed from none of them is refused: the check
// would pass whatever the backward does.
GradcheckResult gradcheck(const std::function<Tensor()>& f, const NamedTensors& wrt,
                          const GradcheckOptions& options = {});

// Convenience for a function of explicit inputs (copied, so the caller's stay untouched).
GradcheckResult gradcheck(const std::function<Tensor(const std::vector<Tensor>&)>& f,
                          const std::vector<Tensor>& inputs, const GradcheckOptions& options = {});

}  // namespace mmdit
