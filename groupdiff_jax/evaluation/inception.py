"""The FID InceptionV3 in Flax: the network behind the ADM evaluator, pytorch-fid and torch-fidelity.

This is the TensorFlow 2015-12-05 Inception graph (`classify_image_graph_def.pb`) as pytorch-fid
ported it: torchvision's InceptionV3 layout with the FID patches
  * the average pools of the A, C and first E blocks exclude the zero padding from the mean,
  * the last E block (Mixed_7c) pools its branch with a 3x3 *max* pool,
  * 1008 output classes, no auxiliary head.
Module and parameter names follow the PyTorch state dict (`Mixed_6d.branch1x1.conv.weight`), so
`from_state_dict` maps pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` one to one.

Outputs of `InceptionV3.__call__` on a preprocessed [N, 299, 299, 3] batch:
  pool             [N, 2048]  the final average pool ('pool_3' in the TF graph): FID, precision/recall
  spatial          [N, 2023]  the first 7 channels of 'mixed_6/conv' (= Mixed_6d.branch1x1 after its
                              ReLU), 17x17x7 flattened in H, W, C order as the ADM evaluator: sFID
  logits           [N, 1008]  pool @ W + b (the PyTorch `fc`)
  logits_unbiased  [N, 1008]  pool @ W, what the ADM evaluator's Inception Score uses
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from groupdiff_jax.cli import UserError

HIGHEST = jax.lax.Precision.HIGHEST  # FID statistics are sensitive: no TF32/bf16 passes on GPU/TPU
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7  # the ADM evaluator keeps mixed_6/conv[..., :7]


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
  """Conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU."""

  def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0, *, rngs: nnx.Rngs):
    ph, pw = _pair(padding)
    self.conv = nnx.Conv(cin, cout, _pair(kernel), _pair(stride), padding=((ph, ph), (pw, pw)),
                         use_bias=False, precision=HIGHEST, rngs=rngs)
    self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=1e-3, rngs=rngs)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


def _window(x, op, init, kernel: int, stride: int, padding: int):
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, init, op, (1, kernel, kernel, 1), (1, stride, stride, 1), pad)


def max_pool(x, kernel: int = 3, stride: int = 2, padding: int = 0):
  return _window(x, jax.lax.max, -jnp.inf, kernel, stride, padding)


def avg_pool_same(x):
  """3x3 stride-1 average whose border windows divide by the count of real pixels (TF 'SAME')."""
  total = _window(x, jax.lax.add, 0.0, 3, 1, 1)
  count = _window(jnp.ones_like(x[:1, ..., :1]), jax.lax.add, 0.0, 3, 1, 1)
  return total / count


class InceptionA(nnx.Module):
  def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(avg_pool_same(x)),
    ], axis=-1)


class InceptionB(nnx.Module):
  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        max_pool(x),
    ], axis=-1)


class InceptionC(nnx.Module):
  def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x):
    dbl = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
      dbl = layer(dbl)
    # branch1x1 comes first: channels [0, 192) of the output are 'mixed_N/conv' in the TF graph.
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
        dbl,
        self.branch_pool(avg_pool_same(x)),
    ], axis=-1)


class InceptionD(nnx.Module):
  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), b7, max_pool(x)], axis=-1)


class InceptionE(nnx.Module):
  """pool='avg' (Mixed_7b, padding excluded) or 'max' (Mixed_7c, the FID graph's quirk)."""

  def __init__(self, cin: int, pool: str, *, rngs: nnx.Rngs):
    self.pool = pool
    self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = max_pool(x, 3, 1, 1) if self.pool == 'max' else avg_pool_same(x)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch3x3_2a(b3), self.branch3x3_2b(b3),
        self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
        self.branch_pool(pooled),
    ], axis=-1)


