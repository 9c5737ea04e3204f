// Each op: the forward (a raw kernel), then record() with the backward right below it.
// Backward functions use raw ops only: gradients are not themselves recorded.
#include "autodiff/ops.h"

#include <algorithm>

namespace mmdit {
namespace {

using raw::BinaryOp;
using raw::UnaryOp;

Tensor scaled(const Tensor& x, double s) {
  return raw::mul_scalar(x, s);
}

// The keepdims shape of a reduction of `shape` over `axes` (empty = all).
Shape keepdims_shape(const Shape& shape, std::vector<int64_t> axes, const char* op) {
  const int64_t n = static_cast<int64_t>(shape.size());
  if (axes.empty())
    for (int64_t i = 0; i < n; ++i) axes.push_back(i);
  Shape out = shape;
  for (int64_t a : axes) out[normalize_axis(a, shape, op)] = 1;
  return out;
}

// Broadcasts a reduction's gradient back over the reduced axes.
Tensor expand_reduced(const Tensor& g, const Shape& kept, const Shape& shape) {
  return raw::broadcast_to(raw::reshape(g, kept), shape);
}

}  // namespace

// ---- binary ----
Tensor add(const Tensor& a, const Tensor& b) {
  return record("add", raw::add(a, b), {a, b}, {}, [](Backward& ctx) {
    ctx.input(0, [&] { return ctx.grad; });
    ctx.input(1, [&] { return ctx.grad; });
  });
}

Tensor sub(const Tensor& a, const Tensor& b) {
  return record("sub", raw::sub(a, b), {a, b}, {}, [](Backward& ctx) {
    ctx.input(0, [&] { return ctx.grad; });
    ctx.input(1, [&] { return raw::unary(UnaryOp::neg, ctx.grad); });
  });
}

Tensor mul(const Tensor& a, const Tensor& b) {
  return record("mul", raw::mul(a, b), {a, b}, {a, b}, [](Backward& ctx) {
    const Tensor &a = ctx.saved[0], &b = ctx.saved[1];
    ctx.input(0, [&] { return raw::mul(ctx.grad, b); });
    ctx.input(1, [&] { return raw::mul(ctx.grad, a); });
  });
}

Tensor div(const Tensor& a, const Tensor& b) {
  Tensor out = raw::div(a, b);
  return record("div", out, {a, b}, {b, out}, [](Backward& ctx) {
    const Tensor &b = ctx.saved[0], &out = ctx.saved[1];
    ctx.input(0, [&] { return raw::div(ctx.grad, b); });
    ctx.input(1, [&] { return raw::unary(UnaryOp::neg, raw::div(raw::mul(ctx.grad, out), b)); });
  });
}

// Ties send the gradient to a.
Tensor maximum(const Tensor& a, const Tensor& b) {
  return record("maximum", raw::binary(BinaryOp::maximum, a, b), {a, b}, {a, b}, [](Backward& ctx) {
    const Tensor a_wins = raw::compare(raw::CompareOp::ge, ctx.saved[0], ctx.saved[1]);
    const Tensor zero = scalar(0, ctx.grad.dtype());
    ctx.input(0, [&] { return raw::where(a_wins, ctx.grad, zero); });
    ctx.input(1, [&] { return raw::where(a_wins, zero, ctx.grad); });
  });
}

Tensor minimum(const Tensor& a, const Tensor& b) {
  return record("minimum", raw::binary(BinaryOp::minimum, a, b), {a, b}, {a, b}, [](Backward& ctx) {
    const Tensor a_wins = raw::compare(raw::CompareOp::le, ctx.saved[0], ctx.saved[1]);
    const Tensor zero = scalar(0, ctx.grad.dtype());
    ctx.input(0, [&] { return raw::where(a_wins, ctx.grad, zero); });
    ctx.input(1, [&] { return raw::where(a_wins, zero, ctx.grad); });
  });
}

Tensor add_scalar(const Tensor& x, double s) {
  return record("add_scalar", raw::add_scalar(x, s), {x}, {},
                [](Backward& ctx) { ctx.input(0, [&] { return ctx.grad; }); });
}

Tensor mul_scalar(const Tensor& x, double s) {
  return record("mul_scalar", raw::mul_scalar(x, s), {x}, {},
                [s](Backward& ctx) { ctx.input(0, [&] { return scaled(ctx.grad, s); }); });
}

// ---- unary ----
Tensor neg(const Tensor& x) {
  return record("neg", raw::unary(UnaryOp::neg, x), {x}, {}, [](Backward& ctx) {
    ctx.input(0, [&] { return raw::unary(UnaryOp::neg, ctx.grad); });
  });
}

Tensor exp(const Tensor& x) {
  Tensor out = raw::unary(UnaryOp::exp, x);
  return record("exp", out, {x}, {out}, [](Backward& ctx) {
    ctx.input(0, [&] { return raw::mul(ctx.grad, ctx.saved[0]); });
  });
}

Tensor log(const Tensor& x) {
  return record("log", raw::unary(UnaryOp::log, x), {x}, {x}, [](Backward& ctx) {
    ctx.input(0, [&] { return raw::div(ctx.grad, ctx.saved[0]); });
  });
}

Tensor sqrt(const Tensor& x) {
  Tensor out = raw::unary(UnaryOp::sqrt, x);
  return record("sqrt", out, {x}, {out}, [](Backward& ctx) {  // d sqrt(x) = 1 / (2 sqrt(x))
    ctx.input(0, [&] { return scaled(raw::div(ctx.grad, ctx.saved[0]), 0.5); });
  });
}

Tensor rsqrt(const Tensor& x) {
  Tensor out = raw::unary(UnaryOp::rsqrt, x);
  return record("rsqrt", out, {x}, {x, out}, [](Backward& ctx) {  // d x^-1/2 = -x^-3/2 / 2
    const Tensor &x = ctx.saved[0], &out = ctx.saved[1];
    ctx.input(0, [&] { return scaled(raw::div(raw::mul(ctx.grad, out), x), -0.5); });
  });
}

Tensor square(const Tensor& x) {
  return record("square", raw::unary(UnaryOp::square, x), {x}, {x}, [](Backward& ctx) {
    ctx.input(0, [&] { return scaled(raw::mul(ctx.grad, ctx.saved[0]), 2.0); });
  });
}

Tensor abs(const Tensor& x) {
  return record("abs", raw::unary(UnaryOp::abs, x), {x}, {x}, [](Backward& ctx) {
    const Tensor& x = ctx.saved[0];
    const Tensor zero = scalar(0, x.dtype());
    const Tensor sign =
        raw::sub(raw::to_dtype(raw::compare(raw::CompareOp::gt, x, zero), x.dtype()),
                 raw::to_dtype(raw::compare(raw::CompareOp::lt, x, zero), x.dtype()));
    ctx.input(0, [&] { return raw::mul(ctx.grad, sign); });
  });
}

Tensor tanh(const Tensor& x) {
  Tensor out = raw::unary(UnaryOp::tanh, x);
  return record("tanh", out, {x}, {out}, [](Backward& ctx) {  // 1 - tanh^2
    const Tensor& y = ctx.saved[0];
    ctx.input(0, [&] {
      return raw::mul(
          ctx.grad, raw::add_scalar(raw::unary(UnaryOp::neg, raw::unary(UnaryOp::square, y)), 1.0));
    });
  });
}

Tensor sigmoid(const Tensor& x) {
  Tensor out = raw::unary(UnaryOp::sigmoid, x);
  return record("sigmoid", out, {x}, {out}, [](Backward& ctx) {  // s (1 - s)
    const Tensor& s = ctx.saved[0];
    ctx.input(0, [&] {
      return raw::mul(ctx.grad, raw::mul(s, raw::add_scalar(raw::unary(UnaryOp::neg, s), 1.0)));
    });
  });
}

Tensor silu(const Tensor& x) {
  return record("silu", raw::unary(UnaryOp::silu, x), {x}, {x}, [](Backward& ctx) {
    // d/dx x s(x) = s (1 + x (1 - s))
    const Tensor& x = ctx.saved[0];
    ctx.input(0, [&] {
      const Tensor s = raw::unary(UnaryOp::sigmoid, x);
      const Tensor one_minus_s = raw::add_scalar(raw::unary(UnaryOp::neg, s), 1.0);
      return raw::mul(ctx.grad, raw::mul(s, raw::add_scalar(raw::mul(x, one_minus_s), 1.0)));
    });
  });
}

Tensor sin(const Tensor& x) {
  return record("sin", raw::unary(UnaryOp::sin, x), {x}, {x}, [](Backward& ctx) {
    ctx.input(0, [&] { return raw::mul(ctx.grad, raw::unary(UnaryOp::cos, ctx.saved[0])); });
  });
}

Tensor cos(const Tensor& x) {
  return record("cos", raw::unary(UnaryOp::cos, x), {x}, {x}, [](Backward& ctx) {
    ctx.input(0, [&] {
      return raw::unary(UnaryOp::neg, raw::mul(ctx.grad, raw::unary(UnaryOp::sin, ctx.saved[0])));
    });
  });
}

Tensor pow(const Tensor& x, double p) {
  return record("pow", raw::pow_scalar(x, p), {x}, {x}, [p](Backward& ctx) {
    ctx.input(0, [&] {
      // x^0 is 1 everywhere, so its gradient is 0 everywhere; p x^(p-1) would be 0 * inf = NaN
      // at x = 0.
      if (p == 0) return zeros_like(ctx.saved[0]);
      return raw::mul(ctx.grad, scaled(raw::pow_scalar(ctx.saved[0], p - 1), p));
    });
  });
}

Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b) {
  return record("where", raw::where(cond, a, b), {cond, a, b}, {cond}, [](Backward& ctx) {
    const Tensor& c = ctx.saved[0];
    const Tensor zero = scalar(0, ctx.grad.dtype());
    ctx.input(1, [&] { return raw::where(c, ctx.grad, zero); });
    ctx.input(2, [&] { return raw::where(c, zero, ctx.grad); });
  });
}

