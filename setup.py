"""Packaging for LiME: `lime_kernels` (the compute) and `lime` (the method)."""

from setuptools import find_packages, setup

setup(
    name="lime-moe",
    version="0.1.0",
    description=(
        "LiME (Lightweight Mixture of Experts): one shared PEFT adapter, per-expert modulation "
        "vectors and zero-parameter routing, with a PyTorch reference path and fused Triton kernels."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["lime", "lime.*", "lime_kernels", "lime_kernels.*"]),
    # The C++ CPU operators are compiled from their source on first use (lime_kernels/cpu/__init__.py).
    package_data={"lime_kernels.cpu": ["routing.cpp"]},
    install_requires=[
        "torch>=2.6",
        "triton>=3.2; platform_system == 'Linux'",
        # Each transformers major has renamed what LiME hooks into (5.0: torch_dtype -> dtype; the cache
        # argument moved within 5.x too): a 6.x is not assumed to work.
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "datasets>=3.0",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "pillow>=10.0",
        "av>=12.0",
        "bitsandbytes>=0.45",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "scipy>=1.10",
        # torch.utils.cpp_extension builds the C++ CPU operators with ninja (lime_kernels/cpu).
        "ninja>=1.11",
    ],
    entry_points={"console_scripts": ["lime = lime.cli:main"]},
    extras_require={
        "video": ["torchvision>=0.21"],
        "test": ["pytest>=8.0", "pytest-benchmark>=4.0", "peft>=0.15", "hypothesis>=6.100"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
