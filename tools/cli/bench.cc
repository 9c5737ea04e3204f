// `mmdit bench`: the workloads of spec/bench.md, timed the same way every time. Each workload is
// warmed up, then run --reps times; we print median/min/max ms, the matrix-product GFLOP/s, that
// as a share of this machine's sgemm throughput measured in the same run (the "roof"), peak
// resident memory and page faults per repetition, for training steps the tape's size, and for
// sampling the weights a call reads next to the memory bandwidth measured the same way.
//
// OpenBLAS reads OPENBLAS_CORETYPE once, when it is loaded. A user's machine does not set it, so
// unless --keep-coretype is given, bench re-executes itself without it, and runs on the core
// OpenBLAS detects, or the one mmdit chooses when that detection falls short
// (tensor/blas_core.h).
#include <dlfcn.h>
#include <malloc.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "autodiff/gradcheck.h"
#include "autodiff/ops.h"
#include "autodiff/value_and_grad.h"
#include "mmdit/incontext.h"
#include "tensor/blas_core.h"
#include "tensor/ops.h"
#include "tensor/parallel.h"
#include "tensor/simd.h"
#include "tools/cli/commands.h"
#include "train/trainer.h"

namespace mmdit::cli {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// A workload: `setup` builds the model and inputs (untimed) and returns the repetition.
struct Workload {
  const char* name;
  const char* what;
  bool training;
  bool float64 = false;  // its products are not float32: the sgemm roof does not apply
};

const Workload kWorkloads[] = {
    {"policy-train", "BCPolicy (reference agent), batch 64: one full training step", true},
    {"policy-act", "the same policy, batch 1: sample with 10 Euler steps", false},
    {"policy-act-b64", "the same policy, batch 64: sample with 10 Euler steps", false},
    {"policy-act-bf16", "policy-act with the sampler's weights packed as bfloat16", false},
    {"policy-act-b64-bf16", "policy-act-b64 with the sampler's weights packed as bfloat16", false},
    {"incontext-train",
     "InContextMMDiT depth 12, dims (512, 256), batch 8, 100 + 18 tokens: forward, MSE, "
     "backward, AdamW",
     true},
    {"tiny-gradcheck", "MMDiT depth 2, dims (16, 8), float64: gradcheck of every parameter", false,
     true},
};

// What one repetition leaves behind for the report, besides its time.
struct TapeStats {
  int64_t nodes = 0;
  size_t saved_bytes = 0;  // every tensor every node keeps
  // The storages behind them, each once: the parameters' and the others' (the activations, and
  // constants such as the batch, the rotary tables and the attention mask).
  size_t parameter_bytes = 0, other_bytes = 0;
};

// How far reduced-precision results are from float32 ones on the same inputs.
struct Accuracy {
  double max_abs_diff = 0, rel_rms = 0;  // rel_rms: rms(difference) / rms(float32 result)
};

struct Prepared {
  std::function<void()> rep;
  std::optional<TapeStats> tape;                 // training workloads: the tape of one step
  std::optional<Accuracy> accuracy;              // bf16 workloads, against the float32 sampler
  std::function<double()> weight_bytes_per_rep;  // sampling: packed weights read, after the reps
};

// The reference agent (models.md defaults; spec/bench.md).
PolicyConfig reference_policy() {
  PolicyConfig c;
  c.validate();
  return c;
}

// Synthetic demonstrations: the timing does not depend on what the states and actions are.
Episodes random_episodes(const PolicyConfig& c, Rng& rng) {
  const int64_t episodes = 8, length = 100;
  Episodes e;
  e.states = rng.normal({episodes * length, c.state_dim});
  e.actions = rng.normal({episodes * length, c.act_dim});
  for (int64_t i = 0; i <= episodes; ++i) e.episode_starts.push_back(i * length);
  return e;
}

// Every parameter drawn from N(0, std^2), zero-initialised ones included.
void randomize(nn::Module& module, Rng& rng, DType dtype, double std) {
  NamedTensors random;
  for (const auto& [name, t] : module.named_parameters())
    random.insert(name, rng.normal(t.shape(), dtype, 0, std));
  module.load(random);
}

TapeStats tape_of(const NamedTensors& params, const std::function<Tensor()>& loss) {
  Tape tape;
  for (const auto& [name, t] : params) tape.watch(t);
  loss();
  const Tape::SavedMemory memory = tape.saved_memory();
  return {static_cast<int64_t>(tape.nodes().size()), tape.saved_bytes(), memory.leaves,
          memory.other};
}

Prepared prepare_policy_train() {
  TrainConfig config;
  config.policy = reference_policy();
  config.batch_size = 64;
  config.steps = 1000000;
  config.lr = 1e-4;
  Rng rng(0);
  const Episodes data = random_episodes(config.policy, rng);
  auto trainer = std::make_shared<Trainer>(config, data);
  Prepared p;
  p.rep = [trainer] { trainer->train_step(); };
  // The trainer's loss on a batch of the same shapes, recorded once to size the tape.
  const PolicyConfig& c = config.policy;
  const Tensor state = rng.normal({64, c.n_obs_steps, c.state_dim});
  const Tensor action = rng.normal({64, c.horizon, c.act_dim});
  const Tensor pad = zeros({64, c.horizon}, DType::boolean);
  const FlowNoise noise{rng.normal({64, c.horizon, c.act_dim}), rng.uniform({64}), Tensor()};
  BCPolicy& policy = trainer->policy();
  p.tape = tape_of(policy.named_parameters(),
                   [&] { return flow_matching_loss(policy, state, action, pad, noise); });
  return p;
}

Accuracy accuracy_of(const Tensor& reduced_result, const Tensor& exact_result) {
  const auto reduced = reduced_result.to_vector<double>(), exact = exact_result.to_vector<double>();
  Accuracy a;
  double diff2 = 0, exact2 = 0;
  for (size_t i = 0; i < exact.size(); ++i) {
    const double diff = reduced[i] - exact[i];
    a.max_abs_diff = std::max(a.max_abs_diff, std::abs(diff));
    diff2 += diff * diff;
    exact2 += exact[i] * exact[i];
  }
  a.rel_rms = std::sqrt(diff2 / exact2);
  return a;
}

Prepared prepare_policy_act(int64_t batch, WeightPrecision precision) {
  const PolicyConfig c = reference_policy();
  Rng rng(0);
  auto policy = std::make_shared<BCPolicy>(c, rng);
  // A fresh policy has zero-initialised adaLN gates and output layer; random weights make the
  // work the same as a trained one's (no zeros that a kernel might skip).
  randomize(*policy, rng, DType::f32, 0.02);
  const Tensor state = rng.uniform({batch, c.n_obs_steps, c.state_dim}, DType::f32, -1, 1);
  auto rng_shared = std::make_shared<Rng>(1);
  // A deployed controller: weights frozen, so the schedule's time conditioning is computed once.
  auto sampler = std::make_shared<EulerSampler>(*policy, 10, 1.0, precision);
  Prepared p;
  if (precision != WeightPrecision::f32) {
    const Tensor a0 = Rng(2).normal({batch, c.horizon, c.act_dim});
    // The float32 reference on the plain weights: packing a second copy would only add to the
    // workload's peak memory.
    p.accuracy =
        accuracy_of((*sampler)(state, a0), EulerSampler(*policy, 10, 1.0, std::nullopt)(state, a0));
  }
  p.rep = [policy, sampler, state, rng_shared, c, batch] {
    const Tensor a0 = rng_shared->normal({batch, c.horizon, c.act_dim});
    (*sampler)(state, a0);
  };
  p.weight_bytes_per_rep = [sampler] {
    return static_cast<double>(sampler->packed_bytes()) * static_cast<double>(sampler->steps());
  };
  return p;
}

Prepared prepare_incontext_train() {
  InContextMMDiTConfig c;
  c.depth = 12;
  c.dim_modalities = c.dim_outs = {512, 256};
  c.dim_head = 64;
  c.heads = 8;
  c.ff_mult = 4;
  Rng rng(0);
  auto model = std::make_shared<InContextMMDiT>(c, rng);
  const int64_t batch = 8, obs_tokens = 100, action_tokens = 2 + 16;
  const int64_t total = obs_tokens + action_tokens;
  const Tensor obs = rng.normal({batch, obs_tokens, 512});
  const Tensor actions = rng.normal({batch, action_tokens, 256});
  const Tensor target = rng.normal({batch, action_tokens, 256});
  // Observations attend to everything; each action token to the observations and the actions at
  // or before it.
  Tensor mask = ones({total, total}, DType::boolean);
  bool* m = mask.data<bool>();
  for (int64_t i = obs_tokens; i < total; ++i)
    for (int64_t j = i + 1; j < total; ++j) m[i * total + j] = false;
  auto optimizer = std::make_shared<AdamW>(model->named_parameters(), AdamWConfig{});
  auto loss_fn = [obs, actions, target, mask](const InContextMMDiT& net) {
    const std::vector<Tensor> outs = net({obs, actions}, mask);
    return mean(square(outs[1] - target));
  };
  Prepared p;
  p.rep = [model, optimizer, loss_fn] {
    auto [loss, grads] = value_and_grad(loss_fn)(*model);
    optimizer->update(model->named_parameters(), grads);
  };
  p.tape = tape_of(model->named_parameters(), [&] { return loss_fn(*model); });
  return p;
}

Prepared prepare_tiny_gradcheck() {
  MMDiTConfig c;
  c.depth = 2;
  c.dim_modalities = c.dim_outs = {16, 8};
  c.dim_cond = 32;
  c.timestep_embed_dims = {32};
  c.heads = 2;
  c.dim_head = 8;
  Rng rng(0);
  auto model = std::make_shared<MMDiT>(c, rng);
  model->to(DType::f64);
  // Random weights in place of the zero-initialised ones; larger than 0.2 and the finite
  // differences themselves lose accuracy (third derivatives grow), not the gradients.
  randomize(*model, rng, DType::f64, 0.2);
  const std::vector<Tensor> xs = {rng.normal({2, 5, 16}, DType::f64),
                                  rng.normal({2, 3, 8}, DType::f64)};
  const Tensor t = rng.uniform({2}, DType::f64);
  Prepared p;
  p.rep = [model, xs, t] {
    const auto run = [&] {
      std::vector<Tensor> flat;
      for (const Tensor& o : (*model)(xs, {t})) flat.push_back(reshape(o, {-1}));
      return concat(flat, 0);
    };
    const GradcheckResult r = gradcheck(run, model->named_parameters());
    MMDIT_CHECK(r.ok, "bench tiny-gradcheck: the gradient check failed (worst ratio ",
                r.worst_ratio, ")");
  };
  return p;
}

Prepared prepare(const std::string& name) {
  if (name == "policy-train") return prepare_policy_train();
  if (name == "policy-act") return prepare_policy_act(1, WeightPrecision::f32);
  if (name == "policy-act-b64") return prepare_policy_act(64, WeightPrecision::f32);
  if (name == "policy-act-bf16") return prepare_policy_act(1, WeightPrecision::bf16);
  if (name == "policy-act-b64-bf16") return prepare_policy_act(64, WeightPrecision::bf16);
  if (name == "incontext-train") return prepare_incontext_train();
  return prepare_tiny_gradcheck();
}

// Peak resident set since the last reset_peak_rss(), in MB (VmHWM).
double peak_rss_mb() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss / 1024.0;
}

