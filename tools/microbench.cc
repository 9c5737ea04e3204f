// Micro-benchmark of the tensor layer in float32 on the current thread count:
//   - elementwise throughput (GB/s of memory traffic the op must do at least) for add, mul with
//     a broadcast row, exp, silu, a full sum and row softmax, on 1e4, 1e6 and 1e7 elements;
//   - matmul GFLOP/s of mmdit::raw::matmul (oneDNN unless MMDIT_SGEMM=openblas) next to a
//     direct cblas_sgemm on the same shapes;
//   - the packed products of one Euler step of the reference policy at batch 1 (8 blocks; per
//     block qkv, out and the three feed-forward weights of each modality; 16 action rows, 2
//     observation rows), run as the sampler runs them (pairs, in one team region: run_as_team),
//     each modality alone, and one by one, in float32 and bfloat16, with their weights streamed
//     (8 blocks) and cache-resident (one block's weights 8 times): whether a step is bound by
//     memory or by arithmetic.
// Every figure is the median of >= 10 timed samples after a warm-up; "mmdit/blas" is our
// speed relative to the direct gemm call (1.00 = the same).
//
//   - the models' fused joint attention, forward and forward + backward, at the policy's and the
//     in-context model's shapes.
//
//   microbench [--threads N] [--only elementwise|matmul|sampling|attention]
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "autodiff/fused.h"
#include "autodiff/tape.h"
#include "tensor/blas_core.h"
#include "tensor/ops.h"
#include "tensor/packed_weight.h"
#include "tensor/parallel.h"
#include "tensor/random.h"

