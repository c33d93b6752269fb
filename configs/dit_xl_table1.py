"""The rows of the paper's Table 1 (DiT-XL/2, DDPM, 800K steps, FID-50K with CFG): pick one
after a colon, e.g.

  python -m groupdiff_jax.main --config=configs/dit_xl_table1.py:uc4 --workdir=DIR \
      --config.data.path=/data/latents/imagenet256 \
      --config.data.neighbors=/data/neighbors/imagenet_clip_l

  row        paper FID  what differs from configs/dit_xl.py (GroupDiff-l, N=4)
  baseline   3.50       plain DiT: no groups (10% null-label singles), no sample embedding
  uc2        2.92       unconditional groups of 2
  uc4        2.42       unconditional groups of 4 (= configs/dit_xl.py)
  uc8        2.14       unconditional groups of 8
  uc16       1.86       unconditional groups of 16
  random     3.57       N=4, partners drawn uniformly at random
  class      2.81       N=4, partners from the same class
  spread100  2.32       N=4, members' t within +-100 steps of the group's base t

The paper groups by CLIP-L image embeddings: build --config.data.neighbors from CLIP-L
(configs/embed_clip_tfds.py, then the neighbours job); 'random' and 'class' do not use its
similarities (the latent source still reads one). The
global batch stays 256 for every N (the paper's fair comparison), with ~10% of it unconditional
in whole groups (uc16: 2 groups = 12.5%; the trainer prints the exact split). Sample a finished
row with configs/sample_dit_xl.py and --config.sample.uncond_group_size=N (1 for baseline).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import dit_xl  # pylint: disable=wrong-import-position

# row -> (unconditional group size, partner selection, group time spread)
ROWS = {
    'baseline': (1, 'greedy', 0.0),
    'uc2': (2, 'greedy', 0.0),
    'uc4': (4, 'greedy', 0.0),
    'uc8': (8, 'greedy', 0.0),
    'uc16': (16, 'greedy', 0.0),
    'random': (4, 'random', 0.0),
    'class': (4, 'class', 0.0),
    'spread100': (4, 'greedy', 0.1),  # round(0.1 * 1000) = 100 integer steps
}


def get_config(row: str = 'uc4'):
  if row not in ROWS:
    raise ValueError(f'configs/dit_xl_table1.py:{row}: unknown row; rows: {", ".join(ROWS)}')
  size, neighbors, spread = ROWS[row]
  c = dit_xl.get_config()
  c.group.uncond_size = size
  c.group.neighbors = neighbors
  c.group.t_spread = spread
  c.model.max_group_size = 0 if size == 1 else size  # the baseline has no sample embedding
  c.sample.uncond_group_size = size
  return c
