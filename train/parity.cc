#include "train/parity.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <set>

#include "autodiff/ops.h"
#include "autodiff/value_and_grad.h"
#include "mmdit/incontext.h"
#include "mmdit/mmdit.h"
#include "tensor/safetensors.h"
#include "train/json_fields.h"
#include "train/optim.h"
#include "train/policy.h"

namespace mmdit {
namespace {

using Json = nlohmann::json;

// Everything a case gives its forward function, already in the run's dtype. It notes the names
// the forward asks for, so that a tensor it never read is reported rather than ignored.
struct CaseInputs {
  std::string who;       // "<path>: a 'rms_norm' case", for messages
  NamedTensors tensors;  // "input/0", "input/cond", "input/x", "timestep/0", "mask", ...
  mutable std::set<std::string> read;
  const Tensor& at(const std::string& name) const {
    read.insert(name);
    MMDIT_CHECK(tensors.contains(name), who, " needs '", name, "'");
    return tensors.at(name);
  }
  Tensor get(const std::string& name) const {
    read.insert(name);
    return tensors.contains(name) ? tensors.at(name) : Tensor();
  }
  std::vector<Tensor> numbered(const std::string& prefix) const {
    std::vector<Tensor> out;
    while (tensors.contains(prefix + std::to_string(out.size()))) {
      read.insert(prefix + std::to_string(out.size()));
      out.push_back(tensors.at(prefix + std::to_string(out.size())));
    }
    return out;
  }
};

// A runnable case: the module (owning its parameters) and its forward, which returns named
// outputs ("0", "1", ... or "x").
struct Runnable {
  std::unique_ptr<nn::Module> module;
  std::function<NamedTensors(const CaseInputs&)> forward;
};

// A case's config, read strictly: a size must be a JSON integer (2.9 is an error, not 2), a
// key no reader asks for is an error (a misspelt one would otherwise leave its field at the
// default), and "rope", which the reference writes into every case, must be true: every model of
// models.md applies the rotary embedding, and there is no variant without it to build.
class CaseConfig {
 public:
  // `who` starts every message: "<path>: 'mmdit' config".
  CaseConfig(const Json& json, std::string who) : json_(json), who_(std::move(who)) {
    MMDIT_CHECK(json_.is_object(), who_, " must be a JSON object, got ", json_.dump());
    if (json_.contains("rope")) {
      const Json& rope = take("rope");
      MMDIT_CHECK(rope.is_boolean() && rope.get<bool>(), who_,
                  ": 'rope' must be true (the models always apply the rotary embedding; there is "
                  "no variant without it), got ",
                  rope.dump());
    }
  }
  const std::string& who() const { return who_; }

  int64_t integer(const std::string& key) { return json_int64(take(key), who_.c_str(), key); }
  int64_t integer(const std::string& key, int64_t fallback) {
    return has(key) ? integer(key) : fallback;
  }
  // An integer or a list of integers.
  std::vector<int64_t> integers(const std::string& key) {
    const Json& value = take(key);
    MMDIT_CHECK(value.is_number_integer() || value.is_array(), who_, ": '", key,
                "' must be an integer or a list of integers, got ", value.dump());
    if (!value.is_array()) return {json_int64(value, who_.c_str(), key)};
    std::vector<int64_t> out;
    for (size_t i = 0; i < value.size(); ++i)
      out.push_back(json_int64(value[i], who_.c_str(), str_cat(key, "[", i, "]")));
    return out;
  }
  std::vector<int64_t> integers(const std::string& key, int64_t fallback) {
    return has(key) ? integers(key) : std::vector<int64_t>{fallback};
  }
  double number(const std::string& key) {
    const Json& value = take(key);
    MMDIT_CHECK(value.is_number(), who_, ": '", key, "' must be a number, got ", value.dump());
    return value.get<double>();
  }
  double number(const std::string& key, double fallback) {
    return has(key) ? number(key) : fallback;
  }

  // After the reads: any key none of them asked for is an error naming it.
  void finish() const {
    for (const auto& item : json_.items()) {
      if (read_.contains(item.key())) continue;
      std::string known;
      for (const std::string& key : read_) known += (known.empty() ? "" : ", ") + key;
      fail(who_, ": unknown key '", item.key(), "' (this kind reads ", known, ")");
    }
  }

