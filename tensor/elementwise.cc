// Elementwise ops with NumPy broadcasting: shapes and strides are resolved here, the arithmetic
// happens row by row in simd.cc.
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "tensor/ops.h"
#include "tensor/simd.h"
#include "tensor/strided.h"

namespace mmdit::raw {
namespace {

using detail::for_each_row;
using detail::plan_rows;

const char* binary_name(BinaryOp op) {
  switch (op) {
    case BinaryOp::add:
      return "add";
    case BinaryOp::sub:
      return "sub";
    case BinaryOp::mul:
      return "mul";
    case BinaryOp::div:
      return "div";
    case BinaryOp::maximum:
      return "maximum";
    case BinaryOp::minimum:
      return "minimum";
  }
  return "?";
}

const char* unary_name(UnaryOp op) {
  switch (op) {
    case UnaryOp::neg:
      return "neg";
    case UnaryOp::exp:
      return "exp";
    case UnaryOp::log:
      return "log";
    case UnaryOp::sqrt:
      return "sqrt";
    case UnaryOp::rsqrt:
      return "rsqrt";
    case UnaryOp::square:
      return "square";
    case UnaryOp::abs:
      return "abs";
    case UnaryOp::tanh:
      return "tanh";
    case UnaryOp::sigmoid:
      return "sigmoid";
    case UnaryOp::silu:
      return "silu";
    case UnaryOp::sin:
      return "sin";
    case UnaryOp::cos:
      return "cos";
  }
  return "?";
}

// A destination written in place must not be a broadcast view: its rows would race on the same
// memory and the result would depend on the order.
void check_distinct_elements(const Tensor& dst, const char* op) {
  // No elements, none shared; and a fresh empty tensor has zero strides too: those of (3, 0)
  // are (0, 1).
  if (dst.numel() == 0) return;
  for (int64_t d = 0; d < dst.dim(); ++d)
    MMDIT_CHECK(dst.shape()[d] == 1 || dst.strides()[d] != 0, op, ": the destination ",
                shape_str(dst.shape()), " is a broadcast view (axis ", d,
                " has stride 0), so its elements are not distinct");
}

void check_same_dtype(const Tensor& a, const Tensor& b, const char* op) {
  MMDIT_CHECK(a.dtype() == b.dtype(), op, ": dtypes ", dtype_name(a.dtype()), " and ",
              dtype_name(b.dtype()), " differ (shapes ", shape_str(a.shape()), " and ",
              shape_str(b.shape()), ")");
}

char* base_ptr(const Tensor& t) {
  return static_cast<char*>(t.raw_data());
}

// A contiguous copy of a strided row, so the SIMD kernels only ever see steps of 0 or 1.
template <class T>
const T* gathered(const T* p, int64_t stride, int64_t n, std::vector<T>& buf) {
  if (stride == 0 || stride == 1) return p;
  buf.resize(n);
  for (int64_t i = 0; i < n; ++i) buf[i] = p[i * stride];
  return buf.data();
}

template <class T>
void binary_typed(BinaryOp op, const Tensor& a, const Tensor& b, const Tensor& out) {
  const Tensor ab = broadcast_to(a, out.shape()), bb = broadcast_to(b, out.shape());
  auto plan = plan_rows<3>(out.shape(), {&out.strides(), &ab.strides(), &bb.strides()});
  for_each_row<3>(plan, {base_ptr(out), base_ptr(ab), base_ptr(bb)},
                  {sizeof(T), sizeof(T), sizeof(T)}, [op](auto p, auto s, int64_t n) {
                    std::vector<T> ta, tb;
                    const T* pa = gathered(reinterpret_cast<const T*>(p[1]), s[1], n, ta);
                    const T* pb = gathered(reinterpret_cast<const T*>(p[2]), s[2], n, tb);
                    simd::binary(op, pa, s[1] == 0 ? 0 : 1, pb, s[2] == 0 ? 0 : 1,
                                 reinterpret_cast<T*>(p[0]), n);
                  });
}

template <class T>
void unary_typed(UnaryOp op, const Tensor& x, const Tensor& out) {
  auto plan = plan_rows<2>(out.shape(), {&out.strides(), &x.strides()});
  for_each_row<2>(
      plan, {base_ptr(out), base_ptr(x)}, {sizeof(T), sizeof(T)}, [op](auto p, auto s, int64_t n) {
        std::vector<T> tmp;
        const T* px = reinterpret_cast<const T*>(p[1]);
        if (s[1] == 0) {  // a broadcast row: compute once, then replicate
          simd::unary(op, px, reinterpret_cast<T*>(p[0]), 1);
          std::fill_n(reinterpret_cast<T*>(p[0]) + 1, n - 1, *reinterpret_cast<T*>(p[0]));
          return;
        }
        simd::unary(op, gathered(px, s[1], n, tmp), reinterpret_cast<T*>(p[0]), n);
      });
}

template <class Dst, class Src>
void copy_rows(const Tensor& dst, const Tensor& src) {
  auto plan = plan_rows<2>(dst.shape(), {&dst.strides(), &src.strides()});
  for_each_row<2>(plan, {base_ptr(dst), base_ptr(src)}, {sizeof(Dst), sizeof(Src)},
                  [](auto p, auto s, int64_t n) {
                    Dst* d = reinterpret_cast<Dst*>(p[0]);
                    const Src* x = reinterpret_cast<const Src*>(p[1]);
                    if constexpr (std::is_same_v<Dst, Src>) {
                      if (s[0] == 1 && s[1] == 1) {
                        std::memcpy(d, x, n * sizeof(Dst));
                        return;
                      }
                    }
                    for (int64_t i = 0; i < n; ++i) d[i * s[0]] = static_cast<Dst>(x[i * s[1]]);
                  });
}

// out[i] = fn(a[i], b[i], ...) for the mask-like ops (compare, where, logical); these are cheap
// and rare, so a plain strided loop is enough.
template <class Out, class... Ins, class Fn>
Tensor map_scalar(const char* op, DType out_dtype, Fn fn,
                  const std::conditional_t<true, Tensor, Ins>&... ins) {
  Shape shape;
  ((shape = broadcast_shapes(shape, ins.shape(), op)), ...);
  Tensor out = empty(shape, out_dtype);
  constexpr int N = 1 + sizeof...(Ins);
  std::array<Tensor, sizeof...(Ins)> views{broadcast_to(ins, shape)...};
  std::array<const Shape*, N> strides{&out.strides()};
  std::array<char*, N> base{base_ptr(out)};
  std::array<size_t, N> elem{sizeof(Out), sizeof(Ins)...};
  for (size_t k = 0; k < views.size(); ++k) {
    strides[k + 1] = &views[k].strides();
    base[k + 1] = base_ptr(views[k]);
  }
  auto plan = plan_rows<N>(shape, strides);
  for_each_row<N>(plan, base, elem, [&](auto p, auto s, int64_t n) {
    [&]<size_t... K>(std::index_sequence<K...>) {
      for (int64_t i = 0; i < n; ++i)
        reinterpret_cast<Out*>(p[0])[i * s[0]] =
            fn(reinterpret_cast<const Ins*>(p[K + 1])[i * s[K + 1]]...);
    }
    (std::index_sequence_for<Ins...>{});
  });
  return out;
}

}  // namespace

Tensor binary(BinaryOp op, const Tensor& a, const Tensor& b) {
  const char* name = binary_name(op);
  check_float(a, name);
  check_float(b, name);
  check_same_dtype(a, b, name);
  Tensor out = empty(broadcast_shapes(a.shape(), b.shape(), name), a.dtype());
  if (a.dtype() == DType::f32)
    binary_typed<float>(op, a, b, out);
  else
    binary_typed<double>(op, a, b, out);
  return out;
}

void add_into(const Tensor& dst, const Tensor& x) {
  check_float(dst, "add_into");
  check_same_dtype(dst, x, "add_into");
  check_distinct_elements(dst, "add_into");
  MMDIT_CHECK(broadcasts_to(x.shape(), dst.shape()), "add_into: cannot add ", shape_str(x.shape()),
              " into ", shape_str(dst.shape()));
  dst.mark_changed();
  // binary_typed writes rows of contiguous elements; a strided view takes the copying way.
  if (!dst.is_contiguous()) return copy_into(dst, binary(BinaryOp::add, dst, x));
  // Each output element is read and written at the same position: dst may be the first operand,
  // and x may be dst itself. Any other x over dst's memory (a shifted view, a row broadcast over
  // dst) would be read where it was already written: it is copied first, as NumPy buffers.
  const bool same_elements =
      x.offset() == dst.offset() && x.shape() == dst.shape() && x.strides() == dst.strides();
  const Tensor src = x.shares_storage_with(dst) && !same_elements ? clone(x) : x;
  if (dst.dtype() == DType::f32)
    binary_typed<float>(BinaryOp::add, dst, src, dst);
  else
    binary_typed<double>(BinaryOp::add, dst, src, dst);
}

Tensor unary(UnaryOp op, const Tensor& x) {
  check_float(x, unary_name(op));
  Tensor out = empty(x.shape(), x.dtype());
  if (x.dtype() == DType::f32)
    unary_typed<float>(op, x, out);
  else
    unary_typed<double>(op, x, out);
  return out;
}

Tensor add_scalar(const Tensor& x, double s) {
  return add(x, scalar(s, x.dtype()));
}
Tensor mul_scalar(const Tensor& x, double s) {
  return mul(x, scalar(s, x.dtype()));
}

Tensor pow_scalar(const Tensor& x, double p) {
  check_float(x, "pow");
  // x * x is exactly std::pow(x, 2), signed zeros and infinities included. sqrt and 1 / sqrt are
  // not std::pow(x, +-0.5): they give -0 and -inf at x = -0, and NaN at x = -inf.
  if (p == 2) return unary(UnaryOp::square, x);
  Tensor c = contiguous(x);
  Tensor out = empty(x.shape(), x.dtype());
  visit_dtype(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, bool>) {
      const T* in = c.data<T>();
      T* o = out.data<T>();
      parallel_for(out.numel(), 20, [&](int64_t i) { o[i] = std::pow(in[i], static_cast<T>(p)); });
    }
  });
  return out;
}

