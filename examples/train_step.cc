// The value_and_grad workflow in user code: the reference agent's training step
// (eqx.filter_value_and_grad, then optax's AdamW, then the EMA) written out as a loop over a
// small flow-matching policy and the built-in obstacle task's expert demonstrations. It is the
// step `mmdit train` runs (Trainer::train_step in train/trainer.cc), without the
// learning-rate schedule and gradient clipping the trainer adds when they are configured.
#include <chrono>
#include <cstdio>

#include "autodiff/value_and_grad.h"
#include "tensor/blas_core.h"
#include "tensor/print.h"
#include "train/demo_task.h"
#include "train/trainer.h"

using namespace mmdit;

int main(int, char** argv) {
  mmdit::use_the_best_openblas_core(argv);  // before OpenBLAS does any work
  const auto start = std::chrono::steady_clock::now();

  // Demonstrations: 100 episodes of the expert passing the obstacle left or right.
  const DemoTask task;
  const DemoTask::Demos demos = task.generate_demos(/*num_episodes=*/100, /*seed=*/0);
  const Episodes data{demos.states, demos.actions, demos.episode_starts};

  // Smaller than the policy `mmdit demo` trains (hidden 64, depth 3), so that 300 steps take a
  // few seconds.
  PolicyConfig config;
  config.n_obs_steps = 2;
  config.state_dim = task.state_dim();
  config.horizon = 16;
  config.act_dim = task.act_dim();
  config.hidden_size = 32;
  config.depth = 2;
  config.dim_cond = 32;
  config.timestep_embed_dim = 16;
  config.dim_head = 16;
  config.heads = 2;
  config.ff_mult = 2;

  Rng rng(0);
  BCPolicy policy(config, rng);
  const Normalizer norm = make_normalizer(data, "min_max");
  WindowSampler sampler(data, config.n_obs_steps, config.horizon, /*seed=*/0);
  AdamW optimizer(policy.named_parameters(), {.lr = 1e-3, .weight_decay = 1e-6});
  // 0.99 rather than the usual 0.999: over a 300-step run a slower average would still be
  // mostly the random initialisation.
  EMA ema(policy.named_parameters(), /*decay=*/0.99);

  const int64_t steps = 300, batch_size = 64, log_every = 50;
  double window_loss = 0, first_window = 0, last_window = 0;
  std::printf("%lld steps, batch %lld; loss = mean over the last %lld steps\n", (long long)steps,
              (long long)batch_size, (long long)log_every);
  for (int64_t step = 1; step <= steps; ++step) {
    Batch batch = sampler.next(batch_size);
    FlowNoise noise{rng.normal(batch.action.shape()), rng.uniform({batch_size}), {}};
    auto loss_fn = [&](BCPolicy& p) {
      return flow_matching_loss(p, norm.normalize_state(batch.state),
                                norm.normalize_action(batch.action), batch.action_is_pad, noise);
    };
    auto [loss, grads] = value_and_grad(loss_fn)(policy);
    optimizer.update(policy.named_parameters(), grads);
    ema.update(policy.named_parameters());

    // One batch's loss is noisy (t and x0 are random), so report the mean over the window.
    window_loss += loss.item();
    if (step % log_every == 0) {
      const double mean_loss = window_loss / log_every;
      std::printf("step %3lld  loss %.4f\n", (long long)step, mean_loss);
      if (step == log_every) first_window = mean_loss;
      last_window = mean_loss;
      window_loss = 0;
    }
  }
  // The smoke test (ctest example.train_step) matches "loss fell".
  std::printf(last_window < 0.7 * first_window ? "loss fell from %.4f to %.4f\n"
                                               : "loss did NOT fall enough: %.4f -> %.4f\n",
              first_window, last_window);

  // Acting: the EMA weights, as the reference agent acts, loaded into a second policy.
  Rng unused(0);
  BCPolicy ema_policy(config, unused);
  ema_policy.load(ema.params());

  // The first observation of episode 0; at the start of an episode it fills the whole history.
  const Tensor first_state = raw::narrow(data.states, 0, 0, 1);  // (1, state_dim)
  const Tensor observation = raw::contiguous(
      raw::broadcast_to(raw::unsqueeze(first_state, 0), {1, config.n_obs_steps, config.state_dim}));
  const Tensor a0 = rng.normal({1, config.horizon, config.act_dim});
  const Tensor chunk = norm.unnormalize_action(
      sample_actions(ema_policy, norm.normalize_state(observation), a0, /*steps=*/10));

  std::printf("observation (agent position) %s\n", to_string(first_state).c_str());
  std::printf("sampled action chunk (dx, dy per step): %s\n", to_string(chunk).c_str());
  std::printf("total time %.1f s\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
}
