"""Image encoders for similarity grouping: DINOv2 and CLIP ViT towers from Hugging Face files.

    encoder = load_encoder('/path/to/dinov2-large')      # config.json + model.safetensors
    emb = encoder.apply(encoder.state, images)           # images: normalised [B, H, W, 3] float

A model directory is what `save_pretrained` writes (or a hub snapshot): config.json and
model.safetensors (or sharded model-*.safetensors + model.safetensors.index.json), read with the
safetensors numpy loader, so torch is not needed. Kinds are a registry keyed by config.json's
model_type: 'dinov2' (Dinov2Model: the CLS token after the final LayerNorm, `pooler_output`) and
'clip' (a CLIPModel or CLIPVisionModelWithProjection checkpoint: the projected CLS token,
`image_embeds`). Each kind also names its preprocessing (resize / centre crop / mean / std).
"""
import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from groupdiff_jax.models.encoders_vit import ViTConfig, VisionTransformer

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Host-side resize (shortest edge, bicubic) + centre crop, then (x/255 - mean) / std."""
  resize: int
  crop: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class EncoderKind:
  model_types: tuple[str, ...]                                    # config.json "model_type"
  vit_config: Callable[[dict[str, Any]], ViTConfig]               # config.json -> ViTConfig
  weights: Callable[[Callable[[str], np.ndarray], ViTConfig], dict]  # get(key) -> pure state
  preprocess: Callable[[dict[str, Any]], Preprocess]              # config.json -> Preprocess


# ----------------------------------------------------------------------------------------------
# DINOv2 (Dinov2Model). Sizes of the released models, for reference and for tests:
DINOV2_SIZES = {  # name: (hidden, depth, heads, swiglu)
    'S': (384, 12, 6, False), 'B': (768, 12, 12, False),
    'L': (1024, 24, 16, False), 'g': (1536, 40, 24, True),
}


def dinov2_hf_config(size: str, **overrides: Any) -> dict[str, Any]:
  """The config.json fields of facebook/dinov2-{small,base,large,giant} (patch 14, 518 px)."""
  hidden, depth, heads, swiglu = DINOV2_SIZES[size]
  return dict({'model_type': 'dinov2', 'hidden_size': hidden, 'num_hidden_layers': depth,
               'num_attention_heads': heads, 'mlp_ratio': 4, 'patch_size': 14, 'image_size': 518,
               'use_swiglu_ffn': swiglu, 'layer_norm_eps': 1e-6, 'qkv_bias': True,
               'hidden_act': 'gelu', 'layerscale_value': 1.0}, **overrides)


def _dinov2_config(c: dict[str, Any]) -> ViTConfig:
  hidden = c['hidden_size']
  mlp_hidden = int(hidden * c.get('mlp_ratio', 4))
  if c.get('use_swiglu_ffn', False):  # two thirds of the width, rounded up to a multiple of 8
    mlp_hidden = (int(mlp_hidden * 2 / 3) + 7) // 8 * 8
  return ViTConfig(
      hidden=hidden, depth=c['num_hidden_layers'], heads=c['num_attention_heads'],
      mlp_hidden=mlp_hidden, patch=c.get('patch_size', 14),
      grid=c.get('image_size', 518) // c.get('patch_size', 14),
      mlp='swiglu' if c.get('use_swiglu_ffn', False) else c.get('hidden_act', 'gelu'),
      channels=c.get('num_channels', 3), qkv_bias=c.get('qkv_bias', True), patch_bias=True,
      layerscale=True, ln_eps=c.get('layer_norm_eps', 1e-6), interpolate_pos=True)


def _linear(get: Callable[[str], np.ndarray], name: str, bias: bool = True) -> dict:
  out = {'kernel': get(name + '.weight').T}  # torch Linear stores [out, in]
  if bias:
    out['bias'] = get(name + '.bias')
  return out


def _norm(get: Callable[[str], np.ndarray], name: str) -> dict:
  return {'scale': get(name + '.weight'), 'bias': get(name + '.bias')}


def _patch_kernel(w: np.ndarray) -> np.ndarray:
  """Conv weight [D, C, p, p] -> kernel [(p, p, C), D] matching VisionTransformer's patch order."""
  return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])