// ---- reductions ----
Tensor sum(const Tensor& x, std::vector<int64_t> axes, bool keepdims) {
  const Shape kept = keepdims_shape(x.shape(), axes, "sum");
  return record("sum", raw::sum(x, axes, keepdims), {x}, {},
                [kept, shape = x.shape()](Backward& ctx) {
                  ctx.input(0, [&] { return expand_reduced(ctx.grad, kept, shape); });
                });
}

Tensor mean(const Tensor& x, std::vector<int64_t> axes, bool keepdims) {
  const Shape kept = keepdims_shape(x.shape(), axes, "mean");
  const double scale = static_cast<double>(shape_numel(kept)) / std::max<int64_t>(x.numel(), 1);
  return record("mean", raw::mean(x, axes, keepdims), {x}, {},
                [kept, scale, shape = x.shape()](Backward& ctx) {
                  ctx.input(0,
                            [&] { return expand_reduced(scaled(ctx.grad, scale), kept, shape); });
                });
}

Tensor max(const Tensor& x, std::vector<int64_t> axes, bool keepdims) {
  const Shape kept = keepdims_shape(x.shape(), axes, "max");
  Tensor out = raw::max(x, axes, keepdims);
  return record("max", out, {x}, {x, out}, [kept, axes](Backward& ctx) {
    const Tensor &x = ctx.saved[0], &out = ctx.saved[1];
    ctx.input(0, [&] {
      const Tensor is_max = raw::to_dtype(
          raw::compare(raw::CompareOp::eq, x, expand_reduced(out, kept, x.shape())), x.dtype());
      const Tensor count = raw::sum(is_max, axes, true);
      return raw::mul(is_max, raw::div(raw::reshape(ctx.grad, kept), count));
    });
  });
}

