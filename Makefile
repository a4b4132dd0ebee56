# The two commands a new user types: `make demo` and `make test`.
# Both set up what they need on first use (.venv with the pinned torch wheel
# that provides libtorch, the reference packages, test fixtures) and do no
# downloads once set up.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REQS := requirements-torch.txt tests/reference/requirements.txt tests/reference/constraints.txt \
	tests/captions/requirements.txt
FIXTURES := target/fixtures
NEXTEST := $(shell cargo nextest --version >/dev/null 2>&1 && echo yes)

.PHONY: all venv build release fixtures chromium test lint check-deps demo clean-fixtures gpu-bundle bench-vs-reference

all: build

venv: $(STAMP)

# The stamp depends on the pinned lists: editing a pin reinstalls.
$(STAMP): $(REQS)
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check \
		-r requirements-torch.txt -r tests/reference/requirements.txt \
		-r tests/captions/requirements.txt -c tests/reference/constraints.txt
	$(VPY) -m pip install -q --disable-pip-version-check --no-deps open-clip-torch==3.3.0
	ln -sfn "$$($(VPY) -c 'import os, torch; print(os.path.dirname(torch.__file__))')" $(VENV)/libtorch
	@touch $@

build: $(STAMP)
	cargo build --workspace --all-targets

release: $(STAMP)
	cargo build --release --bin swiftbrush

# Reference pipelines and golden tensors, rebuilt only when the scripts or the
# pinned packages change (the folder name is their content hash).
fixtures: $(STAMP)
	@$(VPY) tests/reference/build_all.py --root $(FIXTURES)

# Headless Chromium for the status page's browser test (tests/status_page.rs),
# unpacked from Debian's packages into target/chromium without root; where
# that cannot work the script records why in target/chromium/UNAVAILABLE and
# `make test` leaves that one test out, printing the reason (never a pass).
chromium:
	@scripts/fetch-chromium target/chromium

check-deps:
	@if cargo tree -p swiftbrush-coordinator -e normal,build | grep -E '\b(tch|torch-sys)\b'; then \
		echo "error: swiftbrush-coordinator must not depend on libtorch"; exit 1; \
	else echo "ok: swiftbrush-coordinator has no libtorch dependency"; fi
	@if cargo tree -p swiftbrush-worker -e normal,build | grep -E '\bswiftbrush-coordinator\b'; then \
		echo "error: swiftbrush-worker must not depend on swiftbrush-coordinator"; exit 1; \
	else echo "ok: swiftbrush-worker does not depend on the coordinator"; fi
	@if cargo tree -p swiftbrush -e normal,build,features -i swiftbrush-worker | grep -F 'fault-injection'; then \
		echo "error: a user's swiftbrush binary would have fault injection (SWIFTBRUSH_FAULT_CHECKPOINT)"; exit 1; \
	else echo "ok: the swiftbrush binary has no fault injection"; fi

lint: $(STAMP)
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# Read when the recipe runs, after the chromium step: $(wildcard) would be
# read before it.
NO_BROWSER := target/chromium/UNAVAILABLE
test: $(STAMP) fixtures chromium check-deps lint
	@if [ -f $(NO_BROWSER) ]; then echo "NOT RUN: tests/status_page.rs (no Chromium: $$(cat $(NO_BROWSER)))"; fi
ifeq ($(NEXTEST),yes)
	cargo nextest run --workspace --no-fail-fast $$([ -f $(NO_BROWSER) ] && echo "-E !binary(status_page)")
else
	cargo test --workspace --no-fail-fast $$([ -f $(NO_BROWSER) ] && echo "-- --skip the_status_page_")
endif

# The toy world end to end on the CPU (docs/TOYWORLD.md): the committed toy
# teacher (or, without it, one trained here: about two hours on 2 cores), SwiftBrush
# distillation on the 54 captions through `swiftbrush train`
# (configs/toy.yaml; and a four-step student, configs/toy-few-step.yaml),
# then runs/demo/compare.png and runs/demo/report.md.
TOY_TEACHER := assets/toy-teacher
demo: $(STAMP)
	cargo build --release --bin swiftbrush
	target/release/swiftbrush toy demo --out runs/demo --config configs/toy.yaml \
		--few-step-config configs/toy-few-step.yaml \
		$(if $(wildcard $(TOY_TEACHER)/model_index.json),--teacher $(TOY_TEACHER))

# swiftbrush's training step beside the same step in PyTorch + diffusers +
# peft, alternating, on the toy teacher and an SD-shaped 32x32-latent one
# (README, "Performance against the authors' stack").
SD_SMALL := target/bench/sd-small
bench-vs-reference: release
	@test -f $(SD_SMALL)/model_index.json || \
		$(VPY) bench/make_sd21_shaped_teacher.py --scale sd-small --out $(SD_SMALL)
	$(VPY) bench/vs_reference.py --config bench/paper_step_toy.yaml --teacher $(TOY_TEACHER) --rounds 3 --steps 5 --tuned-reference
	$(VPY) bench/vs_reference.py --config bench/paper_step_sd_small.yaml --teacher $(SD_SMALL) --rounds 3 --steps 3 --tuned-reference

# What the GPU check (scripts/gpu-check) needs on a GPU machine that has
# PyTorch 2.11 but no Rust, no diffusers and no network: gpu-bundle/, at most
# 60 MiB (README, "Running on a GPU"; docs/GPU.md).
gpu-bundle: release fixtures
	scripts/make-gpu-bundle gpu-bundle

clean-fixtures:
	rm -rf $(FIXTURES)
