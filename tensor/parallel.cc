#include "tensor/parallel.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

namespace mmdit {
namespace {

bool openblas_shares_openmp() {
  return openblas_get_parallel() == 2;
}

// Nested parallel regions (a multi-threaded gemm inside one of our loops) would create and
// destroy threads on each call and oversubscribe the cores; one level of parallelism it is.
// OpenBLAS's pthreads build (Debian's preferred alternative when both builds are installed, which
// a program linked outside our build tree may load) keeps a pool of its own, one thread per core
// by default, that would run beside ours: it stays on one thread.
// A larger OMP_NUM_THREADS is lowered here, before any region starts.
const bool single_level = [] {
  omp_set_max_active_levels(1);
  if (!openblas_shares_openmp()) openblas_set_num_threads(1);
  if (omp_get_max_threads() > max_threads()) omp_set_num_threads(max_threads());
  return true;
}();

// Every region we open names this count. OpenMP's own (omp_set_num_threads) belongs to the thread
// that set it, and every other thread starts from OMP_NUM_THREADS, however large. Made on first
// use, so that a static initializer elsewhere that asks for it finds it made.
std::atomic<int>& process_threads() {
  static std::atomic<int> count{std::clamp(omp_get_max_threads(), 1, max_threads())};
  return count;
}

}  // namespace

int max_threads() {
  static const int limit = [] {
    const char* config = openblas_get_config();
    const char* field = config ? std::strstr(config, "MAX_THREADS=") : nullptr;
    const int built = field ? std::atoi(field + std::strlen("MAX_THREADS=")) : 0;
    return built > 0 ? built : 64;
  }();
  return limit;
}

std::atomic<int64_t>& detail::thread_matmul_flops() {
  thread_local std::atomic<int64_t> flops{0};
  return flops;
}

int num_threads() {
  return process_threads().load(std::memory_order_relaxed);
}

void set_num_threads(int n) {
  n = std::clamp(n, 1, max_threads());
  process_threads().store(n, std::memory_order_relaxed);
  // This thread's OpenMP setting too; other threads' follow in raw::gemm (tensor/matmul.cc).
  omp_set_num_threads(n);
  openblas_set_num_threads(openblas_shares_openmp() ? n : 1);
}

const char* openblas_threading() {
  switch (openblas_get_parallel()) {
    case 0:
      return "sequential";
    case 1:
      return "pthreads";
    default:
      return "OpenMP";
  }
}

}  // namespace mmdit