Tensor var(const Tensor& x, std::vector<int64_t> axes, bool keepdims) {
  const Shape kept = keepdims_shape(x.shape(), axes, "var");
  const int64_t n = x.numel() / std::max<int64_t>(shape_numel(kept), 1);
  return record("var", raw::var(x, axes, keepdims), {x}, {x}, [kept, axes, n](Backward& ctx) {
    const Tensor& x = ctx.saved[0];  // d var = 2 (x - mean) / n
    ctx.input(0, [&] {
      const Tensor centered = raw::sub(x, raw::mean(x, axes, true));
      return raw::mul(scaled(centered, 2.0 / static_cast<double>(n)), raw::reshape(ctx.grad, kept));
    });
  });
}

Tensor softmax(const Tensor& x, int64_t axis) {
  Tensor out = raw::softmax(x, axis);
  return record("softmax", out, {x}, {out}, [axis](Backward& ctx) {  // y (g - sum(g y))
    const Tensor& y = ctx.saved[0];
    ctx.input(0, [&] {
      const Tensor gy = raw::mul(ctx.grad, y);
      return raw::sub(gy, raw::mul(y, raw::sum(gy, {axis}, true)));
    });
  });
}

Tensor log_softmax(const Tensor& x, int64_t axis) {
  Tensor out = raw::log_softmax(x, axis);
  return record("log_softmax", out, {x}, {out}, [axis](Backward& ctx) {  // g - exp(y) sum(g)
    const Tensor& y = ctx.saved[0];
    ctx.input(0, [&] {
      return raw::sub(ctx.grad,
                      raw::mul(raw::unary(UnaryOp::exp, y), raw::sum(ctx.grad, {axis}, true)));
    });
  });
}

// ---- matmul ----
Tensor matmul(const Tensor& a, const Tensor& b) {
  return record("matmul", raw::matmul(a, b), {a, b}, {a, b}, [](Backward& ctx) {
    const Tensor &a = ctx.saved[0], &b = ctx.saved[1];
    // dA = G B^T, dB = A^T G; transposes are views that gemm reads with a flag.
    ctx.input(0, [&] { return raw::matmul(ctx.grad, raw::transpose(b, -1, -2)); });
    ctx.input(1, [&] {
      if (b.dim() == 2 && a.dim() > 2) {  // one weight shared by a batch: fold the batch into K
        const int64_t k = a.shape().back(), n = ctx.grad.shape().back();
        return raw::matmul(raw::transpose(raw::reshape(a, rows_shape(a.shape(), k)), 0, 1),
                           raw::reshape(ctx.grad, rows_shape(ctx.grad.shape(), n)));
      }
      return raw::matmul(raw::transpose(a, -1, -2), ctx.grad);
    });
  });
}