namespace {

using namespace mmdit;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Median seconds per call of fn. Each sample runs fn `inner` times, with `inner` chosen so that a
// sample lasts >= 0.2 ms (timer noise); >= 10 samples, more for fast calls, within ~`budget` s.
double median_seconds(const std::function<void()>& fn, double budget = 0.3) {
  fn();  // warm-up: page faults, allocator cache, OpenBLAS buffers
  Clock::time_point t0 = Clock::now();
  fn();
  const double once = std::max(seconds_since(t0), 1e-9);
  const int inner = static_cast<int>(std::clamp(2e-4 / once, 1.0, 10000.0));
  const int samples = static_cast<int>(std::clamp(budget / (once * inner), 10.0, 200.0));
  std::vector<double> times;
  for (int s = 0; s < samples; ++s) {
    t0 = Clock::now();
    for (int i = 0; i < inner; ++i) fn();
    times.push_back(seconds_since(t0) / inner);
  }
  std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
  return times[times.size() / 2];
}

std::string human_time(double s) {
  char buf[32];
  if (s < 1e-3)
    std::snprintf(buf, sizeof buf, "%8.2f us", s * 1e6);
  else if (s < 1)
    std::snprintf(buf, sizeof buf, "%8.3f ms", s * 1e3);
  else
    std::snprintf(buf, sizeof buf, "%8.3f s ", s);
  return buf;
}

void run_elementwise(Rng& rng) {
  std::printf("\nelementwise, float32 (GB/s = bytes the op must read and write / median time)\n");
  std::printf("%-28s %10s %12s %9s\n", "op", "elements", "median", "GB/s");
  const int64_t cols = 1000;  // row length for the broadcast and softmax cases
  for (int64_t n : {int64_t{10000}, int64_t{1000000}, int64_t{10000000}}) {
    const Tensor a = rng.normal({n / cols, cols}), b = rng.normal({n / cols, cols});
    const Tensor row = rng.normal({cols});
    const double f = sizeof(float);
    struct Case {
      const char* name;
      double bytes;
      std::function<void()> fn;
    };
    const Case cases[] = {
        {"add (same shape)", 3 * f * n, [&] { raw::add(a, b); }},
        {"mul (row broadcast)", (2.0 * n + cols) * f, [&] { raw::mul(a, row); }},
        {"exp", 2 * f * n, [&] { raw::unary(raw::UnaryOp::exp, a); }},
        {"silu", 2 * f * n, [&] { raw::unary(raw::UnaryOp::silu, a); }},
        {"sum (all)", f * n, [&] { raw::sum(a); }},
        {"softmax (rows of 1000)", 2 * f * n, [&] { raw::softmax(a, -1); }},
    };
    for (const Case& c : cases) {
      const double t = median_seconds(c.fn);
      std::printf("%-28s %10lld %12s %9.2f\n", c.name, static_cast<long long>(n),
                  human_time(t).c_str(), c.bytes / t / 1e9);
    }
  }
}

struct MatmulCase {
  std::string name;
  int64_t batch, m, k, n;
  bool transpose_b;
};

void run_matmul(Rng& rng) {
  std::printf("\nmatmul, float32, mmdit's products on %s (GFLOP/s = 2*batch*M*N*K / median time)\n",
              raw::sgemm_library_name(raw::sgemm_library()));
  std::printf("%-36s %12s %12s %12s %12s %7s\n", "shape", "mmdit", "GFLOP/s", "cblas_sgemm",
              "GFLOP/s", "mmdit/blas");
  const MatmulCase cases[] = {
      {"(512,512) @ (512,512)", 1, 512, 512, 512, false},
      {"(1024,1024) @ (1024,1024)", 1, 1024, 1024, 1024, false},
      {"(2048,2048) @ (2048,2048)", 1, 2048, 2048, 2048, false},
      {"(4096,1024) @ (1024,256) Linear", 1, 4096, 1024, 256, false},
      {"(1024,1024) @ (1024,1024)^T", 1, 1024, 1024, 1024, true},
      {"(64,128,64) @ (64,64,128) batched", 64, 128, 64, 128, false},
      {"(1024,256) @ (256,1536) policy q,k,v", 1, 1024, 256, 1536, false},
      {"(64,1024) @ (1024,1536) conditioning", 1, 64, 1024, 1536, false},
  };
  for (const MatmulCase& c : cases) {
    const Shape a_shape = c.batch > 1 ? Shape{c.batch, c.m, c.k} : Shape{c.m, c.k};
    Shape b_shape = c.batch > 1 ? Shape{c.batch, c.k, c.n} : Shape{c.k, c.n};
    if (c.transpose_b) b_shape = {c.n, c.k};  // stored (N, K), used through a transposed view
    const Tensor a = rng.normal(a_shape), b_store = rng.normal(b_shape);
    const Tensor b = c.transpose_b ? raw::transpose(b_store, 0, 1) : b_store;
    Tensor out = empty(c.batch > 1 ? Shape{c.batch, c.m, c.n} : Shape{c.m, c.n});

    const double ours = median_seconds([&] { raw::matmul(a, b); }, 1.0);
    const float* pa = a.data<float>();
    const float* pb = b_store.data<float>();
    float* pc = out.data<float>();
    const double blas = median_seconds(
        [&] {
          for (int64_t i = 0; i < c.batch; ++i)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, c.transpose_b ? CblasTrans : CblasNoTrans, c.m,
                        c.n, c.k, 1.0f, pa + i * c.m * c.k, c.k, pb + i * c.k * c.n,
                        c.transpose_b ? c.k : c.n, 0.0f, pc + i * c.m * c.n, c.n);
        },
        1.0);
    const double flops = 2.0 * c.batch * c.m * c.n * c.k;
    std::printf("%-36s %12s %12.1f %12s %12.1f %7.2f\n", c.name.c_str(), human_time(ours).c_str(),
                flops / ours / 1e9, human_time(blas).c_str(), flops / blas / 1e9, blas / ours);
  }
}

