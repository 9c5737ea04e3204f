#include "tensor/parallel.h"

#include <cblas.h>
#include <omp.h>

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
const bool single_level = [] {
  omp_set_max_active_levels(1);
  if (!openblas_shares_openmp()) openblas_set_num_threads(1);
  return true;
}();

}  // namespace

int num_threads() {
  return omp_get_max_threads();
}

void set_num_threads(int n) {
  if (n < 1) n = 1;
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
