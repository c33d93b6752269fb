"""Neighbour file from embedding shards: each image's top-K most similar images.

  python -m groupdiff_jax.neighbors --config=configs/neighbors_default.py \
      --config.embeddings=/data/emb/imagenet_dinov2_l --workdir=/data/neighbors/imagenet_dinov2_l

--workdir receives ids.npy, sims.npy and header.json (retrieval/neighbor_file.py; docs/neighbors.md).
Any field can be overridden on the command line, e.g. --config.k=50 --config.scann.num_leaves=2000.
ScaNN parameters left unset are derived from n (retrieval/scann_index.py: derive_params).
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.embeddings = ''        # directory written by groupdiff_jax.embed (manifest.json + shards)
  c.k = 100                # neighbours per image, the image itself excluded
  c.backend = 'auto'       # auto | scann | exact  (auto: exact up to exact_max_n images)
  c.exact_max_n = 20_000
  c.exact_block = 1024     # exact backend: query rows per matmul block
  c.recall_queries = 1000  # random queries checked against exact search (0: skip)
  c.recall_at = (16,)      # recall@K is always measured; these ranks too
  c.seed = 0               # the recall sample
  c.group_size = 4         # grouping statistics: groups of N need N-1 neighbours ...
  c.threshold = 0.7        # ... with cosine similarity >= threshold (the paper's 0.7)

  c.scann = ml_collections.ConfigDict()
  c.scann.num_leaves = config_dict.placeholder(int)            # ~1.5 sqrt(n)
  c.scann.leaves_to_search = config_dict.placeholder(int)      # ~1.6% of the leaves, >= 24
  c.scann.training_sample_size = config_dict.placeholder(int)  # built on these, rest upserted
  c.scann.training_iterations = config_dict.placeholder(int)
  c.scann.min_partition_size = config_dict.placeholder(int)    # 1 (> 1 breaks reproducibility)
  c.scann.quantize_centroids = config_dict.placeholder(bool)   # int8 centroid scoring
  c.scann.dims_per_block = config_dict.placeholder(int)        # 2
  c.scann.anisotropic_threshold = config_dict.placeholder(float)  # 0.2
  c.scann.hash_type = config_dict.placeholder(str)             # lut16 | lut256
  c.scann.residual_quantization = config_dict.placeholder(bool)  # False: saves memory
  c.scann.reorder = config_dict.placeholder(int)               # candidates rescored exactly
  c.scann.reorder_dtype = config_dict.placeholder(str)         # float32 (exact) | bfloat16 | int8
  c.scann.soar_lambda = config_dict.placeholder(float)         # SOAR spilling (off by default)
  c.scann.num_threads = config_dict.placeholder(int)           # default: all cores
  c.scann.seed = config_dict.placeholder(int)                  # k-means seed, sample (1)
  c.scann.kmeans_init = config_dict.placeholder(str)           # kmeans++ | random
  c.scann.spherical = config_dict.placeholder(bool)            # spherical k-means (True)
  c.scann.upsert_batch = config_dict.placeholder(int)          # rows per ScaNN upsert batch
  return c
