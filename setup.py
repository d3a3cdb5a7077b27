"""dalle2-rt: DALL-E 2 (unCLIP) as an optimized inference runtime with exported graphs.

The base install is the torch-free runtime. Training and export need the `train`
extra; the benchmarks and tests need `dev`. Only the `dalle2_rt` package is installed: the
exporter (`export/`) and the benchmarks (`bench/`) run from a clone of the repository
(`python -m export.all`, `python -m bench` in its root); installed under those generic names they
would collide with any other top-level `export` or `bench` in a user's environment.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

# one version, the package's own (dalle2_rt.__version__, which `dalle2-rt --version` prints)
VERSION = re.search(r'^__version__ = "([^"]+)"', Path("dalle2_rt/__init__.py").read_text(encoding="utf-8"), re.M)[1]

TRAIN = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "open_clip_torch>=2.24",
    "onnx>=1.16",
    "onnxscript>=0.1",
    "safetensors>=0.4",
    "tqdm>=4.60",
]

# dalle2-rt serve: FastAPI (request validation and OpenAPI docs from type hints, streaming responses) on
# uvicorn; prometheus-client for /metrics; httpx for the test client and bench/serve_load.py
SERVE = ["fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9", "prometheus-client>=0.20", "httpx>=0.27"]

setup(
    name="dalle2-rt",
    version=VERSION,
    description="DALL-E 2 (unCLIP) inference runtime over exported ONNX / TensorRT graphs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # tomllib (the training config reader) is 3.11+
    packages=find_packages(include=["dalle2_rt", "dalle2_rt.*"]),
    # manifest.schema.json: the engine folder's contract for non-Python consumers, shipped with the runtime.
    # engines/<model>/*: the default model's engine folder (graphs with float16-stored weights, ~35 MB
    # compressed), so that `pip install` + `dalle2-rt "a red circle"` needs no export (make package-engines).
    package_data={"dalle2_rt": ["py.typed", "runtime/manifest.schema.json", "serve/page.html", "engines/*/*"]},
    zip_safe=False,  # the engine folder is read as files
    install_requires=[
        "numpy>=1.24",
        "onnxruntime>=1.17",
        "pillow>=9.0",
        "regex>=2022.1",
        "ftfy>=6.1",
    ],
    extras_require={
        "train": TRAIN,
        # --from-diffusers (export/diffusers_unclip.py): CLIPTokenizer on the `tokenizers` backend needs transformers 5
        "diffusers": ["diffusers>=0.42", "transformers>=5.0", "accelerate>=0.30"],
        "gpu": ["onnxruntime-gpu>=1.17"],
        "trt": ["tensorrt>=10.0"],
        "serve": SERVE,
        "ray": [*SERVE, "ray[serve]>=2.9"],  # dalle2-rt serve --ray / serve run dalle2_rt.serve.ray_app:app
        # --backend triton (HTTP and gRPC clients) and export/triton.py's config checks (model_config_pb2). Not
        # tritonclient[grpc]: it pins protobuf<7 and would downgrade the protobuf 7 others here need; its gRPC
        # client runs on grpcio + protobuf 7 (tested with 7.36).
        # The server side (nvidia-pytriton, numpy<2) lives in .venv/triton-env: `make triton-env`.
        "triton": ["tritonclient[http]>=2.40", "grpcio>=1.60", "protobuf>=6.30"],
        # jsonschema: the manifest schema tests; hypothesis: the hostile-input properties (tests/test_properties.py)
        "dev": ["pytest>=7.0", "ruff>=0.4", "jsonschema>=4.18", "hypothesis>=6.100"],
    },
    entry_points={
        "console_scripts": [
            "dalle2-rt=dalle2_rt.cli:entry",
            "dream=dalle2_rt.cli:entry",
            "dalle2-train=dalle2_rt.training.cli:main",
        ]
    },
)
