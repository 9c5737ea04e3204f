// Views share storage with their base: only shape, strides and offset change.
#include <algorithm>
#include <optional>

#include "tensor/ops.h"

namespace mmdit::raw {
namespace {

// Strides that let `new_shape` view the same elements as (shape, strides) in row-major order,
// if any exist (the algorithm of PyTorch's computeStride).
std::optional<Shape> view_strides(const Shape& shape, const Shape& strides,
                                  const Shape& new_shape) {
  if (shape.empty() || shape_numel(shape) == 0) return contiguous_strides(new_shape);
  Shape new_strides(new_shape.size());
  int64_t view_d = static_cast<int64_t>(new_shape.size()) - 1;
  int64_t chunk_base_stride = strides.back();
  int64_t tensor_numel = 1, view_numel = 1;
  for (int64_t d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d) {
    tensor_numel *= shape[d];
    if (d == 0 || (shape[d - 1] != 1 && strides[d - 1] != tensor_numel * chunk_base_stride)) {
      while (view_d >= 0 && (view_numel < tensor_numel || new_shape[view_d] == 1)) {
        new_strides[view_d] = view_numel * chunk_base_stride;
        view_numel *= new_shape[view_d];
        --view_d;
      }
      if (view_numel != tensor_numel) return std::nullopt;
      if (d > 0) {
        chunk_base_stride = strides[d - 1];
        tensor_numel = view_numel = 1;
      }
    }
  }
  if (view_d != -1) return std::nullopt;
  return new_strides;
}

}  // namespace

Tensor reshape(const Tensor& t, Shape shape) {
  int64_t infer = -1, known = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      MMDIT_CHECK(infer < 0, "reshape: more than one -1 in ", shape_str(shape));
      infer = static_cast<int64_t>(i);
    } else {
      MMDIT_CHECK(shape[i] >= 0, "reshape: negative dimension in ", shape_str(shape));
      MMDIT_CHECK(!__builtin_mul_overflow(known, shape[i], &known), "reshape: ", shape_str(shape),
                  " has more elements than int64 can count");
    }
  }
  if (infer >= 0) {
    MMDIT_CHECK(known != 0 && t.numel() % known == 0, "reshape: cannot reshape ",
                shape_str(t.shape()), " to ", shape_str(shape));
    shape[infer] = t.numel() / known;
  }
  MMDIT_CHECK(shape_numel(shape) == t.numel(), "reshape: cannot reshape ", shape_str(t.shape()),
              " (", t.numel(), " elements) to ", shape_str(shape));
  if (auto strides = view_strides(t.shape(), t.strides(), shape))
    return make_view(t, shape, *strides, t.offset());
  Tensor c = contiguous(t);
  return make_view(c, shape, contiguous_strides(shape), c.offset());
}

Tensor permute(const Tensor& t, const std::vector<int64_t>& axes) {
  const int64_t n = t.dim();
  MMDIT_CHECK(static_cast<int64_t>(axes.size()) == n, "permute: ", axes.size(),
              " axes given for a tensor of shape ", shape_str(t.shape()));
  Shape shape(n), strides(n);
  std::vector<bool> seen(n, false);
  for (int64_t i = 0; i < n; ++i) {
    int64_t a = normalize_axis(axes[i], t.shape(), "permute");
    MMDIT_CHECK(!seen[a], "permute: axis ", a, " repeated");
    seen[a] = true;
    shape[i] = t.shape()[a];
    strides[i] = t.strides()[a];
  }
  return make_view(t, shape, strides, t.offset());
}

Tensor transpose(const Tensor& t, int64_t a, int64_t b) {
  std::vector<int64_t> axes(t.dim());
  for (int64_t i = 0; i < t.dim(); ++i) axes[i] = i;
  std::swap(axes[normalize_axis(a, t.shape(), "transpose")],
            axes[normalize_axis(b, t.shape(), "transpose")]);
  return permute(t, axes);
}