// Linux resets VmHWM to the current RSS when "5" is written to clear_refs.
void reset_peak_rss() {
  std::ofstream clear("/proc/self/clear_refs");
  clear << "5";
}

int64_t page_faults() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_minflt + usage.ru_majflt;
}

// GB/s at which the current threads read a buffer far larger than the caches: the most a step
// that streams its weights from memory (sampling at batch 1) can get. Both roofs are the fastest
// of 5 timed runs: a roof is what the machine can do, and the median of a few runs on a shared
// machine read below what the workloads then reached (109% of it).
double memory_roof_gbps() {
  const int64_t n = int64_t{64} << 20;  // 256 MB of floats
  const Tensor buffer = full({n}, 1.0, DType::f32);
  const float* data = buffer.data<float>();
  const int64_t chunk = int64_t{1} << 20, chunks = n / chunk;
  std::vector<float> sums(static_cast<size_t>(chunks));
  std::vector<double> times;
  for (int rep = 0; rep < 6; ++rep) {
    const Clock::time_point t0 = Clock::now();
    parallel_for(chunks, 2 * kParallelGrain, [&](int64_t i) {
      sums[static_cast<size_t>(i)] = simd::sum(data + i * chunk, chunk);
    });
    if (rep > 0) times.push_back(seconds_since(t0));
  }
  MMDIT_CHECK(std::accumulate(sums.begin(), sums.end(), 0.0) == static_cast<double>(n),
              "bench: the memory read check summed wrongly");
  return static_cast<double>(n) * sizeof(float) / *std::min_element(times.begin(), times.end()) /
         1e9;
}