def _dinov2_weights(get: Callable[[str], np.ndarray], cfg: ViTConfig) -> dict:
  # Names of the hub checkpoints (transformers < 5 layout, which save_pretrained still writes);
  # transformers 5 in-memory names are accepted as aliases by the key lookup.
  blocks = {}
  for i in range(cfg.depth):
    p = f'encoder.layer.{i}.'
    att = p + 'attention.'
    block = {
        'norm1': _norm(get, p + 'norm1'), 'norm2': _norm(get, p + 'norm2'),
        'attn': {'q': _linear(get, att + 'attention.query', cfg.qkv_bias),
                 'k': _linear(get, att + 'attention.key', cfg.qkv_bias),
                 'v': _linear(get, att + 'attention.value', cfg.qkv_bias),
                 'o': _linear(get, att + 'output.dense')},
        'gamma1': get(p + 'layer_scale1.lambda1'), 'gamma2': get(p + 'layer_scale2.lambda1'),
    }
    if cfg.mlp == 'swiglu':  # weights_in = [gate; up] stacked on the output axis
      w_in, b_in = get(p + 'mlp.weights_in.weight'), get(p + 'mlp.weights_in.bias')
      h = cfg.mlp_hidden
      block['mlp'] = {'gate': {'kernel': w_in[:h].T, 'bias': b_in[:h]},
                      'up': {'kernel': w_in[h:].T, 'bias': b_in[h:]},
                      'fc2': _linear(get, p + 'mlp.weights_out')}
    else:
      block['mlp'] = {'fc1': _linear(get, p + 'mlp.fc1'), 'fc2': _linear(get, p + 'mlp.fc2')}
    blocks[i] = block
  return {
      'patch_embed': {'kernel': _patch_kernel(get('embeddings.patch_embeddings.projection.weight')),
                      'bias': get('embeddings.patch_embeddings.projection.bias')},
      'cls_token': get('embeddings.cls_token').reshape(-1),
      'pos_embed': get('embeddings.position_embeddings')[0],
      'blocks': blocks, 'norm': _norm(get, 'layernorm'),
  }


def _dinov2_preprocess(c: dict[str, Any]) -> Preprocess:
  del c  # BitImageProcessor of facebook/dinov2-*: resize 256, crop 224, ImageNet statistics
  return Preprocess(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)


# ----------------------------------------------------------------------------------------------
# CLIP vision tower + visual_projection (CLIPVisionModelWithProjection / CLIPModel).
def _clip_vision(c: dict[str, Any]) -> tuple[dict[str, Any], int]:
  """(vision config, projection_dim) from a CLIPConfig or a CLIPVisionConfig."""
  if 'vision_config' in c:
    return c['vision_config'], c.get('projection_dim', 512)
  return c, c.get('projection_dim', 512)


def _clip_config(c: dict[str, Any]) -> ViTConfig:
  v, proj = _clip_vision(c)
  return ViTConfig(
      hidden=v['hidden_size'], depth=v['num_hidden_layers'], heads=v['num_attention_heads'],
      mlp_hidden=v['intermediate_size'], patch=v['patch_size'],
      grid=v['image_size'] // v['patch_size'], mlp=v.get('hidden_act', 'quick_gelu'),
      channels=v.get('num_channels', 3), qkv_bias=True, patch_bias=False, layerscale=False,
      pre_norm=True, ln_eps=v.get('layer_norm_eps', 1e-5), projection_dim=proj,
      interpolate_pos=False)


def _clip_weights(get: Callable[[str], np.ndarray], cfg: ViTConfig) -> dict:
  blocks = {}
  for i in range(cfg.depth):
    p = f'vision_model.encoder.layers.{i}.'
    blocks[i] = {
        'norm1': _norm(get, p + 'layer_norm1'), 'norm2': _norm(get, p + 'layer_norm2'),
        'attn': {'q': _linear(get, p + 'self_attn.q_proj'),
                 'k': _linear(get, p + 'self_attn.k_proj'),
                 'v': _linear(get, p + 'self_attn.v_proj'),
                 'o': _linear(get, p + 'self_attn.out_proj')},
        'mlp': {'fc1': _linear(get, p + 'mlp.fc1'), 'fc2': _linear(get, p + 'mlp.fc2')},
    }
  e = 'vision_model.embeddings.'
  return {
      'patch_embed': {'kernel': _patch_kernel(get(e + 'patch_embedding.weight'))},
      'cls_token': get(e + 'class_embedding'),
      'pos_embed': get(e + 'position_embedding.weight'),
      'pre_norm': _norm(get, 'vision_model.pre_layrnorm'),  # sic: HF's spelling
      'blocks': blocks, 'norm': _norm(get, 'vision_model.post_layernorm'),
      'proj': {'kernel': get('visual_projection.weight').T},
  }


def _clip_preprocess(c: dict[str, Any]) -> Preprocess:
  size = _clip_vision(c)[0]['image_size']  # CLIPImageProcessor: resize = crop = image size
  return Preprocess(resize=size, crop=size, mean=CLIP_MEAN, std=CLIP_STD)


ENCODER_KINDS: dict[str, EncoderKind] = {
    'dinov2': EncoderKind(('dinov2',), _dinov2_config, _dinov2_weights, _dinov2_preprocess),
    'clip': EncoderKind(('clip', 'clip_vision_model'), _clip_config, _clip_weights,
                        _clip_preprocess),
}

