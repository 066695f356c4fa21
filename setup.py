"""Packaging for rift_dist: Robust Critical Fine-Tuning (RiFT) as a cluster-scale training system."""

from setuptools import find_packages, setup

setup(
    name="rift_dist",
    version="0.1.0",
    description="Robust Critical Fine-Tuning (RiFT, arXiv 2308.02533) on DDP/DeepSpeed, FFCV, SLURM and MLflow",
    packages=find_packages(include=["rift_dist", "rift_dist.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "numpy>=2.4,<2.5",
        "mlflow==3.17.2",
        "PyYAML>=6.0,<7",
        "tqdm>=4.66,<5",
        "rich>=13,<16",
        "matplotlib>=3.8,<4",
        "submitit>=1.5.2,<2",
        "torchattacks==3.3.0",  # 3.4+ pins requests~=2.25, which clashes with mlflow
        "scipy>=1.11,<2",
        "Pillow>=10,<14",
        "imagecorruptions==1.1.2",
        "scikit-image>=0.22,<0.27",
    ],
    extras_require={
        "dev": ["pytest>=8,<10", "pytest-timeout>=2.3,<3"],
    },
    entry_points={"console_scripts": ["rift=rift_dist.cli:main"]},
)
