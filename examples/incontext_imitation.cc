// The reference guide's "Complete Example: Imitation Learning Setup", line for line in C++:
// an InContextMMDiT over observation and action tokens, with the flow-matching time entering as
// tokens prepended to the actions, an attention mask that makes the action block causal, and
// the time tokens stripped from the output. Then the batched form and a three-modality model.
//
// The sizes are the guide's, not shrunk: 12-layer models of 66M parameters. It takes about 1 s
// on two threads and 2 s on one, a quarter of it drawing the initial weights.
#include <chrono>
#include <cstdio>
#include <string>

#include "autodiff/ops.h"
#include "mmdit/incontext.h"
#include "nn/layers.h"
#include "tensor/blas_core.h"

using namespace mmdit;

namespace {

// Python's tuple repr, so the output reads like the guide's: (100, 512), (8,).
std::string py_shape(const Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.shape()[i]);
  return s + (t.dim() == 1 ? ",)" : ")");
}

// jnp.tril(jnp.ones((n, n), dtype=bool)): query i may see key j when j <= i.
Tensor tril(int64_t n) {
  const Tensor i = reshape(arange(n), {n, 1}), j = reshape(arange(n), {1, n});
  return ge(i, j);
}

// mask.at[r0:r1, c0:c1]: a view sharing the mask's storage, so writing to it edits the mask.
Tensor at(const Tensor& mask, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  return raw::slice(raw::slice(mask, 0, r0, r1), 1, c0, c1);
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main(int, char** argv) {
  mmdit::use_the_best_openblas_core(argv);  // before OpenBLAS does any work
  const auto start = std::chrono::steady_clock::now();

  // Configuration
  const int64_t obs_dim = 512;        // Observation embedding dimension
  const int64_t action_dim = 256;     // Action embedding dimension
  const int64_t obs_seq_len = 100;    // Number of observation tokens
  const int64_t action_seq_len = 16;  // Number of action tokens
  const int64_t num_time_tokens = 2;  // Time tokens to prepend to actions

  // One generator threaded through everything plays the role of the split JAX keys; the
  // values differ from JAX's, the shapes and the structure do not.
  Rng rng(42);

  // === Step 1: Create time embedding (user's responsibility) ===
  const nn::TimestepEmbedding time_embed(/*dim_embed=*/256, /*dim_out=*/256, rng);
  // Project time embedding to action token dimension
  const nn::Linear time_to_token(256, action_dim, /*bias=*/true, rng);

  // === Step 2: Create the model ===
  InContextMMDiTConfig config;
  config.depth = 12;
  config.dim_modalities = {obs_dim, action_dim};
  config.dim_outs = {obs_dim, action_dim};
  config.dim_head = 64;
  config.heads = 8;
  config.ff_mult = 4;
  const InContextMMDiT model(config, rng);
  const double build_seconds = seconds_since(start);

  // === Step 3: Prepare inputs ===
  // Observation tokens (no time conditioning needed)
  const Tensor obs_tokens = rng.normal({obs_seq_len, obs_dim});
  // Action tokens (will be prepended with time tokens)
  const Tensor action_tokens = rng.normal({action_seq_len, action_dim});

  // Embed timestep and create time tokens
  const Tensor t = scalar(0.5);                        // Flow matching timestep
  const Tensor time_cond = time_embed(t);              // (256,)
  const Tensor time_token = time_to_token(time_cond);  // (action_dim,)
  const Tensor time_tokens =
      broadcast_to(unsqueeze(time_token, 0), {num_time_tokens, action_dim});  // (2, action_dim)

  // Prepend time tokens to actions
  const Tensor action_with_time = concat({time_tokens, action_tokens}, 0);
  // Shape: (num_time_tokens + action_seq_len, action_dim) = (18, 256)

  // === Step 4: Create attention mask ===
  // Observations: full attention among themselves
  // Actions: can see all observations + causal among action tokens
  const int64_t total_seq = obs_seq_len + num_time_tokens + action_seq_len;
  const Tensor mask = ones({total_seq, total_seq}, DType::boolean);

  // Make action tokens causal (including time tokens)
  const int64_t action_total = num_time_tokens + action_seq_len;
  const Tensor action_causal = tril(action_total);
  raw::copy_into(at(mask, obs_seq_len, total_seq, obs_seq_len, total_seq), action_causal);

  // Optional: prevent observations from seeing actions
  // raw::fill(at(mask, 0, obs_seq_len, obs_seq_len, total_seq), false);

  // === Step 5: Forward pass ===
  // No tape is active, so nothing is recorded. The final layers start at zero, as in the
  // reference, so until the model is trained both outputs are zeros: the shapes are the point.
  const auto forward_start = std::chrono::steady_clock::now();
  const std::vector<Tensor> outs = model({obs_tokens, action_with_time}, mask);
  const double forward_seconds = seconds_since(forward_start);
  const Tensor obs_out = outs[0];

  // === Step 6: Strip time tokens from output ===
  const Tensor action_out = narrow(outs[1], 0, num_time_tokens, action_seq_len);  // (16, 256)

  std::printf("obs_out shape: %s\n", py_shape(obs_out).c_str());        // (100, 512)
  std::printf("action_out shape: %s\n", py_shape(action_out).c_str());  // (16, 256)

  // === Batched Processing ===
  // No vmap: every module takes an optional leading batch axis. Each example gets its own
  // timestep, hence its own time tokens; the (total_seq, total_seq) mask is shared by all (a
  // (batch_size, total_seq, total_seq) mask would give each example its own).
  const int64_t batch_size = 8;
  const Tensor obs_tokens_b = rng.normal({batch_size, obs_seq_len, obs_dim});
  const Tensor action_tokens_b = rng.normal({batch_size, action_seq_len, action_dim});
  const Tensor t_b = rng.uniform({batch_size});                // (8,)
  const Tensor time_token_b = time_to_token(time_embed(t_b));  // (8, action_dim)
  const Tensor time_tokens_b =
      broadcast_to(unsqueeze(time_token_b, 1), {batch_size, num_time_tokens, action_dim});
  const Tensor action_with_time_b = concat({time_tokens_b, action_tokens_b}, 1);

  const auto batched_start = std::chrono::steady_clock::now();
  const std::vector<Tensor> outs_b = model({obs_tokens_b, action_with_time_b}, mask);
  const double batched_seconds = seconds_since(batched_start);
  const Tensor obs_out_b = outs_b[0];
  const Tensor action_out_b = narrow(outs_b[1], 1, num_time_tokens, action_seq_len);

  std::printf("batched t shape: %s\n", py_shape(t_b).c_str());                    // (8,)
  std::printf("batched obs_out shape: %s\n", py_shape(obs_out_b).c_str());        // (8, 100, 512)
  std::printf("batched action_out shape: %s\n", py_shape(action_out_b).c_str());  // (8, 16, 256)

  // === Three-Modality Example (Observations, States, Actions) ===
  // Only actions get time conditioning; states see everything, like the observations.
  const int64_t state_dim = 128, state_seq_len = 10;
  InContextMMDiTConfig config3 = config;
  config3.dim_modalities = {obs_dim, state_dim, action_dim};
  config3.dim_outs = {obs_dim, state_dim, action_dim};
  const InContextMMDiT model3(config3, rng);

  const Tensor state_tokens = rng.normal({state_seq_len, state_dim});
  const int64_t action_start3 = obs_seq_len + state_seq_len;
  const int64_t total3 = action_start3 + action_total;
  const Tensor mask3 = ones({total3, total3}, DType::boolean);
  raw::copy_into(at(mask3, action_start3, total3, action_start3, total3), action_causal);

  const std::vector<Tensor> outs3 = model3({obs_tokens, state_tokens, action_with_time}, mask3);
  const Tensor action_out3 = narrow(outs3[2], 0, num_time_tokens, action_seq_len);
  std::printf("three modalities: obs_out %s, state_out %s, action_out %s\n",
              py_shape(outs3[0]).c_str(), py_shape(outs3[1]).c_str(),
              py_shape(action_out3).c_str());

  std::printf(
      "model: %lld parameters; built in %.1f s; forward %.2f s (one example), %.2f s (batch of 8); "
      "total %.1f s\n",
      (long long)model.num_parameters(), build_seconds, forward_seconds, batched_seconds,
      seconds_since(start));
}