 private:
  // Whether the config has `key`; either way, the key is one this kind reads.
  bool has(const std::string& key) {
    read_.insert(key);
    return json_.contains(key);
  }
  const Json& take(const std::string& key) {
    MMDIT_CHECK(has(key), who_, ": missing '", key, "'");
    return json_.at(key);
  }

  const Json& json_;
  std::string who_;
  std::set<std::string> read_;
};

// The fields both model families have, with the reference's defaults.
template <class Config>
Config shared_config_from(CaseConfig& c) {
  Config cfg;
  cfg.depth = c.integer("depth");
  cfg.dim_modalities = c.integers("dim_modalities");
  cfg.dim_outs = c.integers("dim_outs");
  cfg.dim_head = c.integer("dim_head", 64);
  cfg.heads = c.integer("heads", 8);
  cfg.ff_mult = c.integer("ff_mult", 4);
  return cfg;
}

// The config of an 'mmdit' case, every key read.
MMDiTConfig mmdit_config_from(CaseConfig& c) {
  MMDiTConfig cfg = shared_config_from<MMDiTConfig>(c);
  cfg.dim_cond = c.integer("dim_cond", 1024);
  cfg.timestep_embed_dims = c.integers("timestep_embed_dim", 256);
  c.finish();
  return cfg;
}

// The config of an 'incontext_mmdit' case, every key read.
InContextMMDiTConfig incontext_config_from(CaseConfig& c) {
  InContextMMDiTConfig cfg = shared_config_from<InContextMMDiTConfig>(c);
  c.finish();
  return cfg;
}

NamedTensors numbered_outputs(const std::vector<Tensor>& outs) {
  NamedTensors named;
  for (size_t i = 0; i < outs.size(); ++i) named.insert(std::to_string(i), outs[i]);
  return named;
}

NamedTensors single_output(const Tensor& x) {
  NamedTensors named;
  named.insert("x", x);
  return named;
}

// Modules without parameters still need a Module to own nothing.
struct Empty : nn::Module {};

// The module of a case of `kind` and its forward. Every config value is read before the module
// is built, so that an unknown key is reported rather than whatever its default leads to.
Runnable build(const std::string& kind, CaseConfig& c, Rng& rng) {
  Runnable r;
  auto own = [&r](auto module) {
    auto* raw_ptr = module.get();
    r.module = std::move(module);
    return raw_ptr;
  };
  if (kind == "timestep_embedding") {
    const int64_t dim = c.integer("dim");
    const double max_period = c.number("max_period", 10000.0);
    c.finish();
    own(std::make_unique<Empty>());
    r.forward = [dim, max_period](const CaseInputs& in) {
      return single_output(nn::timestep_embedding(in.at("timestep/0"), dim, max_period));
    };
  } else if (kind == "feedforward") {
    const int64_t dim = c.integer("dim"), mult = c.integer("mult");
    c.finish();
    auto* m = own(std::make_unique<nn::FeedForward>(dim, mult, rng));
    r.forward = [m](const CaseInputs& in) { return single_output((*m)(in.at("input/x"))); };
  } else if (kind == "rms_norm") {
    const int64_t dim = c.integer("dim");
    c.finish();
    auto* m = own(std::make_unique<nn::RMSNorm>(dim));
    r.forward = [m](const CaseInputs& in) { return single_output((*m)(in.at("input/x"))); };
  } else if (kind == "multihead_rms_norm") {
    const int64_t dim_head = c.integer("dim_head"), heads = c.integer("heads");
    c.finish();
    check_positive(c.who().c_str(), "heads", heads);
    auto* m = own(std::make_unique<nn::MultiHeadRMSNorm>(dim_head));
    // The module normalises the last axis whatever comes before it: the case's head axis is
    // checked here, against the config's heads.
    r.forward = [m, heads, dim_head](const CaseInputs& in) {
      const Tensor& x = in.at("input/x");
      MMDIT_CHECK(x.dim() == 3 && x.shape()[0] == heads && x.shape()[2] == dim_head, in.who,
                  ": 'input/x' has shape ", shape_str(x.shape()),
                  "; expected (heads, S, dim_head) = (", heads, ", S, ", dim_head, ")");
      return single_output((*m)(x));
    };
  } else if (kind == "adaptive_layer_norm") {
    const int64_t dim = c.integer("dim"), dim_cond = c.integer("dim_cond");
    c.finish();
    auto* m = own(std::make_unique<nn::AdaptiveLayerNorm>(dim, dim_cond, rng));
    r.forward = [m](const CaseInputs& in) {
      return single_output((*m)(in.at("input/x"), in.at("input/cond")));
    };
  } else if (kind == "modulated_final_layer") {
    const int64_t dim_in = c.integer("dim_in"), dim_out = c.integer("dim_out"),
                  dim_cond = c.integer("dim_cond");
    c.finish();
    auto* m = own(std::make_unique<ModulatedFinalLayer>(dim_in, dim_out, dim_cond, rng));
    r.forward = [m](const CaseInputs& in) {
      return single_output((*m)(in.at("input/x"), in.at("input/cond")));
    };
  } else if (kind == "simple_final_layer") {
    const int64_t dim_in = c.integer("dim_in"), dim_out = c.integer("dim_out");
    c.finish();
    auto* m = own(std::make_unique<SimpleFinalLayer>(dim_in, dim_out, rng));
    r.forward = [m](const CaseInputs& in) { return single_output((*m)(in.at("input/x"))); };
  } else if (kind == "joint_attention") {
    const std::vector<int64_t> dim_inputs = c.integers("dim_inputs");
    const int64_t dim_head = c.integer("dim_head"), heads = c.integer("heads");
    c.finish();
    auto* m = own(std::make_unique<nn::JointAttention>(dim_inputs, dim_head, heads, rng));
    r.forward = [m](const CaseInputs& in) {
      return numbered_outputs((*m)(in.numbered("input/"), in.get("mask")));
    };
  } else if (kind == "mmdit_block") {
    const std::vector<int64_t> dims = c.integers("dim_modalities");
    const int64_t dim_cond = c.integer("dim_cond"), dim_head = c.integer("dim_head"),
                  heads = c.integer("heads"), ff_mult = c.integer("ff_mult", 4);
    c.finish();
    auto* m = own(std::make_unique<MMDiTBlock>(dims, dim_cond, dim_head, heads, ff_mult, rng));
    r.forward = [m](const CaseInputs& in) {
      return numbered_outputs((*m)(in.numbered("input/"), in.at("input/cond"), in.get("mask")));
    };
  } else if (kind == "incontext_mmdit_block") {
    const std::vector<int64_t> dims = c.integers("dim_modalities");
    const int64_t dim_head = c.integer("dim_head"), heads = c.integer("heads"),
                  ff_mult = c.integer("ff_mult", 4);
    c.finish();
    auto* m = own(std::make_unique<InContextMMDiTBlock>(dims, dim_head, heads, ff_mult, rng));
    r.forward = [m](const CaseInputs& in) {
      return numbered_outputs((*m)(in.numbered("input/"), in.get("mask")));
    };
  } else if (kind == "mmdit") {
    auto* m = own(std::make_unique<MMDiT>(mmdit_config_from(c), rng));
    r.forward = [m](const CaseInputs& in) {
      return numbered_outputs(
          (*m)(in.numbered("input/"), in.numbered("timestep/"), in.get("mask")));
    };
  } else if (kind == "incontext_mmdit") {
    auto* m = own(std::make_unique<InContextMMDiT>(incontext_config_from(c), rng));
    r.forward = [m](const CaseInputs& in) {
      return numbered_outputs((*m)(in.numbered("input/"), in.get("mask")));
    };
  } else {
    fail("unknown parity kind '", kind, "'");
  }
  return r;
}

ParityRow compare(const std::string& name, const Tensor& actual, const Tensor& expected,
                  double tolerance) {
  MMDIT_CHECK(actual.shape() == expected.shape(), "parity: '", name, "' has shape ",
              shape_str(actual.shape()), " but the case expects ", shape_str(expected.shape()));
  const std::vector<double> a = actual.to_vector<double>(), e = expected.to_vector<double>();
  ParityRow row{name, expected.shape()};
  double max_expected = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double err = std::abs(a[i] - e[i]);
    row.max_abs_error = std::isnan(err) ? INFINITY : std::max(row.max_abs_error, err);
    max_expected = std::max(max_expected, std::abs(e[i]));
  }
  row.rel_error = max_expected > 0 ? row.max_abs_error / max_expected : row.max_abs_error;
  row.pass = row.rel_error <= tolerance;
  return row;
}

// A policy case's config: the policy's hyperparameters and the settings of the kind's run.
struct PolicyCase {
  PolicyConfig policy;
  AdamWConfig adam;      // bc_train_step
  double ema_decay = 0;  // bc_train_step
  int64_t steps = 0;     // bc_sample
  double max_t = 1.0;    // bc_sample
};

PolicyCase policy_case_from(const std::string& kind, CaseConfig& c) {
  PolicyCase pc;
  PolicyConfig& p = pc.policy;
  p.n_obs_steps = c.integer("n_obs_steps");
  p.state_dim = c.integer("state_dim");
  p.horizon = c.integer("horizon");
  p.act_dim = c.integer("act_dim");
  p.hidden_size = c.integer("hidden_size");
  p.depth = c.integer("depth");
  p.dim_cond = c.integer("dim_cond");
  p.timestep_embed_dim = c.integer("timestep_embed_dim");
  p.dim_head = c.integer("dim_head");
  p.heads = c.integer("heads");
  p.ff_mult = c.integer("ff_mult", 4);
  p.sigma = c.number("sigma", 0.0);
  if (kind == "bc_sample") {
    pc.steps = c.integer("steps");
    pc.max_t = c.number("max_t", 1.0);
  } else if (kind == "bc_train_step") {
    pc.adam.lr = c.number("lr");
    pc.adam.weight_decay = c.number("weight_decay");
    pc.adam.b1 = c.number("b1");
    pc.adam.b2 = c.number("b2");
    pc.adam.eps = c.number("eps");
    pc.ema_decay = c.number("ema_decay");
  } else {
    fail("unknown parity kind '", kind, "'");
  }
  c.finish();
  p.validate();
  return pc;
}

// The case's (2, dim) arrays of minima and maxima, checked against the policy's sizes.
Normalizer min_max_from(const NamedTensors& f, DType dtype, const PolicyConfig& pc,
                        const std::string& path) {
  for (const auto& [name, dim] :
       {std::pair<const char*, int64_t>{"norm/state_min_max", pc.state_dim},
        {"norm/action_min_max", pc.act_dim}}) {
    MMDIT_CHECK(f.contains(name), path, ": the case needs '", name, "'");
    MMDIT_CHECK(f.at(name).shape() == (Shape{2, dim}), path, ": '", name, "' has shape ",
                shape_str(f.at(name).shape()), "; expected (2, ", dim, ")");
  }
  Normalizer n;
  const Tensor s = raw::to_dtype(f.at("norm/state_min_max"), dtype);
  const Tensor a = raw::to_dtype(f.at("norm/action_min_max"), dtype);
  n.state_min = raw::contiguous(raw::squeeze(raw::narrow(s, 0, 0, 1), 0));
  n.state_max = raw::contiguous(raw::squeeze(raw::narrow(s, 0, 1, 1), 0));
  n.action_min = raw::contiguous(raw::squeeze(raw::narrow(a, 0, 0, 1), 0));
  n.action_max = raw::contiguous(raw::squeeze(raw::narrow(a, 0, 1, 1), 0));
  return n;
}

// The policy kinds: one training step (loss, gradients, AdamW, EMA) or one Euler sampling run.
// Every tensor of the file must be one the kind reads or checks: a misspelt expectation
// ("expect/action") or a tensor the policy has no use for (a "mask") is an error naming it, not
// a PASS that checked less than the file asks.
void run_policy_case(const SafetensorsFile& file, const PolicyCase& pc, ParityReport& report) {
  const DType dtype = report.dtype;
  const NamedTensors& f = file.tensors;
  std::set<std::string> used;  // the file's tensors read or compared so far
  auto file_tensor = [&](const std::string& name) -> const Tensor& {
    MMDIT_CHECK(f.contains(name), report.path, ": a '", report.kind, "' case needs '", name, "'");
    used.insert(name);
    return f.at(name);
  };
  auto get = [&](const std::string& name) {
    const Tensor& t = file_tensor(name);
    return is_floating(t.dtype()) ? raw::to_dtype(t, dtype) : t;
  };
  Rng rng(0);
  BCPolicy policy(pc.policy, rng);
  policy.to(dtype);
  NamedTensors state;
  for (const auto& [name, t] : f) {
    if (name.starts_with("param/")) {
      state.insert(name.substr(6), t);
      used.insert(name);
    } else if (name.starts_with("buffer/")) {
      state.insert(name.substr(7), t);
      used.insert(name);
    }
  }
  // The rows below run on the file's buffers (the reference's, computed in float32): without
  // these rows, taken before the file's replace ours, nothing would check the tables we build.
  for (const auto& [name, ours] : policy.named_buffers()) {
    const std::string key = "buffer/" + name;
    report.rows.push_back(compare(key, ours, file_tensor(key), report.tolerance));
  }
  policy.load(state, /*buffers=*/true);
  used.insert({"norm/state_min_max", "norm/action_min_max"});
  const Normalizer norm = min_max_from(f, dtype, policy.config, report.path);
  const Tensor obs = norm.normalize_state(get("batch/observation.state"));
  auto add_rows = [&](const std::string& prefix, const NamedTensors& actual) {
    for (const auto& [name, want] : f) {
      if (!name.starts_with("expect/" + prefix)) continue;
      const std::string key = name.substr(7 + prefix.size());
      MMDIT_CHECK(actual.contains(key), report.path, ": expected '", name.substr(7),
                  "' but the policy has no parameter '", key, "'");
      report.rows.push_back(compare(name.substr(7), actual.at(key), want, report.tolerance));
      used.insert(name);
    }
  };

  std::string expectations;  // what the kind checks, for the message below
  if (report.kind == "bc_sample") {
    const Tensor a = sample_actions(policy, obs, get("noise/a0"), pc.steps, pc.max_t);
    report.rows.push_back(compare("actions", norm.unnormalize_action(a),
                                  file_tensor("expect/actions"), report.tolerance));
    expectations = "expect/actions";
  } else {
    const Tensor action = norm.normalize_action(get("batch/action"));
    const Tensor is_pad = get("batch/action_is_pad");
    const FlowNoise noise{get("noise/x0"), get("noise/t"), Tensor()};
    auto loss_fn = [&](BCPolicy& p) { return flow_matching_loss(p, obs, action, is_pad, noise); };
    auto [loss, grads] = value_and_grad(loss_fn)(policy);
    report.rows.push_back(compare("loss", loss, file_tensor("expect/loss"), report.tolerance));
    add_rows("grad/param/", grads);

    const NamedTensors params = policy.named_parameters();
    EMA ema(params, pc.ema_decay);
    AdamW opt(params, pc.adam);
    opt.update(params, grads);
    ema.update(params);
    add_rows("param_after/", params);
    add_rows("ema_after/", ema.params());
    expectations = "expect/loss, expect/grad/param/*, expect/param_after/*, expect/ema_after/*";
  }
  for (const auto& [name, t] : f) {
    if (used.contains(name)) continue;
    MMDIT_CHECK(!name.starts_with("expect/"), report.path, ": '", name,
                "' is not an expectation a '", report.kind, "' case checks (it checks ",
                expectations, ")");
    fail(report.path, ": unexpected tensor '", name, "' in a '", report.kind, "' case");
  }
}

}  // namespace

