"""The vs-torch benchmark: diffusers' DiT with group attention, and a tiny run of the table."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

torch = pytest.importorskip('torch', reason='the PyTorch side needs torch (the test extra)')
pytest.importorskip('diffusers', reason='the PyTorch side is diffusers\' DiT')

from groupdiff_jax.benchmarking import torch_dit  # pylint: disable=wrong-import-position


def test_group_attention_joins_the_tokens_of_each_group_and_only_those():
  model = torch_dit.build(depth=1, hidden=32, heads=2, patch=2, input_size=8, channels=4,
                          num_classes=10)
  x, t, y = torch_dit.random_inputs(8, 4, 8, 10)
  with torch.no_grad():
    # GroupDiff-l: rows 0-3 alone, rows 4-7 one group of 4.
    out = torch_dit.forward(model, x, t, y, torch_dit.Groups(4, 1, 4))
    alone = torch.cat([torch_dit.forward(model, x[i:i + 1], t[i:i + 1], y[i:i + 1],
                                         torch_dit.Groups(1, 1, 1)) for i in range(4)])
    group = torch_dit.forward(model, x[4:], t[4:], y[4:], torch_dit.Groups(4, 4, 4))
    ungrouped = torch_dit.forward(model, x[4:], t[4:], y[4:], torch_dit.Groups(4, 1, 1))
  assert out.shape == x.shape
  np.testing.assert_allclose(out[:4].numpy(), alone.numpy(), atol=1e-5)
  np.testing.assert_allclose(out[4:].numpy(), group.numpy(), atol=1e-5)
  assert np.abs(group.numpy() - ungrouped.numpy()).max() > 1e-3  # the group really attends


def test_torch_train_step_runs_and_changes_the_weights():
  model = torch_dit.build(depth=1, hidden=32, heads=2, patch=2, input_size=8, channels=4,
                          num_classes=10)
  before = [p.detach().clone() for p in model.parameters()]
  step = torch_dit.make_train_step(model, lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                                   weight_decay=0.01, grad_clip=3.0, ema_decay=0.99,
                                   compiled=False)
  x, _, y = torch_dit.random_inputs(8, 4, 8, 10)
  loss = step(x, y, torch_dit.Groups(4, 1, 4))
  assert np.isfinite(loss.item())
  assert any((p - b).abs().max() > 0 for p, b in zip(model.parameters(), before))


def test_attention_case_times_the_same_gradients_on_both_sides():
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from groupdiff_jax.benchmarking import vs_torch  # pylint: disable=import-outside-toplevel
  from groupdiff_jax.models import attention  # pylint: disable=import-outside-toplevel
  case = vs_torch.Case('attention', 'SiT-d2h32n2/2', 4, 2, input_size=8)
  q, k, v, probe = vs_torch.attention_inputs(case)
  assert q.shape == (2, 32, 2, 16)  # 2 groups of 2 images x 16 tokens, 2 heads of 16
  run, leaves = torch_dit.make_attention(q, k, v, probe)
  run()
  run()  # gradients are reset between runs, not accumulated
  want = jax.grad(lambda *a: jnp.sum(attention.reference_attention(*a) * probe), (0, 1, 2))(
      q, k, v)
  for leaf, w in zip(leaves, want):
    np.testing.assert_allclose(leaf.grad.transpose(1, 2).numpy(), w, atol=2e-5)
  side = vs_torch.jax_attention(case)  # the project's 'auto' kernel, compiled
  side.run()
  assert side.compile_s > 0


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  return subprocess.run([sys.executable, '-m', 'groupdiff_jax.bench_torch', *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)


def test_cli_prints_the_table_on_a_tiny_model():
  proc = _run('--model=SiT-d2h32n2/2', '--input_size=8', '--batch=8', '--reps=1', '--warmup=1',
              '--sample_steps=2',  # names before --model:
              '--cases=forward SiT-S/2,SDE,attention fwd+bwd SiT-S/2')
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert '| case | torch eager img/s | jax img/s | jax / eager | jax compile s | load |' in out
  rows = [line for line in out.splitlines() if line.startswith('| ') and 'img/s' not in line]
  assert [r.split(' | ')[0] for r in rows] == [
      '| forward SiT-d2h32n2/2 8x8 b8 N=1', '| forward SiT-d2h32n2/2 8x8 b8 N=4',
      '| SDE 2 steps CFG SiT-d2h32n2/2 8x8 b8 GroupDiff-l N=4',
      '| attention fwd+bwd SiT-d2h32n2/2 8x8 b8 N=1', '| attention fwd+bwd SiT-d2h32n2/2 8x8 b8 N=4']
  for r in rows:
    eager, jax_rate, ratio = (float(v) for v in r.split(' | ')[1:4])
    assert eager > 0 and jax_rate > 0 and ratio == pytest.approx(jax_rate / eager, rel=0.02)
  assert 'load average' in out and '1 warm-up calls, 1 interleaved rounds' in out


def test_cli_rejects_unknown_cases_in_one_line():
  proc = _run('--cases=nothing_like_this')
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith('groupdiff_jax: error: --cases=nothing_like_this matches')
  assert len(proc.stderr.strip().splitlines()) == 1


def test_rounds_alternate_which_side_runs_first():
  """A B, B A, A B: what one framework leaves behind for the next call falls on both sides."""
  from groupdiff_jax.benchmarking import vs_torch  # pylint: disable=import-outside-toplevel
  calls = []
  sides = [vs_torch.Side(name, lambda name=name: calls.append(name), 0.0) for name in 'ab']
  medians = vs_torch.time_case(sides, reps=3, warmup=2)
  assert calls == ['a', 'a', 'b', 'b', 'a', 'b', 'b', 'a', 'a', 'b'] and len(medians) == 2
