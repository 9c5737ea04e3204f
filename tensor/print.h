#pragma once

#include <ostream>
#include <string>

#include "tensor/tensor.h"

namespace mmdit {

// NumPy-like text: values with nested brackets (elided past 1000 elements), then dtype and shape.
std::string to_string(const Tensor& t);
// The same with every value (Elision::none), for output that must hold the whole tensor.
enum class Elision { above_1000, none };
std::string to_string(const Tensor& t, Elision elision);
std::ostream& operator<<(std::ostream& os, const Tensor& t);

}  // namespace mmdit
