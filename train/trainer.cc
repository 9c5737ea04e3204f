#include "train/trainer.h"

#include <nlohmann/json.hpp>

#include <charconv>
#include <cmath>
#include <functional>
#include <limits>

#include "autodiff/value_and_grad.h"
#include "tensor/safetensors.h"
#include "train/json_fields.h"

namespace mmdit {

using Json = nlohmann::json;

namespace {

constexpr const char* kCheckpointFormat = "mmdit-checkpoint/1";

}  // namespace

// ---- config ----
std::string TrainConfig::to_json() const {
  Json j = {{"policy", Json::parse(policy.to_json())},
            {"steps", steps},
            {"batch_size", batch_size},
            {"lr", lr},
            {"weight_decay", weight_decay},
            {"b1", b1},
            {"b2", b2},
            {"eps", eps},
            {"ema_decay", ema_decay},
            {"grad_clip", grad_clip},
            {"warmup_steps", warmup_steps},
            {"cosine_decay", cosine_decay},
            {"normalization", normalization},
            {"timestep_sampling", timestep_sampling},
            {"max_t", max_t},
            {"objective", objective},
            {"sample_steps", sample_steps},
            {"seed", seed}};
  return j.dump(2);
}

TrainConfig TrainConfig::from_json(const std::string& text, const TrainConfig& defaults) {
  Json j;
  try {
    j = Json::parse(text);
  } catch (const Json::exception& e) {
    fail("train config: not valid JSON: ", e.what());
  }
  MMDIT_CHECK(j.is_object(), "train config: expected a JSON object");
  TrainConfig c = defaults;
  for (auto& item : j.items()) {
    // Named, not a structured binding: Clang before 16 cannot capture one in the lambdas below.
    const std::string& key = item.key();
    const Json& value = item.value();
    auto number = [&](double& field) {
      MMDIT_CHECK(value.is_number(), "train config: '", key, "' must be a number, got ",
                  value.dump());
      field = value.get<double>();
    };
    auto integer = [&](int64_t& field) { field = json_int64(value, "train config", key); };
    auto text_field = [&](std::string& field) {
      MMDIT_CHECK(value.is_string(), "train config: '", key, "' must be a string, got ",
                  value.dump());
      field = value.get<std::string>();
    };
    if (key == "policy") {
      Json merged = Json::parse(c.policy.to_json());
      MMDIT_CHECK(value.is_object(), "train config: 'policy' must be an object");
      merged.update(value);
      c.policy = PolicyConfig::from_json(merged.dump());
    } else if (key == "steps")
      integer(c.steps);
    else if (key == "batch_size")
      integer(c.batch_size);
    else if (key == "lr")
      number(c.lr);
    else if (key == "weight_decay")
      number(c.weight_decay);
    else if (key == "b1")
      number(c.b1);
    else if (key == "b2")
      number(c.b2);
    else if (key == "eps")
      number(c.eps);
    else if (key == "ema_decay")
      number(c.ema_decay);
    else if (key == "grad_clip")
      number(c.grad_clip);
    else if (key == "warmup_steps")
      integer(c.warmup_steps);
    else if (key == "cosine_decay") {
      MMDIT_CHECK(value.is_boolean(), "train config: 'cosine_decay' must be true or false");
      c.cosine_decay = value.get<bool>();
    } else if (key == "normalization")
      text_field(c.normalization);
    else if (key == "timestep_sampling")
      text_field(c.timestep_sampling);
    else if (key == "max_t")
      number(c.max_t);
    else if (key == "objective")
      text_field(c.objective);
    else if (key == "sample_steps")
      integer(c.sample_steps);
    else if (key == "seed") {
      c.seed = json_uint64(value, "train config", key);
    } else {
      fail("train config: unknown key '", key, "'");
    }
  }
  c.validate();
  return c;
}

TrainConfig TrainConfig::from_json(const std::string& text) {
  return from_json(text, TrainConfig{});
}

void TrainConfig::validate() const {
  policy.validate();
  MMDIT_CHECK(steps >= 0, "train config: steps must be >= 0, got ", steps);
  MMDIT_CHECK(batch_size >= 1 && batch_size <= kMaxBatchSize,
              "train config: batch_size must be in [1, ", kMaxBatchSize, "], got ", batch_size);
  // Infinities pass the comparisons: lr = inf would turn the parameters into inf and NaN in
  // the first step without any error there.
  MMDIT_CHECK(lr > 0 && std::isfinite(lr), "train config: lr must be positive and finite, got ",
              lr);
  MMDIT_CHECK(weight_decay >= 0 && std::isfinite(weight_decay),
              "train config: weight_decay must be >= 0 and finite, got ", weight_decay);
  MMDIT_CHECK(b1 >= 0 && b1 < 1 && b2 >= 0 && b2 < 1, "train config: b1 and b2 must be in [0, 1)");
  MMDIT_CHECK(eps > 0 && std::isfinite(eps), "train config: eps must be positive and finite, got ",
              eps);
  MMDIT_CHECK(ema_decay >= 0 && ema_decay <= 1, "train config: ema_decay must be in [0, 1], got ",
              ema_decay);
  MMDIT_CHECK(grad_clip >= 0 && std::isfinite(grad_clip),
              "train config: grad_clip must be >= 0 and finite (0 = off), got ", grad_clip);
  MMDIT_CHECK(warmup_steps >= 0, "train config: warmup_steps must be >= 0");
  MMDIT_CHECK(normalization == "min_max" || normalization == "z_score",
              "train config: normalization must be min_max or z_score, got '", normalization, "'");
  MMDIT_CHECK(timestep_sampling == "uniform" || timestep_sampling == "logit_normal",
              "train config: timestep_sampling must be uniform or logit_normal, got '",
              timestep_sampling, "'");
  MMDIT_CHECK(objective == "flow" || objective == "mse",
              "train config: objective must be flow or mse, got '", objective, "'");
  MMDIT_CHECK(max_t > 0 && max_t <= 1, "train config: max_t must be in (0, 1], got ", max_t);
  // The sampler precomputes every step's conditioning: a hand-edited 10^12 would exhaust memory.
  MMDIT_CHECK(sample_steps >= 1 && sample_steps <= 10000,
              "train config: sample_steps must be in [1, 10000], got ", sample_steps);
}

Normalizer make_normalizer(const Episodes& data, const std::string& mode) {
  const NormStats s = compute_stats(data.states), a = compute_stats(data.actions);
  Normalizer n;
  n.mode = mode == "z_score" ? Normalizer::Mode::z_score : Normalizer::Mode::min_max;
  n.state_min = s.min, n.state_max = s.max, n.state_mean = s.mean, n.state_std = s.std;
  n.action_min = a.min, n.action_max = a.max, n.action_mean = a.mean, n.action_std = a.std;
  return n;
}

// ---- trainer ----
Trainer::Trainer(const TrainConfig& config, const Episodes& data)
    : config_(config), rng_(config.seed ^ 0x9E3779B97F4A7C15ull) {
  config_.validate();
  MMDIT_CHECK(data.state_dim() == config_.policy.state_dim, "train: the data's states have ",
              data.state_dim(), " dimensions but the policy's state_dim is ",
              config_.policy.state_dim);
  MMDIT_CHECK(data.act_dim() == config_.policy.act_dim, "train: the data's actions have ",
              data.act_dim(), " dimensions but the policy's act_dim is ", config_.policy.act_dim);
  normalizer_ = make_normalizer(data, config_.normalization);
  // Statistics a checkpoint could not be loaded with (a range that overflows float32) are
  // refused now, before any training or any file written.
  try {
    normalizer_.validate(config_.policy.state_dim, config_.policy.act_dim);
  } catch (const Error& e) {
    fail("train: the data's ", config_.normalization,
         " statistics cannot normalise it: ", e.what());
  }
  build_policy();
  sampler_ = std::make_unique<WindowSampler>(data, config_.policy.n_obs_steps,
                                             config_.policy.horizon, config_.seed);
}

Trainer::Trainer(const TrainConfig& config, const Normalizer& normalizer)
    : config_(config), rng_(config.seed ^ 0x9E3779B97F4A7C15ull) {
  config_.validate();
  build_policy();
  set_normalizer(normalizer);
}

void Trainer::build_policy() {
  Rng init(config_.seed);
  policy_ = std::make_unique<BCPolicy>(config_.policy, init);
  const NamedTensors params = policy_->named_parameters();
  optimizer_ = std::make_unique<AdamW>(
      params, AdamWConfig{config_.lr, config_.b1, config_.b2, config_.eps, config_.weight_decay});
  ema_ = std::make_unique<EMA>(params, config_.ema_decay);
}

FlowNoise Trainer::draw_noise(const Shape& action_shape) {
  const int64_t b = action_shape[0];
  FlowNoise noise;
  noise.x0 = rng_.normal(action_shape);
  if (config_.timestep_sampling == "logit_normal")
    noise.t = raw::mul_scalar(raw::unary(raw::UnaryOp::sigmoid, rng_.normal({b})), config_.max_t);
  else
    noise.t = rng_.uniform({b}, DType::f32, 0, config_.max_t);
  if (config_.policy.sigma > 0) noise.eps = rng_.normal(action_shape);
  return noise;
}

Tensor Trainer::loss(const BCPolicy& policy, const Batch& batch, const FlowNoise& noise) const {
  const Tensor state = normalizer_.normalize_state(batch.state);
  const Tensor action = normalizer_.normalize_action(batch.action);
  if (config_.objective == "mse")
    return regression_loss(policy, state, action, batch.action_is_pad);
  return flow_matching_loss(policy, state, action, batch.action_is_pad, noise);
}

StepStats Trainer::train_step() {
  // A step that throws leaves the trainer as it was, the random state and data order included:
  // a checkpoint saved after the throw is the one of the step before.
  MMDIT_CHECK(sampler_,
              "Trainer::train_step: this trainer was made without data; save its "
              "checkpoint and continue it with Trainer::resume(checkpoint, data)");
  const uint64_t rng_seed = rng_.seed(), rng_counter = rng_.counter();
  // Not a structured binding: Clang before 16 cannot capture one in the lambda.
  const std::pair<int64_t, int64_t> position = sampler_->position();
  const auto restore = [&] {
    rng_.set_state(rng_seed, rng_counter);
    sampler_->set_position(position.first, position.second);
  };
  try {
    const Batch batch = sampler_->next(config_.batch_size);
    const FlowNoise noise =
        config_.objective == "flow" ? draw_noise(batch.action.shape()) : FlowNoise();
    auto loss_fn = [&](BCPolicy& policy) { return loss(policy, batch, noise); };
    auto [loss_value, grads] = value_and_grad(loss_fn)(*policy_);
    StepStats stats;
    stats.loss = loss_value.item();
    MMDIT_CHECK(std::isfinite(stats.loss), "training step ", step() + 1, ": the loss is ",
                stats.loss, "; stopped before updating the parameters");
    stats.lr = warmup_cosine_lr(step(), config_.lr, config_.warmup_steps,
                                config_.cosine_decay ? config_.steps : 0);
    const NamedTensors params = policy_->named_parameters();
    // Clipping as optax.clip_by_global_norm, folded into the optimiser's pass over the gradients,
    // with the norm from the pass that checks them: a non-finite gradient is refused there,
    // before anything changes.
    try {
      stats.grad_norm =
          optimizer_->update_clipped(params, grads, stats.lr, config_.grad_clip, ema_.get());
    } catch (const OutOfMemory&) {
      throw;  // named with the batch size below
    } catch (const Error& e) {
      const std::string what = e.what(), prefix = "AdamW::update: ";
      fail("training step ", step() + 1, ": ",
           what.starts_with(prefix) ? what.substr(prefix.size()) : what);
    }
    return stats;
  } catch (const OutOfMemory& e) {
    restore();
    throw OutOfMemory(str_cat("training step ", step() + 1, " at batch_size ", config_.batch_size,
                              ": ", e.what()));
  } catch (...) {
    restore();
    throw;
  }
}

namespace {

// A checkpoint is a run's fallback, so a diverged state must never replace the last good one;
// and a file whose numbers are not finite is refused when it is read.
void check_finite(const NamedTensors& tensors, const std::string& path, const char* when) {
  for (const auto& [name, t] : tensors)
    if (const std::optional<NonFinite> bad = first_non_finite(t))
      fail(path, ": ", when, " '", name, "' holds ", bad->value, " at ", shape_str(bad->index));
}

}  // namespace

NamedTensors Trainer::checkpoint_tensors() const {
  NamedTensors tensors;
  for (const auto& [name, t] : policy_->named_parameters()) tensors.insert("param/" + name, t);
  for (const auto& [name, t] : ema_->params()) tensors.insert("ema/" + name, t);
  for (const auto& [name, t] : optimizer_->first_moments()) tensors.insert("adam_m/" + name, t);
  for (const auto& [name, t] : optimizer_->second_moments()) tensors.insert("adam_v/" + name, t);
  for (const auto& [name, t] : policy_->named_buffers()) tensors.insert("buffer/" + name, t);
  return tensors;
}

void Trainer::check_saveable(const std::string& what) const {
  check_finite(checkpoint_tensors(), what, "tensor");
}

void Trainer::save_checkpoint(const std::string& path) const {
  const NamedTensors tensors = checkpoint_tensors();
  // Without data, the data order is at its start and no data size is recorded: Trainer::resume
  // then takes any data of the policy's sizes.
  Json sampler = {{"epoch", 0}, {"offset", 0}};
  if (sampler_) {
    const auto [epoch, offset] = sampler_->position();
    sampler = {{"epoch", epoch},
               {"offset", offset},
               {"frames", sampler_->num_samples()},
               {"episodes", sampler_->num_episodes()}};
  }
  std::map<std::string, std::string> meta = {
      {"format", kCheckpointFormat},
      {"config", config_.to_json()},
      {"normalizer", normalizer_.to_json()},
      {"step", std::to_string(step())},
      {"rng", Json{{"seed", rng_.seed()}, {"counter", rng_.counter()}}.dump()},
      {"sampler", sampler.dump()}};
  if (!obs_keys_.empty()) meta["obs_keys"] = Json(obs_keys_).dump();
  check_finite(tensors, path, "not saved (the previous file, if any, is kept): tensor");
  save_safetensors(path, tensors, meta);
}

namespace {

const std::string& metadata_field(const std::map<std::string, std::string>& metadata,
                                  const std::string& key, const std::string& path) {
  auto it = metadata.find(key);
  MMDIT_CHECK(it != metadata.end(), path, ": not an mmdit checkpoint (no '", key,
              "' in its metadata)");
  return it->second;
}

// The metadata every reader needs: format, config, step, and the observation keys if recorded.
CheckpointInfo parse_info(const std::map<std::string, std::string>& metadata,
                          const std::string& path) {
  const auto meta = [&](const std::string& key) -> const std::string& {
    return metadata_field(metadata, key, path);
  };
  CheckpointInfo info;
  MMDIT_CHECK(meta("format") == kCheckpointFormat, path, ": checkpoint format '", meta("format"),
              "' is not ", kCheckpointFormat);
  try {
    info.config = TrainConfig::from_json(meta("config"));
  } catch (const Error& e) {
    fail(path, ": ", e.what());
  }
  const std::string& step = meta("step");
  const auto [end, error] = std::from_chars(step.data(), step.data() + step.size(), info.step);
  MMDIT_CHECK(error == std::errc() && end == step.data() + step.size() && info.step >= 0, path,
              ": bad step '", step, "' in the checkpoint metadata");
  // Older checkpoints, and those of .npz data, record no observation keys.
  if (const auto it = metadata.find("obs_keys"); it != metadata.end()) {
    const Json keys = Json::parse(it->second, nullptr, /*allow_exceptions=*/false);
    bool good = keys.is_array() && !keys.empty();
    for (size_t i = 0; good && i < keys.size(); ++i)
      good = keys[i].is_string() && !keys[i].get_ref<const std::string&>().empty();
    MMDIT_CHECK(good, path, ": the checkpoint metadata's obs_keys must be a JSON array of ",
                "observation key names, got '", it->second, "'");
    info.obs_keys = keys.get<std::vector<std::string>>();
  }
  return info;
}

struct CheckpointFile {
  SafetensorsFile file;
  TrainConfig config;
  Normalizer normalizer;  // validated against the config's state_dim and act_dim
  int64_t step = 0;
  std::vector<std::string> obs_keys;
  std::string path;

