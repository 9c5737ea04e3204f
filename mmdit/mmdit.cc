#include "mmdit/mmdit.h"

namespace mmdit {
namespace {
// to_cond's width: an attention gate and a feed-forward gate per modality, 2 * sum D_m.
int64_t to_cond_width(const std::vector<int64_t>& dims) {
  int64_t sum = 0;
  for (int64_t d : dims)
    MMDIT_CHECK(!__builtin_add_overflow(sum, d, &sum), "MMDiTBlock: the modalities' dims ",
                shape_str(Shape(dims.begin(), dims.end())), " overflow int64 when summed");
  return nn::layer_width(2, sum, str_cat("MMDiTBlock: 2 * the modalities' summed dims ", sum));
}

// The block's own arguments, checked before any member is built: an error names the block's
// argument, not the inner layer it sizes ("Linear: sizes must be positive").
std::vector<int64_t> checked_block_args(std::vector<int64_t> dims, int64_t dim_cond,
                                        int64_t ff_mult) {
  const char* who = "MMDiTBlock";
  MMDIT_CHECK(dims.size() >= 2, who, ": needs at least two modalities, got ", dims.size());
  check_positive(who, "dim_modalities", dims);
  check_positive(who, "dim_cond", dim_cond);
  check_positive(who, "ff_mult", ff_mult);
  return dims;
}

void check_block_conditioning(const BlockConditioning& cond, size_t modalities) {
  const size_t M = modalities;
  MMDIT_CHECK(
      cond.attn_layernorms.size() == M && cond.ff_layernorms.size() == M &&
          cond.attn_gates.size() == M && cond.ff_gates.size() == M,
      "MMDiTBlock: conditioning for ", cond.attn_layernorms.size(), ", ", cond.ff_layernorms.size(),
      ", ", cond.attn_gates.size(), " and ", cond.ff_gates.size(),
      " modalities (attn_layernorms, ff_layernorms, attn_gates, ff_gates), the block has ", M);
}
}  // namespace

ModulatedFinalLayer::ModulatedFinalLayer(int64_t dim_in, int64_t dim_out, int64_t dim_cond,
                                         Rng& rng)
    : adaLN_modulation(positive("ModulatedFinalLayer", "dim_cond", dim_cond),
                       nn::layer_width(2, positive("ModulatedFinalLayer", "dim_in", dim_in),
                                       str_cat("ModulatedFinalLayer: 2 * dim_in ", dim_in)),
                       true, rng, nn::Init::zeros),
      linear_out(dim_in, positive("ModulatedFinalLayer", "dim_out", dim_out), true, rng,
                 nn::Init::zeros) {
  register_module("adaLN_modulation", adaLN_modulation);
  register_module("linear_out", linear_out);
}

Tensor ModulatedFinalLayer::operator()(const Tensor& x, const Tensor& c) const {
  return forward(x, modulation(silu(c)));
}

nn::Modulation ModulatedFinalLayer::modulation(const Tensor& silu_c) const {
  return nn::modulation_from(adaLN_modulation, silu_c);
}

Tensor ModulatedFinalLayer::forward(const Tensor& x, const nn::Modulation& modulation) const {
  return linear_out(nn::modulate(x, modulation));
}

MMDiTBlock::MMDiTBlock(std::vector<int64_t> dims, int64_t dim_cond, int64_t dim_head, int64_t heads,
                       int64_t ff_mult, Rng& rng)
    : dim_modalities(checked_block_args(std::move(dims), dim_cond, ff_mult)),
      joint_attn(dim_modalities, dim_head, heads, rng),
      to_cond(dim_cond, to_cond_width(dim_modalities), true, rng, nn::Init::zeros) {
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
  check_inputs(x, c);
  return forward(std::move(x), condition(c), mask);
}

void MMDiTBlock::check_inputs(const std::vector<Tensor>& x, const Tensor& c) const {
  const DType dtype = to_cond.weight.dtype();
  const bool batched = nn::check_modalities(x, dim_modalities, "MMDiTBlock", dtype);
  MMDIT_CHECK(c.defined(), "MMDiTBlock: the conditioning is an undefined Tensor");
  MMDIT_CHECK(c.dtype() == dtype, "MMDiTBlock: the conditioning is ", dtype_name(c.dtype()),
              ", the model is ", dtype_name(dtype));
  const int64_t dim_cond = to_cond.weight.shape()[1];
  MMDIT_CHECK(
      c.dim() == (batched ? 2 : 1) && c.shape().back() == dim_cond &&
          (!batched || c.shape()[0] == x[0].shape()[0]),
      "MMDiTBlock: conditioning has shape ", shape_str(c.shape()), "; expected ",
      batched ? str_cat("(", x[0].shape()[0], ",", dim_cond, ")") : str_cat("(", dim_cond, ",)"));
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
      cond.attn_layernorms.push_back(attn_layernorms[m].modulation(silu_c));
    }
    NameScope scope(str_cat("ff_layernorms.", m));
    cond.ff_layernorms.push_back(ff_layernorms[m].modulation(silu_c));
  }
  return cond;
}

