#include "train/equinox.h"

#include <algorithm>

#include "tensor/error.h"
#include "tensor/file_io.h"
#include "train/npy.h"

namespace mmdit {
namespace {

// RMSNorm's eps in the reference (and nn::rms_norm's default), recorded with every RMSNorm.
constexpr double kRmsNormEps = 1e-6;

// Appends the leaves of each module in the order of the reference's dataclass fields. `ref` is
// the reference's path prefix, `ours` the prefix of our parameter names; inside stacked blocks
// `ours` holds "<i>" where the block index goes.
class LeafList {
 public:
  explicit LeafList(int64_t depth) : depth_(depth) {}

  void array(const std::string& ref, const std::string& ours) {
    const bool stacked = ours.find("<i>") != std::string::npos;
    leaves_.push_back({ref, EquinoxLeaf::Kind::array, expand(ours), stacked, 0});
  }
  void integer(const std::string& ref, int64_t value) {
    leaves_.push_back({ref, EquinoxLeaf::Kind::integer, {}, false, static_cast<double>(value)});
  }
  void real(const std::string& ref, double value) {
    leaves_.push_back({ref, EquinoxLeaf::Kind::real, {}, false, value});
  }

  // A Linear whose weight (and bias) the reference holds as a Sequential's second layer.
  void sequential_linear(const std::string& ref, const std::string& ours) {
    array(ref + "layers.1.weight", ours + "weight");
    array(ref + "layers.1.bias", ours + "bias");
  }
  void linear(const std::string& ref, const std::string& ours, bool bias = true) {
    array(ref + "weight", ours + "weight");
    if (bias) array(ref + "bias", ours + "bias");
  }
  void rms_norm(const std::string& ref, const std::string& ours, int64_t dim) {
    array(ref + "gamma", ours + "gamma");
    integer(ref + "dim", dim);
    real(ref + "eps", kRmsNormEps);
  }
  void feedforward(const std::string& ref, const std::string& ours, int64_t dim, int64_t mult) {
    linear(ref + "linear_in.", ours + "linear_in.", false);
    linear(ref + "linear_gate.", ours + "linear_gate.", false);
    linear(ref + "linear_out.", ours + "linear_out.", false);
    integer(ref + "dim", dim);
    integer(ref + "mult", mult);
  }
  void joint_attention(const std::string& ref, const std::string& ours,
                       const std::vector<int64_t>& dims, int64_t dim_head, int64_t heads) {
    const size_t M = dims.size();
    for (size_t m = 0; m < M; ++m)
      array(str_cat(ref, "to_qkv.", m, ".weight"), str_cat(ours, "to_qkv.", m, ".weight"));
    for (size_t m = 0; m < M; ++m)
      array(str_cat(ref, "to_out.", m, ".weight"), str_cat(ours, "to_out.", m, ".weight"));
    for (const char* norms : {"q_rmsnorms.", "k_rmsnorms."})
      for (size_t m = 0; m < M; ++m)
        rms_norm(str_cat(ref, norms, m, "."), str_cat(ours, norms, m, "."), dim_head);
    for (size_t m = 0; m < M; ++m) integer(str_cat(ref, "dim_inputs.", m), dims[m]);
    integer(ref + "dim_head", dim_head);
    integer(ref + "heads", heads);
  }

  std::vector<EquinoxLeaf> take() { return std::move(leaves_); }

 private:
  // "blocks.<i>.x" -> "blocks.0.x", ..., one name per block; any other name stays one.
  std::vector<std::string> expand(const std::string& ours) const {
    const size_t at = ours.find("<i>");
    if (at == std::string::npos) return {ours};
    std::vector<std::string> names;
    for (int64_t i = 0; i < depth_; ++i)
      names.push_back(ours.substr(0, at) + std::to_string(i) + ours.substr(at + 3));
    return names;
  }

