// Inspecting the tape (autodiff/inspect.h, anomaly mode in autodiff/tape.h) and the `mmdit
// inspect` / `mmdit gradcheck` commands.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "autodiff/inspect.h"
#include "autodiff/ops.h"
#include "autodiff/value_and_grad.h"
#include "tensor/blas_core.h"
#include "tensor/random.h"
#include "tests/test_util.h"

namespace mmdit {
namespace {

using test::error_of;

using testing::HasSubstr;
using testing::Not;
using testing::StartsWith;

int count(const std::string& s, const std::string& what) {
  int n = 0;
  for (size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + 1)) ++n;
  return n;
}

// y = sum(tanh(x @ w) * 2), the matmul inside NameScope "layer", with x and w watched.
struct TinyGraph {
  Tensor x = full({2, 3}, 0.5, DType::f64), w = full({3, 4}, 0.25, DType::f64);
  Tape tape;
  Tensor y;
  TinyGraph() {
    tape.watch(x);
    tape.watch(w);
    Tensor h;
    {
      NameScope scope("layer");
      h = matmul(x, w);
    }
    y = sum(tanh(h) * 2.0);
  }
};

TEST(InspectTape, FormatsEveryNodeAndTheTotals) {
  TinyGraph g;
  NamedTensors names;
  names.insert("w", g.w);
  const std::string want =
      "tape: 4 nodes, 6 values, 208 B saved for backward\n"
      "leaves: %0 (2,3); 1 parameter, shown by name (relative to the node's scope)\n"
      "#  op          output        <- inputs             saved  scope\n"
      "0  matmul      %2 (2,4) f64  <- %0 (2,3), w (3,4)  144 B  layer\n"
      "1  tanh        %3 (2,4) f64  <- %2 (2,4)            64 B\n"
      "2  mul_scalar  %4 (2,4) f64  <- %3 (2,4)             0 B\n"
      "3  sum         %5 () f64     <- %4 (2,4)             0 B\n"
      "totals: 4 nodes, 6 values (2 leaves), 208 B saved for backward\n"
      "  matmul 1 x 144 B, mul_scalar 1 x 0 B, sum 1 x 0 B, tanh 1 x 64 B\n"
      "saved storages, each once, as allocated: 192 B of leaves, 64 B other\n";
  EXPECT_EQ(format_tape(g.tape, names), want);
  EXPECT_THAT(test::read_source("README.md"), HasSubstr("\n```\n" + want + "```\n"));

  // After backward the saved tensors are gone, and the listing says so.
  g.tape.gradient(g.y, {g.x, g.w});
  const std::string after = format_tape(g.tape);
  EXPECT_THAT(after, HasSubstr("0 B saved for backward (gradient() has run and released them)"));
  EXPECT_THAT(after, HasSubstr("leaves: %0 (2,3) %1 (3,4)\n"));
}

TEST(InspectTape, ConstantInputsAndAnEmptyTape) {
  Tape tape;
  EXPECT_EQ(format_tape(tape),
            "tape: 0 nodes, 0 values, 0 B saved for backward\nleaves: none\n"
            "#  op  output  <- inputs  saved  scope\n"
            "totals: 0 nodes, 0 values (0 leaves), 0 B saved for backward\n");
  Tensor x = full({3}, 1.0, DType::f32);
  tape.watch(x);
  Tensor y = x * full({3}, 2.0, DType::f32);
  EXPECT_THAT(format_tape(tape), HasSubstr("mul  %1 (3,) f32  <- %0 (3,), const (3,)"));
}

// Names were cut at the last dot they shared with the scope: blocks.10.w used in scope blocks.1
// read "0.w", as if it were blocks.1.0.w.
TEST(InspectTape, AParameterUsedOutsideItsScopeKeepsItsWholeName) {
  const Tensor x = full({2}, 1.0, DType::f64), w0 = full({2}, 2.0, DType::f64),
               w1 = full({2}, 3.0, DType::f64), w10 = full({2}, 4.0, DType::f64);
  NamedTensors names;
  names.insert("blocks.0.w", w0);
  names.insert("blocks.1.w", w1);
  names.insert("blocks.10.w", w10);
  Tape tape;
  for (const auto& [name, t] : names) tape.watch(t);
  {
    NameScope blocks("blocks");
    NameScope one("1");
    sum(x * w1 * w0 * w10);
  }
  const std::string listing = format_tape(tape, names);
  EXPECT_THAT(listing, HasSubstr("<- const (2,), w (2,)"));
  EXPECT_THAT(listing, HasSubstr(", blocks.0.w (2,)"));
  EXPECT_THAT(listing, HasSubstr(", blocks.10.w (2,)"));
}

TEST(InspectDot, StructureClustersAndBackwardEdges) {
  TinyGraph g;
  const std::string dot = tape_to_dot(g.tape);
  EXPECT_EQ(dot.rfind("digraph tape {\n", 0), 0u);
  EXPECT_EQ(dot.substr(dot.size() - 2), "}\n");
  EXPECT_THAT(dot, HasSubstr("v0 [shape=ellipse, label=\"%0\\n(2,3)\"];"));
  EXPECT_THAT(dot, HasSubstr("v1 [shape=ellipse, label=\"%1\\n(3,4)\"];"));
  // The matmul sits in the "layer" cluster; the other ops are outside any cluster.
  const size_t cluster = dot.find("subgraph cluster_0 {");
  ASSERT_NE(cluster, std::string::npos);
  EXPECT_THAT(dot.substr(cluster), HasSubstr("label=\"layer\";"));
  const size_t matmul = dot.find("n0 [shape=box, label=\"matmul\\n%2 (2,4) f64\"];");
  ASSERT_NE(matmul, std::string::npos);
  EXPECT_GT(matmul, cluster);
  EXPECT_LT(dot.find("n1 [shape=box, label=\"tanh\\n%3 (2,4) f64\"];"), cluster);
  EXPECT_EQ(count(dot, "subgraph"), 1);
  for (const char* edge : {"v0 -> n0 [label=\"%0 (2,3)\"];", "v1 -> n0 [label=\"%1 (3,4)\"];",
                           "n0 -> n1 [label=\"%2 (2,4)\"];", "n1 -> n2 [label=\"%3 (2,4)\"];",
                           "n2 -> n3 [label=\"%4 (2,4)\"];"})
    EXPECT_THAT(dot, HasSubstr(edge));
  EXPECT_EQ(count(dot, " -> "), 5);
  EXPECT_EQ(count(dot, "dashed"), 0);

  const std::string both = tape_to_dot(g.tape, /*backward_edges=*/true);
  EXPECT_EQ(count(both, " -> "), 10);
  EXPECT_EQ(count(both, "style=dashed"), 5);
  EXPECT_THAT(both, HasSubstr("n0 -> v1 [style=dashed, color=red, constraint=false"));

  if (std::system("command -v dot > /dev/null 2>&1") != 0)
    GTEST_SKIP() << "Graphviz `dot` is not installed; the structure was checked without it";
  const std::string dir = testing::TempDir();
  for (const std::string* text : {&dot, &both}) {
    std::ofstream(dir + "/tape.dot") << *text;
    ASSERT_EQ(std::system(("dot -Tsvg " + dir + "/tape.dot -o " + dir + "/tape.svg").c_str()), 0);
    std::ifstream svg(dir + "/tape.svg");
    const std::string s((std::istreambuf_iterator<char>(svg)), std::istreambuf_iterator<char>());
    EXPECT_THAT(s, HasSubstr("<svg"));
    EXPECT_THAT(s, HasSubstr("matmul"));
  }
}

TEST(InspectDot, NestedScopesNest) {
  Tensor x = full({2}, 1.0, DType::f32);
  Tape tape;
  tape.watch(x);
  NameScope a("blocks");
  Tensor y;
  {
    NameScope b("0");
    y = exp(x);
    NameScope c("attn");
    y = y * 3.0;
    y = y + x;
  }
  {
    NameScope b("1");
    y = sin(y);
  }
  const std::string dot = tape_to_dot(tape);
  // "blocks" has two children and is a frame of its own; "blocks.0.attn" nests in "blocks.0".
  EXPECT_EQ(count(dot, "subgraph"), 4);
  const size_t outer = dot.find("label=\"blocks\";"), zero = dot.find("label=\"blocks.0\";"),
               attn = dot.find("label=\"blocks.0.attn\";"), one = dot.find("label=\"blocks.1\";");
  ASSERT_NE(outer, std::string::npos);
  EXPECT_LT(outer, zero);
  EXPECT_LT(zero, attn);
  EXPECT_LT(attn, one);
}

// ---- anomaly mode ----

TEST(AnomalyMode, NamesTheForwardOpThatMadeANaN) {
  Tensor x = from_vector({1.0, -1.0}, {2}, DType::f64);
  Tape tape;
  tape.watch(x);
  AnomalyMode anomaly;
  Tensor y = x * 2.0;
  const std::string e = error_of([&] {
    NameScope scope("layer");
    log(y);
  });
  const std::string want =
      "anomaly mode: log (node 1, recorded in scope 'layer') produced NaN at (1,) in its output "
      "(2,) float64; inputs: %1 (2,)";
  EXPECT_THAT(e, HasSubstr(want));
  // The README and docs/autodiff.md show this message.
  EXPECT_THAT(test::read_source("README.md"), HasSubstr("\n" + want + "\n"));
  EXPECT_THAT(test::read_source("docs/autodiff.md"), HasSubstr("\n" + want + "\n"));
  EXPECT_EQ(tape.nodes().size(), 1u);  // the faulty op is not recorded
}

TEST(AnomalyMode, NamesTheBackwardThatMadeAnInf) {
  Tensor x = from_vector({0.0, 4.0}, {2}, DType::f64);
  Tape tape;
  tape.watch(x);
  AnomalyMode anomaly;
  Tensor y = sum(sqrt(x) * 3.0);  // sqrt(0) = 0 is fine; its derivative 1/(2 sqrt(0)) is not
  ASSERT_EQ(y.item(), 6.0);
  const std::string e = error_of([&] { tape.gradient(y, {x}); });
  // The whole message, as the README shows it.
  const std::string want =
      "anomaly mode: the backward of sqrt (node 0, recorded in scope '<root>') produced +Inf at "
      "(0,) in the gradient of its input 0 (%0 (2,)); output %1 (2,), inputs: %0 (2,)";
  EXPECT_THAT(e, HasSubstr(want));
  EXPECT_THAT(test::read_source("README.md"), HasSubstr("\n" + want + "\n"));
}

TEST(AnomalyMode, OffByDefaultAndRestoredByTheGuard) {
  EXPECT_FALSE(anomaly_mode());
  {
    AnomalyMode on;
    EXPECT_TRUE(anomaly_mode());
    {
      AnomalyMode off(false);
      EXPECT_FALSE(anomaly_mode());
    }
    EXPECT_TRUE(anomaly_mode());
  }
  EXPECT_FALSE(anomaly_mode());
  set_anomaly_mode(true);
  EXPECT_TRUE(anomaly_mode());
  set_anomaly_mode(false);

  // Off, NaNs and Infs flow through silently, as they would without a tape.
  Tensor x = from_vector({0.0, -1.0}, {2}, DType::f64);
  Tape tape;
  tape.watch(x);
  Tensor y = sum(sqrt(x) + log(x + 2.0));
  EXPECT_TRUE(std::isnan(y.item()));
  const Tensor g = tape.gradient(y, {x})[0];
  EXPECT_TRUE(std::isinf(g.to_vector<double>()[0]));
}

TEST(GradientNorms, MatchTheClosedForm) {
  NamedTensors params;
  params.insert("w", from_vector({3.0, 4.0}, {2}, DType::f64));
  params.insert("b", full({2, 2}, 1.0, DType::f64));
  // d/dw sum(w^2) = 2w, norm 2 * 5; d/db 3 sum(b) = 3, norm 3 * 2.
  auto [loss, grads] = value_and_grad(
      [](const NamedTensors& p) { return sum(square(p.at("w"))) + sum(p.at("b")) * 3.0; })(params);
  const auto norms = gradient_norms(grads);
  ASSERT_EQ(norms.size(), 2u);
  EXPECT_EQ(norms[0].first, "w");
  EXPECT_DOUBLE_EQ(norms[0].second, 10.0);
  EXPECT_EQ(norms[1].first, "b");
  EXPECT_DOUBLE_EQ(norms[1].second, 6.0);
}

// ---- the commands ----

using test::Command;
using test::run_mmdit;

TEST(InspectCli, GradcheckPassesOnTheTinyMMDiT) {
  const Command r = run_mmdit("gradcheck --model mmdit");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("gradcheck ok: "));
  EXPECT_THAT(r.output, HasSubstr("blocks.0.to_cond.weight"));
  EXPECT_THAT(r.output, Not(HasSubstr("FAILED")));
  // A tolerance no float can meet makes it fail, with a non-zero status.
  const Command strict = run_mmdit("gradcheck --model mmdit --sample 2 --atol 0 --rtol 1e-300");
  EXPECT_NE(strict.status, 0) << strict.output;
  EXPECT_THAT(strict.output, HasSubstr("FAILED"));
}