std::vector<Tensor> MMDiTBlock::forward(std::vector<Tensor> x, const BlockConditioning& cond,
                                        const Tensor& mask,
                                        const std::vector<bool>& outputs) const {
  nn::check_modalities(x, dim_modalities, "MMDiTBlock");
  const size_t M = x.size();
  check_block_conditioning(cond, M);
  nn::check_outputs(outputs, M, "MMDiTBlock");
  std::vector<Tensor> h(M);
  for (size_t m = 0; m < M; ++m) {
    NameScope scope(str_cat("attn_layernorms.", m));
    h[m] = nn::modulate(x[m], cond.attn_layernorms[m]);  // h_m = attn_layernorms.m(x_m, c)
  }
  std::vector<Tensor> a;
  {
    NameScope scope("joint_attn");
    a = joint_attn(h, mask, outputs);
  }
  for (size_t m = 0; m < M; ++m) {
    if (!nn::wanted(outputs, m)) {
      x[m] = Tensor();
      h[m] = Tensor();
      continue;
    }
    x[m] = gated_residual(x[m], cond.attn_gates[m], a[m]);  // x_m = x_m + attn_gates_m * a_m
    NameScope scope(str_cat("ff_layernorms.", m));
    h[m] = nn::modulate(x[m], cond.ff_layernorms[m]);  // h_m = ff_layernorms.m(x_m, c)
  }
  const std::vector<Tensor> ff = nn::feedforward_each(feedforwards, h, "feedforwards.");
  for (size_t m = 0; m < M; ++m)
    if (x[m].defined())
      x[m] = gated_residual(x[m], cond.ff_gates[m], ff[m]);  // x_m = x_m + ff_gates_m * ff_m
  return x;
}

void MMDiTConfig::validate() const {
  const char* who = "MMDiT config";
  // No default, as in the reference: a forgotten depth must not build a one-block model.
  MMDIT_CHECK(depth > 0, who, ": depth (the number of blocks) must be set, and positive; got ",
              depth);
  MMDIT_CHECK(dim_modalities.size() >= 2, who,
              ": dim_modalities needs at least two modalities, got ", dim_modalities.size());
  check_positive(who, "dim_modalities", dim_modalities);
  MMDIT_CHECK(dim_outs.size() == dim_modalities.size(), who, ": ", dim_modalities.size(),
              " dim_modalities but ", dim_outs.size(), " dim_outs");
  check_positive(who, "dim_outs", dim_outs);
  check_positive(who, "dim_cond", dim_cond);
  MMDIT_CHECK(!timestep_embed_dims.empty(), who, ": timestep_embed_dims is empty");
  check_positive(who, "timestep_embed_dims", timestep_embed_dims);
  check_positive(who, "dim_head", dim_head);
  MMDIT_CHECK(dim_head % 2 == 0, who, ": dim_head must be even (RoPE), got ", dim_head);
  check_positive(who, "heads", heads);
  check_positive(who, "ff_mult", ff_mult);
}

