# sealvm: `make run` boots an owner-protected VM end to end; `make test` runs the suite.
# Both install what they need first (Debian packages, a venv, the C test guests).
SHELL      := /bin/bash
# Debian's interpreter: world-readable, so per-VM core processes (each under
# its own unprivileged uid) can run it too.
PYTHON     ?= /usr/bin/python3
VENV       := .venv
PY         := $(VENV)/bin/python
STAMPS     := .stamps
APT_PKGS   := python3 python3-venv python3-dev gcc make binutils libc6-dev linux-libc-dev \
              qemu-system-x86 hyperfine strace swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config \
              debootstrap busybox-static cpio kmod e2fsprogs lz4 zstd iproute2 iputils-ping tcpdump iperf3 \
              etcd-server etcd-client
PYTEST_ARGS ?=

.PHONY: all deps venv guests run test test-fast test-linux bench tcb security fuzz clean distclean

all: deps venv guests

$(STAMPS):
	@mkdir -p $(STAMPS)

$(STAMPS)/apt: scripts/ensure-apt.sh Makefile | $(STAMPS)
	scripts/ensure-apt.sh $(APT_PKGS)
	@touch $@

$(STAMPS)/venv: pyproject.toml $(STAMPS)/apt | $(STAMPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing Python packages into $(VENV) (log: $(STAMPS)/pip.log)"
	@( $(PY) -m pip install --disable-pip-version-check --upgrade pip && \
	   $(PY) -m pip install --disable-pip-version-check -e '.[dev,tpm,fleet]' ) > $(STAMPS)/pip.log 2>&1 \
	   || { tail -40 $(STAMPS)/pip.log; exit 1; }
	@touch $@

# Bytecode for the core, checked against its source hash on every import (so a
# stale or swapped .pyc is never run); the core itself never writes any (-B).
$(STAMPS)/pyc: $(STAMPS)/venv $(shell find sealvm -name '*.py')
	$(PY) -m compileall -q --invalidation-mode checked-hash sealvm
	@touch $@

deps: $(STAMPS)/apt
venv: $(STAMPS)/venv $(STAMPS)/pyc

guests: $(STAMPS)/apt
	$(MAKE) -s -C guests

run: deps venv guests
	scripts/demo.sh

test: deps venv guests
	$(PY) -m pytest -q $(PYTEST_ARGS)

# sealvm booting the Debian cloud kernel inside an outer QEMU-TCG VM with kvm_amd
# (the outer image is built once from Debian packages and cached in /var/cache/sealvm).
test-linux: deps venv
	$(PY) -m pytest -q tests/linux

bench: deps venv guests
	$(PY) -m bench.run_all

tcb: deps venv guests
	$(PY) -m sealvm.tools.tcb --check --json bench/results/tcb.json

# Every attack test (tests/security and the fleet's attacks) against running systems; the
# table of what was tried and what happened goes to docs/security.md (and .json).
security: deps venv guests
	SEALVM_SECURITY_REPORT=docs/security.md $(PY) -m pytest -q tests/security tests/fleet

# Coverage-guided fuzzing (atheris/libFuzzer, from the dev extra) of every parser that
# reads untrusted bytes: each target runs FUZZ_SECONDS, then the results (execs/s,
# edges, line coverage, crashes) go to bench/results/fuzz.json and fuzz.png.
# FUZZ_TARGETS narrows it (python -m fuzz.runner --list); docs/fuzzing.md.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?=
fuzz: venv
	$(PY) -m fuzz.runner --seconds $(FUZZ_SECONDS) --json bench/results/fuzz.json $(FUZZ_TARGETS)

clean:
	$(MAKE) -s -C guests clean
	rm -rf .pytest_cache .hypothesis

distclean: clean
	rm -rf $(VENV) $(STAMPS)
