#include "tools/cli/training_loop.h"

#include <sys/stat.h>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "tensor/parallel.h"
#include "train/plots.h"

namespace mmdit::cli {
namespace {

std::atomic<bool> g_interrupted{false};

extern "C" void on_sigint(int) {
  g_interrupted = true;
}

// Appends to the metrics CSV; a resumed run continues the same file.
class MetricsCsv {
 public:
  explicit MetricsCsv(const std::string& path) : path_(path) {
    struct stat st;
    const bool exists = ::stat(path.c_str(), &st) == 0 && st.st_size > 0;
    out_.open(path, std::ios::app);
    MMDIT_CHECK(out_.good(), "cannot write ", path, ": ", std::strerror(errno));
    if (!exists) out_ << "step,loss,grad_norm,lr,steps_per_s\n";
  }
  void row(int64_t step, const StepStats& s, double rate) {
    out_ << step << ',' << s.loss << ',' << s.grad_norm << ',' << s.lr << ',' << rate << '\n';
  }
  void flush() { out_.flush(); }

 private:
  std::string path_;
  std::ofstream out_;
};

}  // namespace

std::string checkpoint_path(const std::string& out_dir) {
  return out_dir + "/checkpoint.safetensors";
}

void make_directory(const std::string& dir) {
  std::string partial;
  for (size_t i = 0; i <= dir.size(); ++i) {
    if (i == dir.size() || dir[i] == '/') {
      if (!partial.empty() && ::mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST)
        fail("cannot create directory ", partial, ": ", std::strerror(errno));
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
  MetricsCsv csv(options.out_dir + "/metrics.csv");
  const std::string ckpt = checkpoint_path(options.out_dir);
  g_interrupted = false;
  auto previous = std::signal(SIGINT, on_sigint);

  LoopResult result;
  const int64_t total = trainer.config().steps;
  const int64_t first = trainer.step();
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  auto window_start = start;
  int64_t window_steps = 0;
  double window_loss = 0;
  if (!options.quiet)
    std::printf("training %lld steps (from step %lld) on %d thread(s); Ctrl-C saves a checkpoint\n",
                (long long)total, (long long)first, num_threads());
  while (trainer.step() < total && !g_interrupted) {
    const StepStats s = trainer.train_step();
    const int64_t step = trainer.step();
    ++window_steps;
    window_loss += s.loss;
    result.losses.emplace_back(step, s.loss);
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    const double rate = (step - first) / std::max(elapsed, 1e-9);
    csv.row(step, s, rate);
    if (step % options.log_every == 0 || step == total) {
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
    if (options.checkpoint_every > 0 && step % options.checkpoint_every == 0)
      trainer.save_checkpoint(ckpt);
  }
  std::signal(SIGINT, previous);
  result.interrupted = g_interrupted;
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  csv.flush();
  trainer.save_checkpoint(ckpt);
  if (result.interrupted)
    std::printf("interrupted at step %lld: checkpoint saved to %s (continue with --resume %s)\n",
                (long long)trainer.step(), ckpt.c_str(), ckpt.c_str());
  else if (!options.quiet)
    std::printf("trained to step %lld in %s; checkpoint: %s\n", (long long)trainer.step(),
                format_duration(result.seconds).c_str(), ckpt.c_str());
  if (!result.losses.empty())
    write_loss_curve_svg(options.out_dir + "/loss.svg", result.losses, "training loss");
  return result;
}

}  // namespace mmdit::cli
