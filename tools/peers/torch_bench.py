#!/usr/bin/env python3
"""The "PyTorch eager" peer of `mmdit bench`: the models of docs/spec/models.md and the workloads
of docs/spec/bench.md, written as a PyTorch user would write them, timed the same way.

  --check CASE.safetensors   proves this is the same function as ours: rebuilds the model of a
                             parity case in float64 and compares every expected tensor.
  --workload NAME            times a workload in float32 (default: all, each in its own process).

Needs only torch (Debian's python3-torch, 1.13) and numpy. See README.md next to this file.
"""
import argparse
import ctypes
import functools
import inspect
import json
import math
import os
import re
import resource
import statistics
import struct
import subprocess
import sys
import time

try:
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode
except ImportError as missing:
    sys.exit(f"torch_bench: {missing.name} is not installed for {sys.executable}; on Debian: "
             "apt-get install -y python3-torch, then run with /usr/bin/python3")

MASKED_LOGIT = -0.7 * torch.finfo(torch.float32).max  # the reference's constant (models.md)


# ---------------------------------------------------------------------------------------------
# The models (models.md). Parameter names are the reference's, so a parity file's
# `param/<name>` loads with load_state_dict.

def zero_linear(dim_in, dim_out):
    layer = nn.Linear(dim_in, dim_out)
    for p in layer.parameters():
        nn.init.zeros_(p)
    return layer


def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype) / half)
    angles = t[..., None] * freqs
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    def __init__(self, dim_embed, dim_out):
        super().__init__()
        self.dim_embed = dim_embed
        self.linear1 = nn.Linear(dim_embed, dim_out)
        self.linear2 = nn.Linear(dim_out, dim_out)

    def forward(self, t):
        return self.linear2(F.silu(self.linear1(timestep_embedding(t, self.dim_embed))))


class RMSNorm(nn.Module):  # also MultiHeadRMSNorm: applied to (..., heads, S, dim_head)
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gamma


def modulate(x, modulation):
    shift, scale = modulation[:, None].chunk(2, dim=-1)  # (B, 1, D) each: one per example
    return F.layer_norm(x, x.shape[-1:], eps=1e-5) * (1 + scale) + shift


class AdaptiveLayerNorm(nn.Module):
    def __init__(self, dim, dim_cond):
        super().__init__()
        self.to_modulation = zero_linear(dim_cond, 2 * dim)

    def forward(self, x, cond):
        return modulate(x, self.to_modulation(F.silu(cond)))


class ModulatedFinalLayer(nn.Module):
    def __init__(self, dim_in, dim_out, dim_cond):
        super().__init__()
        self.adaLN_modulation = zero_linear(dim_cond, 2 * dim_in)
        self.linear_out = zero_linear(dim_in, dim_out)

    def forward(self, x, cond):
        return self.linear_out(modulate(x, self.adaLN_modulation(F.silu(cond))))