double default_parity_tolerance(DType dtype) {
  return dtype == DType::f64 ? 1e-5 : 1e-4;
}

bool ParityReport::ok() const {
  if (rows.empty()) return false;
  for (const ParityRow& r : rows)
    if (!r.pass) return false;
  return true;
}

std::string ParityReport::table() const {
  std::string out;
  char line[512];
  std::snprintf(line, sizeof line, "%s  (kind %s, %s, tolerance %.1e on the relative error)\n",
                path.c_str(), kind.c_str(), dtype_name(dtype), tolerance);
  out += line;
  std::snprintf(line, sizeof line, "%-64s %-12s %12s %12s  %s\n", "tensor", "shape", "max abs err",
                "rel err", "result");
  out += line;
  int failed = 0;
  for (const ParityRow& r : rows) {
    std::snprintf(line, sizeof line, "%-64s %-12s %12.3e %12.3e  %s\n", r.name.c_str(),
                  shape_str(r.shape).c_str(), r.max_abs_error, r.rel_error,
                  r.pass ? "pass" : "FAIL");
    out += line;
    failed += !r.pass;
  }
  std::snprintf(line, sizeof line, "%zu tensors, %d failed: %s\n", rows.size(), failed,
                ok() ? "PASS" : "FAIL");
  return out + line;
}

