// What every fused op checks first (fused.cc, fused_attention.cc).
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

}  // namespace mmdit::detail
