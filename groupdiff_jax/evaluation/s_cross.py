"""The cross-sample attention score S_cross of GroupDiff, per layer and per timestep.

For one block and one timestep the model returns, per group, the [M, M] matrix A of attention
mass (`models.attention.member_attention`: softmax probabilities summed over the key tokens of
image j, averaged over heads and over the query tokens of image i). For image i, over the mass
O = (A[i, j] for j != i) it gives to the *other* members,

  S_i = (max O - mean O) / max O,

0 when the other members get equal mass, (M - 2)/(M - 1) when one member takes all of it (M = 4:
2/3; the value tends to 1 with the group size), always 0 for M = 2 (one other member). S_cross of
a layer at a timestep is the mean of S_i over all images of all groups. Renormalising O over the
other members would not change the ratio.

`measure` runs the model along its own Euler ODE trajectory from noise: every step evaluates the
velocity once, with the attention mass of every block, and moves on.
"""
import csv
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from groupdiff_jax import progress


def per_image(mass: np.ndarray) -> np.ndarray:
  """mass [..., M, M] (rows: the attending image) -> S [..., M] for each image."""
  mass = np.asarray(mass, np.float64)
  m = mass.shape[-1]
  if m < 2:
    raise ValueError('S_cross needs groups of at least 2 images')
  others = mass[..., ~np.eye(m, dtype=bool)].reshape(mass.shape[:-1] + (m - 1,))
  top = others.max(axis=-1)
  return np.where(top > 0, (top - others.mean(axis=-1)) / np.where(top > 0, top, 1.0), 0.0)


def score(mass: np.ndarray) -> np.ndarray:
  """mass [..., groups, M, M] -> S_cross [...]: the mean over every image of every group."""
  return per_image(mass).mean(axis=(-2, -1))


def measure(model, *, group_size: int, num_groups: int, num_steps: int, labels: np.ndarray,
            seed: int = 0, quiet: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """S_cross [depth, num_steps] along an Euler ODE trajectory, and the step times t [num_steps].

  labels: int [num_groups * group_size] (the null class num_classes for the unconditional branch).
  Time convention of the project: t = 1 is noise; the steps are t_k = 1 - k / num_steps.
  quiet: no progress lines (the trainer's in-training evaluation prints one line of its own).
  """
  cfg = model.cfg
  n = num_groups * group_size
  graphdef, state = nnx.split(model)

  def evaluate(state, x, t, rng):
    out, mass = nnx.merge(graphdef, state)(
        x, jnp.full((n,), t, jnp.float32), jnp.asarray(labels, jnp.int32), group_size=group_size,
        rng=rng, return_attention_mass=True)
    return out[..., :cfg.in_channels], mass

  key = jax.random.PRNGKey(seed)
  x = jax.random.normal(key, (n, cfg.input_size, cfg.input_size, cfg.in_channels), jnp.float32)
  times = np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float32)
  # Compiled ahead of the loop, so the progress rate measures steps, not compilation.
  evaluate = jax.jit(evaluate).lower(state, x, times[0], key).compile()
  scores = np.zeros((cfg.depth, num_steps))
  bar = None if quiet else progress.Progress('S_cross', num_steps, unit='steps')
  for k in range(num_steps):
    velocity, mass = evaluate(state, x, times[k], jax.random.fold_in(key, k + 1))
    scores[:, k] = score(np.asarray(mass))
    x = x + (times[k + 1] - times[k]) * velocity
    if bar:
      bar.update(1)
  return scores, times[:-1]


def write_csv(path: str, scores: np.ndarray, times: np.ndarray) -> None:
  """Long format: layer (1-based), step, t, s_cross; written atomically."""
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['layer', 'step', 't', 's_cross'])
    for layer in range(scores.shape[0]):
      for step, t in enumerate(times):
        writer.writerow([layer + 1, step, f'{t:.4f}', f'{scores[layer, step]:.6f}'])
  os.replace(tmp, path)


def read_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  depth = max(int(r['layer']) for r in rows)
  steps = max(int(r['step']) for r in rows) + 1
  scores, times = np.zeros((depth, steps)), np.zeros(steps)
  for r in rows:
    scores[int(r['layer']) - 1, int(r['step'])] = float(r['s_cross'])
    times[int(r['step'])] = float(r['t'])
  return scores, times