// The policy's last block leaves out the observation tokens' feed-forward and final layer: those
// rows showed analytic 0 = numeric 0 among the checked ones, as if they had been tested.
TEST(InspectCli, GradcheckNamesWhatItCouldNotTest) {
  const Command r = run_mmdit("gradcheck --model policy");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("gradcheck ok: "));
  EXPECT_THAT(r.output, HasSubstr("not checked, 10 tensors the output is not computed from: "));
  EXPECT_THAT(r.output, HasSubstr("mmdit.final_layers.0.linear_out.weight"));
  EXPECT_THAT(r.output,
              testing::ContainsRegex("q_rmsnorms\\.0\\.gamma [^\n]*\\(every derivative 0\\)"));
  EXPECT_THAT(r.output,
              Not(testing::ContainsRegex("q_rmsnorms\\.1\\.gamma [^\n]*every derivative")));
}

TEST(InspectCli, InspectPrintsThePolicyTape) {
  const std::string dot = testing::TempDir() + "/policy.dot";
  const Command r = run_mmdit("inspect --model policy --dot " + dot + " --backward-edges");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_THAT(r.output, testing::ContainsRegex("tape: [0-9]+ nodes"));
  EXPECT_THAT(r.output, HasSubstr("mmdit.blocks.0"));
  EXPECT_TRUE(std::filesystem::exists(dot));
  for (const char* model : {"mmdit", "incontext"}) {
    const Command m = run_mmdit(std::string("inspect --model ") + model + " --depth 2");
    EXPECT_EQ(m.status, 0) << m.output;
    EXPECT_THAT(m.output, HasSubstr("blocks.1"));
  }
  EXPECT_NE(run_mmdit("inspect --model nope").status, 0);
  EXPECT_NE(run_mmdit("inspect --model policy --dim-head 3").status, 0);
}

