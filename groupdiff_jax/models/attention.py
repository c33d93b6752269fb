"""One attention function, several kernels: 'xla' | 'blocked' | 'flash_cpu' | 'cudnn' | 'splash' |
'reference', and 'auto'.

All take q [batch, q_length, heads, head_dim] and k, v [batch, kv_length, heads, head_dim] (BTNH;
the lengths differ under context parallelism, where a device's queries meet the whole group's
keys) and return q's layout. Group attention never needs a mask: the images of a group are joined
along the length by a reshape, so every kernel runs plain bidirectional softmax attention.
These functions see one device's block; models/group_attention.py calls them inside `shard_map`
(Mosaic and cuDNN kernels cannot be partitioned automatically).
"""
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from groupdiff_jax.models import cpu_kernels, flash_cpu

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """float32 einsum attention: the numerical reference the kernels are tested against."""
  dtype = q.dtype
  q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, precision='highest') / jnp.sqrt(q.shape[-1])
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v, precision='highest').astype(dtype)


def member_attention(q: jax.Array, k: jax.Array, group_size: int) -> jax.Array:
  """Attention mass between the images of a group, for diagnostics (S_cross).

  q, k: [B, M*T, H, D], the M images of a group joined along the sequence (as group attention
  sees them). Returns [B, M, M] float32: entry (i, j) is the softmax probability that image i's
  query tokens put on image j's T key tokens, summed over those keys and averaged over heads and
  over image i's queries (each row sums to 1). Same softmax as `reference_attention`.
  """
  b, length, heads, _ = q.shape
  tokens = length // group_size
  q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, precision='highest') / jnp.sqrt(q.shape[-1])
  probs = jax.nn.softmax(logits, axis=-1)
  mass = probs.reshape(b, heads, group_size, tokens, group_size, tokens).sum(-1)
  return mass.mean(axis=(1, 3))


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  return jax.nn.dot_product_attention(q, k, v, implementation='xla')


# --- 'blocked': per-head attention whose scores stay in cache (the CPU kernel) -----------------

_BLOCK_SCORES = 1 << 19  # score entries per loop step: 2 MiB of float32, about a core's L2


def _heads_first(a: jax.Array) -> jax.Array:
  """[B, L, H, D] -> [B*H, L, D]."""
  b, length, heads, dim = a.shape
  return jnp.transpose(a, (0, 2, 1, 3)).reshape(b * heads, length, dim)