class SimpleFinalLayer(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.rms_norm = RMSNorm(dim_in)
        self.linear_out = zero_linear(dim_in, dim_out)

    def forward(self, x):
        return self.linear_out(self.rms_norm(x))


class FeedForward(nn.Module):  # SwiGLU
    def __init__(self, dim, mult):
        super().__init__()
        self.linear_in = nn.Linear(dim, mult * dim, bias=False)
        self.linear_gate = nn.Linear(dim, mult * dim, bias=False)
        self.linear_out = nn.Linear(mult * dim, dim, bias=False)

    def forward(self, x):
        return self.linear_out(self.linear_in(x) * F.silu(self.linear_gate(x)))


@functools.lru_cache(maxsize=None)
def rope_tables(seq_len, dim_head, dtype):
    # Made outside inference mode, so a table first built while sampling can later be saved for
    # backward.
    with torch.inference_mode(False):
        inv_freq = 1.0 / 10000 ** (torch.arange(0, dim_head, 2, dtype=torch.float64) / dim_head)
        angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq
        angles = torch.cat([angles, angles], dim=-1)  # feature j and j + dim_head/2 share an angle
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class JointAttention(nn.Module):
    def __init__(self, dim_inputs, dim_head, heads):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner = dim_head * heads
        self.to_qkv = nn.ModuleList(nn.Linear(d, 3 * inner, bias=False) for d in dim_inputs)
        self.to_out = nn.ModuleList(nn.Linear(inner, d, bias=False) for d in dim_inputs)
        self.q_rmsnorms = nn.ModuleList(RMSNorm(dim_head) for _ in dim_inputs)
        self.k_rmsnorms = nn.ModuleList(RMSNorm(dim_head) for _ in dim_inputs)

    def forward(self, xs, mask=None):
        qs, ks, vs = [], [], []
        for m, x in enumerate(xs):
            batch, seq, _ = x.shape
            # [q | k | v], each heads x dim_head (head-major) -> three (B, heads, S, dim_head)
            q, k, v = self.to_qkv[m](x).view(batch, seq, 3, self.heads, self.dim_head).permute(
                2, 0, 3, 1, 4)
            cos, sin = rope_tables(seq, self.dim_head, x.dtype)  # positions within the modality
            qs.append(rope(self.q_rmsnorms[m](q), cos, sin))
            ks.append(rope(self.k_rmsnorms[m](k), cos, sin))
            vs.append(v)
        q, k, v = (torch.cat(t, dim=2) for t in (qs, ks, vs))
        logits = (q * self.dim_head ** -0.5) @ k.transpose(-2, -1)
        if mask is not None:
            logits = logits.masked_fill(~mask, MASKED_LOGIT)
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).flatten(2)  # (B, total, inner)
        seqs = [x.shape[1] for x in xs]
        return [to_out(o) for to_out, o in zip(self.to_out, out.split(seqs, dim=1))]


class MMDiTBlock(nn.Module):
    def __init__(self, dim_modalities, dim_cond, dim_head, heads, ff_mult):
        super().__init__()
        self.dims = list(dim_modalities)
        self.attn_layernorms = nn.ModuleList(AdaptiveLayerNorm(d, dim_cond) for d in self.dims)
        self.ff_layernorms = nn.ModuleList(AdaptiveLayerNorm(d, dim_cond) for d in self.dims)
        self.joint_attn = JointAttention(self.dims, dim_head, heads)
        self.feedforwards = nn.ModuleList(FeedForward(d, ff_mult) for d in self.dims)
        self.to_cond = zero_linear(dim_cond, 2 * sum(self.dims))

    def forward(self, xs, cond, mask):
        gates = self.to_cond(F.silu(cond))[:, None].split(self.dims * 2, dim=-1)
        attn_gates, ff_gates = gates[:len(xs)], gates[len(xs):]
        attended = self.joint_attn([ln(x, cond) for ln, x in zip(self.attn_layernorms, xs)], mask)
        xs = [x + g * a for x, g, a in zip(xs, attn_gates, attended)]
        return [x + g * ff(ln(x, cond))
                for x, g, ln, ff in zip(xs, ff_gates, self.ff_layernorms, self.feedforwards)]


class MMDiT(nn.Module):
    def __init__(self, depth, dim_modalities, dim_outs, dim_cond=1024, timestep_embed_dim=256,
                 dim_head=64, heads=8, ff_mult=4):
        super().__init__()
        embed_dims = timestep_embed_dim if isinstance(timestep_embed_dim, list) else [
            timestep_embed_dim]
        self.timestep_embeds = nn.ModuleList(TimestepEmbedding(d, dim_cond) for d in embed_dims)
        self.blocks = nn.ModuleList(MMDiTBlock(dim_modalities, dim_cond, dim_head, heads, ff_mult)
                                    for _ in range(depth))
        self.final_layers = nn.ModuleList(ModulatedFinalLayer(d, o, dim_cond)
                                          for d, o in zip(dim_modalities, dim_outs))

    def forward(self, xs, times, mask=None):
        if len(times) != len(self.timestep_embeds):
            raise ValueError(f"MMDiT: {len(times)} timesteps given, the model has "
                             f"{len(self.timestep_embeds)} conditioning variables")
        cond = sum(embed(t) for embed, t in zip(self.timestep_embeds, times))
        for block in self.blocks:
            xs = block(xs, cond, mask)
        return [final(x, cond) for final, x in zip(self.final_layers, xs)]