// --dot with --profile, and --backward-edges without --dot, were accepted and wrote nothing.
TEST(InspectCli, RefusesFlagsItWouldIgnore) {
  const std::string dot = testing::TempDir() + "/ignored.dot";
  std::filesystem::remove(dot);
  Command r = run_mmdit("inspect --model mmdit --profile --dot " + dot);
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("--dot excludes --profile"));
  r = run_mmdit("inspect --model mmdit --backward-edges");
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("--backward-edges requires --dot"));
  EXPECT_FALSE(std::filesystem::exists(dot));
}

// README.md and docs/autodiff.md show these listings, trimmed: their header and totals lines
// must be the ones the command prints (the shapes and bytes depend on no rounding).
TEST(InspectCli, TheDocsShowTheTinyModelsTapes) {
  for (const auto& [model, doc] : {std::pair<std::string, std::string>{"mmdit", "docs/autodiff.md"},
                                   {"policy", "README.md"}}) {
    const Command r = run_mmdit("inspect --model " + model);
    ASSERT_EQ(r.status, 0) << r.output;
    const std::string text = test::read_source(doc);
    std::istringstream lines(r.output);
    bool in_totals = false;
    int checked = 0;
    for (std::string line; std::getline(lines, line);) {
      if (line.rfind("totals: ", 0) == 0) in_totals = true;
      if (line.rfind("loss ", 0) == 0) in_totals = false;
      if (line.rfind("tape: ", 0) == 0 || in_totals) {
        EXPECT_THAT(text, HasSubstr("\n" + line + "\n")) << doc << " lacks a line of " << model;
        ++checked;
      }
    }
    EXPECT_GE(checked, 4) << r.output;
  }
}

