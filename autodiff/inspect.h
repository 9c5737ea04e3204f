// Making the tape visible, for reading and debugging: a jaxpr-like listing of what was recorded,
// a Graphviz export of the same graph, and per-parameter gradient norms. Anomaly mode (the
// NaN/Inf hunt) lives in tape.h because it hooks into recording itself.
//
// Tape::gradient() releases each node's saved tensors as it goes, so format a tape before
// running backward if the "saved" column is what you want to see.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "autodiff/tape.h"
#include "tensor/named_tensors.h"

namespace mmdit {

// One line per node (index, op, output value %N with shape and dtype, input values with shapes
// or `const` for an untracked input, bytes saved for backward, NameScope), then totals: nodes,
// values, saved bytes, and a count and saved bytes per op type, most frequent first. Leaves
// found in leaf_names (a model's named_parameters(), say) appear as inputs under their names,
// shortened by the node's scope, and are only counted on the `leaves:` line. A watched tensor no
// node reads is not listed.
std::string format_tape(const Tape& tape, const NamedTensors& leaf_names = {});

// Graphviz DOT: an ellipse per leaf value (a watched tensor), a box per op labelled with the op
// and its output, value edges labelled with the value id and shape, ops clustered by NameScope
// (nested scopes nest). With backward_edges, a dashed red edge runs against every value edge:
// the path the gradient takes.
std::string tape_to_dot(const Tape& tape, bool backward_edges = false);

// Per op type, from a tape recorded with set_profiling(true) (and, for the backward column,
// after gradient()): count, forward and backward milliseconds, matrix-product GFLOP (forward
// 2*M*N*K per product; backward counts the two products of dA and dB), sorted by total time.
std::string format_profile(const Tape& tape);

// The L2 norm of every gradient, in order: the first thing to look at when a loss explodes or a
// layer stops learning.
std::vector<std::pair<std::string, double>> gradient_norms(const NamedTensors& grads);

}  // namespace mmdit