namespace {

// "<path>: 'mmdit' config", which starts the messages about a case's config.
std::string config_who(const std::string& path, const std::string& kind) {
  return str_cat(path, ": '", kind, "' config");
}

// The config metadata of the parity case at `path`, which must be of one of `kinds`, read
// strictly by `from(kind, config)`.
template <class F>
auto config_of(const std::string& path, std::initializer_list<const char*> kinds, F from) {
  const SafetensorsFile file = load_safetensors(path);
  const auto kind = file.metadata.find("kind");
  const auto config = file.metadata.find("config");
  MMDIT_CHECK(kind != file.metadata.end() && config != file.metadata.end(), path,
              ": not a parity case (no 'kind' and 'config' in the header's __metadata__)");
  MMDIT_CHECK(std::find(kinds.begin(), kinds.end(), kind->second) != kinds.end(), path,
              ": a parity case of kind '", kind->second, "', not of ", *kinds.begin());
  Json json;
  try {
    json = Json::parse(config->second);
  } catch (const Json::exception& e) {
    fail(path, ": the config metadata is not valid JSON: ", e.what());
  }
  CaseConfig c(json, config_who(path, kind->second));
  return from(kind->second, c);
}

// "0, 1" or "x": the names of a case's outputs, for messages.
std::string output_names(const NamedTensors& outputs) {
  std::string names;
  for (const auto& [name, t] : outputs) names += (names.empty() ? "" : ", ") + name;
  return names;
}

}  // namespace