class InContextMMDiTBlock(nn.Module):
    def __init__(self, dim_modalities, dim_head, heads, ff_mult):
        super().__init__()
        self.attn_norms = nn.ModuleList(RMSNorm(d) for d in dim_modalities)
        self.ff_norms = nn.ModuleList(RMSNorm(d) for d in dim_modalities)
        self.joint_attn = JointAttention(dim_modalities, dim_head, heads)
        self.feedforwards = nn.ModuleList(FeedForward(d, ff_mult) for d in dim_modalities)

    def forward(self, xs, mask):
        attended = self.joint_attn([norm(x) for norm, x in zip(self.attn_norms, xs)], mask)
        xs = [x + a for x, a in zip(xs, attended)]
        return [x + ff(norm(x)) for x, norm, ff in zip(xs, self.ff_norms, self.feedforwards)]


class InContextMMDiT(nn.Module):
    def __init__(self, depth, dim_modalities, dim_outs, dim_head=64, heads=8, ff_mult=4):
        super().__init__()
        self.blocks = nn.ModuleList(InContextMMDiTBlock(dim_modalities, dim_head, heads, ff_mult)
                                    for _ in range(depth))
        self.final_layers = nn.ModuleList(SimpleFinalLayer(d, o)
                                          for d, o in zip(dim_modalities, dim_outs))

    def forward(self, xs, mask=None):
        for block in self.blocks:
            xs = block(xs, mask)
        return [final(x) for final, x in zip(self.final_layers, xs)]


class BCPolicy(nn.Module):
    """The flow-matching behaviour-cloning policy. The MMDiT also computes the observation
    stream's output, which the policy never uses (as the reference does; ours skips the dead part
    of the last block when sampling). Backward never visits it: autograd runs only what the loss
    reaches."""

    def __init__(self, n_obs_steps, state_dim, horizon, act_dim, hidden_size, depth, dim_cond,
                 timestep_embed_dim, dim_head, heads, ff_mult):
        super().__init__()
        self.state_encoder = nn.Linear(state_dim, hidden_size)
        self.action_encoder = nn.Linear(act_dim, hidden_size)
        sincos = lambda length: timestep_embedding(torch.arange(length, dtype=torch.float32),
                                                   hidden_size)
        self.register_buffer("state_pos_embed", sincos(n_obs_steps))
        self.register_buffer("action_pos_embed", sincos(100 + horizon)[100:])
        self.mmdit = MMDiT(depth, (hidden_size, hidden_size), (hidden_size, act_dim), dim_cond,
                           timestep_embed_dim, dim_head, heads, ff_mult)
        # Observation rows see everything; action rows all observations and earlier-or-same actions.
        total = n_obs_steps + horizon
        mask = torch.ones(total, total, dtype=torch.bool)
        mask[n_obs_steps:, n_obs_steps:] = torch.ones(horizon, horizon, dtype=torch.bool).tril()
        self.register_buffer("mask", mask, persistent=False)

    def encode_obs(self, state):
        return self.state_encoder(state) + self.state_pos_embed

    def velocity(self, obs_tokens, x_t, t):
        act_tokens = self.action_encoder(x_t) + self.action_pos_embed
        return self.mmdit([obs_tokens, act_tokens], [t], self.mask)[1]


def normalize(x, min_max):
    return 2 * (x - min_max[0]) / (min_max[1] - min_max[0] + 1e-8) - 1


def flow_matching_loss(policy, state, action, action_is_pad, x0, t):
    """state and action already normalised; t = 0 is noise, t = 1 is data."""
    t3 = t[:, None, None]
    v = policy.velocity(policy.encode_obs(state), t3 * action + (1 - t3) * x0, t)
    # The mean divides by every element, padded ones included (the reference's definition).
    return ((action - x0 - v) ** 2 * ~action_is_pad[..., None]).mean()


