"""openmm-sbg: Sequential Boltzmann Generators for OpenMM."""

from setuptools import find_packages, setup

# Runtime dependencies, pinned to a set that installs as wheels on Python 3.11 and works
# together. conda-recipe/meta.yaml lists the same packages (a test checks it).
INSTALL_REQUIRES = [
    "openmm==8.6.1",
    "openmmtools==0.27.0",
    "torch==2.13.0",
    "mdtraj==1.11.0",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "pot==0.9.7.post1",
    "pymbar==4.0.3",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
    "h5py==3.16.0",
    "tables==3.11.1",
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
        "test": ["pytest==9.2.0"],
        "structures": ["PeptideBuilder==1.1.0"],
    },
    entry_points={"console_scripts": ["openmm-sbg=openmm_sbg.cli:main"]},
    classifiers=[
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Chemistry",
    ],
)