# transformers-5 in-memory names -> the hub names used above (either may be in a file).
_KEY_ALIASES = (
    ('attention.attention.query', 'attention.q_proj'),
    ('attention.attention.key', 'attention.k_proj'),
    ('attention.attention.value', 'attention.v_proj'),
    ('attention.output.dense', 'attention.o_proj'),
    ('mlp.weights_out', 'mlp.down_proj'),
)


def _key_variants(name: str):
  """Names a tensor may carry: hub/transformers-5 spellings, with or without a model prefix."""
  for cand in [name] + [name.replace(old, new) for old, new in _KEY_ALIASES if old in name]:
    yield cand
    yield 'dinov2.' + cand  # saved from a DINOv2 head model (e.g. Dinov2ForImageClassification)
    if cand.startswith('vision_model.'):
      yield cand[len('vision_model.'):]  # a bare CLIPVisionModel layout


# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Encoder:
  kind: str
  name: str
  config: ViTConfig
  preprocess: Preprocess
  graphdef: Any
  state: Any

  @property
  def embed_dim(self) -> int:
    return self.config.embed_dim

  def apply(self, state: Any, images: jax.Array) -> jax.Array:
    """Pure function of (state, normalised images): jit it, shard its inputs."""
    return nnx.merge(self.graphdef, state)(images)

  def module(self) -> VisionTransformer:
    return nnx.merge(self.graphdef, self.state)


def read_config(model_dir: str) -> dict[str, Any]:
  path = os.path.join(model_dir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{model_dir}: no config.json (expected a Hugging Face model folder)')
  with open(path) as f:
    return json.load(f)


def detect_kind(config: dict[str, Any]) -> str:
  model_type = config.get('model_type', '')
  for kind, spec in ENCODER_KINDS.items():
    if model_type in spec.model_types:
      return kind
  raise ValueError(f'config.json model_type {model_type!r} is not a known encoder kind '
                   f'({", ".join(ENCODER_KINDS)})')


def _tensor_getter(model_dir: str) -> Callable[[str], np.ndarray]:
  """get(name) -> float32 array from model.safetensors (single or sharded), aliases resolved."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  index = os.path.join(model_dir, 'model.safetensors.index.json')
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
  else:
    files = ['model.safetensors']
  where: dict[str, Any] = {}
  for name in files:
    path = os.path.join(model_dir, name)
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} is missing')
    handle = safe_open(path, framework='numpy')
    where.update({key: handle for key in handle.keys()})

  def get(name: str) -> np.ndarray:
    for key in _key_variants(name):
      if key in where:
        return np.asarray(where[key].get_tensor(key), np.float32)
    raise KeyError(f'{model_dir}: tensor {name!r} not found in the checkpoint')
  return get


def build_encoder(kind: str, hf_config: dict[str, Any], *, dtype=jnp.float32, precision=None,
                  seed: int = 0) -> Encoder:
  """A randomly initialised encoder of the given kind (tests, shape checks)."""
  spec = ENCODER_KINDS[kind]
  cfg = spec.vit_config(hf_config)
  model = VisionTransformer(cfg, dtype=dtype, precision=precision, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  return Encoder(kind, kind, cfg, spec.preprocess(hf_config), graphdef, state)


def abstract_encoder(kind: str, hf_config: dict[str, Any]) -> tuple[ViTConfig, Any]:
  """(ViTConfig, abstract state) without allocating weights: parameter counts, memory planning."""
  cfg = ENCODER_KINDS[kind].vit_config(hf_config)
  model = nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))
  return cfg, nnx.state(model)


def load_encoder(model_dir: str, *, kind: str | None = None, dtype=jnp.float32,
                 precision=None) -> Encoder:
  """Loads a Hugging Face DINOv2 or CLIP folder (config.json + safetensors) into an Encoder.

  `dtype` is the compute dtype (parameters stay float32); `precision` is passed to every matmul
  (jax.lax.Precision.HIGHEST for float32 parity tests on accelerators).
  """
  hf_config = read_config(model_dir)
  kind = kind or detect_kind(hf_config)
  spec = ENCODER_KINDS[kind]
  cfg = spec.vit_config(hf_config)
  model = nnx.eval_shape(
      lambda: VisionTransformer(cfg, dtype=dtype, precision=precision, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  loaded = spec.weights(_tensor_getter(model_dir), cfg)

  def fill(abstract, path=()):
    if isinstance(abstract, dict):
      return {key: fill(value, path + (key,)) for key, value in abstract.items()}
    value = loaded
    for key in path:
      value = value[key]
    if tuple(value.shape) != tuple(abstract.shape):
      raise ValueError(f'{model_dir}: {"/".join(map(str, path))} has shape {value.shape}, '
                       f'the config implies {abstract.shape}')
    return jnp.asarray(value, abstract.dtype)

  nnx.replace_by_pure_dict(state, fill(pure))
  name = hf_config.get('_name_or_path') or os.path.basename(os.path.normpath(model_dir))
  return Encoder(kind, name, cfg, spec.preprocess(hf_config), graphdef, state)