void run_sampling_products(Rng& rng) {
  std::printf(
      "\npacked products of one Euler step at batch 1 (GB/s = weight bytes / median time)\n");
  std::printf("%-10s %-10s %-16s %12s %9s\n", "weights", "blocks", "run", "median", "GB/s");
  struct Shape2 {
    int64_t out, in;
  };
  const Shape2 shapes[] = {{1536, 256}, {256, 512}, {1024, 256}, {1024, 256}, {256, 1024}};
  const int64_t action_rows = 16, obs_rows = 2, blocks = 8;
  for (WeightPrecision precision : {WeightPrecision::f32, WeightPrecision::bf16}) {
    std::vector<std::unique_ptr<PackedWeight>> action, obs;
    for (int64_t b = 0; b < blocks; ++b)
      for (const Shape2& s : shapes) {
        action.push_back(std::make_unique<PackedWeight>(rng.normal({s.out, s.in}), precision));
        obs.push_back(std::make_unique<PackedWeight>(rng.normal({s.out, s.in}), precision));
      }
    const std::vector<float> xa(action_rows * 1024, 0.1f), xo(obs_rows * 1024, 0.1f);
    std::vector<float> ya(action_rows * 1536), yo(obs_rows * 1536);
    for (const int64_t distinct : {blocks, int64_t{1}}) {
      double bytes = 0;
      for (int64_t i = 0; i < distinct * 5; ++i) bytes += action[i]->bytes() + obs[i]->bytes();
      bytes *= static_cast<double>(blocks / distinct);
      const auto step = [&](bool with_action, bool with_obs, bool paired) {
        for (int64_t b = 0; b < blocks; ++b)
          for (int64_t s = 0; s < 5; ++s) {
            const size_t i = static_cast<size_t>((b % distinct) * 5 + s);
            const Shape2 sh = shapes[s];
            if (paired) {
              PackedWeight::multiply_pair(*action[i], xa.data(), sh.in, action_rows, ya.data(),
                                          sh.out, *obs[i], xo.data(), sh.in, obs_rows, yo.data(),
                                          sh.out);
              continue;
            }
            if (with_action) action[i]->multiply(xa.data(), sh.in, action_rows, ya.data(), sh.out);
            if (with_obs) obs[i]->multiply(xo.data(), sh.in, obs_rows, yo.data(), sh.out);
          }
      };
      struct Run {
        const char* name;
        bool action, obs, paired;
        double share;  // of the step's weight bytes
      };
      const Run runs[] = {{"pairs", true, true, true, 1.0},
                          {"one by one", true, true, false, 1.0},
                          {"action alone", true, false, false, 0.5},
                          {"obs alone", false, true, false, 0.5}};
      for (const Run& r : runs) {
        // In one team region, as the sampler runs a step.
        const double t =
            median_seconds([&] { run_as_team([&] { step(r.action, r.obs, r.paired); }); });
        std::printf("%-10s %-10s %-16s %12s %9.1f\n", precision_name(precision),
                    distinct == blocks ? "8 (stream)" : "1 (cache)", r.name, human_time(t).c_str(),
                    r.share * bytes / t / 1e9);
      }
    }
  }
}

