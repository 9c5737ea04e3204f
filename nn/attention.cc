#include "nn/attention.h"

namespace mmdit::nn {

bool check_modalities(const std::vector<Tensor>& xs, const std::vector<int64_t>& dims,
                      const char* who) {
  MMDIT_CHECK(!xs.empty() && xs.size() == dims.size(), who, ": expected ", dims.size(),
              " modalities, got ", xs.size());
  for (size_t m = 0; m < xs.size(); ++m)
    MMDIT_CHECK(xs[m].defined(), who, ": modality ", m, " is an undefined Tensor");
  MMDIT_CHECK(xs[0].dim() == 2 || xs[0].dim() == 3, who, ": modality 0 has shape ",
              shape_str(xs[0].shape()), "; expected (S, D) or (B, S, D)");
  const bool batched = xs[0].dim() == 3;
  for (size_t m = 0; m < xs.size(); ++m) {
    const Tensor& x = xs[m];
    MMDIT_CHECK(x.dim() == (batched ? 3 : 2), who, ": modality ", m, " has shape ",
                shape_str(x.shape()), "; expected ", batched ? "(B, S, D)" : "(S, D)",
                " like modality 0 ", shape_str(xs[0].shape()));
    MMDIT_CHECK(x.shape().back() == dims[m], who, ": modality ", m, " has feature dim ",
                x.shape().back(), " (shape ", shape_str(x.shape()), "), expected ", dims[m]);
    MMDIT_CHECK(!batched || x.shape()[0] == xs[0].shape()[0], who, ": modality ", m,
                " has batch size ", x.shape()[0], ", modality 0 has ", xs[0].shape()[0]);
    MMDIT_CHECK(x.dtype() == xs[0].dtype(), who, ": modality ", m, " is ", dtype_name(x.dtype()),
                ", modality 0 is ", dtype_name(xs[0].dtype()));
  }
  return batched;
}

bool check_modalities(const std::vector<Tensor>& xs, const std::vector<int64_t>& dims,
                      const char* who, DType model_dtype) {
  const bool batched = check_modalities(xs, dims, who);
  // The modalities share modality 0's dtype (checked above).
  MMDIT_CHECK(xs[0].dtype() == model_dtype, who, ": modality 0 is ", dtype_name(xs[0].dtype()),
              ", the model is ", dtype_name(model_dtype));
  return batched;
}

void check_outputs(const std::vector<bool>& outputs, size_t modalities, const char* who) {
  MMDIT_CHECK(outputs.empty() || outputs.size() == modalities, who, ": outputs names ",
              outputs.size(), " modalities, there are ", modalities);
}

namespace {

// Against the total sequence length (and batch size, if batched).
void check_mask(const Tensor& mask, int64_t total, int64_t batch, bool batched, const char* who) {
  if (!mask.defined()) return;
  MMDIT_CHECK(mask.dtype() == DType::boolean, who, ": mask must be bool, got ",
              dtype_name(mask.dtype()));
  const bool shared = mask.dim() == 2 && mask.shape()[0] == total && mask.shape()[1] == total;
  const bool per_example = batched && mask.dim() == 3 && mask.shape()[0] == batch &&
                           mask.shape()[1] == total && mask.shape()[2] == total;
  MMDIT_CHECK(shared || per_example, who, ": mask has shape ", shape_str(mask.shape()),
              "; expected (", total, ",", total, ")",
              batched ? str_cat(" or (", batch, ",", total, ",", total, ")") : std::string(),
              " for a total sequence length of ", total);
}

}  // namespace

JointAttention::JointAttention(std::vector<int64_t> dims, int64_t dim_head, int64_t heads, Rng& rng)
    : dim_inputs(std::move(dims)), dim_head(dim_head), heads(heads) {
  MMDIT_CHECK(!dim_inputs.empty(), "JointAttention: no modalities");
  check_positive("JointAttention", "dim_inputs", dim_inputs);
  check_positive("JointAttention", "heads", heads);
  check_positive("JointAttention", "dim_head", dim_head);
  MMDIT_CHECK(dim_head % 2 == 0, "JointAttention: dim_head must be even (RoPE), got ", dim_head);
  const int64_t inner = layer_width(
      heads, dim_head, str_cat("JointAttention: heads ", heads, " * dim_head ", dim_head));
  const int64_t qkv = layer_width(3, inner,
                                  str_cat("JointAttention: 3 * heads * dim_head (3 * ", inner,
                                          ", heads ", heads, " * dim_head ", dim_head, ")"));
  for (int64_t d : dim_inputs) {
    to_qkv.emplace_back(d, qkv, false, rng);
    to_out.emplace_back(inner, d, false, rng);
    q_rmsnorms.emplace_back(dim_head);
    k_rmsnorms.emplace_back(dim_head);
  }
  register_module("to_qkv", to_qkv);
  register_module("to_out", to_out);
  register_module("q_rmsnorms", q_rmsnorms);
  register_module("k_rmsnorms", k_rmsnorms);
}

std::vector<Tensor> JointAttention::operator()(const std::vector<Tensor>& xs_in, const Tensor& mask,
                                               const std::vector<bool>& outputs) const {
  const bool batched = check_modalities(xs_in, dim_inputs, "JointAttention");
  std::vector<Tensor> xs;
  for (const Tensor& x : xs_in) xs.push_back(batched ? x : unsqueeze(x, 0));
  const int64_t batch = xs[0].shape()[0], inner = heads * dim_head;
  std::vector<int64_t> lengths;
  int64_t total = 0;
  for (const Tensor& x : xs) total += lengths.emplace_back(x.shape()[1]);
  check_mask(mask, total, batch, batched, "JointAttention");
  check_outputs(outputs, xs.size(), "JointAttention");

  // qkv_m = to_qkv.m(x_m)                                      (B, S_m, 3, heads, dim_head)
  // q_m = rope(q_rmsnorms.m(q_m)), k_m = rope(k_rmsnorms.m(k_m)), positions counted per modality
  // o = softmax(q k^T / sqrt(dim_head), mask) v over the modalities' tokens in order
  // out_m = to_out.m(merge_heads(o)[tokens of m])
  // Everything after to_qkv up to the merged heads is one op (autodiff/fused.h), token-major
  // throughout: the per-head tensors are never written out.
  const std::vector<Tensor> qkv_flat = linear_each(to_qkv, xs, "to_qkv.");
  std::vector<Tensor> qkv, gammas_q, gammas_k, cos, sin;
  for (size_t m = 0; m < xs.size(); ++m) {
    NameScope scope(str_cat("to_qkv.", m));
    const int64_t seq = lengths[m];
    qkv.push_back(reshape(qkv_flat[m], {batch, seq, 3, heads, dim_head}));
    gammas_q.push_back(q_rmsnorms[m].gamma);
    gammas_k.push_back(k_rmsnorms[m].gamma);
    const RopeTables tables = rope_tables(seq, dim_head, xs[m].dtype());
    cos.push_back(tables.cos);
    sin.push_back(tables.sin);
  }
  const Tensor o = joint_attention_fused(qkv, gammas_q, gammas_k, cos, sin, mask);
  const Tensor merged = reshape(o, {batch, total, inner});

  std::vector<Tensor> per_modality = split(merged, lengths, 1);
  for (size_t m = 0; m < xs.size(); ++m)
    if (!wanted(outputs, m)) per_modality[m] = Tensor();
  std::vector<Tensor> outs = linear_each(to_out, per_modality, "to_out.");
  if (!batched)
    for (Tensor& y : outs)
      if (y.defined()) y = squeeze(y, 0);
  return outs;
}

}  // namespace mmdit::nn
