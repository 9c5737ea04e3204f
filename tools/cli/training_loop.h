// The loop around Trainer::train_step shared by `mmdit train` and `mmdit demo`: progress lines,
// metrics CSV, periodic checkpoints and one when a signal stops it, validation, the loss curve.
#pragma once

#include <string>

#include "train/plots.h"
#include "train/trainer.h"

namespace mmdit::cli {

struct LoopOptions {
  std::string out_dir;  // checkpoint.safetensors, metrics.csv, loss.svg go here
  // A resumed run whose checkpoint is in out_dir keeps the logs' rows up to its step there;
  // anywhere else its logs start afresh, so that they never mix two runs.
  bool continues_run_in_out_dir = false;
  int64_t log_every = 100;
  int64_t checkpoint_every = 0;  // 0: only at the end (and on Ctrl-C or SIGTERM)
  bool quiet = false;
  // How a stopped run is continued, before its --resume: "mmdit train --data X" where the command
  // that ran it has no --resume (demo); empty, --resume alone.
  std::string continue_command = {};
  // Held-out demonstrations: every validate_every steps and at the end, the EMA policy's
  // open-loop action error on validation_windows of their windows (action_error with batches of
  // 64; the windows' seed and the noise's Rng are the config's seed, so every row uses the same),
  // printed and written to val.csv.
  const Episodes* validation = nullptr;
  int64_t validate_every = 1000;
  int64_t validation_windows = 256;
};

struct LoopResult {
  int stop_signal = 0;  // the signal that stopped the run early (SIGINT, SIGTERM, ...), else 0
  // From the first step on: a resumed run's earlier steps come from metrics.csv.
  LossHistory losses;
  double seconds = 0;  // this run's
};

// Trains until config().steps and saves a checkpoint. Ctrl-C, SIGTERM, SIGHUP or SIGPIPE stops it
// after the current step, and saves too. A step that throws (a non-finite loss) stops it without
// saving, so the last checkpoint stays as it was; the error says which that is.
LoopResult run_training(Trainer& trainer, const LoopOptions& options);

std::string checkpoint_path(const std::string& out_dir);
void make_directory(const std::string& dir);
std::string format_duration(double seconds);

}  // namespace mmdit::cli
