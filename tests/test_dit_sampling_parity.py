"""A converted official DiT samples here as in the official code.

A tiny DiT in the diffusers format (random weights, tests/dit_reference.py) is renamed to the
official state dict, converted with groupdiff_jax.convert, and sampled with the registry's 'ddpm'
sampler. The reference is diffusers' DiTPipeline loop run by hand with the two changes that make
it the official DiT sampler: the scheduler is DDPMScheduler with variance_type='learned_range'
fed the full 8-channel output (DiTPipeline drops the variance channels), on DiT's respaced grid
(custom timesteps); the step noise is ours, injected into the scheduler. Both start from the same
noise with the same labels; CFG 1 (conditional pass only) and > 1 (the unconditional pass in
groups of 1, as DiT; on all channels as DiTPipeline, or the first 3 as the official DiT).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dit_reference import (CH, HEADS, SIDE, diffusers_to_official, float64_ddpm_scheduler,
                           make_diffusers_dit)

from groupdiff_jax import convert
from groupdiff_jax.diffusion import ddpm, registry, samplers
from groupdiff_jax.models import sit

torch = pytest.importorskip('torch', reason='the diffusers reference needs torch')
ddpm_module = pytest.importorskip('diffusers.schedulers.scheduling_ddpm',
                                  reason='the reference is diffusers')

BATCH, NULL = 4, 1000


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  """(diffusers reference, our converted model) computing the same function."""
  ref = make_diffusers_dit(learn_sigma=True, seed=11)
  with torch.no_grad():  # tame the random weights: a chain of steps stays well conditioned
    for p in ref.parameters():
      p.mul_(0.3)
  sd = diffusers_to_official(ref)
  sd['pos_embed'] = sit.sincos_pos_embed(HEADS * 16, SIDE // 2)[None]
  d = tmp_path_factory.mktemp('dit')
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, str(d / 'dit.pt'))
  convert.convert_file(str(d / 'dit.pt'), 'dit', str(d / 'ckpt'), heads=HEADS, max_group_size=0,
                       verbose=False)
  model, meta = convert.load_converted(str(d / 'ckpt'))
  assert meta['objective'] == registry.SAMPLERS['ddpm'].objective
  return ref, model


def dit_grid(num_steps: int) -> list[int]:
  """DiT's space_timesteps(1000, 'N') with one section: round(j * 999 / (N - 1))."""
  return sorted({round(j * 999 / (num_steps - 1)) for j in range(num_steps)})


def ours(model, noise, labels, rng, num_steps, cfg_scale, guided_channels):
  settings = registry.Settings(num_steps=num_steps, cfg_scale=cfg_scale, cond_group_size=1,
                               uncond_group_size=1, guided_channels=guided_channels,
                               null_label=NULL)
  model_fn = lambda x, t, y, g, k: model(x, t, y, group_size=g)  # noqa: E731
  with jax.default_matmul_precision('highest'):
    run = jax.jit(lambda n, y, k: registry.SAMPLERS['ddpm'].run(model_fn, n, y, k, settings))
    return np.asarray(run(jnp.asarray(noise), jnp.asarray(labels), rng))


def step_noises(rng, num_steps, shape):
  """The noise our sampler adds at each step, in step order: split_keys(rng, num_steps), then
  the second half of each step key (the first is the model's)."""
  keys = samplers.split_keys(rng, num_steps)
  return [np.asarray(jax.random.normal(samplers.split_keys(keys[i], 2)[1], shape))
          for i in range(num_steps)]