def sample(policy, state, a0, state_min_max, action_min_max, steps, max_t=1.0):
    """Euler from noise a0 to actions; the observation tokens are encoded once."""
    obs_tokens = policy.encode_obs(normalize(state, state_min_max))
    ts = torch.linspace(0, max_t, steps + 1, dtype=torch.float64).tolist()
    a = a0
    for t, t_next in zip(ts[:-1], ts[1:]):
        a = a + policy.velocity(obs_tokens, a, a.new_full(a.shape[:1], t)) * (t_next - t)
    lo, hi = action_min_max
    return (a + 1) / 2 * (hi - lo) + lo


class Trainer:
    """One step after the loss: backward, the global gradient norm (our trainer logs it; no
    clipping), AdamW, EMA. torch.optim.AdamW is optax's adamw: it first scales p by (1 - lr*wd),
    then takes the Adam step, both from the old p, so p -= lr * (m_hat/(sqrt(v_hat)+eps) + wd*p);
    --check on bc_train_step confirms it."""

    def __init__(self, model, lr, weight_decay, b1=0.9, b2=0.999, eps=1e-8, ema_decay=None):
        self.params = list(model.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=(b1, b2), eps=eps,
                                           weight_decay=weight_decay, foreach=True)
        self.ema_decay = ema_decay
        self.ema = [p.detach().clone() for p in self.params] if ema_decay is not None else None

    def step(self, loss):
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Parameters the loss never reaches (the unused observation output) get no gradient, and
        # torch's AdamW would skip them; optax's still applies their weight decay, so give them a
        # zero gradient.
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grad_norm = torch.stack(torch._foreach_norm([p.grad for p in self.params])).norm()
        self.optimizer.step()
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_mul_(self.ema, self.ema_decay)
                torch._foreach_add_(self.ema, self.params, alpha=1 - self.ema_decay)
        return loss.item(), grad_norm.item()


# ---------------------------------------------------------------------------------------------
# --check: parity cases (parity.md)

SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "BOOL": "?", "I64": "<i8"}


def read_safetensors(path):
    """(metadata, {name: tensor}); header = 8-byte little-endian length, then JSON, then data."""
    with open(path, "rb") as f:
        data = f.read()
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_len])
    meta = header.pop("__metadata__", {})
    tensors = {}
    for name, info in header.items():
        begin, end = (8 + header_len + offset for offset in info["data_offsets"])
        array = np.frombuffer(data[begin:end], dtype=SAFETENSORS_DTYPES[info["dtype"]])
        tensors[name] = torch.from_numpy(array.reshape(info["shape"]).copy())
    return meta, tensors


def prefixed(tensors, prefix):
    return {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}


def build(cls, config, tensors):
    """The float64 model of a parity case, its parameters and buffers loaded from the file
    (strict: a missing, unknown or mis-shaped name is an error naming it)."""
    arguments = inspect.signature(cls.__init__).parameters
    model = cls(**{k: v for k, v in config.items() if k in arguments}).double()
    model.load_state_dict({**prefixed(tensors, "param/"), **prefixed(tensors, "buffer/")})
    return model


def run_bc_train_step(config, tensors):
    policy = build(BCPolicy, config, tensors)
    loss = flow_matching_loss(
        policy, normalize(tensors["batch/observation.state"], tensors["norm/state_min_max"]),
        normalize(tensors["batch/action"], tensors["norm/action_min_max"]),
        tensors["batch/action_is_pad"], tensors["noise/x0"], tensors["noise/t"])
    trainer = Trainer(policy, config["lr"], config["weight_decay"], config["b1"], config["b2"],
                      config["eps"], config["ema_decay"])
    trainer.step(loss)  # from zero optimiser state; the EMA starts at the initial parameters
    results = {"loss": loss}
    for (name, p), ema in zip(policy.named_parameters(), trainer.ema):
        results.update({f"grad/param/{name}": p.grad, f"param_after/{name}": p,
                        f"ema_after/{name}": ema})
    return results


def run_bc_sample(config, tensors):
    policy = build(BCPolicy, config, tensors)
    with torch.no_grad():
        actions = sample(policy, tensors["batch/observation.state"], tensors["noise/a0"],
                         tensors["norm/state_min_max"], tensors["norm/action_min_max"],
                         config["steps"], config["max_t"])
    return {"actions": actions}