// The malloc this process runs on: tcmalloc when the build linked it (CMakeLists.txt) or it was
// preloaded, else the C library's (or a sanitizer's). Small-tensor work depends on it (README).
std::string allocator_name() {
  using Version = const char* (*)(int*, int*, const char**);
  const auto version = reinterpret_cast<Version>(dlsym(RTLD_DEFAULT, "tc_version"));
  if (!version) return "system malloc";
  int major = 0, minor = 0;
  const char* patch = nullptr;
  return str_cat("tcmalloc (", version(&major, &minor, &patch), ")");
}

// Hands the memory freed so far back to the system, so that a workload's peak RSS counts only
// what it holds itself: glibc keeps freed blocks until malloc_trim, tcmalloc until asked.
void release_free_memory() {
  release_cached_memory();
  malloc_trim(0);
  using Release = void (*)();
  if (const auto release =
          reinterpret_cast<Release>(dlsym(RTLD_DEFAULT, "MallocExtension_ReleaseFreeMemory")))
    release();
}

// GFLOP/s of one large float32 product on the current threads, with each library that can run
// it: the larger is the most a matrix-product-bound step can reach on this machine.
struct SgemmRoof {
  double onednn = 0, openblas = 0;
  double best() const { return std::max(onednn, openblas); }
};

