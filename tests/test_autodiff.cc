// Tape behaviour (autodiff/tape.h, autodiff/value_and_grad.h): what is recorded and when,
// how gradients accumulate and flow, what is released, and the errors. Gradients are compared
// with closed forms; the inputs are dyadic rationals wherever the test claims exact equality.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "autodiff/inspect.h"
#include "autodiff/ops.h"
#include "autodiff/tape.h"
#include "autodiff/value_and_grad.h"
#include "tensor/named_tensors.h"
#include "tests/test_util.h"

namespace mmdit {
namespace {

using test::error_of;

using testing::HasSubstr;

std::vector<double> values(const Tensor& t) {
  return t.to_vector<double>();
}

// ---- what gets recorded ----

TEST(AutodiffTape, NothingIsRecordedWithoutATape) {
  ASSERT_EQ(Tape::active(), nullptr);
  Tensor x = from_vector({1.f, 2.f, 3.f}, {3});
  Tensor y = sum(exp(x) * x + 1.0);
  EXPECT_EQ(y.impl().tape_slot, -1);
  EXPECT_EQ(y.impl().tape_id, 0u);
  const double want = std::exp(1) + 2 * std::exp(2) + 3 * std::exp(3) + 3;
  EXPECT_NEAR(y.item(), want, 1e-6 * want);
}

TEST(AutodiffTape, NothingIsRecordedWithoutAWatchedInput) {
  Tape tape;
  EXPECT_EQ(Tape::active(), &tape);
  Tensor x = from_vector({1.f, 2.f}, {2}), w = from_vector({3.f, 4.f}, {2});
  Tensor y = sum(matmul(reshape(x, {1, 2}), reshape(w, {2, 1})) * 2.0);
  EXPECT_TRUE(tape.nodes().empty());
  EXPECT_EQ(tape.num_values(), 0);
  EXPECT_FALSE(tape.is_on_tape(y));
  EXPECT_EQ(y.item(), 22.0);

  // With one input watched, only the ops that depend on it are recorded.
  tape.watch(w);
  EXPECT_EQ(tape.num_values(), 1);
  Tensor c = exp(x);  // constant: x is not watched
  EXPECT_FALSE(tape.is_on_tape(c));
  EXPECT_TRUE(tape.nodes().empty());
  Tensor d = c * w;
  EXPECT_TRUE(tape.is_on_tape(d));
  ASSERT_EQ(tape.nodes().size(), 1u);
  EXPECT_EQ(tape.nodes()[0].op, "mul");
  ASSERT_EQ(tape.nodes()[0].inputs.size(), 2u);
  EXPECT_EQ(tape.nodes()[0].inputs[0].slot, -1);
  EXPECT_EQ(tape.nodes()[0].inputs[1].slot, tape.slot_of(w));
  EXPECT_EQ(tape.nodes()[0].output, tape.slot_of(d));
  EXPECT_EQ(tape.nodes()[0].output_shape, (Shape{2}));
  // Comparisons give bool tensors and are never recorded.
  Tensor m = gt(d, c);
  EXPECT_FALSE(tape.is_on_tape(m));
  EXPECT_EQ(tape.nodes().size(), 1u);
}

// Only the active tape records. An op on the outer tape's values while an inner tape is active
// was recorded nowhere, and the outer gradient through it came back as silent zeros: it is
// refused, naming the op; stop_gradient says that no gradient is wanted.
TEST(AutodiffTape, TapesNestAndAnInnerTapeRefusesTheOuterTapesValues) {
  Tensor x = from_vector(std::vector<double>{2.0}, {1});
  Tape outer;
  outer.watch(x);
  const Tensor h = x * 3.0;
  {
    Tape inner;
    EXPECT_EQ(Tape::active(), &inner);
    for (const Tensor& on_outer : {x, h})
      EXPECT_THAT([&] { return sum(on_outer * 2.0); },
                  testing::ThrowsMessage<Error>(HasSubstr(
                      "mul_scalar: input 0 (1,) is on an enclosing tape, but a nested tape is "
                      "active and only the active tape records")));
    const Tensor y = stop_gradient(x) * stop_gradient(x);
    EXPECT_TRUE(inner.nodes().empty());
    EXPECT_FALSE(inner.is_on_tape(y));
    EXPECT_EQ(values(y), std::vector<double>{4.0});
  }
  EXPECT_EQ(Tape::active(), &outer);
  EXPECT_EQ(outer.nodes().size(), 1u);  // h; nothing while the inner tape was active
  const Tensor z = x * x;
  EXPECT_EQ(outer.nodes().size(), 2u);
  EXPECT_EQ(values(outer.gradient(sum(z), {x})[0]), std::vector<double>{4.0});
}

// With one input on the inner tape the op was recorded there, and the outer tape's gradient
// through the other input was silently 0. Once the outer tape's gradient() has run it records
// nothing more: its values are constants to the nested tape, as to another thread.
TEST(AutodiffTape, AnOpMixingOuterAndInnerValuesIsRefusedWhileTheOuterRecords) {
  Tensor x = from_vector(std::vector<double>{0.5, 1.0}, {2});
  Tensor z = from_vector(std::vector<double>{2.0, 3.0}, {2});
  Tape outer;
  outer.watch(x);
  const Tensor y = sin(x), outer_loss = sum(y);
  Tape inner;
  inner.watch(z);
  EXPECT_THAT(error_of([&] { return y * z; }),
              HasSubstr("mul: input 0 (2,) is on an enclosing tape, but a nested tape is active"));
  EXPECT_EQ(error_of([&] { return stop_gradient(y) * z; }), "(no mmdit::Error thrown)");
  outer.gradient(outer_loss, {x});
  EXPECT_EQ(values(inner.gradient(sum(y * z), {z})[0]), values(raw::unary(raw::UnaryOp::sin, x)));
}

// Ops run while the inner tape is active are recorded there only: had it watched x, the outer
// tape's gradient of sum(x * x) computed inside would silently leave that product out.
TEST(AutodiffTape, ANestedTapeCannotWatchWhatAnOuterTapeHolds) {
  Tensor x = from_vector(std::vector<double>{2.0}, {1});
  Tape outer;
  outer.watch(x);
  const Tensor h = x * 3.0;
  {
    Tape inner;
    EXPECT_THAT([&] { inner.watch(x); },
                testing::ThrowsMessage<Error>(HasSubstr("already on an enclosing tape")));
    EXPECT_THAT([&] { inner.watch(h); },
                testing::ThrowsMessage<Error>(HasSubstr("already on an enclosing tape")));
  }
  const Tensor z = x * h;  // 3 x^2, still recorded on the outer tape
  EXPECT_EQ(values(outer.gradient(sum(z), {x})[0]), std::vector<double>{12.0});
}

// docs/autodiff.md section 3: a node keeps the tensor it saved, not a copy. An in-place change
// the library makes (or is told of) before gradient() is refused, naming the op that saved it.
TEST(AutodiffTape, AnInPlaceChangeToASavedTensorIsRefused) {
  const std::vector<std::function<void(const Tensor&)>> changes = {
      [](const Tensor& x) { raw::copy_into(x, scalar(3.0, DType::f64)); },
      [](const Tensor& x) { raw::add_into(x, scalar(1.0, DType::f64)); },
      // another view of the same storage
      [](const Tensor& x) {
        raw::fill(raw::slice(raw::reshape(x, {2, 1}), 0, 1, 2), 0.5);
      },
      [](const Tensor& x) {
        x.data<double>()[0] = 100.0;
        x.mark_changed();
      },
  };
  for (size_t c = 0; c < changes.size(); ++c) {
    SCOPED_TRACE(c);
    Tensor x = from_vector(std::vector<double>{1.0, 2.0}, {2});
    Tape tape;
    tape.watch(x);
    Tensor y;
    {
      NameScope scope("loss");
      y = sum(square(x));
    }
    changes[c](x);
    const std::string message = error_of([&] { tape.gradient(y, {x}); });
    EXPECT_THAT(message,
                HasSubstr("square (node 0, recorded in scope 'loss') saved a (2,) float64 tensor"));
    EXPECT_THAT(message, HasSubstr("changed in place after the op ran"));
  }
}

// What gradient() never reads may change: add saves nothing, and a node whose backward does not
// run (its output does not lead to y) is not checked.
TEST(AutodiffTape, ChangingWhatBackwardDoesNotReadIsAllowed) {
  Tensor x = from_vector(std::vector<double>{1.0, 2.0}, {2});
  Tensor c = from_vector(std::vector<double>{5.0, 7.0}, {2});
  Tape tape;
  tape.watch(x);
  tape.watch(c);
  const Tensor y = sum(x + c);
  const Tensor unused = square(c);
  raw::copy_into(c, scalar(-1.0, DType::f64));
  const std::vector<Tensor> g = tape.gradient(y, {x, c});
  EXPECT_EQ(values(g[0]), (std::vector<double>{1.0, 1.0}));
  EXPECT_EQ(values(g[1]), (std::vector<double>{1.0, 1.0}));
}

// A write through data<T>() is invisible to the library until mark_changed(): backward then
// reads the new value (d/dx0 of x0^2 at the new x0 = 100).
TEST(AutodiffTape, AnUnmarkedWriteThroughDataIsNotSeen) {
  Tensor x = from_vector(std::vector<double>{1.0, 2.0}, {2});
  Tape tape;
  tape.watch(x);
  const Tensor y = sum(square(x));
  x.data<double>()[0] = 100.0;
  EXPECT_EQ(values(tape.gradient(y, {x})[0]), (std::vector<double>{200.0, 4.0}));
}

// ---- gradients ----

TEST(AutodiffGradient, ABoolRoundTripCarriesNoGradient) {
  // y = sum(float(bool(x)) * x): bool(x) is a constant mask, so dy/dx = float(x != 0).
  Tensor x = from_vector(std::vector<double>{0, 1.5, -2, 0}, {4});
  Tape tape;
  tape.watch(x);
  const Tensor mask = to_dtype(to_dtype(x, DType::boolean), DType::f64);
  EXPECT_FALSE(tape.is_on_tape(mask));
  const Tensor g = tape.gradient(sum(mask * x), {x})[0];
  EXPECT_EQ(values(g), (std::vector<double>{0, 1, 1, 0}));
}

TEST(AutodiffGradient, ReturnedGradientsNeverShareMemory) {
  // add's backward hands the same tensor to both inputs, and the cotangent on: each returned
  // gradient must still be the caller's own to scale in place.
  Tensor a = from_vector(std::vector<double>{1, 2}, {2});
  Tensor b = from_vector(std::vector<double>{0.5, -1}, {2});
  Tensor cot = from_vector(std::vector<double>{3, 4}, {2});
  Tape tape;
  tape.watch(a);
  tape.watch(b);
  std::vector<Tensor> g = tape.gradient(a + b, {a, b, a}, cot);
  EXPECT_FALSE(g[0].shares_storage_with(g[1]));
  EXPECT_FALSE(g[0].shares_storage_with(g[2]));
  EXPECT_FALSE(g[0].shares_storage_with(cot));
  EXPECT_FALSE(g[1].shares_storage_with(cot));
  raw::copy_into(g[0], raw::mul_scalar(g[0], 0.5));
  EXPECT_EQ(values(g[0]), (std::vector<double>{1.5, 2}));
  EXPECT_EQ(values(g[1]), (std::vector<double>{3, 4}));
  EXPECT_EQ(values(g[2]), (std::vector<double>{3, 4}));
  EXPECT_EQ(values(cot), (std::vector<double>{3, 4}));
}

TEST(AutodiffGradient, UsesOfOneTensorAccumulate) {
  // d/dx sum(x*x + x) = 2x + 1, exactly for these dyadic values.
  for (DType t : {DType::f32, DType::f64}) {
    const std::vector<double> xs = {-1.5, 0.25, 3.0, 0.0, -0.125};
    Tensor x = from_vector(xs, {5}, t);
    Tape tape;
    tape.watch(x);
    Tensor y = sum(x * x + x);
    Tensor g = tape.gradient(y, {x})[0];
    EXPECT_EQ(g.dtype(), t);
    std::vector<double> want;
    for (double v : xs) want.push_back(2 * v + 1);
    EXPECT_EQ(values(g), want);
  }
}

TEST(AutodiffGradient, DiamondAndRepeatedUse) {
  // y = sum(a * b) with a = exp(x), b = x^3, both from x; and x used again at the end.
  const std::vector<double> xs = {0.5, -0.25, 1.0};
  Tensor x = from_vector(xs, {3});
  Tape tape;
  tape.watch(x);
  Tensor a = exp(x), b = pow(x, 3.0);
  Tensor y = sum(a * b) + sum(x);
  const std::vector<double> g = values(tape.gradient(y, {x})[0]);
  for (size_t i = 0; i < xs.size(); ++i) {
    const double v = xs[i];
    EXPECT_NEAR(g[i], std::exp(v) * v * v * v + 3 * std::exp(v) * v * v + 1, 1e-13);
  }
}

TEST(AutodiffGradient, AccumulatingInPlaceNeverWritesIntoAnotherGradient) {
  // Gradients are summed in place when nothing else holds the running sum. Here the first
  // contribution to du is a view of dr (reshape's backward reshapes its incoming gradient), and
  // dr is returned to the caller: adding du's second term into that view would change dr.
  Tensor u = from_vector(std::vector<double>{1, -2, 3, 0.5}, {4});
  const Tensor c = from_vector(std::vector<double>{1, 2, 3, 4}, {2, 2});
  Tape tape;
  tape.watch(u);
  Tensor m = u * 3.0;             // recorded first, so its backward runs last
  Tensor r = reshape(u, {2, 2});  // its backward runs before and hands du a view of dr
  Tensor y = sum(m) + sum(r * c);
  const std::vector<Tensor> g = tape.gradient(y, {r, u});
  EXPECT_EQ(values(g[0]), (std::vector<double>{1, 2, 3, 4}));
  EXPECT_EQ(values(g[1]), (std::vector<double>{4, 5, 6, 7}));
}

TEST(AutodiffGradient, AccumulatingInPlaceLeavesTheCotangentAlone) {
  // add's backward passes its incoming gradient through: the caller's cotangent becomes the
  // first term of dx's sum, and must not be the one the second term is added into.
  Tensor x = from_vector(std::vector<double>{1, 2, 3}, {3});
  Tensor cot = from_vector(std::vector<double>{0.5, -1, 2}, {3});
  Tape tape;
  tape.watch(x);
  Tensor y = x + x * 2.0;
  const Tensor dx = tape.gradient(y, {x}, cot)[0];
  EXPECT_EQ(values(dx), (std::vector<double>{1.5, -3, 6}));
  EXPECT_EQ(values(cot), (std::vector<double>{0.5, -1, 2}));
}

TEST(AutodiffGradient, ExplicitInputsAndZerosForUnusedOnes) {
  Tensor a = from_vector(std::vector<double>{1, 2, 3, 4, 5, 6}, {2, 3});
  Tensor b = from_vector(std::vector<double>{0.5, -1, 2}, {3});
  Tensor unused = from_vector(std::vector<double>{7, 8}, {2});
  Tape tape;
  tape.watch(a);
  tape.watch(b);
  tape.watch(unused);
  Tensor y = sum(a * b);  // b broadcast over rows
  const std::vector<Tensor> g = tape.gradient(y, {a, b, unused});
  ASSERT_EQ(g.size(), 3u);
  EXPECT_EQ(g[0].shape(), (Shape{2, 3}));
  EXPECT_EQ(values(g[0]), (std::vector<double>{0.5, -1, 2, 0.5, -1, 2}));
  EXPECT_EQ(g[1].shape(), (Shape{3}));
  EXPECT_EQ(values(g[1]), (std::vector<double>{5, 7, 9}));  // column sums of a
  EXPECT_EQ(g[2].shape(), (Shape{2}));
  EXPECT_EQ(values(g[2]), (std::vector<double>{0, 0}));
  EXPECT_EQ(g[2].dtype(), DType::f64);
}

TEST(AutodiffGradient, WithRespectToAnIntermediate) {
  Tensor x = from_vector(std::vector<double>{1, -2, 3}, {3});
  Tape tape;
  tape.watch(x);
  Tensor h = x * 2.0;
  Tensor y = sum(h * h);
  const std::vector<Tensor> g = tape.gradient(y, {h, x});
  EXPECT_EQ(values(g[0]), (std::vector<double>{4, -8, 12}));   // 2h
  EXPECT_EQ(values(g[1]), (std::vector<double>{8, -16, 24}));  // 8x
}

TEST(AutodiffGradient, ContiguousOfAContiguousWatchedTensor) {
  // raw::contiguous returns its input unchanged; the recorded result still gets its own slot,
  // so the two uses of x accumulate: d/dx sum(contiguous(x) * x) = 2x.
  Tensor x = from_vector(std::vector<double>{1.5, -2, 0.5}, {3});
  Tape tape;
  tape.watch(x);
  Tensor c = contiguous(x);
  EXPECT_NE(tape.slot_of(c), tape.slot_of(x));
  EXPECT_EQ(tape.slot_of(x), 0);
  Tensor y = sum(c * x);
  EXPECT_EQ(values(tape.gradient(y, {x})[0]), (std::vector<double>{3, -4, 1}));
}

TEST(AutodiffGradient, BroadcastToItsOwnShape) {
  // raw::broadcast_to returns a same-shape input itself, as raw::contiguous does: recorded, the
  // result still gets its own slot and both uses of x count.
  Tensor x = from_vector(std::vector<double>{1.5, -2, 0.5}, {3});
  Tape tape;
  tape.watch(x);
  Tensor b = broadcast_to(x, {3});
  EXPECT_NE(tape.slot_of(b), tape.slot_of(x));
  Tensor y = sum(b * x);
  EXPECT_EQ(values(tape.gradient(y, {x})[0]), (std::vector<double>{3, -4, 1}));
}

TEST(AutodiffGradient, StopGradientBlocksFlow) {
  Tensor x = from_vector(std::vector<double>{1.5, -2, 4}, {3});
  Tape tape;
  tape.watch(x);
  Tensor s = stop_gradient(x);
  EXPECT_FALSE(tape.is_on_tape(s));
  EXPECT_TRUE(s.shares_storage_with(x));
  Tensor y = sum(x * s);  // d/dx = s = x, not 2x
  EXPECT_EQ(values(tape.gradient(y, {x})[0]), (std::vector<double>{1.5, -2, 4}));
}

TEST(AutodiffGradient, StopGradientOnEveryPathGivesZeros) {
  Tensor x = from_vector(std::vector<double>{1, 2}, {2});
  Tape tape;
  tape.watch(x);
  Tensor y = sum(exp(stop_gradient(x * 3.0)));
  EXPECT_EQ(values(tape.gradient(y, {x})[0]), (std::vector<double>{0, 0}));
}

TEST(AutodiffGradient, NonScalarOutputNeedsACotangent) {
  Tensor x = from_vector(std::vector<double>{1, 2, 3}, {3});
  {
    Tape tape;
    tape.watch(x);
    Tensor y = x * x;
    EXPECT_THAT(error_of([&] { tape.gradient(y, {x}); }),
                HasSubstr("gradient: the output has shape (3,); a non-scalar output needs a "
                          "cotangent"));
  }
  {
    Tape tape;
    tape.watch(x);
    Tensor y = x * x;
    Tensor c = from_vector(std::vector<double>{0.5, -1, 2}, {3});
    // d sum(c * x^2) / dx = 2 c x
    EXPECT_EQ(values(tape.gradient(y, {x}, c)[0]), (std::vector<double>{1, -4, 12}));
  }
  {
    Tape tape;
    tape.watch(x);
    Tensor y = x * x;
    EXPECT_THAT(error_of([&] { tape.gradient(y, {x}, zeros({2}, DType::f64)); }),
                HasSubstr("gradient: cotangent (2,) float64 does not match the output (3,) "
                          "float64"));
  }
}

TEST(AutodiffGradient, ScalarOutputWithCotangentScales) {
  Tensor x = from_vector(std::vector<double>{1, 2}, {2});
  Tape tape;
  tape.watch(x);
  Tensor y = sum(x * x);  // shape ()
  EXPECT_EQ(values(tape.gradient(y, {x}, scalar(3, DType::f64))[0]), (std::vector<double>{6, 12}));
}

TEST(AutodiffGradient, GradientTwiceThrows) {
  Tensor x = from_vector(std::vector<double>{1, 2}, {2});
  Tape tape;
  tape.watch(x);
  Tensor y = sum(x * x);
  tape.gradient(y, {x});
  EXPECT_THAT(error_of([&] { tape.gradient(y, {x}); }),
              HasSubstr("gradient: this tape's gradient() has already run and released what "
                        "backward needs; record the computation again on a new Tape"));
  EXPECT_THAT(error_of([&] { tape.watch(x); }), HasSubstr("gradient() has already run"));
  EXPECT_THAT(error_of([&] { exp(x); }), HasSubstr("exp: recording on a tape whose gradient()"));
}

TEST(AutodiffGradient, UnwatchedInputThrows) {
  Tensor x = from_vector(std::vector<double>{1, 2}, {2});
  Tensor never = from_vector(std::vector<double>{3, 4, 5}, {3});
  Tape tape;
  tape.watch(x);
  Tensor y = sum(x * x);
  EXPECT_THAT(error_of([&] {
                tape.gradient(y, {x, never});
              }),
              HasSubstr("gradient: input 1 (shape (3,)) was neither watched nor computed on "
                        "this tape"));
  EXPECT_THAT(error_of([&] {
                tape.gradient(y, {x, Tensor()});
              }),
              HasSubstr("gradient: input 1 is an undefined tensor"));
}

TEST(AutodiffGradient, TensorsFromAnotherTapeAreNamedAsSuch) {
  Tensor x = from_vector(std::vector<double>{1, 2}, {2});
  Tensor a = from_vector(std::vector<double>{3}, {1});
  Tensor y_old, a_old;
  {
    Tape old;
    old.watch(a);
    old.watch(x);
    y_old = sum(x * x);
    a_old = a * 2.0;
  }
  Tape tape;
  tape.watch(x);
  // y_old depends on x, but through nodes of the old tape: this one would return zeros.
  EXPECT_THAT(error_of([&] { tape.gradient(y_old, {x}); }),
              HasSubstr("gradient: the output () was recorded on another tape, not this one"));
  EXPECT_THAT(error_of([&] {
                tape.gradient(sum(x * x), {x, a_old});
              }),
              HasSubstr("gradient: input 1 (shape (1,)) was neither watched nor computed on this "
                        "tape (it is from another tape)"));
  // What a tape watched, it kept to itself: here a is just not on this tape.
  EXPECT_THAT(error_of([&] {
                tape.gradient(sum(x * x), {x, a});
              }),
              testing::EndsWith("was neither watched nor computed on this tape"));
}

TEST(AutodiffOps, SplitChecksItsSizes) {
  const Tensor x = zeros({2, 3});
  EXPECT_THAT(error_of([&] {
                split(x, {1, 1}, -1);
              }),
              HasSubstr("split: sizes add up to 2 but axis 1 of shape (2,3) has 3"));
  EXPECT_THAT(error_of([&] { split(x, {1, 3}, 2); }), HasSubstr("split: axis 2 is out of range"));
  // Adds up, but a part would pass the end: the negative size is named, not the narrow it makes.
  EXPECT_THAT(error_of([&] {
                split(x, {4, -1}, 1);
              }),
              HasSubstr("split: size -1 (part 1) is negative"));
  const std::vector<Tensor> parts = split(x, {1, 2}, 1);
  ASSERT_EQ(parts.size(), 2u);
  EXPECT_EQ(parts[1].shape(), Shape({2, 2}));
}

// The autodiff stack names its own inputs' shapes, as raw::stack does, not those of the
// unsqueezed parts it concatenates.
TEST(AutodiffOps, StackChecksShapesAndAxis) {
  EXPECT_THAT(error_of([] {
                stack({zeros({2, 3}), zeros({3, 2})}, 0);
              }),
              HasSubstr("stack: shapes (2,3) and (3,2) differ"));
  EXPECT_THAT(
      error_of([] {
        stack({zeros({2, 3}), zeros({2, 3})}, 3);
      }),
      HasSubstr("stack: axis 3 is out of range [-3, 2] for stacking tensors of shape (2,3)"));
  EXPECT_EQ(stack({zeros({2, 3}), zeros({2, 3})}, -3).shape(), Shape({2, 2, 3}));
  EXPECT_EQ(stack({zeros({2, 3}), zeros({2, 3})}, 2).shape(), Shape({2, 3, 2}));
}

TEST(AutodiffGradient, WatchRejectsBoolAndUndefined) {
  Tape tape;
  EXPECT_THAT(error_of([&] { tape.watch(zeros({2}, DType::boolean)); }),
              HasSubstr("Tape::watch: only float tensors can be differentiated, got bool"));
  EXPECT_THAT(error_of([&] { tape.watch(Tensor()); }), HasSubstr("undefined"));
}

TEST(AutodiffGradient, OutputNotOnTheTapeGivesZeros) {
  Tensor x = from_vector(std::vector<double>{1, 2}, {2});
  Tensor c = from_vector(std::vector<double>{3, 4}, {2});
  Tape tape;
  tape.watch(x);
  Tensor y = sum(c);  // does not depend on x
  EXPECT_EQ(values(tape.gradient(y, {x})[0]), (std::vector<double>{0, 0}));
}

// saved_bytes() adds up every tensor every node keeps; saved_memory() counts each storage once,
// the watched leaves' apart. Sizes are multiples of 64 bytes, so that a storage holds exactly its
// tensor's bytes.
TEST(AutodiffTape, SavedMemoryCountsEachStorageOnceAndTheLeavesApart) {
  Rng rng(3);
  Tensor w = rng.normal({8, 4}, DType::f64);  // 256 bytes, watched
  Tensor x = rng.normal({4, 8}, DType::f64);  // 256 bytes, a constant
  Tape tape;
  tape.watch(w);
  Tensor y = matmul(x, w);                // keeps x and w; y: 4 x 4, 128 bytes
  Tensor z = mul(y, y);                   // keeps y, twice
  Tensor v = mul(narrow(w, 0, 0, 4), z);  // keeps a view of w's storage, and z (128 bytes)
  size_t every_tensor = 0;
  for (const Node& n : tape.nodes())
    for (const Tensor& t : n.saved)
      if (t.defined()) every_tensor += t.nbytes();
  EXPECT_EQ(tape.saved_bytes(), every_tensor);
  EXPECT_GT(every_tensor, size_t{256 + 256 + 128 + 128});  // y and w counted more than once
  const Tape::SavedMemory memory = tape.saved_memory();
  EXPECT_EQ(memory.leaves, 256u);             // w's storage, once
  EXPECT_EQ(memory.other, 256u + 128 + 128);  // x, y, z
  tape.gradient(sum(v), {w});
  EXPECT_EQ(tape.saved_memory().leaves + tape.saved_memory().other, 0u);
}

TEST(AutodiffGradient, SavedTensorsAreReleasedAfterBackward) {
  const int64_t n = 1000;
  Tensor x = raw::mul_scalar(arange(n, DType::f64), 1e-3);
  Tape tape;
  tape.watch(x);
  Tensor e = exp(x);  // saves its output: n doubles
  Tensor y = sum(e);  // saves nothing
  EXPECT_EQ(tape.saved_bytes(), static_cast<size_t>(n) * 8);
  ASSERT_EQ(tape.nodes().size(), 2u);
  EXPECT_EQ(tape.nodes()[0].saved.size(), 1u);
  Tensor g = tape.gradient(y, {x})[0];
  EXPECT_EQ(tape.saved_bytes(), 0u);
  for (const Node& node : tape.nodes()) {
    EXPECT_TRUE(node.saved.empty());
    EXPECT_FALSE(node.backward);
  }
  EXPECT_EQ(values(g), values(e));  // d/dx sum(exp(x)) = exp(x)
}

TEST(AutodiffGradient, NameScopesNameNodes) {
  Tensor x = from_vector(std::vector<double>{1, 2}, {2});
  Tape tape;
  tape.watch(x);
  EXPECT_EQ(NameScope::current(), "");
  Tensor y;
  {
    NameScope a("a");
    Tensor h = exp(x);
    {
      NameScope b("b");
      EXPECT_EQ(NameScope::current(), "a.b");
      h = h * x;
    }
    y = sum(h);
  }
  Tensor z = y * 2.0;
  EXPECT_EQ(NameScope::current(), "");
  ASSERT_EQ(tape.nodes().size(), 4u);
  EXPECT_EQ(tape.nodes()[0].scope, "a");
  EXPECT_EQ(tape.nodes()[1].op, "mul");
  EXPECT_EQ(tape.nodes()[1].scope, "a.b");
  EXPECT_EQ(tape.nodes()[2].scope, "a");
  EXPECT_EQ(tape.nodes()[3].scope, "");
}

TEST(AutodiffGradient, RecordWithACustomBackward) {
  // A user op through record(): y = 3x with its backward; inputs that are constants get none.
  Tensor x = from_vector(std::vector<double>{1, -1}, {2});
  Tensor k = from_vector(std::vector<double>{10, 20}, {2});
  Tape tape;
  tape.watch(x);
  bool constant_needed = true;
  Tensor y =
      record("triple_plus", raw::add(raw::mul_scalar(x, 3), k), {x, k}, {}, [&](Backward& ctx) {
        constant_needed = ctx.needs(1);
        ctx.input(0, [&] { return raw::mul_scalar(ctx.grad, 3); });
        ctx.input(1, [&] { return ctx.grad; });
      });
  ASSERT_EQ(tape.nodes().size(), 1u);
  EXPECT_EQ(tape.nodes()[0].op, "triple_plus");
  EXPECT_EQ(values(tape.gradient(sum(y), {x})[0]), (std::vector<double>{3, 3}));
  EXPECT_FALSE(constant_needed);
}

TEST(AutodiffGradient, MistakesInACustomBackwardNameTheOp) {
  Tensor x = from_vector(std::vector<double>{1, 2, 3}, {3});
  auto gradient_with = [&](auto backward) {
    return error_of([&] {
      Tape tape;
      tape.watch(x);
      tape.gradient(sum(record("my_op", raw::mul_scalar(x, 2), {x}, {}, backward)), {x});
    });
  };
  EXPECT_THAT(gradient_with([](Backward& ctx) { ctx.input(1, [&] { return ctx.grad; }); }),
              HasSubstr("my_op: its backward sets the gradient of input 1, but the op was "
                        "recorded with 1 input"));
  EXPECT_THAT(
      gradient_with([](Backward& ctx) { ctx.input(0, [&] { return zeros({2}, DType::f64); }); }),
      HasSubstr("my_op: its backward gave input 0 ((3,) float64) a gradient of (2,) float64; it "
                "must have the input's dtype, and its shape or a broadcast of it"));
  EXPECT_THAT(gradient_with([](Backward& ctx) {
                ctx.input(0, [&] { return raw::to_dtype(ctx.grad, DType::f32); });
              }),
              HasSubstr("my_op: its backward gave input 0 ((3,) float64) a gradient of (3,) "
                        "float32"));
  // Reading a saved tensor the op did not save read past the vector (a segfault).
  EXPECT_THAT(gradient_with([](Backward& ctx) {
                ctx.input(0, [&] { return raw::mul(ctx.grad, ctx.saved[0]); });
              }),
              HasSubstr("my_op: its backward reads saved tensor 0, but the op saved 0 tensors"));
  // Two terms of a product rule given as two calls: the second replaced the first.
  EXPECT_THAT(gradient_with([](Backward& ctx) {
                ctx.input(0, [&] { return ctx.grad; });
                ctx.input(0, [&] { return ctx.grad; });
              }),
              HasSubstr("my_op: its backward sets the gradient of input 0 twice"));
  // An autodiff op instead of a raw kernel: the message was "recording on a tape whose
  // gradient() has already run", while gradient() was running.
  EXPECT_THAT(gradient_with([&](Backward& ctx) { ctx.input(0, [&] { return ctx.grad * x; }); }),
              HasSubstr("mul: an autodiff op ran inside the backward of my_op; a backward "
                        "computes with the raw:: kernels"));
  // A broadcast of the input's shape is summed back down to it.
  Tape tape;
  tape.watch(x);
  Tensor y = record("my_op", raw::mul_scalar(x, 2), {x}, {}, [](Backward& ctx) {
    ctx.input(0, [&] { return raw::broadcast_to(raw::mul_scalar(ctx.grad, 2), {2, 3}); });
  });
  EXPECT_EQ(values(tape.gradient(sum(y), {x})[0]), (std::vector<double>{4, 4, 4}));
}

// A contributor's backward that forgot an input returned zeros for it without a word; an
// optional input left undefined could not be recorded; a name built at run time dangled.
TEST(AutodiffGradient, CustomOpsAreCheckedWhereTheyWereSilent) {
  const Tensor x = from_vector(std::vector<double>{1, 2, 3}, {3});
  const Tensor b = from_vector(std::vector<double>{0.5, -1, 2}, {3});
  {
    Tape tape;
    tape.watch(x);
    tape.watch(b);
    Tensor y = record("mul_forgets_b", raw::mul(x, b), {x, b}, {x, b}, [](Backward& ctx) {
      ctx.input(0, [&] { return raw::mul(ctx.grad, ctx.saved[1]); });
    });
    EXPECT_THAT(error_of([&] {
                  tape.gradient(sum(y), {x, b});
                }),
                HasSubstr("gradient: the backward of mul_forgets_b (node 0, recorded in scope "
                          "'<root>') gave no gradient to its input 1 (%1 (3,)), which needs one"));
  }
  // An input that needs no gradient (b is not watched) may be left alone.
  {
    Tape tape;
    tape.watch(x);
    Tensor y = record("mul_forgets_b", raw::mul(x, b), {x, b}, {x, b}, [](Backward& ctx) {
      ctx.input(0, [&] { return raw::mul(ctx.grad, ctx.saved[1]); });
    });
    EXPECT_EQ(values(tape.gradient(sum(y), {x})[0]), values(b));
  }
  // scale_shift(x, s, shift) with the shift optional, recorded with the shift left undefined.
  const auto scale_shift = [](const Tensor& x, const Tensor& s, const Tensor& shift) {
    Tensor out = raw::mul(x, s);
    if (shift.defined()) out = raw::add(out, shift);
    return record("scale_shift", out, {x, s, shift}, {x, s}, [](Backward& ctx) {
      ctx.input(0, [&] { return raw::mul(ctx.grad, ctx.saved[1]); });
      ctx.input(1, [&] { return raw::mul(ctx.grad, ctx.saved[0]); });
      ctx.input(2, [&] { return ctx.grad; });
    });
  };
  {
    Tape tape;
    tape.watch(b);
    Tensor y = scale_shift(x, b, Tensor());
    EXPECT_THAT(format_tape(tape), HasSubstr("%0 (3,), none"));
    EXPECT_EQ(values(tape.gradient(sum(y), {b})[0]), values(x));
  }
  // The op's name is copied when the node is recorded.
  {
    Tape tape;
    tape.watch(x);
    std::string name(40, 'n');
    record(name.c_str(), raw::mul_scalar(x, 2), {x}, {},
           [](Backward& ctx) { ctx.input(0, [&] { return raw::mul_scalar(ctx.grad, 2); }); });
    name.assign(40, 'x');
    EXPECT_EQ(tape.nodes()[0].op, std::string(40, 'n'));
  }
}

// ---- value_and_grad ----

TEST(AutodiffValueAndGrad, NamedTensorsWithAFloatParamAndABoolMask) {
  NamedTensors params;
  params.insert("w", from_vector({1.f, -2.f, 0.5f, 3.f, -0.25f, 2.f}, {2, 3}));
  params.insert("mask", from_vector(std::vector<bool>{true, false, true}, {3}));
  params.insert("b", from_vector(std::vector<double>{0.5, -1.5}, {2}));
  const Tensor x = from_vector({2.f, 1.f, -1.f}, {3, 1});

  // L = sum over kept columns of w^2 * x^T, plus sum(b^2) (b is float64: its own graph).
  auto loss_fn = [](const NamedTensors& p, const Tensor& x) {
    const Tensor& w = p.at("w");
    Tensor xt = reshape(x, {1, 3});
    Tensor masked = where(p.at("mask"), w * w * xt, zeros({1}));
    return sum(masked) + to_dtype(sum(square(p.at("b"))), DType::f32);
  };
  auto [value, grads] = value_and_grad(loss_fn)(params, x);

  // Closed forms: dL/dw = 2 w x^T on kept columns, 0 elsewhere; dL/db = 2b.
  const std::vector<float> w = params.at("w").to_vector<float>();
  const float xs[3] = {2, 1, -1};
  const bool keep[3] = {true, false, true};
  double want_loss = 0.5 * 0.5 + 1.5 * 1.5;
  std::vector<double> want_gw(6);
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j) {
      const double wij = w[i * 3 + j];
      if (keep[j]) want_loss += wij * wij * xs[j];
      want_gw[i * 3 + j] = keep[j] ? 2 * wij * xs[j] : 0.0;
    }
  EXPECT_EQ(value.dim(), 0);
  EXPECT_EQ(value.item(), want_loss);  // dyadic values: exact
  ASSERT_EQ(grads.size(), 2u);
  EXPECT_TRUE(grads.contains("w"));
  EXPECT_TRUE(grads.contains("b"));
  EXPECT_FALSE(grads.contains("mask"));
  EXPECT_EQ(grads[0].first, "w");  // parameter order is kept
  EXPECT_EQ(grads[1].first, "b");
  EXPECT_EQ(grads.at("w").shape(), (Shape{2, 3}));
  EXPECT_EQ(grads.at("w").dtype(), DType::f32);
  EXPECT_EQ(values(grads.at("w")), want_gw);
  EXPECT_EQ(grads.at("b").shape(), (Shape{2}));
  EXPECT_EQ(grads.at("b").dtype(), DType::f64);
  EXPECT_EQ(values(grads.at("b")), (std::vector<double>{1, -3}));
  // The value is detached, and the parameters are untouched.
  EXPECT_EQ(value.impl().tape_slot, -1);
  EXPECT_EQ(params.at("w").to_vector<float>(), w);
}

// Parameters the loss is not computed from are named; one whose gradient is zero by arithmetic
// (multiplied by zeros) is not, nor is a bool tensor, which is not trainable.
TEST(AutodiffValueAndGrad, UnusedParametersAreNamed) {
  NamedTensors params;
  params.insert("w", from_vector({1.f, 2.f}, {2}));
  params.insert("forgotten", from_vector({3.f}, {1}));
  params.insert("off", from_vector({-1.f, -2.f}, {2}));  // times zeros
  params.insert("mask", from_vector(std::vector<bool>{true, false}, {2}));
  auto loss_fn = [](const NamedTensors& p) {
    return sum(square(p.at("w")) + p.at("off") * zeros({2}));
  };
  EXPECT_EQ(unused_parameters(loss_fn)(params), std::vector<std::string>{"forgotten"});
  auto [value, grads] = value_and_grad(loss_fn)(params);
  EXPECT_EQ(values(grads.at("forgotten")), std::vector<double>{0});
  EXPECT_EQ(values(grads.at("off")), (std::vector<double>{0, 0}));

  // A loss computed from none of them (a constant) names all of them.
  auto constant = [](const NamedTensors&) { return scalar(1.f); };
  EXPECT_EQ(unused_parameters(constant)(params),
            (std::vector<std::string>{"w", "forgotten", "off"}));
  // depends_on answers for tensors on its tape only.
  Tape tape;
  const Tensor x = from_vector({1.f}, {1});
  EXPECT_EQ(test::error_of([&] { tape.depends_on(x, {x}); }),
            "Tape::depends_on: a tensor of shape (1,) is not on this tape");
}

TEST(AutodiffValueAndGrad, SingleTensorAndRepeatedCalls) {
  Tensor x = from_vector(std::vector<double>{1, 2, 3}, {3});
  auto f = [](const Tensor& t) { return mean(t * t); };
  for (int call = 0; call < 2; ++call) {  // a fresh tape each call
    auto [value, grads] = value_and_grad(f)(x);
    EXPECT_NEAR(value.item(), 14.0 / 3, 1e-15);
    ASSERT_EQ(grads.size(), 1u);
    EXPECT_EQ(grads[0].first, "");
    const std::vector<double> g = values(grads.at(""));
    ASSERT_EQ(g.size(), 3u);
    for (int i = 0; i < 3; ++i) EXPECT_NEAR(g[i], 2.0 * (i + 1) / 3, 1e-15);
  }
  EXPECT_EQ(Tape::active(), nullptr);
}

TEST(AutodiffValueAndGrad, TakesATemporaryModel) {
  // d/dw sum(w^3) = 3 w^2
  auto [value, grads] = value_and_grad([](const Tensor& w) { return sum(w * w * w); })(
      from_vector(std::vector<double>{-1, 2}, {2}));
  EXPECT_EQ(value.item(), 7.0);
  EXPECT_EQ(values(grads.at("")), (std::vector<double>{3, 12}));
}

TEST(AutodiffValueAndGrad, ANonScalarLossIsNamed) {
  Tensor w = from_vector(std::vector<double>{1, 2}, {2});
  EXPECT_THAT(error_of([&] { value_and_grad([](const Tensor& t) { return t * 2.0; })(w); }),
              HasSubstr("value_and_grad: the loss function must return a scalar, got shape (2,)"));
  EXPECT_EQ(Tape::active(), nullptr);
}

TEST(AutodiffValueAndGrad, TrainableParametersSkipNonFloat) {
  NamedTensors p;
  p.insert("a", zeros({2}));
  p.insert("flags", zeros({2}, DType::boolean));
  p.insert("c", zeros({1}, DType::f64));
  const NamedTensors t = trainable_parameters(p);
  ASSERT_EQ(t.size(), 2u);
  EXPECT_EQ(t[0].first, "a");
  EXPECT_EQ(t[1].first, "c");
  EXPECT_TRUE(t.at("a").shares_storage_with(p.at("a")));
}

// ---- several threads ----

// An op on another thread is recorded by that thread's tape (here none), never by the tape that
// recorded its input: sin(x^2) got a gradient of 0. Refused while that tape can still record.
TEST(AutodiffThreads, AValueOfAnotherThreadsTapeIsRefused) {
  Tensor x = from_vector(std::vector<double>{0.5, 1.0}, {2});
  const auto on_another_thread = [](const auto& f) {
    std::string error = "(no mmdit::Error thrown)";
    std::thread([&] {
      try {
        f();
      } catch (const Error& e) {
        error = e.what();
      }
    }).join();
    return error;
  };
  Tensor h;
  {
    Tape tape;
    tape.watch(x);
    h = x * x;
    EXPECT_THAT(on_another_thread([&] { sin(h); }),
                HasSubstr("sin: input 0 (2,) was recorded by a tape that is still recording on "
                          "another thread"));
    EXPECT_THAT(on_another_thread([&] {
                  Tape own;
                  sin(h);
                }),
                HasSubstr("still recording on another thread"));
    // The watched parameters themselves are shared on purpose (several threads may read one
    // model), and a stop_gradient view says no gradient is wanted.
    EXPECT_EQ(on_another_thread([&] { sin(x); }), "(no mmdit::Error thrown)");
    EXPECT_EQ(on_another_thread([&] { sin(stop_gradient(h)); }), "(no mmdit::Error thrown)");
    tape.gradient(sum(h), {x});
    // Once gradient() has run the tape records nothing more: h is a constant.
    EXPECT_EQ(on_another_thread([&] { sin(h); }), "(no mmdit::Error thrown)");
  }
  EXPECT_EQ(on_another_thread([&] { sin(h); }), "(no mmdit::Error thrown)");
}

// Data parallelism: threads each record a tape of their own over one model's parameters, the
// same tensors. Watching a parameter must not write into it: when its slot was stored there,
// the threads overwrote each other's and gradient() read a slot of another tape, or -1.
TEST(AutodiffThreads, TapesOnSeveralThreadsShareTheParameters) {
  NamedTensors params;
  params.insert("w", from_vector(std::vector<double>{0.5, -1, 1.5, 2, -0.25, 0.75, 1, -2, 0.125, 3,
                                                     -1.5, 0.5, 1, 0.25, -0.75, 2.5},
                                 {4, 4}));
  params.insert("b", from_vector(std::vector<double>{0.5, -0.5, 1, 0.25}, {4}));
  const Tensor x =
      from_vector(std::vector<double>{1, -2, 0.5, 3, 0.25, 1, -1, 2, -0.5, 1.5, 2, -3}, {3, 4});
  auto loss_fn = [&x](const NamedTensors& p) {
    const Tensor &w = p.at("w"), &b = p.at("b");
    // contiguous(w) returns w itself: the tape must record a view of it, never mark w.
    return sum(square(matmul(x, w) + b)) + sum(contiguous(w) * w) + mean(b * b * b);
  };
  const ValueAndGrad want = value_and_grad(loss_fn)(params);

  constexpr int kThreads = 4, kCalls = 500;
  std::vector<int> mismatches(kThreads, 0);
  std::vector<std::string> errors(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      try {
        for (int call = 0; call < kCalls; ++call) {
          const ValueAndGrad got = value_and_grad(loss_fn)(params);
          if (values(got.value) != values(want.value) ||
              values(got.grads.at("w")) != values(want.grads.at("w")) ||
              values(got.grads.at("b")) != values(want.grads.at("b")))
            ++mismatches[t];
        }
      } catch (const std::exception& e) {
        errors[t] = e.what();
      }
    });
  for (std::thread& thread : threads) thread.join();
  for (int t = 0; t < kThreads; ++t) {
    EXPECT_EQ(errors[t], "") << "thread " << t;
    EXPECT_EQ(mismatches[t], 0) << "thread " << t << " of " << kCalls << " calls";
  }
}

}  // namespace
}  // namespace mmdit