def run_model(config, tensors, cls):
    """mmdit / incontext_mmdit: outputs and the gradients of L = sum_m sum(out_m * cotangent_m)."""
    model = build(cls, config, tensors)
    inputs = prefixed(tensors, "input/")
    xs = [inputs[str(m)].requires_grad_() for m in range(len(inputs))]
    times = [tensors[f"timestep/{c}"].requires_grad_()
             for c in range(len(prefixed(tensors, "timestep/")))]
    outs = model(xs, times, tensors.get("mask")) if cls is MMDiT else model(xs, tensors.get("mask"))
    sum(((o * tensors[f"cotangent/{m}"]).sum() for m, o in enumerate(outs))).backward()
    results = {f"output/{m}": o for m, o in enumerate(outs)}
    results.update({f"grad/input/{m}": x.grad for m, x in enumerate(xs)})
    results.update({f"grad/timestep/{c}": t.grad for c, t in enumerate(times)})
    results.update({f"grad/param/{n}": p.grad for n, p in model.named_parameters()})
    return results


CHECKS = {"bc_train_step": run_bc_train_step, "bc_sample": run_bc_sample,
          "mmdit": functools.partial(run_model, cls=MMDiT),
          "incontext_mmdit": functools.partial(run_model, cls=InContextMMDiT)}


def check(path, tolerance=1e-5):
    """Prints the worst relative error (max |ours - expected| / max |expected|, per tensor) of
    each group of expected tensors; True if all are within the tolerance."""
    meta, tensors = read_safetensors(path)
    kind = meta["kind"]
    if kind not in CHECKS:
        raise SystemExit(f"{path}: kind {kind} is not supported (only {', '.join(CHECKS)})")
    results = CHECKS[kind](json.loads(meta["config"]), tensors)
    groups = {}
    for name, expected in prefixed(tensors, "expect/").items():
        if name not in results:
            raise SystemExit(f"{path}: nothing computed for expect/{name}")
        error = (results[name].detach() - expected).abs().max().item()
        scale = expected.abs().max().item()
        group = "/".join(name.split("/")[:2 if name.startswith("grad/") else 1])
        groups.setdefault(group, []).append(error / scale if scale > 0 else error)
    print(f"{path} (kind {kind}, float64, tolerance {tolerance:.0e} on the relative error)")
    ok = True
    for group, errors in groups.items():
        worst = max(errors)
        ok &= worst <= tolerance
        print(f"  {group:<14} {len(errors):4d} tensors  max rel err {worst:.2e}  "
              f"{'ok' if worst <= tolerance else 'FAIL'}")
    return ok


# ---------------------------------------------------------------------------------------------
# Benchmarks (bench.md), float32

class MatmulFlops(TorchDispatchMode):
    """Counts the matrix-product FLOPs (2 m n k each) that actually run, backward included.
    Under inference mode the composite ops (linear, matmul) reach the mode undecomposed."""
    FIRST_MATRIX_ARG = {torch.ops.aten.mm: 0, torch.ops.aten.bmm: 0, torch.ops.aten.matmul: 0,
                        torch.ops.aten.linear: 0, torch.ops.aten.addmm: 1,
                        torch.ops.aten.baddbmm: 1}

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = self.FIRST_MATRIX_ARG.get(func.overloadpacket)
        if first is not None:
            self.flops += 2 * out.numel() * args[first].shape[-1]
        return out


REFERENCE_AGENT = dict(n_obs_steps=2, state_dim=4, horizon=16, act_dim=2, hidden_size=256,
                       depth=8, dim_cond=1024, timestep_embed_dim=256, dim_head=64, heads=8,
                       ff_mult=4)


