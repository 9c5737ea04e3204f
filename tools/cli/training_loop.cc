#include "tools/cli/training_loop.h"

#include <sys/stat.h>
#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>

#include "tensor/file_io.h"
#include "tensor/parallel.h"
#include "tools/cli/commands.h"
#include "train/plots.h"

namespace mmdit::cli {
namespace {

// SIGINT (Ctrl-C), SIGTERM (what schedulers and `docker stop` send), SIGHUP (the terminal or ssh
// session closed) and SIGPIPE (stdout was a pipe whose reader left) each stop the loop after the
// current step, which then saves a checkpoint: killed by one, the run lost every step since its
// last checkpoint.
std::atomic<int> g_stop_signal{0};

// A second signal, when a step or a save takes long, stops the program at once (the default
// action): the last checkpoint on disk is kept. A SIGPIPE after the first stop is not a second
// one: it comes from the program's own writes to the closed pipe (its stop message on a stderr
// that shares the pipe), and the run is still finishing its save.
extern "C" void on_stop_signal(int signal) {
  if (g_stop_signal != 0 && signal == SIGPIPE) return;
  if (g_stop_signal != 0) {
    std::signal(signal, SIG_DFL);
    std::raise(signal);
    return;
  }
  g_stop_signal = signal;
}

// A CSV file of one row per step, first field the step. A fresh run starts it anew. A run
// resumed in its own directory keeps the rows up to its checkpoint's step, dropping any that a
// run which stopped after its last checkpoint wrote, and appends.
class StepCsv {
 public:
  StepCsv(const std::string& path, const std::string& header, int64_t resumed_step) : path_(path) {
    std::string kept = header + "\n";
    struct stat st;
    if (resumed_step > 0 && ::stat(path.c_str(), &st) == 0) {
      std::istringstream in(read_file(path));
      std::string line;
      std::getline(in, line);
      MMDIT_CHECK(line == header, path, ": not a file of this program (first line '", line,
                  "', expected '", header, "'); move it away to resume into this directory");
      while (std::getline(in, line)) {
        int64_t step = 0;
        if (std::sscanf(line.c_str(), "%" SCNd64 ",", &step) != 1 || step > resumed_step ||
            std::count(line.begin(), line.end(), ',') !=
                std::count(header.begin(), header.end(), ','))
          continue;  // a row cut short by a kill, or past the checkpoint
        kept_rows_.push_back(line);
        kept += line + "\n";
      }
    }
    write_file_atomically(path, kept);
    out_.open(path, std::ios::app);
    MMDIT_CHECK(out_.good(), "cannot write ", path, ": ", std::strerror(errno));
  }
  const std::vector<std::string>& kept_rows() const { return kept_rows_; }
  template <class... Fields>
  void row(const Fields&... fields) {
    const char* sep = "";
    ((out_ << sep << fields, sep = ","), ...);
    out_ << '\n';
  }
  // Training goes on when the disk fills, and the checkpoint's own save reports it; a dropped
  // row is said once.
  void flush() {
    out_.flush();
    if (!out_.good() && !warned_) {
      std::fprintf(stderr, "warning: cannot write %s (%s); its rows are being lost\n",
                   path_.c_str(), std::strerror(errno));
      warned_ = true;
    }
  }

 private:
  std::string path_;
  std::ofstream out_;
  std::vector<std::string> kept_rows_;
  bool warned_ = false;
};

// Installs the stop handlers for its lifetime and puts the previous ones back, also when a step
// throws.
class StopSignals {
 public:
  // A signal ignored on entry stays ignored: under nohup, a closed terminal must not stop it.
  StopSignals() {
    g_stop_signal = 0;
    for (size_t i = 0; i < kSignals.size(); ++i) {
      previous_[i] = std::signal(kSignals[i], on_stop_signal);
      if (previous_[i] == SIG_IGN) std::signal(kSignals[i], SIG_IGN);
    }
  }
  ~StopSignals() {
    for (size_t i = 0; i < kSignals.size(); ++i) std::signal(kSignals[i], previous_[i]);
  }
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