Tensor slice(const Tensor& t, int64_t axis, int64_t start, int64_t end, int64_t step) {
  axis = normalize_axis(axis, t.shape(), "slice");
  MMDIT_CHECK(step > 0, "slice: step must be positive, got ", step);
  const int64_t n = t.shape()[axis];
  auto clamp = [n](int64_t i) { return std::clamp(i < 0 ? i + n : i, int64_t{0}, n); };
  start = clamp(start);
  end = std::max(clamp(end), start);
  Shape shape = t.shape(), strides = t.strides();
  shape[axis] = end == start ? 0 : (end - start - 1) / step + 1;  // end - start + step may overflow
  // A step past the end takes one element, whose stride is never used (and step * stride may
  // not fit); otherwise step < n and the product stays within the storage.
  if (shape[axis] > 1) strides[axis] *= step;
  return make_view(t, shape, strides, t.offset() + start * t.strides()[axis]);
}

Tensor narrow(const Tensor& t, int64_t axis, int64_t start, int64_t length) {
  axis = normalize_axis(axis, t.shape(), "narrow");
  int64_t end = 0;
  MMDIT_CHECK(!__builtin_add_overflow(start, length, &end), "narrow: start ", start, " + length ",
              length, " overflows int64 (axis ", axis, " of shape ", shape_str(t.shape()), ")");
  MMDIT_CHECK(start >= 0 && length >= 0 && end <= t.shape()[axis], "narrow: [", start, ", ", end,
              ") is outside axis ", axis, " of shape ", shape_str(t.shape()));
  return slice(t, axis, start, start + length);
}

Tensor squeeze(const Tensor& t, int64_t axis) {
  axis = normalize_axis(axis, t.shape(), "squeeze");
  MMDIT_CHECK(t.shape()[axis] == 1, "squeeze: axis ", axis, " of shape ", shape_str(t.shape()),
              " has size ", t.shape()[axis], ", not 1");
  Shape shape = t.shape(), strides = t.strides();
  shape.erase(shape.begin() + axis);
  strides.erase(strides.begin() + axis);
  return make_view(t, shape, strides, t.offset());
}

Tensor unsqueeze(const Tensor& t, int64_t axis) {
  // The new axis may go anywhere in the result's dim() + 1 positions.
  MMDIT_CHECK(axis >= -(t.dim() + 1) && axis <= t.dim(), "unsqueeze: axis ", axis,
              " is out of range [", -(t.dim() + 1), ", ", t.dim(), "] for unsqueeze of shape ",
              shape_str(t.shape()));
  axis = normalize_axis(axis, t.dim() + 1, "unsqueeze");
  Shape shape = t.shape(), strides = t.strides();
  int64_t stride = axis < t.dim() ? t.strides()[axis] * t.shape()[axis] : 1;
  shape.insert(shape.begin() + axis, 1);
  strides.insert(strides.begin() + axis, stride);
  return make_view(t, shape, strides, t.offset());
}

Shape broadcast_shapes(const Shape& a, const Shape& b, const char* op) {
  const size_t n = std::max(a.size(), b.size());
  Shape out(n);
  for (size_t i = 0; i < n; ++i) {
    int64_t da = i < n - a.size() ? 1 : a[i - (n - a.size())];
    int64_t db = i < n - b.size() ? 1 : b[i - (n - b.size())];
    MMDIT_CHECK(da == db || da == 1 || db == 1, op, ": shapes ", shape_str(a), " and ",
                shape_str(b), " cannot be broadcast together");
    out[i] = da == 1 ? db : da;
  }
  return out;
}

bool broadcasts_to(const Shape& from, const Shape& to) {
  if (from.size() > to.size()) return false;
  for (int64_t d : to)
    if (d < 0) return false;  // a 1 would broadcast to it, making a view of negative size
  const size_t lead = to.size() - from.size();
  for (size_t i = 0; i < from.size(); ++i)
    if (from[i] != to[lead + i] && from[i] != 1) return false;
  return true;
}

