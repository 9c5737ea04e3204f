#include "train/training_state.h"

#include <nlohmann/json.hpp>

#include <charconv>

#include "tensor/file_io.h"
#include "tensor/ops.h"
#include "train/json_fields.h"

namespace mmdit {

using Json = nlohmann::json;

NamedTensors with_prefix(const NamedTensors& tensors, const std::string& prefix) {
  NamedTensors out;
  for (const auto& [name, t] : tensors)
    if (name.starts_with(prefix)) out.insert(name.substr(prefix.size()), t);
  return out;
}

namespace {

constexpr const char* kOwnKeys[] = {"format", "step", "rng"};

void check_format(const std::map<std::string, std::string>& metadata, const std::string& path) {
  const auto it = metadata.find("format");
  MMDIT_CHECK(it != metadata.end(), path,
              ": not a training state (no 'format' in its metadata; TrainingState::save and "
              "mmdit train write one)");
  MMDIT_CHECK(it->second == kTrainingStateFormat || it->second == kCheckpointFormat, path,
              ": format '", it->second, "' is neither ", kTrainingStateFormat, " nor ",
              kCheckpointFormat);
}

}  // namespace

std::string rng_state_json(const Rng& rng) {
  return Json{{"seed", rng.seed()}, {"counter", rng.counter()}}.dump();
}

void set_rng_state(Rng& rng, const std::string& json, const std::string& path) {
  // get<>() would wrap a negative number and truncate a fraction: the random state would then
  // differ from the one saved, silently.
  const Json state = Json::parse(json, nullptr, /*allow_exceptions=*/false);
  MMDIT_CHECK(state.is_object() && state.contains("seed") && state.contains("counter"), path,
              ": checkpoint metadata rng: expected {\"seed\": ..., \"counter\": ...}, got '", json,
              "'");
  try {
    rng.set_state(json_uint64(state.at("seed"), "checkpoint metadata rng", "seed"),
                  json_uint64(state.at("counter"), "checkpoint metadata rng", "counter"));
  } catch (const Error& e) {
    fail(path, ": ", e.what());
  }
}

int64_t read_step(const std::map<std::string, std::string>& metadata, const std::string& path) {
  const auto it = metadata.find("step");
  MMDIT_CHECK(it != metadata.end(), path, ": no 'step' in the checkpoint metadata");
  const std::string& text = it->second;
  int64_t step = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), step);
  MMDIT_CHECK(error == std::errc() && end == text.data() + text.size() && step >= 0, path,
              ": bad step '", text, "' in the checkpoint metadata");
  return step;
}

void check_finite(const NamedTensors& tensors, const std::string& path, const char* when) {
  for (const auto& [name, t] : tensors)
    if (const std::optional<NonFinite> bad = first_non_finite(t))
      fail(path, ": ", when, " '", name, "' holds ", bad->value, " at ", shape_str(bad->index));
}

NamedTensors TrainingState::tensors() const {
  NamedTensors out;
  const auto add = [&](const std::string& prefix, const NamedTensors& part) {
    for (const auto& [name, t] : part) out.insert(prefix + name, t);
  };
  add("param/", model.named_parameters());
  if (ema) add("ema/", ema->params());
  if (optimizer) {
    add("adam_m/", optimizer->first_moments());
    add("adam_v/", optimizer->second_moments());
  }
  add("buffer/", model.named_buffers());
  return out;
}

void TrainingState::check_saveable(const std::string& what) const {
  check_finite(tensors(), what, "tensor");
}

void TrainingState::save(const std::string& path,
                         const std::map<std::string, std::string>& metadata) const {
  for (const char* key : kOwnKeys)
    MMDIT_CHECK(!metadata.contains(key), path, ": not saved: the metadata key '", key,
                "' is the format's own; give yours another name");
  std::map<std::string, std::string> meta = metadata;
  meta["format"] = kTrainingStateFormat;
  if (optimizer) meta["step"] = std::to_string(optimizer->step());
  if (rng) meta["rng"] = rng_state_json(*rng);
  const NamedTensors all = tensors();
  check_finite(all, path, "not saved (the previous file, if any, is kept): tensor");
  save_safetensors(path, all, meta);
  // A run killed while saving leaves its temporary file, as large as the state: a loop that is
  // stopped and restarted again and again would fill the disk with them.
  remove_stale_temp_files(path);
}