// ---- views ----
Tensor reshape(const Tensor& x, const Shape& shape) {
  return record("reshape", raw::reshape(x, shape), {x}, {}, [in = x.shape()](Backward& ctx) {
    ctx.input(0, [&] { return raw::reshape(ctx.grad, in); });
  });
}

Tensor permute(const Tensor& x, const std::vector<int64_t>& axes) {
  Tensor out = raw::permute(x, axes);
  std::vector<int64_t> inverse(axes.size());
  for (size_t i = 0; i < axes.size(); ++i)
    inverse[normalize_axis(axes[i], x.shape(), "permute")] = i;
  return record("permute", out, {x}, {}, [inverse](Backward& ctx) {
    ctx.input(0, [&] { return raw::permute(ctx.grad, inverse); });
  });
}

Tensor transpose(const Tensor& x, int64_t a, int64_t b) {
  return record("transpose", raw::transpose(x, a, b), {x}, {}, [a, b](Backward& ctx) {
    ctx.input(0, [&] { return raw::transpose(ctx.grad, a, b); });
  });
}

Tensor slice(const Tensor& x, int64_t axis, int64_t start, int64_t end, int64_t step) {
  return record("slice", raw::slice(x, axis, start, end, step), {x}, {},
                [=, in = x.shape(), dtype = x.dtype()](Backward& ctx) {
                  ctx.input(0, [&] {
                    Tensor g = zeros(in, dtype);
                    raw::copy_into(raw::slice(g, axis, start, end, step), ctx.grad);
                    return g;
                  });
                });
}

Tensor narrow(const Tensor& x, int64_t axis, int64_t start, int64_t length) {
  raw::narrow(x, axis, start, length);  // validates the bounds with narrow's own message
  return slice(x, axis, start, start + length);
}

Tensor squeeze(const Tensor& x, int64_t axis) {
  return record("squeeze", raw::squeeze(x, axis), {x}, {}, [in = x.shape()](Backward& ctx) {
    ctx.input(0, [&] { return raw::reshape(ctx.grad, in); });
  });
}

Tensor unsqueeze(const Tensor& x, int64_t axis) {
  return record("unsqueeze", raw::unsqueeze(x, axis), {x}, {}, [in = x.shape()](Backward& ctx) {
    ctx.input(0, [&] { return raw::reshape(ctx.grad, in); });
  });
}

Tensor broadcast_to(const Tensor& x, const Shape& shape) {
  return record("broadcast_to", raw::broadcast_to(x, shape), {x}, {}, [](Backward& ctx) {
    ctx.input(0, [&] { return ctx.grad; });
  });  // summed by input()
}

Tensor contiguous(const Tensor& x) {
  return record("contiguous", raw::contiguous(x), {x}, {},
                [](Backward& ctx) { ctx.input(0, [&] { return ctx.grad; }); });
}

Tensor to_dtype(const Tensor& x, DType dtype) {
  return record("to_dtype", raw::to_dtype(x, dtype), {x}, {}, [from = x.dtype()](Backward& ctx) {
    ctx.input(0, [&] { return raw::to_dtype(ctx.grad, from); });
  });
}

Tensor concat(const std::vector<Tensor>& parts, int64_t axis) {
  Tensor out = raw::concat(parts, axis);
  const int64_t ax = normalize_axis(axis, parts[0].shape(), "concat");
  std::vector<int64_t> lengths;
  for (const Tensor& p : parts) lengths.push_back(p.shape()[ax]);
  return record("concat", out, parts, {}, [ax, lengths](Backward& ctx) {
    int64_t at = 0;
    for (size_t i = 0; i < lengths.size(); at += lengths[i++])
      ctx.input(i, [&] { return raw::narrow(ctx.grad, ax, at, lengths[i]); });
  });
}

std::vector<Tensor> split(const Tensor& x, const std::vector<int64_t>& sizes, int64_t axis) {
  axis = raw::split_axis(x.shape(), sizes, axis);
  std::vector<Tensor> out;
  int64_t at = 0;
  for (int64_t s : sizes) {
    out.push_back(narrow(x, axis, at, s));
    at += s;
  }
  return out;
}

Tensor stack(const std::vector<Tensor>& parts, int64_t axis) {
  axis = raw::stack_axis(parts, axis);
  std::vector<Tensor> expanded;
  for (const Tensor& p : parts) expanded.push_back(unsqueeze(p, axis));
  return concat(expanded, axis);
}

}  // namespace mmdit
