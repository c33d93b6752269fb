"""Tests run on CPU with 8 fake devices; GPU/TPU-only tests carry markers and skip elsewhere."""
import importlib.util
import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
  config.addinivalue_line('markers', 'gpu: needs an NVIDIA GPU')
  config.addinivalue_line('markers', 'tpu: needs a TPU')
  config.addinivalue_line('markers', 'slow: long-running (minutes)')


def pytest_collection_modifyitems(config, items):
  platform = jax.default_backend()
  for item in items:
    for marker, backend in (('gpu', 'gpu'), ('tpu', 'tpu')):
      if marker in item.keywords and platform != backend:
        item.add_marker(pytest.mark.skip(reason=f'needs a {backend.upper()} (backend is {platform})'))


def load_config(name: str = 'common'):
  """Loads configs/NAME.py (configs/ is not a package) and returns its get_config()."""
  path = os.path.join(ROOT, 'configs', f'{name}.py')
  sys.path.insert(0, os.path.dirname(path))
  spec = importlib.util.spec_from_file_location(f'configs_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


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
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture
def tiny():
  return tiny_config
