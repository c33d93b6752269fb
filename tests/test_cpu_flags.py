"""The package's one XLA:CPU option (groupdiff_jax/__init__.py): set before JAX starts, never
over a value the user chose."""
import os

import jax

import groupdiff_jax

FLAG = '--xla_cpu_experimental_ynn_fusion_type=individual_dot'


def test_the_cpu_dot_flag_is_appended_unless_the_user_set_it(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  groupdiff_jax._set_cpu_flags()
  assert os.environ['XLA_FLAGS'] == f'--xla_force_host_platform_device_count=2 {FLAG}'
  groupdiff_jax._set_cpu_flags()  # idempotent
  assert os.environ['XLA_FLAGS'].count('ynn_fusion_type') == 1
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=dot')
  groupdiff_jax._set_cpu_flags()
  assert os.environ['XLA_FLAGS'] == '--xla_cpu_experimental_ynn_fusion_type=dot'


def test_this_process_started_jax_with_the_flag():
  """The test session imported the package before JAX's backend started: the flag is in force
  and XLA accepted it (an unknown flag or value would have stopped the process)."""
  assert FLAG in os.environ['XLA_FLAGS']
  assert jax.devices()[0].platform == 'cpu'
