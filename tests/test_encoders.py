"""Parity of the Flax DINOv2 / CLIP encoders with transformers' PyTorch models (float32).

Small random configs are saved with save_pretrained and loaded by our loader; every parameter is
re-drawn at random first (initial LayerNorm/LayerScale values of 1 would hide mapping mistakes).
Error metric: max |ours - torch| / max |torch| over the output, required <= 1e-5.
"""
import jax
import numpy as np
import pytest

from groupdiff_jax.models import encoders
from groupdiff_jax.retrieval import preprocess

torch = pytest.importorskip('torch', reason='parity tests need CPU torch (pip install .[test])')
transformers = pytest.importorskip('transformers', reason='parity tests need transformers')

TOL = 1e-5


def _randomise(model, seed: int) -> None:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _ours(model_dir, pixels: np.ndarray) -> np.ndarray:
  enc = encoders.load_encoder(str(model_dir))
  with jax.default_matmul_precision('highest'):
    out = jax.jit(enc.apply)(enc.state, pixels.transpose(0, 2, 3, 1))  # NCHW -> NHWC
  return np.asarray(out)


def _dinov2(tmp_path, **cfg):
  config = transformers.Dinov2Config(
      hidden_size=48, num_hidden_layers=2, num_attention_heads=4, patch_size=7, image_size=28,
      layerscale_value=0.5, **cfg)
  model = transformers.Dinov2Model(config).eval()
  _randomise(model, 0)
  model.save_pretrained(tmp_path)
  return model


@pytest.mark.parametrize('height,width', [(28, 28), (42, 42), (21, 21), (28, 42)])
def test_dinov2_parity(tmp_path, height, width):
  """Trained grid 4x4; 42/21 px inputs exercise position-embedding interpolation (up and down)."""
  model = _dinov2(tmp_path)
  pixels = np.random.default_rng(1).standard_normal((3, 3, height, width)).astype(np.float32)
  with torch.no_grad():
    ref = model(pixel_values=torch.from_numpy(pixels)).pooler_output.numpy()
  ours = _ours(tmp_path, pixels)
  assert ours.shape == ref.shape == (3, 48)
  assert _rel_err(ours, ref) <= TOL


def test_dinov2_swiglu_parity(tmp_path):
  """The ViT-g variant: SwiGLU MLP (weights_in split into gate/up)."""
  model = _dinov2(tmp_path, use_swiglu_ffn=True, qkv_bias=False)
  pixels = np.random.default_rng(2).standard_normal((2, 3, 28, 28)).astype(np.float32)
  with torch.no_grad():
    ref = model(pixel_values=torch.from_numpy(pixels)).pooler_output.numpy()
  assert _rel_err(_ours(tmp_path, pixels), ref) <= TOL


def _clip_vision_config():
  return dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              image_size=28, patch_size=7, projection_dim=24)


def test_clip_with_projection_parity(tmp_path):
  config = transformers.CLIPVisionConfig(**_clip_vision_config())
  model = transformers.CLIPVisionModelWithProjection(config).eval()
  _randomise(model, 3)
  model.save_pretrained(tmp_path)
  pixels = np.random.default_rng(4).standard_normal((3, 3, 28, 28)).astype(np.float32)
  with torch.no_grad():
    ref = model(pixel_values=torch.from_numpy(pixels)).image_embeds.numpy()
  ours = _ours(tmp_path, pixels)
  assert ours.shape == ref.shape == (3, 24)
  assert _rel_err(ours, ref) <= TOL


def test_clip_full_model_checkpoint(tmp_path):
  """A whole CLIPModel folder (text tower included, as on the hub) loads its vision side."""
  config = transformers.CLIPConfig(
      vision_config=_clip_vision_config(), projection_dim=24,
      text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, vocab_size=100, max_position_embeddings=16))
  model = transformers.CLIPModel(config).eval()
  _randomise(model, 5)
  model.save_pretrained(tmp_path)
  pixels = np.random.default_rng(6).standard_normal((2, 3, 28, 28)).astype(np.float32)
  with torch.no_grad():
    pooled = model.vision_model(pixel_values=torch.from_numpy(pixels)).pooler_output
    ref = model.visual_projection(pooled).numpy()
  assert _rel_err(_ours(tmp_path, pixels), ref) <= TOL


@pytest.mark.parametrize('size,expected', [('S', 22.06e6), ('B', 86.58e6), ('L', 304.4e6),
                                           ('g', 1136.5e6)])
def test_dinov2_sizes_parameter_counts(size, expected):
  """S/B/L/g built abstractly (no memory) have the published DINOv2 parameter counts (+-1%)."""
  _, state = encoders.abstract_encoder('dinov2', encoders.dinov2_hf_config(size))
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state))
  assert abs(count - expected) / expected < 0.01, count


def test_preprocess_matches_hf_processor():
  """Resize/crop/normalise equal BitImageProcessor's (DINOv2) on odd-sized images."""
  spec = encoders.ENCODER_KINDS['dinov2'].preprocess({})
  proc = transformers.BitImageProcessorPil(
      size={'shortest_edge': spec.resize}, crop_size={'height': spec.crop, 'width': spec.crop},
      image_mean=list(spec.mean), image_std=list(spec.std))
  rng = np.random.default_rng(7)
  for shape in [(37, 61, 3), (300, 200, 3), (256, 256, 3)]:
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    ref = np.asarray(proc(images=image, return_tensors='np')['pixel_values'])[0].transpose(1, 2, 0)
    ours = np.asarray(preprocess.normalise(preprocess.resize_and_crop(image, spec)[None], spec))[0]
    np.testing.assert_allclose(ours, ref, atol=1e-5)
