"""The SD-VAE (AutoencoderKL of stabilityai/sd-vae-ft-ema / -mse) in Flax NNX, NHWC.

Architecture as diffusers' AutoencoderKL with DownEncoderBlock2D / UpDecoderBlock2D blocks:
  encoder: conv_in -> down blocks (resnets, stride-2 conv with right/bottom zero pad) -> mid
           (resnet, single-head spatial self-attention, resnet) -> GroupNorm, SiLU, conv_out
           -> quant_conv -> (mean, logvar)
  decoder: post_quant_conv -> conv_in -> mid -> up blocks (layers_per_block + 1 resnets,
           nearest x2 + conv) -> GroupNorm, SiLU, conv_out
Module and attribute names mirror diffusers' parameter names (`vae_weights` maps them), so a
diffusers directory (config.json + diffusion_pytorch_model.safetensors) loads with `load(dir)`.

Latents are `SCALE * z` (z the posterior mean or a sample), images are in [-1, 1]. `SDVAE.encode`
and `SDVAE.decode` are jitted and split the batch over every device of a mesh.
"""
import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

SCALE = 0.18215  # SD-VAE latent scaling (sd-vae-ft-ema / -mse); DiT/SiT/REPA/GroupDiff use it
EPS = 1e-6       # GroupNorm epsilon everywhere in the SD-VAE


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The diffusers AutoencoderKL config fields that shape the network (sd-vae-ft-* defaults)."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  latent_channels: int = 4
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: str = 'float32'  # compute dtype of convolutions; norms and attention run in float32

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


# --- layers ---------------------------------------------------------------------------------

