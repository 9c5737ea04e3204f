#include "train/policy.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>

#include "nn/functional.h"
#include "tensor/parallel.h"
#include "train/json_fields.h"

namespace mmdit {

using Json = nlohmann::json;

// ---- config ----
std::string PolicyConfig::to_json() const {
  Json j = {{"n_obs_steps", n_obs_steps}, {"state_dim", state_dim},
            {"horizon", horizon},         {"act_dim", act_dim},
            {"hidden_size", hidden_size}, {"depth", depth},
            {"dim_cond", dim_cond},       {"timestep_embed_dim", timestep_embed_dim},
            {"dim_head", dim_head},       {"heads", heads},
            {"ff_mult", ff_mult},         {"sigma", sigma}};
  return j.dump();
}

PolicyConfig PolicyConfig::from_json(const std::string& text) {
  PolicyConfig c;
  Json j;
  try {
    j = Json::parse(text);
  } catch (const Json::exception& e) {
    fail("policy config: not valid JSON: ", e.what());
  }
  MMDIT_CHECK(j.is_object(), "policy config: expected a JSON object");
  for (auto& item : j.items()) {
    // Named, not a structured binding: Clang before 16 cannot capture one in the lambdas below.
    const std::string& key = item.key();
    const Json& value = item.value();
    auto as_int = [&](int64_t& field) { field = json_int64(value, "policy config", key); };
    if (key == "n_obs_steps")
      as_int(c.n_obs_steps);
    else if (key == "state_dim")
      as_int(c.state_dim);
    else if (key == "horizon")
      as_int(c.horizon);
    else if (key == "act_dim")
      as_int(c.act_dim);
    else if (key == "hidden_size")
      as_int(c.hidden_size);
    else if (key == "depth")
      as_int(c.depth);
    else if (key == "dim_cond")
      as_int(c.dim_cond);
    else if (key == "timestep_embed_dim")
      as_int(c.timestep_embed_dim);
    else if (key == "dim_head")
      as_int(c.dim_head);
    else if (key == "heads")
      as_int(c.heads);
    else if (key == "ff_mult")
      as_int(c.ff_mult);
    else if (key == "sigma") {
      MMDIT_CHECK(value.is_number(), "policy config: 'sigma' must be a number");
      c.sigma = value.get<double>();
    } else {
      fail("policy config: unknown key '", key, "'");
    }
  }
  c.validate();
  return c;
}

void PolicyConfig::validate() const {
  const char* who = "policy config";
  check_positive(who, "n_obs_steps", n_obs_steps);
  check_positive(who, "state_dim", state_dim);
  check_positive(who, "horizon", horizon);
  check_positive(who, "act_dim", act_dim);
  check_positive(who, "hidden_size", hidden_size);
  check_positive(who, "depth", depth);
  check_positive(who, "dim_cond", dim_cond);
  check_positive(who, "timestep_embed_dim", timestep_embed_dim);
  check_positive(who, "dim_head", dim_head);
  check_positive(who, "heads", heads);
  check_positive(who, "ff_mult", ff_mult);
  // Both are positive here, so the difference cannot overflow, nor can a huge value wrap the sum.
  MMDIT_CHECK(horizon <= kMaxTokens - n_obs_steps, who, ": n_obs_steps + horizon must be at most ",
              kMaxTokens, " tokens (attention holds their square), got ", n_obs_steps, " + ",
              horizon);
  // The action for now is the chunk's index n_obs_steps - 1: a shorter chunk trains, but no
  // controller can act on it.
  MMDIT_CHECK(horizon >= n_obs_steps, who, ": horizon ", horizon, " is shorter than n_obs_steps ",
              n_obs_steps, ": the chunk must hold the action for now, its index n_obs_steps - 1");
  MMDIT_CHECK(dim_head % 2 == 0, "policy config: dim_head must be even (rotary embedding), got ",
              dim_head);
  // Finite too: JSON has no inf, and a config that cannot be written back cannot be resumed.
  MMDIT_CHECK(sigma >= 0 && std::isfinite(sigma),
              "policy config: sigma must be finite and >= 0, got ", sigma);
}

// ---- normalisation ----
namespace {

// (x - mean) / (std + 1e-8): the 1e-8, as LeRobot's, keeps a constant dimension (an unused
// gripper, a fixed height) at 0 instead of 0/0.
Tensor standardize(const Tensor& x, const Tensor& mean, const Tensor& std) {
  return raw::div(raw::sub(x, mean), raw::add_scalar(std, 1e-8));
}

Tensor minmax_to_unit(const Tensor& x, const Tensor& lo, const Tensor& hi) {
  // 2 (x - min) / (max - min + 1e-8) - 1
  return raw::add_scalar(
      raw::mul_scalar(raw::div(raw::sub(x, lo), raw::add_scalar(raw::sub(hi, lo), 1e-8)), 2.0),
      -1.0);
}

Json tensor_json(const Tensor& t) {
  if (!t.defined()) return nullptr;
  return t.to_vector<double>();
}

Tensor tensor_from_json(const Json& j, const char* name) {
  if (j.is_null()) return Tensor();
  MMDIT_CHECK(j.is_array(), "normalizer: '", name, "' must be an array of numbers");
  std::vector<double> v;
  for (const Json& x : j) {
    MMDIT_CHECK(x.is_number(), "normalizer: '", name, "' must be an array of numbers");
    v.push_back(x.get<double>());
  }
  return from_vector(v, {static_cast<int64_t>(v.size())}, DType::f32);
}

// A last axis of 1 would broadcast over every dimension, and the policy accept the result.
void check_dims(const char* op, const Tensor& x, const Tensor& stats, const char* what) {
  MMDIT_CHECK(stats.defined(), op, ": the normalizer has no ", what, " statistics");
  check_float(x, op);
  MMDIT_CHECK(x.dim() >= 1 && x.shape().back() == stats.numel(), op, ": input has shape ",
              shape_str(x.shape()), "; its last axis must be the ", stats.numel(), " ", what,
              " dimensions");
}
}  // namespace

Tensor Normalizer::normalize_state(const Tensor& s) const {
  check_dims("Normalizer::normalize_state", s, mode == Mode::z_score ? state_mean : state_min,
             "state");
  if (mode == Mode::z_score) return standardize(s, state_mean, state_std);
  return minmax_to_unit(s, state_min, state_max);
}

Tensor Normalizer::normalize_action(const Tensor& a) const {
  check_dims("Normalizer::normalize_action", a, mode == Mode::z_score ? action_mean : action_min,
             "action");
  if (mode == Mode::z_score) return standardize(a, action_mean, action_std);
  return minmax_to_unit(a, action_min, action_max);
}

Tensor Normalizer::unnormalize_action(const Tensor& a) const {
  check_dims("Normalizer::unnormalize_action", a, mode == Mode::z_score ? action_mean : action_min,
             "action");
  if (mode == Mode::z_score)
    return raw::add(raw::mul(a, raw::add_scalar(action_std, 1e-8)), action_mean);
  return raw::add(
      raw::mul(raw::mul_scalar(raw::add_scalar(a, 1.0), 0.5), raw::sub(action_max, action_min)),
      action_min);
}

Normalizer Normalizer::to(DType dtype) const {
  Normalizer n = *this;
  for (Tensor* t : {&n.state_min, &n.state_max, &n.state_mean, &n.state_std, &n.action_min,
                    &n.action_max, &n.action_mean, &n.action_std})
    if (t->defined()) *t = raw::to_dtype(*t, dtype);
  return n;
}

std::string Normalizer::to_json() const {
  Json j = {{"mode", mode == Mode::z_score ? "z_score" : "min_max"},
            {"state_min", tensor_json(state_min)},
            {"state_max", tensor_json(state_max)},
            {"state_mean", tensor_json(state_mean)},
            {"state_std", tensor_json(state_std)},
            {"action_min", tensor_json(action_min)},
            {"action_max", tensor_json(action_max)},
            {"action_mean", tensor_json(action_mean)},
            {"action_std", tensor_json(action_std)}};
  return j.dump();
}

Normalizer Normalizer::from_json(const std::string& text) {
  Json j;
  try {
    j = Json::parse(text);
  } catch (const Json::exception& e) {
    fail("normalizer: not valid JSON: ", e.what());
  }
  MMDIT_CHECK(j.is_object() && j.contains("mode"), "normalizer: expected an object with a 'mode'");
  // A misspelt key ("state_mena") would otherwise leave its statistics silently unset or unused.
  const std::vector<std::string> keys = {
      "mode",       "state_min",   "state_max",  "state_mean",    "state_std",     "action_min",
      "action_max", "action_mean", "action_std", "state_min_max", "action_min_max"};
  for (const auto& [key, unused] : j.items())
    MMDIT_CHECK(std::find(keys.begin(), keys.end(), key) != keys.end(), "normalizer: unknown key '",
                key,
                "' (the keys are mode, state_min, state_max, state_mean, state_std, "
                "action_min, action_max, action_mean, action_std, or the reference agent's "
                "state_min_max and action_min_max)");
  Normalizer n;
  MMDIT_CHECK(j.at("mode").is_string(),
              "normalizer: 'mode' must be \"min_max\" or \"z_score\", got ", j.at("mode").dump());
  const std::string mode = j.at("mode").get<std::string>();
  MMDIT_CHECK(mode == "min_max" || mode == "z_score", "normalizer: unknown mode '", mode, "'");
  n.mode = mode == "z_score" ? Mode::z_score : Mode::min_max;
  auto get = [&](const char* key) {
    return j.contains(key) ? tensor_from_json(j[key], key) : Tensor();
  };
  n.state_min = get("state_min");
  n.state_max = get("state_max");
  n.state_mean = get("state_mean");
  n.state_std = get("state_std");
  n.action_min = get("action_min");
  n.action_max = get("action_max");
  n.action_mean = get("action_mean");
  n.action_std = get("action_std");
  // The reference agent's config holds each range as one (2, dim) array: [mins, maxs].
  auto given = [&](const char* key) { return j.contains(key) && !j[key].is_null(); };
  auto split_min_max = [&](const char* key, const char* min_key, const char* max_key, Tensor& min,
                           Tensor& max) {
    if (!given(key)) return;
    MMDIT_CHECK(!given(min_key) && !given(max_key), "normalizer: '", key, "' and '",
                given(min_key) ? min_key : max_key, "' both give the range; keep one of them");
    const Json& rows = j[key];
    MMDIT_CHECK(rows.is_array() && rows.size() == 2 && rows[0].is_array() && rows[1].is_array(),
                "normalizer: '", key,
                "' must be [[minima...], [maxima...]], two arrays of numbers");
    min = tensor_from_json(rows[0], key);
    max = tensor_from_json(rows[1], key);
    MMDIT_CHECK(min.numel() == max.numel(), "normalizer: '", key, "' has ", min.numel(),
                " minima and ", max.numel(), " maxima");
  };
  split_min_max("state_min_max", "state_min", "state_max", n.state_min, n.state_max);
  split_min_max("action_min_max", "action_min", "action_max", n.action_min, n.action_max);
  return n;
}

void Normalizer::validate(int64_t state_dim, int64_t act_dim) const {
  const bool z_score = mode == Mode::z_score;
  auto check = [&](const char* name, const Tensor& t, const char* dim_name, int64_t n) {
    MMDIT_CHECK(t.defined(), "normalizer: '", name, "' is missing; ",
                z_score ? "z_score" : "min_max", " mode needs it");
    MMDIT_CHECK(is_floating(t.dtype()) && t.shape() == Shape({n}), "normalizer: '", name, "' is ",
                dtype_name(t.dtype()), " ", shape_str(t.shape()), "; expected (", dim_name,
                ",) = (", n, ",)");
    if (const std::optional<NonFinite> bad = first_non_finite(t))
      fail("normalizer: '", name, "'[", bad->index[0], "] is ", bad->value);
    return t.to_vector<double>();
  };
  // The maps compute std + 1e-8 and max - min (+ 1e-8) in float32, as act() does: finite values
  // whose difference overflows (min -3e38, max 3e38) would make every action infinite.
  auto check_std = [&](const char* name, const Tensor& t, const char* dim_name, int64_t n) {
    const std::vector<double> sd = check(name, t, dim_name, n);
    for (int64_t i = 0; i < n; ++i) {
      MMDIT_CHECK(sd[i] >= 0, "normalizer: '", name, "'[", i, "] is ", sd[i],
                  "; a standard deviation is >= 0");
      MMDIT_CHECK(std::isfinite(static_cast<float>(sd[i]) + 1e-8f), "normalizer: '", name, "'[", i,
                  "] + 1e-8 = ", sd[i], " + 1e-8 is not finite in float32");
    }
  };
  // max == min is a constant dimension, which the 1e-8 in the map keeps finite.
  auto check_range = [&](const char* min_name, const Tensor& lo, const char* max_name,
                         const Tensor& hi, const char* dim_name, int64_t n) {
    const std::vector<double> a = check(min_name, lo, dim_name, n);
    const std::vector<double> b = check(max_name, hi, dim_name, n);
    for (int64_t i = 0; i < n; ++i) {
      MMDIT_CHECK(b[i] >= a[i], "normalizer: '", max_name, "'[", i, "] = ", b[i], " is below '",
                  min_name, "'[", i, "] = ", a[i]);
      const float range = static_cast<float>(b[i]) - static_cast<float>(a[i]);
      MMDIT_CHECK(std::isfinite(range) && std::isfinite(range + 1e-8f), "normalizer: '", max_name,
                  "'[", i, "] - '", min_name, "'[", i, "] = ", b[i], " - ", a[i],
                  " is not finite in float32");
    }
  };
  if (z_score) {
    check("state_mean", state_mean, "state_dim", state_dim);
    check_std("state_std", state_std, "state_dim", state_dim);
    check("action_mean", action_mean, "act_dim", act_dim);
    check_std("action_std", action_std, "act_dim", act_dim);
  } else {
    check_range("state_min", state_min, "state_max", state_max, "state_dim", state_dim);
    check_range("action_min", action_min, "action_max", action_max, "act_dim", act_dim);
  }
}

// ---- the policy ----
namespace {

// The first member is initialised from this, so a bad config is reported by the field it names
// before any layer is built with it.
const PolicyConfig& validated(const PolicyConfig& c) {
  c.validate();
  return c;
}

// Rows first .. first + length - 1 of sincos(dim, first + length), computed in float64 and
// rounded once to `dtype`. models.md "Precision": our float64 path computes everything in
// float64, and a float32 table widened afterwards would keep float32's error (a few 1e-6 at the
// action positions).
Tensor position_table(int64_t dim, int64_t first, int64_t length, DType dtype) {
  const Tensor table = nn::sincos_table(dim, first + length, DType::f64);
  return raw::to_dtype(raw::contiguous(raw::narrow(table, 0, first, length)), dtype);
}

// models.md: state_pos_embed = sincos(hidden, n_obs_steps), action_pos_embed =
// sincos(hidden, 100 + horizon)[100:].
Tensor state_positions(const PolicyConfig& c, DType dtype) {
  return position_table(c.hidden_size, 0, c.n_obs_steps, dtype);
}
Tensor action_positions(const PolicyConfig& c, DType dtype) {
  return position_table(c.hidden_size, 100, c.horizon, dtype);
}

}  // namespace

MMDiTConfig mmdit_config(const PolicyConfig& c) {
  MMDiTConfig m;
  m.depth = c.depth;
  m.dim_modalities = {c.hidden_size, c.hidden_size};
  m.dim_outs = {c.hidden_size, c.act_dim};
  m.dim_cond = c.dim_cond;
  m.timestep_embed_dims = {c.timestep_embed_dim};
  m.dim_head = c.dim_head;
  m.heads = c.heads;
  m.ff_mult = c.ff_mult;
  return m;
}

BCPolicy::BCPolicy(const PolicyConfig& cfg, Rng& rng) try
    : config(validated(cfg)),
      state_encoder(config.state_dim, config.hidden_size, true, rng),
      action_encoder(config.act_dim, config.hidden_size, true, rng),
      mmdit(mmdit_config(config), rng) {
  register_module("state_encoder", state_encoder);
  register_module("action_encoder", action_encoder);
  register_module("mmdit", mmdit);
  state_pos_embed = register_buffer("state_pos_embed", state_positions(config, DType::f32));
  action_pos_embed = register_buffer("action_pos_embed", action_positions(config, DType::f32));
  // validate() bounds total by kMaxTokens, which keeps total * total far from overflow.
  static_assert(PolicyConfig::kMaxTokens <= (int64_t{1} << 31));
  const int64_t total = cfg.n_obs_steps + cfg.horizon;
  std::vector<bool> m(total * total, true);
  for (int64_t i = cfg.n_obs_steps; i < total; ++i)
    for (int64_t j = cfg.n_obs_steps; j < total; ++j) m[i * total + j] = j <= i;
  mask_ = from_vector(m, {total, total});
} catch (const OutOfMemory& e) {
  // The sizes are the config's: say them all, since any of them can make a layer too large.
  throw OutOfMemory(str_cat("BCPolicy with policy config ", cfg.to_json(),
                            " does not fit in memory: ", e.what()));
}

void BCPolicy::to(DType dtype) {
  nn::Module::to(dtype);
  raw::copy_into(state_pos_embed, state_positions(config, dtype));
  raw::copy_into(action_pos_embed, action_positions(config, dtype));
}

Tensor BCPolicy::encode_observations(const Tensor& state) const {
  MMDIT_CHECK(state.dim() == 3 && state.shape()[1] == config.n_obs_steps &&
                  state.shape()[2] == config.state_dim,
              "policy: observation has shape ", shape_str(state.shape()), "; expected (B,",
              config.n_obs_steps, ",", config.state_dim, ")");
  NameScope scope("state_encoder");
  return state_encoder(state) + state_pos_embed;
}

Tensor BCPolicy::action_tokens(const Tensor& x_t) const {
  MMDIT_CHECK(
      x_t.dim() == 3 && x_t.shape()[1] == config.horizon && x_t.shape()[2] == config.act_dim,
      "policy: actions have shape ", shape_str(x_t.shape()), "; expected (B,", config.horizon, ",",
      config.act_dim, ")");
  NameScope scope("action_encoder");
  return action_encoder(x_t) + action_pos_embed;
}

namespace {
// Without it, tokens of another length blame the attention mask, of another width a product.
void check_obs_tokens(const PolicyConfig& c, const Tensor& obs_tokens, const Tensor& x_t) {
  MMDIT_CHECK(obs_tokens.defined() && obs_tokens.dim() == 3 &&
                  obs_tokens.shape()[0] == x_t.shape()[0] &&
                  obs_tokens.shape()[1] == c.n_obs_steps && obs_tokens.shape()[2] == c.hidden_size,
              "policy: observation tokens ",
              obs_tokens.defined() ? str_cat("have shape ", shape_str(obs_tokens.shape()))
                                   : std::string("are undefined"),
              "; expected (B, n_obs_steps, hidden_size) = (", x_t.shape()[0], ",", c.n_obs_steps,
              ",", c.hidden_size, "), from encode_observations");
}
}  // namespace

Tensor BCPolicy::velocity(const Tensor& obs_tokens, const Tensor& x_t, const Tensor& t) const {
  const Tensor act = action_tokens(x_t);
  check_obs_tokens(config, obs_tokens, x_t);
  NameScope scope("mmdit");
  return mmdit({obs_tokens, act}, {t}, mask_)[1];
}

Tensor BCPolicy::velocity(const Tensor& obs_tokens, const Tensor& x_t,
                          const MMDiTConditioning& time) const {
  const Tensor act = action_tokens(x_t);
  check_obs_tokens(config, obs_tokens, x_t);
  NameScope scope("mmdit");
  // Only the action tokens' output is read: the last block skips the observation tokens' rest.
  return mmdit.forward({obs_tokens, act}, time, mask_, {false, true})[1];
}

namespace {

// "is f32 (2,5,2)" or "is undefined", for the messages below.
std::string described(const Tensor& t) {
  if (!t.defined()) return "is undefined";
  return str_cat("is ", dtype_name(t.dtype()), " ", shape_str(t.shape()));
}

// The checks both losses share. Without them a pad mask of shape (horizon,) or a state batch of
// 1 broadcasts against the batch, and the loss silently means something else.
void check_batch(const char* loss, const BCPolicy& policy, const Tensor& state,
                 const Tensor& action, const Tensor& action_is_pad) {
  const PolicyConfig& c = policy.config;
  MMDIT_CHECK(action.defined() && action.dim() == 3 && action.shape()[1] == c.horizon &&
                  action.shape()[2] == c.act_dim,
              loss, ": action ", described(action), "; expected (B, horizon, act_dim) = (B,",
              c.horizon, ",", c.act_dim, ")");
  const int64_t b = action.shape()[0];
  MMDIT_CHECK(state.defined() && state.shape() == Shape({b, c.n_obs_steps, c.state_dim}), loss,
              ": state ", described(state), "; expected (B, n_obs_steps, state_dim) = (", b, ",",
              c.n_obs_steps, ",", c.state_dim, "), B as the action's");
  MMDIT_CHECK(action_is_pad.defined() && action_is_pad.dtype() == DType::boolean &&
                  action_is_pad.shape() == Shape({b, c.horizon}),
              loss, ": action_is_pad ", described(action_is_pad),
              "; expected bool (B, horizon) = (", b, ",", c.horizon, ")");
  const DType dtype = policy.dtype();
  MMDIT_CHECK(action.dtype() == dtype && state.dtype() == dtype, loss, ": action ",
              described(action), " and state ", described(state), "; the policy is ",
              dtype_name(dtype));
}

void check_like_action(const char* name, const Tensor& t, const Tensor& action) {
  MMDIT_CHECK(t.defined() && t.shape() == action.shape() && t.dtype() == action.dtype(),
              "flow_matching_loss: ", name, " ", described(t), "; expected the action's ",
              dtype_name(action.dtype()), " ", shape_str(action.shape()));
}

// (B, horizon, 1): 1 for a real action, 0 for padding; the mean over all of (B, horizon, act_dim)
// then divides by every element, padded ones included, as the reference's loss does.
Tensor valid_actions(const Tensor& action_is_pad, DType dtype) {
  return raw::unsqueeze(raw::to_dtype(raw::logical_not(action_is_pad), dtype), -1);
}
}  // namespace

Tensor flow_matching_loss(const BCPolicy& policy, const Tensor& state, const Tensor& action,
                          const Tensor& action_is_pad, const FlowNoise& noise) {
  check_batch("flow_matching_loss", policy, state, action, action_is_pad);
  const int64_t b = action.shape()[0];
  check_like_action("noise.x0", noise.x0, action);
  MMDIT_CHECK(
      noise.t.defined() && noise.t.shape() == Shape({b}) && noise.t.dtype() == action.dtype(),
      "flow_matching_loss: noise.t ", described(noise.t), "; expected ", dtype_name(action.dtype()),
      " (B,) = (", b, ",), one time per example");
  const double sigma = policy.config.sigma;
  // eps is read only when the config adds noise: a caller with sigma = 0 need not draw it.
  if (sigma > 0) check_like_action("noise.eps (sigma > 0)", noise.eps, action);
  const Tensor t = reshape(noise.t, {-1, 1, 1});
  Tensor x_t = t * action + (1.0 - t) * noise.x0;  // t = 0 is noise, t = 1 is data
  if (sigma > 0) x_t = x_t + noise.eps * sigma;
  const Tensor u = action - noise.x0;
  const Tensor v = policy.velocity(policy.encode_observations(state), x_t, noise.t);
  return mean(square(u - v) * valid_actions(action_is_pad, action.dtype()));
}

Tensor regression_loss(const BCPolicy& policy, const Tensor& state, const Tensor& action,
                       const Tensor& action_is_pad) {
  check_batch("regression_loss", policy, state, action, action_is_pad);
  const Tensor pred = regress_actions(policy, state);
  return mean(square(action - pred) * valid_actions(action_is_pad, action.dtype()));
}

Tensor regress_actions(const BCPolicy& policy, const Tensor& state) {
  const PolicyConfig& c = policy.config;
  // Before the batch size is read: a 0-d state has none, and shape()[0] is unchecked.
  MMDIT_CHECK(state.defined() && state.dim() == 3 && state.shape()[1] == c.n_obs_steps &&
                  state.shape()[2] == c.state_dim,
              "regress_actions: state ", described(state),
              "; expected (B, n_obs_steps, state_dim) = (B,", c.n_obs_steps, ",", c.state_dim, ")");
  const int64_t batch = state.shape()[0];
  const Tensor zero_actions =
      zeros({batch, policy.config.horizon, policy.config.act_dim}, state.dtype());
  return policy.velocity(policy.encode_observations(state), zero_actions,
                         zeros({batch}, state.dtype()));
}

namespace {

// t_k = k max_t / steps (linspace(0, max_t, steps + 1)): the one grid both each step's time and
// its width t_{k+1} - t_k are read from.
std::vector<double> euler_times(int64_t steps, double max_t) {
  MMDIT_CHECK(steps >= 1, "sample: steps must be >= 1, got ", steps);
  MMDIT_CHECK(std::isfinite(max_t) && max_t > 0, "sample: max_t must be finite and > 0, got ",
              max_t);
  std::vector<double> times;
  for (int64_t k = 0; k <= steps; ++k) times.push_back(k * max_t / steps);
  return times;
}

// One timestep for the whole batch: every example is at the same t_k.
MMDiTConditioning condition_at(const BCPolicy& policy, double t) {
  return policy.mmdit.condition({full({1}, t, policy.dtype())});
}

// The Euler loop; condition(k) gives step k's conditioning.
template <class Condition>
Tensor integrate(const BCPolicy& policy, const Tensor& state, const Tensor& a0,
                 const std::vector<double>& times, Rng* noise, Condition&& condition) {
  const double sigma = policy.config.sigma;
  MMDIT_CHECK(sigma == 0 || noise, "sample: the policy's sigma is ", sigma,
              ", so each step's velocity is taken at a + sigma * N(0, 1), as the reference does; "
              "pass an Rng for that noise");
  Tensor a = a0;
  // One parallel region for the whole call: at batch 1 its ~560 loops are each a few tens of
  // microseconds, and a region apiece cost 3-5 us of fork and join.
  run_as_team([&] {
    const Tensor obs = policy.encode_observations(state);
    for (size_t k = 0; k + 1 < times.size(); ++k) {
      // The reference's conditional_prob_path(t, z = a, x0 = a): x_t = a, plus its noise.
      const Tensor x_t =
          sigma > 0 ? raw::add(a, raw::mul_scalar(noise->normal(a.shape(), a.dtype()), sigma)) : a;
      a = raw::add(
          a, raw::mul_scalar(policy.velocity(obs, x_t, condition(k)), times[k + 1] - times[k]));
    }
  });
  return a;
}

}  // namespace

Tensor sample_actions(const BCPolicy& policy, const Tensor& state, const Tensor& a0, int64_t steps,
                      double max_t, Rng* noise) {
  // Each step's conditioning made when it is needed: an EulerSampler keeps them all for reuse.
  const std::vector<double> times = euler_times(steps, max_t);
  return integrate(policy, state, a0, times, noise,
                   [&](size_t k) { return condition_at(policy, times[k]); });
}

EulerSampler::EulerSampler(const BCPolicy& policy, int64_t steps, double max_t,
                           std::optional<WeightPrecision> packed)
    : policy_(policy),
      dtype_(policy.dtype()),
      times_(euler_times(steps, max_t)),
      frozen_(packed ? std::make_unique<FrozenWeights>(*packed) : nullptr) {
  // Packing is for float32 weights: a float64 policy runs its plain products, which is exact,
  // but bfloat16 asked for would silently not be.
  MMDIT_CHECK(!(packed == WeightPrecision::bf16 && dtype_ != DType::f32),
              "EulerSampler: bfloat16 packed weights need a float32 policy; this one is ",
              dtype_name(dtype_));
  for (int64_t k = 0; k < steps; ++k) schedule_.push_back(condition_at(policy, times_[k]));
}

Tensor EulerSampler::operator()(const Tensor& state, const Tensor& a0, Rng* noise) const {
  MMDIT_CHECK(policy_.dtype() == dtype_, "EulerSampler: the policy is now ",
              dtype_name(policy_.dtype()), ", its schedule was computed in ", dtype_name(dtype_),
              "; make a new sampler after policy.to(...) or load(...)");
  std::optional<UseFrozenWeights> frozen;
  if (frozen_) frozen.emplace(*frozen_);
  return integrate(policy_, state, a0, times_, noise, [&](size_t k) { return schedule_[k]; });
}

}  // namespace mmdit
