"""Packaging for taipan-jax.

`configs/` lives at the top level (the design card) and ships inside the wheel as
`taipan_jax.configs`, so `taipan_jax.load_config("tiny")` works from any install.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    # 0.10.2 is the newest jax that installs on Python 3.11; the GPU image has 0.11.2.
    "jax>=0.10.2",
    "flax>=0.12.0",
    "optax>=0.2.6",
    "orbax-checkpoint>=0.11.0",
    "grain>=0.2.12",
    "sentencepiece>=0.2.0",
    "ml-collections>=1.1.0",
    "absl-py>=2.1.0",
    # TensorBoard's own event-file writer: metrics without TensorFlow.
    "tensorboard>=2.15",
    # Hugging Face checkpoints read as numpy, no torch needed.
    "safetensors>=0.4",
    "numpy>=1.26",
]

# jax[tpu] pins the libtpu built for that jax release. libtpu ships for Linux x86_64 only;
# on a machine without a TPU it is a compiler: jax's default backend stays the CPU (or GPU),
# and jax.experimental.topologies describes TPU slices to compile for (`taipan compile`).
_LIBTPU = "jax[tpu]>=0.10.2; sys_platform == 'linux' and platform_machine == 'x86_64'"

EXTRAS = {
    # Plots (long-context evaluation, benchmarks, notebooks).
    "plot": ["matplotlib>=3.8"],
    # lm-evaluation-harness (taipan_jax/inference/lm_eval_adapter.py); no torch needed.
    "eval": ["lm-eval>=0.4.8"],
    # Hugging Face tokenizer.json files as data.tokenizer (e.g. the Llama-3 tokenizer).
    "hf": ["tokenizers>=0.15"],
    # nbmake runs notebooks/ (small mode) inside the test command; libtpu lets the tests
    # compile every Mosaic kernel and the train step for TPU slices on the CPU.
    "test": ["pytest>=8.0", "pytest-xdist>=3.5", "matplotlib>=3.8", "nbmake>=1.5",
             "tokenizers>=0.15", _LIBTPU],
    "gpu": ["jax[cuda12]>=0.10.2"],
    # What a TPU VM installs, and what a CPU machine installs to compile for TPUs.
    "tpu": [_LIBTPU],
}

setup(
    name="taipan-jax",
    version="0.1.0",
    description="Reference JAX implementation of Taipan (Mamba-2 + Selective Attention Layers)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["taipan_jax", "taipan_jax.*", "pallas_kernels",
                                    "pallas_kernels.*"]) + ["taipan_jax.configs"],
    package_dir={"taipan_jax.configs": "configs"},
    entry_points={"console_scripts": ["taipan = taipan_jax.cli:main"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
