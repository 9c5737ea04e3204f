#include "train/config.h"

#include <nlohmann/json.hpp>

#include <cmath>

#include "train/dataset.h"
#include "train/json_fields.h"

namespace mmdit {

using Json = nlohmann::json;

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

}  // namespace mmdit
