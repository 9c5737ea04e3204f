// Tape-based reverse-mode autodiff.
//
// A Tape, while alive, is the active tape of its thread. Every differentiable op (autodiff/ops.h)
// computes its result with the raw kernels and then asks record() to append a Node, but only if
// one of its inputs is on the active tape: a tensor the user watched, or the result of an op
// that was itself recorded. With no tape, or no watched input, nothing is recorded and
// inference pays nothing.
//
// Tapes on different threads are independent, and may watch the same tensors: several threads
// can take gradients over one model's parameters at once. A tape therefore keeps the tensors it
// watches to itself and writes only into the results of the ops it records, which its own
// thread made.
//
// Tape::gradient walks the nodes backwards once, calling each node's backward function, which
// sits next to its forward (ops.cc; fused.cc and fused_attention.cc for the fused ops).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "tensor/tensor.h"

namespace mmdit {

class Backward;
using BackwardFn = std::function<void(Backward&)>;

// An op's input as recorded: backward checks the gradient it gives against shape and dtype.
struct NodeInput {
  int64_t slot;  // value slot; -1 for a constant
  Shape shape;
  DType dtype;
  bool absent = false;  // an undefined Tensor given for an optional input (a bias left out)
};

struct Node {
  std::string op;  // a copy: record() may be given a name built at run time
  std::vector<NodeInput> inputs;
  int64_t output;  // value slot of the result
  Shape output_shape;
  DType dtype;
  std::vector<Tensor> saved;  // what backward reads; released as soon as it has run
  // Each saved tensor's storage and its Storage::version() when the op ran: backward refuses to
  // read one that was changed in place since, or whose storage was replaced (Module::to).
  std::vector<uint64_t> saved_versions;
  std::vector<std::weak_ptr<Storage>> saved_storages;
  size_t saved_bytes = 0;
  BackwardFn backward;
  std::string scope;  // the NameScope active when the op ran, e.g. "blocks.0.joint_attn"
  // With Tape::set_profiling(true): wall time since the previous node was recorded (the op's
  // forward, plus any user code between ops), and of this node's backward.
  double forward_seconds = 0, backward_seconds = 0;
  // With profiling: the matrix-product FLOPs done in those spans (raw::matmul_flops()).
  int64_t forward_flops = 0, backward_flops = 0;
};

// The tensors an op saved, as its backward reads them: an index past them is an error naming the
// op, not a read past the end.
class SavedTensors {
 public:
  explicit SavedTensors(const Node& node) : node_(node) {}
  const Tensor& operator[](size_t i) const;
  size_t size() const;
  std::span<const Tensor> all() const;

 private:
  const Node& node_;
};

// What a node's backward function sees: the gradient of its output, the tensors it saved, and
// where to put the gradient of each input. The gradient and the saved tensors may be views
// (transposed, sliced, or broadcast with stride 0): the raw:: kernels read any layout, and a
// loop over data<T>() needs raw::contiguous() first. Every input that needs a gradient must be
// given one (zeros where that is the gradient), or Tape::gradient throws naming the op.
class Backward {
 public:
  Backward(const Node& node, const Tensor& grad, const std::vector<bool>& needs)
      : grad(grad), saved(node), node_(node), needs_(needs), input_grads_(needs.size()) {}

  const Tensor& grad;
  const SavedTensors saved;

  bool needs(size_t input) const { return needs_[input]; }
  // Sets the gradient of input i to compute() — called only if that input needs one — summed
  // down to the input's shape, which is the adjoint of broadcasting.
  template <class Compute>
  void input(size_t i, Compute&& compute) {
    if (i >= needs_.size()) fail_input_index(i);
    if (needs_[i]) set_input_grad(i, compute());
  }
  size_t num_inputs() const { return needs_.size(); }

