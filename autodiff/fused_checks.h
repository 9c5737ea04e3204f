// What the fused ops of fused.cc and fused_attention.cc share: the checks every one makes first,
// and the in-order sum of per-block partial results.
#pragma once

#include <initializer_list>
#include <string_view>

#include "tensor/tensor.h"

namespace mmdit::detail {

struct NamedInput {
  std::string_view name;  // as the op's signature names it
  const Tensor& tensor;
};

// Every input a float tensor, all of one dtype; an error names the input that is not a float,
// or the two inputs that differ.
inline void check_floats(const char* op, std::initializer_list<NamedInput> inputs) {
  for (const NamedInput& in : inputs) {
    MMDIT_CHECK(in.tensor.defined(), op, ": ", in.name, " is an undefined tensor");
    MMDIT_CHECK(is_floating(in.tensor.dtype()), op, ": ", in.name, " is ",
                dtype_name(in.tensor.dtype()), " ", shape_str(in.tensor.shape()),
                "; expected float32 or float64");
  }
  const NamedInput& first = *inputs.begin();
  const DType dtype = first.tensor.dtype();
  for (const NamedInput& in : inputs)
    MMDIT_CHECK(in.tensor.dtype() == dtype, op, ": inputs must share one float dtype, got ",
                dtype_name(dtype), " (", first.name, ") and ", dtype_name(in.tensor.dtype()), " (",
                in.name, ")");
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
