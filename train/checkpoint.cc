// The checkpoint format, "mmdit-checkpoint/1": a TrainingState of the policy, its AdamW, EMA and
// random generator (train/training_state.h: the parameters "param/", their EMA "ema/", AdamW's
// moments "adam_m/", "adam_v/", the buffers "buffer/", the step and the random state), with
// metadata for the config, the normalisation, the data's position and size, and the observation
// keys.
#include "train/checkpoint.h"

#include <nlohmann/json.hpp>

#include "tensor/safetensors.h"
#include "train/json_fields.h"
#include "train/trainer.h"
#include "train/training_state.h"

namespace mmdit {

using Json = nlohmann::json;

TrainingState Trainer::training_state() const {
  return {.model = *policy_, .optimizer = optimizer_.get(), .ema = ema_.get()};
}

void Trainer::check_saveable(const std::string& what) const {
  training_state().check_saveable(what);
}

void Trainer::save_checkpoint(const std::string& path) const {
  const NamedTensors tensors = training_state().tensors();
  // Without data, the data order is at its start and no data size is recorded: Trainer::resume
  // then takes any data of the policy's sizes.
  Json sampler = {{"epoch", 0}, {"offset", 0}};
  if (sampler_) {
    const auto [epoch, offset] = sampler_->position();
    sampler = {{"epoch", epoch},
               {"offset", offset},
               {"frames", sampler_->num_frames()},
               {"episodes", sampler_->num_episodes()},
               {"fingerprint", data_fingerprint_}};
  }
  std::map<std::string, std::string> meta = {
      {"format", kCheckpointFormat},         {"config", config_.to_json()},
      {"normalizer", normalizer_.to_json()}, {"step", std::to_string(step())},
      {"rng", rng_state_json(rng_)},         {"sampler", sampler.dump()}};
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

int64_t sampler_count(const Json& sampler, const char* key) {
  const int64_t n = json_int64(sampler.at(key), "checkpoint metadata sampler", key);
  MMDIT_CHECK(n >= 0, "checkpoint metadata sampler: '", key, "' must be >= 0, got ", n);
  return n;
}

// The metadata every reader needs: format, config, step, and what is recorded of the
// observation keys and the data.
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
  info.step = read_step(metadata, path);
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
  if (const auto it = metadata.find("exported"); it != metadata.end()) info.exported = it->second;
  // Older checkpoints, and those of a trainer made without data, do not record its size; those
  // from before the fingerprint was kept, not that.
  if (const auto it = metadata.find("sampler"); it != metadata.end()) {
    const Json sampler = Json::parse(it->second, nullptr, /*allow_exceptions=*/false);
    MMDIT_CHECK(sampler.is_object(), path,
                ": the checkpoint metadata's sampler must be a JSON object, got '", it->second,
                "'");
    try {
      if (sampler.contains("frames")) {
        info.data_frames = sampler_count(sampler, "frames");
        info.data_episodes = sampler_count(sampler, "episodes");
      }
      if (sampler.contains("fingerprint")) {
        const Json& recorded = sampler.at("fingerprint");
        MMDIT_CHECK(recorded.is_string(),
                    "checkpoint metadata sampler: 'fingerprint' must be a string, got ",
                    recorded.dump());
        info.data_fingerprint = recorded.get<std::string>();
      }
    } catch (const Json::exception& e) {
      fail(path, ": bad data record in the checkpoint metadata: ", e.what());
    } catch (const Error& e) {
      fail(path, ": ", e.what());
    }
  }
  return info;
}

struct CheckpointFile {
  SafetensorsFile file;
  TrainConfig config;
  CheckpointInfo info;    // config, step, observation keys, data record, export label
  Normalizer normalizer;  // validated against the config's state_dim and act_dim
  std::string path;