PolicyConfig parity_policy_config(const std::string& path) {
  return config_of(
      path, {"bc_train_step", "bc_sample"},
      [](const std::string& kind, CaseConfig& c) { return policy_case_from(kind, c).policy; });
}
MMDiTConfig parity_mmdit_config(const std::string& path) {
  return config_of(path, {"mmdit"},
                   [](const std::string&, CaseConfig& c) { return mmdit_config_from(c); });
}
InContextMMDiTConfig parity_incontext_config(const std::string& path) {
  return config_of(path, {"incontext_mmdit"},
                   [](const std::string&, CaseConfig& c) { return incontext_config_from(c); });
}

ParityReport run_parity(const std::string& path, DType dtype, std::optional<double> tolerance) {
  MMDIT_CHECK(is_floating(dtype), "parity: dtype must be f32 or f64");
  // A negative or NaN tolerance fails every row, an infinite one passes any finite error.
  MMDIT_CHECK(!tolerance || (*tolerance >= 0 && std::isfinite(*tolerance)),
              "parity: the tolerance must be finite and >= 0, got ", *tolerance);
  const SafetensorsFile file = load_safetensors(path);
  auto meta = [&](const std::string& key) {
    auto it = file.metadata.find(key);
    MMDIT_CHECK(it != file.metadata.end(), path, ": not a parity case (no '", key,
                "' in the header's __metadata__)");
    return it->second;
  };
  MMDIT_CHECK(meta("format") == "mmdit-parity/1", path, ": unsupported parity format '",
              meta("format"), "' (expected mmdit-parity/1)");
  ParityReport report;
  report.path = path;
  report.kind = meta("kind");
  report.dtype = dtype;
  report.tolerance = tolerance.value_or(default_parity_tolerance(dtype));
  Json json;
  try {
    json = Json::parse(meta("config"));
  } catch (const Json::exception& e) {
    fail(path, ": the config metadata is not valid JSON: ", e.what());
  }
  CaseConfig config(json, config_who(path, report.kind));

  if (report.kind.starts_with("bc_")) {
    run_policy_case(file, policy_case_from(report.kind, config), report);
    return report;
  }

  NamedTensors params, expected, cotangents;
  CaseInputs inputs;
  inputs.who = str_cat(path, ": a '", report.kind, "' case");
  for (const auto& [name, t] : file.tensors) {
    if (name.starts_with("param/"))
      params.insert(name.substr(6), t);
    else if (name.starts_with("expect/"))
      expected.insert(name.substr(7), t);
    else if (name.starts_with("cotangent/"))
      cotangents.insert(name.substr(10), raw::to_dtype(t, dtype));
    else if (name.starts_with("input/") || name.starts_with("timestep/") || name == "mask")
      inputs.tensors.insert(name, is_floating(t.dtype()) ? raw::to_dtype(t, dtype) : t);
    else
      fail(path, ": unexpected tensor '", name, "' in a '", report.kind, "' case");
  }

  Rng rng(0);
  Runnable runnable = build(report.kind, config, rng);
  runnable.module->to(dtype);
  runnable.module->load(params);

  // Everything that has an expected gradient is watched.
  NamedTensors watched;
  for (const auto& [name, t] : runnable.module->named_parameters())
    watched.insert("param/" + name, t);
  for (const auto& [name, t] : inputs.tensors)
    if (is_floating(t.dtype())) watched.insert(name, t);

  Tape tape;
  std::vector<Tensor> leaves;
  for (const auto& [name, t] : watched) {
    tape.watch(t);
    leaves.push_back(t);
  }
  const NamedTensors outputs = runnable.forward(inputs);
  // An input the module never read (a mask for a norm, an input/2 past the modalities) would
  // otherwise be ignored, and its expected gradient compared with zeros.
  for (const auto& [name, t] : inputs.tensors)
    MMDIT_CHECK(inputs.read.contains(name), path, ": '", name, "' is not an input of a '",
                report.kind, "' case");
  Tensor loss = scalar(0, dtype);
  for (const auto& [name, out] : outputs) {
    MMDIT_CHECK(cotangents.contains(name), path, ": no cotangent/", name, " for output ", name);
    MMDIT_CHECK(cotangents.at(name).shape() == out.shape(), path, ": 'cotangent/", name,
                "' has shape ", shape_str(cotangents.at(name).shape()), " but output ", name,
                " has shape ", shape_str(out.shape()));
    loss = loss + sum(out * cotangents.at(name));
  }
  for (const auto& [name, t] : cotangents)
    MMDIT_CHECK(outputs.contains(name), path, ": 'cotangent/", name, "' is for no output of the '",
                report.kind, "' case (its outputs: ", output_names(outputs), ")");
  const std::vector<Tensor> grads = tape.gradient(loss, leaves);

  for (const auto& [name, want] : expected) {
    Tensor actual;
    if (name.starts_with("output/")) {
      const std::string output = name.substr(7);
      MMDIT_CHECK(outputs.contains(output), path, ": 'expect/", name, "' expects output '", output,
                  "', which the '", report.kind,
                  "' case does not have (its outputs: ", output_names(outputs), ")");
      actual = outputs.at(output);
    } else if (name.starts_with("grad/")) {
      const std::string target = name.substr(5);
      for (size_t i = 0; i < watched.size(); ++i)
        if (watched[i].first == target) actual = grads[i];
      MMDIT_CHECK(actual.defined(), path, ": expected gradient for '", target,
                  "', which is neither a parameter nor an input of the case");
    } else {
      fail(path, ": unknown expectation '", name, "'");
    }
    report.rows.push_back(compare(name, actual, want, report.tolerance));
  }
  return report;
}

}  // namespace mmdit