// The object `mmdit bench --json` printed, one line of its output.
nlohmann::json bench_json(const std::string& output) {
  std::istringstream lines(output);
  for (std::string line; std::getline(lines, line);)
    if (!line.empty() && line[0] == '{') return nlohmann::json::parse(line);
  ADD_FAILURE() << "no JSON line in:\n" << output;
  return nlohmann::json::object();
}

// `mmdit bench --json` prints one object per workload with the keys issue #5 names (the
// numbers themselves are timings: only their presence and sanity are checked).
TEST(BenchCli, JsonLineHasTheRequiredKeys) {
  const Command r = run_mmdit(
      "bench --workload policy-act --reps 1 --warmup 0 --threads 1 --json --keep-coretype");
  ASSERT_EQ(r.status, 0) << r.output;
  const nlohmann::json j = bench_json(r.output);
  for (const char* key : {"workload", "threads", "median_ms", "gflops", "roof_gflops",
                          "peak_rss_mb", "openblas_core", "allocator"})
    EXPECT_TRUE(j.contains(key)) << key << " missing in " << j.dump();
  EXPECT_EQ(j.value("workload", ""), "policy-act");
  EXPECT_EQ(j.value("threads", 0), 1);
  EXPECT_GT(j.value("median_ms", 0.0), 0.0);
#ifdef MMDIT_WITH_TCMALLOC
  // The build linked the programs with tcmalloc (CMakeLists.txt): mmdit must really run on it.
  EXPECT_THAT(j.value("allocator", ""), StartsWith("tcmalloc (gperftools"));
#else
  EXPECT_EQ(j.value("allocator", ""), "system malloc");
#endif
  // The project's build links OpenBLAS's OpenMP build (CMakeLists.txt's RUNPATH), whatever
  // Debian's libopenblas.so.0 alternative points to.
  EXPECT_EQ(j.value("openblas_threading", ""), "OpenMP");
  // 10 Euler steps of the reference policy at batch 1 (hidden 256, 8 blocks, 8 heads of 64,
  // ff_mult 4; 2 observation and 16 action tokens), the products counted as they ran: per block
  // and token, to_qkv, to_out and the three feed-forward products; attention's q k^T and p v per
  // head; the last block skips the observation tokens' to_out and feed-forward (unread); the
  // action encoder and the action final layer.
  const double per_token = 2.0 * (256 * 1536 + 512 * 256 + 3 * 256 * 1024);
  const double step = 18 * 8 * per_token - 2 * 2.0 * (512 * 256 + 3 * 256 * 1024) +
                      8 * 8 * 2 * (2.0 * 18 * 18 * 64) + 16 * 2.0 * 2 * 256 + 16 * 2.0 * 256 * 2;
  EXPECT_NEAR(j.value("gflop_per_rep", 0.0), 10 * step / 1e9, 6e-4);
  // The weights those products read: each packed weight once per step, in panels of 16 output
  // columns (the action final layer's 2 outputs take a whole panel), plus the observation
  // encoder's 4 x 256 (packed too, though it runs once per call).
  const double weight_floats = 16 * (256 * 1536 + 512 * 256 + 3 * 256 * 1024) -
                               (512 * 256 + 3 * 256 * 1024) + 256 * 2 + 16 * 256 + 256 * 4;
  EXPECT_NEAR(j.value("weight_mb_per_rep", 0.0), 10 * 4 * weight_floats / 1e6, 1e-3);
  EXPECT_GT(j.value("memory_roof_gbps", 0.0), 0.0);
  // A bfloat16 workload also reports how far its actions are from the float32 sampler's.
  const Command bf16 = run_mmdit(
      "bench --workload policy-act-bf16 --reps 1 --warmup 0 --threads 1 --json --keep-coretype");
  ASSERT_EQ(bf16.status, 0) << bf16.output;
  const nlohmann::json jb = bench_json(bf16.output);
  const double rel_rms = jb.value("rel_rms_diff_vs_f32", 0.0);
  EXPECT_GT(rel_rms, 0.0);
  EXPECT_LT(rel_rms, 0.01);
  EXPECT_NEAR(jb.value("weight_mb_per_rep", 0.0), 10 * 2 * weight_floats / 1e6, 1e-3);
  const Command bad = run_mmdit("bench --workload nope");
  EXPECT_NE(bad.status, 0);
  EXPECT_THAT(bad.output, HasSubstr("unknown workload 'nope'"));
}

