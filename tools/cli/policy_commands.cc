// mmdit train | sample | eval | info | demo: the policy's life cycle from the command line.
#include <sys/stat.h>
#include <unistd.h>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <optional>
#include <sstream>

#include <nlohmann/json.hpp>

#include "tensor/file_io.h"
#include "tensor/parallel.h"
#include "tensor/print.h"
#include "tools/cli/commands.h"
#include "tools/cli/training_loop.h"
#include "train/dataset.h"
#include "train/demo_task.h"
#include "train/equinox.h"
#include "train/npy.h"
#include "train/plots.h"
#include "train/training_state.h"

namespace mmdit::cli {
namespace {

// --stats: statistics of the user's own (the reference agent's config gives its ranges), in place
// of the data's. Returns use(the statistics), an error in reading or using them naming the file.
template <class Use>
auto with_stats_file(const std::string& path, const char* command, Use&& use) {
  try {
    return use(Normalizer::from_json(read_file(path)));
  } catch (const Error& e) {
    fail(command, ": --stats ", path, ": ", e.what());
  }
}

// The flags every training command shares; they override the config file.
struct TrainFlags {
  std::string config_file;
  std::optional<int64_t> steps, batch_size;
  std::optional<uint64_t> seed;
  std::optional<double> lr;
  std::string objective;

  void add_to(CLI::App* cmd) {
    cmd->add_option("--config", config_file, "training config (JSON; keys of TrainConfig)");
    cmd->add_option("--steps", steps,
                    "training steps (in all, counting any already done; default: the config's, "
                    "else 2000, or 3000 for demo)")
        ->check(non_negative());
    cmd->add_option("--batch-size", batch_size, "batch size (default: the config's, else 64)")
        ->check(positive());
    const TrainConfig defaults;
    cmd->add_option("--lr", lr,
                    str_cat("peak learning rate (default: the config's, else ", defaults.lr, ")"))
        ->check(positive());
    cmd->add_option("--seed", seed,
                    str_cat("random seed (initialisation, noise, data order; default: the "
                            "config's, else ",
                            defaults.seed, ")"));
    cmd->add_option("--objective", objective, "flow (default) or mse, the regression baseline")
        ->check(CLI::IsMember({"flow", "mse"}));
  }
  // Reads and checks the config file, so that a mistake in it shows before a long data load.
  void read_config_file() {
    if (config_file.empty()) return;
    config_json = read_file(config_file);
    try {
      TrainConfig::from_json(config_json);
    } catch (const Error& e) {
      fail(config_file, ": ", e.what());
    }
  }
  TrainConfig apply(TrainConfig c) const {
    if (!config_json.empty()) {
      try {
        c = TrainConfig::from_json(config_json, c);
      } catch (const Error& e) {
        fail(config_file, ": ", e.what());
      }
    }
    if (steps) c.steps = *steps;
    if (batch_size) c.batch_size = *batch_size;
    if (lr) c.lr = *lr;
    if (seed) c.seed = *seed;
    if (!objective.empty()) c.objective = objective;
    c.validate();
    return c;
  }
  // The normalization --stats implies: its mode, unless --config sets another, which is refused;
  // "" without --stats. Called before the data loads too, so that a conflict shows at once.
  std::string normalization_of_stats(const std::string& stats_file, const char* command) const {
    if (stats_file.empty()) return "";
    const std::string mode = with_stats_file(stats_file, command, [](const Normalizer& n) {
      return n.mode == Normalizer::Mode::z_score ? "z_score" : "min_max";
    });
    if (!config_json.empty()) {
      const nlohmann::json j = nlohmann::json::parse(config_json);
      if (j.contains("normalization"))
        MMDIT_CHECK(j["normalization"] == mode, command, ": --stats ", stats_file, " holds ", mode,
                    " statistics, and --config ", config_file,
                    " sets \"normalization\": ", j["normalization"].dump());
    }
    return mode;
  }
  TrainConfig apply(TrainConfig c, const std::string& stats_file, const char* command) const {
    const std::string mode = normalization_of_stats(stats_file, command);
    c = apply(c);
    if (!mode.empty()) c.normalization = mode;
    return c;
  }
  // A resumed run keeps its checkpoint's config; only the number of steps may grow.
  void check_resumable() const {
    const char* given = !config_file.empty() ? "--config"
                        : batch_size         ? "--batch-size"
                        : lr                 ? "--lr"
                        : seed               ? "--seed"
                        : !objective.empty() ? "--objective"
                                             : nullptr;
    MMDIT_CHECK(!given, "train: ", given,
                " cannot be combined with --resume: a resumed run keeps the config in its "
                "checkpoint (only --steps may change, to train further)");
  }

