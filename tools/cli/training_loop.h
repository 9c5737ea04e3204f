// The loop around Trainer::train_step shared by `mmdit train` and `mmdit demo`: progress lines,
// metrics CSV, periodic and Ctrl-C checkpoints, the loss curve.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "train/trainer.h"

namespace mmdit::cli {

struct LoopOptions {
  std::string out_dir;  // checkpoint.safetensors, metrics.csv, loss.svg go here
  int64_t log_every = 100;
  int64_t checkpoint_every = 0;  // 0: only at the end (and on Ctrl-C)
  bool quiet = false;
};

struct LoopResult {
  bool interrupted = false;
  std::vector<std::pair<int64_t, double>> losses;
  double seconds = 0;
};

// Trains until config().steps; Ctrl-C stops after the current step and saves a checkpoint.
LoopResult run_training(Trainer& trainer, const LoopOptions& options);

std::string checkpoint_path(const std::string& out_dir);
void make_directory(const std::string& dir);
std::string format_duration(double seconds);

}  // namespace mmdit::cli
