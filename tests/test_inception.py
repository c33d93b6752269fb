"""The Flax FID InceptionV3 against an independent PyTorch build of pytorch-fid's network, loaded
with the same random weights; the ADM / pytorch-fid resize and scaling of uint8 images."""
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
F = torch.nn.functional

from groupdiff_jax.evaluation import features as features_lib  # pylint: disable=wrong-import-position
from groupdiff_jax.evaluation import inception  # pylint: disable=wrong-import-position
from groupdiff_jax.evaluation import preprocess  # pylint: disable=wrong-import-position

import inception_reference as ref  # pylint: disable=wrong-import-position  # tests/ is on sys.path


def _max_rel(a, b):
  """max |a - b| / max |b|: the error relative to the output's scale."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope='module')
def weights():
  return ref.random_state_dict(seed=0)


@pytest.fixture(scope='module')
def torch_model(weights):
  model = ref.FIDInceptionV3().eval()
  model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
  return model


@pytest.fixture(scope='module')
def extractor(weights):
  return features_lib.FeatureExtractor(inception.from_state_dict(weights),
                                       protocol='pytorch_fid', batch_size=8)


def _images(n=3, h=40, w=52, seed=1):
  # Non-square, not 299: the resize runs, and a swapped H/W would show.
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_keys_are_pytorch_fid_layout(weights):
  assert inception.state_dict_keys() == sorted(weights)
  assert len(weights) == 94 * 5 + 2  # 94 conv+BN layers (5 tensors each) and the 1008-way fc


def test_matches_pytorch_fid_network(extractor, torch_model):
  images = _images()
  ours = extractor.batch(images)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  with torch.no_grad():
    pool, mixed_6d, logits = torch_model(x)
    unbiased = pool @ torch_model.fc.weight.T
  spatial = mixed_6d[:, :7].permute(0, 2, 3, 1).reshape(len(images), -1)  # NHWC flatten, as ADM
  assert ours['pool'].shape == (3, 2048) and ours['spatial'].shape == (3, 17 * 17 * 7)
  assert _max_rel(ours['pool'], pool) <= 1e-4
  assert _max_rel(ours['spatial'], spatial) <= 1e-4
  assert _max_rel(ours['logits_unbiased'], unbiased) <= 1e-4
  assert _max_rel(ours['logits'], logits) <= 1e-4
  # The weights are random but not degenerate: features vary across images.
  assert np.std(ours['pool'], axis=0).mean() > 1e-3 * np.abs(ours['pool']).mean()


def test_resize_known_values():
  # Two pixels [0, 255] -> four. TF1 (ADM): source = dst * 2/4 = 0, .5, 1, 1.5 (clamped at the
  # last pixel). Half-pixel (pytorch-fid): source = (dst + .5)/2 - .5 = -.25 -> 0, .25, .75, 1.25.
  row = np.array([0.0, 255.0], np.float32)
  np.testing.assert_allclose(preprocess.resize_matrix(2, 4, 'adm') @ row, [0, 127.5, 255, 255])
  np.testing.assert_allclose(preprocess.resize_matrix(2, 4, 'pytorch_fid') @ row,
                             [0, 63.75, 191.25, 255])


@pytest.mark.parametrize('size', [(32, 32), (256, 200), (512, 333)])  # up- and downsampling
def test_pytorch_fid_preprocessing_matches_torch(size):
  images = _images(2, *size, seed=3)
  ours = np.asarray(preprocess.preprocess(images, 'pytorch_fid'))
  # In float64: torch's float32 kernel rounds its sampling positions (up to 3e-3 grey levels off
  # exact bilinear at 512 px); in float64 it is exact, and ours must agree to float32 precision.
  x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0
  want = 2 * F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False) - 1
  np.testing.assert_allclose(ours, want.permute(0, 2, 3, 1).numpy(), atol=1e-6)


@pytest.mark.parametrize('size', [(32, 32), (256, 200), (512, 333)])
def test_adm_preprocessing_matches_tf1_resize(size):
  # TensorFlow 1 ResizeBilinear (align_corners=False, no half-pixel centres) written independently
  # as torch grid_sample on source coordinates dst * in/out, border-clamped; then (x - 128) / 128.
  images = _images(2, *size, seed=4)
  h, w = size
  ys = torch.arange(299, dtype=torch.float64) * (h / 299)
  xs = torch.arange(299, dtype=torch.float64) * (w / 299)
  grid = torch.stack(torch.meshgrid(xs / (w - 1) * 2 - 1, ys / (h - 1) * 2 - 1, indexing='xy'), -1)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).double()
  resized = F.grid_sample(x, grid[None].expand(2, -1, -1, -1), mode='bilinear',
                          padding_mode='border', align_corners=True)
  want = ((resized - 128) / 128).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(preprocess.preprocess(images, 'adm')), want, atol=1e-6)


def test_299_input_is_not_resized():
  images = _images(1, 299, 299, seed=5)
  np.testing.assert_array_equal(np.asarray(preprocess.preprocess(images, 'adm')),
                                (images.astype(np.float32) - 128) / 128)


@pytest.mark.slow  # a second compilation (~20 s here)
def test_sharded_batches_match_one_device(weights, extractor):
  # 8 fake devices with a padded batch vs one device: the same features.
  images = _images(5, seed=6)
  single = features_lib.FeatureExtractor(inception.from_state_dict(weights), protocol='pytorch_fid',
                                         batch_size=5, mesh=features_lib.batch_mesh(
                                             jax.devices()[:1]))
  assert extractor.mesh.devices.size == len(jax.devices())
  a, b = extractor.batch(images), single.batch(images)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5)


def test_weights_files(tmp_path, weights):
  npz = os.path.join(tmp_path, 'w.npz')
  np.savez(npz, **weights)
  pth = os.path.join(tmp_path, 'w.pth')
  torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, pth)
  for path in (npz, pth):
    read = inception.read_weights(path)
    assert set(read) == set(weights)
    np.testing.assert_array_equal(read['fc.bias'], weights['fc.bias'])


def test_wrong_weights_are_refused(weights):
  missing = dict(weights)
  del missing['Mixed_6d.branch1x1.conv.weight']
  with pytest.raises(inception.WeightsError, match='1 missing'):
    inception.from_state_dict(missing)
  extra = dict(weights, **{'AuxLogits.fc.weight': np.zeros((1008, 768), np.float32)})
  with pytest.raises(inception.WeightsError, match='unexpected'):
    inception.from_state_dict(extra)
  wrong = dict(weights, **{'fc.weight': np.zeros((1000, 2048), np.float32)})
  with pytest.raises(inception.WeightsError, match='fc.weight'):
    inception.from_state_dict(wrong)