std::map<std::string, std::string> TrainingState::load(const std::string& path) {
  // The metadata first: a file of another kind (a large model from another tool) is refused
  // before its tensors are read and converted.
  check_format(load_safetensors_metadata(path), path);
  const SafetensorsFile file = load_safetensors(path);
  restore(file, path);
  std::map<std::string, std::string> theirs = file.metadata;
  for (const char* key : kOwnKeys) theirs.erase(key);
  return theirs;
}

void TrainingState::restore(const SafetensorsFile& file, const std::string& path) {
  check_format(file.metadata, path);
  const auto require = [&](bool given, const char* prefix, const char* part) {
    MMDIT_CHECK(!given || !with_prefix(file.tensors, prefix).empty(), path, ": holds no ", part,
                " ('", prefix, "*' tensors): it was saved without one");
  };
  // An EMA or optimiser of no parameters (a model of buffers alone) saves no tensors.
  require(ema != nullptr && !ema->params().empty(), "ema/", "EMA");
  require(optimizer != nullptr && !optimizer->first_moments().empty(), "adam_m/",
          "optimiser state");
  MMDIT_CHECK(!optimizer || file.metadata.contains("step"), path,
              ": holds no optimiser state (no 'step' in its metadata): it was saved without one");
  const int64_t step = optimizer ? read_step(file.metadata, path) : 0;
  Rng restored_rng;
  if (rng) {
    const auto it = file.metadata.find("rng");
    MMDIT_CHECK(it != file.metadata.end(), path,
                ": holds no random state ('rng' in its metadata): it was saved without one");
    set_rng_state(restored_rng, it->second, path);
  }
  // Every tensor, not only those read: save() writes none that is not finite, so one anywhere
  // means the file is damaged.
  check_finite(file.tensors, path, "tensor");

  NamedTensors weights = with_prefix(file.tensors, "param/");
  for (const auto& [name, t] : with_prefix(file.tensors, "buffer/")) weights.insert(name, t);
  // Each part checks everything before it changes anything; what a later part refuses undoes
  // the earlier ones. EMA::set replaces its tensors rather than writing into them, so holding
  // the old handles keeps the old values.
  NamedTensors model_before;
  for (const auto& [name, t] : model.named_parameters()) model_before.insert(name, raw::clone(t));
  for (const auto& [name, t] : model.named_buffers()) model_before.insert(name, raw::clone(t));
  const NamedTensors ema_before = ema ? ema->params() : NamedTensors();
  const char* part = "param/*', 'buffer/*";
  bool model_loaded = false, ema_set = false;
  try {
    model.load(weights, /*buffers=*/true);
    model_loaded = true;
    if (ema) {
      part = "ema/*";
      ema->set(with_prefix(file.tensors, "ema/"));
      ema_set = true;
    }
    if (optimizer) {
      part = "adam_m/*', 'adam_v/*";
      optimizer->set_state(step, with_prefix(file.tensors, "adam_m/"),
                           with_prefix(file.tensors, "adam_v/"));
    }
  } catch (const Error& e) {
    // Only what was read is undone: the part that threw changed nothing, and the values put
    // back passed these checks before (a live state may hold a NaN, which set_state refuses).
    if (model_loaded) model.load(model_before, /*buffers=*/true);
    if (ema_set) ema->set(ema_before);
    fail(path, ": tensors '", part, "': ", e.what());
  }
  if (rng) *rng = restored_rng;
}

void load_weights(const std::string& path, nn::Module& model, bool use_ema) {
  check_format(load_safetensors_metadata(path), path);
  const SafetensorsFile file = load_safetensors(path);
  const char* prefix = use_ema ? "ema/" : "param/";
  MMDIT_CHECK(
      !use_ema || !with_prefix(file.tensors, "ema/").empty() || model.named_parameters().empty(),
      path, ": holds no EMA ('ema/*' tensors); load its parameters (use_ema false)");
  check_finite(file.tensors, path, "tensor");
  NamedTensors weights = with_prefix(file.tensors, prefix);
  for (const auto& [name, t] : with_prefix(file.tensors, "buffer/")) weights.insert(name, t);
  try {
    model.load(weights, /*buffers=*/true);
  } catch (const Error& e) {
    fail(path, ": tensors '", prefix, "*': ", e.what());
  }
}

}  // namespace mmdit
