from setuptools import find_packages, setup

setup(
    name="stable-mlip",
    version="0.1.0",
    description="StABlE training (Stability-Aware Boltzmann Estimator) for machine-learned interatomic potentials",
    packages=find_packages(include=["mdsim", "mdsim.*"]),
    py_modules=["pretraining", "stable_training", "simulator", "boltzmann_estimator",
                "download_stable_paper_data"],
    package_data={"mdsim.data": ["structures/*.xyz"]},
    include_package_data=True,
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "torch-geometric>=2.5",
        "ase>=3.23",
        "numpy>=1.24",
        "scipy>=1.10",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "tensorboard>=2.12",
        "e3nn>=0.5",
        "vesin-torch>=0.3",
        "matplotlib>=3.6",
    ],
    extras_require={
        "dev": ["pytest>=7", "tblite>=0.3"],
        "xtb": ["tblite>=0.3"],
        "scatter": ["torch-scatter"],
        # model: nequip (the nequip package); tested with nequip 0.19.1, e3nn 0.6.0, torch 2.13.0.
        # Not combinable with mace-torch 0.3.x (pins e3nn 0.4.4): see docs/models.md
        "nequip": ["nequip==0.19.*", "e3nn>=0.6,<0.7"],
    },
)
