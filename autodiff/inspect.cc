#include "autodiff/inspect.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <set>

namespace mmdit {
namespace {

const char* short_dtype(DType t) {
  switch (t) {
    case DType::f32:
      return "f32";
    case DType::f64:
      return "f64";
    case DType::boolean:
      return "bool";
  }
  return "?";
}

std::string value_name(int64_t slot) {
  return slot >= 0 ? str_cat("%", slot) : "const";
}

std::string format_bytes(size_t n) {
  char buf[32];
  if (n < 1024)
    std::snprintf(buf, sizeof buf, "%zu B", n);
  else if (n < 1024 * 1024)
    std::snprintf(buf, sizeof buf, "%.1f KiB", n / 1024.0);
  else
    std::snprintf(buf, sizeof buf, "%.1f MiB", n / (1024.0 * 1024.0));
  return buf;
}

std::string pad(const std::string& s, size_t width) {
  return s.size() >= width ? s : s + std::string(width - s.size(), ' ');
}
std::string pad_left(const std::string& s, size_t width) {
  return s.size() >= width ? s : std::string(width - s.size(), ' ') + s;
}

// Values that some node reads but no node produced: the watched tensors, with the shape the
// first reader saw (leaves do not record their own shape).
std::map<int64_t, Shape> leaves_of(const Tape& tape) {
  std::set<int64_t> produced;
  for (const Node& n : tape.nodes()) produced.insert(n.output);
  std::map<int64_t, Shape> leaves;
  for (const Node& n : tape.nodes())
    for (const NodeInput& in : n.inputs)
      if (in.slot >= 0 && !produced.count(in.slot)) leaves.emplace(in.slot, in.shape);
  return leaves;
}

bool backward_has_run(const Tape& tape) {
  return !tape.nodes().empty() && !tape.nodes().back().backward;
}

std::string dot_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

}  // namespace

namespace {

// "leaves: %0 (2,3) %1 (3,); 4 parameters, shown by name ...": unnamed leaves listed, wrapped at
// 100 columns; named ones only counted.
std::string leaves_line(const std::map<int64_t, Shape>& leaves,
                        const std::map<int64_t, std::string>& names) {
  std::string out = "leaves:";
  size_t line_length = 7, named = 0;
  for (const auto& [slot, shape] : leaves) {
    if (names.count(slot)) {
      ++named;
      continue;
    }
    const std::string item = str_cat("%", slot, " ", shape_str(shape));
    if (line_length + item.size() + 1 > 100) {
      out += "\n       ";
      line_length = 7;
    }
    out += " " + item;
    line_length += item.size() + 1;
  }
  if (named > 0)
    out +=
        str_cat(line_length > 7 ? ";" : "", " ", named, named == 1 ? " parameter" : " parameters",
                ", shown by name (relative to the node's scope)");
  if (leaves.empty()) out += " none";
  return out + "\n";
}

// One row per node: # op output <- inputs saved scope, in aligned columns.
std::string node_table(const Tape& tape, const std::map<int64_t, std::string>& names) {
  // Named leaves (parameters) appear by name where they are used, relative to the node's scope
  // when they are inside it: blocks.0.to_cond.weight in scope blocks.0 is to_cond.weight. One
  // used elsewhere keeps its whole name (blocks.10.w in scope blocks.1 is not 0.w).
  auto value = [&](int64_t slot, const std::string& scope) {
    const auto found = names.find(slot);
    if (found == names.end()) return value_name(slot);
    const std::string& name = found->second;
    const bool inside = !scope.empty() && name.size() > scope.size() &&
                        name.compare(0, scope.size(), scope) == 0 && name[scope.size()] == '.';
    return inside ? name.substr(scope.size() + 1) : name;
  };
  std::vector<std::vector<std::string>> rows;
  rows.push_back({"#", "op", "output", "inputs", "saved", "scope"});
  const std::vector<Node>& nodes = tape.nodes();
  for (size_t k = 0; k < nodes.size(); ++k) {
    const Node& n = nodes[k];
    std::string inputs;
    for (const NodeInput& in : n.inputs)
      inputs += str_cat(inputs.empty() ? "" : ", ",
                        in.absent ? std::string("none")
                                  : str_cat(value(in.slot, n.scope), " ", shape_str(in.shape)));
    rows.push_back(
        {std::to_string(k), n.op,
         str_cat("%", n.output, " ", shape_str(n.output_shape), " ", short_dtype(n.dtype)), inputs,
         format_bytes(n.saved_bytes), n.scope});
  }
  std::vector<size_t> width(rows[0].size(), 0);
  for (const auto& row : rows)
    for (size_t c = 0; c < row.size(); ++c) width[c] = std::max(width[c], row[c].size());
  std::string out;
  for (const auto& row : rows) {
    std::string line;
    for (size_t c = 0; c < row.size(); ++c) {
      // Numbers align right so that digits line up; the last column needs no padding.
      if (c == 0 || c == 4)
        line += pad_left(row[c], width[c]);
      else
        line += c + 1 == row.size() ? row[c] : pad(row[c], width[c]);
      if (c + 1 < row.size()) line += c == 2 ? "  <- " : "  ";
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out += line + "\n";
  }
  return out;
}

// "totals: ..." and each op's count and saved bytes, most frequent first: that is where a model's
// time and memory usually go.
std::string op_totals(const Tape& tape, size_t num_leaves) {
  struct OpTotal {
    int64_t count = 0;
    size_t saved = 0;
  };
  std::map<std::string, OpTotal> by_op;
  for (const Node& n : tape.nodes()) {
    by_op[n.op].count++;
    by_op[n.op].saved += n.saved_bytes;
  }
  std::vector<std::pair<std::string, OpTotal>> ops(by_op.begin(), by_op.end());
  std::stable_sort(ops.begin(), ops.end(),
                   [](const auto& a, const auto& b) { return a.second.count > b.second.count; });
  std::string out =
      str_cat("totals: ", tape.nodes().size(), " nodes, ", tape.num_values(), " values (",
              num_leaves, " leaves), ", format_bytes(tape.saved_bytes()), " saved for backward\n");
  // Several per line: a model has a few dozen op types.
  std::string line;
  for (const auto& [op, t] : ops) {
    const std::string item = str_cat(op, " ", t.count, " x ", format_bytes(t.saved));
    if (!line.empty() && line.size() + item.size() + 2 > 100) {
      out += line + "\n";
      line.clear();
    }
    line += line.empty() ? "  " + item : ", " + item;
  }
  if (!line.empty()) out += line + "\n";
  // The saved column adds up what each node keeps. The memory behind it counts a tensor that two
  // nodes keep once, and sets apart the leaves' (parameters), which exist without the tape.
  if (tape.saved_bytes() > 0) {
    const Tape::SavedMemory memory = tape.saved_memory();
    out += str_cat("saved storages, each once, as allocated: ", format_bytes(memory.leaves),
                   " of leaves, ", format_bytes(memory.other), " other\n");
  }
  return out;
}

}  // namespace

std::string format_tape(const Tape& tape, const NamedTensors& leaf_names) {
  const std::map<int64_t, Shape> leaves = leaves_of(tape);
  std::map<int64_t, std::string> names;
  for (const auto& [name, t] : leaf_names)
    if (tape.is_on_tape(t)) names[tape.slot_of(t)] = name;
  std::string out = str_cat("tape: ", tape.nodes().size(), " nodes, ", tape.num_values(),
                            " values, ", format_bytes(tape.saved_bytes()), " saved for backward");
  if (backward_has_run(tape)) out += " (gradient() has run and released them)";
  return out + "\n" + leaves_line(leaves, names) + node_table(tape, names) +
         op_totals(tape, leaves.size());
}

std::string tape_to_dot(const Tape& tape, bool backward_edges) {
  const std::vector<Node>& nodes = tape.nodes();
  std::string out =
      "digraph tape {\n"
      "  rankdir=TB;\n"
      "  node [fontname=\"monospace\", fontsize=10];\n"
      "  edge [fontname=\"monospace\", fontsize=8];\n";
  for (const auto& [slot, shape] : leaves_of(tape))
    out +=
        str_cat("  v", slot, " [shape=ellipse, label=\"%", slot, "\\n", shape_str(shape), "\"];\n");

  // The scope tree: every dotted prefix of every scope is a potential cluster.
  std::map<std::string, std::vector<size_t>> direct;  // scope -> its nodes
  std::map<std::string, std::set<std::string>> children;
  for (size_t k = 0; k < nodes.size(); ++k) {
    const std::string& scope = nodes[k].scope;
    direct[scope].push_back(k);
    std::string child = scope;
    while (!child.empty()) {
      const size_t dot = child.rfind('.');
      const std::string parent = dot == std::string::npos ? "" : child.substr(0, dot);
      children[parent].insert(child);
      child = parent;
    }
  }
  int cluster_id = 0;
  std::function<void(const std::string&, int)> emit = [&](const std::string& scope, int depth) {
    // A scope with no ops of its own and one child adds nothing but a frame: skip it.
    const auto d = direct.find(scope);
    const bool has_nodes = d != direct.end() && !d->second.empty();
    const size_t n_children = children.count(scope) ? children[scope].size() : 0;
    const bool framed = !scope.empty() && (has_nodes || n_children > 1);
    const std::string indent(2 * depth + 2, ' ');
    if (framed)
      out += str_cat(indent, "subgraph cluster_", cluster_id++, " {\n", indent, "  label=\"",
                     dot_escape(scope), "\";\n", indent, "  style=rounded;\n");
    const std::string inner = framed ? indent + "  " : indent;
    if (has_nodes)
      for (size_t k : d->second)
        out += str_cat(inner, "n", k, " [shape=box, label=\"", dot_escape(nodes[k].op), "\\n%",
                       nodes[k].output, " ", shape_str(nodes[k].output_shape), " ",
                       short_dtype(nodes[k].dtype), "\"];\n");
    if (n_children)
      for (const std::string& c : children[scope]) emit(c, framed ? depth + 1 : depth);
    if (framed) out += indent + "}\n";
  };
  emit("", 0);

  std::map<int64_t, size_t> producer;
  for (size_t k = 0; k < nodes.size(); ++k) producer[nodes[k].output] = k;
  for (size_t k = 0; k < nodes.size(); ++k) {
    const Node& n = nodes[k];
    for (const NodeInput& in : n.inputs) {
      if (in.slot < 0) continue;  // constants carry no gradient and would only add clutter
      const auto p = producer.find(in.slot);
      const std::string from =
          p != producer.end() ? str_cat("n", p->second) : str_cat("v", in.slot);
      out += str_cat("  ", from, " -> n", k, " [label=\"%", in.slot, " ", shape_str(in.shape),
                     "\"];\n");
      if (backward_edges)
        out += str_cat("  n", k, " -> ", from,
                       " [style=dashed, color=red, constraint=false, label=\"d%", in.slot,
                       "\", fontcolor=red];\n");
    }
  }
  return out + "}\n";
}

std::vector<std::pair<std::string, double>> gradient_norms(const NamedTensors& grads) {
  std::vector<std::pair<std::string, double>> norms;
  for (const auto& [name, g] : grads) {
    double sq = 0;
    if (g.defined())
      for (double v : g.to_vector<double>()) sq += v * v;
    norms.emplace_back(name, std::sqrt(sq));
  }
  return norms;
}

std::string format_profile(const Tape& tape) {
  struct Row {
    std::string op;
    int64_t count = 0;
    double forward = 0, backward = 0, gflop_forward = 0, gflop_backward = 0;
  };
  std::map<std::string, Row> rows;
  for (const Node& n : tape.nodes()) {
    Row& r = rows[n.op];
    r.op = n.op;
    ++r.count;
    r.forward += n.forward_seconds;
    r.backward += n.backward_seconds;
    r.gflop_forward += static_cast<double>(n.forward_flops) * 1e-9;
    r.gflop_backward += static_cast<double>(n.backward_flops) * 1e-9;
  }
  std::vector<Row> sorted;
  Row total{"total"};
  for (auto& [op, r] : rows) {
    sorted.push_back(r);
    total.count += r.count;
    total.forward += r.forward;
    total.backward += r.backward;
    total.gflop_forward += r.gflop_forward;
    total.gflop_backward += r.gflop_backward;
  }
  std::sort(sorted.begin(), sorted.end(), [](const Row& a, const Row& b) {
    return a.forward + a.backward > b.forward + b.backward;
  });
  sorted.push_back(total);
  std::string out;
  char line[256];
  int op_width = 14;
  for (const Row& r : sorted) op_width = std::max(op_width, static_cast<int>(r.op.size()));
  std::snprintf(line, sizeof line, "%-*s %6s %11s %11s %7s %9s %9s %9s\n", op_width, "op", "count",
                "fwd ms", "bwd ms", "share", "fwd GFLOP", "bwd GFLOP", "GFLOP/s");
  out += line;
  const double all = std::max(total.forward + total.backward, 1e-12);
  for (const Row& r : sorted) {
    const double t = r.forward + r.backward;
    const double gflop = r.gflop_forward + r.gflop_backward;
    std::snprintf(
        line, sizeof line, "%-*s %6lld %11.3f %11.3f %6.1f%% %9.3f %9.3f %9s\n", op_width,
        r.op.c_str(), static_cast<long long>(r.count), 1e3 * r.forward, 1e3 * r.backward,
        100 * t / all, r.gflop_forward, r.gflop_backward,
        gflop > 0 && t > 0 ? std::to_string(static_cast<int64_t>(gflop / t)).c_str() : "");
    out += line;
  }
  return out;
}

}  // namespace mmdit
