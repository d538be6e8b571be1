"""openmm-sbg: Sequential Boltzmann Generators for OpenMM."""

from setuptools import find_packages, setup

# Runtime dependencies as compatible ranges, so that installing into an existing OpenMM +
# PyTorch environment keeps the user's OpenMM, PyTorch (and its CUDA build) and NumPy.
# Lower bound: the oldest release the code supports; CI installs exactly these (the file
# constraints/oldest.txt) and runs the fast tests on them. Upper bound: the next major release,
# so every release served today is inside. The exact set we develop and test on is
# constraints/known-good.txt (`pip install -c constraints/known-good.txt -e .`).
# Why each lower bound:
#   openmm 8.5       openmm.PythonForce (create_flow_force) first ships in 8.5.0.
#   openmmtools 0.27 the only release on PyPI; the OpenMM moves and replica exchange use it.
#   torch 2.4        the first release whose wheels work with NumPy 2 on every platform
#                    (older ones fail in torch.from_numpy with "Numpy is not available", and
#                    this range admits NumPy 2); the code itself needs 2.0
#                    (scaled_dot_product_attention, torch.compile; compile on Python 3.12: 2.4).
#   numpy 1.26       the last 1.x line; 2.x is the main line. CI runs the oldest set with
#                    NumPy 1.26.0 and again with NumPy 2.0.0.
#   scipy 1.15       openmmtools 0.27 requires it.
#   mdtraj 1.10.2, tables 3.10.1
#                    the first releases that allow NumPy 2 (older ones declare numpy<2).
#   pot 0.9.4, matplotlib 3.8.4, h5py 3.11
#                    the first releases whose compiled modules are built against NumPy 2
#                    (older ones do not declare numpy<2 but fail to import with it).
#   pymbar 4.0.2     the pymbar 4 API (openmmtools); 4.0.1 also forces jax on every install.
#   tqdm 4.64        tqdm.auto as used; the oldest tested.
# conda-recipe/meta.yaml lists the same ranges under conda-forge's names (a test checks it).
INSTALL_REQUIRES = [
    "openmm>=8.5,<9",
    "openmmtools>=0.27,<1",
    "torch>=2.4,<3",
    "mdtraj>=1.10.2,<2",
    "numpy>=1.26,<3",
    "scipy>=1.15,<2",
    "pot>=0.9.4,<1",
    "pymbar>=4.0.2,<5",
    "tqdm>=4.64,<5",
    "matplotlib>=3.8.4,<4",
    "h5py>=3.11,<4",
    "tables>=3.10.1,<4",
]

setup(
    name="openmm-sbg",
    version="0.1.0",
    description="Sequential Boltzmann Generators (TarFlow + SMC) for OpenMM peptide systems",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["openmm_sbg", "openmm_sbg.*"]),
    package_data={"openmm_sbg": ["structures/*.pdb", "models/*", "reference/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # openmm-torch's CPU build is compiled against torch 2.12; it replaces the pinned torch.
        "openmmtorch": ["acellera-openmmtorch-cpu==1.10", "torch==2.12.1"],
        "test": ["pytest>=8"],
        "structures": ["PeptideBuilder>=1.1"],
    },
    entry_points={"console_scripts": ["openmm-sbg=openmm_sbg.cli:main"]},
    classifiers=[
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Chemistry",
    ],
)