def prepare_policy_train():
    c, batch = REFERENCE_AGENT, 64
    policy = BCPolicy(**c)
    trainer = Trainer(policy, lr=1e-4, weight_decay=0.01, ema_decay=0.999)  # TrainConfig's defaults
    # Random demonstrations (8 episodes of 100 steps): the timing does not depend on the values.
    states, actions = torch.randn(800, c["state_dim"]), torch.randn(800, c["act_dim"])
    state_mm = torch.stack([states.min(0).values, states.max(0).values])
    action_mm = torch.stack([actions.min(0).values, actions.max(0).values])
    is_pad = torch.zeros(batch, c["horizon"], dtype=torch.bool)

    def rep():
        state = states[torch.randint(0, 800, (batch, c["n_obs_steps"]))]
        action = normalize(actions[torch.randint(0, 800, (batch, c["horizon"]))], action_mm)
        x0, t = torch.randn_like(action), torch.rand(batch)
        trainer.step(flow_matching_loss(policy, normalize(state, state_mm), action, is_pad, x0, t))
    return rep


def prepare_policy_act(batch):
    c = REFERENCE_AGENT
    policy = BCPolicy(**c)
    state = torch.rand(batch, c["n_obs_steps"], c["state_dim"]) * 2 - 1
    unit = torch.tensor([[-1.0], [1.0]])  # min and max of every state and action dimension

    def rep():
        with torch.inference_mode():
            a0 = torch.randn(batch, c["horizon"], c["act_dim"])
            sample(policy, state, a0, unit, unit, steps=10)
    return rep


def prepare_incontext_train():
    batch, obs_tokens, action_tokens = 8, 100, 2 + 16
    model = InContextMMDiT(depth=12, dim_modalities=(512, 256), dim_outs=(512, 256), dim_head=64,
                           heads=8, ff_mult=4)
    trainer = Trainer(model, lr=1e-4, weight_decay=1e-4)
    obs, actions = torch.randn(batch, obs_tokens, 512), torch.randn(batch, action_tokens, 256)
    target = torch.randn(batch, action_tokens, 256)
    total = obs_tokens + action_tokens
    mask = torch.ones(total, total, dtype=torch.bool)
    mask[obs_tokens:, obs_tokens:] = torch.ones(action_tokens, action_tokens).tril().bool()

    def rep():
        trainer.step(F.mse_loss(model([obs, actions], mask)[1], target))
    return rep


WORKLOADS = {"policy-train": prepare_policy_train,
             "policy-act": functools.partial(prepare_policy_act, 1),
             "policy-act-b64": functools.partial(prepare_policy_act, 64),
             "incontext-train": prepare_incontext_train}

# The second trap of our speed issue: glibc returns large freed blocks to the kernel (mmap above a
# dynamic threshold, trimming the heap top), so every step page-faults its activations in again.
# Keep everything below 4 GiB on the heap and never trim. glibc 2.36 takes these variables above
# the 32 MiB mallopt() cap (checked by where a 1 GiB block lands). The first trap, OpenMP workers
# spinning on the cores OpenBLAS's own threads need, needs no setting here: Debian's PyTorch and
# OpenBLAS's OpenMP build share one libgomp pool, whose default (spin briefly, then sleep) was the
# fastest on a quiet machine (policy-act 256 ms; OMP_WAIT_POLICY=PASSIVE 342 ms, 2 threads).
MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}


