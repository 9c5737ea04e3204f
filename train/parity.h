// Parity cases: run one of the reference's recorded cases (../shared/spec/parity.md) and compare
// every expected tensor. This is how a model ported from JAX or PyTorch is checked.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "tensor/tensor.h"

namespace mmdit {

struct ParityRow {
  std::string name;  // e.g. "output/0", "grad/param/blocks.0.to_cond.weight"
  Shape shape;
  double max_abs_error = 0;
  double rel_error = 0;  // max_abs_error / max |expected|
  bool pass = false;
};

struct ParityReport {
  std::string path, kind;
  DType dtype = DType::f32;
  double tolerance = 0;
  std::vector<ParityRow> rows;
  bool ok() const;
  std::string table() const;  // one line per row, then a summary line
};

// Default tolerance on the relative error: 1e-4 in f32, 1e-5 in f64 (parity.md).
double default_parity_tolerance(DType dtype);

ParityReport run_parity(const std::string& path, DType dtype,
                        std::optional<double> tolerance = std::nullopt);

}  // namespace mmdit