def reference(ref, noise, labels, zs, num_steps, cfg_scale, guided_channels, monkeypatch,
              max_steps=None):
  """DiTPipeline's loop with DiT's learned-range DDPM scheduler and our step noises `zs`, for
  the first `max_steps` steps (all by default). NHWC in and out."""
  sched = float64_ddpm_scheduler('learned_range')
  sched.set_timesteps(timesteps=dit_grid(num_steps)[::-1])
  queue = [torch.from_numpy(np.array(z.transpose(0, 3, 1, 2))).double() for z in zs]
  monkeypatch.setattr(ddpm_module, 'randn_tensor', lambda *a, **k: queue.pop(0))
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
  latents, y = nchw(noise), torch.from_numpy(labels.astype(np.int64))
  guided = guided_channels or CH
  for t in sched.timesteps[:max_steps]:
    x_in, y_in = latents, y
    if cfg_scale > 1:
      x_in, y_in = torch.cat([latents, latents]), torch.cat([y, torch.full_like(y, NULL)])
    with torch.no_grad():
      out = ref(x_in.float(), timestep=t.expand(len(x_in)), class_labels=y_in).sample
    if cfg_scale > 1:
      cond, uncond = out[:BATCH], out[BATCH:]
      eps = uncond[:, :guided] + cfg_scale * (cond[:, :guided] - uncond[:, :guided])
      out = torch.cat([eps, cond[:, guided:]], 1)  # the rest of eps and the variance: cond
    latents = sched.step(out.double(), t, latents.double()).prev_sample.float()
  assert not queue  # every step drew exactly one noise (the last, t = 0, adds none)
  return latents.numpy().transpose(0, 2, 3, 1)


CFG_CASES = pytest.mark.parametrize('cfg_scale,guided_channels', [(1.0, 0), (4.0, 0), (4.0, 3)],
                                    ids=['cfg1', 'cfg4_all', 'cfg4_legacy3'])


def inputs(seed: int):
  rng = np.random.default_rng(seed)
  noise = rng.standard_normal((BATCH, SIDE, SIDE, CH)).astype(np.float32)
  return noise, np.array([3, 17, 999, 500], np.int32)


def rel_err(a, b) -> float:
  return float(np.abs(a - b).max() / np.abs(b).max())


@CFG_CASES
def test_one_step_of_the_250_step_grid(models, monkeypatch, cfg_scale, guided_channels):
  """The first step (t = 999 -> 995): our DDPM pieces as sample_loop composes them."""
  ref, model = models
  noise, labels = inputs(0)
  z = np.random.default_rng(1).standard_normal(noise.shape).astype(np.float32)
  diffusion = ddpm.DDPM.create(respacing='250')
  i = jnp.full((BATCH,), diffusion.num_steps - 1)
  with jax.default_matmul_precision('highest'):
    t = diffusion.model_t(i)
    out = model(jnp.asarray(noise), t, jnp.asarray(labels))
    if cfg_scale != 1.0:
      uncond = model(jnp.asarray(noise), t, jnp.full((BATCH,), NULL))
      out = ddpm.guided_output(out, uncond, cfg_scale, CH, guided_channels)
    x = np.asarray(diffusion.p_sample(out, jnp.asarray(noise), i, jnp.asarray(z)))
  expect = reference(ref, noise, labels, [z], 250, cfg_scale, guided_channels, monkeypatch,
                     max_steps=1)
  assert rel_err(x, expect) <= 1e-5, rel_err(x, expect)


@CFG_CASES
def test_short_sample_with_the_registry_sampler(models, monkeypatch, cfg_scale,
                                                guided_channels):
  """A whole 6-step trajectory of registry.SAMPLERS['ddpm'], noise to x_0."""
  ref, model = models
  num_steps, key = 6, jax.random.key(5)
  noise, labels = inputs(2)
  x0 = ours(model, noise, labels, key, num_steps, cfg_scale, guided_channels)
  zs = step_noises(key, num_steps, noise.shape)[:-1]  # the step at t = 0 adds no noise
  expect = reference(ref, noise, labels, zs, num_steps, cfg_scale, guided_channels, monkeypatch)
  print(f'cfg {cfg_scale}/{guided_channels}: rel err {rel_err(x0, expect):.2e}')
  assert rel_err(x0, expect) <= 1e-5
  assert np.abs(x0 - noise).max() > 1e-1  # the sampler moved the noise
