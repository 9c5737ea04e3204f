// What the fused ops of fused.cc and fused_attention.cc share: the checks every one makes first,
// and the in-order sum of per-block partial results.
#pragma once

#include <initializer_list>

#include "tensor/tensor.h"

namespace mmdit::detail {

// Every input a float tensor, all of one dtype.
inline void check_floats(const char* op, std::initializer_list<Tensor> ts) {
  const DType dtype = ts.begin()->dtype();
  for (const Tensor& t : ts)
    MMDIT_CHECK(is_floating(t.dtype()) && t.dtype() == dtype, op, ": inputs must share one float ",
                "dtype, got ", dtype_name(dtype), " and ", dtype_name(t.dtype()));
}

// out[j] = the sum over blocks b < blocks of partial[b * size + j], in block order and in double:
// partial results of parallel work summed so that any number of threads gives the same bits.
template <class P, class T>
void sum_in_order(const P* partial, int64_t blocks, int64_t size, T* out) {
  for (int64_t j = 0; j < size; ++j) {
    double sum = 0;
    for (int64_t b = 0; b < blocks; ++b) sum += partial[b * size + j];
    out[j] = static_cast<T>(sum);
  }
}

}  // namespace mmdit::detail
