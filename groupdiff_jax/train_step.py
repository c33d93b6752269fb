"""Train state (params, optimizer state, EMA, step as plain pytrees) and the jitted train step.

The NNX model is split once into a static graphdef and a pure dict of parameters; every jitted
function merges it back inside (plain `jax.jit`, no `nnx.jit` in the hot loop).
"""
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from groupdiff_jax import layout as batch_layout, sharding
from groupdiff_jax.diffusion import objectives
from groupdiff_jax.layout import BatchLayout, layout_from_config
from groupdiff_jax.models import group_attention, sit

State = dict[str, Any]  # {'step', 'params', 'opt_state', 'ema'}


def decay_mask(params: dict) -> dict:
  """Weight decay on Linear kernels only; embedders, biases and tables are exempt (official)."""
  def decays(path, _):
    names = [getattr(k, 'key', str(k)) for k in path]
    return names[-1] == 'kernel' and not any('embedder' in n for n in names)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; every hyper-parameter from `config.optim`."""
  parts = []
  if optim.grad_clip and optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts.append(optax.adamw(optim.lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


@dataclasses.dataclass
class Trainer:
  """Everything static about a run: the model graph, optimizer, layout, mesh and shardings."""
  model_cfg: sit.SiTConfig
  graphdef: Any
  tx: optax.GradientTransformation
  layout: BatchLayout
  objective: objectives.Flow | objectives.Ddpm  # what is learned (config.transport.objective)
  mesh: Mesh
  rules: Any
  state_shardings: State
  batch_shardings: dict[str, NamedSharding]
  abstract_state: State
  # The batch in shard order (layout.shard_order): batch row r is layout row order[r], and
  # `groups` is the batch's static group structure for the one model pass.
  order: np.ndarray
  groups: group_attention.Groups
  batch_shards: int  # the batch shards `order` was laid out for


def build(config, mesh: Mesh) -> Trainer:
  """Derives the model, optimizer and all shardings without allocating parameters."""
  model_cfg = sit.config_from(config.model)
  layout = layout_from_config(config)
  objective = objectives.from_config(config)
  objective.check_model(model_cfg)
  if layout.max_group_size > model_cfg.max_group_size and model_cfg.max_group_size:
    raise sit.ModelConfigError(
        f'group size {layout.max_group_size} exceeds model.max_group_size '
        f'{model_cfg.max_group_size}')
  rules = tuple(config.mesh.rules)
  tx = make_optimizer(config.optim)
  abstract_model = jax.eval_shape(lambda: sit.create(model_cfg, config.seed))
  graphdef, abstract_vars = nnx.split(abstract_model)
  param_sh = sharding.param_shardings(abstract_vars, mesh, rules)
  abstract_params = nnx.to_pure_dict(abstract_vars)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                 transform_non_params=lambda _: sharding.replicated(mesh))
  state_sh = {'step': sharding.replicated(mesh), 'params': param_sh, 'opt_state': opt_sh,
              'ema': param_sh}
  abstract_state = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': abstract_params,
                    'opt_state': abstract_opt, 'ema': abstract_params}
  batch_sh = {'image': sharding.batch_sharding(mesh, rules, 4),
              'label': sharding.batch_sharding(mesh, rules, 1)}
  order, groups, shards = batch_layout.shard_order_for_mesh(
      layout, group_attention.batch_shard_counts(mesh, rules))
  return Trainer(model_cfg, graphdef, tx, layout, objective, mesh, rules, state_sh, batch_sh,
                 abstract_state, order, groups, shards)


def init_state(trainer: Trainer, seed: int, params: dict | None = None) -> State:
  """Creates the state directly sharded on the mesh (no host copy of the full model)."""
  def init(params):
    if params is None:
      params = nnx.to_pure_dict(nnx.state(sit.create(trainer.model_cfg, seed)))
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'opt_state': trainer.tx.init(params), 'ema': jax.tree.map(jnp.copy, params)}

  with sharding.use_mesh(trainer.mesh, trainer.rules):
    if params is None:
      return jax.jit(lambda: init(None), out_shardings=trainer.state_shardings)()
    return jax.jit(init, out_shardings=trainer.state_shardings)(params)


def model_apply(trainer: Trainer) -> Callable:
  """(params, x, t, y, group_size, rng) -> model output; the velocity function of the samplers."""
  def apply(params, x, t, y, group_size, rng):
    return nnx.merge(trainer.graphdef, params)(x, t, y, group_size=group_size, rng=rng)
  return apply


def layout_sample_ids(model: sit.SiT, layout: BatchLayout, k_cond: jax.Array,
                      k_uncond: jax.Array) -> jax.Array | None:
  """GroupDiff sample-embedding ids in layout order: the conditional part drawn with k_cond, the
  unconditional part with k_uncond."""
  if model.sample_embedder is None:
    return None
  parts = [model.sample_ids(n, m, key) for n, m, key in
           ((layout.num_cond, layout.cond_group_size, k_cond),
            (layout.num_uncond, layout.uncond_group_size, k_uncond)) if n]
  return jnp.concatenate(parts)


def loss_fn(trainer: Trainer, params: dict, batch: dict, rng: jax.Array, t_spread: float
            ) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
  """The objective's loss on a GroupDiff batch (shard order) in one model pass: conditional
  groups with their labels, unconditional groups with the null label. Randomness (times per
  group, noise, sample ids) is drawn in layout order, so it does not depend on the mesh.
  Returns (mean loss, (per-image loss, per-image loss terms of the objective))."""
  layout, order, objective = trainer.layout, trainer.order, trainer.objective
  x, y = batch['image'], batch['label']
  k_inputs, k_cond, k_uncond = jax.random.split(rng, 3)
  noised = objective.inputs(x, k_inputs, layout, t_spread, order)
  y = jnp.where(jnp.asarray(order >= layout.num_cond), trainer.model_cfg.num_classes, y)
  model = nnx.merge(trainer.graphdef, params)
  ids = layout_sample_ids(model, layout, k_cond, k_uncond)
  ids = None if ids is None else ids[order]
  pred = model(noised.x_t, noised.t, y, group_size=trainer.groups, sample_ids=ids,
               training=True)
  per_image, terms = objective.per_image_loss(pred, noised.target)
  return per_image.mean(), (per_image, terms)


def make_train_step(trainer: Trainer, config) -> Callable[[State, dict], tuple[State, dict]]:
  """One jitted step: loss, gradients, AdamW update, EMA update. The state is donated."""
  base_key = jax.random.PRNGKey(config.seed)
  ema_decay, t_spread = config.optim.ema_decay, config.group.t_spread

  def step_fn(state: State, batch: dict):
    rng = jax.random.fold_in(base_key, state['step'])  # same randomness on any mesh / resume
    grad_fn = jax.value_and_grad(lambda p: loss_fn(trainer, p, batch, rng, t_spread),
                                 has_aux=True)
    (loss, (per_image, terms)), grads = grad_fn(state['params'])
    updates, opt_state = trainer.tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state['ema'], params)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
               'param_norm': optax.tree.norm(params)}
    metrics.update({f'loss_{name}': v.mean() for name, v in terms.items()})  # ddpm: mse, vb
    if trainer.layout.num_uncond:  # the unconditional rows, wherever the shard order put them
      uncond = jnp.asarray(trainer.order >= trainer.layout.num_cond, jnp.float32)
      metrics['loss_uncond'] = jnp.sum(per_image * uncond) / trainer.layout.num_uncond
    new_state = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state, 'ema': ema}
    return new_state, metrics

  jitted = jax.jit(step_fn, in_shardings=(trainer.state_shardings, trainer.batch_shardings),
                   out_shardings=(trainer.state_shardings, sharding.replicated(trainer.mesh)),
                   donate_argnums=(0,))

  def run(state, batch):
    with sharding.use_mesh(trainer.mesh, trainer.rules):  # activation constraints at trace time
      return jitted(state, batch)

  def compile_ahead(state, batch) -> Callable[[State, dict], tuple[State, dict]]:
    """The step compiled now, for (abstract) arguments of these shapes and shardings; callers
    time it and call the result, so no later step pays for compilation."""
    with sharding.use_mesh(trainer.mesh, trainer.rules):
      return jitted.lower(state, batch).compile()
  run.jitted = jitted
  run.compile = compile_ahead
  return run
