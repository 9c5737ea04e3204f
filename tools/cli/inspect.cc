// `mmdit inspect` prints the tape of one forward pass and loss of a (by default tiny) model, and
// `mmdit gradcheck` checks that model's every gradient against central differences: the
// autodiff internals, made visible for people reading the project to learn.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "autodiff/gradcheck.h"
#include "autodiff/inspect.h"
#include "autodiff/ops.h"
#include "mmdit/incontext.h"
#include "mmdit/mmdit.h"
#include "tensor/file_io.h"
#include "tensor/parallel.h"
#include "tools/cli/commands.h"
#include "train/policy.h"

namespace mmdit::cli {
namespace {

// Defaults small enough that the whole tape fits on one screen.
struct ModelOptions {
  std::string model = "mmdit";
  int64_t depth = 1;
  int64_t dim = 8;   // first modality (mmdit, incontext) or hidden size (policy)
  int64_t dim2 = 4;  // second modality
  int64_t heads = 2;
  int64_t dim_head = 4;
  int64_t ff_mult = 2;
  int64_t batch = 1;
  int64_t tokens = 2;  // per modality; the policy's horizon
  uint64_t seed = 0;
};

void add_model_options(CLI::App* cmd, ModelOptions& o) {
  cmd->add_option("--model", o.model, "mmdit, incontext or policy")
      ->check(CLI::IsMember({"mmdit", "incontext", "policy"}))
      ->capture_default_str();
  cmd->add_option("--depth", o.depth, "number of blocks")->check(positive())->capture_default_str();
  cmd->add_option("--dim", o.dim, "width of the first modality (policy: hidden size)")
      ->check(positive())
      ->capture_default_str();
  cmd->add_option("--dim2", o.dim2, "width of the second modality (mmdit, incontext)")
      ->check(positive())
      ->capture_default_str();
  cmd->add_option("--heads", o.heads, "attention heads")->check(positive())->capture_default_str();
  cmd->add_option("--dim-head", o.dim_head, "width of one head (even: rotary embedding)")
      ->check(positive())
      ->capture_default_str();
  cmd->add_option("--ff-mult", o.ff_mult, "feed-forward expansion")
      ->check(positive())
      ->capture_default_str();
  cmd->add_option("--batch", o.batch, "batch size")->check(positive())->capture_default_str();
  cmd->add_option("--tokens", o.tokens, "tokens per modality (policy: horizon)")
      ->check(positive())
      ->capture_default_str();
  cmd->add_option("--seed", o.seed, "seed for the parameters and the inputs")
      ->capture_default_str();
}

// A model with its inputs drawn once, and `run` giving its outputs flattened into one vector.
// The tape records whatever the parameters feed, so the caller decides what to watch.
struct Built {
  std::unique_ptr<nn::Module> module;
  std::function<Tensor()> run;  // all outputs, concatenated
  std::function<Tensor()> loss;
};

Tensor flat_concat(const std::vector<Tensor>& outs) {
  std::vector<Tensor> flat;
  for (const Tensor& o : outs) flat.push_back(reshape(o, {-1}));
  return concat(flat, 0);
}

Built build(const ModelOptions& o, DType dtype) {
  MMDIT_CHECK(o.dim_head % 2 == 0, "--dim-head must be even (rotary embedding), got ", o.dim_head);
  Rng rng(o.seed);
  Built b;
  if (o.model == "mmdit" || o.model == "incontext") {
    std::vector<Tensor> xs;
    for (int64_t d : {o.dim, o.dim2}) xs.push_back(rng.normal({o.batch, o.tokens, d}, dtype));
    if (o.model == "mmdit") {
      MMDiTConfig c;
      c.depth = o.depth;
      c.dim_modalities = c.dim_outs = {o.dim, o.dim2};
      c.dim_cond = o.dim;
      c.timestep_embed_dims = {o.dim};
      c.dim_head = o.dim_head;
      c.heads = o.heads;
      c.ff_mult = o.ff_mult;
      auto m = std::make_unique<MMDiT>(c, rng);
      m->to(dtype);
      const Tensor t = rng.uniform({o.batch}, dtype);
      const MMDiT* model = m.get();
      b.run = [model, xs, t] { return flat_concat((*model)(xs, {t})); };
      b.module = std::move(m);
    } else {
      InContextMMDiTConfig c;
      c.depth = o.depth;
      c.dim_modalities = c.dim_outs = {o.dim, o.dim2};
      c.dim_head = o.dim_head;
      c.heads = o.heads;
      c.ff_mult = o.ff_mult;
      auto m = std::make_unique<InContextMMDiT>(c, rng);
      m->to(dtype);
      const InContextMMDiT* model = m.get();
      b.run = [model, xs] { return flat_concat((*model)(xs)); };
      b.module = std::move(m);
    }
    b.loss = [run = b.run] { return mean(square(run())); };
    return b;
  }
  PolicyConfig c;
  c.n_obs_steps = 2;
  c.state_dim = 2;
  c.act_dim = 2;
  c.horizon = o.tokens;
  c.hidden_size = o.dim;
  c.depth = o.depth;
  c.dim_cond = o.dim;
  c.timestep_embed_dim = o.dim;
  c.dim_head = o.dim_head;
  c.heads = o.heads;
  c.ff_mult = o.ff_mult;
  c.validate();
  auto p = std::make_unique<BCPolicy>(c, rng);
  p->to(dtype);
  const Tensor state = rng.normal({o.batch, c.n_obs_steps, c.state_dim}, dtype);
  const Tensor action = rng.normal({o.batch, c.horizon, c.act_dim}, dtype);
  const Tensor pad = zeros({o.batch, c.horizon}, DType::boolean);
  const FlowNoise noise{rng.normal({o.batch, c.horizon, c.act_dim}, dtype),
                        rng.uniform({o.batch}, dtype), Tensor()};
  const BCPolicy* policy = p.get();
  b.run = [policy, state, noise] {
    return reshape(policy->velocity(policy->encode_observations(state), noise.x0, noise.t), {-1});
  };
  b.loss = [policy, state, action, pad, noise] {
    return flow_matching_loss(*policy, state, action, pad, noise);
  };
  b.module = std::move(p);
  return b;
}

void add_inspect(CLI::App& app) {
  struct Options {
    ModelOptions model;
    std::string dot;
    bool backward_edges = false;
    bool profile = false;
  };
  auto opts = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "inspect",
      "Print the tape of one forward pass and loss of a tiny model, like jax.make_jaxpr");
  add_model_options(cmd, opts->model);
  CLI::Option* dot =
      cmd->add_option("--dot", opts->dot, "also write the graph as Graphviz DOT to this file");
  cmd->add_flag("--backward-edges", opts->backward_edges,
                "in the DOT file, draw the gradient's path as dashed reverse edges")
      ->needs(dot);
  // The profile replaces the listing, and the graph is the listing's.
  cmd->add_flag("--profile", opts->profile,
                "instead of the listing: time and FLOPs per op type of one forward and backward "
                "pass, sorted by cost (use the size flags for a realistic model)")
      ->excludes(dot);
  cmd->callback([opts] {
    if (!opts->dot.empty()) check_output_directory(opts->dot, "--dot");
    Built b = build(opts->model, DType::f32);
    const NamedTensors params = b.module->named_parameters();
    std::vector<Tensor> leaves;
    for (const auto& [name, t] : params) leaves.push_back(t);
    if (opts->profile) {
      // One forward and backward pass on `tape`, every parameter watched.
      auto step = [&](Tape& tape) {
        for (const Tensor& t : leaves) tape.watch(t);
        const Tensor loss = b.loss();
        tape.gradient(loss, leaves);
      };
      {
        // The first pass faults in fresh pages and fills the allocator's cache; profile the next.
        Tape warmup;
        step(warmup);
      }
      Tape tape;
      tape.set_profiling(true);
      step(tape);
      std::printf("one forward and backward pass, %d thread(s):\n", num_threads());
      std::fputs(format_profile(tape).c_str(), stdout);
      return;
    }
    Tape tape;
    for (const Tensor& t : leaves) tape.watch(t);
    const Tensor loss = b.loss();
    // Before gradient(): it releases the saved tensors the listing reports.
    std::fputs(format_tape(tape, params).c_str(), stdout);
    if (!opts->dot.empty()) {
      write_file_atomically(opts->dot, tape_to_dot(tape, opts->backward_edges));
      std::printf("wrote %s\n", opts->dot.c_str());
    }
    std::printf("loss %.6g over %lld parameters in %zu tensors\n", loss.item(),
                static_cast<long long>(b.module->num_parameters()), params.size());
  });
}

void add_gradcheck(CLI::App& app) {
  struct Options {
    ModelOptions model;
    int64_t sample = -1;
    GradcheckOptions check;
  };
  auto opts = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "gradcheck",
      "Check every parameter gradient of a tiny float64 model against central differences");
  add_model_options(cmd, opts->model);
  cmd->add_option("--sample", opts->sample,
                  "check this many random elements per tensor (default, or -1: every element)");
  cmd->add_option("--eps", opts->check.eps, "central-difference step")->capture_default_str();
  cmd->add_option("--atol", opts->check.atol, "absolute tolerance")->capture_default_str();
  cmd->add_option("--rtol", opts->check.rtol, "relative tolerance")->capture_default_str();
  cmd->callback([opts] {
    Built b = build(opts->model, DType::f64);
    // Zero-initialised layers (adaLN-Zero gates, final projections) would make most gradients
    // trivially zero and the check vacuous, so every parameter gets random values.
    Rng rng(opts->model.seed + 1);
    NamedTensors random;
    for (const auto& [name, t] : b.module->named_parameters())
      random.insert(name, rng.normal(t.shape(), DType::f64, 0, 0.5));
    b.module->load(random);

    GradcheckOptions check = opts->check;
    check.sample = opts->sample;
    check.seed = opts->model.seed;
    // One tensor at a time, so that every tensor reports its own worst element. A tensor the
    // output is not computed from (the policy's last block leaves out the observation tokens'
    // feed-forward and final layer) has derivatives 0 by construction: it is named, not checked.
    std::vector<std::pair<std::string, GradcheckResult>> rows;
    std::vector<std::string> unused;
    bool ok = true;
    int64_t checked = 0;
    size_t worst = 0;
    for (const auto& [name, t] : b.module->named_parameters()) {
      {
        Tape tape;
        tape.watch(t);
        if (!tape.is_on_tape(b.run())) {
          unused.push_back(name);
          continue;
        }
      }
      NamedTensors one;
      one.insert(name, t);
      rows.emplace_back(name, gradcheck(b.run, one, check));
      const GradcheckResult& r = rows.back().second;
      ok &= r.ok;
      checked += r.checked;
      if (r.worst_ratio > rows[worst].second.worst_ratio) worst = rows.size() - 1;
    }
    size_t name_width = 9;
    for (const auto& [name, r] : rows) name_width = std::max(name_width, name.size());
    std::printf("%-*s  %-10s %7s  %-10s %14s %14s %10s %7s\n", static_cast<int>(name_width),
                "parameter", "shape", "checked", "worst at", "analytic", "numeric", "|diff|",
                "ratio");
    for (const auto& [name, r] : rows) {
      const Shape& shape = b.module->named_parameters().at(name).shape();
      std::printf("%-*s  %-10s %7lld  %-10s %14.6g %14.6g %10.2e %7.3f%s\n",
                  static_cast<int>(name_width), name.c_str(), shape_str(shape).c_str(),
                  static_cast<long long>(r.checked), shape_str(r.index).c_str(), r.analytic,
                  r.numeric, std::abs(r.analytic - r.numeric), r.worst_ratio,
                  !r.ok                 ? "  FAILED"
                  : r.zero == r.checked ? "  (every derivative 0)"
                                        : "");
    }
    std::printf(
        "gradcheck %s: %lld elements in %zu tensors; worst %s%s (|diff| / tolerance %.3f; "
        "pass when <= 1)\n",
        ok ? "ok" : "FAILED", static_cast<long long>(checked), rows.size(),
        rows.empty() ? "-" : rows[worst].first.c_str(),
        rows.empty() ? "" : shape_str(rows[worst].second.index).c_str(),
        rows.empty() ? 0.0 : rows[worst].second.worst_ratio);
    if (!unused.empty())
      std::printf("not checked, %zu tensors the output is not computed from: %s\n", unused.size(),
                  join_commas(unused).c_str());
    if (!ok) throw CLI::RuntimeError(1);
  });
}

}  // namespace

void add_inspect_commands(CLI::App& app) {
  add_inspect(app);
  add_gradcheck(app);
}

}  // namespace mmdit::cli