SgemmRoof sgemm_roof_gflops() {
  const int64_t n = 2048;
  std::vector<float> a(static_cast<size_t>(n * n), 0.5f), b(a), c(a.size());
  auto measure = [&](raw::SgemmLibrary library) {
    const raw::SgemmLibrary chosen = raw::sgemm_library();
    raw::set_sgemm_library(library);
    std::vector<double> times;
    for (int rep = 0; rep < 6; ++rep) {
      const Clock::time_point t0 = Clock::now();
      raw::gemm(false, false, n, n, n, a.data(), n, b.data(), n, c.data(), n);
      if (rep > 0) times.push_back(seconds_since(t0));  // the first packs buffers, faults pages
    }
    raw::set_sgemm_library(chosen);
    return 2.0 * n * n * n / *std::min_element(times.begin(), times.end()) / 1e9;
  };
  return SgemmRoof{measure(raw::SgemmLibrary::onednn), measure(raw::SgemmLibrary::openblas)};
}

struct Result {
  std::string workload;
  double median_ms = 0, min_ms = 0, max_ms = 0;
  double gflop_per_rep = 0, gflops = 0;
  double peak_rss_mb = 0;
  double page_faults_per_rep = 0;
  double weight_mb_per_rep = 0;  // sampling workloads: packed weights read per repetition
  int reps = 0;
  std::optional<TapeStats> tape;
  std::optional<Accuracy> accuracy;
};

