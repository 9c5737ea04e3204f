// Parity cases: run one of the reference's recorded cases (../shared/spec/parity.md) and compare
// every expected tensor. This is how a model ported from JAX or PyTorch is checked.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "mmdit/incontext.h"
#include "mmdit/mmdit.h"
#include "tensor/tensor.h"
#include "train/policy.h"

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

// The hyperparameters a parity case's model was recorded with (its config metadata); the case
// must be of that model's kind.
PolicyConfig parity_policy_config(const std::string& path);  // bc_train_step, bc_sample
MMDiTConfig parity_mmdit_config(const std::string& path);
InContextMMDiTConfig parity_incontext_config(const std::string& path);

}  // namespace mmdit