std::string MMDiTConfig::describe() const {
  return str_cat("depth ", depth, ", dim_modalities ", shape_str(dim_modalities), ", dim_outs ",
                 shape_str(dim_outs), ", dim_cond ", dim_cond, ", timestep_embed_dims ",
                 shape_str(timestep_embed_dims), ", dim_head ", dim_head, ", heads ", heads,
                 ", ff_mult ", ff_mult);
}

MMDiT::MMDiT(const MMDiTConfig& cfg, Rng& rng) try : config(cfg) {
  config.validate();
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
} catch (const OutOfMemory& e) {
  // Any of the sizes can make a layer too large: say them all.
  throw OutOfMemory(
      str_cat("MMDiT with config ", cfg.describe(), " does not fit in memory: ", e.what()));
}

namespace {
// First in each entry point, before any check that reads timesteps[0].
void check_timestep_count(const std::vector<Tensor>& timesteps, size_t expected) {
  MMDIT_CHECK(timesteps.size() == expected, "MMDiT: expected ", expected,
              " timestep(s), one per conditioning variable, got ", timesteps.size());
}

// Each timestep defined and of the model's dtype: a bool or float64 timestep for a float32 model
// is reported as such, not by the first op of the timestep embedding that meets it.
void check_timestep_dtypes(const std::vector<Tensor>& timesteps, DType model_dtype) {
  for (size_t i = 0; i < timesteps.size(); ++i) {
    MMDIT_CHECK(timesteps[i].defined(), "MMDiT: timestep ", i, " is an undefined Tensor");
    MMDIT_CHECK(timesteps[i].dtype() == model_dtype, "MMDiT: timestep ", i, " is ",
                dtype_name(timesteps[i].dtype()), ", the model is ", dtype_name(model_dtype));
  }
}
}  // namespace

Tensor MMDiT::embed_timesteps(const std::vector<Tensor>& timesteps) const {
  check_timestep_count(timesteps, timestep_embeds.size());
  check_timestep_dtypes(timesteps, dtype());
  // Timestep 0 on its own first: the message for the others names its batch size.
  MMDIT_CHECK(timesteps[0].dim() == 1, "MMDiT: timestep 0 has shape ",
              shape_str(timesteps[0].shape()), "; expected (B,)");
  Tensor c;
  for (size_t i = 0; i < timesteps.size(); ++i) {
    const Tensor& t = timesteps[i];
    MMDIT_CHECK(t.dim() == 1 && t.shape()[0] == timesteps[0].shape()[0], "MMDiT: timestep ", i,
                " has shape ", shape_str(t.shape()), "; expected (", timesteps[0].shape()[0],
                ",) like timestep 0");
    NameScope scope(str_cat("timestep_embeds.", i));
    Tensor e = timestep_embeds[i](t);
    c = c.defined() ? c + e : e;
  }
  return c;
}

std::vector<Tensor> MMDiT::operator()(const std::vector<Tensor>& xs,
                                      const std::vector<Tensor>& timesteps,
                                      const Tensor& mask) const {
  const bool batched = nn::check_modalities(xs, config.dim_modalities, "MMDiT", dtype());
  const int64_t batch = batched ? xs[0].shape()[0] : 1;
  check_timestep_count(timesteps, timestep_embeds.size());
  check_timestep_dtypes(timesteps, dtype());
  std::vector<Tensor> x, t;
  for (const Tensor& xm : xs) x.push_back(batched ? xm : unsqueeze(xm, 0));
  for (size_t i = 0; i < timesteps.size(); ++i) {
    const Tensor& ti = timesteps[i];
    MMDIT_CHECK(ti.dim() == 0 || (batched && ti.dim() == 1 && ti.shape()[0] == batch),
                "MMDiT: timestep ", i, " has shape ", shape_str(ti.shape()), "; expected ",
                batched ? str_cat("() or (", batch, ",) for a batch of ", batch)
                        : std::string("() for one example"));
    t.push_back(ti.dim() == 0 ? broadcast_to(ti, {batch}) : ti);
  }
  std::vector<Tensor> outs = forward(x, condition(t), mask);
  if (!batched)
    for (Tensor& o : outs) o = squeeze(o, 0);
  return outs;
}

