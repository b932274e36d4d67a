from pathlib import Path

from setuptools import find_packages, setup

EXTRAS = {
    "vit": ["vit-pytorch"],
    "hf": ["transformers>=5.24"],
    "clip": ["open_clip_torch>=3"],
    "timm": ["timm>=1"],
    "examples": ["tqdm", "matplotlib", "safetensors", "scikit-learn"],
    "eval": ["pycocoevalcap", "scikit-learn", "tqdm", "Pillow", "numpy", "lmms-eval>=0.7.3,<0.8", "filelock<4"],
    "data": ["webdataset", "Pillow", "numpy"],
    "peft": ["peft>=0.21"],
    "quant": ["torchao>=0.18"],  # int8 weight-only quantization of the frozen LM, CPU or GPU
    "nf4": ["bitsandbytes>=0.46.1"],  # 4-bit NF4 loading through transformers (a GPU's)
    "chat": ["Pillow", "safetensors"],  # examples/chat_demo.py: the web chat (standard-library server, no CDN)
    "test": ["pytest", "ruff", "selenium"],  # selenium drives the system's chromium in tests/test_chat_browser.py
}
# Every extra but nf4 (bitsandbytes, for a GPU): what `.ci/run` and the README's test command install.
EXTRAS["all"] = sorted({dep for name, deps in EXTRAS.items() if name != "nf4" for dep in deps})

setup(
    name="flamingo-pytorch",
    version="0.2.0",
    description="Flamingo (Alayrac et al., 2022) in PyTorch: FlamingoPaLM, and Flamingo over any decoder-only LM",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    url="https://github.com/lucidrains/flamingo-pytorch",
    packages=find_packages(include=["flamingo_pytorch", "flamingo_pytorch.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.5", "einops>=0.7", "einops-exts"],
    extras_require=EXTRAS,
    keywords=["artificial intelligence", "deep learning", "visual language model", "few-shot", "flamingo"],
    classifiers=[
        "Development Status :: 4 - Beta",
        "Intended Audience :: Science/Research",
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
