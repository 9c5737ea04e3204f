// OpenBLAS picks its kernels once, when the library is loaded, from the CPU's family and model.
// A release that predates the CPU falls back to a generic core: Debian 12's OpenBLAS 0.3.21 runs
// the SSE3 "Prescott" kernels on Intel's family 6 model 207 (AVX-512 with BF16), a fifth of what
// its AVX-512 kernels do there (64 vs 305 GFLOP/s for sgemm on 2 threads). The cure is the
// OPENBLAS_CORETYPE variable, which only takes effect in a process that starts with it set.
#pragma once

#include <string>

namespace mmdit {

struct CpuFeatures {
  bool avx2_fma = false;
  bool avx512 = false;  // F, CD, BW, DQ and VL: what OpenBLAS's SkylakeX kernels use
  bool avx512_bf16 = false;
};

CpuFeatures cpu_features();

// The core OpenBLAS chose in this process, e.g. "Cooperlake".
std::string openblas_core();

// The OPENBLAS_CORETYPE to start a process with when OpenBLAS chose a core that leaves out
// vector instructions this CPU has; empty when its choice is already the best it can make.
std::string better_openblas_core(const std::string& chosen, const CpuFeatures& cpu);

// Call first thing in main(): when OPENBLAS_CORETYPE is unset and better_openblas_core() names
// a core, says so on stderr and starts the program again (same argv) with that core, recording
// OpenBLAS's own choice in kDetectedCoreVariable. Returns when there is nothing to do, or when
// the program could not be started again (it then runs on as it is).
void use_the_best_openblas_core(char** argv);
inline constexpr const char* kDetectedCoreVariable = "MMDIT_OPENBLAS_DETECTED_CORE";

// Replaces this process with the same program run with argv (null-terminated) and the
// environment as it is now, so that OpenBLAS is loaded afresh. Returns only if that failed.
void restart_program(char** argv);

}  // namespace mmdit