Tensor compare(CompareOp op, const Tensor& a, const Tensor& b) {
  check_same_dtype(a, b, "compare");
  Tensor out;
  visit_dtype(a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    out = map_scalar<bool, T, T>(
        "compare", DType::boolean,
        [op](T x, T y) {
          switch (op) {
            case CompareOp::eq:
              return x == y;
            case CompareOp::ne:
              return x != y;
            case CompareOp::lt:
              return x < y;
            case CompareOp::le:
              return x <= y;
            case CompareOp::gt:
              return x > y;
            case CompareOp::ge:
              return x >= y;
          }
          return false;
        },
        a, b);
  });
  return out;
}

Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b) {
  MMDIT_CHECK(cond.dtype() == DType::boolean, "where: condition must be bool, got ",
              dtype_name(cond.dtype()));
  check_same_dtype(a, b, "where");
  broadcast_shapes(broadcast_shapes(cond.shape(), a.shape(), "where"), b.shape(), "where");
  Tensor out;
  visit_dtype(a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    out = map_scalar<T, bool, T, T>(
        "where", a.dtype(), [](bool c, T x, T y) { return c ? x : y; }, cond, a, b);
  });
  return out;
}

Tensor logical_not(const Tensor& x) {
  MMDIT_CHECK(x.dtype() == DType::boolean, "logical_not: expected bool, got ",
              dtype_name(x.dtype()));
  return map_scalar<bool, bool>(
      "logical_not", DType::boolean, [](bool v) { return !v; }, x);
}