// The models' fused joint attention (QK-RMSNorm, rotary embedding and attention over two
// modalities) at the benchmark workloads' shapes: the policy's 2 observation + 16 action tokens
// at batch 64 (observation rows see everything, action rows all observations and earlier
// actions), and the in-context model's 100 + 18 at batch 8. GFLOP/s counts the head products:
// 4 T^2 d per head forward, 8 T^2 d backward.
void run_attention(Rng& rng) {
  std::printf("\njoint attention, float32, two modalities, block-causal mask\n");
  std::printf("%-34s %12s %9s %12s %9s\n", "shape", "forward", "GFLOP/s", "fwd + bwd", "GFLOP/s");
  struct Case {
    const char* name;
    int64_t B, context, actions, H, d;
  };
  const Case cases[] = {{"policy    B 64, T 2 + 16, H 8, d 64", 64, 2, 16, 8, 64},
                        {"incontext B 8, T 100 + 18, H 8, d 64", 8, 100, 18, 8, 64}};
  for (const Case& c : cases) {
    const int64_t T = c.context + c.actions;
    std::vector<bool> allowed(static_cast<size_t>(T * T));
    for (int64_t i = 0; i < T; ++i)
      for (int64_t j = 0; j < T; ++j)
        allowed[static_cast<size_t>(i * T + j)] = i < c.context || j <= i;
    const Tensor mask = from_vector<bool>(allowed, {T, T});
    std::vector<Tensor> qkv, gamma, cos, sin;
    for (const int64_t S : {c.context, c.actions}) {
      qkv.push_back(rng.normal({c.B, S, 3, c.H, c.d}));
      gamma.push_back(rng.normal({c.d}));
      cos.push_back(rng.normal({S, c.d}));
      sin.push_back(rng.normal({S, c.d}));
    }
    const Tensor cotangent = rng.normal({c.B, T, c.H, c.d});
    const auto attention = [&] { return joint_attention_fused(qkv, gamma, gamma, cos, sin, mask); };
    const double forward = median_seconds([&] { attention(); });
    const double both = median_seconds([&] {
      Tape tape;
      for (const Tensor& x : qkv) tape.watch(x);
      tape.gradient(attention(), qkv, cotangent);
    });
    const double head_flops = static_cast<double>(c.B * c.H * T * T * c.d);
    std::printf("%-34s %12s %9.1f %12s %9.1f\n", c.name, human_time(forward).c_str(),
                4 * head_flops / forward / 1e9, human_time(both).c_str(),
                12 * head_flops / both / 1e9);
  }
}

}  // namespace

int main(int argc, char** argv) {
  mmdit::use_the_best_openblas_core(argv);
  std::string only;
  const auto usage = [&](FILE* to) {
    std::fprintf(to, "usage: %s [--threads N] [--only elementwise|matmul|sampling|attention]\n",
                 argv[0]);
  };
  const auto refuse = [&](const std::string& why) {
    std::fprintf(stderr, "microbench: %s\n", why.c_str());
    usage(stderr);
    return 2;
  };
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      usage(stdout);
      return 0;
    }
    std::string name = arg, value;
    if (const size_t eq = arg.find('='); arg.starts_with("--") && eq != std::string::npos) {
      name = arg.substr(0, eq);
      value = arg.substr(eq + 1);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      return refuse(arg == "--threads" || arg == "--only" ? arg + " needs a value"
                                                          : "unknown argument '" + arg + "'");
    }
    if (name == "--threads") {
      char* end = nullptr;
      const long threads = std::strtol(value.c_str(), &end, 10);
      if (value.empty() || *end != '\0' || threads < 1 || threads > 4096)
        return refuse("--threads must be a whole number from 1 to 4096, got '" + value + "'");
      mmdit::set_num_threads(static_cast<int>(threads));
    } else if (name == "--only") {
      if (value != "elementwise" && value != "matmul" && value != "sampling" &&
          value != "attention")
        return refuse("unknown section '" + value + "'");
      only = value;
    } else {
      return refuse("unknown argument '" + arg + "'");
    }
  }
  std::printf("mmdit microbench: %d OpenMP threads, OpenBLAS %d threads, core %s\n",
              mmdit::num_threads(), openblas_get_num_threads(), openblas_get_corename());
  // Other processes on the cores make parallel regions wait for descheduled threads: say so.
  double load = 0;
  if (FILE* f = std::fopen("/proc/loadavg", "r")) {
    if (std::fscanf(f, "%lf", &load) != 1) load = 0;
    std::fclose(f);
  }
  const unsigned cores = std::thread::hardware_concurrency();
  if (load > 0.5 * cores)
    std::printf("warning: load average %.1f on %u cores; timings include waiting for the CPU\n",
                load, cores);
  const Clock::time_point t0 = Clock::now();
  mmdit::Rng rng(0);
  if (only.empty() || only == "elementwise") run_elementwise(rng);
  if (only.empty() || only == "matmul") run_matmul(rng);
  if (only.empty() || only == "sampling") run_sampling_products(rng);
  if (only.empty() || only == "attention") run_attention(rng);
  std::printf("\ntotal %.1f s\n", seconds_since(t0));
  return 0;
}
