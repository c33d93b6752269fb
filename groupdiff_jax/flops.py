"""Analytic FLOP counts (for TFLOP/s and MFU in the log line and the benchmark)."""
import jax

from groupdiff_jax.layout import BatchLayout
from groupdiff_jax.models.sit import SiTConfig

# Dense bf16 peak FLOP/s per device, by `device_kind` prefix (vendor datasheets).
PEAK_FLOPS = {
    'NVIDIA H200': 989e12, 'NVIDIA H100': 989e12, 'NVIDIA A100': 312e12, 'NVIDIA L4': 121e12,
    'TPU v6': 918e12, 'TPU v5p': 459e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12,
    'TPU v4': 275e12, 'TPU v3': 123e12,
}


def forward_flops_per_image(cfg: SiTConfig, group_size: int = 1) -> float:
  """Forward FLOPs (2 x multiply-adds) of one image when it attends within a group of M images."""
  t, d, mlp = cfg.num_tokens, cfg.hidden, int(cfg.hidden * cfg.mlp_ratio)
  per_block = (2 * t * d * 3 * d            # qkv
               + 2 * 2 * t * (group_size * t) * d  # q k^T and probs v over the group's tokens
               + 2 * t * d * d              # proj
               + 2 * 2 * t * d * mlp        # fc1, fc2
               + 2 * d * 6 * d)             # adaLN
  embed = 2 * t * cfg.patch ** 2 * cfg.in_channels * d + 2 * (256 * d + d * d)
  final = 2 * d * 2 * d + 2 * t * d * cfg.patch ** 2 * cfg.out_channels
  return cfg.depth * per_block + embed + final


def train_flops_per_batch(cfg: SiTConfig, layout: BatchLayout) -> float:
  """Forward + backward (3x forward) of a GroupDiff batch."""
  fwd = (layout.num_cond * forward_flops_per_image(cfg, layout.cond_group_size)
         + layout.num_uncond * forward_flops_per_image(cfg, layout.uncond_group_size))
  return 3.0 * fwd


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  kind = (device or jax.devices()[0]).device_kind
  for prefix, flops in PEAK_FLOPS.items():
    if kind.startswith(prefix):
      return flops
  return None
