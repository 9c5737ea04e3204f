// mmdit train | sample | eval | info | demo: the policy's life cycle from the command line.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>

#include "tensor/parallel.h"
#include "tensor/print.h"
#include "tools/cli/commands.h"
#include "tools/cli/training_loop.h"
#include "train/dataset.h"
#include "train/demo_task.h"
#include "train/npy.h"
#include "train/plots.h"

namespace mmdit::cli {
namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  MMDIT_CHECK(in.good(), "cannot read ", path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The flags every training command shares; they override the config file.
struct TrainFlags {
  std::string config_file;
  std::optional<int64_t> steps, batch_size, seed;
  std::optional<double> lr;
  std::string objective;

  void add_to(CLI::App* cmd) {
    cmd->add_option("--config", config_file, "training config (JSON; keys of TrainConfig)");
    cmd->add_option("--steps", steps, "training steps");
    cmd->add_option("--batch-size", batch_size, "batch size");
    cmd->add_option("--lr", lr, "peak learning rate");
    cmd->add_option("--seed", seed, "random seed (initialisation, noise, data order)");
    cmd->add_option("--objective", objective, "flow (default) or mse, the regression baseline")
        ->check(CLI::IsMember({"flow", "mse"}));
  }
  TrainConfig apply(TrainConfig c) const {
    if (!config_file.empty()) c = TrainConfig::from_json(read_file(config_file), c);
    if (steps) c.steps = *steps;
    if (batch_size) c.batch_size = *batch_size;
    if (lr) c.lr = *lr;
    if (seed) c.seed = static_cast<uint64_t>(*seed);
    if (!objective.empty()) c.objective = objective;
    c.validate();
    return c;
  }
};

void set_threads(int threads) {
  if (threads > 0) set_num_threads(threads);
}

// The configuration `mmdit demo` trains: small enough for a few minutes on 2 cores.
TrainConfig demo_config(const DemoTask& task) {
  TrainConfig c;
  c.policy.n_obs_steps = 2;
  c.policy.state_dim = task.state_dim();
  c.policy.horizon = 16;
  c.policy.act_dim = task.act_dim();
  c.policy.hidden_size = 64;
  c.policy.depth = 3;
  c.policy.dim_cond = 64;
  c.policy.timestep_embed_dim = 32;
  c.policy.dim_head = 16;
  c.policy.heads = 4;
  c.policy.ff_mult = 2;
  c.steps = 3000;
  c.batch_size = 64;
  c.lr = 1e-3;
  c.weight_decay = 1e-6;
  c.ema_decay = 0.995;
  c.warmup_steps = 100;
  c.cosine_decay = true;
  c.grad_clip = 1.0;
  c.sample_steps = 10;
  return c;
}

DemoTask::EvalResult evaluate_policy(const DemoTask& task, const LoadedPolicy& policy,
                                     int64_t episodes, int64_t n_action_steps, uint64_t seed) {
  Rng rng(seed + 1);
  auto act = [&](const Tensor& obs) { return policy.act(obs, rng); };
  return task.evaluate(act, episodes, policy.config.policy.n_obs_steps, n_action_steps, seed);
}

void print_eval(const DemoTask::EvalResult& r) {
  std::printf("%lld episodes: %lld succeeded, %lld collided, %lld timed out\n",
              (long long)r.episodes, (long long)r.successes, (long long)r.collisions,
              (long long)r.timeouts);
  std::printf("success rate: %.0f%%\n", 100 * r.success_rate);
}

void add_train(CLI::App& app) {
  struct Options {
    TrainFlags flags;
    std::string data, out = "runs/train", resume, obs_keys = "state";
    int64_t log_every = 100, checkpoint_every = 1000;
    int threads = 0;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("train", "Train a flow-matching policy on demonstrations");
  o->flags.add_to(cmd);
  cmd->add_option("--data", o->data, "demonstrations: LeRobot-style .npz or robomimic .hdf5")
      ->required();
  cmd->add_option("--obs-keys", o->obs_keys,
                  "HDF5 observation keys, comma-separated (default: state)");
  cmd->add_option("--out", o->out, "output directory (checkpoint, metrics.csv, loss.svg)");
  cmd->add_option("--resume", o->resume, "continue from this checkpoint");
  cmd->add_option("--log-every", o->log_every, "progress line every N steps");
  cmd->add_option("--checkpoint-every", o->checkpoint_every,
                  "checkpoint every N steps (0: end only)");
  cmd->add_option("--threads", o->threads, "threads (default: OMP_NUM_THREADS or all cores)");
  cmd->callback([o] {
    set_threads(o->threads);
    std::vector<std::string> keys;
    std::stringstream ss(o->obs_keys);
    for (std::string k; std::getline(ss, k, ',');) keys.push_back(k);
    const Episodes data = load_episodes(o->data, keys);
    std::printf("data: %s, %lld episodes, %lld frames, state_dim %lld, act_dim %lld\n",
                o->data.c_str(), (long long)data.num_episodes(), (long long)data.states.shape()[0],
                (long long)data.state_dim(), (long long)data.act_dim());
    std::unique_ptr<Trainer> trainer;
    if (!o->resume.empty()) {
      trainer = Trainer::resume(o->resume, data);
      std::printf("resumed %s at step %lld\n", o->resume.c_str(), (long long)trainer->step());
    } else {
      TrainConfig defaults;
      defaults.policy.state_dim = data.state_dim();
      defaults.policy.act_dim = data.act_dim();
      trainer = std::make_unique<Trainer>(o->flags.apply(defaults), data);
    }
    std::printf("policy: %lld parameters\n", (long long)trainer->policy().num_parameters());
    make_directory(o->out);
    {
      std::ofstream cfg(o->out + "/config.json");
      cfg << trainer->config().to_json() << "\n";
    }
    const LoopResult r = run_training(*trainer, {o->out, o->log_every, o->checkpoint_every, false});
    if (r.interrupted) throw CLI::RuntimeError(130);
  });
}

void add_weights_option(CLI::App* cmd, std::string& weights) {
  cmd->add_option("--weights", weights,
                  "precision of the sampler's packed weights: f32, or bf16 (half the memory "
                  "traffic; README 'Speed' gives the accuracy change)")
      ->check(CLI::IsMember({"f32", "bf16"}));
}

void add_sample(CLI::App& app) {
  struct Options {
    std::string checkpoint, obs, obs_npy, out_npy;
    int64_t seed = 0;
    bool raw_params = false;
    std::string weights = "f32";
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("sample", "Sample an action chunk for observations");
  cmd->add_option("checkpoint", o->checkpoint, "checkpoint (.safetensors)")->required();
  cmd->add_option("--obs", o->obs,
                  "one observation history: n_obs*state_dim comma-separated numbers");
  cmd->add_option("--obs-npy", o->obs_npy, "observations (B, n_obs, state_dim) as .npy");
  cmd->add_option("--out-npy", o->out_npy, "write the actions (B, horizon, act_dim) here");
  cmd->add_option("--seed", o->seed, "noise seed");
  cmd->add_flag("--no-ema", o->raw_params, "use the raw parameters instead of the EMA");
  add_weights_option(cmd, o->weights);
  cmd->callback([o] {
    const LoadedPolicy policy =
        load_policy(o->checkpoint, !o->raw_params, parse_precision(o->weights));
    const PolicyConfig& pc = policy.config.policy;
    Tensor obs;
    if (!o->obs_npy.empty()) {
      obs = raw::to_dtype(load_npy(o->obs_npy), DType::f32);
    } else {
      MMDIT_CHECK(!o->obs.empty(), "sample: give --obs or --obs-npy");
      std::vector<float> v;
      std::stringstream ss(o->obs);
      for (std::string x; std::getline(ss, x, ',');) {
        try {
          v.push_back(std::stof(x));
        } catch (const std::exception&) {
          fail("sample: --obs: '", x, "' is not a number");
        }
      }
      MMDIT_CHECK(
          static_cast<int64_t>(v.size()) == pc.n_obs_steps * pc.state_dim, "sample: --obs has ",
          v.size(),
          " numbers; the policy needs n_obs_steps*state_dim = ", pc.n_obs_steps * pc.state_dim);
      obs = from_vector(v, {1, pc.n_obs_steps, pc.state_dim});
    }
    Rng rng(o->seed);
    const Tensor actions = policy.act(obs, rng);
    if (!o->out_npy.empty())
      save_npy(o->out_npy, actions);
    else
      std::printf("%s\n", to_string(actions).c_str());
  });
}

void add_eval(CLI::App& app) {
  struct Options {
    std::string checkpoint, svg;
    int64_t episodes = 100, n_action_steps = 8, seed = 1000;
    int threads = 0;
    std::string weights = "f32";
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("eval", "Closed-loop evaluation on the built-in demo task");
  cmd->add_option("checkpoint", o->checkpoint, "checkpoint (.safetensors)")->required();
  cmd->add_option("--episodes", o->episodes, "episodes to run");
  cmd->add_option("--n-action-steps", o->n_action_steps, "actions executed per chunk");
  cmd->add_option("--seed", o->seed, "seed of the start positions and noise");
  cmd->add_option("--svg", o->svg, "write the rollouts as SVG");
  cmd->add_option("--threads", o->threads, "threads");
  add_weights_option(cmd, o->weights);
  cmd->callback([o] {
    set_threads(o->threads);
    const LoadedPolicy policy = load_policy(o->checkpoint, true, parse_precision(o->weights));
    const DemoTask task;
    MMDIT_CHECK(policy.config.policy.state_dim == task.state_dim() &&
                    policy.config.policy.act_dim == task.act_dim(),
                "eval: the policy (state_dim ", policy.config.policy.state_dim, ", act_dim ",
                policy.config.policy.act_dim, ") was not trained on the demo task (state_dim ",
                task.state_dim(), ", act_dim ", task.act_dim(), ")");
    const auto r = evaluate_policy(task, policy, o->episodes, o->n_action_steps, o->seed);
    print_eval(r);
    if (!o->svg.empty())
      write_rollouts_svg(o->svg, task.config(), {}, r.trajectories, r.succeeded, "policy rollouts");
  });
}

void add_info(CLI::App& app) {
  auto path = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand("info", "Describe a checkpoint: config, parameters, step");
  cmd->add_option("checkpoint", *path, "checkpoint (.safetensors)")->required();
  cmd->callback([path] {
    const LoadedPolicy p = load_policy(*path);
    std::printf("checkpoint: %s\ntraining step: %lld\nconfig:\n%s\n", path->c_str(),
                (long long)p.step, p.config.to_json().c_str());
    std::map<std::string, int64_t> groups;
    std::vector<std::string> order;
    for (const auto& [name, t] : p.policy->named_parameters()) {
      // Group by module: mmdit.blocks.3.*, mmdit.timestep_embeds.0.*, state_encoder.*, ...
      std::string group = name.substr(0, name.find('.'));
      if (group == "mmdit") {
        const size_t second = name.find('.', 6);
        group = name.substr(0, second);
        if (group == "mmdit.blocks" || group == "mmdit.final_layers" ||
            group == "mmdit.timestep_embeds")
          group = name.substr(0, name.find('.', second + 1));
      }
      if (!groups.count(group)) order.push_back(group);
      groups[group] += t.numel();
    }
    std::printf("parameters per module:\n");
    for (const std::string& g : order)
      std::printf("  %-28s %10lld\n", g.c_str(), (long long)groups[g]);
    std::printf("  %-28s %10lld\n", "total", (long long)p.policy->num_parameters());
  });
}

void add_demo(CLI::App& app) {
  struct Options {
    TrainFlags flags;
    std::string out = "runs/demo";
    int64_t demos = 200, eval_episodes = 100, n_action_steps = 8;
    bool baseline = false;
    int threads = 0;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "demo", "Generate expert demonstrations of the 2-D obstacle task, train, evaluate");
  o->flags.add_to(cmd);
  cmd->add_option("--out", o->out, "output directory");
  cmd->add_option("--demos", o->demos, "expert episodes to generate");
  cmd->add_option("--eval-episodes", o->eval_episodes, "closed-loop evaluation episodes");
  cmd->add_option("--n-action-steps", o->n_action_steps, "actions executed per chunk");
  cmd->add_flag("--baseline", o->baseline,
                "also train the same network with plain MSE regression and evaluate it");
  cmd->add_option("--threads", o->threads,
                  "threads (default 1: the demo's model is so small that a second thread only "
                  "adds synchronisation)");
  cmd->callback([o] {
    set_threads(o->threads > 0 ? o->threads : 1);
    const DemoTask task;
    TrainConfig config = o->flags.apply(demo_config(task));
    const DemoTask::Demos demos = task.generate_demos(o->demos, config.seed);
    const Episodes data{demos.states, demos.actions, demos.episode_starts};
    make_directory(o->out);
    save_lerobot_npz(o->out + "/demos.npz", data);
    int left = 0;
    for (int s : demos.sides) left += s < 0;
    std::printf(
        "generated %lld expert demonstrations (%d pass left, %lld right, %lld frames): %s\n",
        (long long)o->demos, left, (long long)o->demos - left, (long long)demos.states.shape()[0],
        (o->out + "/demos.npz").c_str());

    auto train_and_eval = [&](TrainConfig cfg, const std::string& dir, const char* label) {
      std::printf("\n== %s ==\n", label);
      Trainer trainer(cfg, data);
      std::printf("policy: %lld parameters\n", (long long)trainer.policy().num_parameters());
      const LoopResult r = run_training(trainer, {dir, 500, 0, false});
      if (r.interrupted) throw CLI::RuntimeError(130);
      const LoadedPolicy policy = load_policy(checkpoint_path(dir));
      const auto result = evaluate_policy(task, policy, o->eval_episodes, o->n_action_steps, 1000);
      write_rollouts_svg(dir + "/rollouts.svg", task.config(), demos, result.trajectories,
                         result.succeeded, std::string(label) + ": closed-loop rollouts");
      std::printf("plots: %s/loss.svg, %s/rollouts.svg\n", dir.c_str(), dir.c_str());
      return result;
    };
    DemoTask::EvalResult baseline;
    if (o->baseline) {
      TrainConfig mse = config;
      mse.objective = "mse";
      baseline = train_and_eval(mse, o->out + "/mse", "baseline: plain MSE regression");
      print_eval(baseline);
    }
    const bool flow = config.objective == "flow";
    const auto result = train_and_eval(config, o->out + "/" + config.objective,
                                       flow ? "flow matching" : "plain MSE regression");
    if (o->baseline)
      std::printf("\nMSE regression baseline (same network): success rate %.0f%%\n",
                  100 * baseline.success_rate);
    print_eval(result);
  });
}

}  // namespace

void add_policy_commands(CLI::App& app) {
  add_demo(app);
  add_train(app);
  add_sample(app);
  add_eval(app);
  add_info(app);
}

}  // namespace mmdit::cli
