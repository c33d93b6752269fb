"""The PyTorch side of the vs-torch benchmark: diffusers' DiT with group attention.

diffusers' `DiTTransformer2DModel` is the same adaLN-Zero transformer as models/sit.py (patch
embedding, fixed sin-cos positions, timestep + label conditioning, adaLN-Zero blocks with a
tanh-GELU MLP, final adaLN layer). Configured as SiT here: out_channels = in_channels (no learned
sigma), LayerNorm eps 1e-6, label table with a null class. The GroupDiff change is added the
PyTorch way, as an attention processor that joins the tokens of each group along the sequence
before `scaled_dot_product_attention` and splits them again after:

  rows [0, n_cond) in groups of `cond`, rows [n_cond, n) in groups of `uncond`

(GroupDiff-l: conditional images alone, unconditional ones in groups of N), in one model pass.
Differences that cost nothing measurable: diffusers recomputes the (tiny) timestep/label embedding
in every block, and the GroupDiff sample embedding (a [B, hidden] table lookup) is left out.

Everything runs eager in float32 unless `compiled` asks for `torch.compile`. torch is imported
with this module.
"""
import dataclasses

import torch
from diffusers import DiTTransformer2DModel
from torch.nn import functional as F

from groupdiff_jax.sampling import torch_reference


@dataclasses.dataclass(frozen=True)
class Groups:
  """Rows [0, n_cond) in groups of `cond`, the rest in groups of `uncond`."""
  n_cond: int
  cond: int
  uncond: int


class GroupAttnProcessor:
  """Self-attention over the joined tokens of each group (group size 1 = plain DiT attention)."""

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
               temb=None, groups: Groups | None = None):
    del encoder_hidden_states, attention_mask, temb  # DiT: self-attention, no mask
    n, t, d = hidden_states.shape
    heads = attn.heads
    q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    groups = groups or Groups(n, 1, 1)
    parts = []
    for lo, hi, g in ((0, groups.n_cond, groups.cond), (groups.n_cond, n, groups.uncond)):
      if hi <= lo:
        continue
      # GroupDiff: (rows, T, D) -> (rows / g, heads, g * T, D / heads), attention, and back.
      q_, k_, v_ = (a[lo:hi].reshape((hi - lo) // g, g * t, heads, d // heads).transpose(1, 2)
                    for a in (q, k, v))
      out = F.scaled_dot_product_attention(q_, k_, v_)
      parts.append(out.transpose(1, 2).reshape(hi - lo, t, d))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return attn.to_out[1](attn.to_out[0](out))  # projection, dropout (p = 0)


def build(depth: int, hidden: int, heads: int, patch: int, input_size: int, channels: int,
          num_classes: int, seed: int = 0) -> DiTTransformer2DModel:
  """A randomly initialised SiT-shaped diffusers DiT with the group attention processor."""
  torch.manual_seed(seed)
  model = DiTTransformer2DModel(
      num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=channels,
      out_channels=channels, num_layers=depth, sample_size=input_size, patch_size=patch,
      num_embeds_ada_norm=num_classes, norm_eps=1e-6)
  processor = GroupAttnProcessor()
  for block in model.transformer_blocks:
    block.attn1.set_processor(processor)
    # The batch carries its null labels (as the jax step's): no random label dropout on top.
    block.norm1.emb.class_embedder.dropout_prob = 0.0
  # adaLN-Zero initialises the modulation to zero; random values instead so that no
  # multiplication by an exact zero is cheaper than it would be in a trained model.
  with torch.no_grad():
    for p in model.parameters():
      if not p.any():
        p.normal_(0.0, 0.02)
  return model


def forward(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, groups: Groups):
  """The velocity [B, C, H, W] at (x_t, t) for labels y (num_classes = the null label)."""
  return model(x, t, y, cross_attention_kwargs={'groups': groups}, return_dict=False)[0]


def make_train_step(model, *, lr: float, betas: tuple[float, float], eps: float,
                    weight_decay: float, grad_clip: float, ema_decay: float, compiled: bool):
  """(x, y, groups) -> loss: flow-matching loss, backward, clipping, AdamW, EMA, as the jax step.

  AdamW with PyTorch's defaults for the implementation (what a training script gets); weight
  decay on Linear/conv weights only, as the jax optimizer's mask.
  """
  decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and 'emb' not in n]
  no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and 'emb' not in n)]
  opt = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                           {'params': no_decay, 'weight_decay': 0.0}], lr=lr, betas=betas, eps=eps)
  params = list(model.parameters())
  ema = [p.detach().clone() for p in params]
  model.train()

  def loss_fn(x, y, groups):
    t = torch.rand(x.shape[0])
    noise = torch.randn_like(x)
    x_t = (1 - t)[:, None, None, None] * x + t[:, None, None, None] * noise
    pred = forward(model, x_t, t, y, groups)
    return F.mse_loss(pred, noise - x)

  loss_fn = torch.compile(loss_fn) if compiled else loss_fn

  def step(x, y, groups):
    loss = loss_fn(x, y, groups)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
      torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1.0 - ema_decay)  # pylint: disable=protected-access
    return loss.detach()

  return step


def make_forward(model, compiled: bool):
  """(x, t, y, groups) -> velocity under no_grad, eager or torch.compile'd."""
  model.eval()
  fn = torch.compile(forward) if compiled else forward

  def run(x, t, y, groups):
    with torch.no_grad():
      return fn(model, x, t, y, groups)

  return run


def make_attention(q, k, v, d_out):
  """(run, (q, k, v)): run() is scaled_dot_product_attention of the [B, L, H, D] arrays (as
  heads-first views, what diffusers' processor passes) and its backward; the three returned
  leaves hold the gradients of the last run."""
  leaves = tuple(torch.from_numpy(a).transpose(1, 2).requires_grad_() for a in (q, k, v))
  d_out = torch.from_numpy(d_out).transpose(1, 2)

  def run():
    for a in leaves:
      a.grad = None
    torch.nn.functional.scaled_dot_product_attention(*leaves).backward(d_out)

  return run, leaves


class _Velocity(torch.nn.Module):
  """torch_reference.sample_sde's model interface (x, t, y, group) over the diffusers DiT."""

  def __init__(self, model):
    super().__init__()
    self.model = model

  def forward(self, x, t, y, group):  # pylint: disable=arguments-differ
    return forward(self.model, x, t, y, Groups(x.shape[0], group, group))


def make_sampler(model, *, num_steps: int, cfg_scale: float, guidance_low: float,
                 guidance_high: float, cond_group: int, uncond_group: int, null_label: int,
                 guided_channels: int, last_step_size: float):
  """(noise, labels) -> samples: the plain Euler-Maruyama CFG loop of torch_reference."""
  velocity = _Velocity(model.eval())

  def run(noise, labels):
    return torch_reference.sample_sde(
        velocity, noise, labels, num_steps=num_steps, cfg_scale=cfg_scale,
        guidance_low=guidance_low, guidance_high=guidance_high, cond_group=cond_group,
        uncond_group=uncond_group, null_label=null_label, guided_channels=guided_channels,
        last_step_size=last_step_size)

  return run


def random_inputs(batch: int, channels: int, size: int, num_classes: int, seed: int = 0):
  g = torch.Generator().manual_seed(seed)
  x = torch.randn(batch, channels, size, size, generator=g)
  y = torch.randint(0, num_classes, (batch,), generator=g)
  t = torch.rand(batch, generator=g)
  return x, t, y

