#include "tensor/blas_core.h"

#include <cblas.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <string_view>

#include "tensor/parallel.h"

namespace mmdit {

CpuFeatures cpu_features() {
  __builtin_cpu_init();
  CpuFeatures f;
  f.avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  f.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vl");
  f.avx512_bf16 = f.avx512 && __builtin_cpu_supports("avx512bf16");
  return f;
}

std::string openblas_core() {
  return openblas_get_corename();
}

namespace {

// OpenBLAS's x86-64 cores grouped by the widest vectors their sgemm kernels use.
constexpr std::array<std::string_view, 3> kAvx512Cores = {"Cooperlake", "SkylakeX",
                                                          "SapphireRapids"};
constexpr std::array<std::string_view, 3> kAvx2Cores = {"Haswell", "Zen", "Zen4"};

bool one_of(const auto& names, const std::string& name) {
  return std::any_of(names.begin(), names.end(), [&](std::string_view n) { return n == name; });
}

}  // namespace

std::string better_openblas_core(const std::string& chosen, const CpuFeatures& cpu) {
  if (one_of(kAvx512Cores, chosen)) return "";
  if (cpu.avx512) return cpu.avx512_bf16 ? "Cooperlake" : "SkylakeX";
  if (one_of(kAvx2Cores, chosen)) return "";
  if (cpu.avx2_fma) return "Haswell";
  return "";
}

void restart_program(char** argv) {
  std::fflush(nullptr);
  start_program_unbound([&] { execv("/proc/self/exe", argv); });
}

void use_the_best_openblas_core(char** argv) {
  if (std::getenv("OPENBLAS_CORETYPE")) return;  // the user's choice
  const std::string detected = openblas_core();
  const std::string better = better_openblas_core(detected, cpu_features());
  if (better.empty() || argv == nullptr || argv[0] == nullptr) return;
  std::fprintf(stderr,
               "%s: this OpenBLAS does not know the CPU and chose its %s kernels; running with "
               "OPENBLAS_CORETYPE=%s (set OPENBLAS_CORETYPE to choose another)\n",
               argv[0], detected.c_str(), better.c_str());
  setenv("OPENBLAS_CORETYPE", better.c_str(), 1);
  setenv(kDetectedCoreVariable, detected.c_str(), 1);
  restart_program(argv);
  std::fprintf(stderr, "%s: could not start again; keeping the %s kernels\n", argv[0],
               detected.c_str());
  unsetenv("OPENBLAS_CORETYPE");
  unsetenv(kDetectedCoreVariable);
}

}  // namespace mmdit
