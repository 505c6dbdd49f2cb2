"""htl-jax: multi-task learning with hybrid targets (HTLNet, RecSys 2024) in JAX/Flax.

Installs ONE top-level package, ``htl_jax`` (its configs and the embedded KuaiRand-format
sample ship inside it), and the console commands ``htl-train``, ``htl-reproduce``,
``htl-tune``, ``htl-predict``, ``htl-export`` and ``htl-check-data``.
"""

import pathlib
import re

import setuptools

HERE = pathlib.Path(__file__).parent
# The version lives in htl_jax/__init__.py only.
VERSION = re.search(r"^__version__ = '([^']+)'", (HERE / 'htl_jax' / '__init__.py').read_text(),
                    re.MULTILINE).group(1)
# The jax versions the package runs on; the GPU extras pull the same range's CUDA wheels.
JAX_RANGE = '>=0.5.0,<0.13'

setuptools.setup(
    name='htl-jax',
    version=VERSION,
    description=('HTLNet ("Touch the Core", RecSys 2024) and its baselines for multi-task '
                 'learning with hybrid targets, in JAX/Flax'),
    long_description=(HERE / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=setuptools.find_packages(include=['htl_jax', 'htl_jax.*']),
    package_data={'htl_jax': ['data/sample/kuairand/*.csv']},
    include_package_data=True,
    entry_points={'console_scripts': [
        'htl-train = htl_jax.cli.train:run',
        'htl-reproduce = htl_jax.cli.reproduce:run',
        'htl-tune = htl_jax.cli.tune:run',
        'htl-predict = htl_jax.cli.predict:run',
        'htl-export = htl_jax.cli.export:run',
        'htl-check-data = htl_jax.cli.check_data:run',
    ]},
    install_requires=[
        f'jax{JAX_RANGE}',
        'flax>=0.10.0,<0.14',
        'optax>=0.2.4,<0.4',
        'orbax-checkpoint>=0.11.0,<0.14',
        'numpy>=1.26',
        'polars>=1.0',
        'absl-py>=2.0',
        'ml-collections>=0.1.1',
        'tensorboardX>=2.6',
        'tqdm>=4.60',
        'flatbuffers>=23.0',
    ],
    extras_require={
        # The reproduction suite and tuning: Optuna studies in SQLite / PostgreSQL, the
        # t-test, figures, Optuna's trial tables.
        'repro': ['optuna>=4.0', 'sqlalchemy>=2.0', 'psycopg[binary]>=3.1',
                  'psycopg2-binary>=2.9', 'scipy>=1.11',
                  'matplotlib>=3.7', 'pandas>=2.0'],
        # The suite and its linter (.ci/run: ruff check ., then pytest).
        'test': ['pytest>=8', 'pytest-xdist>=3.5', 'scikit-learn>=1.4', 'scipy>=1.11',
                 'wheel>=0.40', 'optuna>=4.0', 'sqlalchemy>=2.0', 'psycopg[binary]>=3.1',
                 'psycopg2-binary>=2.9',
                 'matplotlib>=3.7', 'pandas>=2.0', 'ruff>=0.6'],
        # NVIDIA GPUs (Linux): jaxlib's CUDA plugin with its CUDA libraries from pip, for the
        # CUDA major version of the machine's driver (README, "Install for a GPU").
        'cuda12': [f'jax[cuda12]{JAX_RANGE}'],
        'cuda13': [f'jax[cuda13]{JAX_RANGE}'],
        # tools/bench_torch.py only (the PyTorch peer); never imported by the package. On a
        # machine without a GPU, install the CPU torch first (docs/benchmarks.md), or pip
        # takes the CUDA build and its ~20 nvidia-* wheels.
        'bench_torch': ['torch>=2.0', 'torch-rechub==0.9.0', 'pandas>=2.0'],
        # TensorBoard itself, to read the event files every run writes (tensorboardX writes
        # them without it).
        'tensorboard': ['tensorboard>=2.14'],
    },
    classifiers=['License :: OSI Approved :: Apache Software License',
                 'Programming Language :: Python :: 3'],
)
