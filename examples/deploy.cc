// Running a trained policy from your own C++ control loop, as a robot controller would: load the
// checkpoint once, keep the last n_obs_steps observations, ask for an action chunk, execute the
// first few of its actions from "now" on, and ask again (receding horizon).
//
//   ./build/deploy                                   # trains a small policy first, then runs it
//   ./build/deploy runs/demo/flow/checkpoint.safetensors [--bf16]
//
// The "robot" is the built-in 2-D obstacle task (train/demo_task.h), so any checkpoint trained by
// `mmdit demo` works here; the loop is the one DemoTask::evaluate runs, written out for one
// episode at a time.
#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <string>
#include <vector>

#include "tensor/blas_core.h"
#include "train/demo_task.h"
#include "train/trainer.h"

using namespace mmdit;

namespace {

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

// So that the example runs without any file: a policy far smaller than `mmdit demo`'s (hidden
// 32, depth 2), trained just long enough to pass the obstacle, saved as `mmdit train` saves one.
std::string train_small_policy(const DemoTask& task) {
  const DemoTask::Demos demos = task.generate_demos(/*num_episodes=*/100, /*seed=*/0);
  const Episodes data{demos.states, demos.actions, demos.episode_starts};

  TrainConfig config;
  config.policy.n_obs_steps = 2;
  config.policy.state_dim = task.state_dim();
  config.policy.horizon = 16;
  config.policy.act_dim = task.act_dim();
  config.policy.hidden_size = 32;
  config.policy.depth = 2;
  config.policy.dim_cond = 32;
  config.policy.timestep_embed_dim = 16;
  config.policy.dim_head = 16;
  config.policy.heads = 2;
  config.policy.ff_mult = 2;
  config.steps = 800;
  config.lr = 1e-3;
  config.ema_decay = 0.99;  // the usual 0.999 would still be mostly the initialisation
  config.warmup_steps = 50;
  config.cosine_decay = true;
  config.grad_clip = 1.0;

  std::printf("no checkpoint given: training a small policy on the demo task (%lld steps)\n",
              (long long)config.steps);
  const auto start = Clock::now();
  Trainer trainer(config, data);
  while (trainer.step() < config.steps) trainer.train_step();
  const auto dir = std::filesystem::temp_directory_path() / "mmdit-deploy-example";
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "checkpoint.safetensors").string();
  trainer.save_checkpoint(path);
  std::printf("trained in %.1f s, saved %s\n\n", ms_since(start) / 1000, path.c_str());
  return path;
}

void run_controller(std::string checkpoint, WeightPrecision weights) {
  const DemoTask task;
  if (checkpoint.empty()) checkpoint = train_small_policy(task);

  // ---- what a deployed controller does ----
  // Once, at start-up: load the EMA weights (or the parameters, from a file `mmdit export
  // --no-ema` wrote). The sampler packs them for batch-1 products on its first call, so make that
  // call here rather than on the first control tick.
  const bool use_ema = read_checkpoint_info(checkpoint).holds_ema();
  const LoadedPolicy policy = load_policy(checkpoint, use_ema, weights);
  const PolicyConfig& pc = policy.config.policy;
  MMDIT_CHECK(pc.state_dim == task.state_dim() && pc.act_dim == task.act_dim(), checkpoint,
              " was not trained on the demo task (state_dim 2, act_dim 2)");
  Rng noise(0);  // act() draws the flow's starting noise from it
  auto warm_up = Clock::now();
  policy.act(zeros({1, pc.n_obs_steps, pc.state_dim}), noise);
  std::printf("loaded %s (step %lld, %s weights); first act() call %.1f ms (packs the weights)\n",
              checkpoint.c_str(), (long long)policy.step, precision_name(weights),
              ms_since(warm_up));

  // Training windows start their actions at the oldest observation, so in a chunk of `horizon`
  // actions the one for "now" is index n_obs_steps - 1 (the config guarantees horizon >=
  // n_obs_steps). Like `mmdit eval`, execute 8 from there.
  const int64_t now = pc.n_obs_steps - 1;
  const int64_t n_action_steps = std::min<int64_t>(8, pc.horizon - now);
  std::printf("executing actions [%lld, %lld) of each %lld-action chunk\n", (long long)now,
              (long long)(now + n_action_steps), (long long)pc.horizon);

  const int episodes = 5;
  const auto& c = task.config();
  Rng starts(1);
  const auto jitter = starts.uniform({episodes, 2}, DType::f64, -c.start_jitter, c.start_jitter)
                          .to_vector<double>();
  std::vector<double> latencies_ms;
  int successes = 0;
  for (int e = 0; e < episodes; ++e) {
    std::array<double, 2> pos = {c.start[0] + jitter[2 * e], c.start[1] + jitter[2 * e + 1]};
    // Oldest first; at the start the first observation fills the whole history.
    std::deque<std::array<double, 2>> history(pc.n_obs_steps, pos);
    DemoTask::Outcome outcome = DemoTask::Outcome::running;
    int64_t steps = 0;
    while (outcome == DemoTask::Outcome::running && steps < c.max_steps) {
      std::vector<float> obs;
      for (const auto& p : history) obs.insert(obs.end(), p.begin(), p.end());
      const auto tick = Clock::now();
      const Tensor chunk = policy.act(from_vector(obs, {1, pc.n_obs_steps, pc.state_dim}), noise);
      latencies_ms.push_back(ms_since(tick));
      const std::vector<float> actions = chunk.to_vector<float>();  // (1, horizon, act_dim)
      for (int64_t k = now; k < now + n_action_steps; ++k) {
        const float* action = &actions[k * pc.act_dim];
        outcome = task.step(pos, {action[0], action[1]});  // the robot moves
        ++steps;
        history.pop_front();
        history.push_back(pos);
        if (outcome != DemoTask::Outcome::running || steps == c.max_steps) break;
      }
    }
    if (outcome == DemoTask::Outcome::running) outcome = DemoTask::Outcome::timeout;
    successes += outcome == DemoTask::Outcome::success;
    std::printf("episode %d: start (%+.3f, %+.3f) -> %s after %lld steps\n", e,
                c.start[0] + jitter[2 * e], c.start[1] + jitter[2 * e + 1], outcome_name(outcome),
                (long long)steps);
  }

  std::sort(latencies_ms.begin(), latencies_ms.end());
  std::printf("%d of %d episodes reached the goal\n", successes, episodes);
  std::printf("act(): %zu calls, median %.2f ms, max %.2f ms\n", latencies_ms.size(),
              latencies_ms[latencies_ms.size() / 2], latencies_ms.back());
}

}  // namespace

int main(int argc, char** argv) {
  mmdit::use_the_best_openblas_core(argv);  // before OpenBLAS does any work
  const char* usage = "usage: deploy [CHECKPOINT] [--bf16]\n";
  std::string checkpoint;
  WeightPrecision weights = WeightPrecision::f32;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::printf("%s", usage);
      return 0;
    }
    if (arg == "--bf16") {
      weights = WeightPrecision::bf16;
    } else if (arg.starts_with("-") || !checkpoint.empty()) {
      std::fprintf(stderr, "deploy: unexpected argument '%s'\n%s", arg.c_str(), usage);
      return 2;
    } else {
      checkpoint = arg;
    }
  }
  // A controller reports a bad checkpoint and exits cleanly instead of aborting.
  try {
    run_controller(checkpoint, weights);
  } catch (const mmdit::Error& e) {
    std::fprintf(stderr, "deploy: %s\n", e.what());
    return 1;
  }
}
