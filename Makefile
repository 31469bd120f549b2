# ambient-cni — see README.md.
#   make demo   build, start the daemon in throw-away namespaces, show traffic being captured
#   make test   unit tests + root-only integration tests (namespaces only, never the root netns)
SHELL := /bin/bash
CARGO ?= cargo
DEB_PACKAGES := iptables ipset iproute2 containernetworking-plugins golang-go golang-github-appc-cni-dev procps kmod podman runc conmon busybox-static nftables
RELEASE_BINS := target/release/ambient-cni target/release/ambient-cnid target/release/acni-probe
CNITOOL := target/cnitool/cnitool

.PHONY: all deps build cnitool test test-unit test-root demo lint fmt bench chaos clean

all: build

# Install the Debian packages the tests and the demo need, only when one is missing.
deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; \
	fi

build:
	$(CARGO) build --release --locked --bins

cnitool: deps
	tests/cnitool/build.sh $(CNITOOL)

test: deps build cnitool
	AMBIENT_CNI_BIN_DIR=$(CURDIR)/target/release CNITOOL=$(CURDIR)/$(CNITOOL) \
	  $(CARGO) test --profile ci --locked --workspace

demo: deps build cnitool
	AMBIENT_CNI_BIN_DIR=$(CURDIR)/target/release CNITOOL=$(CURDIR)/$(CNITOOL) tests/demo.sh

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean

# Benchmarks (root; namespaces of its own only, state dir on tmpfs): plugin ADD/DEL latency at 10 to
# 10,000 pods next to a static-binary floor and a shell-plugin baseline from the same run,
# throughput, reconcile and daemon memory. Prints one table and writes it, with the machine, to
# bench/RESULTS.md. A few minutes at most; BENCH_ARGS=--quick for a 1,000-pod run.
BENCH_ARGS ?=
bench: deps build
	@mkdir -p bench
	AMBIENT_CNI_BIN_DIR=$(CURDIR)/target/release target/release/acni-bench --results bench/RESULTS.md $(BENCH_ARGS)

# Chaos (root; namespaces only): CHAOS_OPS ADD/DEL with IP reuse through the real plugin while the
# daemon is killed -9 at random points and an outside agent flushes the ipset and our mangle chain;
# prints `leaked=N missing=N repaired=N` and fails unless both counts are 0. `make test` runs 300
# operations of the same test. ACNI_CHAOS_SEED=<seed> replays a run's choices.
CHAOS_OPS ?= 2000
chaos: deps build cnitool
	ACNI_CHAOS_OPS=$(CHAOS_OPS) AMBIENT_CNI_BIN_DIR=$(CURDIR)/target/release CNITOOL=$(CURDIR)/$(CNITOOL) \
	  $(CARGO) test --profile ci --locked -p ambient-cni-tests --test chaos -- --nocapture

# Hostile input to the plugin, in process: FUZZ_CASES random/mutated env, stdin and CNI_ARGS
# against absent, hung-up and garbage-answering daemons; prints the count, the time and the
# outcome histogram. `make test` runs 10,000 cases. ACNI_FUZZ_SEED=<seed> replays a run.
FUZZ_CASES ?= 1000000
.PHONY: fuzz
fuzz:
	ACNI_FUZZ_CASES=$(FUZZ_CASES) $(CARGO) test --profile ci --locked -p ambient-cni --test hostile_input -- \
	  --ignored --nocapture hostile_input_million