MMDiTConditioning MMDiT::condition(const std::vector<Tensor>& timesteps) const {
  const Tensor c = embed_timesteps(timesteps);  // which checks the timesteps
  MMDiTConditioning cond;
  for (size_t i = 0; i < blocks.size(); ++i) {
    NameScope scope(str_cat("blocks.", i));
    cond.blocks.push_back(blocks[i].condition(c));
  }
  const Tensor silu_c = silu(c);
  for (size_t m = 0; m < final_layers.size(); ++m) {
    NameScope scope(str_cat("final_layers.", m));
    cond.final_layers.push_back(final_layers[m].modulation(silu_c));
  }
  return cond;
}

std::vector<Tensor> MMDiT::forward(const std::vector<Tensor>& xs, const MMDiTConditioning& cond,
                                   const Tensor& mask, const std::vector<bool>& outputs) const {
  check_forward_inputs(xs, cond, outputs);
  std::vector<Tensor> x = xs;
  for (size_t i = 0; i < blocks.size(); ++i) {
    NameScope scope(str_cat("blocks.", i));
    const bool last = i + 1 == blocks.size();
    x = blocks[i].forward(std::move(x), cond.blocks[i], mask, last ? outputs : std::vector<bool>{});
  }
  std::vector<Tensor> outs;
  for (size_t m = 0; m < x.size(); ++m) {
    if (!nn::wanted(outputs, m)) {
      outs.emplace_back();
      continue;
    }
    NameScope scope(str_cat("final_layers.", m));
    outs.push_back(final_layers[m].forward(x[m], cond.final_layers[m]));
  }
  return outs;
}

void MMDiT::check_forward_inputs(const std::vector<Tensor>& xs, const MMDiTConditioning& cond,
                                 const std::vector<bool>& outputs) const {
  const bool batched = nn::check_modalities(xs, config.dim_modalities, "MMDiT", dtype());
  MMDIT_CHECK(batched, "MMDiT::forward: tokens must be batched (B, S, D)");
  MMDIT_CHECK(
      cond.blocks.size() == blocks.size() && cond.final_layers.size() == final_layers.size(),
      "MMDiT::forward: conditioning for ", cond.blocks.size(), " blocks and ",
      cond.final_layers.size(), " final layers, the model has ", blocks.size(), " and ",
      final_layers.size());
  nn::check_outputs(outputs, xs.size(), "MMDiT::forward");
  // Conditioning of another batch or model fails later, in an op that cannot say why.
  const int64_t batch = xs[0].shape()[0];
  for (size_t m = 0; m < xs.size(); ++m) {
    const Tensor& ss = cond.final_layers[m].shift_scale;
    const int64_t dim = config.dim_modalities[m];
    MMDIT_CHECK(ss.defined() && ss.dim() == 3 && (ss.shape()[0] == 1 || ss.shape()[0] == batch) &&
                    ss.shape()[2] == 2 * dim,
                "MMDiT::forward: the conditioning of modality ", m, "'s final layer ",
                ss.defined() ? str_cat("has shape ", shape_str(ss.shape())) : "is undefined",
                "; expected (1 or ", batch, ", 1, ", 2 * dim,
                "): conditioning from this model's condition(), for one timestep or one per "
                "example of the batch of ",
                batch);
  }
}

}  // namespace mmdit
