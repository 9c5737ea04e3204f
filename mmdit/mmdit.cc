#include "mmdit/mmdit.h"

#include <numeric>

namespace mmdit {

ModulatedFinalLayer::ModulatedFinalLayer(int64_t dim_in, int64_t dim_out, int64_t dim_cond,
                                         Rng& rng)
    : dim_in(dim_in),
      adaLN_modulation(dim_cond, 2 * dim_in, true, rng, nn::Init::zeros),
      linear_out(dim_in, dim_out, true, rng, nn::Init::zeros) {
  register_module("adaLN_modulation", adaLN_modulation);
  register_module("linear_out", linear_out);
}

Tensor ModulatedFinalLayer::operator()(const Tensor& x, const Tensor& c) const {
  return linear_out(nn::modulate(x, nn::modulation_from(adaLN_modulation, silu(c))));
}

MMDiTBlock::MMDiTBlock(std::vector<int64_t> dims, int64_t dim_cond, int64_t dim_head, int64_t heads,
                       int64_t ff_mult, Rng& rng)
    : dim_modalities(std::move(dims)),
      joint_attn(dim_modalities, dim_head, heads, rng),
      to_cond(dim_cond,
              2 * std::accumulate(dim_modalities.begin(), dim_modalities.end(), int64_t{0}), true,
              rng, nn::Init::zeros) {
  MMDIT_CHECK(dim_modalities.size() >= 2, "MMDiTBlock: needs at least two modalities, got ",
              dim_modalities.size());
  for (int64_t d : dim_modalities) {
    attn_layernorms.emplace_back(d, dim_cond, rng);
    ff_layernorms.emplace_back(d, dim_cond, rng);
    feedforwards.emplace_back(d, ff_mult, rng);
  }
  register_module("attn_layernorms", attn_layernorms);
  register_module("ff_layernorms", ff_layernorms);
  register_module("joint_attn", joint_attn);
  register_module("feedforwards", feedforwards);
  register_module("to_cond", to_cond);
}

std::vector<Tensor> MMDiTBlock::operator()(std::vector<Tensor> x, const Tensor& c,
                                           const Tensor& mask) const {
  const bool batched = nn::check_modalities(x, dim_modalities, "MMDiTBlock");
  const int64_t dim_cond = to_cond.weight.shape()[1];
  MMDIT_CHECK(
      c.dim() == (batched ? 2 : 1) && c.shape().back() == dim_cond &&
          (!batched || c.shape()[0] == x[0].shape()[0]),
      "MMDiTBlock: conditioning has shape ", shape_str(c.shape()), "; expected ",
      batched ? str_cat("(", x[0].shape()[0], ",", dim_cond, ")") : str_cat("(", dim_cond, ",)"));
  return forward(std::move(x), condition(c), mask);
}

BlockConditioning MMDiTBlock::condition(const Tensor& c) const {
  const size_t M = dim_modalities.size();
  BlockConditioning cond;
  // Gates (..., 1, D_m): attention gates for every modality, then feed-forward gates.
  std::vector<int64_t> sizes(dim_modalities);
  sizes.insert(sizes.end(), dim_modalities.begin(), dim_modalities.end());
  const Tensor silu_c = silu(c);
  const std::vector<Tensor> gates = split(unsqueeze(to_cond(silu_c), -2), sizes, -1);
  cond.attn_gates.assign(gates.begin(), gates.begin() + M);
  cond.ff_gates.assign(gates.begin() + M, gates.end());
  for (size_t m = 0; m < M; ++m) {
    {
      NameScope scope(str_cat("attn_layernorms.", m));
      cond.attn.push_back(attn_layernorms[m].modulation(silu_c));
    }
    NameScope scope(str_cat("ff_layernorms.", m));
    cond.ff.push_back(ff_layernorms[m].modulation(silu_c));
  }
  return cond;
}

std::vector<Tensor> MMDiTBlock::forward(std::vector<Tensor> x, const BlockConditioning& cond,
                                        const Tensor& mask,
                                        const std::vector<bool>& outputs) const {
  const size_t M = x.size();
  MMDIT_CHECK(outputs.empty() || outputs.size() == M, "MMDiTBlock: outputs names ", outputs.size(),
              " modalities, the block has ", M);
  std::vector<Tensor> h(M);
  for (size_t m = 0; m < M; ++m) h[m] = nn::modulate(x[m], cond.attn[m]);
  std::vector<Tensor> a;
  {
    NameScope scope("joint_attn");
    a = joint_attn(h, mask, outputs);
  }
  std::vector<Tensor> h_ff(M);
  for (size_t m = 0; m < M; ++m) {
    if (!outputs.empty() && !outputs[m]) {
      x[m] = Tensor();
      continue;
    }
    x[m] = gated_residual(x[m], cond.attn_gates[m], a[m]);  // x + attn_gate * a
    h_ff[m] = nn::modulate(x[m], cond.ff[m]);
  }
  const std::vector<Tensor> ff = nn::feedforward_each(feedforwards, h_ff, "feedforwards.");
  for (size_t m = 0; m < M; ++m)
    if (x[m].defined()) x[m] = gated_residual(x[m], cond.ff_gates[m], ff[m]);  // x + ff_gate * ff
  return x;
}

MMDiT::MMDiT(const MMDiTConfig& cfg, Rng& rng) : config(cfg) {
  MMDIT_CHECK(config.dim_outs.size() == config.dim_modalities.size(),
              "MMDiT: ", config.dim_modalities.size(), " dim_modalities but ",
              config.dim_outs.size(), " dim_outs");
  MMDIT_CHECK(!config.timestep_embed_dims.empty(), "MMDiT: timestep_embed_dim is empty");
  for (int64_t ted : config.timestep_embed_dims)
    timestep_embeds.emplace_back(ted, config.dim_cond, rng);
  for (int64_t i = 0; i < config.depth; ++i)
    blocks.emplace_back(config.dim_modalities, config.dim_cond, config.dim_head, config.heads,
                        config.ff_mult, rng);
  for (size_t m = 0; m < config.dim_modalities.size(); ++m)
    final_layers.emplace_back(config.dim_modalities[m], config.dim_outs[m], config.dim_cond, rng);
  register_module("timestep_embeds", timestep_embeds);
  register_module("blocks", blocks);
  register_module("final_layers", final_layers);
}

Tensor MMDiT::conditioning(const std::vector<Tensor>& timesteps, bool batched,
                           int64_t batch) const {
  MMDIT_CHECK(timesteps.size() == timestep_embeds.size(), "MMDiT: expected ",
              timestep_embeds.size(), " timestep(s), one per conditioning variable, got ",
              timesteps.size());
  Tensor c;
  for (size_t i = 0; i < timesteps.size(); ++i) {
    Tensor t = timesteps[i];
    if (batched && t.dim() == 0) t = broadcast_to(t, {batch});
    MMDIT_CHECK(batched ? (t.dim() == 1 && t.shape()[0] == batch) : t.dim() == 0,
                "MMDiT: timestep ", i, " has shape ", shape_str(t.shape()), "; expected ",
                batched ? str_cat("(", batch, ",) for a batch of ", batch) : std::string("()"));
    NameScope scope(str_cat("timestep_embeds.", i));
    Tensor e = timestep_embeds[i](t);
    c = c.defined() ? c + e : e;
  }
  return c;
}

std::vector<Tensor> MMDiT::operator()(const std::vector<Tensor>& xs,
                                      const std::vector<Tensor>& timesteps,
                                      const Tensor& mask) const {
  const bool batched = nn::check_modalities(xs, config.dim_modalities, "MMDiT");
  const Tensor c = conditioning(timesteps, batched, batched ? xs[0].shape()[0] : 1);
  std::vector<Tensor> x = xs;
  for (size_t i = 0; i < blocks.size(); ++i) {
    NameScope scope(str_cat("blocks.", i));
    x = blocks[i](std::move(x), c, mask);
  }
  std::vector<Tensor> outs;
  for (size_t m = 0; m < x.size(); ++m) {
    NameScope scope(str_cat("final_layers.", m));
    outs.push_back(final_layers[m](x[m], c));
  }
  return outs;
}

MMDiTConditioning MMDiT::condition(const std::vector<Tensor>& timesteps) const {
  MMDIT_CHECK(!timesteps.empty() && timesteps[0].dim() == 1,
              "MMDiT::condition: timesteps must "
              "be batched, (B,) each; got ",
              timesteps.empty() ? std::string("none") : shape_str(timesteps[0].shape()));
  const Tensor c = conditioning(timesteps, true, timesteps[0].shape()[0]);
  MMDiTConditioning cond;
  for (size_t i = 0; i < blocks.size(); ++i) {
    NameScope scope(str_cat("blocks.", i));
    cond.blocks.push_back(blocks[i].condition(c));
  }
  for (size_t m = 0; m < final_layers.size(); ++m) {
    NameScope scope(str_cat("final_layers.", m));
    cond.final_layers.push_back(nn::modulation_from(final_layers[m].adaLN_modulation, silu(c)));
  }
  return cond;
}

std::vector<Tensor> MMDiT::forward(const std::vector<Tensor>& xs, const MMDiTConditioning& cond,
                                   const Tensor& mask, const std::vector<bool>& outputs) const {
  const bool batched = nn::check_modalities(xs, config.dim_modalities, "MMDiT");
  MMDIT_CHECK(batched, "MMDiT::forward: tokens must be batched (B, S, D)");
  MMDIT_CHECK(cond.blocks.size() == blocks.size(), "MMDiT::forward: conditioning for ",
              cond.blocks.size(), " blocks, the model has ", blocks.size());
  MMDIT_CHECK(outputs.empty() || outputs.size() == xs.size(), "MMDiT::forward: outputs names ",
              outputs.size(), " modalities, the model has ", xs.size());
  std::vector<Tensor> x = xs;
  for (size_t i = 0; i < blocks.size(); ++i) {
    NameScope scope(str_cat("blocks.", i));
    const bool last = i + 1 == blocks.size();
    x = blocks[i].forward(std::move(x), cond.blocks[i], mask, last ? outputs : std::vector<bool>{});
  }
  std::vector<Tensor> outs;
  for (size_t m = 0; m < x.size(); ++m) {
    if (!outputs.empty() && !outputs[m]) {
      outs.emplace_back();
      continue;
    }
    NameScope scope(str_cat("final_layers.", m));
    outs.push_back(final_layers[m].linear_out(nn::modulate(x[m], cond.final_layers[m])));
  }
  return outs;
}

}  // namespace mmdit
