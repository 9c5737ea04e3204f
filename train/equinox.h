// Models saved by the reference with Equinox, read into ours: eqx.tree_serialise_leaves writes a
// model as consecutive .npy records, one per leaf, in the order of the module's fields, with no
// names. Like eqx.tree_deserialise_leaves(path, like), reading needs a model of the same
// hyperparameters to say what each record is:
//
//   BCPolicy policy(equinox_policy_config("policy.eqx"), rng);
//   load_equinox(policy, "policy.eqx");
//
// The leaves, field by field as the reference declares them (blocks made by eqx.filter_vmap are
// stored once, stacked along a leading depth axis):
//   MMDiT:         timestep_embeds.c.{linear1, linear2 (weight, bias), dim_embed, dim_out},
//                  blocks (stacked: attn_layernorms.m, joint_attn, ff_layernorms.m,
//                  feedforwards.m, to_cond, num_modalities, dim_modalities.m, dim_cumsum.m),
//                  final_layers.m, dim_modalities.m, dim_outs.m, num_conds
//   InContextMMDiT: blocks (stacked: attn_norms.m, joint_attn, ff_norms.m, feedforwards.m,
//                  num_modalities, dim_modalities.m), final_layers.m, dim_modalities.m, dim_outs.m
//   BCPolicy:      n_obs_steps, state_dim, horizon, act_dim, hidden_size, sigma, state_encoder,
//                  action_encoder, state_pos_embed, action_pos_embed, mmdit
// Python ints and floats (sizes, eps) are records too, and each must equal the model's value;
// functions (the SiLU in front of a modulation) are not recorded.
//
// Every record is checked before the model changes: its dtype (a float array or a Python scalar),
// its shape, the scalars' values, and that the file ends with the last leaf. An error names the
// record's index and leaf path, what was found and what the model expected. The values are
// converted to the model's dtype; the policy's position tables are taken from the file (the
// reference computes them in float32).
#pragma once

#include <string>
#include <vector>

#include "mmdit/incontext.h"
#include "mmdit/mmdit.h"
#include "train/policy.h"

namespace mmdit {

void load_equinox(BCPolicy& policy, const std::string& path);
void load_equinox(MMDiT& model, const std::string& path);
void load_equinox(InContextMMDiT& model, const std::string& path);

// The other way: writes the model as eqx.tree_serialise_leaves would write the reference's model
// holding these values, for eqx.tree_deserialise_leaves(path, like) in Python (arrays in the
// model's dtype; Python ints as '<i8', floats as '<f8'). Written atomically.
void save_equinox(const BCPolicy& policy, const std::string& path);
void save_equinox(const MMDiT& model, const std::string& path);
void save_equinox(const InContextMMDiT& model, const std::string& path);

// The hyperparameters of the BCPolicy saved in `path`, read from its records: the sizes it
// records itself (n_obs_steps ... sigma, dim_embed, dim_head, heads, mult), dim_cond from the
// timestep embedding's output, and depth from the stacked blocks.
PolicyConfig equinox_policy_config(const std::string& path);

// One leaf of the reference's model as tree_serialise_leaves writes it.
struct EquinoxLeaf {
  enum class Kind { array, integer, real };
  std::string path;  // the reference's field path, e.g. "mmdit.blocks.joint_attn.heads"
  Kind kind = Kind::array;
  // array: our tensor's name; stacked over blocks, one name per block ("blocks.0....", ...)
  std::vector<std::string> names;
  bool stacked = false;
  double value = 0;  // integer, real: the model's value
};
// The leaves of each model in file order: what load_equinox reads.
std::vector<EquinoxLeaf> equinox_leaves(const PolicyConfig& policy);
std::vector<EquinoxLeaf> equinox_leaves(const MMDiT& model);
std::vector<EquinoxLeaf> equinox_leaves(const InContextMMDiT& model);

}  // namespace mmdit