  int64_t depth_;
  std::vector<EquinoxLeaf> leaves_;
};

void mmdit_leaves(const MMDiTConfig& c, const std::string& prefix, LeafList& l) {
  const size_t M = c.dim_modalities.size();
  for (size_t k = 0; k < c.timestep_embed_dims.size(); ++k) {
    const std::string te = str_cat(prefix, "timestep_embeds.", k, ".");
    l.linear(te + "linear1.", te + "linear1.");
    l.linear(te + "linear2.", te + "linear2.");
    l.integer(te + "dim_embed", c.timestep_embed_dims[k]);
    l.integer(te + "dim_out", c.dim_cond);
  }
  const std::string ref = prefix + "blocks.", ours = prefix + "blocks.<i>.";
  const auto layernorms = [&](const std::string& name) {
    for (size_t m = 0; m < M; ++m) {
      const std::string field = str_cat(name, ".", m, ".");
      l.sequential_linear(ref + field + "to_modulation.", ours + field + "to_modulation.");
      l.integer(ref + field + "dim", c.dim_modalities[m]);
    }
  };
  layernorms("attn_layernorms");
  l.joint_attention(ref + "joint_attn.", ours + "joint_attn.", c.dim_modalities, c.dim_head,
                    c.heads);
  layernorms("ff_layernorms");
  for (size_t m = 0; m < M; ++m)
    l.feedforward(str_cat(ref, "feedforwards.", m, "."), str_cat(ours, "feedforwards.", m, "."),
                  c.dim_modalities[m], c.ff_mult);
  l.sequential_linear(ref + "to_cond.", ours + "to_cond.");
  l.integer(ref + "num_modalities", static_cast<int64_t>(M));
  for (size_t m = 0; m < M; ++m) l.integer(str_cat(ref, "dim_modalities.", m), c.dim_modalities[m]);
  int64_t cumsum = 0;
  for (size_t m = 0; m < M; ++m)
    l.integer(str_cat(ref, "dim_cumsum.", m), cumsum += c.dim_modalities[m]);
  for (size_t m = 0; m < M; ++m) {
    const std::string fl = str_cat(prefix, "final_layers.", m, ".");
    l.sequential_linear(fl + "adaLN_modulation.", fl + "adaLN_modulation.");
    l.linear(fl + "linear_out.", fl + "linear_out.");
    l.integer(fl + "dim_in", c.dim_modalities[m]);
    l.integer(fl + "dim_out", c.dim_outs[m]);
  }
  for (size_t m = 0; m < M; ++m)
    l.integer(str_cat(prefix, "dim_modalities.", m), c.dim_modalities[m]);
  for (size_t m = 0; m < M; ++m) l.integer(str_cat(prefix, "dim_outs.", m), c.dim_outs[m]);
  l.integer(prefix + "num_conds", static_cast<int64_t>(c.timestep_embed_dims.size()));
}

void incontext_leaves(const InContextMMDiTConfig& c, LeafList& l) {
  const size_t M = c.dim_modalities.size();
  const auto norms = [&](const std::string& name) {
    for (size_t m = 0; m < M; ++m)
      l.rms_norm(str_cat("blocks.", name, ".", m, "."), str_cat("blocks.<i>.", name, ".", m, "."),
                 c.dim_modalities[m]);
  };
  norms("attn_norms");
  l.joint_attention("blocks.joint_attn.", "blocks.<i>.joint_attn.", c.dim_modalities, c.dim_head,
                    c.heads);
  norms("ff_norms");
  for (size_t m = 0; m < M; ++m)
    l.feedforward(str_cat("blocks.feedforwards.", m, "."),
                  str_cat("blocks.<i>.feedforwards.", m, "."), c.dim_modalities[m], c.ff_mult);
  l.integer("blocks.num_modalities", static_cast<int64_t>(M));
  for (size_t m = 0; m < M; ++m)
    l.integer(str_cat("blocks.dim_modalities.", m), c.dim_modalities[m]);
  for (size_t m = 0; m < M; ++m) {
    const std::string fl = str_cat("final_layers.", m, ".");
    l.rms_norm(fl + "rms_norm.", fl + "rms_norm.", c.dim_modalities[m]);
    l.linear(fl + "linear_out.", fl + "linear_out.");
    l.integer(fl + "dim_in", c.dim_modalities[m]);
    l.integer(fl + "dim_out", c.dim_outs[m]);
  }
  for (size_t m = 0; m < M; ++m) l.integer(str_cat("dim_modalities.", m), c.dim_modalities[m]);
  for (size_t m = 0; m < M; ++m) l.integer(str_cat("dim_outs.", m), c.dim_outs[m]);
}

void policy_leaves(const PolicyConfig& c, LeafList& l) {
  l.integer("n_obs_steps", c.n_obs_steps);
  l.integer("state_dim", c.state_dim);
  l.integer("horizon", c.horizon);
  l.integer("act_dim", c.act_dim);
  l.integer("hidden_size", c.hidden_size);
  l.real("sigma", c.sigma);
  l.linear("state_encoder.", "state_encoder.");
  l.linear("action_encoder.", "action_encoder.");
  l.array("state_pos_embed", "state_pos_embed");
  l.array("action_pos_embed", "action_pos_embed");
  mmdit_leaves(mmdit_config(c), "mmdit.", l);
}

// A file of consecutive .npy records, their headers read and checked: each record's values are
// converted only once the caller has checked its dtype and shape (a crafted file's int8 array
// would otherwise become 8 times its size in float64 before anything refused it).
struct Records {
  std::string path, bytes;
  std::vector<NpyRecord> headers;  // value undefined
  std::vector<size_t> offsets;

