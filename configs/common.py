"""Defaults shared by every config. Each config file imports this and changes what differs.

Run any config with:
  python -m groupdiff_jax.main --config=configs/NAME.py --workdir=DIR [--config.a.b=value ...]
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 400_000
  c.log_every_steps = 100
  c.ckpt_every_steps = 5_000
  c.keep_ckpts = 3
  c.init_from = ''  # an Orbax checkpoint dir: load its weights only (fine-tuning), fresh optimizer

  # Model: a name from groupdiff_jax.models.sit.SIZES x patch ('SiT-XL/2', 'DiT-B/4', ...).
  c.model = ml_collections.ConfigDict()
  c.model.name = 'SiT-XL/2'
  c.model.input_size = 32        # latent (or pixel) side length
  c.model.in_channels = 4
  c.model.num_classes = 1000     # the null (CFG) class is index num_classes
  c.model.learn_sigma = False
  c.model.max_group_size = 4     # rows of the sample-embedding table; 0 disables it
  c.model.fixed_sample_ids = False
  c.model.attention = 'auto'     # xla | blocked | flash_cpu | cudnn | splash | auto (per platform)
  c.model.dtype = 'bfloat16'     # compute dtype; parameters stay in param_dtype
  c.model.param_dtype = 'float32'
  c.model.remat = False          # rematerialise each block in the backward pass
  c.model.residuals = 'auto'     # what the backward keeps: all | dots | auto (CPU, GPU: dots)
  c.model.dense_grads = 'auto'   # xla | cpu_kernel | auto (the C++ kernel on a one-device CPU run)
  c.model.layer_loop = 'auto'    # scan | unrolled | auto (the CPU train step unrolled)
  c.model.time_convention = 'noise_at_1'  # 'noise_at_0' for converted original SiT checkpoints

  # What is learned (groupdiff_jax/diffusion/objectives.py): 'flow' (flow matching, noise at
  # t = 1, velocity; samplers sde | euler | heun) or 'ddpm' (DiT: integer t, eps + learned
  # variance, needs model.learn_sigma; sampler ddpm).
  c.transport = ml_collections.ConfigDict()
  c.transport.objective = 'flow'

  # GroupDiff batch. A global batch is `num_cond` conditional images in groups of cond_group_size
  # followed by unconditional (null-label) images in groups of uncond_group_size.
  #   GroupDiff-l: cond_group_size=1, uncond_group_size=N   (the released variant)
  #   GroupDiff-f: cond_group_size=uncond_group_size=N
  #   plain SiT:   both 1 (uncond_fraction then plays the role of the 10% label dropout)
  c.group = ml_collections.ConfigDict()
  c.group.cond_size = 1
  c.group.uncond_size = 4
  c.group.uncond_fraction = 0.1  # share of the global batch that is unconditional
  c.group.t_spread = 0.0         # delta: members' t drawn within +-delta of a shared base t
                                 # (ddpm: +-round(delta * 1000) integer steps; 0.1 = 100 steps)
  # How partners are picked (groupdiff_jax/data/grouping.py): greedy (nearest unused of the top K,
  # the official code) | threshold (random above group.threshold, the paper) | class (same class,
  # the official query_sim=class ablation) | random (uniformly at random, ablation)
  c.group.neighbors = 'greedy'
  c.group.threshold = 0.7        # cosine threshold of the 'threshold' mode (paper)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 3.0
  c.optim.ema_decay = 0.9999

  c.data = ml_collections.ConfigDict()
  c.data.source = 'synthetic'    # synthetic | digits | latents
  c.data.global_batch = 256
  c.data.path = ''               # latents: the encode job's workdir (ArrayRecord shards)
  c.data.neighbors = ''          # neighbour file dir (retrieval.neighbor_file format)
  c.data.dataset = ''            # latents: refuse latents of another dataset ('' = any)
  c.data.image_size = 32         # digits: resize side
  c.data.num_threads = 1
  c.data.prefetch_batches = 4
  c.data.neighbors_k = 100       # neighbours kept per image when a source builds its own file
  c.data.synthetic_size = 65_536  # images in the synthetic source

  # Mesh: named axes with sizes; -1 fills the remaining devices. Rules map logical axis names
  # (on parameters and activations) to mesh axes.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.axes = ('data', 'fsdp', 'context')
  c.mesh.shape = (1, -1, 1)
  c.mesh.rules = (
      ('batch', ('data', 'fsdp')),  # activations: images / groups
      ('tokens', 'context'),        # activations: the token axis (large groups)
      ('embed', 'fsdp'),            # parameters: the hidden dimension -> FSDP
      ('mlp', None),
      ('heads', None),
      ('layers', None),
      ('vocab', None),
  )

  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = 'sde'       # sde | euler | heun (objective flow) | ddpm (objective ddpm)
  c.sample.num_steps = 250
  c.sample.cfg_scale = 1.0
  c.sample.guidance_low = 0.0
  c.sample.guidance_high = 1.0
  c.sample.cond_group_size = 1
  c.sample.uncond_group_size = 4
  c.sample.guided_channels = 0   # 0 = all channels; 3 reproduces the DiT/SiT legacy quirk
  c.sample.num_images = 16       # the end-of-training PNG grid (0: none)
  c.sample.write_grid = False    # pixel-space models (the demo) write a PNG grid at the end
  c.sample.seed = 0

  # In-training evaluation (groupdiff_jax/evaluation/in_training.py): every `every_steps` (and at
  # the last step) sample `num_samples` images with the EMA weights and the `sample` settings,
  # log the Fréchet distance to a reference and S_cross. Off (0) by default.
  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 0
  c.eval.num_samples = 1000
  c.eval.batch_size = 256         # images per sampling call (whole groups, split over devices)
  c.eval.seed = 0                 # the same noise at every evaluation
  c.eval.reference = 'inception'  # inception (FID vs eval.ref_stats) | digits (classifier)
  c.eval.ref_stats = ''           # inception: .npz with mu/sigma (ADM reference batch layout)
  c.eval.inception_weights = ''   # inception: pt_inception-2015-12-05-6726825d.pth (or .npz)
  c.eval.vae = ''                 # inception on latents: diffusers AutoencoderKL dir to decode
  c.eval.classifier_dir = ''      # digits: '' = WORKDIR/digits_classifier (trained once, cached)
  c.eval.s_cross_groups = 4       # unconditional groups for S_cross (0 = skip)
  c.eval.s_cross_steps = 10       # Euler steps of the S_cross trajectory
  return c
