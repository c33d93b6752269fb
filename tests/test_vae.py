"""SD-VAE parity with diffusers' AutoencoderKL (random init, small config), sharding, loading."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from groupdiff_jax.models import vae, vae_weights

torch = pytest.importorskip('torch', reason='VAE parity needs torch (the test extra)')
diffusers = pytest.importorskip('diffusers', reason='VAE parity needs diffusers (the test extra)')

SMALL = dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
             norm_num_groups=8, latent_channels=4, sample_size=32,
             down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """A randomised diffusers AutoencoderKL saved in diffusers format."""
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(**SMALL).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:  # GroupNorm affine: away from the (1, 0) init so it is exercised
        base = 1.0 if name.endswith('weight') else 0.0
        p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
      else:
        fan_in = p[0].numel() if p.ndim > 1 else 64
        p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))
  path = tmp_path_factory.mktemp('vae')
  model.save_pretrained(str(path), safe_serialization=True)
  return model, str(path)


@pytest.fixture(scope='module')
def ours(reference):
  return vae.load(reference[1])


def _images(n, seed):
  return np.random.default_rng(seed).uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize('n,seed', [(8, 0), (3, 1), (11, 2)])  # batches not divisible by 8 too
def test_encode_decode_match_diffusers(reference, ours, n, seed):
  ref, _ = reference
  x = _images(n, seed)
  with torch.no_grad():
    dist = ref.encode(_nchw(x)).latent_dist
    # Latents NHWC; two blocks downsample by 2. Scaled like real latents (z * 0.18215).
    z = np.random.default_rng(seed + 10).standard_normal((n, 16, 16, 4)).astype(np.float32)
    images = ref.decode(_nchw(z) / vae.SCALE).sample
  with jax.default_matmul_precision('highest'):
    mean, logvar = ours.moments(x)
    lat = ours.encode(x)
    dec = ours.decode(z)
  assert lat.shape == (n, 16, 16, 4) and dec.shape == (n, 32, 32, 3)
  assert rel_err(mean, _nhwc(dist.mean)) <= 1e-5
  assert rel_err(logvar, _nhwc(dist.logvar)) <= 1e-5
  assert rel_err(lat, _nhwc(dist.mean) * 0.18215) <= 1e-5
  assert rel_err(dec, _nhwc(images)) <= 1e-5
  if n % len(jax.devices()) == 0:  # the batch is split over all devices of the 1-D mesh
    assert lat.sharding.spec == jax.sharding.PartitionSpec(('batch',))


def test_posterior_sample(ours):
  x = _images(8, 5)
  key = jax.random.key(3)
  with jax.default_matmul_precision('highest'):
    mean, logvar = ours.moments(x)
    s1, s2 = ours.encode(x, rng=key, sample=True), ours.encode(x, rng=key, sample=True)
    other = ours.encode(x, rng=jax.random.key(4), sample=True)
  np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))  # deterministic given rng
  assert np.abs(np.asarray(s1) - np.asarray(other)).max() > 1e-3
  eps = (np.asarray(s1) / vae.SCALE - np.asarray(mean)) / np.exp(0.5 * np.asarray(logvar))
  assert abs(eps.mean()) < 0.1 and abs(eps.std() - 1) < 0.1  # mean + std * N(0, 1)
  with pytest.raises(ValueError, match='rng'):
    ours.encode(x, sample=True)


def test_explicit_mesh_and_scale_constant(reference):
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, -1), ('data', 'fsdp'))
  enc = vae.load(reference[1], mesh=mesh)
  assert enc.scaling_factor == vae.SCALE == 0.18215
  x = _images(8, 7)
  lat = enc.encode(x)
  assert lat.sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'))
  with jax.default_matmul_precision('highest'):
    np.testing.assert_allclose(np.asarray(lat), np.asarray(vae.load(reference[1]).encode(x)),
                               rtol=0, atol=1e-5)


def test_old_attention_names_load(reference, tmp_path, ours):
  """sd-vae-ft-* safetensors use query/key/value/proj_attn (and 1x1-conv shaped) weights."""
  from safetensors.numpy import load_file, save_file
  _, path = reference
  sd = load_file(os.path.join(path, vae_weights.WEIGHTS_FILE))
  renames = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
  old = {}
  for k, v in sd.items():
    for new, legacy in renames.items():
      if f'.{new}.' in k:
        k = k.replace(f'.{new}.', f'.{legacy}.')
        v = v.reshape(v.shape + (1, 1)) if v.ndim == 2 else v
    old[k] = v
  assert any('.proj_attn.' in k for k in old)
  save_file(old, str(tmp_path / vae_weights.WEIGHTS_FILE))
  with open(os.path.join(path, 'config.json')) as f:
    (tmp_path / 'config.json').write_text(f.read())
  legacy = vae.load(str(tmp_path))
  x = _images(8, 9)
  with jax.default_matmul_precision('highest'):
    np.testing.assert_array_equal(np.asarray(legacy.encode(x)), np.asarray(ours.encode(x)))


def test_round_trip_and_bad_weights(reference, tmp_path):
  from flax import nnx
  from safetensors.numpy import load_file, save_file
  _, path = reference
  sd = load_file(os.path.join(path, vae_weights.WEIGHTS_FILE))
  cfg, scale = vae_weights.config_from_diffusers(json.load(open(os.path.join(path, 'config.json'))))
  assert scale == 0.18215 and cfg.block_out_channels == (32, 64) and cfg.norm_num_groups == 8
  target = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: vae.create(cfg)), nnx.Param))
  params = vae_weights.diffusers_to_params(sd, target)
  back = vae_weights.params_to_diffusers(params)
  assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
  broken = dict(sd)
  del broken['decoder.conv_out.bias']
  broken['encoder.extra.weight'] = np.zeros(3, np.float32)
  broken['encoder.conv_in.weight'] = np.zeros((32, 3, 5, 5), np.float32)
  with pytest.raises(vae_weights.VAEWeightsError) as err:
    vae_weights.diffusers_to_params(broken, target)
  for text in ('missing', 'decoder.conv_out.bias', 'unexpected', 'encoder.extra.weight',
               'wrong shapes', 'encoder.conv_in.weight (32, 3, 5, 5)'):
    assert text in str(err.value)
  save_file(broken, str(tmp_path / vae_weights.WEIGHTS_FILE))
  with pytest.raises(vae_weights.VAEWeightsError, match='config.json'):
    vae.load(str(tmp_path))
  with pytest.raises(vae_weights.VAEWeightsError, match='only UpDecoderBlock2D'):
    vae_weights.config_from_diffusers({'up_block_types': ['AttnUpDecoderBlock2D']})


def test_save_diffusers_loads_in_diffusers(tmp_path):
  """save_diffusers writes a folder diffusers' own loader reads, with the same encoder."""
  cfg = vae.VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
  vae_weights.save_diffusers(vae.create(cfg, seed=3), str(tmp_path))
  ref = diffusers.AutoencoderKL.from_pretrained(str(tmp_path)).eval()
  x = _images(2, 11)
  with torch.no_grad():
    mean = _nhwc(ref.encode(_nchw(x)).latent_dist.mean)
  with jax.default_matmul_precision('highest'):
    ours, _ = vae.load(str(tmp_path)).moments(x)
  assert rel_err(ours, mean) <= 1e-5