  NamedTensors with_prefix(const std::string& prefix) const {
    NamedTensors out;
    for (const auto& [name, t] : file.tensors)
      if (name.starts_with(prefix)) out.insert(name.substr(prefix.size()), t);
    return out;
  }
  const std::string& meta(const std::string& key) const {
    return metadata_field(file.metadata, key, path);
  }
};

CheckpointFile read_checkpoint(const std::string& path) {
  CheckpointFile c;
  c.path = path;
  // The metadata first: a file of another kind (a large model from another tool) is refused
  // before its tensors are read and converted.
  parse_info(load_safetensors_metadata(path), path);
  c.file = load_safetensors(path);
  CheckpointInfo info = parse_info(c.file.metadata, path);
  c.config = info.config;
  c.step = info.step;
  c.obs_keys = std::move(info.obs_keys);
  const std::string& normalizer = c.meta("normalizer");
  try {
    c.normalizer = Normalizer::from_json(normalizer);
    c.normalizer.validate(c.config.policy.state_dim, c.config.policy.act_dim);
  } catch (const Error& e) {
    fail(path, ": ", e.what());
  }
  // The model is built from the config before the parameters are read into it: a config that
  // does not describe these tensors (a corrupt or hand-edited file) fails here, on the tensors
  // each size setting shapes, not after allocating a model of whatever size it claims. Sizes
  // are compared as doubles, so an absurd product cannot overflow.
  const PolicyConfig& pc = c.config.policy;
  const auto expect = [&](const std::string& name, std::initializer_list<double> shape,
                          const char* settings) {
    MMDIT_CHECK(c.file.tensors.contains(name), path, ": the config describes a policy with '", name,
                "', which the checkpoint does not hold");
    const Shape& got = c.file.tensors.at(name).shape();
    bool same = got.size() == shape.size();
    for (size_t i = 0; same && i < got.size(); ++i)
      same = static_cast<double>(got[i]) == shape.begin()[i];
    MMDIT_CHECK(same, path, ": '", name, "' has shape ", shape_str(got),
                ", which does not match the config's ", settings);
  };
  const double hidden = static_cast<double>(pc.hidden_size);
  expect("param/state_encoder.weight", {hidden, double(pc.state_dim)}, "hidden_size and state_dim");
  expect("param/action_encoder.weight", {hidden, double(pc.act_dim)}, "hidden_size and act_dim");
  expect("buffer/state_pos_embed", {double(pc.n_obs_steps), hidden}, "n_obs_steps");
  expect("buffer/action_pos_embed", {double(pc.horizon), hidden}, "horizon");
  expect("param/mmdit.timestep_embeds.0.linear1.weight",
         {double(pc.dim_cond), double(pc.timestep_embed_dim)}, "dim_cond and timestep_embed_dim");
  expect("param/mmdit.blocks.0.joint_attn.to_qkv.0.weight",
         {3.0 * double(pc.heads) * double(pc.dim_head), hidden}, "heads and dim_head");
  expect("param/mmdit.blocks.0.feedforwards.0.linear_in.weight",
         {double(pc.ff_mult) * hidden, hidden}, "ff_mult");
  MMDIT_CHECK(
      c.file.tensors.contains(str_cat("param/mmdit.blocks.", pc.depth - 1, ".to_cond.weight")) &&
          !c.file.tensors.contains(str_cat("param/mmdit.blocks.", pc.depth, ".to_cond.weight")),
      path, ": the config's depth ", pc.depth, " does not match the checkpoint's blocks");
  return c;
}

// A policy of `config` holding `tensors` (parameters and buffers, copied in), frozen for acting.
LoadedPolicy frozen(const TrainConfig& config, const Normalizer& normalizer, int64_t step,
                    const NamedTensors& tensors, WeightPrecision weights) {
  LoadedPolicy p;
  p.config = config;
  p.step = step;
  p.normalizer = normalizer;
  Rng init(0);
  p.policy = std::make_unique<BCPolicy>(config.policy, init);
  p.policy->load(tensors, /*buffers=*/true);
  if (config.objective != "mse")
    p.sampler =
        std::make_unique<EulerSampler>(*p.policy, config.sample_steps, config.max_t, weights);
  return p;
}

// The policy's tensors as the checkpoint holds them: `weights` and the position tables, which
// are the file's too: those of a policy imported from the reference (mmdit import-eqx) were
// computed in float32 and differ from ours by up to 4e-6.
NamedTensors with_buffers(NamedTensors weights, const CheckpointFile& c) {
  for (const auto& [name, t] : c.with_prefix("buffer/")) weights.insert(name, t);
  return weights;
}

}  // namespace

std::unique_ptr<Trainer> Trainer::resume(const std::string& path, const Episodes& data,
                                         std::optional<int64_t> steps) {
  const CheckpointFile c = read_checkpoint(path);
  TrainConfig config = c.config;
  if (steps) {
    MMDIT_CHECK(*steps >= c.step, "resume: ", path, " is at step ", c.step,
                "; cannot train to step ", *steps);
    config.steps = *steps;
  }
  check_finite(c.file.tensors, path, "tensor");
  auto t = std::make_unique<Trainer>(config, data);
  t->normalizer_ = c.normalizer;
  t->obs_keys_ = c.obs_keys;
  auto load = [&](const char* prefix, const std::function<void(const NamedTensors&)>& into) {
    try {
      into(c.with_prefix(prefix));
    } catch (const Error& e) {
      fail(path, ": tensors '", prefix, "*': ", e.what());
    }
  };
  load("param/", [&](const NamedTensors& v) { t->policy_->load(with_buffers(v, c), true); });
  load("ema/", [&](const NamedTensors& v) { t->ema_->set(v); });
  try {
    t->optimizer_->set_state(c.step, c.with_prefix("adam_m/"), c.with_prefix("adam_v/"));
  } catch (const Error& e) {
    fail(path, ": tensors 'adam_m/*', 'adam_v/*': ", e.what());
  }
  Json sampler;
  // get<>() would wrap a negative number and truncate a fraction: the random state would then
  // differ from the one saved, silently.
  const auto whole = [&](const Json& j, const char* section, const char* key) {
    return json_uint64(j.at(key), str_cat("checkpoint metadata ", section).c_str(), key);
  };
  const auto count = [&](const Json& j, const char* key) {
    const int64_t n = json_int64(j.at(key), "checkpoint metadata sampler", key);
    MMDIT_CHECK(n >= 0, "checkpoint metadata sampler: '", key, "' must be >= 0, got ", n);
    return n;
  };
  try {
    const Json rng = Json::parse(c.meta("rng"));
    sampler = Json::parse(c.meta("sampler"));
    t->rng_.set_state(whole(rng, "rng", "seed"), whole(rng, "rng", "counter"));
    // Older checkpoints, and those of a trainer made without data, do not record its size.
    if (sampler.contains("frames")) {
      const int64_t frames = count(sampler, "frames"), episodes = count(sampler, "episodes");
      MMDIT_CHECK(frames == t->sampler_->num_samples() && episodes == t->sampler_->num_episodes(),
                  path, " was trained on ", frames, " frames in ", episodes,
                  " episodes; this data has ", t->sampler_->num_samples(), " in ",
                  t->sampler_->num_episodes(),
                  ": resume with the run's own data, or start a new run");
    }
    t->sampler_->set_position(count(sampler, "epoch"), count(sampler, "offset"));
  } catch (const Json::exception& e) {
    fail(path, ": bad random state in the checkpoint metadata: ", e.what());
  } catch (const Error& e) {
    if (std::string_view(e.what()).starts_with(path)) throw;
    fail(path, ": ", e.what());
  }
  return t;
}

LoadedPolicy load_policy(const std::string& path, bool use_ema, WeightPrecision weights) {
  const CheckpointFile c = read_checkpoint(path);
  // Only the flow objective's EulerSampler packs its weights; the regression acts unpacked, in
  // float32, and would ignore the request.
  MMDIT_CHECK(weights == WeightPrecision::f32 || c.config.objective == "flow", path,
              ": the policy's objective is '", c.config.objective, "', which acts with float32 ",
              "weights; ", precision_name(weights),
              " weights are for the flow objective's sampler only (load it with f32)");
  // Every tensor, not only those loaded: save_checkpoint writes none that is not finite, so one
  // anywhere means the file is damaged.
  check_finite(c.file.tensors, path, "tensor");
  const char* prefix = use_ema ? "ema/" : "param/";
  const NamedTensors weights_in_file = c.with_prefix(prefix);
  try {
    LoadedPolicy p =
        frozen(c.config, c.normalizer, c.step, with_buffers(weights_in_file, c), weights);
    p.obs_keys = c.obs_keys;
    return p;
  } catch (const Error& e) {
    fail(path, ": tensors '", prefix, "*': ", e.what());
  }
}

CheckpointInfo read_checkpoint_info(const std::string& path) {
  return parse_info(load_safetensors_metadata(path), path);
}

Tensor LoadedPolicy::act(const Tensor& observations_in, Rng& rng) const {
  const PolicyConfig& pc = config.policy;
  const Shape& shape = observations_in.shape();
  MMDIT_CHECK(observations_in.dim() == 3 && shape[0] >= 1 && shape[1] == pc.n_obs_steps &&
                  shape[2] == pc.state_dim,
              "act: observations have shape ", shape_str(shape), "; the policy takes (B, ",
              pc.n_obs_steps, ", ", pc.state_dim, "), B >= 1: the last ", pc.n_obs_steps,
              " states of each example, oldest first");
  MMDIT_CHECK(is_floating(observations_in.dtype()), "act: observations are ",
              dtype_name(observations_in.dtype()), "; expected float32 or float64");
  // Checked as given: a float64 1e300 becomes inf in float32, and is named as the number it is.
  if (const std::optional<NonFinite> bad = first_non_finite(observations_in))
    fail("act: observation (", bad->index[0], ", ", bad->index[1], ", ", bad->index[2], ") is ",
         bad->value);
  if (observations_in.dtype() == DType::f64) {
    const std::vector<double> given = observations_in.to_vector<double>();
    for (size_t i = 0; i < given.size(); ++i)
      if (std::fabs(given[i]) > std::numeric_limits<float>::max()) {
        const Shape at = unravel_index(static_cast<int64_t>(i), shape);
        fail("act: observation (", at[0], ", ", at[1], ", ", at[2], ") is ", given[i],
             ", past float32's range (the policy acts in float32)");
      }
  }
  const Tensor observations = raw::to_dtype(observations_in, DType::f32);
  const Tensor state = normalizer.normalize_state(observations);
  const int64_t b = shape[0];
  Tensor actions;
  if (config.objective == "mse") {
    actions = regress_actions(*policy, state);
  } else {
    const Tensor a0 = rng.normal({b, config.policy.horizon, config.policy.act_dim});
    actions = (*sampler)(state, a0, &rng);
  }
  // A robot must not receive NaN commands: a policy whose weights or inputs overflow says so.
  if (const std::optional<NonFinite> bad = first_non_finite(actions))
    fail("act: the policy's action (", bad->index[0], ", ", bad->index[1], ", ", bad->index[2],
         ") is ", bad->value, "; the observations may be far outside the training data's range");
  // Finite in the normalised range, the action can still overflow float32 in the data's units
  // (a far-out action times a wide range).
  const Tensor raw_actions = normalizer.unnormalize_action(actions);
  if (const std::optional<NonFinite> bad = first_non_finite(raw_actions)) {
    const Shape& i = bad->index;
    const size_t flat = static_cast<size_t>((i[0] * pc.horizon + i[1]) * pc.act_dim + i[2]);
    fail("act: the policy's action (", i[0], ", ", i[1], ", ", i[2], ") is ", bad->value,
         " in the data's units (", actions.to_vector<float>()[flat],
         " normalised): the normalizer's action statistics for dimension ", i[2],
         " overflow float32 there");
  }
  return raw_actions;
}

void Trainer::set_normalizer(const Normalizer& normalizer) {
  MMDIT_CHECK(step() == 0, "Trainer::set_normalizer: the run is at step ", step(),
              "; its statistics may change only before the first step");
  const char* mode = normalizer.mode == Normalizer::Mode::z_score ? "z_score" : "min_max";
  MMDIT_CHECK(config_.normalization == mode, "Trainer::set_normalizer: the statistics are for ",
              mode, " normalization, the config's is ", config_.normalization);
  // In float32, as the data's own statistics are kept and checkpoints hold them.
  const Normalizer f32 = normalizer.to(DType::f32);
  f32.validate(config_.policy.state_dim, config_.policy.act_dim);
  normalizer_ = f32;
}

LoadedPolicy Trainer::frozen_policy(bool use_ema) const {
  NamedTensors tensors = use_ema ? ema_->params() : policy_->named_parameters();
  for (const auto& [name, t] : policy_->named_buffers()) tensors.insert(name, t);
  LoadedPolicy p = frozen(config_, normalizer_, step(), tensors, WeightPrecision::f32);
  p.obs_keys = obs_keys_;
  return p;
}

ActionError action_error(const LoadedPolicy& policy, const Episodes& data, int64_t max_windows,
                         int64_t batch_size, uint64_t seed, Rng& rng) {
  const PolicyConfig& pc = policy.config.policy;
  MMDIT_CHECK(data.state_dim() == pc.state_dim && data.act_dim() == pc.act_dim,
              "action_error: the data's states and actions have ", data.state_dim(), " and ",
              data.act_dim(), " dimensions; the policy's state_dim and act_dim are ", pc.state_dim,
              " and ", pc.act_dim);
  MMDIT_CHECK(max_windows >= 0 && batch_size >= 1, "action_error: max_windows ", max_windows,
              " must be >= 0 and batch_size ", batch_size, " >= 1");
  const WindowSampler windows(data, pc.n_obs_steps, pc.horizon, seed);
  std::vector<int64_t> chosen = windows.permutation(0);
  if (max_windows > 0 && max_windows < static_cast<int64_t>(chosen.size()))
    chosen.resize(static_cast<size_t>(max_windows));
  const int64_t A = pc.act_dim, H = pc.horizon, now = pc.n_obs_steps - 1;
  std::vector<double> sum_per_dim(static_cast<size_t>(A), 0.0);
  double sum_now = 0;
  int64_t steps = 0, windows_now = 0;
  for (size_t begin = 0; begin < chosen.size(); begin += static_cast<size_t>(batch_size)) {
    const size_t end = std::min(chosen.size(), begin + static_cast<size_t>(batch_size));
    const Batch batch = windows.get({chosen.begin() + begin, chosen.begin() + end});
    const std::vector<float> acted = policy.act(batch.state, rng).to_vector<float>();
    const std::vector<float> shown = batch.action.to_vector<float>();
    const std::vector<bool> pad = batch.action_is_pad.to_vector<bool>();
    for (size_t w = 0; w < end - begin; ++w)
      for (int64_t t = 0; t < H; ++t) {
        if (pad[w * H + t]) continue;
        ++steps;
        double squares = 0;
        for (int64_t j = 0; j < A; ++j) {
          const size_t i = (w * H + t) * A + j;
          const double d = static_cast<double>(acted[i]) - shown[i];
          sum_per_dim[j] += d * d;
          squares += d * d;
        }
        if (t == now) {
          sum_now += squares / A;
          ++windows_now;
        }
      }
  }
  ActionError e;
  e.windows = static_cast<int64_t>(chosen.size());
  for (const double s : sum_per_dim) {
    e.mse_per_dim.push_back(s / std::max<int64_t>(steps, 1));
    e.mse += s / std::max<int64_t>(steps * A, 1);
  }
  // NaN when there was no window to act on.
  e.mse_now = windows_now > 0 ? sum_now / windows_now : std::numeric_limits<double>::quiet_NaN();
  return e;
}

}  // namespace mmdit