  NamedTensors with_prefix(const std::string& prefix) const {
    return mmdit::with_prefix(file.tensors, prefix);
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
  c.info = parse_info(c.file.metadata, path);
  const std::string& normalizer = c.meta("normalizer");
  try {
    c.normalizer = Normalizer::from_json(normalizer);
    c.normalizer.validate(c.info.config.policy.state_dim, c.info.config.policy.act_dim);
  } catch (const Error& e) {
    fail(path, ": ", e.what());
  }
  // The model is built from the config before the parameters are read into it: a config that
  // does not describe these tensors (a corrupt or hand-edited file) fails here, on the tensors
  // each size setting shapes, not after allocating a model of whatever size it claims. Sizes
  // are compared as doubles, so an absurd product cannot overflow.
  const PolicyConfig& pc = c.info.config.policy;
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
  // An exported policy holds one set of weights, the EMA's or the parameters.
  const std::string weights =
      c.file.tensors.contains("param/state_encoder.weight") ? "param/" : "ema/";
  const double hidden = static_cast<double>(pc.hidden_size);
  expect(weights + "state_encoder.weight", {hidden, double(pc.state_dim)},
         "hidden_size and state_dim");
  expect(weights + "action_encoder.weight", {hidden, double(pc.act_dim)},
         "hidden_size and act_dim");
  expect("buffer/state_pos_embed", {double(pc.n_obs_steps), hidden}, "n_obs_steps");
  expect("buffer/action_pos_embed", {double(pc.horizon), hidden}, "horizon");
  expect(weights + "mmdit.timestep_embeds.0.linear1.weight",
         {double(pc.dim_cond), double(pc.timestep_embed_dim)}, "dim_cond and timestep_embed_dim");
  expect(weights + "mmdit.blocks.0.joint_attn.to_qkv.0.weight",
         {3.0 * double(pc.heads) * double(pc.dim_head), hidden}, "heads and dim_head");
  expect(weights + "mmdit.blocks.0.feedforwards.0.linear_in.weight",
         {double(pc.ff_mult) * hidden, hidden}, "ff_mult");
  MMDIT_CHECK(
      c.file.tensors.contains(str_cat(weights, "mmdit.blocks.", pc.depth - 1, ".to_cond.weight")) &&
          !c.file.tensors.contains(str_cat(weights, "mmdit.blocks.", pc.depth, ".to_cond.weight")),
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
  check_resumable(c.info, path);
  TrainConfig config = c.info.config;
  if (steps) {
    MMDIT_CHECK(*steps >= c.info.step, "resume: ", path, " is at step ", c.info.step,
                "; cannot train to step ", *steps);
    config.steps = *steps;
  }
  auto t = std::make_unique<Trainer>(config, data);
  t->normalizer_ = c.normalizer;
  t->obs_keys_ = c.info.obs_keys;
  TrainingState{
      .model = *t->policy_, .optimizer = t->optimizer_.get(), .ema = t->ema_.get(), .rng = &t->rng_}
      .restore(c.file, path);
  const CheckpointInfo& info = c.info;  // its data record
  MMDIT_CHECK(info.data_frames == 0 || (info.data_frames == t->sampler_->num_frames() &&
                                        info.data_episodes == t->sampler_->num_episodes()),
              path, " was trained on ", info.data_frames, " frames in ", info.data_episodes,
              " episodes; this data has ", t->sampler_->num_frames(), " in ",
              t->sampler_->num_episodes(), ": resume with the run's own data, or start a new run");
  MMDIT_CHECK(info.data_fingerprint.empty() || info.data_fingerprint == t->data_fingerprint_, path,
              " was trained on other data of this size (data fingerprint ", info.data_fingerprint,
              "; this data's is ", t->data_fingerprint_,
              "): resume with the run's own data, or start a new run");
  try {
    const Json sampler = Json::parse(c.meta("sampler"));
    t->sampler_->set_position(sampler_count(sampler, "epoch"), sampler_count(sampler, "offset"));
  } catch (const Json::exception& e) {
    fail(path, ": bad data position in the checkpoint metadata: ", e.what());
  } catch (const Error& e) {
    fail(path, ": ", e.what());
  }
  return t;
}

LoadedPolicy load_policy(const std::string& path, bool use_ema, WeightPrecision weights,
                         int64_t sample_steps) {
  MMDIT_CHECK(sample_steps >= 0 && sample_steps <= 10000, path,
              ": sample_steps must be in [1, 10000], or 0 for the config's; got ", sample_steps);
  CheckpointFile c = read_checkpoint(path);
  // Only the flow objective has a sampler; the regression acts in one pass, unpacked, in
  // float32, and would ignore either request.
  TrainConfig& config = c.info.config;
  MMDIT_CHECK(weights == WeightPrecision::f32 || config.objective == "flow", path,
              ": the policy's objective is '", config.objective, "', which acts with float32 ",
              "weights; ", precision_name(weights),
              " weights are for the flow objective's sampler only (load it with f32)");
  MMDIT_CHECK(sample_steps == 0 || config.objective == "flow", path,
              ": the policy's objective is '", config.objective,
              "', which regresses its actions in one pass; sample_steps are for the flow "
              "objective's sampler only");
  if (sample_steps > 0) config.sample_steps = sample_steps;
  // Every tensor, not only those loaded: save_checkpoint writes none that is not finite, so one
  // anywhere means the file is damaged.
  check_finite(c.file.tensors, path, "tensor");
  const char* prefix = use_ema ? "ema/" : "param/";
  const NamedTensors weights_in_file = c.with_prefix(prefix);
  MMDIT_CHECK(!weights_in_file.empty(), path, ": holds no '", prefix,
              "*' weights (it was exported ",
              use_ema ? "without the EMA; load its parameters, --no-ema"
                      : "with the EMA's alone; load those, without --no-ema",
              ")");
  try {
    LoadedPolicy p =
        frozen(config, c.normalizer, c.info.step, with_buffers(weights_in_file, c), weights);
    p.obs_keys = c.info.obs_keys;
    return p;
  } catch (const Error& e) {
    fail(path, ": tensors '", prefix, "*': ", e.what());
  }
}

void check_resumable(const CheckpointInfo& info, const std::string& path) {
  MMDIT_CHECK(info.exported.empty(), path, ": an exported policy (", info.exported,
              ", for acting) has no optimiser state to resume from: resume the checkpoint it was "
              "exported from");
}

void export_policy(const std::string& path, const std::string& out, bool use_ema,
                   StoredFloats floats) {
  const CheckpointFile c = read_checkpoint(path);
  // Exported again, a bfloat16 export would be labelled float32, holding bfloat16's values.
  MMDIT_CHECK(c.info.exported.empty(), path, " is an exported policy (", c.info.exported,
              "): export from the checkpoint it was exported from");
  check_finite(c.file.tensors, path, "tensor");
  const std::string prefix = use_ema ? "ema/" : "param/";
  NamedTensors tensors;
  for (const auto& [name, t] : c.file.tensors)
    if (name.starts_with(prefix) || name.starts_with("buffer/")) tensors.insert(name, t);
  MMDIT_CHECK(tensors.contains(prefix + "state_encoder.weight"), path, ": holds no '", prefix,
              "*' weights to export");
  std::map<std::string, std::string> metadata = c.file.metadata;
  // What only a resumed run needs. The sampler's record stays: it says what data the policy
  // was trained on.
  metadata.erase("rng");
  metadata["exported"] =
      str_cat(use_ema ? "EMA" : "parameters", floats == StoredFloats::bf16 ? " in bfloat16" : "");
  save_safetensors(out, tensors, metadata, floats);
}

CheckpointInfo read_checkpoint_info(const std::string& path) {
  return parse_info(load_safetensors_metadata(path), path);
}

LoadedPolicy Trainer::frozen_policy(bool use_ema) const {
  NamedTensors tensors = use_ema ? ema_->params() : policy_->named_parameters();
  for (const auto& [name, t] : policy_->named_buffers()) tensors.insert(name, t);
  LoadedPolicy p = frozen(config_, normalizer_, step(), tensors, WeightPrecision::f32);
  p.obs_keys = obs_keys_;
  return p;
}

Tensor LoadedPolicy::act(const Tensor& observations_in, Rng& rng) const {
  const PolicyConfig& pc = config.policy;
  const Shape& shape = observations_in.shape();
  // One example, as the reference's per-example policy takes it: a batch of one, with the
  // batch index left out of messages and of the result.
  const bool one_example = shape == Shape{pc.n_obs_steps, pc.state_dim};
  MMDIT_CHECK(one_example || (observations_in.dim() == 3 && shape[0] >= 1 &&
                              shape[1] == pc.n_obs_steps && shape[2] == pc.state_dim),
              "act: observations have shape ", shape_str(shape), "; the policy takes (B, ",
              pc.n_obs_steps, ", ", pc.state_dim, "), B >= 1, or (", pc.n_obs_steps, ", ",
              pc.state_dim, ") for one example: the last ", pc.n_obs_steps,
              " states of each example, oldest first");
  MMDIT_CHECK(is_floating(observations_in.dtype()), "act: observations are ",
              dtype_name(observations_in.dtype()), "; expected float32 or float64");
  const Tensor given = one_example ? raw::unsqueeze(observations_in, 0) : observations_in;
  auto at = [&](const Shape& i) {
    return one_example ? str_cat("(", i[1], ", ", i[2], ")")
                       : str_cat("(", i[0], ", ", i[1], ", ", i[2], ")");
  };
  if (const std::optional<NonFinite> bad = first_non_finite(given))
    fail("act: observation ", at(bad->index), " is ", bad->value);
  const Tensor observations = raw::to_dtype(given, DType::f32);
  // Finite as given but not in float32: a float64 1e300, named as the number it is.
  if (const std::optional<NonFinite> bad = first_non_finite(observations)) {
    const Shape& i = bad->index;
    const double value = given.to_vector<double>()[static_cast<size_t>(
        (i[0] * pc.n_obs_steps + i[1]) * pc.state_dim + i[2])];
    fail("act: observation ", at(i), " is ", value,
         ", past float32's range (the policy acts in float32)");
  }
  const Tensor state = normalizer.normalize_state(observations);
  const int64_t b = observations.size(0);
  Tensor actions;
  if (config.objective == "mse") {
    actions = regress_actions(*policy, state);
  } else {
    const Tensor a0 = rng.normal({b, config.policy.horizon, config.policy.act_dim});
    actions = (*sampler)(state, a0, &rng);
  }
  // A robot must not receive NaN commands: a policy whose weights or inputs overflow says so.
  if (const std::optional<NonFinite> bad = first_non_finite(actions))
    fail("act: the policy's action ", at(bad->index), " is ", bad->value,
         "; the observations may be far outside the training data's range");
  // Finite in the normalised range, the action can still overflow float32 in the data's units
  // (a far-out action times a wide range).
  const Tensor raw_actions = normalizer.unnormalize_action(actions);
  if (const std::optional<NonFinite> bad = first_non_finite(raw_actions)) {
    const Shape& i = bad->index;
    const size_t flat = static_cast<size_t>((i[0] * pc.horizon + i[1]) * pc.act_dim + i[2]);
    fail("act: the policy's action ", at(i), " is ", bad->value, " in the data's units (",
         actions.to_vector<float>()[flat],
         " normalised): the normalizer's action statistics for dimension ", i[2],
         " overflow float32 there");
  }
  return one_example ? raw::squeeze(raw_actions, 0) : raw_actions;
}

}  // namespace mmdit
