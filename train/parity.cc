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
#include "train/optim.h"
#include "train/policy.h"

namespace mmdit {
namespace {

using Json = nlohmann::json;

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

// Everything a case gives its forward function, already in the run's dtype.
struct CaseInputs {
  NamedTensors tensors;  // "input/0", "input/cond", "input/x", "timestep/0", "mask", ...
  const Tensor& at(const std::string& name) const { return tensors.at(name); }
  Tensor get(const std::string& name) const {
    return tensors.contains(name) ? tensors.at(name) : Tensor();
  }
  std::vector<Tensor> numbered(const std::string& prefix) const {
    std::vector<Tensor> out;
    while (tensors.contains(prefix + std::to_string(out.size())))
      out.push_back(tensors.at(prefix + std::to_string(out.size())));
    return out;
  }
};

// A runnable case: the module (owning its parameters) and its forward, which returns named
// outputs ("0", "1", ... or "x").
struct Runnable {
  std::unique_ptr<nn::Module> module;
  std::function<NamedTensors(const CaseInputs&)> forward;
};

std::vector<int64_t> int_list(const Json& j) {
  if (j.is_number_integer()) return {j.get<int64_t>()};
  return j.get<std::vector<int64_t>>();
}

// The fields both model families have, with the reference's defaults.
template <class Config>
Config shared_config_from(const Json& c) {
  Config cfg;
  cfg.depth = c.at("depth");
  cfg.dim_modalities = int_list(c.at("dim_modalities"));
  cfg.dim_outs = int_list(c.at("dim_outs"));
  cfg.dim_head = c.value("dim_head", 64);
  cfg.heads = c.value("heads", 8);
  cfg.ff_mult = c.value("ff_mult", 4);
  return cfg;
}

MMDiTConfig mmdit_config_from(const Json& c) {
  MMDiTConfig cfg = shared_config_from<MMDiTConfig>(c);
  cfg.dim_cond = c.value("dim_cond", 1024);
  cfg.timestep_embed_dims = int_list(c.value("timestep_embed_dim", Json(256)));
  return cfg;
}

InContextMMDiTConfig incontext_config_from(const Json& c) {
  return shared_config_from<InContextMMDiTConfig>(c);
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

Runnable build(const std::string& kind, const Json& c, Rng& rng) {
  Runnable r;
  auto own = [&r](auto module) {
    auto* raw_ptr = module.get();
    r.module = std::move(module);
    return raw_ptr;
  };
  if (kind == "timestep_embedding") {
    own(std::make_unique<Empty>());
    const int64_t dim = c.at("dim");
    const double max_period = c.value("max_period", 10000.0);
    r.forward = [dim, max_period](const CaseInputs& in) {
      return single_output(nn::timestep_embedding(in.at("timestep/0"), dim, max_period));
    };
  } else if (kind == "feedforward") {
    auto* m = own(std::make_unique<nn::FeedForward>(c.at("dim"), c.at("mult"), rng));
    r.forward = [m](const CaseInputs& in) { return single_output((*m)(in.at("input/x"))); };
  } else if (kind == "rms_norm") {
    auto* m = own(std::make_unique<nn::RMSNorm>(c.at("dim")));
    r.forward = [m](const CaseInputs& in) { return single_output((*m)(in.at("input/x"))); };
  } else if (kind == "multihead_rms_norm") {
    auto* m = own(std::make_unique<nn::MultiHeadRMSNorm>(c.at("dim_head")));
    r.forward = [m](const CaseInputs& in) { return single_output((*m)(in.at("input/x"))); };
  } else if (kind == "adaptive_layer_norm") {
    auto* m = own(std::make_unique<nn::AdaptiveLayerNorm>(c.at("dim"), c.at("dim_cond"), rng));
    r.forward = [m](const CaseInputs& in) {
      return single_output((*m)(in.at("input/x"), in.at("input/cond")));
    };
  } else if (kind == "modulated_final_layer") {
    auto* m = own(std::make_unique<ModulatedFinalLayer>(c.at("dim_in"), c.at("dim_out"),
                                                        c.at("dim_cond"), rng));
    r.forward = [m](const CaseInputs& in) {
      return single_output((*m)(in.at("input/x"), in.at("input/cond")));
    };
  } else if (kind == "simple_final_layer") {
    auto* m = own(std::make_unique<SimpleFinalLayer>(c.at("dim_in"), c.at("dim_out"), rng));
    r.forward = [m](const CaseInputs& in) { return single_output((*m)(in.at("input/x"))); };
  } else if (kind == "joint_attention") {
    auto* m = own(std::make_unique<nn::JointAttention>(int_list(c.at("dim_inputs")),
                                                       c.at("dim_head"), c.at("heads"), rng));
    r.forward = [m](const CaseInputs& in) {
      return numbered_outputs((*m)(in.numbered("input/"), in.get("mask")));
    };
  } else if (kind == "mmdit_block") {
    auto* m = own(std::make_unique<MMDiTBlock>(int_list(c.at("dim_modalities")), c.at("dim_cond"),
                                               c.at("dim_head"), c.at("heads"),
                                               c.value("ff_mult", 4), rng));
    r.forward = [m](const CaseInputs& in) {
      return numbered_outputs((*m)(in.numbered("input/"), in.at("input/cond"), in.get("mask")));
    };
  } else if (kind == "incontext_mmdit_block") {
    auto* m = own(std::make_unique<InContextMMDiTBlock>(int_list(c.at("dim_modalities")),
                                                        c.at("dim_head"), c.at("heads"),
                                                        c.value("ff_mult", 4), rng));
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

PolicyConfig policy_config_from(const Json& c) {
  PolicyConfig p;
  p.n_obs_steps = c.at("n_obs_steps");
  p.state_dim = c.at("state_dim");
  p.horizon = c.at("horizon");
  p.act_dim = c.at("act_dim");
  p.hidden_size = c.at("hidden_size");
  p.depth = c.at("depth");
  p.dim_cond = c.at("dim_cond");
  p.timestep_embed_dim = c.at("timestep_embed_dim");
  p.dim_head = c.at("dim_head");
  p.heads = c.at("heads");
  p.ff_mult = c.value("ff_mult", 4);
  p.sigma = c.value("sigma", 0.0);
  p.validate();
  return p;
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
void run_policy_case(const SafetensorsFile& file, const Json& config, ParityReport& report) {
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
  BCPolicy policy(policy_config_from(config), rng);
  policy.to(dtype);
  NamedTensors state;
  for (const auto& [name, t] : f) {
    if (starts_with(name, "param/")) {
      state.insert(name.substr(6), t);
      used.insert(name);
    } else if (starts_with(name, "buffer/")) {
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
      if (!starts_with(name, "expect/" + prefix)) continue;
      const std::string key = name.substr(7 + prefix.size());
      MMDIT_CHECK(actual.contains(key), report.path, ": expected '", name.substr(7),
                  "' but the policy has no parameter '", key, "'");
      report.rows.push_back(compare(name.substr(7), actual.at(key), want, report.tolerance));
      used.insert(name);
    }
  };

  std::string expectations;  // what the kind checks, for the message below
  if (report.kind == "bc_sample") {
    const Tensor a = sample_actions(policy, obs, get("noise/a0"), config.at("steps"),
                                    config.value("max_t", 1.0));
    report.rows.push_back(compare("actions", norm.unnormalize_action(a),
                                  file_tensor("expect/actions"), report.tolerance));
    expectations = "expect/actions";
  } else {
    AdamWConfig adam;
    adam.lr = config.at("lr");
    adam.weight_decay = config.at("weight_decay");
    adam.b1 = config.at("b1");
    adam.b2 = config.at("b2");
    adam.eps = config.at("eps");
    const Tensor action = norm.normalize_action(get("batch/action"));
    const Tensor is_pad = get("batch/action_is_pad");
    const FlowNoise noise{get("noise/x0"), get("noise/t"), Tensor()};
    auto loss_fn = [&](BCPolicy& p) { return flow_matching_loss(p, obs, action, is_pad, noise); };
    auto [loss, grads] = value_and_grad(loss_fn)(policy);
    report.rows.push_back(compare("loss", loss, file_tensor("expect/loss"), report.tolerance));
    add_rows("grad/param/", grads);

    const NamedTensors params = policy.named_parameters();
    EMA ema(params, config.at("ema_decay"));
    AdamW opt(params, adam);
    opt.update(params, grads);
    ema.update(params);
    add_rows("param_after/", params);
    add_rows("ema_after/", ema.params());
    expectations = "expect/loss, expect/grad/param/*, expect/param_after/*, expect/ema_after/*";
  }
  for (const auto& [name, t] : f) {
    if (used.contains(name)) continue;
    MMDIT_CHECK(!starts_with(name, "expect/"), report.path, ": '", name,
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

// The config metadata of the parity case at `path`, which must be of one of `kinds`.
Json case_config(const std::string& path, std::initializer_list<const char*> kinds) {
  const SafetensorsFile file = load_safetensors(path);
  const auto kind = file.metadata.find("kind");
  const auto config = file.metadata.find("config");
  MMDIT_CHECK(kind != file.metadata.end() && config != file.metadata.end(), path,
              ": not a parity case (no 'kind' and 'config' in the header's __metadata__)");
  MMDIT_CHECK(std::find(kinds.begin(), kinds.end(), kind->second) != kinds.end(), path,
              ": a parity case of kind '", kind->second, "', not of ", *kinds.begin());
  try {
    return Json::parse(config->second);
  } catch (const Json::exception& e) {
    fail(path, ": the config metadata is not valid JSON: ", e.what());
  }
}

template <class F>
auto config_of(const std::string& path, std::initializer_list<const char*> kinds, F from) {
  const Json c = case_config(path, kinds);
  try {
    return from(c);
  } catch (const Json::exception& e) {
    fail(path, ": bad config: ", e.what());
  }
}

}  // namespace

PolicyConfig parity_policy_config(const std::string& path) {
  return config_of(path, {"bc_train_step", "bc_sample"}, policy_config_from);
}
MMDiTConfig parity_mmdit_config(const std::string& path) {
  return config_of(path, {"mmdit"}, mmdit_config_from);
}
InContextMMDiTConfig parity_incontext_config(const std::string& path) {
  return config_of(path, {"incontext_mmdit"}, incontext_config_from);
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
  Json config;
  try {
    config = Json::parse(meta("config"));
  } catch (const Json::exception& e) {
    fail(path, ": the config metadata is not valid JSON: ", e.what());
  }

  if (starts_with(report.kind, "bc_")) {
    try {
      run_policy_case(file, config, report);
    } catch (const Json::exception& e) {
      fail(path, ": bad config for kind '", report.kind, "': ", e.what());
    }
    return report;
  }

  NamedTensors params, expected, cotangents;
  CaseInputs inputs;
  for (const auto& [name, t] : file.tensors) {
    if (starts_with(name, "param/"))
      params.insert(name.substr(6), t);
    else if (starts_with(name, "expect/"))
      expected.insert(name.substr(7), t);
    else if (starts_with(name, "cotangent/"))
      cotangents.insert(name.substr(10), raw::to_dtype(t, dtype));
    else if (starts_with(name, "input/") || starts_with(name, "timestep/") || name == "mask")
      inputs.tensors.insert(name, is_floating(t.dtype()) ? raw::to_dtype(t, dtype) : t);
    else
      fail(path, ": unexpected tensor '", name, "' in a '", report.kind, "' case");
  }

  Rng rng(0);
  Runnable runnable;
  try {
    runnable = build(report.kind, config, rng);
  } catch (const Json::exception& e) {
    fail(path, ": bad config for kind '", report.kind, "': ", e.what());
  }
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
  Tensor loss = scalar(0, dtype);
  for (const auto& [name, out] : outputs) {
    MMDIT_CHECK(cotangents.contains(name), path, ": no cotangent/", name, " for output ", name);
    loss = loss + sum(out * cotangents.at(name));
  }
  const std::vector<Tensor> grads = tape.gradient(loss, leaves);

  for (const auto& [name, want] : expected) {
    Tensor actual;
    if (starts_with(name, "output/")) {
      actual = outputs.at(name.substr(7));
    } else if (starts_with(name, "grad/")) {
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
