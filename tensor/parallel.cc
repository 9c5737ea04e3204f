#include "tensor/parallel.h"

#include <cblas.h>
#include <omp.h>

namespace mmdit {
namespace {

// Nested parallel regions (a multi-threaded gemm inside one of our loops) would create and
// destroy threads on each call and oversubscribe the cores; one level of parallelism it is.
const bool single_level = [] {
  omp_set_max_active_levels(1);
  return true;
}();

}  // namespace

int num_threads() {
  return omp_get_max_threads();
}

void set_num_threads(int n) {
  if (n < 1) n = 1;
  omp_set_num_threads(n);
  openblas_set_num_threads(n);
}

}  // namespace mmdit
