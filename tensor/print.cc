#include "tensor/print.h"

#include <cmath>
#include <cstdio>
#include <sstream>

#include "tensor/ops.h"

namespace mmdit {
namespace {

constexpr int64_t kElideAbove = 1000;  // elements; NumPy's threshold
constexpr int64_t kEdgeItems = 3;

struct Formatter {
  bool scientific = false;
  int width = 0;
  bool boolean = false;

  std::string format(double v) const {
    if (boolean) return v != 0 ? "True" : "False";
    char buf[64];
    std::snprintf(buf, sizeof buf, scientific ? "%.4e" : "%.4f", v);
    return buf;
  }
};

void print_rec(std::ostringstream& os, const std::vector<double>& values, const Shape& shape,
               size_t axis, int64_t offset, const Formatter& f, bool elide, int indent) {
  const int64_t n = shape[axis];
  int64_t inner = 1;
  for (size_t i = axis + 1; i < shape.size(); ++i) inner *= shape[i];
  os << "[";
  for (int64_t i = 0; i < n; ++i) {
    if (elide && n > 2 * kEdgeItems && i == kEdgeItems) {
      os << (axis + 1 == shape.size() ? "..., " : "...,\n" + std::string(indent + axis + 1, ' '));
      i = n - kEdgeItems;
    }
    if (axis + 1 == shape.size()) {
      std::string s = f.format(values[offset + i]);
      os << std::string(std::max<int>(0, f.width - static_cast<int>(s.size())), ' ') << s;
    } else {
      print_rec(os, values, shape, axis + 1, offset + i * inner, f, elide, indent);
    }
    if (i + 1 < n) {
      if (axis + 1 == shape.size())
        os << ", ";
      else
        os << "," << std::string(shape.size() - axis - 1, '\n')
           << std::string(indent + axis + 1, ' ');
    }
  }
  os << "]";
}

}  // namespace

std::string to_string(const Tensor& t) {
  return to_string(t, Elision::above_1000);
}

std::string to_string(const Tensor& t, Elision elision) {
  if (!t.defined()) return "tensor(undefined)";
  const std::vector<double> values = t.to_vector<double>();
  Formatter f;
  f.boolean = t.dtype() == DType::boolean;
  double max_abs = 0, min_abs = INFINITY;
  for (double v : values) {
    if (!std::isfinite(v)) continue;
    max_abs = std::max(max_abs, std::abs(v));
    if (v != 0) min_abs = std::min(min_abs, std::abs(v));
  }
  f.scientific = !f.boolean && (max_abs >= 1e5 || (min_abs < 1e-4 && min_abs != INFINITY));
  for (double v : values) f.width = std::max<int>(f.width, static_cast<int>(f.format(v).size()));
  std::ostringstream os;
  os << "tensor(";
  if (t.dim() == 0)
    os << f.format(values[0]);
  else
    print_rec(os, values, t.shape(), 0, 0, f,
              elision == Elision::above_1000 && t.numel() > kElideAbove, 7);
  os << ", dtype=" << dtype_name(t.dtype()) << ", shape=" << shape_str(t.shape()) << ")";
  return os.str();
}

std::ostream& operator<<(std::ostream& os, const Tensor& t) {
  return os << to_string(t);
}

}  // namespace mmdit