 private:
  friend class Tape;  // takes the input gradients once the backward has set them
  std::vector<Tensor>& input_grads() { return input_grads_; }
  [[noreturn]] void fail_input_index(size_t i) const;
  void set_input_grad(size_t i, const Tensor& g);
  const Node& node_;
  const std::vector<bool>& needs_;
  std::vector<Tensor> input_grads_;
};

class Tape {
 public:
  Tape();   // becomes this thread's active tape (tapes nest like scopes; only the active records)
  ~Tape();  // the previous tape becomes active again
  Tape(const Tape&) = delete;
  Tape& operator=(const Tape&) = delete;

  static Tape* active();

  // Makes t a leaf of this tape: ops that use it are recorded.
  void watch(const Tensor& t);
  bool is_on_tape(const Tensor& t) const;

  // d(sum(y * cotangent)) / d(each of wrt). A scalar y needs no cotangent. Every wrt must be on
  // this tape; those y does not depend on get zeros (all of them if y was never recorded: it is
  // a constant). A parameter the forward never read (a tensor a module holds but did not
  // register, or reassigned after registering it) gets zeros the same way. A y recorded on another
  // tape is an error. Consumes the tape: saved tensors are released as backward goes, so gradient()
  // can run once.
  std::vector<Tensor> gradient(const Tensor& y, const std::vector<Tensor>& wrt,
                               const Tensor& cotangent = Tensor());
  // For each of wrt (on this tape), whether y was computed from it through recorded ops: those
  // it was not get zeros from gradient() by construction, not by arithmetic. Call it before
  // gradient(), which consumes the tape.
  std::vector<bool> depends_on(const Tensor& y, const std::vector<Tensor>& wrt) const;

  const std::vector<Node>& nodes() const { return nodes_; }
  // Times every node's forward and backward (Node::forward_seconds, backward_seconds).
  void set_profiling(bool on);
  bool profiling() const { return profiling_; }
  int64_t num_values() const { return num_values_; }
  size_t saved_bytes() const;  // held now, for backward: every tensor of every node
  // The memory those tensors hold, each storage once (two nodes may keep one tensor, or views of
  // one storage): the watched leaves' (parameters, which exist without the tape) apart from the
  // rest (activations and constants, which backward still needs).
  struct SavedMemory {
    size_t leaves = 0, other = 0;
  };
  SavedMemory saved_memory() const;

  // Used by record(): appends a node for out = op(inputs) and gives `out` its slot.
  Tensor append(Node node, Tensor out, std::span<const Tensor> inputs);
  // Used by record(): throws if an input is on an enclosing tape, which would get zeros through
  // this op without a word (only the active tape records).
  void refuse_enclosing_tapes_inputs(const char* op, std::span<const Tensor> inputs) const {
    if (previous_) refuse_inputs_on(previous_, op, inputs);
  }
  int64_t slot_of(const Tensor& t) const;
  // The tape that was active when this one was made, or null.
  const Tape* enclosing() const { return previous_; }
  // Whether gradient() has run: the tape records nothing more.
  bool consumed() const { return consumed_; }

 private:
  static void refuse_inputs_on(const Tape* outer, const char* op, std::span<const Tensor> inputs);
  // The three steps of gradient(), after these checks: which values need a gradient, then each
  // node's backward in reverse order, then the results.
  void check_gradient_args(const Tensor& y, const std::vector<Tensor>& wrt,
                           const Tensor& cotangent) const;
  std::vector<bool> slots_needing_gradients(const std::vector<bool>& is_wrt) const;
  // Node `index`'s backward for its output's gradient g, adding its inputs' gradients into grads.
  void run_backward(Node& node, size_t index, const Tensor& g, const std::vector<bool>& needed,
                    std::vector<Tensor>& grads);
  uint64_t id_;
  Tape* previous_;
  int64_t num_values_ = 0;
  // The watched tensors' slots: here, not in the tensors, which other threads' tapes may be
  // watching too. Holding the TensorImpl keeps its address from going to a new tensor that
  // would then pass for a leaf.
  std::unordered_map<std::shared_ptr<TensorImpl>, int64_t> leaves_;
  std::vector<Node> nodes_;
  bool consumed_ = false;
  const Node* running_backward_ = nullptr;  // the node whose backward gradient() is calling
  bool profiling_ = false;
  std::chrono::steady_clock::time_point last_record_;
  int64_t last_flops_ = 0;
};

// Names the ops recorded while it is alive (nested scopes join with '.'), so that printed
// tapes, profiles and anomaly reports say which part of the model an op belongs to.
class NameScope {
 public:
  explicit NameScope(const std::string& name);
  ~NameScope();
  static const std::string& current();