Tensor broadcast_to(const Tensor& t, const Shape& shape) {
  MMDIT_CHECK(broadcasts_to(t.shape(), shape), "broadcast_to: cannot broadcast ",
              shape_str(t.shape()), " to ", shape_str(shape));
  if (t.shape() == shape) return t;  // every elementwise op asks this of its same-shape operands
  shape_numel(shape);                // throws if the view's elements cannot be counted
  const size_t lead = shape.size() - t.shape().size();
  Shape strides(shape.size(), 0);
  for (size_t i = 0; i < t.shape().size(); ++i)
    strides[lead + i] = t.shape()[i] == 1 && shape[lead + i] != 1 ? 0 : t.strides()[i];
  return make_view(t, shape, strides, t.offset());
}

Tensor concat(const std::vector<Tensor>& parts, int64_t axis) {
  MMDIT_CHECK(!parts.empty(), "concat: no tensors given");
  const Tensor& first = parts[0];
  axis = normalize_axis(axis, first.shape(), "concat");
  Shape shape = first.shape();
  int64_t total = 0;
  for (const Tensor& p : parts) {
    MMDIT_CHECK(p.dtype() == first.dtype(), "concat: dtypes ", dtype_name(first.dtype()), " and ",
                dtype_name(p.dtype()), " differ");
    bool ok = p.dim() == first.dim();
    for (int64_t i = 0; ok && i < p.dim(); ++i) ok = i == axis || p.shape()[i] == shape[i];
    MMDIT_CHECK(ok, "concat: shapes ", shape_str(first.shape()), " and ", shape_str(p.shape()),
                " differ outside axis ", axis);
    MMDIT_CHECK(!__builtin_add_overflow(total, p.shape()[axis], &total), "concat: the parts' ",
                "sizes along axis ", axis, " add up to more than int64 can count");
  }
  shape[axis] = total;
  Tensor out = empty(shape, first.dtype());
  int64_t at = 0;
  for (const Tensor& p : parts) {
    copy_into(narrow(out, axis, at, p.shape()[axis]), p);
    at += p.shape()[axis];
  }
  return out;
}

int64_t split_axis(const Shape& shape, const std::vector<int64_t>& sizes, int64_t axis) {
  axis = normalize_axis(axis, shape, "split");
  int64_t total = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    MMDIT_CHECK(sizes[i] >= 0, "split: size ", sizes[i], " (part ", i, ") is negative");
    MMDIT_CHECK(!__builtin_add_overflow(total, sizes[i], &total), "split: sizes add up to more ",
                "than int64 can count, but axis ", axis, " of shape ", shape_str(shape), " has ",
                shape[axis]);
  }
  MMDIT_CHECK(total == shape[axis], "split: sizes add up to ", total, " but axis ", axis,
              " of shape ", shape_str(shape), " has ", shape[axis]);
  return axis;
}

std::vector<Tensor> split(const Tensor& t, const std::vector<int64_t>& sizes, int64_t axis) {
  axis = split_axis(t.shape(), sizes, axis);
  std::vector<Tensor> out;
  int64_t at = 0;
  for (int64_t s : sizes) {
    out.push_back(narrow(t, axis, at, s));
    at += s;
  }
  return out;
}

int64_t stack_axis(const std::vector<Tensor>& parts, int64_t axis) {
  MMDIT_CHECK(!parts.empty(), "stack: no tensors given");
  const int64_t dim = parts[0].dim();
  MMDIT_CHECK(axis >= -(dim + 1) && axis <= dim, "stack: axis ", axis, " is out of range [",
              -(dim + 1), ", ", dim, "] for stacking tensors of shape ",
              shape_str(parts[0].shape()));
  for (const Tensor& p : parts)
    MMDIT_CHECK(p.shape() == parts[0].shape(), "stack: shapes ", shape_str(parts[0].shape()),
                " and ", shape_str(p.shape()), " differ");
  return normalize_axis(axis, dim + 1, "stack");
}

Tensor stack(const std::vector<Tensor>& parts, int64_t axis) {
  axis = stack_axis(parts, axis);
  std::vector<Tensor> expanded;
  for (const Tensor& p : parts) expanded.push_back(unsqueeze(p, axis));
  return concat(expanded, axis);
}

}  // namespace mmdit::raw
