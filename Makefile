# One-command set-up on a fresh machine: each target installs what it needs first.
#   make test        install, build the extension in place, run the test suite (+ benchmark smoke)
#   make bench       install, build, benchmark ConvNeXt-T: convnext_fast vs timm eager vs torch.compile
#   make gpu-check   on a GPU machine (no network), at most 9 minutes: build in place, the GPU checks,
#                    sanitizer, ceilings, op and model tables; log + record to $$OUT (when set) and
#                    benchmarks/results/. GPU_CHECK_DRY=1: the same steps on this CPU at tiny shapes
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU-only torch 2.13 on this machine kind breaks timm's torchvision import: pin the pair.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
DEPS := timm safetensors rich ninja pytest pytest-benchmark hypothesis matplotlib
export MAX_JOBS ?= 2
BENCH_ARGS ?=

.PHONY: install deps build test bench gpu-check clean

deps:
	$(PIP) install -q $(TORCH_PIN) $(DEPS)

build:
	$(PIP) install -q -e . --no-build-isolation --no-deps

install: deps build

test: install
	$(PYTHON) -m pytest tests benchmarks -q

bench: install
	$(PYTHON) -m convnext_fast bench $(BENCH_ARGS)

gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(if $(GPU_CHECK_DRY),--dry-run)

clean:
	rm -rf build *.egg-info convnext_fast/_C*.so .benchmarks
