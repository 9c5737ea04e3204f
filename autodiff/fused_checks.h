// What the fused ops of fused.cc and fused_attention.cc share: the checks every one makes first,
// and the row kernels of QK-RMSNorm with the rotary embedding, which joint attention applies to
// each head's rows inside its own op.
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

// One q or k row of d values: y = rope(x * inv * gamma) with inv = 1 / sqrt(mean(x^2) + eps) and
// the position's cos, sin rows; returns inv.
template <class T>
T qk_norm_rope_row(const T* x, const T* gamma, const T* cos, const T* sin, T* y, int64_t d,
                   double eps);
// Its backward: dx from dy, the row x and its inv; dgamma += the row's gamma gradient. dz is
// scratch of d values.
template <class T>
void qk_norm_rope_row_backward(const T* dy, const T* x, T inv, const T* gamma, const T* cos,
                               const T* sin, T* dz, T* dgamma, T* dx, int64_t d);

}  // namespace mmdit::detail