  size_t size() const { return headers.size(); }
  const NpyRecord& operator[](size_t i) const { return headers[i]; }
  Tensor value(size_t i) const {
    return parse_npy_record(bytes.data() + offsets[i], headers[i].bytes,
                            str_cat(path, ": record ", i), /*whole=*/true)
        .value;
  }
};

Records read_records(const std::string& path) {
  Records r{path, read_file(path), {}, {}};
  MMDIT_CHECK(!r.bytes.empty(), path, ": empty file, not an Equinox model (tree_serialise_leaves)");
  for (size_t offset = 0; offset < r.bytes.size(); offset += r.headers.back().bytes) {
    r.offsets.push_back(offset);
    r.headers.push_back(parse_npy_record(r.bytes.data() + offset, r.bytes.size() - offset,
                                         str_cat(path, ": record ", r.size()), /*whole=*/false,
                                         /*read_data=*/false));
  }
  return r;
}

bool is_float(const NpyRecord& r) {
  return r.descr.size() == 3 && r.descr[1] == 'f';
}
bool is_integer(const NpyRecord& r) {
  return r.descr.size() == 3 && (r.descr[1] == 'i' || r.descr[1] == 'u');
}

// Each record checked against its leaf; the arrays under our names (stacked ones split by
// block), in `dtype`. `model` holds every name with our shape.
NamedTensors match_leaves(const Records& records, const std::vector<EquinoxLeaf>& leaves,
                          const NamedTensors& model, DType dtype) {
  const std::string& path = records.path;
  MMDIT_CHECK(records.size() >= leaves.size(), path, ": the file holds ", records.size(),
              " records, but the model has ", leaves.size(), " leaves; the next would be ",
              leaves[records.size()].path,
              " (a model with other hyperparameters, or a truncated file?)");
  MMDIT_CHECK(records.size() == leaves.size(), path, ": the file holds ", records.size(),
              " records, but the model has ", leaves.size(), " leaves, the last ",
              leaves.back().path, " (a model with other hyperparameters?)");
  NamedTensors values;
  for (size_t i = 0; i < leaves.size(); ++i) {
    const EquinoxLeaf& leaf = leaves[i];
    const NpyRecord& r = records[i];
    const std::string where = str_cat(path, ": record ", i, " (", leaf.path, ")");
    if (leaf.kind != EquinoxLeaf::Kind::array) {
      const bool integer = leaf.kind == EquinoxLeaf::Kind::integer;
      MMDIT_CHECK(r.shape.empty() && (integer ? is_integer(r) : is_float(r)), where, ": holds a '",
                  r.descr, "' array of shape ", shape_str(r.shape), ", expected a Python ",
                  integer ? "int" : "float", " (a model with other hyperparameters?)");
      const double found = records.value(i).item();
      MMDIT_CHECK(found == leaf.value, where, ": is ", found, ", the model's is ", leaf.value,
                  ": build the model with the hyperparameters it was saved with");
      continue;
    }
    Shape shape = model.at(leaf.names[0]).shape();
    if (leaf.stacked) shape.insert(shape.begin(), static_cast<int64_t>(leaf.names.size()));
    MMDIT_CHECK(is_float(r), where, ": holds a '", r.descr, "' array of shape ", shape_str(r.shape),
                ", expected a float array of shape ", shape_str(shape));
    MMDIT_CHECK(
        r.shape == shape, where, ": has shape ", shape_str(r.shape), ", the model's is ",
        shape_str(shape),
        leaf.stacked ? str_cat(" (", leaf.names.size(), " blocks stacked)") : std::string());
    const Tensor v = raw::to_dtype(records.value(i), dtype);
    if (!leaf.stacked) {
      values.insert(leaf.names[0], v);
      continue;
    }
    for (size_t b = 0; b < leaf.names.size(); ++b)
      values.insert(leaf.names[b],
                    raw::clone(raw::squeeze(raw::narrow(v, 0, static_cast<int64_t>(b), 1), 0)));
  }
  return values;
}

// Every tensor a leaf can name: the parameters, then the buffers (the policy's position tables).
NamedTensors parameters_and_buffers(const nn::Module& model) {
  NamedTensors all = model.named_parameters();
  for (const auto& [name, t] : model.named_buffers()) all.insert(name, t);
  return all;
}

template <class Model>
void load_leaves(Model& model, const std::string& path, const std::vector<EquinoxLeaf>& leaves) {
  model.load(match_leaves(read_records(path), leaves, parameters_and_buffers(model), model.dtype()),
             /*buffers=*/true);
}

template <class Model>
void save_leaves(const Model& model, const std::string& path,
                 const std::vector<EquinoxLeaf>& leaves) {
  const NamedTensors values = parameters_and_buffers(model);
  std::string bytes;
  for (const EquinoxLeaf& leaf : leaves) {
    switch (leaf.kind) {
      case EquinoxLeaf::Kind::integer:
        bytes += serialize_npy_int64({static_cast<int64_t>(leaf.value)}, {});
        break;
      case EquinoxLeaf::Kind::real:
        bytes += serialize_npy(full({}, leaf.value, DType::f64));
        break;
      case EquinoxLeaf::Kind::array: {
        if (!leaf.stacked) {
          bytes += serialize_npy(values.at(leaf.names[0]));
          break;
        }
        std::vector<Tensor> blocks;
        for (const std::string& name : leaf.names) blocks.push_back(values.at(name));
        bytes += serialize_npy(raw::stack(blocks, 0));
        break;
      }
    }
  }
  write_file_atomically(path, bytes);
}

}  // namespace

std::vector<EquinoxLeaf> equinox_leaves(const PolicyConfig& policy) {
  LeafList l(policy.depth);
  policy_leaves(policy, l);
  return l.take();
}
std::vector<EquinoxLeaf> equinox_leaves(const MMDiT& model) {
  LeafList l(model.config.depth);
  mmdit_leaves(model.config, "", l);
  return l.take();
}
std::vector<EquinoxLeaf> equinox_leaves(const InContextMMDiT& model) {
  LeafList l(model.config.depth);
  incontext_leaves(model.config, l);
  return l.take();
}

void load_equinox(BCPolicy& policy, const std::string& path) {
  load_leaves(policy, path, equinox_leaves(policy.config));
}
void load_equinox(MMDiT& model, const std::string& path) {
  load_leaves(model, path, equinox_leaves(model));
}
void load_equinox(InContextMMDiT& model, const std::string& path) {
  load_leaves(model, path, equinox_leaves(model));
}

void save_equinox(const BCPolicy& policy, const std::string& path) {
  save_leaves(policy, path, equinox_leaves(policy.config));
}
void save_equinox(const MMDiT& model, const std::string& path) {
  save_leaves(model, path, equinox_leaves(model));
}
void save_equinox(const InContextMMDiT& model, const std::string& path) {
  save_leaves(model, path, equinox_leaves(model));
}

PolicyConfig equinox_policy_config(const std::string& path) {
  const Records records = read_records(path);
  // The order of the leaves does not depend on the sizes: find each by its path.
  const std::vector<EquinoxLeaf> leaves = equinox_leaves(PolicyConfig{});
  const auto index = [&](const std::string& leaf_path) {
    const auto at = std::find_if(leaves.begin(), leaves.end(),
                                 [&](const EquinoxLeaf& l) { return l.path == leaf_path; });
    const size_t i = static_cast<size_t>(at - leaves.begin());
    MMDIT_CHECK(i < records.size(), path, ": the file ends after ", records.size(),
                " records, before ", leaf_path, " (record ", i,
                "); not a BCPolicy saved by Equinox?");
    return i;
  };
  const auto scalar = [&](const std::string& leaf_path, bool integer) {
    const size_t i = index(leaf_path);
    const NpyRecord& r = records[i];
    MMDIT_CHECK(r.shape.empty() && (integer ? is_integer(r) : is_float(r)), path, ": ", leaf_path,
                " should be a Python ", integer ? "int" : "float", ", the file holds a '", r.descr,
                "' array of shape ", shape_str(r.shape), "; not a BCPolicy saved by Equinox?");
    return records.value(i).item();
  };
  const auto size = [&](const std::string& leaf_path) {
    return static_cast<int64_t>(scalar(leaf_path, true));
  };
  PolicyConfig c;
  c.n_obs_steps = size("n_obs_steps");
  c.state_dim = size("state_dim");
  c.horizon = size("horizon");
  c.act_dim = size("act_dim");
  c.hidden_size = size("hidden_size");
  c.sigma = scalar("sigma", false);
  c.timestep_embed_dim = size("mmdit.timestep_embeds.0.dim_embed");
  c.dim_cond = size("mmdit.timestep_embeds.0.dim_out");
  c.dim_head = size("mmdit.blocks.joint_attn.dim_head");
  c.heads = size("mmdit.blocks.joint_attn.heads");
  c.ff_mult = size("mmdit.blocks.feedforwards.0.mult");
  const Shape& to_cond = records[index("mmdit.blocks.to_cond.layers.1.weight")].shape;
  MMDIT_CHECK(to_cond.size() == 3, path,
              ": mmdit.blocks.to_cond.layers.1.weight should be the blocks' weights stacked "
              "(3 dimensions), the file holds shape ",
              shape_str(to_cond));
  c.depth = to_cond[0];
  c.validate();
  // Every size is confirmed by an array that has it, before anyone builds a model of this size:
  // an edited "hidden_size" must not allocate gigabytes the file does not hold. In double, so
  // that products of edited sizes cannot overflow.
  const double h = static_cast<double>(c.hidden_size), depth = static_cast<double>(c.depth);
  const double inner = static_cast<double>(c.heads) * static_cast<double>(c.dim_head);
  const std::vector<std::pair<const char*, std::vector<double>>> shapes = {
      {"state_encoder.weight", {h, double(c.state_dim)}},
      {"action_encoder.weight", {h, double(c.act_dim)}},
      {"state_pos_embed", {double(c.n_obs_steps), h}},
      {"action_pos_embed", {double(c.horizon), h}},
      {"mmdit.timestep_embeds.0.linear1.weight",
       {double(c.dim_cond), double(c.timestep_embed_dim)}},
      {"mmdit.blocks.joint_attn.to_qkv.0.weight", {depth, 3 * inner, h}},
      {"mmdit.blocks.joint_attn.q_rmsnorms.0.gamma", {depth, double(c.dim_head)}},
      {"mmdit.blocks.feedforwards.0.linear_in.weight", {depth, h * double(c.ff_mult), h}},
      {"mmdit.blocks.to_cond.layers.1.weight", {depth, 4 * h, double(c.dim_cond)}},
      {"mmdit.final_layers.1.linear_out.weight", {double(c.act_dim), h}}};
  for (const auto& [leaf_path, expected] : shapes) {
    const Shape& found = records[index(leaf_path)].shape;
    bool same = found.size() == expected.size();
    for (size_t k = 0; same && k < found.size(); ++k)
      same = static_cast<double>(found[k]) == expected[k];
    std::string want = "(";
    for (size_t k = 0; k < expected.size(); ++k) want += str_cat(k ? "," : "", expected[k]);
    MMDIT_CHECK(same, path, ": ", leaf_path, " has shape ", shape_str(found),
                ", but the sizes the file records make it ", want,
                "); not a BCPolicy saved by Equinox?");
  }
  return c;
}

}  // namespace mmdit
