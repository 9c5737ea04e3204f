// A two-layer MLP fits sin(x) on [-pi, pi] with value_and_grad and plain gradient descent:
// the smallest complete use of the tensor and autodiff layers.
#include <cmath>
#include <cstdio>

#include "autodiff/ops.h"
#include "autodiff/value_and_grad.h"
#include "tensor/blas_core.h"
#include "tensor/random.h"

using namespace mmdit;

int main(int, char** argv) {
  mmdit::use_the_best_openblas_core(argv);  // before OpenBLAS does any work
  Rng rng(0);
  const int64_t hidden = 64, n = 256;
  NamedTensors params;
  params.insert("w1", rng.normal({1, hidden}, DType::f32, 0, 1.0));
  params.insert("b1", zeros({hidden}));
  params.insert("w2", rng.normal({hidden, 1}, DType::f32, 0, 1.0 / std::sqrt(hidden)));
  params.insert("b2", zeros({1}));

  const Tensor x = raw::reshape(rng.uniform({n}, DType::f32, -M_PI, M_PI), {n, 1});
  const Tensor y = raw::unary(raw::UnaryOp::sin, x);

  auto loss_fn = [](const NamedTensors& p, const Tensor& x, const Tensor& y) {
    Tensor h = tanh(matmul(x, p.at("w1")) + p.at("b1"));
    Tensor pred = matmul(h, p.at("w2")) + p.at("b2");
    return mean(square(pred - y));
  };

  const double lr = 0.02;
  for (int step = 0; step <= 2000; ++step) {
    auto [loss, grads] = value_and_grad(loss_fn)(params, x, y);
    for (auto& [name, p] : params)
      raw::copy_into(p, raw::sub(p, raw::mul_scalar(grads.at(name), lr)));
    if (step % 250 == 0) std::printf("step %4d  loss %.6f\n", step, loss.item());
  }
}