def _heads_last(a: jax.Array, batch: int) -> jax.Array:
  """[B*H, L, D] -> [B, L, H, D]."""
  n, length, dim = a.shape
  return jnp.transpose(a.reshape(batch, n // batch, length, dim), (0, 2, 1, 3))


def _heads_per_step(q_length: int, kv_length: int) -> int:
  return max(1, _BLOCK_SCORES // (q_length * kv_length))


def _blocked_forward(q, k, v):
  """Attention of q (pre-scaled), k, v [B*H, L, D], a few heads per loop step; also returns the
  log-sum-exp of each query's scores [B*H, Lq], all the backward pass needs besides the output."""
  def heads(args):
    q, k, v = args
    scores = q @ k.T
    peak = scores.max(-1, keepdims=True)
    weights = jnp.exp(scores - peak)
    total = weights.sum(-1, keepdims=True)
    return (weights @ v) / total, (peak + jnp.log(total))[:, 0]
  return jax.lax.map(heads, (q, k, v),
                     batch_size=_heads_per_step(q.shape[1], k.shape[1]))


@jax.custom_vjp
def _blocked(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  return _blocked_fwd(q, k, v)[0]


def _blocked_fwd(q, k, v):
  batch, scale = q.shape[0], q.shape[-1] ** -0.5
  q, k, v = _heads_first(q * scale), _heads_first(k), _heads_first(v)
  out, lse = _blocked_forward(q, k, v)
  return _heads_last(out, batch), (q, k, v, out, lse)


def _blocked_bwd(residuals, d_out):
  q, k, v, out, lse = residuals
  batch, scale = d_out.shape[0], q.shape[-1] ** -0.5
  d_out = _heads_first(d_out)
  # softmax backward: dS = P * (dP - rowsum(dO * O)), the row sums precomputed once.
  d_total = jnp.sum(d_out * out, axis=-1)

  def heads(args):
    q, k, k_t, v, d_out, lse, d_total = args
    # Keys along rows (P^T, dS^T), and dQ^T = K^T dS^T: every product below reads both operands
    # in the layout they are stored in. XLA's CPU dot runs a product that contracts an operand's
    # leading axis (dQ = dS K from dS^T) ~3x slower, and it folds any transpose written here into
    # the product, so K^T comes in transposed from outside the loop and dQ^T leaves it as is.
    weights_t = jnp.exp(k @ q.T - lse[None, :])
    d_v = weights_t @ d_out
    d_scores_t = weights_t * (v @ d_out.T - d_total[None, :])
    d_k = d_scores_t @ q
    d_q_t = (k_t @ d_scores_t) * scale
    return d_q_t, d_k, d_v

  d_q_t, d_k, d_v = jax.lax.map(heads, (q, k, jnp.swapaxes(k, 1, 2), v, d_out, lse, d_total),
                                batch_size=_heads_per_step(q.shape[1], k.shape[1]))
  return tuple(_heads_last(g, batch) for g in (jnp.swapaxes(d_q_t, 1, 2), d_k, d_v))


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Exact softmax attention computed a few heads at a time, in float32, with a flash-style
  backward pass (recomputes the scores from the saved log-sum-exp).

  Why: 'xla' materialises the scores of every head at once ([B, H, Lq, Lk]: 100 MB per layer for
  groups of 4 at 256 tokens) and XLA's CPU backend streams them through memory several times; a
  loop over heads keeps each step's scores (~2 MiB) in cache, which made the CPU forward of group
  attention ~3x faster (BENCHMARKS.md). 'flash_cpu' runs the same algorithm as one C++ kernel;
  this is 'auto''s CPU choice only where that kernel cannot be built (no C++ compiler).
  """
  dtype = q.dtype
  q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
  return _blocked(q, k, v).astype(dtype)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  # cuDNN's fused kernel takes fp16/bf16 only; float32 callers get it in bf16 and cast back.
  dtype = q.dtype
  if dtype == jnp.float32:
    q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
  return jax.nn.dot_product_attention(q, k, v, implementation='cudnn').astype(dtype)


_LANES = 128  # splash tiles the sequence and head_dim in multiples of the TPU lane width


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _splash_block(length: int, preferred: int = 512) -> int:
  """Largest multiple of 128 <= preferred that divides the (padded) length."""
  block = preferred
  while block > _LANES and length % block:
    block -= _LANES
  return block


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, q_length: int, kv_length: int, interpret: bool):
  # Imported lazily: the Pallas TPU ops are only needed when this backend is chosen.
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  bq, bkv = _splash_block(q_length), _splash_block(kv_length)
  sizes = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                        block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                        block_q_dq=bq, block_kv_dq=bkv)
  mask = sm.MultiHeadMask([sm.FullMask((q_length, kv_length)) for _ in range(heads)])
  # The kernel turns its block masks into jnp arrays. Built under a trace they would be tracers
  # of that trace, and the cached kernel would leak them into the next one (UnexpectedTracerError
  # in the sampler after the train step): build it eagerly, as concrete constants.
  with jax.ensure_compile_time_eval():
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret), sk.SegmentIds


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     platform: str | None = None) -> jax.Array:
  """The Pallas TPU splash kernel; for a platform other than 'tpu' (default: JAX's default
  backend) it runs in Pallas interpret mode (tests).

  The kernel needs the sequence and head_dim in multiples of 128 (SiT-XL: T=256*M, head_dim 72).
  Zero-padding head_dim leaves q.k and the first head_dim outputs unchanged; padded tokens get
  segment id 1 so real queries never attend to them.
  """
  _, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  q_pad, kv_pad = _round_up(q_len, _LANES), _round_up(kv_len, _LANES)
  padded_dim = _round_up(head_dim, _LANES)
  interpret = (platform or jax.default_backend()) != 'tpu'
  kernel, segment_ids_cls = _splash_kernel(heads, q_pad, kv_pad, interpret)
  q = q * jnp.asarray(head_dim ** -0.5, q.dtype)  # splash does not scale the logits

  def to_kernel_layout(a, padded_len):  # [B, L, H, D] -> [B, H, L', D'] zero-padded
    a = jnp.pad(a, ((0, 0), (0, padded_len - a.shape[1]), (0, 0), (0, padded_dim - head_dim)))
    return jnp.swapaxes(a, 1, 2)

  segment_ids = segment_ids_cls(q=(jnp.arange(q_pad) >= q_len).astype(jnp.int32),
                                kv=(jnp.arange(kv_pad) >= kv_len).astype(jnp.int32))
  out = jax.vmap(lambda q_, k_, v_: kernel(q_, k_, v_, segment_ids=segment_ids))(
      to_kernel_layout(q, q_pad), to_kernel_layout(k, kv_pad), to_kernel_layout(v, kv_pad))
  return jnp.swapaxes(out, 1, 2)[:, :q_len, :, :head_dim]


BACKENDS: dict[str, AttentionFn] = {
    'reference': reference_attention,
    'xla': xla_attention,
    'blocked': blocked_attention,
    'flash_cpu': flash_cpu.flash_cpu_attention,
    'cudnn': cudnn_attention,
    'splash': splash_attention,
}

# What 'auto' picks on each platform: the fused kernel where one exists (on CPU the hand-written
# one, built on first use; the cache-blocked XLA loop where no C++ compiler works), XLA elsewhere.
AUTO = {'gpu': 'cudnn', 'cuda': 'cudnn', 'tpu': 'splash', 'cpu': 'flash_cpu'}
# Kernels whose outputs carry no shard_map varying-axes types (a Pallas kernel, a custom call).
UNTYPED = frozenset({'splash', 'flash_cpu'})
# Backends that also read the model's packed qkv [B, L, 3, H, D] whole (and return its gradient
# whole): no q/k/v slices going in, no join of dq/dk/dv coming out.
PACKED: dict[str, Callable[[jax.Array], jax.Array]] = {
    'flash_cpu': flash_cpu.flash_cpu_attention_packed,
}


def resolve_backend(name: str, platform: str | None = None) -> str:
  """Maps 'auto' to a concrete backend for `platform` (the devices the attention runs on;
  default: JAX's default backend) and checks the name."""
  platform = platform or jax.default_backend()
  if name == 'auto':
    name = AUTO.get(platform, 'xla')
    return 'blocked' if name == 'flash_cpu' and not cpu_kernels.available() else name
  if name not in BACKENDS:
    raise ValueError(f'unknown attention backend {name!r}; known: auto, {", ".join(BACKENDS)}')
  if name == 'flash_cpu' and platform != 'cpu':  # an FFI target registered for the host only
    raise ValueError(f"attention backend 'flash_cpu' runs on CPU only, not on {platform}; use "
                     "'auto'")
  return name


def packed_attention(backend: str = 'auto',
                     platform: str | None = None) -> Callable[[jax.Array], jax.Array] | None:
  """The backend's packed form (qkv [B, L, 3, H, D] -> [B, L, H, D]) where it has one, else None:
  callers then slice q, k, v and call `attention`."""
  return PACKED.get(resolve_backend(backend, platform))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, backend: str = 'auto',
              platform: str | None = None) -> jax.Array:
  """Bidirectional softmax attention with scale head_dim**-0.5; q is [B, Lq, H, D], k and v
  [B, Lk, H, D]. `platform`: where it runs ('cpu', 'gpu', 'tpu'; default: JAX's default
  backend), which picks 'auto' and splash's interpret mode."""
  name = resolve_backend(backend, platform)
  if name == 'splash':
    return splash_attention(q, k, v, platform)
  return BACKENDS[name](q, k, v)
