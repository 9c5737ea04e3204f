#include "autodiff/tape.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <unordered_set>

#include "tensor/ops.h"

namespace mmdit {
namespace {

thread_local Tape* g_active = nullptr;
// The ids of the tapes alive whose gradient() has not run: those that may still record.
struct RecordingTapes {
  std::mutex mutex;
  std::unordered_set<uint64_t> ids;
};
RecordingTapes& recording_tapes() {
  static RecordingTapes tapes;
  return tapes;
}
void stop_recording(uint64_t id) {
  RecordingTapes& r = recording_tapes();
  const std::lock_guard lock(r.mutex);
  r.ids.erase(id);
}
thread_local std::string g_scope;
thread_local bool g_anomaly = false;
std::atomic<uint64_t> g_next_tape_id{1};

// The first NaN or Inf of t as "NaN at (1,2)", or "" if every element is finite.
std::string describe_non_finite(const Tensor& t) {
  const std::optional<NonFinite> bad = first_non_finite(t);
  if (!bad) return "";
  return str_cat(std::isnan(bad->value) ? "NaN"
                 : bad->value > 0       ? "+Inf"
                                        : "-Inf",
                 " at ", shape_str(bad->index));
}

std::string describe_inputs(const Node& node) {
  std::string s;
  for (const NodeInput& in : node.inputs) {
    if (!s.empty()) s += ", ";
    s += in.absent ? std::string("none")
                   : str_cat(in.slot >= 0 ? str_cat("%", in.slot) : std::string("const"), " ",
                             shape_str(in.shape));
  }
  return s;
}

std::string where_recorded(const Node& node, size_t index) {
  return str_cat("node ", index, ", recorded in scope '",
                 node.scope.empty() ? "<root>" : node.scope, "'");
}

// Whether broadcasting `to` can give `from`, so that raw::sum_to(g, to) undoes it.
bool reduces_to(const Shape& from, const Shape& to) {
  if (from.size() < to.size()) return false;
  const size_t lead = from.size() - to.size();
  for (size_t i = 0; i < to.size(); ++i)
    if (to[i] != 1 && to[i] != from[lead + i]) return false;
  return true;
}

// acc += g. In place when nothing else can see acc (no other handle to it or to its memory), as
// PyTorch's InputBuffer does: an input used k times otherwise costs k - 1 fresh tensors.
void accumulate(Tensor& acc, const Tensor& g) {
  if (!acc.defined()) {
    acc = g;
    return;
  }
  // Both terms already have the input's shape (Backward::input sums each down to it).
  const bool sole_owner = acc.impl_ptr().use_count() == 1 && acc.impl().storage.use_count() == 1;
  if (sole_owner && acc.is_contiguous())
    raw::add_into(acc, g);
  else
    acc = raw::add(acc, g);
}

// PyTorch's version-counter check: backward would silently compute from the new values.
void check_saved_unchanged(const Node& node, size_t index) {
  for (size_t i = 0; i < node.saved.size(); ++i) {
    const Tensor& t = node.saved[i];
    if (!t.defined()) continue;
    MMDIT_CHECK(node.saved_storages[i].lock() == t.impl().storage, "gradient: ", node.op, " (",
                where_recorded(node, index), ") saved a ", shape_str(t.shape()), " ",
                dtype_name(t.dtype()), " tensor for its backward (saved tensor ", i,
                "), and its storage was replaced after the op ran (by Module::to, or a load that "
                "changed its dtype); its gradient would be computed from the new values. Convert "
                "a model before recording, or record the computation again on a new Tape");
    const uint64_t now = t.impl().storage->version();
    MMDIT_CHECK(now == node.saved_versions[i], "gradient: ", node.op, " (",
                where_recorded(node, index), ") saved a ", shape_str(t.shape()), " ",
                dtype_name(t.dtype()), " tensor for its backward (saved tensor ", i,
                "), and it was changed in place after the op ran (its storage's version went from ",
                node.saved_versions[i], " to ", now,
                ": by copy_into, add_into, an optimiser or EMA step, or mark_changed()); its "
                "gradient would be computed from the new values. Change tensors only after "
                "gradient(), or record the computation again on a new Tape");
  }
}

}  // namespace

// Mistakes in a backward written with record() surface here; the messages name the op, not a
// kernel that would fail later, far from the cause.
void Backward::fail_input_index(size_t i) const {
  fail(node_.op, ": its backward sets the gradient of input ", i, ", but the op was recorded with ",
       node_.inputs.size(), node_.inputs.size() == 1 ? " input" : " inputs");
}

const Tensor& SavedTensors::operator[](size_t i) const {
  MMDIT_CHECK(i < node_.saved.size(), node_.op, ": its backward reads saved tensor ", i,
              ", but the op saved ", node_.saved.size(),
              node_.saved.size() == 1 ? " tensor" : " tensors",
              "; pass what the backward reads in record()'s `saved`");
  return node_.saved[i];
}
size_t SavedTensors::size() const {
  return node_.saved.size();
}
std::span<const Tensor> SavedTensors::all() const {
  return node_.saved;
}

void Backward::set_input_grad(size_t i, const Tensor& g) {
  MMDIT_CHECK(!input_grads_[i].defined(), node_.op, ": its backward sets the gradient of input ", i,
              " twice; give each input one gradient, the sum of its terms");
  const Shape& shape = node_.inputs[i].shape;
  const DType dtype = node_.inputs[i].dtype;
  MMDIT_CHECK(g.defined() && g.dtype() == dtype && reduces_to(g.shape(), shape), node_.op,
              ": its backward gave input ", i, " (", shape_str(shape), " ", dtype_name(dtype),
              ") a gradient of ",
              g.defined() ? str_cat(shape_str(g.shape()), " ", dtype_name(g.dtype()))
                          : std::string("undefined tensor"),
              "; it must have the input's dtype, and its shape or a broadcast of it");
  input_grads_[i] = g.shape() == shape ? g : raw::sum_to(g, shape);
}

Tape::Tape() : id_(g_next_tape_id++), previous_(g_active) {
  {
    RecordingTapes& r = recording_tapes();
    const std::lock_guard lock(r.mutex);
    r.ids.insert(id_);
  }
  g_active = this;
}
Tape::~Tape() {
  if (g_active != this) {
    // Tapes nest like scopes; another order would leave the active tape pointing at a dead one.
    std::fprintf(stderr, "mmdit: a Tape ended while a tape it encloses was still active\n");
    std::abort();
  }
  g_active = previous_;
  if (!consumed_) stop_recording(id_);
}
Tape* Tape::active() {
  return g_active;
}

int64_t Tape::slot_of(const Tensor& t) const {
  if (!t.defined()) return -1;
  if (t.impl().tape_id == id_) return t.impl().tape_slot;
  const auto leaf = leaves_.find(t.impl_ptr());
  return leaf != leaves_.end() ? leaf->second : -1;
}
bool Tape::is_on_tape(const Tensor& t) const {
  return slot_of(t) >= 0;
}

void Tape::watch(const Tensor& t) {
  MMDIT_CHECK(t.defined(), "Tape::watch: undefined tensor");
  MMDIT_CHECK(is_floating(t.dtype()), "Tape::watch: only float tensors can be differentiated, got ",
              dtype_name(t.dtype()), " of shape ", shape_str(t.shape()));
  MMDIT_CHECK(!consumed_, "Tape::watch: this tape's gradient() has already run");
  if (is_on_tape(t)) return;
  // Ops run while this tape is active are recorded here only: an enclosing tape that holds t
  // would leave them out of its gradients without a word.
  for (const Tape* outer = previous_; outer; outer = outer->previous_)
    MMDIT_CHECK(!outer->is_on_tape(t), "Tape::watch: the tensor of shape ", shape_str(t.shape()),
                " is already on an enclosing tape; a nested tape cannot watch it too (the ops run "
                "while the nested tape is active would be missing from the enclosing tape's "
                "gradients)");
  leaves_.emplace(t.impl_ptr(), num_values_++);
}

void Tape::refuse_inputs_on(const Tape* outer, const char* op, std::span<const Tensor> inputs) {
  for (; outer; outer = outer->previous_)
    for (size_t i = 0; i < inputs.size(); ++i)
      // After its gradient() a tape records nothing more: its values are constants.
      MMDIT_CHECK(outer->consumed_ || !outer->is_on_tape(inputs[i]), op, ": input ", i, " ",
                  shape_str(inputs[i].shape()),
                  " is on an enclosing tape, but a nested tape is active and only the active "
                  "tape records: the enclosing tape's gradients would leave this op out. Compute "
                  "it after the nested tape ends, or on stop_gradient(input) if no gradient "
                  "should flow through it");
}

Tensor Tape::append(Node node, Tensor out, std::span<const Tensor> inputs) {
  MMDIT_CHECK(!running_backward_, node.op, ": an autodiff op ran inside the backward of ",
              running_backward_ ? running_backward_->op : "",
              "; a backward computes with the raw:: kernels (tensor/ops.h), which are not "
              "recorded");
  MMDIT_CHECK(!consumed_, node.op, ": recording on a tape whose gradient() has already run");
  // An op that returns an input unchanged (contiguous() of a contiguous tensor) hands back that
  // input's TensorImpl: a watched parameter other threads read, or a constant, perhaps another
  // tape's. The result gets a handle of its own, so that slots stay unique and the tape writes
  // only into tensors its op made.
  const bool is_an_input = std::any_of(inputs.begin(), inputs.end(), [&](const Tensor& in) {
    return in.defined() && in.impl_ptr() == out.impl_ptr();
  });
  if (is_an_input || is_on_tape(out))
    out = make_view(out, out.shape(), out.strides(), out.offset());
  if (g_anomaly) {
    const std::string bad = describe_non_finite(out);
    MMDIT_CHECK(bad.empty(), "anomaly mode: ", node.op, " (", where_recorded(node, nodes_.size()),
                ") produced ", bad, " in its output ", shape_str(out.shape()), " ",
                dtype_name(out.dtype()), "; inputs: ", describe_inputs(node));
  }
  if (profiling_) {
    const auto now = std::chrono::steady_clock::now();
    node.forward_seconds = std::chrono::duration<double>(now - last_record_).count();
    last_record_ = now;
    const int64_t flops = raw::matmul_flops();
    node.forward_flops = flops - last_flops_;
    last_flops_ = flops;
  }
  node.output = num_values_++;
  node.output_shape = out.shape();
  node.dtype = out.dtype();
  out.impl().tape_id = id_;
  out.impl().tape_slot = node.output;
  nodes_.push_back(std::move(node));
  return out;
}

void Tape::set_profiling(bool on) {
  profiling_ = on;
  last_record_ = std::chrono::steady_clock::now();
  last_flops_ = raw::matmul_flops();
}

size_t Tape::saved_bytes() const {
  size_t total = 0;
  for (const Node& n : nodes_) total += n.saved_bytes;
  return total;
}

Tape::SavedMemory Tape::saved_memory() const {
  std::unordered_set<const Storage*> leaf_storages, counted;
  for (const auto& [impl, slot] : leaves_) leaf_storages.insert(impl->storage.get());
  SavedMemory memory;
  for (const Node& n : nodes_)
    for (const Tensor& t : n.saved) {
      if (!t.defined()) continue;
      const Storage* storage = t.impl().storage.get();
      if (counted.insert(storage).second)
        (leaf_storages.contains(storage) ? memory.leaves : memory.other) += storage->bytes();
    }
  return memory;
}

void Tape::check_gradient_args(const Tensor& y, const std::vector<Tensor>& wrt,
                               const Tensor& cotangent) const {
  MMDIT_CHECK(!consumed_,
              "gradient: this tape's gradient() has already run and released what backward "
              "needs; record the computation again on a new Tape");
  MMDIT_CHECK(y.defined(), "gradient: the output is an undefined tensor");
  MMDIT_CHECK(is_floating(y.dtype()), "gradient: the output must be float, got ",
              dtype_name(y.dtype()));
  // A y no tape recorded (tape_id 0) is a constant and rightly gets zeros; a y recorded on
  // another tape would get zeros too, silently, though it does depend on what that tape watched.
  MMDIT_CHECK(is_on_tape(y) || y.impl().tape_id == 0, "gradient: the output ", shape_str(y.shape()),
              " was recorded on another tape, not this one; compute it while this tape is "
              "active");
  if (cotangent.defined()) {
    MMDIT_CHECK(cotangent.shape() == y.shape() && cotangent.dtype() == y.dtype(),
                "gradient: cotangent ", shape_str(cotangent.shape()), " ",
                dtype_name(cotangent.dtype()), " does not match the output ", shape_str(y.shape()),
                " ", dtype_name(y.dtype()));
  } else {
    MMDIT_CHECK(y.numel() == 1, "gradient: the output has shape ", shape_str(y.shape()),
                "; a non-scalar output needs a cotangent");
  }
  for (size_t i = 0; i < wrt.size(); ++i) {
    MMDIT_CHECK(wrt[i].defined(), "gradient: input ", i, " is an undefined tensor");
    MMDIT_CHECK(is_on_tape(wrt[i]), "gradient: input ", i, " (shape ", shape_str(wrt[i].shape()),
                ") was neither watched nor computed on this tape",
                wrt[i].impl().tape_id != 0 ? " (it is from another tape)" : "");
  }
}

std::vector<bool> Tape::slots_needing_gradients(const std::vector<bool>& is_wrt) const {
  // A value needs a gradient when a path leads to it from a wrt tensor: its gradient is part of
  // theirs. The nodes are in recording order, so one forward pass finds every such path.
  std::vector<bool> needed = is_wrt;
  for (const Node& n : nodes_)
    for (const NodeInput& in : n.inputs)
      if (in.slot >= 0 && needed[in.slot]) needed[n.output] = true;
  return needed;
}

std::vector<bool> Tape::depends_on(const Tensor& y, const std::vector<Tensor>& wrt) const {
  for (const Tensor& w : wrt)
    MMDIT_CHECK(slot_of(w) >= 0, "Tape::depends_on: a tensor of shape ", shape_str(w.shape()),
                " is not on this tape");
  // Backwards from y: a value reaches y when it is an input of a node whose output does.
  std::vector<bool> reaches(num_values_, false);
  if (const int64_t y_slot = slot_of(y); y_slot >= 0) reaches[y_slot] = true;
  for (size_t index = nodes_.size(); index-- > 0;)
    if (reaches[nodes_[index].output])
      for (const NodeInput& in : nodes_[index].inputs)
        if (in.slot >= 0) reaches[in.slot] = true;
  std::vector<bool> result;
  for (const Tensor& w : wrt) result.push_back(reaches[slot_of(w)]);
  return result;
}

void Tape::run_backward(Node& node, size_t index, const Tensor& g, const std::vector<bool>& needed,
                        std::vector<Tensor>& grads) {
  std::vector<bool> needs(node.inputs.size());
  bool any = false;
  for (size_t i = 0; i < node.inputs.size(); ++i)
    any |= needs[i] = node.inputs[i].slot >= 0 && needed[node.inputs[i].slot];
  if (!any) return;
  check_saved_unchanged(node, index);
  Backward ctx(node, g, needs);
  const auto started =
      profiling_ ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point();
  const int64_t flops_before = profiling_ ? raw::matmul_flops() : 0;
  const uint64_t grad_version = g.impl().storage->version();
  {
    struct Running {
      const Node*& slot;
      ~Running() { slot = nullptr; }
    } running{running_backward_ = &node};
    node.backward(ctx);
  }
  // The incoming gradient may be the caller's cotangent or another node's gradient too.
  MMDIT_CHECK(g.impl().storage->version() == grad_version, "gradient: the backward of ", node.op,
              " (", where_recorded(node, index),
              ") changed its incoming gradient (ctx.grad) in place; other nodes or the "
              "caller's cotangent may share it, so a backward must write its results into "
              "new tensors");
  if (profiling_) {
    node.backward_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    node.backward_flops = raw::matmul_flops() - flops_before;
  }
  for (size_t i = 0; i < node.inputs.size(); ++i) {
    const Tensor& gi = ctx.input_grads()[i];
    if (!needs[i]) continue;
    // Left unset, the input's gradient would be a silent zero: a backward that forgot it.
    MMDIT_CHECK(gi.defined(), "gradient: the backward of ", node.op, " (",
                where_recorded(node, index), ") gave no gradient to its input ", i, " (%",
                node.inputs[i].slot, " ", shape_str(node.inputs[i].shape),
                "), which needs one; set it with ctx.input(", i,
                ", ...), with zeros where that is its gradient");
    if (g_anomaly) {
      const std::string bad = describe_non_finite(gi);
      // Every gradient reaching this node was checked when it was made, so the first
      // non-finite one is pinned on the backward that made it, not on a later consumer.
      MMDIT_CHECK(bad.empty(), "anomaly mode: the backward of ", node.op, " (",
                  where_recorded(node, index), ") produced ", bad, " in the gradient of its input ",
                  i, " (", node.inputs[i].slot >= 0 ? str_cat("%", node.inputs[i].slot) : "const",
                  " ", shape_str(node.inputs[i].shape), "); output %", node.output, " ",
                  shape_str(node.output_shape), ", inputs: ", describe_inputs(node));
    }
    accumulate(grads[node.inputs[i].slot], gi);
  }
}

namespace {

// Backward's saved tensors go as soon as it has run: the peak memory of a step is the forward's.
void release_saved(Node& node) {
  node.saved.clear();
  node.saved.shrink_to_fit();
  node.saved_versions = {};
  node.saved_storages = {};
  node.saved_bytes = 0;
  node.backward = nullptr;
}

// Backwards that pass their gradient through (add, contiguous, the gated residual's x) can hand
// one tensor to several inputs, or hand on the caller's cotangent: every returned gradient
// gets memory of its own, so scaling one in place (clip_by_global_norm) changes no other.
std::vector<Tensor> own_gradients(const std::vector<Tensor>& wrt,
                                  const std::vector<Tensor>& grads_of_wrt,
                                  const Tensor& cotangent) {
  std::vector<Tensor> out;
  for (size_t i = 0; i < wrt.size(); ++i) {
    const Tensor& g = grads_of_wrt[i];
    if (!g.defined()) {
      out.push_back(zeros(wrt[i].shape(), wrt[i].dtype()));
      continue;
    }
    Tensor own = raw::contiguous(g);
    const bool shared = (cotangent.defined() && own.shares_storage_with(cotangent)) ||
                        std::any_of(out.begin(), out.end(),
                                    [&](const Tensor& o) { return own.shares_storage_with(o); });
    out.push_back(shared ? raw::clone(own) : std::move(own));
  }
  return out;
}

}  // namespace

std::vector<Tensor> Tape::gradient(const Tensor& y, const std::vector<Tensor>& wrt,
                                   const Tensor& cotangent) {
  check_gradient_args(y, wrt, cotangent);
  consumed_ = true;
  stop_recording(id_);

  std::vector<bool> is_wrt(num_values_, false);
  for (const Tensor& w : wrt) is_wrt[slot_of(w)] = true;
  const std::vector<bool> needed = slots_needing_gradients(is_wrt);
  // grads[slot]: the gradient of sum(y * cotangent) with respect to that value, summed over its
  // uses. In reverse recording order every use of a value comes before the node that made it, so
  // its gradient is complete by the time that node's backward reads it.
  std::vector<Tensor> grads(num_values_);
  if (const int64_t y_slot = slot_of(y); y_slot >= 0)
    grads[y_slot] = cotangent.defined() ? cotangent : full(y.shape(), 1.0, y.dtype());
  for (size_t index = nodes_.size(); index-- > 0;) {
    Node& node = nodes_[index];
    // Moved out, so it is freed once this node is done, unless it is one of the results.
    const Tensor g = std::move(grads[node.output]);
    if (is_wrt[node.output]) grads[node.output] = g;
    if (g.defined()) run_backward(node, index, g, needed, grads);
    release_saved(node);
  }

  std::vector<Tensor> grads_of_wrt;
  for (const Tensor& w : wrt) grads_of_wrt.push_back(grads[slot_of(w)]);
  return own_gradients(wrt, grads_of_wrt, cotangent);
}

void set_anomaly_mode(bool on) {
  g_anomaly = on;
}
bool anomaly_mode() {
  return g_anomaly;
}
AnomalyMode::AnomalyMode(bool on) : previous_(g_anomaly) {
  g_anomaly = on;
}
AnomalyMode::~AnomalyMode() {
  g_anomaly = previous_;
}

NameScope::NameScope(const std::string& name) : previous_length_(g_scope.size()) {
  if (!g_scope.empty()) g_scope += '.';
  g_scope += name;
}
NameScope::~NameScope() {
  g_scope.resize(previous_length_);
}
const std::string& NameScope::current() {
  return g_scope;
}

void refuse_constant_on_tape(const char* op, const char* what, const Tensor& t) {
  if (!t.defined()) return;
  const Tensor one[] = {t};
  detail::refuse_other_threads_values(op, Tape::active(), one);
  for (const Tape* tape = Tape::active(); tape; tape = tape->enclosing())
    MMDIT_CHECK(tape->consumed() || !tape->is_on_tape(t), op, ": ", what, " ", shape_str(t.shape()),
                " is on a tape, but ", op,
                " takes it as a constant and gives it no gradient (it would silently be 0). "
                "Compute it off the tape or pass stop_gradient(",
                what, "); to differentiate it, use the plain ops this op fuses (autodiff/fused.h)");
}

namespace detail {

void refuse_other_threads_values(const char* op, const Tape* active,
                                 std::span<const Tensor> inputs) {
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].defined()) continue;
    const uint64_t id = inputs[i].impl().tape_id;
    if (id == 0) continue;
    bool ours = false;
    for (const Tape* t = active; t && !ours; t = t->enclosing()) ours = t->is_on_tape(inputs[i]);
    if (ours) continue;
    RecordingTapes& r = recording_tapes();
    std::unique_lock lock(r.mutex);
    if (!r.ids.contains(id)) continue;
    lock.unlock();
    fail(op, ": input ", i, " ", shape_str(inputs[i].shape()),
         " was recorded by a tape that is still recording on another thread; only the active "
         "tape of the thread running an op records it, so that tape's gradients would leave "
         "this op out. Run it on that tape's thread, or on stop_gradient(input) if no gradient "
         "should flow through it");
  }
}

bool any_on_tape(const Tape& tape, std::span<const Tensor> inputs) {
  for (const Tensor& t : inputs)
    if (tape.is_on_tape(t)) return true;
  return false;
}

Node make_node(const char* op, const Tape& tape, std::span<const Tensor> inputs,
               std::span<const Tensor> saved, BackwardFn backward) {
  Node node;
  node.op = op;
  for (const Tensor& t : inputs)
    node.inputs.push_back(t.defined() ? NodeInput{tape.slot_of(t), t.shape(), t.dtype()}
                                      : NodeInput{-1, {}, DType::f32, /*absent=*/true});
  node.saved.assign(saved.begin(), saved.end());
  for (const Tensor& t : saved) {
    node.saved_versions.push_back(t.defined() ? t.impl().storage->version() : 0);
    node.saved_storages.push_back(t.defined() ? t.impl().storage : nullptr);
    if (t.defined()) node.saved_bytes += t.nbytes();
  }
  node.backward = std::move(backward);
  node.scope = NameScope::current();
  return node;
}

}  // namespace detail

Tensor stop_gradient(const Tensor& x) {
  return make_view(x, x.shape(), x.strides(), x.offset());
}

}  // namespace mmdit