// Several workloads run one process each. Each child measured roofs of its own while the header
// printed the parent's, so a row's "% of roof" was a share of a roof not shown: every row now
// uses the run's roofs. A float64 workload has no share of the float32 sgemm roof (null).
TEST(BenchCli, EveryWorkloadOfARunIsAShareOfTheSameRoofs) {
  const Command r = run_mmdit(
      "bench --workload tiny-gradcheck --workload policy-act --reps 1 --warmup 0 --threads 1 "
      "--json",
      "env -u MMDIT_OPENBLAS_DETECTED_CORE OPENBLAS_CORETYPE=Haswell ");
  ASSERT_EQ(r.status, 0) << r.output;
  std::vector<nlohmann::json> rows;
  std::istringstream lines(r.output);
  for (std::string line; std::getline(lines, line);)
    if (!line.empty() && line[0] == '{') rows.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(rows.size(), 2u) << r.output;
  for (const char* key :
       {"roof_gflops", "roof_onednn_gflops", "roof_openblas_gflops", "memory_roof_gbps"})
    EXPECT_EQ(rows[0].at(key), rows[1].at(key)) << key << "\n" << r.output;
  EXPECT_TRUE(rows[0].at("roof_fraction").is_null()) << rows[0].dump();
  EXPECT_NEAR(rows[1].at("roof_fraction").get<double>(),
              rows[1].at("gflops").get<double>() / rows[1].at("roof_gflops").get<double>(), 2e-3);
  // The core the user set is dropped with a word on stderr, in JSON mode too.
  EXPECT_THAT(r.output, HasSubstr("bench: re-running without OPENBLAS_CORETYPE=Haswell"));
}