def benchmark_environment(args):
    env = dict(os.environ)
    for name, value in MALLOC_SETTINGS.items():
        env.setdefault(name, value)
    env["OMP_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = str(args.threads)
    if not args.keep_coretype:
        # Our machine's environment forces Haswell (AVX2: half this CPU's sgemm speed); a user's
        # does not. Unset, OpenBLAS 0.3.21 takes a CPU newer than itself (AVX-512 with BF16) for
        # a Prescott (SSE3, a fifth of the speed), so name the core for it.
        env.pop("OPENBLAS_CORETYPE", None)
        with open("/proc/cpuinfo") as f:
            if "avx512_bf16" in f.read().split():
                env["OPENBLAS_CORETYPE"] = "Cooperlake"
    return env


def reexec_in(env):
    """OpenMP, OpenBLAS and malloc read their variables when the process starts: run again."""
    changes = [f"{k}={v}" for k, v in env.items() if os.environ.get(k) != v]
    changes += [f"unset {k}" for k in os.environ if k not in env]
    if changes:
        print(f"torch_bench: re-running with {', '.join(changes)}", file=sys.stderr, flush=True)
        os.execve(sys.executable, [sys.executable] + sys.argv, env)


def blas_description():
    """(what torch says its BLAS is + the OpenBLAS actually loaded, OpenBLAS's core in use)."""
    built = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    blas = built.group(1) if built else "unknown"
    with open("/proc/self/maps") as f:
        libs = {line.split()[-1] for line in f if "libopenblas" in line}
    if not libs:
        return blas, "n/a"
    lib = ctypes.CDLL(libs.pop())
    lib.openblas_get_config.restype = lib.openblas_get_corename.restype = ctypes.c_char_p
    return (f"{blas} = {lib.openblas_get_config().decode()}",
            lib.openblas_get_corename().decode())


def run_workload(name, args):
    torch.manual_seed(0)
    rep = WORKLOADS[name]()
    with MatmulFlops() as counter:  # one untimed repetition, before the warm-up
        rep()
    for _ in range(args.warmup):
        rep()
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times_ms = []
    for _ in range(args.reps):
        start = time.perf_counter()
        rep()
        times_ms.append((time.perf_counter() - start) * 1e3)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    blas, core = blas_description()
    median = statistics.median(times_ms)
    return dict(workload=name, threads=torch.get_num_threads(), reps=args.reps,
                median_ms=median, min_ms=min(times_ms), max_ms=max(times_ms),
                gflop_per_rep=counter.flops / 1e9, gflops=counter.flops / 1e6 / median,
                peak_rss_mb=usage.ru_maxrss / 1024,  # the process's peak, hence one per process
                page_faults_per_rep=(usage.ru_minflt - faults_before) / args.reps,
                torch_version=torch.__version__, blas=blas, openblas_core=core,
                env={k: os.environ.get(k, "") for k in [*MALLOC_SETTINGS, "OMP_WAIT_POLICY",
                                                       "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                       "OPENBLAS_CORETYPE"]})


def run_in_subprocess(name, args):
    command = [sys.executable, os.path.abspath(__file__), "--workload", name, "--json",
               "--threads", str(args.threads), "--reps", str(args.reps),
               "--warmup", str(args.warmup)] + (["--keep-coretype"] if args.keep_coretype else [])
    output = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(output.splitlines()[-1])


def print_table(results):
    first = results[0]
    print(f"PyTorch {first['torch_version']} eager, float32, {first['threads']} threads, "
          f"{first['reps']} reps; BLAS {first['blas']}; OpenBLAS core {first['openblas_core']}")
    print("environment: " + " ".join(f"{k}={v}" for k, v in first["env"].items()))
    print(f"{'workload':<16}{'median ms':>10}{'min ms':>10}{'max ms':>10}{'GFLOP':>9}"
          f"{'GFLOP/s':>9}{'RSS MB':>8}{'faults/rep':>11}")
    for r in results:
        print(f"{r['workload']:<16}{r['median_ms']:>10.1f}{r['min_ms']:>10.1f}{r['max_ms']:>10.1f}"
              f"{r['gflop_per_rep']:>9.2f}{r['gflops']:>9.1f}{r['peak_rss_mb']:>8.0f}"
              f"{r['page_faults_per_rep']:>11.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="append", metavar="CASE.safetensors",
                        help="compare with a parity case (bc_train_step, bc_sample, mmdit, "
                             "incontext_mmdit); repeatable")
    parser.add_argument("--workload", action="append", choices=list(WORKLOADS),
                        help="repeatable; default all")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="one JSON object per workload a line")
    parser.add_argument("--keep-coretype", action="store_true",
                        help="keep OPENBLAS_CORETYPE from the environment")
    args = parser.parse_args()
    if args.check:
        results = [check(path) for path in args.check]  # every case, even after a failure
        sys.exit(0 if all(results) else 1)
    reexec_in(benchmark_environment(args))
    torch.set_num_threads(args.threads)
    names = args.workload or list(WORKLOADS)
    results = ([run_workload(names[0], args)] if len(names) == 1
               else [run_in_subprocess(name, args) for name in names])
    if args.json:
        for r in results:
            print(json.dumps(r))
    else:
        print_table(results)


if __name__ == "__main__":
    main()
