"""A tiny diffusers DiT (`DiTTransformer2DModel`, an implementation we did not write), randomly
initialised and renamed to the official DiT state-dict names: the independent reference of the
conversion and DiT-sampling parity tests.

Two known differences between diffusers and the official DiT are bridged explicitly:
  * diffusers keeps one timestep/label embedder per block (its DiT conversion copies the same
    weights into each); we tie them to block 0's;
  * diffusers' DiT time embedding uses `downscale_freq_shift=1` (frequencies 10000^(-k/127)),
    the official DiT/SiT `exp(-ln(10000) k / 128)`, i.e. shift 0; we set shift 0
    (test_convert.py checks that diffusers' features with shift 0 equal ours).
"""
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='the diffusers reference needs torch (the test extra)')

DEPTH, HEADS, HEAD_DIM, SIDE, PATCH, CH = 2, 2, 16, 8, 2, 4
HIDDEN = HEADS * HEAD_DIM


def make_diffusers_dit(learn_sigma: bool, seed: int):
  diffusers = pytest.importorskip('diffusers', reason='parity tests need diffusers')
  torch.manual_seed(seed)
  model = diffusers.DiTTransformer2DModel(
      num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=CH,
      out_channels=2 * CH if learn_sigma else CH, num_layers=DEPTH, sample_size=SIDE,
      patch_size=PATCH, num_embeds_ada_norm=1000, norm_eps=1e-6).eval()
  # Randomise every parameter: the official init zeroes adaLN and the final layer, which would
  # make the comparison vacuous.
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for p in model.parameters():
      fan_in = p.shape[1] * (p[0, 0].numel() if p.ndim > 2 else 1) if p.ndim >= 2 else 16
      p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))
    emb0 = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks:
      block.norm1.emb.load_state_dict(emb0.state_dict())  # one shared t/y embedder, as DiT
      block.norm1.emb.time_proj.downscale_freq_shift = 0  # the official DiT frequencies
  return model


# diffusers name -> official name; q/k/v are concatenated into qkv separately.
_RENAMES = {
    'pos_embed.proj': 'x_embedder.proj',
    'transformer_blocks.0.norm1.emb.timestep_embedder.linear_1': 't_embedder.mlp.0',
    'transformer_blocks.0.norm1.emb.timestep_embedder.linear_2': 't_embedder.mlp.2',
    'transformer_blocks.0.norm1.emb.class_embedder.embedding_table': 'y_embedder.embedding_table',
    'proj_out_1': 'final_layer.adaLN_modulation.1',
    'proj_out_2': 'final_layer.linear',
}
_BLOCK_RENAMES = {'norm1.linear': 'adaLN_modulation.1', 'attn1.to_out.0': 'attn.proj',
                  'ff.net.0.proj': 'mlp.fc1', 'ff.net.2': 'mlp.fc2'}


def diffusers_to_official(model) -> dict[str, np.ndarray]:
  sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  out, used = {}, set()
  for src, dst in _RENAMES.items():
    for leaf in ('weight', 'bias'):
      if f'{src}.{leaf}' in sd:
        out[f'{dst}.{leaf}'] = sd[f'{src}.{leaf}']
        used.add(f'{src}.{leaf}')
  for i in range(DEPTH):
    pre = f'transformer_blocks.{i}.'
    for src, dst in _BLOCK_RENAMES.items():
      for leaf in ('weight', 'bias'):
        out[f'blocks.{i}.{dst}.{leaf}'] = sd[f'{pre}{src}.{leaf}']
        used.add(f'{pre}{src}.{leaf}')
    for leaf in ('weight', 'bias'):
      names = [f'{pre}attn1.to_{n}.{leaf}' for n in 'qkv']
      out[f'blocks.{i}.attn.qkv.{leaf}'] = np.concatenate([sd[n] for n in names])
      used.update(names)
    used.update(k for k in sd if k.startswith(pre + 'norm1.emb.'))  # tied copies
  assert not set(sd) - used, f'unmapped diffusers keys: {sorted(set(sd) - used)}'
  return out


def run_diffusers(model, x_nhwc, t, y):
  with torch.no_grad():
    out = model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))),
                timestep=torch.from_numpy(np.asarray(t, np.float32)),
                class_labels=torch.from_numpy(np.asarray(y, np.int64))).sample
  return out.numpy().transpose(0, 2, 3, 1)


def float64_ddpm_scheduler(variance_type: str = 'learned_range'):
  """diffusers' DDPMScheduler for DiT's schedule (linear betas 1e-4 .. 0.02, 1000 steps, eps
  prediction, no clipping) with float64 tables: DiT builds its tables in float64, and diffusers'
  float32 cumprod loses ~1e-4 relative near t = 0 (1 - alpha_bar ~ 1e-4), so a like-for-like
  reference needs float64."""
  diffusers = pytest.importorskip('diffusers', reason='the reference is diffusers')
  sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule='linear',
                                  beta_start=1e-4, beta_end=0.02, variance_type=variance_type,
                                  clip_sample=False, prediction_type='epsilon')
  sched.betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
  sched.alphas = 1.0 - sched.betas
  sched.alphas_cumprod = torch.cumprod(sched.alphas, 0)
  sched.one = torch.tensor(1.0, dtype=torch.float64)
  return sched