Tensor logical_and(const Tensor& a, const Tensor& b) {
  MMDIT_CHECK(a.dtype() == DType::boolean && b.dtype() == DType::boolean,
              "logical_and: expected bool tensors, got ", dtype_name(a.dtype()), " and ",
              dtype_name(b.dtype()));
  return map_scalar<bool, bool, bool>(
      "logical_and", DType::boolean, [](bool x, bool y) { return x && y; }, a, b);
}

void copy_into(const Tensor& dst, const Tensor& src) {
  check_distinct_elements(dst, "copy_into");
  // Checked here, or broadcast_to below would name itself, which the caller never called.
  MMDIT_CHECK(broadcasts_to(src.shape(), dst.shape()), "copy_into: cannot copy ",
              shape_str(src.shape()), " into ", shape_str(dst.shape()));
  // Overlapping rows would be read after they are written (and memcpy'd onto themselves).
  const Tensor s = broadcast_to(src.shares_storage_with(dst) ? clone(src) : src, dst.shape());
  dst.mark_changed();
  visit_dtype(dst.dtype(), [&](auto dtag) {
    visit_dtype(s.dtype(), [&](auto stag) { copy_rows<decltype(dtag), decltype(stag)>(dst, s); });
  });
}

void fill(const Tensor& dst, double value) {
  visit_dtype(dst.dtype(), [&](auto tag) {
    using T = decltype(tag);
    Tensor v = empty({}, dst.dtype());
    *v.data<T>() = static_cast<T>(value);
    copy_into(dst, v);
  });
}

Tensor contiguous(const Tensor& t) {
  if (t.is_contiguous()) return t;
  return clone(t);
}

Tensor clone(const Tensor& t) {
  Tensor out = empty(t.shape(), t.dtype());
  copy_into(out, t);
  return out;
}

Tensor to_dtype(const Tensor& t, DType dtype) {
  if (t.dtype() == dtype) return t;
  Tensor out = empty(t.shape(), dtype);
  copy_into(out, t);
  return out;
}

}  // namespace mmdit::raw