 private:
  size_t previous_length_;
};

// Anomaly mode, for hunting the op that first makes a NaN or Inf. While on (per thread), every
// recorded op's output is checked in forward, and every input gradient in Tape::gradient, and
// the first non-finite value throws an Error naming the op, its shapes, its NameScope and its
// node index. It costs a full pass over each tensor, so it is for debugging; off, the cost is
// one thread-local bool read per recorded op and per gradient in backward.
void set_anomaly_mode(bool on);
bool anomaly_mode();
// Turns anomaly mode on (or off) for its lifetime and then restores the previous setting.
class AnomalyMode {
 public:
  explicit AnomalyMode(bool on = true);
  ~AnomalyMode();
  AnomalyMode(const AnomalyMode&) = delete;
  AnomalyMode& operator=(const AnomalyMode&) = delete;

 private:
  bool previous_;
};

// For an op that takes `t` as a constant (a fused op's rotary tables): throws, naming op and
// `what`, if t is on the active tape or an enclosing one, where its gradient would silently be 0.
void refuse_constant_on_tape(const char* op, const char* what, const Tensor& t);

namespace detail {
bool any_on_tape(const Tape& tape, std::span<const Tensor> inputs);
// Throws if an input was recorded by a tape that is still recording and is neither `active` nor
// one it encloses: another thread's, which will never see this op.
void refuse_other_threads_values(const char* op, const Tape* active,
                                 std::span<const Tensor> inputs);
Node make_node(const char* op, const Tape& tape, std::span<const Tensor> inputs,
               std::span<const Tensor> saved, BackwardFn backward);
}  // namespace detail

// Appends the node for `out = op(inputs)` to the active tape if any input is on it, and returns
// `out` (now with a slot). `saved` are the tensors `backward` will read. An input may be an
// undefined Tensor (an optional one left out); it gets no gradient. Without a tape nothing is
// allocated: the backward closure is only wrapped when it is kept.
template <class F>
Tensor record(const char* op, Tensor out, std::span<const Tensor> inputs,
              std::span<const Tensor> saved, F&& backward) {
  Tape* tape = Tape::active();
  // A bool result (to_dtype(x, boolean)) has no gradient: recorded, the way back would turn the
  // incoming gradient into bools and back into ones.
  if (!is_floating(out.dtype())) return out;
  detail::refuse_other_threads_values(op, tape, inputs);
  if (!tape) return out;
  tape->refuse_enclosing_tapes_inputs(op, inputs);
  if (!detail::any_on_tape(*tape, inputs)) return out;
  return tape->append(
      detail::make_node(op, *tape, inputs, saved, BackwardFn(std::forward<F>(backward))),
      std::move(out), inputs);
}
template <class F>
Tensor record(const char* op, Tensor out, std::initializer_list<Tensor> inputs,
              std::initializer_list<Tensor> saved, F&& backward) {
  return record(op, std::move(out), std::span<const Tensor>(inputs.begin(), inputs.size()),
                std::span<const Tensor>(saved.begin(), saved.size()), std::forward<F>(backward));
}

// A view of x that is never recorded: gradients do not flow through it.
Tensor stop_gradient(const Tensor& x);

}  // namespace mmdit