class InceptionV3(nnx.Module):
  """FID InceptionV3 on NHWC float32 input already resized to 299x299 and scaled to [-1, 1]."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, 'avg', rngs=rngs)
    self.Mixed_7c = InceptionE(2048, 'max', rngs=rngs)
    self.fc = nnx.Linear(2048, NUM_CLASSES, precision=HIGHEST, rngs=rngs)

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = max_pool(x)
    x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c):
      x = block(x)
    x = self.Mixed_6d(x)
    spatial = x[..., :SPATIAL_CHANNELS]  # Mixed_6d.branch1x1 = 'mixed_6/conv', first 7 channels
    x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
    pool = jnp.mean(x, axis=(1, 2))
    unbiased = jnp.dot(pool, self.fc.kernel[...], precision=HIGHEST)
    return {'pool': pool, 'spatial': spatial.reshape(spatial.shape[0], -1),
            'logits': unbiased + self.fc.bias[...], 'logits_unbiased': unbiased}


@functools.lru_cache(maxsize=1)
def _abstract_split():
  # The structure with shapes only: no random initialisation of 24M weights, traced once.
  return nnx.split(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0))))


# --- loading the PyTorch state dict ------------------------------------------------------------

class WeightsError(UserError):
  """The weights file does not match the FID InceptionV3 (a user error: one line, exit 2)."""


# PyTorch leaf name -> (nnx attribute, layout change)
_LEAVES = {
    ('conv', 'weight'): ('kernel', lambda w: w.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
    ('bn', 'weight'): ('scale', None),
    ('bn', 'bias'): ('bias', None),
    ('bn', 'running_mean'): ('mean', None),
    ('bn', 'running_var'): ('var', None),
    ('fc', 'weight'): ('kernel', lambda w: w.T),                        # [out, in] -> [in, out]
    ('fc', 'bias'): ('bias', None),
}


def _torch_key(path: tuple) -> str:
  *modules, owner, attr = (str(p) for p in path)
  leaf = next(leaf for (o, leaf), (a, _) in _LEAVES.items() if (o, a) == (owner, attr))
  return '.'.join(modules + [owner, leaf])


def state_dict_keys() -> list[str]:
  """The PyTorch keys the network expects (pytorch-fid's layout), sorted."""
  _, state = _abstract_split()
  return sorted(_torch_key(path) for path, _ in nnx.to_flat_state(state))


def from_state_dict(state: dict[str, np.ndarray]) -> InceptionV3:
  """The network with the weights of a pytorch-fid state dict (name -> array).

  Every expected key must be present with the expected shape; extra keys other than BatchNorm's
  `num_batches_tracked` are refused (they mean another network).
  """
  graphdef, abstract_state = _abstract_split()
  flat = nnx.to_flat_state(abstract_state)
  expected = {_torch_key(path) for path, _ in flat}
  given = {k for k in state if not k.endswith('num_batches_tracked')}
  missing, unexpected = sorted(expected - given), sorted(given - expected)
  if missing or unexpected:
    parts = ([f'{len(missing)} missing (e.g. {missing[0]})'] if missing else []) + (
        [f'{len(unexpected)} unexpected (e.g. {unexpected[0]})'] if unexpected else [])
    raise WeightsError('the weights are not the FID InceptionV3 state dict (pytorch-fid '
                       f'pt_inception-2015-12-05): keys {", ".join(parts)}')
  loaded = []
  for path, variable in flat:
    key = _torch_key(path)
    _, change = _LEAVES[tuple(key.split('.')[-2:])]
    value = np.asarray(state[key], np.float32)
    value = change(value) if change else value
    if value.shape != variable.shape:
      raise WeightsError(f'weights key {key}: shape {tuple(np.shape(state[key]))} does not fit '
                         f'the FID InceptionV3 (expects {variable.shape} after layout change)')
    loaded.append((path, variable.replace(jnp.asarray(value))))
  return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def read_weights(path: str) -> dict[str, np.ndarray]:
  """A state dict from pytorch-fid's `.pth` (needs torch) or an `.npz` with the same keys."""
  if path.endswith('.npz'):
    with np.load(path) as data:
      return {k: data[k] for k in data.files}
  try:
    import torch  # pylint: disable=import-outside-toplevel  # optional: only for .pth files
  except ImportError as e:
    raise WeightsError(f'{path}: reading a PyTorch .pth needs torch (pip install torch==2.13.0); '
                       'or convert it once to .npz elsewhere (numpy arrays, the same keys)') from e
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # any unreadable file: one clear line
    raise WeightsError(f'{path}: not a readable PyTorch state dict ({type(e).__name__}: '
                       f'{str(e).splitlines()[0][:200] if str(e) else ""})') from e
  if not isinstance(state, dict):
    raise WeightsError(f'{path}: holds a {type(state).__name__}, not a state dict')
  return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, 'detach')}


def load(path: str) -> InceptionV3:
  """The FID InceptionV3 with the weights in `path`."""
  return from_state_dict(read_weights(path))
