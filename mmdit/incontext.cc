#include "mmdit/incontext.h"

namespace mmdit {

SimpleFinalLayer::SimpleFinalLayer(int64_t dim_in, int64_t dim_out, Rng& rng)
    : rms_norm(positive("SimpleFinalLayer", "dim_in", dim_in)),
      linear_out(dim_in, positive("SimpleFinalLayer", "dim_out", dim_out), true, rng,
                 nn::Init::zeros) {
  register_module("rms_norm", rms_norm);
  register_module("linear_out", linear_out);
}

namespace {
// Checked before any member is built, so that an error names the block's argument and not the
// inner FeedForward it sizes ("FeedForward: mult must be positive").
std::vector<int64_t> checked_block_args(std::vector<int64_t> dims, int64_t ff_mult) {
  const char* who = "InContextMMDiTBlock";
  MMDIT_CHECK(!dims.empty(), who, ": dim_modalities is empty");
  check_positive(who, "dim_modalities", dims);
  check_positive(who, "ff_mult", ff_mult);
  return dims;
}
}  // namespace

InContextMMDiTBlock::InContextMMDiTBlock(std::vector<int64_t> dims, int64_t dim_head, int64_t heads,
                                         int64_t ff_mult, Rng& rng)
    : dim_modalities(checked_block_args(std::move(dims), ff_mult)),
      joint_attn(dim_modalities, dim_head, heads, rng) {
  for (int64_t d : dim_modalities) {
    attn_norms.emplace_back(d);
    ff_norms.emplace_back(d);
    feedforwards.emplace_back(d, ff_mult, rng);
  }
  register_module("attn_norms", attn_norms);
  register_module("ff_norms", ff_norms);
  register_module("joint_attn", joint_attn);
  register_module("feedforwards", feedforwards);
}

std::vector<Tensor> InContextMMDiTBlock::operator()(std::vector<Tensor> x,
                                                    const Tensor& mask) const {
  nn::check_modalities(x, dim_modalities, "InContextMMDiTBlock");
  const size_t M = x.size();
  std::vector<Tensor> h(M);
  for (size_t m = 0; m < M; ++m) {
    NameScope scope(str_cat("attn_norms.", m));
    h[m] = attn_norms[m](x[m]);
  }
  std::vector<Tensor> a;
  {
    NameScope scope("joint_attn");
    a = joint_attn(h, mask);
  }
  // Each norm in the scope of its parameters, the residuals in the block's, as MMDiTBlock scopes
  // them: `mmdit inspect` lists every op under its scope.
  for (size_t m = 0; m < M; ++m) {
    x[m] = x[m] + a[m];
    NameScope scope(str_cat("ff_norms.", m));
    h[m] = ff_norms[m](x[m]);
  }
  const std::vector<Tensor> ff = nn::feedforward_each(feedforwards, h, "feedforwards.");
  for (size_t m = 0; m < M; ++m) x[m] = x[m] + ff[m];
  return x;
}

void InContextMMDiTConfig::validate() const {
  const char* who = "InContextMMDiT config";
  // No default, as in the reference: a forgotten depth must not build a one-block model.
  MMDIT_CHECK(depth > 0, who, ": depth (the number of blocks) must be set, and positive; got ",
              depth);
  MMDIT_CHECK(!dim_modalities.empty(), who, ": dim_modalities is empty");
  check_positive(who, "dim_modalities", dim_modalities);
  MMDIT_CHECK(dim_outs.size() == dim_modalities.size(), who, ": ", dim_modalities.size(),
              " dim_modalities but ", dim_outs.size(), " dim_outs");
  check_positive(who, "dim_outs", dim_outs);
  check_positive(who, "dim_head", dim_head);
  MMDIT_CHECK(dim_head % 2 == 0, who, ": dim_head must be even (RoPE), got ", dim_head);
  check_positive(who, "heads", heads);
  check_positive(who, "ff_mult", ff_mult);
}

std::string InContextMMDiTConfig::describe() const {
  return str_cat("depth ", depth, ", dim_modalities ", shape_str(dim_modalities), ", dim_outs ",
                 shape_str(dim_outs), ", dim_head ", dim_head, ", heads ", heads, ", ff_mult ",
                 ff_mult);
}

InContextMMDiT::InContextMMDiT(const InContextMMDiTConfig& cfg, Rng& rng) try : config(cfg) {
  config.validate();
  for (int64_t i = 0; i < config.depth; ++i)
    blocks.emplace_back(config.dim_modalities, config.dim_head, config.heads, config.ff_mult, rng);
  for (size_t m = 0; m < config.dim_modalities.size(); ++m)
    final_layers.emplace_back(config.dim_modalities[m], config.dim_outs[m], rng);
  register_module("blocks", blocks);
  register_module("final_layers", final_layers);
} catch (const OutOfMemory& e) {
  throw OutOfMemory(str_cat("InContextMMDiT with config ", cfg.describe(),
                            " does not fit in memory: ", e.what()));
}

std::vector<Tensor> InContextMMDiT::operator()(const std::vector<Tensor>& xs,
                                               const Tensor& mask) const {
  nn::check_modalities(xs, config.dim_modalities, "InContextMMDiT", dtype());
  std::vector<Tensor> x = xs;
  for (size_t i = 0; i < blocks.size(); ++i) {
    NameScope scope(str_cat("blocks.", i));
    x = blocks[i](std::move(x), mask);
  }
  std::vector<Tensor> outs;
  for (size_t m = 0; m < x.size(); ++m) {
    NameScope scope(str_cat("final_layers.", m));
    outs.push_back(final_layers[m](x[m]));
  }
  return outs;
}

}  // namespace mmdit