// With OPENBLAS_CORETYPE unset, mmdit runs on the widest kernels this CPU can use, whether
// OpenBLAS detected them itself or mmdit started again with them (and says which it detected).
TEST(BenchCli, RunsOnTheWidestOpenBlasKernelsTheCpuHas) {
  const Command r = run_mmdit("bench --workload policy-act --reps 1 --warmup 0 --threads 1 --json",
                              "env -u OPENBLAS_CORETYPE -u MMDIT_OPENBLAS_DETECTED_CORE ");
  ASSERT_EQ(r.status, 0) << r.output;
  const std::string core = bench_json(r.output).value("openblas_core", "");
  const mmdit::CpuFeatures cpu = mmdit::cpu_features();
  EXPECT_EQ(mmdit::better_openblas_core(core, cpu), "") << r.output;
  if (r.output.find("openblas_core_detected") != std::string::npos) {
    EXPECT_THAT(r.output, HasSubstr("this OpenBLAS does not know the CPU")) << r.output;
  }
  // A core the user sets is kept, and nothing is said about it.
  const Command kept = run_mmdit(
      "bench --workload policy-act --reps 1 --warmup 0 --threads 1 --json --keep-coretype",
      "env -u MMDIT_OPENBLAS_DETECTED_CORE OPENBLAS_CORETYPE=Haswell ");
  ASSERT_EQ(kept.status, 0) << kept.output;
  const nlohmann::json j = bench_json(kept.output);
  EXPECT_EQ(j.value("openblas_core", ""), "Haswell");
  EXPECT_FALSE(j.contains("openblas_core_detected"));
  EXPECT_THAT(kept.output, Not(HasSubstr("does not know the CPU")));
}