 private:
  static constexpr std::array<int, 4> kSignals = {SIGINT, SIGTERM, SIGHUP, SIGPIPE};
  std::array<void (*)(int), kSignals.size()> previous_{};
};

const char* stop_signal_name(int signal) {
  switch (signal) {
    case SIGINT:
      return "Ctrl-C";
    case SIGTERM:
      return "SIGTERM";
    case SIGHUP:
      return "SIGHUP (the terminal closed)";
    case SIGPIPE:
      return "SIGPIPE (standard output closed)";
    default:
      return "a signal";
  }
}

}  // namespace

std::string checkpoint_path(const std::string& out_dir) {
  return path_in(out_dir, "checkpoint.safetensors");
}

void make_directory(const std::string& dir) {
  MMDIT_CHECK(!dir.empty(), "cannot create a directory with an empty name");
  std::string partial;
  for (size_t i = 0; i <= dir.size(); ++i) {
    if (i == dir.size() || dir[i] == '/') {
      if (!partial.empty() && ::mkdir(partial.c_str(), 0755) != 0) {
        if (errno != EEXIST) fail("cannot create directory ", partial, ": ", std::strerror(errno));
        struct stat st {};
        if (::stat(partial.c_str(), &st) == 0 && !S_ISDIR(st.st_mode))
          fail(partial, " is not a directory");
      }
    }
    if (i < dir.size()) partial += dir[i];
  }
}

std::string format_duration(double seconds) {
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%lldh%02lldm", (long long)(s / 3600),
                  (long long)(s % 3600 / 60));
  else if (s >= 60)
    std::snprintf(buf, sizeof buf, "%lldm%02llds", (long long)(s / 60), (long long)(s % 60));
  else
    std::snprintf(buf, sizeof buf, "%llds", (long long)s);
  return buf;
}

