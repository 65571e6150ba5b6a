# One-command set-up on a fresh machine: each target installs what it needs first.
#   make test        install, build the extension in place, run the test suite (+ benchmark smoke)
#   make bench       install, build, benchmark ConvNeXt-T: convnext_fast vs timm eager vs torch.compile
#   make wheel       a wheel in dist/ holding convnext_fast._C for the torch installed here (AVX2 CPU
#                    kernels, so it runs on other x86-64 machines; CONVNEXT_FAST_CPU_ISA=avx512 for AVX-512)
#   make gpu-check   on a GPU machine (no network), at most 9 minutes: build in place, the GPU checks,
#                    sanitizer, ceilings, op and model tables; log + record to $$OUT (when set) and
#                    benchmarks/results/. GPU_CHECK_DRY=1: the same steps on this CPU at tiny shapes
# Each set-up step prints one line and keeps pip's and the compiler's output in build/logs/<step>.log;
# a failing step prints the part of its log that says why, and the log's path. V=1 shows everything.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU-only torch 2.13 on this machine kind breaks timm's torchvision import: pin the pair.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
DEPS := timm safetensors rich ninja pytest pytest-benchmark hypothesis matplotlib
# the CPU engines the benchmarks race against (the [compare] extra), so their tests run here too
COMPARE_DEPS := openvino onnxruntime onnx onnxscript
export MAX_JOBS ?= 2
# pip's root warning asks for a virtual environment, which `make` in the current Python cannot use.
export PIP_ROOT_USER_ACTION ?= ignore
BENCH_ARGS ?=
V ?= 0
LOGS := build/logs

.PHONY: install deps build test bench wheel gpu-check clean

# $(call step,LOG,WHAT,COMMAND[,HINT[,FILTER]]): one line naming WHAT, COMMAND's output into
# $(LOGS)/LOG (FILTER picks lines of it to show too); on failure, why (the compiler's errors,
# else the log's end without the "Location ... is ignored" lines that this machine's pip mirrors add
# for every package they lack), HINT, the log's path, and stop.
step = mkdir -p $(LOGS); echo "==> $(2) (log: $(LOGS)/$(1))"; t0=$$SECONDS; \
	if ! { $(3); } 2>&1 | tee $(LOGS)/$(1) | $(if $(filter 1,$(V)),cat,$(or $(5),cat >/dev/null)); then \
	  echo "FAILED after $(took): $(2)"; \
	  if grep -q '^ *FAILED: ' $(LOGS)/$(1); then sed -n '/^ *FAILED: /,$$p' $(LOGS)/$(1) | grep -m 15 -E 'FAILED: |: (fatal )?error'; \
	  else grep -v "^WARNING: Location '.*' is ignored" $(LOGS)/$(1) | tail -n 30; fi; \
	  echo "full log: $(LOGS)/$(1)$(if $(4),; $(4))"; exit 1; fi
# The time since the step's start, as 1m05s.
took = $$(printf '%dm%02ds' $$(((SECONDS - t0) / 60)) $$(((SECONDS - t0) % 60)))
# What pip installed, or that nothing was missing.
pip_summary = n=$$(grep -ho '^Successfully installed.*' $(LOGS)/$(1) | wc -w); \
	if [ "$$n" -gt 2 ]; then echo "    installed $$((n - 2)) packages ($(took))"; else echo "    all present ($(took))"; fi
# setup.py's line saying what the extension holds.
built = echo "    $$(sed -n 's/^ *\(convnext_fast\._C: .*\)/\1/p' $(LOGS)/$(1) | tail -n 1) ($(took))"
# ninja's progress ([k/n] and a command line per source file) as [k/n] and the file.
progress = sed -un 's\#^ *\[\([0-9]*/[0-9]*\)\] .* -c \([^ ]*\) .*\#    [\1] \2\#p' | sed -u 's\#$(CURDIR)/\#\#'
BUILD_HINT := with no CUDA toolkit or a failing nvcc, CONVNEXT_FAST_SKIP_CUDA_BUILD=1 builds the CPU kernels only; README: Troubleshooting

deps:
	@$(call step,deps.log,installing $(TORCH_PIN) $(DEPS) $(COMPARE_DEPS),$(PIP) install $(TORCH_PIN) $(DEPS) $(COMPARE_DEPS)); \
	  $(call pip_summary,deps.log)

build:
	@$(call step,build.log,building the extension convnext_fast._C in place (minutes; MAX_JOBS=$(MAX_JOBS)),\
	  $(PIP) install -v -e . --no-build-isolation --no-deps,$(BUILD_HINT),$(progress)); $(call built,build.log)

# The in-place build is current when its record (written after a successful build) is newer than
# every source, names the torch installed now, and this checkout is the convnext_fast that Python
# imports from elsewhere: then `make test` and `make bench` skip the minutes of recompiling
# (pip's editable builds start from an empty build folder each time). `make build` always builds.
current = [ -f convnext_fast/_build_info.py ] && ls convnext_fast/_C*.so >/dev/null 2>&1 \
	&& [ -z "$$(find csrc setup.py pyproject.toml -newer convnext_fast/_build_info.py -print -quit)" ] \
	&& (cd / && $(PYTHON) -c "import sys, torch, importlib.util as u; ns = {}; \
	  exec(open('$(CURDIR)/convnext_fast/_build_info.py').read(), ns); \
	  spec = u.find_spec('convnext_fast'); \
	  sys.exit(ns['BUILD']['torch'] != torch.__version__ or spec is None \
	           or not spec.origin.startswith('$(CURDIR)/'))" 2>/dev/null)

install: deps
	@if $(current); then echo "==> the extension convnext_fast._C is up to date ($$(grep -o "'torch': '[^']*'" \
	  convnext_fast/_build_info.py | tr -d "'"); \`make build\` rebuilds it)"; else $(MAKE) --no-print-directory build; fi

test: install
	@echo "==> $(PYTHON) -m pytest tests benchmarks -q (log: $(LOGS)/test.log)"
	@mkdir -p $(LOGS); $(PYTHON) -m pytest tests benchmarks -q 2>&1 | tee $(LOGS)/test.log

bench: install
	@echo "==> $(PYTHON) -m convnext_fast bench $(BENCH_ARGS)"
	@$(PYTHON) -m convnext_fast bench $(BENCH_ARGS)

wheel: deps
	@$(call step,wheel-deps.log,installing build,$(PIP) install build); $(call pip_summary,wheel-deps.log)
	@$(call step,wheel.log,building a wheel into dist/ (minutes: it compiles the extension),\
	  CONVNEXT_FAST_CPU_ISA=$${CONVNEXT_FAST_CPU_ISA:-avx2} $(PYTHON) -m build --wheel --no-isolation --outdir dist .,$(BUILD_HINT),$(progress)); \
	  $(call built,wheel.log); echo "    $$(ls -t dist/*.whl | head -n 1)"

gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(if $(GPU_CHECK_DRY),--dry-run)

clean:
	rm -rf build dist *.egg-info convnext_fast/_C*.so convnext_fast/_build_info.py .benchmarks