// The profile counts ops by type, times forward and backward, and counts the matrix-product
// FLOPs each node did: 2*M*N*K forward, twice that backward (dA and dB).
TEST(InspectProfile, CountsOpsAndMatmulFlops) {
  Rng rng(5);
  const Tensor x = rng.normal({256, 128}), w = rng.normal({128, 512});
  Tape tape;
  tape.watch(x);
  tape.watch(w);
  tape.set_profiling(true);
  const Tensor y = sum(tanh(matmul(x, w)));
  tape.gradient(y, {x, w});
  int matmuls = 0;
  for (const Node& n : tape.nodes()) {
    // 256 x 128 x 512 takes microseconds; the cheap ops may round to no time at all.
    if (std::string(n.op) == "matmul") {
      ++matmuls;
      EXPECT_GT(n.forward_seconds, 0.0) << "matmul node";
    }
    EXPECT_GT(n.backward_seconds, 0.0) << n.op;
  }
  EXPECT_EQ(matmuls, 1);
  const std::string profile = format_profile(tape);
  std::istringstream lines(profile);
  std::string line;
  bool found = false;
  while (std::getline(lines, line)) {
    std::istringstream fields(line);
    std::string op;
    long long count;
    double fwd_ms, bwd_ms, fwd_gflop, bwd_gflop;
    std::string share;
    fields >> op >> count >> fwd_ms >> bwd_ms >> share >> fwd_gflop >> bwd_gflop;
    if (op != "matmul") continue;
    found = true;
    EXPECT_EQ(count, 1);
    EXPECT_NEAR(fwd_gflop, 2.0 * 256 * 512 * 128 * 1e-9, 1e-3);  // 0.034
    EXPECT_NEAR(bwd_gflop, 4.0 * 256 * 512 * 128 * 1e-9, 1e-3);
  }
  EXPECT_TRUE(found) << profile;
  EXPECT_THAT(profile, HasSubstr("tanh"));
  EXPECT_THAT(profile, HasSubstr("total"));
}

// A profile counts its own thread's products only: a controller multiplying on another thread
// while training was profiled added its GFLOP to the profiled nodes. Here the other thread's
// product falls inside the span of the second op's forward, and inside the backward of a third.
TEST(InspectProfile, ProductsOfOtherThreadsAreNotCounted) {
  Rng rng(6);
  const Tensor a = rng.normal({64, 64});
  const auto product_on_another_thread = [&] { std::thread([&] { raw::matmul(a, a); }).join(); };
  Tensor x = rng.normal({16});
  Tape tape;
  tape.watch(x);
  tape.set_profiling(true);
  const Tensor y = sin(x);
  product_on_another_thread();
  const Tensor z = y * 0.5;
  const Tensor out =
      record("multiplies_elsewhere", raw::mul_scalar(z, 1.0), {z}, {}, [&](Backward& ctx) {
        product_on_another_thread();
        ctx.input(0, [&] { return raw::contiguous(ctx.grad); });
      });
  tape.gradient(sum(out), {x});
  for (const Node& n : tape.nodes()) {
    EXPECT_EQ(n.forward_flops, 0) << n.op;
    EXPECT_EQ(n.backward_flops, 0) << n.op;
  }
}

}  // namespace
}  // namespace mmdit
