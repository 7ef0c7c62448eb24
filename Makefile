# One entry point for setting up, serving, testing, training and benchmarking.
# Quickstart: `make serve` (set up + run the service on the demo model), `make test` (set up + run the tests).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data browser nginx ui-screenshot serve test gpu-setup test-gpu wheels lint docs export train-demo evaluate-demo bench bench-export bench-service bench-accuracy

setup: $(VENV)/.installed

# torch is pinned to 2.13.0: on these machines pip takes that CPU build from local disk, while an
# unpinned torch would download a multi-GB CUDA build (README, Quickstart).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps grad-cam==1.5.7
	touch $@

data: $(FMNIST)/t10k-images-idx3-ubyte.gz

$(FMNIST)/t10k-images-idx3-ubyte.gz:
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

# Debian's Chromium, driven by Playwright in the web page's browser tests (Playwright cannot download its own here).
browser: $(CHROMIUM)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

# Debian's nginx, the load balancer in front of the replicas in tests/service/test_rolling_replacement.py.
NGINX := /usr/sbin/nginx
nginx: $(NGINX)

$(NGINX):
	$(SUDO) apt-get update -qq
	$(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx

# The picture of the web page in the README and docs/serving/web-page.md: taken by the browser tests
# (test-artifacts/ui/readme.png), copied to docs/ui.png.
ui-screenshot: setup browser
	$(BIN)/python -m pytest -q tests/service/routes/test_web_page.py -k several
	mkdir -p docs
	cp test-artifacts/ui/readme.png docs/ui.png

serve: setup
	$(BIN)/python -m service

# The venv's tools (hadolint) on PATH, as an activated venv would have them.
test: setup data browser nginx
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

export: setup
	$(BIN)/python -m export --checkpoint demo/model/vitae_fmnist.safetensors --out artifacts

# Two 1-thread processes (global batch 2 x 64 = 128) train faster on two CPU cores than one 2-thread process.
TRAIN2 := OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node 2 -m model.train

# The shipped demo model, trained on a 2-core CPU machine in one run (docs/training/demo-model.md): 92 epochs from
# scratch at a constant peak rate, cosine-decayed over the last 12, with an EMA of the weights; best.* is chosen on
# the last 5,000 training images, which it never trains on. The test set is not loaded; it is measured once, at the end.
train-demo: setup data
	$(TRAIN2) --variant vitae_fmnist --data fashion-mnist --holdout 5000 --epochs 92 --cooldown-epochs 12 \
		--drop-path 0.05 --ema-decay 0.9995 --batch-size 64 --threads 1 --out runs/vitae_fmnist --seed 11
	mkdir -p demo/model
	cp runs/vitae_fmnist/best.safetensors demo/model/vitae_fmnist.safetensors
	cp runs/vitae_fmnist/best.json demo/model/vitae_fmnist.json
	cp runs/vitae_fmnist/log.jsonl demo/model/train_log.jsonl

evaluate-demo: setup data
	$(BIN)/python -m model.evaluate --checkpoint demo/model/vitae_fmnist.safetensors --data fashion-mnist

bench: bench-export bench-service bench-accuracy

# The docs site (mkdocs.yml) into site/; offline. The tests build it with --strict too (tests/test_docs.py).
docs: setup
	$(BIN)/mkdocs build --strict --site-dir site

bench-export: setup
	$(BIN)/python benchmarks/bench_export.py

# LitServe (the `bench` extra) is one of the baselines the service is measured against.
bench-service: setup
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python benchmarks/bench_service.py

bench-accuracy: setup data
	$(BIN)/python benchmarks/bench_accuracy.py

# On a GPU machine (NVIDIA driver >= 580, CUDA 13): swap in the CUDA 13 build of torch (PyTorch's cu130 index,
# same version as the CPU pin; the +cu130 label, since ==2.13.0 alone is met by the CPU build) and the `gpu`
# extra, then run the TensorRT/CUDA tests, which skip elsewhere.
# onnxruntime-gpu installs the same module as onnxruntime, so the CPU one goes first, and the extra is installed
# from docker/requirements.py's list (as in the GPU image), which leaves the CPU onnxruntime out.
TORCH_CUDA_INDEX := https://download.pytorch.org/whl/cu130
gpu-setup: setup
	$(BIN)/pip uninstall --quiet -y onnxruntime
	$(BIN)/pip install --quiet --index-url $(TORCH_CUDA_INDEX) 'torch==2.13.0+cu130'
	$(BIN)/python docker/requirements.py --extra gpu > $(VENV)/requirements-gpu.txt
	$(BIN)/pip install --quiet -r $(VENV)/requirements-gpu.txt

test-gpu: gpu-setup
	$(BIN)/python -m pytest -q -rs -m gpu

# On a connected machine: the cp312 manylinux wheels of what the service needs beyond what the offline GPU machine's
# image already has (it has torch, torchvision, numpy, pillow, onnx, onnxruntime, safetensors, anyio, click, h11,
# idna, pyyaml, uvloop, typing-extensions, prometheus-client, httpx), for benchmarks/gpu_check.sh to install
# there without a network. 16 wheels, 5.2 MB (measured); .whl/ is ignored by git and travels with the working tree.
WHEEL_TARGET := --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
GPU_IMAGE_HAS := anyio click h11 idna pyyaml uvloop typing_extensions
wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download --quiet -d .whl $(WHEEL_TARGET) fastapi 'pydantic-settings>=2.4' \
		'uvicorn[standard]>=0.30' 'python-multipart>=0.0.9' 'fastapi-offline>=1.7'
	for name in $(GPU_IMAGE_HAS); do rm -f .whl/$$name-*.whl; done
	du -sh .whl