LoopResult run_training(Trainer& trainer, const LoopOptions& options) {
  make_directory(options.out_dir);
  for (const char* name :
       {"checkpoint.safetensors", "config.json", "metrics.csv", "val.csv", "loss.svg"})
    remove_stale_temp_files(path_in(options.out_dir, name));
  // The run's whole config, to read, edit and pass back with --config.
  write_file_atomically(path_in(options.out_dir, "config.json"), trainer.config().to_json() + "\n");
  const int64_t first = trainer.step();
  // The logs' rows up to here belong to this run only in the run's own directory.
  const int64_t kept_up_to = options.continues_run_in_out_dir ? first : 0;
  LoopResult result;
  StepCsv csv(path_in(options.out_dir, "metrics.csv"), "step,loss,grad_norm,lr,steps_per_s",
              kept_up_to);
  // The rows kept from before a resume are also the start of the loss curve.
  for (const std::string& row : csv.kept_rows()) {
    int64_t step = 0;
    double loss = 0;
    // A row edited out of order is left off the plot rather than stopping the run.
    if (std::sscanf(row.c_str(), "%" SCNd64 ",%lf", &step, &loss) == 2 &&
        (!result.losses.has_step() || step > result.losses.last_step()))
      result.losses.add(step, loss);
  }
  // val.csv follows the run as metrics.csv does, also when this run does not validate: a resumed
  // run drops the rows past its checkpoint, and a new run leaves no rows of an old one.
  const std::string val_path = path_in(options.out_dir, "val.csv");
  const char* val_header = "step,windows,mse,mse_now";
  std::optional<StepCsv> val_csv;
  struct stat val_stat;
  if (options.validation)
    val_csv.emplace(val_path, val_header, kept_up_to);
  else if (kept_up_to == 0)
    std::remove(val_path.c_str());
  else if (::stat(val_path.c_str(), &val_stat) == 0)
    StepCsv(val_path, val_header, kept_up_to);
  const auto validate = [&] {
    // The same windows and noise every time, so that the rows compare.
    Rng noise(trainer.config().seed);
    ActionError e;
    try {
      e = action_error(trainer.frozen_policy(), *options.validation, options.validation_windows, 64,
                       trainer.config().seed, noise);
    } catch (const Error& error) {
      // Training goes on (a held-out state far outside the training data's range can make the
      // actions overflow); the row says the step could not be validated.
      std::fprintf(stderr, "warning: validation at step %lld failed: %s\n",
                   (long long)trainer.step(), error.what());
      const double nan = std::numeric_limits<double>::quiet_NaN();
      e.mse = e.mse_now = nan;
    }
    val_csv->row(trainer.step(), e.windows, e.mse, e.mse_now);
    val_csv->flush();
    if (!options.quiet)
      std::printf("step %6lld  validation: action MSE %.6g (action for now %.6g) on %lld windows\n",
                  (long long)trainer.step(), e.mse, e.mse_now, (long long)e.windows);
  };
  const std::string ckpt = checkpoint_path(options.out_dir);
  int64_t saved_step = -1;  // the step of the checkpoint this run last wrote
  auto save = [&] {
    csv.flush();
    trainer.save_checkpoint(ckpt);
    saved_step = trainer.step();
  };
  const StopSignals stop_signals;

  const int64_t total = trainer.config().steps;
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  auto window_start = start;
  int64_t window_steps = 0;
  double window_loss = 0;
  if (!options.quiet)
    std::printf("training %lld steps (from step %lld) on %d thread(s) into %s; Ctrl-C saves it\n",
                (long long)total, (long long)first, num_threads(), ckpt.c_str());
  while (trainer.step() < total && g_stop_signal == 0) {
    StepStats s;
    try {
      s = trainer.train_step();
    } catch (const Error& e) {
      csv.flush();
      const std::string kept =
          saved_step >= 0
              ? str_cat("; the checkpoint of step ", saved_step, " in ", ckpt, " is kept")
          : first > 0 ? str_cat("; this run saved nothing after resuming at step ", first)
                      : std::string("; this run wrote no checkpoint");
      fail(e.what(), kept);
    }
    const int64_t step = trainer.step();
    ++window_steps;
    window_loss += s.loss;
    result.losses.add(step, s.loss);
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    const double rate = (step - first) / std::max(elapsed, 1e-9);
    csv.row(step, s.loss, s.grad_norm, s.lr, rate);
    // The first step's line shows at once that training runs, and at what loss it starts.
    if (step % options.log_every == 0 || step == total || step == first + 1) {
      const double window = std::chrono::duration<double>(Clock::now() - window_start).count();
      if (!options.quiet)
        std::printf("step %6lld/%lld  loss %.5f  grad norm %.3f  lr %.2e  %.1f steps/s  ETA %s\n",
                    (long long)step, (long long)total, window_loss / window_steps, s.grad_norm,
                    s.lr, window_steps / std::max(window, 1e-9),
                    format_duration((total - step) / std::max(rate, 1e-9)).c_str());
      std::fflush(stdout);
      csv.flush();
      window_start = Clock::now();
      window_steps = 0;
      window_loss = 0;
    }
    if (options.checkpoint_every > 0 && step % options.checkpoint_every == 0) save();
    if (options.validation && (step % options.validate_every == 0 || step == total)) validate();
  }
  result.stop_signal = g_stop_signal;
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (saved_step != trainer.step()) save();
  if (result.stop_signal != 0) {
    const std::string resume = "--resume " + shell_quoted(ckpt);
    const std::string how =
        options.continue_command.empty() ? resume : options.continue_command + " " + resume;
    // On stderr too when stdout is what went away.
    std::FILE* stream = result.stop_signal == SIGPIPE ? stderr : stdout;
    std::fprintf(stream, "stopped by %s at step %lld: checkpoint saved to %s (continue with %s)\n",
                 stop_signal_name(result.stop_signal), (long long)trainer.step(), ckpt.c_str(),
                 how.c_str());
  } else if (!options.quiet)
    std::printf("trained to step %lld in %s; checkpoint: %s\n", (long long)trainer.step(),
                format_duration(result.seconds).c_str(), ckpt.c_str());
  // The checkpoint is saved: a plot that cannot be written (a full disk) must not turn the run,
  // or a stop by signal, into a failure.
  if (result.losses.has_step()) {
    std::fflush(stdout);
    try {
      write_loss_curve_svg(path_in(options.out_dir, "loss.svg"), result.losses, "training loss");
    } catch (const Error& e) {
      std::fprintf(stderr, "warning: the loss plot was not written: %s\n", e.what());
    }
  }
  return result;
}

}  // namespace mmdit::cli