def _conv(cfg: VAEConfig, c_in: int, c_out: int, rngs: nnx.Rngs, *, k: int = 3, stride: int = 1,
          padding: Any = None) -> nnx.Conv:
  pad = ((k // 2, k // 2),) * 2 if padding is None else padding
  return nnx.Conv(c_in, c_out, kernel_size=(k, k), strides=stride, padding=pad,
                  dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32, rngs=rngs)


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm on NHWC: contiguous channel groups, biased variance, float32."""

  def __init__(self, channels: int, groups: int):
    self.groups = groups
    self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(n, h, w, self.groups, c // self.groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) * jax.lax.rsqrt(var + EPS)
    return g.reshape(n, h, w, c) * self.scale[...] + self.bias[...]


class ResnetBlock(nnx.Module):
  def __init__(self, cfg: VAEConfig, c_in: int, c_out: int, rngs: nnx.Rngs):
    self.norm1 = GroupNorm(c_in, cfg.norm_num_groups)
    self.conv1 = _conv(cfg, c_in, c_out, rngs)
    self.norm2 = GroupNorm(c_out, cfg.norm_num_groups)
    self.conv2 = _conv(cfg, c_out, c_out, rngs)
    self.conv_shortcut = _conv(cfg, c_in, c_out, rngs, k=1) if c_in != c_out else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x))).astype(jnp.float32)
    h = self.conv2(jax.nn.silu(self.norm2(h))).astype(jnp.float32)
    skip = x if self.conv_shortcut is None else self.conv_shortcut(x).astype(jnp.float32)
    return skip + h


class Attention(nnx.Module):
  """Single-head self-attention over the H*W positions (the VAE mid block), with residual."""

  def __init__(self, cfg: VAEConfig, c: int, rngs: nnx.Rngs):
    self.group_norm = GroupNorm(c, cfg.norm_num_groups)
    dense = functools.partial(nnx.Linear, c, c, param_dtype=jnp.float32, rngs=rngs)
    self.to_q, self.to_k, self.to_v, self.to_out = dense(), dense(), dense(), dense()

  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    t = self.group_norm(x).reshape(n, h * w, c)
    q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
    probs = jax.nn.softmax(jnp.einsum('nqc,nkc->nqk', q, k) / math.sqrt(c), axis=-1)
    out = self.to_out(jnp.einsum('nqk,nkc->nqc', probs, v))
    return x + out.reshape(n, h, w, c)


class Downsample(nnx.Module):
  def __init__(self, cfg: VAEConfig, c: int, rngs: nnx.Rngs):
    # diffusers pads right/bottom by one, then a VALID stride-2 conv.
    self.conv = _conv(cfg, c, c, rngs, stride=2, padding=((0, 1), (0, 1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x).astype(jnp.float32)


class Upsample(nnx.Module):
  def __init__(self, cfg: VAEConfig, c: int, rngs: nnx.Rngs):
    self.conv = _conv(cfg, c, c, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
    return self.conv(x).astype(jnp.float32)


class Stage(nnx.Module):
  """A DownEncoderBlock2D (resampler = Downsample) or UpDecoderBlock2D (Upsample)."""

  def __init__(self, cfg: VAEConfig, c_in: int, c_out: int, layers: int, resample: str | None,
               rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(cfg, c_in if i == 0 else c_out, c_out, rngs)
                             for i in range(layers)])
    self.downsamplers = nnx.List([Downsample(cfg, c_out, rngs)] if resample == 'down' else [])
    self.upsamplers = nnx.List([Upsample(cfg, c_out, rngs)] if resample == 'up' else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in list(self.resnets) + list(self.downsamplers) + list(self.upsamplers):
      x = layer(x)
    return x


class MidBlock(nnx.Module):
  def __init__(self, cfg: VAEConfig, c: int, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(cfg, c, c, rngs), ResnetBlock(cfg, c, c, rngs)])
    self.attentions = nnx.List([Attention(cfg, c, rngs)] if cfg.mid_block_add_attention else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    for attn in self.attentions:
      x = attn(x)
    return self.resnets[1](x)


class Encoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
    chans = cfg.block_out_channels
    self.conv_in = _conv(cfg, cfg.in_channels, chans[0], rngs)
    self.down_blocks = nnx.List([
        Stage(cfg, chans[max(i - 1, 0)], c, cfg.layers_per_block,
              'down' if i < len(chans) - 1 else None, rngs) for i, c in enumerate(chans)])
    self.mid_block = MidBlock(cfg, chans[-1], rngs)
    self.conv_norm_out = GroupNorm(chans[-1], cfg.norm_num_groups)
    self.conv_out = _conv(cfg, chans[-1], 2 * cfg.latent_channels, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x).astype(jnp.float32)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x))).astype(jnp.float32)


class Decoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
    chans = tuple(reversed(cfg.block_out_channels))
    self.conv_in = _conv(cfg, cfg.latent_channels, chans[0], rngs)
    self.mid_block = MidBlock(cfg, chans[0], rngs)
    self.up_blocks = nnx.List([
        Stage(cfg, chans[max(i - 1, 0)], c, cfg.layers_per_block + 1,
              'up' if i < len(chans) - 1 else None, rngs) for i, c in enumerate(chans)])
    self.conv_norm_out = GroupNorm(chans[-1], cfg.norm_num_groups)
    self.conv_out = _conv(cfg, chans[-1], cfg.out_channels, rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z).astype(jnp.float32))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x))).astype(jnp.float32)


class AutoencoderKL(nnx.Module):
  """moments(images) -> (mean, logvar) of the posterior; decode_z(z) -> images (unscaled z)."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    z2 = 2 * cfg.latent_channels
    self.encoder = Encoder(cfg, rngs)
    self.decoder = Decoder(cfg, rngs)
    self.quant_conv = _conv(cfg, z2, z2, rngs, k=1) if cfg.use_quant_conv else None
    self.post_quant_conv = (_conv(cfg, cfg.latent_channels, cfg.latent_channels, rngs, k=1)
                            if cfg.use_post_quant_conv else None)

  def moments(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = self.encoder(x)
    if self.quant_conv is not None:
      h = self.quant_conv(h).astype(jnp.float32)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode_z(self, z: jax.Array) -> jax.Array:
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z).astype(jnp.float32)
    return self.decoder(z)


# --- jitted, batch-sharded entry points -----------------------------------------------------

def default_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over every device: the VAE is small, so it is replicated and the batch split."""
  return Mesh(np.asarray(list(jax.devices() if devices is None else devices)), ('batch',))


class SDVAE:
  """encode/decode of images in [-1, 1] (NHWC) <-> latents `scaling_factor * z`.

  Parameters are replicated over `mesh`; the batch is split over all of its axes (padded to a
  multiple of the device count and cut back), so any batch size works on any mesh.
  """

  def __init__(self, model: AutoencoderKL, *, mesh: Mesh | None = None,
               scaling_factor: float = SCALE):
    self.mesh = default_mesh() if mesh is None else mesh
    self.scaling_factor = scaling_factor
    self.cfg = model.cfg
    graphdef, state = nnx.split(model)
    self._state = jax.device_put(state, NamedSharding(self.mesh, P()))
    self._batch = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))
    rep = NamedSharding(self.mesh, P())

    def moments(state, x):
      return nnx.merge(graphdef, state).moments(x)

    def encode(state, x, key, sample):
      mean, logvar = moments(state, x)
      if sample:
        mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
      return mean * scaling_factor

    def decode(state, z):
      return nnx.merge(graphdef, state).decode_z(z / scaling_factor)

    self._moments = jax.jit(moments, in_shardings=(rep, self._batch),
                            out_shardings=(self._batch, self._batch))
    self._encode = jax.jit(encode, static_argnums=3, in_shardings=(rep, self._batch, rep),
                           out_shardings=self._batch)
    self._decode = jax.jit(decode, in_shardings=(rep, self._batch), out_shardings=self._batch)

  def _pad(self, x: jax.Array) -> tuple[jax.Array, int]:
    n, k = x.shape[0], self.mesh.size
    extra = -n % k
    if extra:
      x = jnp.concatenate([x, jnp.zeros((extra,) + x.shape[1:], x.dtype)])
    return x, n

  def moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Posterior (mean, logvar) of unscaled z, for images [N, H, W, 3] in [-1, 1]."""
    x, n = self._pad(jnp.asarray(images, jnp.float32))
    mean, logvar = self._moments(self._state, x)
    return mean[:n], logvar[:n]

  def encode(self, images: jax.Array, rng: jax.Array | None = None, sample: bool = False
             ) -> jax.Array:
    """Latents [N, H/f, W/f, C]: scaling_factor * (posterior mean, or a sample when `sample`)."""
    if sample and rng is None:
      raise ValueError('encode(sample=True) draws from the posterior: pass rng=')
    x, n = self._pad(jnp.asarray(images, jnp.float32))
    key = jax.random.key(0) if rng is None else rng
    return self._encode(self._state, x, key, bool(sample))[:n]

  def decode(self, latents: jax.Array) -> jax.Array:
    """Images [N, H*f, W*f, 3] (about [-1, 1], not clipped) from scaled latents."""
    z, n = self._pad(jnp.asarray(latents, jnp.float32))
    return self._decode(self._state, z)[:n]


def create(cfg: VAEConfig, seed: int = 0) -> AutoencoderKL:
  return AutoencoderKL(cfg, rngs=nnx.Rngs(params=seed))


def load(path: str, *, mesh: Mesh | None = None, dtype: str = 'float32') -> SDVAE:
  """An SDVAE from a diffusers directory (config.json + diffusion_pytorch_model.safetensors)."""
  from groupdiff_jax.models import vae_weights  # pylint: disable=import-outside-toplevel
  model, scaling = vae_weights.load_diffusers(path, dtype=dtype)
  return SDVAE(model, mesh=mesh, scaling_factor=scaling)
