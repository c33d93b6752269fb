"""A plain PyTorch (eager) SiT with group attention and an Euler-Maruyama CFG sampler: the side-by-
side reference of the sampling benchmark. Same architecture and shapes as models/sit.py (adaLN-Zero
blocks, group attention over the tokens of a group) and the same work per trajectory as the JAX
sampler (conditional pass every step, grouped unconditional pass only inside the guidance
interval), written the way a PyTorch sampling script runs it. Random weights: only speed counts.
torch is imported when this module is.
"""
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class _Block(nn.Module):
  def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(hidden, 3 * hidden)
    self.proj = nn.Linear(hidden, hidden)
    self.fc1 = nn.Linear(hidden, int(hidden * mlp_ratio))
    self.fc2 = nn.Linear(int(hidden * mlp_ratio), hidden)
    self.ada = nn.Linear(hidden, 6 * hidden)

  def forward(self, x, c, group: int):
    n, t, d = x.shape
    sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c)).chunk(6, dim=-1)
    h = F.layer_norm(x, (d,), eps=1e-6) * (1 + sc1[:, None]) + sh1[:, None]
    qkv = self.qkv(h).reshape(n // group, group * t, 3, self.heads, d // self.heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (groups, heads, group*tokens, head_dim)
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)
    x = x + g1[:, None] * self.proj(a)
    h = F.layer_norm(x, (d,), eps=1e-6) * (1 + sc2[:, None]) + sh2[:, None]
    return x + g2[:, None] * self.fc2(F.gelu(self.fc1(h), approximate='tanh'))


class TorchSiT(nn.Module):
  def __init__(self, depth: int, hidden: int, heads: int, patch: int, input_size: int,
               channels: int, num_classes: int, max_group_size: int = 4):
    super().__init__()
    self.patch, self.channels, self.grid = patch, channels, input_size // patch
    self.x_embed = nn.Linear(patch * patch * channels, hidden)
    self.register_buffer('pos', torch.randn(1, self.grid ** 2, hidden) * 0.02)
    self.t_mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
    self.y_embed = nn.Embedding(num_classes + 1, hidden)
    self.s_embed = nn.Embedding(max_group_size, hidden)
    self.blocks = nn.ModuleList(_Block(hidden, heads) for _ in range(depth))
    self.final_ada = nn.Linear(hidden, 2 * hidden)
    self.final = nn.Linear(hidden, patch * patch * channels)

  def forward(self, x, t, y, group: int):
    n, p, c, g = x.shape[0], self.patch, self.channels, self.grid
    tokens = x.reshape(n, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(n, g * g, p * p * c)
    h = self.x_embed(tokens) + self.pos
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    angles = t[:, None] * freqs[None]
    ids = torch.arange(n) % group
    cond = (self.t_mlp(torch.cat([angles.cos(), angles.sin()], -1)) + self.y_embed(y)
            + self.s_embed(ids))
    for block in self.blocks:
      h = block(h, cond, group)
    shift, scale = self.final_ada(F.silu(cond)).chunk(2, dim=-1)
    out = self.final(F.layer_norm(h, (h.shape[-1],), eps=1e-6) * (1 + scale[:, None])
                     + shift[:, None])
    return out.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, g * p, g * p)


@torch.no_grad()
def sample_sde(model: TorchSiT, noise: torch.Tensor, labels: torch.Tensor, *, num_steps: int,
               cfg_scale: float, guidance_low: float, guidance_high: float, cond_group: int,
               uncond_group: int, null_label: int, guided_channels: int,
               last_step_size: float = 0.04) -> torch.Tensor:
  """Euler-Maruyama (SBDM diffusion, last mean step) with group CFG inside the interval."""
  ts = 1.0 - np.linspace(0.0, 1.0 - last_step_size, num_steps)
  null = torch.full_like(labels, null_label)
  k = guided_channels or noise.shape[1]

  def drift(x, t):
    tt = torch.full((x.shape[0],), float(t))
    v = model(x, tt, labels, cond_group)
    if cfg_scale != 1.0 and guidance_low <= t <= guidance_high:
      u = model(x, tt, null, uncond_group)
      v = torch.cat([u[:, :k] + cfg_scale * (v[:, :k] - u[:, :k]), v[:, k:]], 1)
    w = min(max(t, 1e-4), 0.999) / (1 - min(max(t, 1e-4), 0.999))
    return v - w * (-(1 - t) * v - x) / t

  x = noise
  for t_cur, t_next in zip(ts[:-1], ts[1:]):
    dt = t_cur - t_next
    w = min(max(t_cur, 1e-4), 0.999) / (1 - min(max(t_cur, 1e-4), 0.999))
    x = x - drift(x, t_cur) * dt + math.sqrt(2 * w * dt) * torch.randn_like(x)
  return x - drift(x, ts[-1]) * ts[-1]