Result run(const Workload& w, int reps, int warmup) {
  // The previous workload's blocks, and the roof measurements' buffers, would otherwise count.
  release_free_memory();
  reset_peak_rss();
  Prepared p = prepare(w.name);
  for (int i = 0; i < warmup; ++i) p.rep();
  std::vector<double> ms;
  const int64_t flops0 = raw::matmul_flops();
  const int64_t faults0 = page_faults();
  for (int i = 0; i < reps; ++i) {
    const Clock::time_point t0 = Clock::now();
    p.rep();
    ms.push_back(seconds_since(t0) * 1e3);
  }
  Result r;
  r.workload = w.name;
  r.reps = reps;
  r.page_faults_per_rep = static_cast<double>(page_faults() - faults0) / reps;
  r.gflop_per_rep = static_cast<double>(raw::matmul_flops() - flops0) / reps / 1e9;
  std::vector<double> sorted = ms;
  std::sort(sorted.begin(), sorted.end());
  const size_t n = sorted.size();
  r.median_ms = n % 2 ? sorted[n / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2;
  r.min_ms = sorted.front();
  r.max_ms = sorted.back();
  r.gflops = r.gflop_per_rep / (r.median_ms / 1e3);
  r.peak_rss_mb = peak_rss_mb();
  r.tape = p.tape;
  r.accuracy = p.accuracy;
  if (p.weight_bytes_per_rep) r.weight_mb_per_rep = p.weight_bytes_per_rep() / 1e6;
  return r;
}

// The time a sampling workload would take if it did nothing but read its weights once per
// Euler step at the memory roof.
// The share of the float32 sgemm roof, or NaN (JSON null, a blank cell) for a float64 workload.
double roof_fraction(const Result& r, double roof) {
  for (const Workload& w : kWorkloads)
    if (r.workload == w.name && w.float64) return std::numeric_limits<double>::quiet_NaN();
  return r.gflops / roof;
}

double memory_floor_ms(const Result& r, double memory_roof) {
  return r.weight_mb_per_rep / memory_roof;  // MB / (GB/s) = ms
}

// Rounded to `digits` decimals: JSON numbers as short as the table's.
double rounded(double x, int digits) {
  const double scale = std::pow(10.0, digits);
  return std::round(x * scale) / scale;
}

std::string json_line(const Result& r, int threads, const SgemmRoof& sgemm_roof, double memory_roof,
                      const char* core, const std::string& allocator) {
  const double roof = sgemm_roof.best();
  nlohmann::ordered_json j = {{"workload", r.workload},
                              {"threads", threads},
                              {"reps", r.reps},
                              {"median_ms", rounded(r.median_ms, 3)},
                              {"min_ms", rounded(r.min_ms, 3)},
                              {"max_ms", rounded(r.max_ms, 3)},
                              {"gflop_per_rep", rounded(r.gflop_per_rep, 3)},
                              {"gflops", rounded(r.gflops, 1)},
                              {"roof_gflops", rounded(roof, 1)},
                              {"roof_fraction", rounded(roof_fraction(r, roof), 3)},
                              {"peak_rss_mb", rounded(r.peak_rss_mb, 1)},
                              {"page_faults_per_rep", rounded(r.page_faults_per_rep, 1)},
                              {"openblas_core", core},
                              {"roof_onednn_gflops", rounded(sgemm_roof.onednn, 1)},
                              {"roof_openblas_gflops", rounded(sgemm_roof.openblas, 1)},
                              {"memory_roof_gbps", rounded(memory_roof, 1)},
                              {"sgemm", raw::sgemm_library_name(raw::sgemm_library())},
                              {"allocator", allocator},
                              {"openblas_threading", openblas_threading()}};
  if (const char* detected = std::getenv(kDetectedCoreVariable))
    j["openblas_core_detected"] = detected;
  if (r.weight_mb_per_rep > 0) {
    j["weight_mb_per_rep"] = rounded(r.weight_mb_per_rep, 3);
    j["memory_floor_ms"] = rounded(memory_floor_ms(r, memory_roof), 2);
  }
  if (r.tape) {
    j["tape_nodes"] = r.tape->nodes;
    j["saved_mb"] = rounded(r.tape->saved_bytes / 1048576.0, 1);
    j["saved_parameters_mb"] = rounded(r.tape->parameter_bytes / 1048576.0, 1);
    j["saved_other_mb"] = rounded(r.tape->other_bytes / 1048576.0, 1);
  }
  if (r.accuracy) {
    j["max_abs_diff_vs_f32"] = r.accuracy->max_abs_diff;
    j["rel_rms_diff_vs_f32"] = r.accuracy->rel_rms;
  }
  // JSON has no NaN or infinity: nlohmann writes them as null, and result_from_json reads null
  // back as NaN.
  return j.dump();
}

void print_table_row(const Result& r, double roof, double memory_roof) {
  const double fraction = roof_fraction(r, roof);
  std::printf("%-19s %9.2f %9.2f %9.2f %8.1f %8.1f %7s %8.0f %8.0f", r.workload.c_str(),
              r.median_ms, r.min_ms, r.max_ms, r.gflop_per_rep, r.gflops,
              std::isnan(fraction) ? "" : str_cat(std::lround(100 * fraction), "%").c_str(),
              r.peak_rss_mb, r.page_faults_per_rep);
  if (r.tape)
    std::printf(" %6lld %9.1f %7.1f", static_cast<long long>(r.tape->nodes),
                r.tape->saved_bytes / 1048576.0, r.tape->other_bytes / 1048576.0);
  if (r.accuracy)
    std::printf("  (%s; actions vs float32: max |diff| %.2g, relative rms %.2g)",
                packed_kernel_name(WeightPrecision::bf16).c_str(), r.accuracy->max_abs_diff,
                r.accuracy->rel_rms);
  if (r.weight_mb_per_rep > 0)
    std::printf("  (reads %.0f MB of weights: %.1f ms at the memory roof)", r.weight_mb_per_rep,
                memory_floor_ms(r, memory_roof));
  std::printf("\n");
}

struct Options;
std::string run_in_child(const Workload& w, const Options& o, int threads, const SgemmRoof& roof,
                         double memory_roof);
Result result_from_json(const std::string& line);

struct Options {
  std::vector<std::string> workloads;
  int threads = 0;
  int reps = 10;
  int warmup = 2;
  bool json = false;
  bool keep_coretype = false;
  std::string sgemm;  // empty: MMDIT_SGEMM, else raw::default_sgemm_library()
  // Set by a parent bench for the workload it runs in a child: the roofs it measured and
  // printed (oneDNN and OpenBLAS GFLOP/s, GB/s), so that every row is a share of the same ones.
  std::vector<double> roofs;
};

void run_bench(const Options& o) {
  const char* user_core = std::getenv("OPENBLAS_CORETYPE");
  const char* detected_core = std::getenv(kDetectedCoreVariable);
  if (!o.keep_coretype && user_core && !detected_core) {
    // Too late for this process: OpenBLAS chose its kernels when it was loaded.
    std::fprintf(stderr,
                 "bench: re-running without OPENBLAS_CORETYPE=%s (--keep-coretype keeps it)\n",
                 user_core);
    unsetenv("OPENBLAS_CORETYPE");
    reexecute_self();
    std::fprintf(stderr, "bench: could not re-execute; keeping OPENBLAS_CORETYPE\n");
  }
  if (o.threads > 0) set_num_threads(o.threads);
  const int threads = num_threads();
  const std::string core_name = openblas_core();
  const char* core = core_name.c_str();
  const std::string core_label =
      str_cat(core_name, " (", openblas_threading(), " build",
              detected_core ? str_cat("; OpenBLAS detected ", detected_core) : std::string(), ")");
  const std::string allocator = allocator_name();
  std::vector<const Workload*> chosen;
  for (const std::string& name : o.workloads) {
    if (name == "all") {
      for (const Workload& w : kWorkloads) chosen.push_back(&w);
      continue;
    }
    const Workload* found = nullptr;
    for (const Workload& w : kWorkloads)
      if (name == w.name) found = &w;
    std::string names;
    for (const Workload& w : kWorkloads) names += str_cat(w.name, ", ");
    MMDIT_CHECK(found, "bench: unknown workload '", name, "'; choose ", names, "or all");
    chosen.push_back(found);
  }
  if (!o.sgemm.empty()) raw::set_sgemm_library(raw::parse_sgemm_library(o.sgemm));
  const bool given = o.roofs.size() == 3;
  const SgemmRoof sgemm_roof = given ? SgemmRoof{o.roofs[0], o.roofs[1]} : sgemm_roof_gflops();
  const double roof = sgemm_roof.best();
  const double memory_roof = given ? o.roofs[2] : memory_roof_gbps();
  const char* sgemm = raw::sgemm_library_name(raw::sgemm_library());
  if (!o.json) {
    std::printf(
        "mmdit bench: %d thread(s), float32 products on %s, OpenBLAS core %s, %s, %d reps after "
        "%d warm-up\n",
        threads, sgemm, core_label.c_str(), allocator.c_str(), o.reps, o.warmup);
    std::printf("sgemm roof (2048^3, same threads): %.1f GFLOP/s (onednn %.1f, openblas %.1f)\n",
                roof, sgemm_roof.onednn, sgemm_roof.openblas);
    std::printf("memory roof (reading 256 MB, same threads): %.1f GB/s\n\n", memory_roof);
    std::printf("%-19s %9s %9s %9s %8s %8s %7s %8s %8s %6s %9s %7s\n", "workload", "median ms",
                "min ms", "max ms", "GFLOP", "GFLOP/s", "roof", "RSS MB", "faults", "nodes",
                "saved MB", "other MB");
    std::fflush(stdout);
  }
  for (const Workload* w : chosen) {
    if (!o.json) std::fprintf(stderr, "running %s: %s\n", w->name, w->what);
    if (chosen.size() == 1) {
      const Result r = run(*w, o.reps, o.warmup);
      if (o.json)
        std::printf("%s\n",
                    json_line(r, threads, sgemm_roof, memory_roof, core, allocator).c_str());
      else
        print_table_row(r, roof, memory_roof);
    } else {
      // One process per workload: no workload inherits another's heap, caches or peak RSS.
      const std::string line = run_in_child(*w, o, threads, sgemm_roof, memory_roof);
      if (o.json)
        std::printf("%s\n", line.c_str());
      else
        print_table_row(result_from_json(line), roof, memory_roof);
    }
    std::fflush(stdout);
  }
}

std::string run_in_child(const Workload& w, const Options& o, int threads, const SgemmRoof& roof,
                         double memory_roof) {
  char exe[4096];
  const ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
  MMDIT_CHECK(len > 0, "bench: cannot find this program's path (/proc/self/exe)");
  exe[len] = 0;
  const std::string command =
      str_cat("'", exe, "' bench --keep-coretype --json --workload ", w.name, " --reps ", o.reps,
              " --warmup ", o.warmup, " --threads ", threads, " --sgemm ",
              raw::sgemm_library_name(raw::sgemm_library()), " --roofs ", roof.onednn, " ",
              roof.openblas, " ", memory_roof);
  FILE* pipe = nullptr;
  start_program_unbound([&] { pipe = popen(command.c_str(), "r"); });
  MMDIT_CHECK(pipe, "bench: cannot start ", command);
  std::string out;
  char buf[4096];
  while (std::fgets(buf, sizeof buf, pipe)) out += buf;
  const int status = pclose(pipe);
  MMDIT_CHECK(status == 0 && !out.empty(), "bench: workload ", w.name, " failed (",
              status == -1          ? std::string("its status is unknown")
              : WIFSIGNALED(status) ? str_cat("killed by signal ", WTERMSIG(status))
                                    : str_cat("exit status ", WEXITSTATUS(status)),
              ")");
  while (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

Result result_from_json(const std::string& line) {
  const nlohmann::json j = nlohmann::json::parse(line);
  const auto number = [&](const char* key) {
    const nlohmann::json& v = j.at(key);
    return v.is_null() ? std::numeric_limits<double>::quiet_NaN() : v.get<double>();
  };
  Result r;
  r.workload = j.at("workload").get<std::string>();
  r.reps = j.at("reps").get<int>();
  r.median_ms = number("median_ms");
  r.min_ms = number("min_ms");
  r.max_ms = number("max_ms");
  r.gflop_per_rep = number("gflop_per_rep");
  r.gflops = number("gflops");
  r.peak_rss_mb = number("peak_rss_mb");
  r.page_faults_per_rep = number("page_faults_per_rep");
  if (j.contains("weight_mb_per_rep")) r.weight_mb_per_rep = number("weight_mb_per_rep");
  if (j.contains("max_abs_diff_vs_f32"))
    r.accuracy = Accuracy{number("max_abs_diff_vs_f32"), number("rel_rms_diff_vs_f32")};
  if (j.contains("tape_nodes"))
    r.tape = TapeStats{j.at("tape_nodes").get<int64_t>(),
                       static_cast<size_t>(number("saved_mb") * 1048576.0),
                       static_cast<size_t>(number("saved_parameters_mb") * 1048576.0),
                       static_cast<size_t>(number("saved_other_mb") * 1048576.0)};
  return r;
}

}  // namespace

void add_bench_command(CLI::App& app) {
  auto opts = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "bench",
      "Time the spec/bench.md workloads next to this machine's sgemm and memory throughput");
  cmd->add_option("--workload", opts->workloads,
                  "policy-train, policy-act, policy-act-b64, policy-act-bf16, "
                  "policy-act-b64-bf16, incontext-train, tiny-gradcheck or all (repeatable)")
      ->default_val(std::vector<std::string>{"all"});
  add_threads_option(cmd, opts->threads);
  cmd->add_option("--reps", opts->reps, "timed repetitions (median reported)")
      ->check(positive())
      ->capture_default_str();
  cmd->add_option("--warmup", opts->warmup, "untimed repetitions first")
      ->check(non_negative())
      ->capture_default_str();
  cmd->add_flag("--json", opts->json, "one JSON object per workload per line");
  cmd->add_flag("--keep-coretype", opts->keep_coretype,
                "keep OPENBLAS_CORETYPE from the environment instead of re-running without it");
  cmd->add_option("--sgemm", opts->sgemm,
                  "library for the float32 products: onednn or openblas (default: MMDIT_SGEMM, "
                  "else onednn where it has AVX-512 kernels, openblas elsewhere)")
      ->check(CLI::IsMember({"onednn", "openblas"}));
  // Hidden (no group): how a bench passes its roofs to the child process of each workload.
  cmd->add_option("--roofs", opts->roofs)->expected(3)->check(CLI::PositiveNumber)->group("");
  cmd->callback([opts] { run_bench(*opts); });
}

}  // namespace mmdit::cli