 private:
  std::string config_json;
};

// "0.5,-1,2e-3": every token a whole finite number.
std::vector<float> parse_numbers(const std::string& text, const char* flag) {
  std::vector<float> values;
  size_t begin = 0;
  while (true) {
    const size_t end = std::min(text.find(',', begin), text.size());
    std::string_view token(text.data() + begin, end - begin);
    while (!token.empty() && token.front() == ' ') token.remove_prefix(1);
    while (!token.empty() && token.back() == ' ') token.remove_suffix(1);
    if (!token.empty() && token.front() == '+') token.remove_prefix(1);
    float value = 0;
    const auto [ptr, ec] = std::from_chars(token.data(), token.data() + token.size(), value);
    MMDIT_CHECK(ec == std::errc() && ptr == token.data() + token.size() && std::isfinite(value),
                flag, ": '", std::string(token), "' (number ", values.size() + 1,
                ") is not a finite number");
    values.push_back(value);
    if (end == text.size()) return values;
    begin = end + 1;
  }
}

// "state,gripper" -> {"state", "gripper"}: --obs-keys.
std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> parts;
  std::stringstream ss(text);
  for (std::string part; std::getline(ss, part, ',');) parts.push_back(part);
  return parts;
}

// --obs-keys names HDF5 groups: given with an .npz, it is refused rather than ignored.
void check_obs_keys_fit(CLI::App* cmd, const std::string& data, const char* command) {
  MMDIT_CHECK(!cmd->count("--obs-keys") || lowercase_extension(data) != ".npz", command,
              ": --obs-keys selects HDF5 observation groups; ", data,
              " is an .npz, whose observations are 'observation.state'");
}

// Whether `data` is read as robomimic HDF5, whose observation keys a checkpoint records.
bool is_hdf5(const std::string& data) {
  return lowercase_extension(data) != ".npz";
}

// The HDF5 observation keys to read a checkpoint's data with: the ones it recorded, or "state"
// (the option's default) when it recorded none. --obs-keys, when given, must be the recorded ones:
// other keys would build states the policy was not trained on, however many numbers they hold.
std::vector<std::string> obs_keys_of_policy(CLI::App* cmd, const std::string& given,
                                            const CheckpointInfo& info,
                                            const std::string& checkpoint, const char* command) {
  if (!cmd->count("--obs-keys") && !info.obs_keys.empty()) return info.obs_keys;
  const std::vector<std::string> keys = split_commas(given);
  MMDIT_CHECK(info.obs_keys.empty() || keys == info.obs_keys, command, ": --obs-keys ", given,
              " differs from the observation keys ", checkpoint, " was trained with (",
              join_commas(info.obs_keys), "); leave --obs-keys out to use those");
  return keys;
}

// --weights bf16 and --sample-steps are the flow objective's sampler's: refused, not ignored,
// for a regression policy, which acts in one pass with its float32 weights. Checked on the
// metadata, before the weights are read.
void check_sampler_options_fit(const std::string& weights, int64_t sample_steps,
                               const CheckpointInfo& info, const std::string& checkpoint,
                               const char* command) {
  MMDIT_CHECK(weights == "f32" || info.config.objective == "flow", command, ": --weights ", weights,
              " packs the weights of the flow objective's sampler; ", checkpoint,
              " holds a policy of objective '", info.config.objective,
              "', which acts with float32 weights (leave --weights out)");
  MMDIT_CHECK(sample_steps == 0 || info.config.objective == "flow", command,
              ": --sample-steps sets the flow objective's Euler steps; ", checkpoint,
              " holds a policy of objective '", info.config.objective,
              "', which regresses its actions in one pass (leave --sample-steps out)");
}

// The data's dimensions against the policy's, naming both files: the library's own checks (in
// Trainer and action_error) know neither path.
void check_data_fits(const Episodes& data, const std::string& data_path, const PolicyConfig& pc,
                     const std::string& policy_source, const char* command) {
  MMDIT_CHECK(data.state_dim() == pc.state_dim && data.act_dim() == pc.act_dim, command,
              ": --data ", data_path, " has state_dim ", data.state_dim(), " and act_dim ",
              data.act_dim(), ", but the policy of ", policy_source, " has state_dim ",
              pc.state_dim, " and act_dim ", pc.act_dim);
}

// Both paths exist and name one file (by any path or link).
bool same_file(const std::string& a, const std::string& b) {
  struct stat sa, sb;
  return ::stat(a.c_str(), &sa) == 0 && ::stat(b.c_str(), &sb) == 0 && sa.st_dev == sb.st_dev &&
         sa.st_ino == sb.st_ino;
}

// Refuses an output that is one of the command's inputs (the same file, by any path or link):
// writing it would destroy the input, as export-eqx --out naming its own checkpoint did.
void check_not_input(const std::string& output, const char* flag, const std::string& input,
                     const char* input_name, const char* command) {
  MMDIT_CHECK(!same_file(output, input), command, ": ", flag, " ", output, " is the ", input_name,
              " ", input, " (the same file); writing it would destroy ", "that: name another file");
}

// The files a run writes into its directory.
constexpr const char* kRunFiles[] = {
    "checkpoint.safetensors", "config.json", "metrics.csv", "val.csv", "loss.svg", "rollouts.svg"};

// Before the run's work: no file the run writes into `out` may be one of the inputs (name, flag;
// empty ones are absent), or anything but a regular file where the run's state goes (a symbolic
// link there was refused only when the first checkpoint was saved, after the steps had run).
void check_run_outputs(const std::string& out,
                       const std::vector<std::pair<std::string, const char*>>& inputs,
                       const char* command) {
  struct stat st {};
  MMDIT_CHECK(::stat(out.c_str(), &st) != 0 || S_ISDIR(st.st_mode), command, ": --out ", out,
              " is not a directory");
  for (const char* written : kRunFiles) {
    const std::string path = path_in(out, written);
    for (const auto& [input, name] : inputs)
      if (!input.empty()) check_not_input(path, "--out", input, name, command);
    // The plots are not: one that cannot be written is a warning, the run goes on.
    if (lowercase_extension(written) == ".svg") continue;
    try {
      check_replaceable(path);
    } catch (const Error& e) {
      fail(command, ": --out ", e.what());
    }
  }
}

// The run directory `out`, made if missing, locked for this command: two commands writing one run
// directory would each report success and leave a mix, the later one's files over the other's.
std::unique_ptr<DirectoryLock> lock_run_directory(const std::string& out, const char* command) {
  make_directory(out);
  try {
    return std::make_unique<DirectoryLock>(out);
  } catch (const DirectoryLock::Busy& e) {
    fail(command, ": --out ", e.what(),
         " (another mmdit command is writing a run there): wait for it, or give another --out");
  } catch (const Error& e) {
    fail(command, ": --out ", e.what());
  }
}

// --overwrite: the directory describes one run, so the old run's checkpoint, logs and plots go
// before the new run writes its own next to them.
void remove_previous_run(const std::string& dir) {
  for (const char* name : kRunFiles)
    if (std::string(name) != "config.json") std::remove(path_in(dir, name).c_str());
}

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

// A chunk's actions start at the oldest observation, so horizon - n_obs_steps + 1 of them are
// for now and later.
void check_n_action_steps(const PolicyConfig& pc, int64_t n_action_steps) {
  const int64_t most = pc.horizon - pc.n_obs_steps + 1;
  MMDIT_CHECK(n_action_steps <= most, "--n-action-steps ", n_action_steps,
              " exceeds the actions a chunk holds from now on: horizon - n_obs_steps + 1 = ", most);
}

DemoTask::EvalResult evaluate_policy(const DemoTask& task, const LoadedPolicy& policy,
                                     int64_t episodes, int64_t n_action_steps, uint64_t seed) {
  check_n_action_steps(policy.config.policy, n_action_steps);
  Rng rng(seed + 1);
  auto act = [&](const Tensor& obs) { return policy.act(obs, rng); };
  return task.evaluate(act, episodes, policy.config.policy.n_obs_steps, n_action_steps, seed);
}

void print_eval(const DemoTask::EvalResult& r) {
  std::printf("%lld episodes: %lld succeeded, %lld collided, %lld timed out\n",
              (long long)r.episodes, (long long)r.successes, (long long)r.collisions,
              (long long)r.timeouts);
  std::printf("success rate: %s\n", r.success_percent().c_str());
}

constexpr const char* kStatsHelp =
    "normalisation statistics to use instead of --data's (JSON: \"mode\" and \"state_min\", "
    "\"state_max\", \"action_min\", \"action_max\", or the reference agent's "
    "\"state_min_max\" and \"action_min_max\" as [[minima], [maxima]], or the _mean and _std "
    "arrays for z_score); its mode is the run's unless --config sets \"normalization\"";

void add_train(CLI::App& app) {
  struct Options {
    TrainFlags flags;
    std::string data, out = "runs/train", resume, obs_keys = "state", val_data, stats;
    int64_t log_every = 100, checkpoint_every = 1000, val_every = 1000, val_windows = 256;
    int threads = 0;
    bool overwrite = false;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("train", "Train a flow-matching policy on demonstrations");
  o->flags.add_to(cmd);
  cmd->footer(
      "--config: a JSON object of these keys, each optional; the defaults (state_dim and "
      "act_dim come from --data):\n" +
      TrainConfig().to_json());
  cmd->add_option("--data", o->data, "demonstrations: LeRobot-style .npz or robomimic .hdf5")
      ->required();
  cmd->add_option("--stats", o->stats, kStatsHelp)->check(CLI::ExistingFile);
  cmd->add_option("--obs-keys", o->obs_keys,
                  "HDF5 observation keys, comma-separated, recorded in the checkpoint (default: "
                  "state; with --resume, the checkpoint's)");
  cmd->add_option("--out", o->out,
                  "output directory (checkpoint, config.json, metrics.csv, loss.svg)")
      ->check(non_empty())
      ->transform(directory_name())
      ->capture_default_str();
  cmd->add_option(
      "--resume", o->resume,
      "continue from this checkpoint, with its config, into its directory unless --out is "
      "given (--steps may raise the total)");
  cmd->add_flag("--overwrite", o->overwrite,
                "start a new run even if --out already holds a checkpoint");
  cmd->add_option("--log-every", o->log_every, "progress line every N steps")
      ->check(positive())
      ->capture_default_str();
  cmd->add_option("--checkpoint-every", o->checkpoint_every,
                  "checkpoint every N steps (0: end only)")
      ->check(non_negative())
      ->capture_default_str();
  cmd->add_option("--val-data", o->val_data,
                  "held-out demonstrations (same format and --obs-keys as --data): the EMA "
                  "policy's open-loop action error on them every --val-every steps, in val.csv");
  cmd->add_option("--val-every", o->val_every, "with --val-data: validate every N steps")
      ->check(positive())
      ->capture_default_str();
  cmd->add_option("--val-windows", o->val_windows,
                  "with --val-data: windows to act on, always the same (0: all)")
      ->check(non_negative())
      ->capture_default_str();
  add_threads_option(cmd, o->threads);
  cmd->callback([o, cmd] {
    set_threads(o->threads);
    struct stat st;
    MMDIT_CHECK(
        !o->val_data.empty() || (!cmd->count("--val-every") && !cmd->count("--val-windows")),
        "train: --val-every and --val-windows need --val-data");
    check_obs_keys_fit(cmd, o->data, "train");
    std::vector<std::string> keys = split_commas(o->obs_keys);
    std::optional<CheckpointInfo> resumed_info;
    // --out holds a checkpoint that is not the one resumed.
    const auto holds_other_checkpoint = [&] {
      const std::string ckpt = checkpoint_path(o->out);
      return ::stat(ckpt.c_str(), &st) == 0 && !same_file(ckpt, o->resume);
    };
    if (!o->resume.empty()) {
      o->flags.check_resumable();
      check_resumable(read_checkpoint_info(o->resume), o->resume);
      MMDIT_CHECK(o->stats.empty(),
                  "train: --stats sets a new run's statistics; a resumed run keeps its "
                  "checkpoint's");
      MMDIT_CHECK(!o->overwrite,
                  "train: --overwrite starts a new run; it cannot be combined with "
                  "--resume, which continues one");
      // A resumed run goes on next to its checkpoint, never over another run's.
      const std::string own_dir = parent_directory(o->resume);
      if (!cmd->count("--out")) o->out = own_dir;
      MMDIT_CHECK(!holds_other_checkpoint(), "train: ", o->out,
                  " holds another run's checkpoint; resume into the run's own "
                  "directory (",
                  own_dir, ", the default) or an --out without a checkpoint");
      resumed_info = read_checkpoint_info(o->resume);
      keys = obs_keys_of_policy(cmd, o->obs_keys, *resumed_info, o->resume, "train");
    } else {
      const std::string ckpt = checkpoint_path(o->out);
      MMDIT_CHECK(o->overwrite || ::stat(ckpt.c_str(), &st) != 0, "train: ", o->out,
                  " already holds a run's checkpoint: continue it with --resume ", ckpt,
                  ", or pass --overwrite to start a new run there");
      o->flags.read_config_file();
      o->flags.normalization_of_stats(o->stats, "train");
    }
    check_run_outputs(o->out,
                      {{o->data, "--data"},
                       {o->val_data, "--val-data"},
                       {o->stats, "--stats"},
                       {o->flags.config_file, "--config"}},
                      "train");
    const Episodes data = load_episodes(o->data, keys);
    std::printf("data: %s, %lld episodes, %lld frames, state_dim %lld, act_dim %lld\n",
                o->data.c_str(), (long long)data.num_episodes(), (long long)data.states.shape()[0],
                (long long)data.state_dim(), (long long)data.act_dim());
    std::optional<Episodes> validation;
    if (!o->val_data.empty()) {
      validation = load_episodes(o->val_data, keys);
      MMDIT_CHECK(
          validation->state_dim() == data.state_dim() && validation->act_dim() == data.act_dim(),
          "train: --val-data ", o->val_data, " has state_dim ", validation->state_dim(),
          " and act_dim ", validation->act_dim(), "; --data has ", data.state_dim(), " and ",
          data.act_dim());
      std::printf("validation: %s, %lld episodes, %lld frames\n", o->val_data.c_str(),
                  (long long)validation->num_episodes(), (long long)validation->num_frames());
    }
    std::unique_ptr<Trainer> trainer;
    bool in_own_directory = false;
    if (!o->resume.empty()) {
      in_own_directory = same_file(o->out, parent_directory(o->resume));
      check_data_fits(data, o->data, resumed_info->config.policy, o->resume, "train");
      trainer = Trainer::resume(o->resume, data, o->flags.steps);
      std::printf("resumed %s at step %lld\n", o->resume.c_str(), (long long)trainer->step());
      if (trainer->step() >= trainer->config().steps) {
        std::printf(
            "the run is already at step %lld of %lld: pass --steps N (more than %lld) to "
            "train further\n",
            (long long)trainer->step(), (long long)trainer->config().steps,
            (long long)trainer->step());
        return;
      }
    } else {
      TrainConfig defaults;
      defaults.policy.state_dim = data.state_dim();
      defaults.policy.act_dim = data.act_dim();
      const TrainConfig config = o->flags.apply(defaults, o->stats, "train");
      // The defaults are the data's sizes: a mismatch comes from --config.
      check_data_fits(data, o->data, config.policy, "--config " + o->flags.config_file, "train");
      trainer = std::make_unique<Trainer>(config, data);
      if (!o->stats.empty()) {
        with_stats_file(o->stats, "train",
                        [&](const Normalizer& n) { trainer->set_normalizer(n); });
        std::printf("normalisation (%s) from %s\n", trainer->config().normalization.c_str(),
                    o->stats.c_str());
      }
    }
    if (is_hdf5(o->data)) trainer->set_obs_keys(keys);
    std::printf("policy: %lld parameters\n", (long long)trainer->policy().num_parameters());
    const std::unique_ptr<DirectoryLock> lock = lock_run_directory(o->out, "train");
    // Checked again under the lock: another run may have written here since the checks above.
    if (o->resume.empty())
      MMDIT_CHECK(o->overwrite || ::stat(checkpoint_path(o->out).c_str(), &st) != 0,
                  "train: ", o->out,
                  " received another run's checkpoint while this run was starting; "
                  "pass --overwrite to replace it");
    else if (in_own_directory)
      MMDIT_CHECK(read_checkpoint_info(o->resume).step == trainer->step(), "train: ", o->resume,
                  " changed while this run was starting (another run saved it); resume again");
    else
      MMDIT_CHECK(!holds_other_checkpoint(), "train: ", o->out,
                  " received another run's checkpoint while this run was starting; resume "
                  "into an --out without a checkpoint");
    if (o->overwrite) remove_previous_run(o->out);
    const LoopResult r = run_training(*trainer, {.out_dir = o->out,
                                                 .continues_run_in_out_dir = in_own_directory,
                                                 .log_every = o->log_every,
                                                 .checkpoint_every = o->checkpoint_every,
                                                 .validation = validation ? &*validation : nullptr,
                                                 .validate_every = o->val_every,
                                                 .validation_windows = o->val_windows});
    if (r.stop_signal != 0) throw CLI::RuntimeError(128 + r.stop_signal);
  });
}

// The policy block of a --config file must describe the model the .eqx holds: its sizes are
// read from the file, and a different one would not load.
void check_policy_sizes(const PolicyConfig& from_eqx, const PolicyConfig& configured,
                        const std::string& config_file) {
  using Json = nlohmann::json;
  const Json a = Json::parse(from_eqx.to_json()), b = Json::parse(configured.to_json());
  for (const auto& [key, value] : a.items())
    MMDIT_CHECK(b.at(key) == value, config_file, ": policy.", key, " is ", b.at(key).dump(),
                ", but the Equinox model's is ", value.dump(),
                " (leave the policy's sizes out: they are read from the .eqx file)");
}

void add_import_eqx(CLI::App& app) {
  struct Options {
    TrainFlags flags;
    std::string eqx, data, stats, out = "runs/imported", obs_keys = "state";
    bool overwrite = false;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "import-eqx",
      "Turn a BCPolicy saved by the reference (eqx.tree_serialise_leaves) into a checkpoint for "
      "sample, eval, info and train --resume");
  cmd->add_option("eqx", o->eqx, "the .eqx file")->required();
  cmd->add_option("--data", o->data,
                  "the demonstrations the policy was trained on (.npz or .hdf5): their "
                  "normalisation statistics go into the checkpoint unless --stats gives others, "
                  "and train --resume must continue on them. Without --data, --stats is needed "
                  "and train --resume takes any data");
  cmd->add_option("--stats", o->stats, kStatsHelp)->check(CLI::ExistingFile);
  cmd->add_option("--obs-keys", o->obs_keys,
                  "HDF5 observation keys, comma-separated, recorded in the checkpoint (with HDF5 "
                  "--data, or given without --data)")
      ->capture_default_str();
  cmd->add_option("--config", o->flags.config_file,
                  "training config (JSON; keys of TrainConfig): normalization, sample_steps, and "
                  "the settings a later train --resume uses; the policy's sizes come from the "
                  ".eqx file");
  cmd->add_option("--out", o->out, "output directory (checkpoint, config.json)")
      ->check(non_empty())
      ->transform(directory_name())
      ->capture_default_str();
  cmd->add_flag("--overwrite", o->overwrite, "replace a checkpoint already in --out");
  cmd->callback([o, cmd] {
    const std::string ckpt = checkpoint_path(o->out);
    struct stat st;
    MMDIT_CHECK(o->overwrite || ::stat(ckpt.c_str(), &st) != 0, "import-eqx: ", o->out,
                " already holds a checkpoint; pass --overwrite to replace it");
    MMDIT_CHECK(!o->data.empty() || !o->stats.empty(),
                "import-eqx: give --stats, the statistics the agent normalised with (its "
                "config's state_min_max and action_min_max), or --data, the demonstrations it "
                "was trained on, whose own statistics are then used");
    if (!o->data.empty()) check_obs_keys_fit(cmd, o->data, "import-eqx");
    check_run_outputs(o->out,
                      {{o->eqx, ".eqx file"},
                       {o->data, "--data"},
                       {o->stats, "--stats"},
                       {o->flags.config_file, "--config"}},
                      "import-eqx");
    const PolicyConfig sizes = equinox_policy_config(o->eqx);
    o->flags.read_config_file();
    TrainConfig defaults;
    defaults.policy = sizes;
    const TrainConfig config = o->flags.apply(defaults, o->stats, "import-eqx");
    check_policy_sizes(sizes, config.policy, o->flags.config_file);
    const std::vector<std::string> keys = split_commas(o->obs_keys);
    std::optional<Episodes> data;
    std::unique_ptr<Trainer> trainer;
    if (o->data.empty()) {
      trainer = with_stats_file(o->stats, "import-eqx", [&](const Normalizer& n) {
        return std::make_unique<Trainer>(config, n);
      });
    } else {
      data = load_episodes(o->data, keys);
      check_data_fits(*data, o->data, config.policy, "the .eqx file " + o->eqx, "import-eqx");
      trainer = std::make_unique<Trainer>(config, *data);
      if (!o->stats.empty())
        with_stats_file(o->stats, "import-eqx",
                        [&](const Normalizer& n) { trainer->set_normalizer(n); });
    }
    load_equinox(trainer->policy(), o->eqx);
    trainer->restart_ema();
    if (o->data.empty() ? cmd->count("--obs-keys") > 0 : is_hdf5(o->data))
      trainer->set_obs_keys(keys);
    // Everything save_checkpoint would refuse (a NaN in the weights) is refused before the old
    // run is removed or config.json written: a refused import leaves --out as it was.
    trainer->check_saveable(o->eqx + ": not imported (" + o->out + " is left as it was)");
    const std::unique_ptr<DirectoryLock> lock = lock_run_directory(o->out, "import-eqx");
    MMDIT_CHECK(o->overwrite || ::stat(ckpt.c_str(), &st) != 0, "import-eqx: ", o->out,
                " received a checkpoint while this import was starting; pass --overwrite to "
                "replace it");
    if (o->overwrite) remove_previous_run(o->out);
    write_file_atomically(path_in(o->out, "config.json"), config.to_json() + "\n");
    trainer->save_checkpoint(ckpt);
    std::printf(
        "%s: BCPolicy, %lld parameters (hidden %lld, depth %lld, horizon %lld, state_dim %lld, "
        "act_dim %lld)\nnormalisation (%s) from %s\n",
        o->eqx.c_str(), (long long)trainer->policy().num_parameters(), (long long)sizes.hidden_size,
        (long long)sizes.depth, (long long)sizes.horizon, (long long)sizes.state_dim,
        (long long)sizes.act_dim, config.normalization.c_str(),
        (o->stats.empty() ? o->data : o->stats).c_str());
    if (data)
      std::printf("data %s: %lld episodes, %lld frames\n", o->data.c_str(),
                  (long long)data->num_episodes(), (long long)data->num_frames());
    else
      std::printf("no data recorded: train --resume continues on any data of these sizes\n");
    std::printf("wrote %s (parameters and EMA both the imported weights, step 0)\n", ckpt.c_str());
  });
}

void add_export_eqx(CLI::App& app) {
  struct Options {
    std::string checkpoint, out;
    bool raw_params = false;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "export-eqx",
      "Write a checkpoint's policy as eqx.tree_serialise_leaves would, for the reference's "
      "eqx.tree_deserialise_leaves in Python");
  cmd->add_option("checkpoint", o->checkpoint, "checkpoint.safetensors")->required();
  cmd->add_option("--out", o->out, "the .eqx file to write")->required()->check(non_empty());
  cmd->add_flag("--no-ema", o->raw_params, "the raw parameters instead of the EMA");
  cmd->callback([o] {
    check_not_input(o->out, "--out", o->checkpoint, "checkpoint", "export-eqx");
    check_output_directory(o->out, "--out");
    const bool use_ema = !o->raw_params && read_checkpoint_info(o->checkpoint).holds_ema();
    const LoadedPolicy loaded = load_policy(o->checkpoint, use_ema);
    save_equinox(*loaded.policy, o->out);
    const PolicyConfig& c = loaded.config.policy;
    std::printf(
        "wrote %s: the %s of %s (step %lld)\nin Python: eqx.tree_deserialise_leaves(path, "
        "BC_MMDiT(n_obs_steps=%lld, state_dim=%lld, horizon=%lld, act_dim=%lld, hidden_size=%lld, "
        "depth=%lld, dim_cond=%lld, timestep_embed_dim=%lld, dim_head=%lld, heads=%lld, "
        "ff_mult=%lld, ...))\n",
        o->out.c_str(), use_ema ? "EMA parameters" : "parameters", o->checkpoint.c_str(),
        (long long)loaded.step, (long long)c.n_obs_steps, (long long)c.state_dim,
        (long long)c.horizon, (long long)c.act_dim, (long long)c.hidden_size, (long long)c.depth,
        (long long)c.dim_cond, (long long)c.timestep_embed_dim, (long long)c.dim_head,
        (long long)c.heads, (long long)c.ff_mult);
  });
}

void add_export(CLI::App& app) {
  struct Options {
    std::string checkpoint, out, dtype = "f32";
    bool raw_params = false;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "export",
      "Write a checkpoint's policy alone (EMA weights, position tables, config, normalisation) "
      "for deployment: what sample, eval, info and load_policy need, without the optimiser state");
  cmd->add_option("checkpoint", o->checkpoint, "checkpoint.safetensors")->required();
  cmd->add_option("--out", o->out, "the .safetensors file to write")
      ->required()
      ->check(non_empty());
  cmd->add_option("--dtype", o->dtype,
                  "how the weights are stored: f32, or bf16 (half the bytes; loaded back as "
                  "float32 holding the rounded values)")
      ->check(CLI::IsMember({"f32", "bf16"}))
      ->capture_default_str();
  cmd->add_flag("--no-ema", o->raw_params, "the raw parameters instead of the EMA");
  cmd->callback([o] {
    check_not_input(o->out, "--out", o->checkpoint, "checkpoint", "export");
    check_output_directory(o->out, "--out");
    export_policy(o->checkpoint, o->out, !o->raw_params,
                  o->dtype == "bf16" ? StoredFloats::bf16 : StoredFloats::as_is);
    const auto size = [](const std::string& path) {
      struct stat st {};
      return ::stat(path.c_str(), &st) == 0 ? static_cast<double>(st.st_size) / 1e6 : 0.0;
    };
    std::printf("wrote %s: the %s of %s (step %lld) in %s, %.1f MB (the checkpoint: %.1f MB)\n",
                o->out.c_str(), o->raw_params ? "parameters" : "EMA weights", o->checkpoint.c_str(),
                (long long)read_checkpoint_info(o->out).step,
                o->dtype == "bf16" ? "bfloat16" : "float32", size(o->out), size(o->checkpoint));
  });
}

void add_weights_option(CLI::App* cmd, std::string& weights) {
  cmd->add_option("--weights", weights,
                  "precision of the sampler's packed weights: f32, or bf16 (half the memory "
                  "traffic; README 'Speed' gives the accuracy change)")
      ->check(CLI::IsMember({"f32", "bf16"}));
}

void add_sample_steps_option(CLI::App* cmd, int64_t& sample_steps) {
  cmd->add_option("--sample-steps", sample_steps,
                  "Euler steps of the flow's sampler, 1 to 10000 (default: the checkpoint "
                  "config's sample_steps): fewer act faster, less exactly")
      ->check(CLI::Range(int64_t{1}, int64_t{10000}));
}

void add_sample(CLI::App& app) {
  struct Options {
    std::string checkpoint, obs, obs_npy, out_npy;
    uint64_t seed = 0;
    bool raw_params = false;
    std::string weights = "f32";
    int64_t sample_steps = 0;
    int threads = 0;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("sample", "Sample an action chunk for observations");
  cmd->add_option("checkpoint", o->checkpoint, "checkpoint (.safetensors)")->required();
  cmd->add_option("--obs", o->obs,
                  "one observation history: n_obs*state_dim comma-separated numbers");
  cmd->add_option(
      "--obs-npy", o->obs_npy,
      "observations (B, n_obs, state_dim), or one example's (n_obs, state_dim), as .npy");
  cmd->add_option("--out-npy", o->out_npy,
                  "write the actions (B, horizon, act_dim), or (horizon, act_dim), here");
  cmd->add_option("--seed", o->seed, "noise seed")->capture_default_str();
  cmd->add_flag("--no-ema", o->raw_params,
                "use the raw parameters instead of the EMA (a policy exported with --no-ema holds "
                "only those, and is read so without it)");
  add_weights_option(cmd, o->weights);
  add_sample_steps_option(cmd, o->sample_steps);
  add_threads_option(cmd, o->threads);
  cmd->callback([o] {
    set_threads(o->threads);
    if (!o->out_npy.empty()) {
      check_not_input(o->out_npy, "--out-npy", o->checkpoint, "checkpoint", "sample");
      if (!o->obs_npy.empty())
        check_not_input(o->out_npy, "--out-npy", o->obs_npy, "--obs-npy", "sample");
      check_output_directory(o->out_npy, "--out-npy");
    }
    const CheckpointInfo info = read_checkpoint_info(o->checkpoint);
    check_sampler_options_fit(o->weights, o->sample_steps, info, o->checkpoint, "sample");
    const LoadedPolicy policy = load_policy(o->checkpoint, !o->raw_params && info.holds_ema(),
                                            parse_precision(o->weights), o->sample_steps);
    const PolicyConfig& pc = policy.config.policy;
    Tensor obs;
    MMDIT_CHECK(o->obs.empty() || o->obs_npy.empty(), "sample: give --obs or --obs-npy, not both");
    if (!o->obs_npy.empty()) {
      const Tensor loaded = load_npy(o->obs_npy);
      MMDIT_CHECK(loaded.dtype() != DType::boolean, o->obs_npy,
                  ": observations are bool; expected numbers");
      obs = raw::to_dtype(loaded, DType::f32);
    } else {
      MMDIT_CHECK(!o->obs.empty(), "sample: give --obs or --obs-npy");
      const std::vector<float> v = parse_numbers(o->obs, "sample: --obs");
      MMDIT_CHECK(
          static_cast<int64_t>(v.size()) == pc.n_obs_steps * pc.state_dim, "sample: --obs has ",
          v.size(),
          " numbers; the policy needs n_obs_steps*state_dim = ", pc.n_obs_steps * pc.state_dim);
      obs = from_vector(v, {1, pc.n_obs_steps, pc.state_dim});
    }
    Rng rng(o->seed);
    Tensor actions;
    try {
      actions = policy.act(obs, rng);
    } catch (const Error& e) {
      if (o->obs_npy.empty()) throw;
      fail(o->obs_npy, ": ", e.what());
    }
    if (!o->out_npy.empty())
      save_npy(o->out_npy, actions);
    else
      std::printf("%s\n", to_string(actions, Elision::none).c_str());  // every action
  });
}

// One line of JSON. Paths come from the command line and need not be UTF-8: invalid bytes are
// printed as U+FFFD rather than failing after the evaluation has run.
void print_json(const nlohmann::ordered_json& j) {
  std::printf("%s\n",
              j.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace).c_str());
}

void add_eval(CLI::App& app) {
  struct Options {
    std::string checkpoint, svg, data, obs_keys = "state";
    int64_t episodes = 100, n_action_steps = 8, windows = 1000, batch_size = 64;
    uint64_t seed = 1000;
    int threads = 0;
    bool raw_params = false, json = false;
    std::string weights = "f32";
    int64_t sample_steps = 0;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "eval",
      "Closed-loop evaluation on the built-in demo task, or with --data the open-loop action "
      "error on demonstrations");
  cmd->add_option("checkpoint", o->checkpoint, "checkpoint (.safetensors)")->required();
  cmd->add_option("--data", o->data,
                  "demonstrations (.npz or .hdf5, held out from training): compare the action "
                  "chunks the policy samples with the demonstrated ones");
  cmd->add_option("--obs-keys", o->obs_keys,
                  "with --data: HDF5 observation keys, comma-separated (default: the ones the "
                  "checkpoint recorded, else state)");
  cmd->add_option("--windows", o->windows,
                  "with --data: training windows to act on, a seeded choice (0: all)")
      ->check(non_negative())
      ->capture_default_str();
  cmd->add_option("--batch-size", o->batch_size,
                  "with --data: windows per act() call (the noise is drawn per call, so the "
                  "MSE, an estimate over it, changes with this by its sampling error)")
      ->check(positive())
      ->capture_default_str();
  cmd->add_option("--episodes", o->episodes, "episodes to run")
      ->check(positive())
      ->capture_default_str();
  cmd->add_option("--n-action-steps", o->n_action_steps, "actions executed per chunk")
      ->check(positive())
      ->capture_default_str();
  cmd->add_option("--seed", o->seed, "seed of the start positions and noise")
      ->capture_default_str();
  cmd->add_option("--svg", o->svg, "write the rollouts as SVG");
  cmd->add_flag("--no-ema", o->raw_params,
                "use the raw parameters instead of the EMA (a policy exported with --no-ema holds "
                "only those, and is read so without it)");
  cmd->add_flag("--json", o->json,
                "print the result as one JSON object (NaN as null) instead of text, for scripts");
  add_threads_option(cmd, o->threads);
  add_weights_option(cmd, o->weights);
  add_sample_steps_option(cmd, o->sample_steps);
  cmd->callback([o, cmd] {
    set_threads(o->threads);
    // Each flag belongs to one of the two evaluations: given to the other, it is refused rather
    // than ignored.
    for (const char* flag : {"--episodes", "--n-action-steps", "--svg"})
      MMDIT_CHECK(o->data.empty() || !cmd->count(flag), "eval: ", flag,
                  " is for the demo task's closed-loop episodes; --data evaluates open-loop");
    for (const char* flag : {"--obs-keys", "--windows", "--batch-size"})
      MMDIT_CHECK(!o->data.empty() || !cmd->count(flag), "eval: ", flag, " needs --data");
    if (!o->data.empty()) check_obs_keys_fit(cmd, o->data, "eval");
    if (!o->svg.empty()) {
      check_not_input(o->svg, "--svg", o->checkpoint, "checkpoint", "eval");
      check_output_directory(o->svg, "--svg");
    }
    const CheckpointInfo info = read_checkpoint_info(o->checkpoint);
    check_sampler_options_fit(o->weights, o->sample_steps, info, o->checkpoint, "eval");
    const std::vector<std::string> keys =
        obs_keys_of_policy(cmd, o->obs_keys, info, o->checkpoint, "eval");
    const bool use_ema = !o->raw_params && info.holds_ema();
    const LoadedPolicy policy =
        load_policy(o->checkpoint, use_ema, parse_precision(o->weights), o->sample_steps);
    // What the numbers were computed with, for scripts comparing settings.
    const nlohmann::ordered_json settings = {
        {"weights", use_ema ? "EMA" : "parameters"},
        {"precision", o->weights},
        {"sample_steps", policy.config.objective == "flow"
                             ? nlohmann::ordered_json(policy.config.sample_steps)
                             : nlohmann::ordered_json()},
        {"seed", o->seed}};
    if (!o->data.empty()) {
      const Episodes data = load_episodes(o->data, keys);
      check_data_fits(data, o->data, policy.config.policy, o->checkpoint, "eval");
      Rng rng(o->seed + 1);
      const ActionError e = action_error(policy, data, o->windows, o->batch_size, o->seed, rng);
      if (o->json) {
        nlohmann::ordered_json j = {{"checkpoint", o->checkpoint},
                                    {"step", policy.step},
                                    {"data", o->data},
                                    {"data_episodes", data.num_episodes()},
                                    {"windows", e.windows},
                                    {"horizon", policy.config.policy.horizon},
                                    {"mse", e.mse},
                                    {"rmse", std::sqrt(e.mse)},
                                    {"mse_per_dim", e.mse_per_dim},
                                    {"now_index", policy.config.policy.n_obs_steps - 1},
                                    {"mse_now", e.mse_now},
                                    {"batch_size", o->batch_size}};
        j.update(settings);
        print_json(j);
        return;
      }
      std::printf("%s: %lld windows of %lld episodes, %lld-action chunks\n", o->data.c_str(),
                  (long long)e.windows, (long long)data.num_episodes(),
                  (long long)policy.config.policy.horizon);
      std::printf("action MSE %.6g (RMSE %.6g) over the chunks' unpadded steps\n", e.mse,
                  std::sqrt(e.mse));
      std::printf("per dimension:");
      for (const double m : e.mse_per_dim) std::printf(" %.6g", m);
      std::printf("\naction for now (index %lld): MSE %.6g\n",
                  (long long)policy.config.policy.n_obs_steps - 1, e.mse_now);
      return;
    }
    const DemoTask task;
    MMDIT_CHECK(policy.config.policy.state_dim == task.state_dim() &&
                    policy.config.policy.act_dim == task.act_dim(),
                "eval: the policy (state_dim ", policy.config.policy.state_dim, ", act_dim ",
                policy.config.policy.act_dim, ") was not trained on the demo task (state_dim ",
                task.state_dim(), ", act_dim ", task.act_dim(), ")");
    const auto r = evaluate_policy(task, policy, o->episodes, o->n_action_steps, o->seed);
    if (o->json) {
      nlohmann::ordered_json j = {
          {"checkpoint", o->checkpoint},    {"step", policy.step},
          {"episodes", r.episodes},         {"successes", r.successes},
          {"collisions", r.collisions},     {"timeouts", r.timeouts},
          {"success_rate", r.success_rate}, {"n_action_steps", o->n_action_steps}};
      j.update(settings);
      print_json(j);
    } else {
      print_eval(r);
    }
    if (!o->svg.empty())
      write_rollouts_svg(o->svg, task.config(), {}, r.trajectories, r.succeeded, "policy rollouts");
  });
}

// The module a parameter is counted under: state_encoder, mmdit.blocks.3, mmdit.final_layers.1,
// mmdit.timestep_embeds.0, ... (the first name component, and inside mmdit the second, and the
// index of the lists).
std::string module_group(const std::string& name) {
  std::vector<std::string> parts;
  std::istringstream in(name);
  for (std::string part; std::getline(in, part, '.');) parts.push_back(part);
  size_t keep = 1;
  if (parts[0] == "mmdit" && parts.size() > 1) {
    const bool list =
        parts[1] == "blocks" || parts[1] == "final_layers" || parts[1] == "timestep_embeds";
    keep = list ? 3 : 2;
  }
  keep = std::min(keep, parts.size() - 1);  // never the parameter's own name
  std::string group = parts[0];
  for (size_t i = 1; i < keep; ++i) group += "." + parts[i];
  return group;
}

// A TrainingState file of a user's own loop: its step and random state, the caller's metadata,
// and its tensors by part, each parameter with its shape.
void describe_training_state(const std::string& path) {
  const SafetensorsFile file = load_safetensors(path);
  std::printf("training state: %s (%s, written by TrainingState::save)\n", path.c_str(),
              kTrainingStateFormat);
  const auto& metadata = file.metadata;
  if (metadata.contains("step"))
    std::printf("AdamW step: %lld\n", (long long)read_step(metadata, path));
  if (const auto it = metadata.find("rng"); it != metadata.end())
    std::printf("random state: %s\n", it->second.c_str());
  for (const auto& [key, value] : metadata)
    if (key != "format" && key != "step" && key != "rng")
      std::printf("metadata %s: %s\n", key.c_str(), value.c_str());
  std::map<std::string, std::pair<int64_t, int64_t>> parts;  // prefix -> tensors, numbers
  for (const auto& [name, t] : file.tensors) {
    auto& [tensors, numbers] = parts[name.substr(0, name.find('/') + 1)];
    ++tensors;
    numbers += t.numel();
  }
  for (const char* part : {"param/", "buffer/", "ema/", "adam_m/", "adam_v/"})
    if (parts.contains(part))
      std::printf("%-8s %4lld tensors %12lld numbers\n", part, (long long)parts[part].first,
                  (long long)parts[part].second);
  std::printf("parameters:\n");
  for (const auto& [name, t] : with_prefix(file.tensors, "param/"))
    std::printf("  %-40s %s\n", name.c_str(), shape_str(t.shape()).c_str());
}

void add_info(CLI::App& app) {
  auto path = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand(
      "info",
      "Describe a checkpoint or exported policy: step, config, statistics, the data it was "
      "trained on, parameters");
  cmd->add_option("checkpoint", *path, "checkpoint (.safetensors)")->required();
  cmd->callback([path] {
    const std::map<std::string, std::string> metadata = load_safetensors_metadata(*path);
    if (const auto it = metadata.find("format");
        it != metadata.end() && it->second == kTrainingStateFormat)
      return describe_training_state(*path);
    const CheckpointInfo info = read_checkpoint_info(*path);
    const LoadedPolicy p = load_policy(*path, info.holds_ema());
    std::printf("checkpoint: %s\ntraining step: %lld\n", path->c_str(), (long long)p.step);
    if (!info.exported.empty())
      std::printf("exported policy: %s (for acting; train --resume needs its checkpoint)\n",
                  info.exported.c_str());
    if (info.data_frames > 0)
      std::printf("trained on: %lld frames in %lld episodes%s\n", (long long)info.data_frames,
                  (long long)info.data_episodes,
                  info.data_fingerprint.empty()
                      ? ""
                      : str_cat(" (data fingerprint ", info.data_fingerprint, ")").c_str());
    if (!p.obs_keys.empty())
      std::printf("HDF5 observation keys: %s\n", join_commas(p.obs_keys).c_str());
    std::printf("config:\n%s\n", p.config.to_json().c_str());
    // To act elsewhere (the reference agent in Python) with the statistics the policy learnt on.
    std::printf("normalisation statistics (the JSON --stats takes):\n%s\n",
                p.normalizer.to_json().c_str());
    std::map<std::string, int64_t> groups;
    std::vector<std::string> order;
    for (const auto& [name, t] : p.policy->named_parameters()) {
      const std::string group = module_group(name);
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
  cmd->add_option("--out", o->out, "output directory")
      ->check(non_empty())
      ->transform(directory_name())
      ->capture_default_str();
  cmd->add_option("--demos", o->demos, "expert episodes to generate")
      ->check(positive())
      ->capture_default_str();
  cmd->add_option("--eval-episodes", o->eval_episodes, "closed-loop evaluation episodes")
      ->check(positive())
      ->capture_default_str();
  cmd->add_option("--n-action-steps", o->n_action_steps, "actions executed per chunk")
      ->check(positive())
      ->capture_default_str();
  cmd->add_flag("--baseline", o->baseline,
                "also train the same network with plain MSE regression and evaluate it");
  cmd->add_option("--threads", o->threads,
                  "threads (default 1: the demo's model is so small that a second thread only "
                  "adds synchronisation)")
      ->check(thread_count());
  cmd->callback([o] {
    set_threads(o->threads > 0 ? o->threads : 1);
    o->flags.read_config_file();
    const DemoTask task;
    TrainConfig config = o->flags.apply(demo_config(task));
    check_n_action_steps(config.policy, o->n_action_steps);  // before training, not after
    MMDIT_CHECK(!o->baseline || config.objective == "flow",
                "demo: --baseline trains the MSE baseline next to the flow policy; with "
                "--objective mse there is nothing to compare (drop one of the two)");
    // Every run's outputs are checked before any work: the baseline's run, when it is refused,
    // came after the demonstrations were generated, and the flow run's after the baseline trained.
    const std::vector<std::string> run_dirs =
        o->baseline ? std::vector<std::string>{path_in(o->out, "mse"), path_in(o->out, "flow")}
                    : std::vector<std::string>{path_in(o->out, config.objective)};
    for (const std::string& dir : run_dirs)
      check_run_outputs(dir, {{o->flags.config_file, "--config"}}, "demo");
    const DemoTask::Demos demos = task.generate_demos(o->demos, config.seed);
    const Episodes data{demos.states, demos.actions, demos.episode_starts};
    const std::unique_ptr<DirectoryLock> lock = lock_run_directory(o->out, "demo");
    save_lerobot_npz(path_in(o->out, "demos.npz"), data);
    int left = 0;
    for (int s : demos.sides) left += s < 0;
    std::printf(
        "generated %lld expert demonstrations (%d pass left, %lld right, %lld frames): %s\n",
        (long long)o->demos, left, (long long)o->demos - left, (long long)demos.states.shape()[0],
        path_in(o->out, "demos.npz").c_str());

    auto train_and_eval = [&](TrainConfig cfg, const std::string& dir, const char* label) {
      const std::unique_ptr<DirectoryLock> run_lock = lock_run_directory(dir, "demo");
      std::printf("\n== %s ==\n", label);
      Trainer trainer(cfg, data);
      std::printf("policy: %lld parameters\n", (long long)trainer.policy().num_parameters());
      const LoopResult r = run_training(
          trainer,
          {.out_dir = dir,
           .log_every = 500,
           .continue_command = "mmdit train --data " + shell_quoted(path_in(o->out, "demos.npz"))});
      if (r.stop_signal != 0) throw CLI::RuntimeError(128 + r.stop_signal);
      const LoadedPolicy policy = load_policy(checkpoint_path(dir));
      const auto result = evaluate_policy(task, policy, o->eval_episodes, o->n_action_steps, 1000);
      write_rollouts_svg(path_in(dir, "rollouts.svg"), task.config(), demos, result.trajectories,
                         result.succeeded, std::string(label) + ": closed-loop rollouts");
      if (!r.losses.has_step())
        std::printf("plot: %s/rollouts.svg\n", dir.c_str());
      else
        std::printf("plots: %s/loss.svg, %s/rollouts.svg\n", dir.c_str(), dir.c_str());
      return result;
    };
    DemoTask::EvalResult baseline;
    if (o->baseline) {
      TrainConfig mse = config;
      mse.objective = "mse";
      baseline = train_and_eval(mse, path_in(o->out, "mse"), "baseline: plain MSE regression");
      print_eval(baseline);
    }
    const bool flow = config.objective == "flow";
    const auto result = train_and_eval(config, path_in(o->out, config.objective),
                                       flow ? "flow matching" : "plain MSE regression");
    if (o->baseline)
      std::printf("\nMSE regression baseline (same network): success rate %s\n",
                  baseline.success_percent().c_str());
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
  add_import_eqx(app);
  add_export_eqx(app);
  add_export(app);
}

}  // namespace mmdit::cli
