"""Tests run on CPU with 8 fake devices; GPU/TPU-only tests carry markers and skip elsewhere."""
import contextlib
import importlib.util
import json
import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The suite compiles hundreds of small programs and runs each a few times: one malloc arena
# (groupdiff_jax/host_malloc.py) makes XLA's multi-threaded compiles ~20% slower and pays off only
# over many steps, so the tests run without it; tests/test_cpu_flags.py checks it in a subprocess.
os.environ.setdefault('GROUPDIFF_JAX_KEEP_HOST_MEMORY', '0')

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
  config.addinivalue_line('markers', 'gpu: needs an NVIDIA GPU')
  config.addinivalue_line('markers', 'tpu: needs a TPU')
  config.addinivalue_line('markers', 'slow: long-running (minutes)')
  config.addinivalue_line('markers', 'aot: compiles for TPU topologies on the CPU host (libtpu)')


def pytest_collection_modifyitems(config, items):
  platform = jax.default_backend()
  has_libtpu = importlib.util.find_spec('libtpu') is not None
  for item in items:
    for marker, backend in (('gpu', 'gpu'), ('tpu', 'tpu')):
      if marker in item.keywords and platform != backend:
        item.add_marker(pytest.mark.skip(reason=f'needs a {backend.upper()} (backend is {platform})'))
    if 'aot' in item.keywords and not has_libtpu:
      item.add_marker(pytest.mark.skip(reason='needs libtpu (pip install -e .[aot])'))


def load_config(name: str = 'common', arg: str | None = None):
  """Loads configs/NAME.py (configs/ is not a package) and returns its get_config(), or
  get_config(arg) for `--config=configs/NAME.py:arg`."""
  path = os.path.join(ROOT, 'configs', f'{name}.py')
  sys.path.insert(0, os.path.dirname(path))
  spec = importlib.util.spec_from_file_location(f'configs_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def tiny_config(**overrides):
  """A seconds-fast config: 2-block SiT on 8x8x4 synthetic images, batch 16, float32."""
  c = load_config('common')
  c.model.name = 'SiT-d2h32n2/2'
  c.model.input_size = 8
  c.model.num_classes = 10
  c.model.dtype = 'float32'
  c.data.source = 'synthetic'
  c.data.global_batch = 16
  c.data.synthetic_size = 512
  c.group.uncond_size = 4
  c.group.uncond_fraction = 0.25
  c.optim.lr = 1e-3
  c.optim.ema_decay = 0.9
  c.total_steps = 4
  c.log_every_steps = 1
  c.ckpt_every_steps = 2
  c.mesh.shape = (1, -1, 1)
  return apply_overrides(c, overrides)


def apply_overrides(config, overrides: dict):
  """Sets dotted keys ('optim.lr') on a ConfigDict, like --config.optim.lr on the command line."""
  from groupdiff_jax import cli  # pylint: disable=import-outside-toplevel
  return cli.set_dotted(config, overrides)


@pytest.fixture
def tiny():
  return tiny_config


# --- shared builders for tests of the offline jobs and the trainer ----------------------------

LOOP_ONLY = ('total_steps', 'log_every_steps', 'ckpt_every_steps', 'keep_ckpts')


@contextlib.contextmanager
def compiled_step_cache():
  """Every train() call jits a fresh step function (~10 s to compile on CPU). Inside this
  context a step for the same config (loop-only fields aside) and the same devices is built once
  and reused: it is what make_train_step would compile again. (JAX's persistent compilation
  cache is no way out: executables it loads deadlock in collectives on 8 fake CPU devices, jax
  0.10.2.)
  """
  from groupdiff_jax import train_step  # pylint: disable=import-outside-toplevel
  built = {}
  real = train_step.make_train_step

  def make_train_step(trainer, config):
    cfg = config.to_dict()
    key = (json.dumps({k: v for k, v in cfg.items() if k not in LOOP_ONLY}, sort_keys=True,
                      default=str),
           tuple(trainer.mesh.axis_names), tuple(trainer.mesh.devices.shape),
           tuple(d.id for d in trainer.mesh.devices.flat))
    if key not in built:
      built[key] = real(trainer, config)
    return built[key]

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train_step, 'make_train_step', make_train_step)
    yield


def run_steps(config, mesh, num_steps: int):
  """`num_steps` train steps of `config` on `mesh` from a fresh state: (losses, final state)."""
  from groupdiff_jax import train_step  # pylint: disable=import-outside-toplevel
  from groupdiff_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  trainer = train_step.build(config, mesh)
  state = train_step.init_state(trainer, config.seed)
  step_fn = train_step.make_train_step(trainer, config)
  data = pipeline.make_train_data(config, trainer.layout, order=trainer.order)
  losses = []
  for _ in range(num_steps):
    batch = {k: jax.make_array_from_process_local_data(trainer.batch_shardings[k], v)
             for k, v in next(data).items()}
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics['loss']))
  return np.array(losses), state


def random_dinov2_folder(d, hidden=32, depth=1, heads=2, patch=14, image_size=28):
  """A random DINOv2 checkpoint in the Hugging Face layout, written with numpy only (no torch)."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  r = lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)
  g = image_size // patch
  t = {'embeddings.cls_token': r(1, 1, hidden), 'embeddings.mask_token': r(1, hidden),
       'embeddings.position_embeddings': r(1, 1 + g * g, hidden),
       'embeddings.patch_embeddings.projection.weight': r(hidden, 3, patch, patch),
       'embeddings.patch_embeddings.projection.bias': r(hidden),
       'layernorm.weight': 1 + r(hidden), 'layernorm.bias': r(hidden)}
  for i in range(depth):
    p = f'encoder.layer.{i}.'
    for name, shape in [('attention.attention.query', (hidden, hidden)),
                        ('attention.attention.key', (hidden, hidden)),
                        ('attention.attention.value', (hidden, hidden)),
                        ('attention.output.dense', (hidden, hidden)),
                        ('mlp.fc1', (4 * hidden, hidden)), ('mlp.fc2', (hidden, 4 * hidden))]:
      t[p + name + '.weight'], t[p + name + '.bias'] = r(*shape), r(shape[0])
    for name in ('norm1', 'norm2'):
      t[p + name + '.weight'], t[p + name + '.bias'] = 1 + r(hidden), r(hidden)
    t[p + 'layer_scale1.lambda1'], t[p + 'layer_scale2.lambda1'] = r(hidden), r(hidden)
  os.makedirs(d, exist_ok=True)
  save_file(t, os.path.join(d, 'model.safetensors'))
  with open(os.path.join(d, 'config.json'), 'w') as f:
    json.dump({'model_type': 'dinov2', 'hidden_size': hidden, 'num_hidden_layers': depth,
               'num_attention_heads': heads, 'mlp_ratio': 4, 'patch_size': patch,
               'image_size': image_size, 'layer_norm_eps': 1e-6}, f)
  return d


def random_vae_folder(d, channels=(8, 16), groups=4, seed=0):
  """A random SD-VAE (AutoencoderKL) in the diffusers layout, written without torch (our model
  saved with models/vae_weights.save_diffusers). Downsamples by 2**(len(channels) - 1)."""
  from groupdiff_jax.models import vae, vae_weights  # pylint: disable=import-outside-toplevel
  cfg = vae.VAEConfig(block_out_channels=tuple(channels), layers_per_block=1,
                      norm_num_groups=groups)
  return vae_weights.save_diffusers(vae.create(cfg, seed=seed), d)
