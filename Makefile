# Function dataplane: build, test, demo.
#
#   make demo         run npm + lb-agent with the example functions on this machine
#   make test         everything CI runs: lint, unit, service and system tests
#   make test-system  system tests only (real binaries on loopback)
#   make images       container images (see docker/)
#   make test-compose the docker compose deployment end to end (needs a Docker engine)
#   make test-docker-driver  image functions on the runner's docker driver (needs an engine)
#   make test-swarm   deploy/docker-stack.yml on a single-node swarm, end to end (needs an engine)
#   make stack-up STACK=fn / make stack-down STACK=fn   the dataplane as a swarm stack
#   make bench        micro-benchmarks: placers, the runner's pool (cargo bench)
#   make load         dist build (release + thin LTO), then fn-load drives a local cluster (LOAD_ARGS=...)
#   make bench-docker  the docker driver beside the process driver: cold start, hot calls
#   make bench-compare dist build, then the same function called directly, through nginx
#                     and through lb-agent -> pure-runner, side by side with oha (BENCH_ARGS=...)
#   make bench-ab AB_ARGS='--bin-dir BEFORE --bin-dir AFTER'   two builds' lb paths in one run,
#                     rounds alternating next to nginx: before/after a performance change

CARGO       ?= cargo
PYTHON      ?= python3
# Where the Python FDK used by the "unmodified Python function" test is installed. It must
# be readable by the unprivileged user functions run as, so not under /root.
FN_TEST_PYTHONPATH ?= /opt/fn-test-python
export FN_TEST_PYTHONPATH

.PHONY: all build lint fmt test test-unit test-system test-deps demo certs certs-rotate certs-rollover images clean \
        test-compose test-docker-driver test-swarm stack-up stack-down test-docker-if-engine bench-docker bench load bench-compare bench-instructions bench-ab

all: build

build:
	$(CARGO) build --workspace --bins

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# The Python FDK from PyPI, for the test that runs an unmodified Fn Python function.
test-deps:
	@if [ ! -f "$(FN_TEST_PYTHONPATH)/fdk/__init__.py" ]; then \
	  $(PYTHON) -m pip install --quiet --disable-pip-version-check --target "$(FN_TEST_PYTHONPATH)" 'fdk==0.1.128' && \
	  chmod -R a+rX "$(FN_TEST_PYTHONPATH)"; \
	fi

# One build of binaries and test targets, then every test in the workspace (system tests
# find the binaries in target/debug).
test: lint test-deps
	$(CARGO) build --workspace --bins --all-targets
	$(CARGO) test --workspace --no-fail-fast
	@$(MAKE) --no-print-directory test-docker-if-engine

test-unit:
	$(CARGO) test --workspace --lib

test-system: test-deps
	$(CARGO) build --workspace --bins
	$(CARGO) test -p fn-system-tests --no-fail-fast
	@$(MAKE) --no-print-directory test-docker-if-engine

# The tests that need a Docker engine (one `make images` for both), where an engine answers;
# elsewhere say so and skip.
test-docker-if-engine:
	@if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then \
	  $(MAKE) --no-print-directory IMAGE_PROFILE=release test-compose test-docker-driver test-swarm; \
	else \
	  echo "SKIPPED test-compose, test-docker-driver and test-swarm: no Docker engine answers 'docker info' here"; \
	fi

# Performance (not part of `make test`; see README, Performance). `bench` times the
# placers and the runner's pool; `load` runs fn-load against an lb-agent and pure-runners built in release, e.g.
# make load LOAD_ARGS='--payload small --calls 50000'. They measure the build that ships:
# the `dist` profile (release with thin LTO, Cargo.toml); BENCH_PROFILE=release for a
# quicker build.
LOAD_ARGS ?=
BENCH_PROFILE ?= dist

bench:
	$(CARGO) bench -p fn-placement
	$(CARGO) bench -p fn-runner --bench pool

load:
	$(CARGO) build --profile $(BENCH_PROFILE) --workspace --bins
	FN_TEST_BIN_DIR=target/$(BENCH_PROFILE) target/$(BENCH_PROFILE)/fn-load $(LOAD_ARGS)

# The lb-agent path against the same function called directly over its unix socket and
# through nginx (Debian's; installed with apt-get if missing), measured with oha (installed
# with `cargo install oha` if missing), e.g.
# make bench-compare BENCH_ARGS='--duration 5s --concurrency 1,64'; BENCH_ARGS='--help' lists
# the flags. Takes about 3 minutes with the defaults.
BENCH_ARGS ?=

bench-compare:
	$(CARGO) build --profile $(BENCH_PROFILE) --workspace --bins
	$(PYTHON) system-tests/bench_compare.py --bin-dir target/$(BENCH_PROFILE) $(BENCH_ARGS)

# User-space instructions per call of lb-agent, pure-runner and nginx, counted by callgrind
# (valgrind; installed with apt-get if missing): figures that do not move with the machine's
# load, for before/after comparisons. INSTR_ARGS='--bin-dir before --bin-dir after' compares
# two builds in one run; INSTR_ARGS='--help' lists the flags. About a minute per build.
INSTR_ARGS ?=

# The build just made is measured unless INSTR_ARGS names builds of its own.
bench-instructions:
	$(CARGO) build --profile $(BENCH_PROFILE) --workspace --bins
	$(PYTHON) system-tests/bench_instructions.py $(if $(findstring --bin-dir,$(INSTR_ARGS)),,--bin-dir target/$(BENCH_PROFILE)) $(INSTR_ARGS)

# Builds of lb-agent and pure-runner side by side in one run: each build its own stack, their
# rounds alternating (A B, B A, ...) next to an nginx round each, and each build's RPS and CPU
# per call as a ratio to the first build's in the same round, with the spread over the rounds.
# Copy each build's target/dist binaries to a directory of its own and name them, e.g.
# make bench-ab AB_ARGS='--bin-dir /tmp/before --bin-dir /tmp/after'; the same directory
# twice gives this machine's spread for a build against itself. AB_ARGS='--help' lists the
# flags. About 2 minutes with the defaults and two builds.
AB_ARGS ?=

bench-ab:
	$(PYTHON) system-tests/bench_ab.py $(AB_ARGS)

certs:
	$(CARGO) run --quiet -p fn-certs -- --out deploy/certs --keep --san fn-node

# Certificate rotation in the running compose stack (deploy/docker-compose.yml): new files in
# its certs volume, which every daemon picks up within FN_TLS_RELOAD_INTERVAL, no restart.
#   make certs-rotate                a new node certificate from the same CA
#   make certs-rollover STEP=begin   then STEP=switch, then STEP=finish (a CA rollover; let
#                                    every daemon reload between steps: 10s by default)
# COMPOSE_PROJECT names the stack when it was started with -p.
COMPOSE         ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
COMPOSE_PROJECT ?=
COMPOSE_RUN      = $(COMPOSE) $(if $(COMPOSE_PROJECT),-p $(COMPOSE_PROJECT)) -f deploy/docker-compose.yml run --rm certs

certs-rotate:
	$(COMPOSE_RUN) --rotate

certs-rollover:
	@case "$(STEP)" in begin|switch|finish) ;; \
	  *) echo "make certs-rollover: set STEP=begin, then STEP=switch, then STEP=finish" >&2; exit 2;; esac
	$(COMPOSE_RUN) --ca-rollover $(STEP)

demo: build
	bash deploy/demo.sh

# Container images (docker/*.Dockerfile), built from this machine alone: one build (profile
# IMAGE_PROFILE) of the binaries the images hold, statically linked (glibc, crt-static) so
# they run `FROM scratch`; then a build context with them and a small rootfs (docker/rootfs
# + /tmp).
IMAGE_PREFIX   ?= fn-dataplane
IMAGE_TAG      ?= latest
# The images are for this machine's architecture (x86_64 or aarch64; its Rust target must
# be installed).
IMAGE_TARGET   ?= $(shell uname -m)-unknown-linux-gnu
IMAGE_CONTEXT  := target/docker-context
# `dist` (release with thin LTO) is what ships; `make test` builds its images in `release`,
# the same code in half the build time.
IMAGE_PROFILE  ?= dist
IMAGE_BIN_DIR  := target/$(IMAGE_TARGET)/$(IMAGE_PROFILE)
IMAGE_DAEMONS  := lb-agent npm pure-runner fn-isolate fn-certs fn-probe
IMAGE_FUNCTIONS := fn-hello fn-echo fn-sleep fn-crash
IMAGES         := lb-agent npm pure-runner

images:
	@command -v docker >/dev/null || { echo "make images: docker not found (the Docker CLI and a running engine are needed)" >&2; exit 1; }
	RUSTFLAGS='-C target-feature=+crt-static' \
	  $(CARGO) build --profile $(IMAGE_PROFILE) --config 'profile.$(IMAGE_PROFILE).strip="symbols"' --target $(IMAGE_TARGET) $(addprefix -p ,$(IMAGE_DAEMONS) $(IMAGE_FUNCTIONS))
	rm -rf $(IMAGE_CONTEXT)
	mkdir -p $(IMAGE_CONTEXT)/bin $(IMAGE_CONTEXT)/functions $(IMAGE_CONTEXT)/certs-root/certs $(IMAGE_CONTEXT)/issuer-root/issuer
	cp -R docker/rootfs $(IMAGE_CONTEXT)/rootfs
	chmod 0755 $(IMAGE_CONTEXT)/rootfs $(IMAGE_CONTEXT)/rootfs/etc
	chmod 0644 $(IMAGE_CONTEXT)/rootfs/etc/passwd $(IMAGE_CONTEXT)/rootfs/etc/group
	mkdir -m 1777 $(IMAGE_CONTEXT)/rootfs/tmp
	chmod 0750 $(IMAGE_CONTEXT)/certs-root/certs
	chmod 0700 $(IMAGE_CONTEXT)/issuer-root/issuer
	install -m 0755 $(addprefix $(IMAGE_BIN_DIR)/,$(IMAGE_DAEMONS)) $(IMAGE_CONTEXT)/bin/
	install -m 0755 $(addprefix $(IMAGE_BIN_DIR)/,$(IMAGE_FUNCTIONS)) $(IMAGE_CONTEXT)/functions/
	@for image in $(IMAGES); do \
	  echo "docker build $(IMAGE_PREFIX)/$$image:$(IMAGE_TAG)"; \
	  out=$$(docker build -f docker/$$image.Dockerfile -t $(IMAGE_PREFIX)/$$image:$(IMAGE_TAG) $(IMAGE_CONTEXT) 2>&1) \
	    || { echo "$$out" >&2; echo "make images: docker build of $$image failed" >&2; exit 1; }; \
	done
	@# Earlier builds of these images, now untagged, are of no use.
	@docker image prune --force --filter label=fn.dataplane.image >/dev/null
	@docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep '^$(IMAGE_PREFIX)/' | grep ':$(IMAGE_TAG) '

# The compose deployment end to end (deploy/docker-compose.yml): images, stack up, calls
# through the LB, a runner stopped, scaling through the docker control plane, teardown.
test-compose: images
	IMAGE_PREFIX=$(IMAGE_PREFIX) IMAGE_TAG=$(IMAGE_TAG) $(PYTHON) system-tests/compose_test.py

# The runner's docker driver on this machine's engine (system-tests/tests/docker_driver.rs):
# the tests build FROM-scratch function images from the static functions of `make images`,
# fn-hostile (test-only, never in an image) and an unmodified Python FDK function (Debian's
# python3.11 from this machine and the FDK of `make test-deps`), then remove those images.
TEST_IMAGE_LABEL := fn.dataplane.test-image

test-docker-driver: images test-deps
	RUSTFLAGS='-C target-feature=+crt-static' \
	  $(CARGO) build --profile $(IMAGE_PROFILE) --config 'profile.$(IMAGE_PROFILE).strip="symbols"' --target $(IMAGE_TARGET) -p fn-hostile
	@# The same build as `make test`'s (so a no-op there): --bins alone would unify features
	@# differently and rebuild part of the workspace.
	$(CARGO) build --workspace --bins --all-targets
	FN_TEST_STATIC_BIN_DIR=$(CURDIR)/$(IMAGE_BIN_DIR) $(CARGO) test -p fn-system-tests --test docker_driver -- --ignored; \
	  status=$$?; \
	  docker image ls --quiet --filter label=$(TEST_IMAGE_LABEL) | sort -u | xargs -r docker image rm --force >/dev/null; \
	  exit $$status

# The swarm stack (deploy/docker-stack.yml) end to end on a single-node swarm: initialises
# swarm when it is inactive and leaves it as it found it (system-tests/swarm_test.py).
test-swarm: images
	IMAGE_PREFIX=$(IMAGE_PREFIX) IMAGE_TAG=$(IMAGE_TAG) IMAGE_PROFILE=$(IMAGE_PROFILE) $(PYTHON) system-tests/swarm_test.py

# The dataplane as a swarm stack: images, the development certificates as swarm secrets
# (kept when they exist: a secret never changes, so stack-up warns on stderr when a file in
# deploy/certs is no longer what its secret was made from, as after a renewal), then
# `docker stack deploy`. The engine must be a swarm manager (`docker swarm init` once).
# Images must be on every node (README, "Across machines"). STACK_SECRETS names the secrets
# the stack file uses, each with its file in deploy/certs (new names after a rotation).
STACK ?= fn
STACK_SECRETS ?= fn-dataplane-ca.pem:ca.pem fn-dataplane-node.pem:node.pem fn-dataplane-node-key.pem:node-key.pem

stack-up: images
	@[ "$$(docker info --format '{{.Swarm.ControlAvailable}}')" = true ] || \
	  { echo "make stack-up: this engine is not a swarm manager; run 'docker swarm init' first" >&2; exit 1; }
	$(IMAGE_BIN_DIR)/fn-certs --out deploy/certs --keep --san fn-node
	@sh deploy/stack-secrets.sh deploy/certs $(STACK_SECRETS)
	@# One LB per node, two at most unless FN_LB_REPLICAS says otherwise: on a single node a
	@# second replica would stay pending for ever (max_replicas_per_node: 1).
	@# The catalog's config is named after its content: a swarm config cannot change, so an
	@# edited functions.toml is a new config (the same name would fail the deploy).
	cd deploy && FN_IMAGE_PREFIX=$(IMAGE_PREFIX) FN_IMAGE_TAG=$(IMAGE_TAG) \
	  FN_FUNCTIONS_CONFIG=$(STACK)_functions_$$(sha256sum catalog/functions.toml | cut -c1-12) \
	  FN_LB_REPLICAS=$${FN_LB_REPLICAS:-$$(n=$$(docker node ls --format '{{.Status}} {{.Availability}}' | grep -c '^Ready Active'); [ "$$n" -ge 2 ] && echo 2 || echo 1)} \
	  docker stack deploy --resolve-image never -c docker-stack.yml $(STACK)

# Takes the stack down and waits (at most 2 minutes) until no service or container of it,
# nor a runner service of its npm, is left; then removes its network if it is still there.
stack-down:
	-docker stack rm $(STACK)
	@for i in $$(seq 1 60); do \
	  left=$$(docker service ls -q --filter label=com.docker.stack.namespace=$(STACK); \
	          docker service ls -q --filter label=fn.dataplane.npm=$(STACK)_backend; \
	          docker ps -aq --filter label=com.docker.stack.namespace=$(STACK); \
	          docker ps -aq --filter label=fn.dataplane.npm=$(STACK)_backend); \
	  [ -z "$$left" ] && break; sleep 2; \
	done; \
	[ -z "$$left" ] || { echo "make stack-down: still there after 2 minutes: $$left" >&2; exit 1; }
	@for i in $$(seq 1 15); do \
	  nets=$$(docker network ls -q --filter label=com.docker.stack.namespace=$(STACK)); \
	  [ -z "$$nets" ] && break; docker network rm $$nets >/dev/null 2>&1; sleep 1; \
	done
	@echo "stack $(STACK) is down"

# The docker driver beside the process driver (cold start, hot-call overhead), on the static
# binaries of `make images`; not part of `make test`.
BENCH_DOCKER_ARGS ?=

bench-docker: images
	$(PYTHON) system-tests/docker_bench.py --bin-dir $(IMAGE_BIN_DIR) $(BENCH_DOCKER_ARGS)

clean:
	$(CARGO) clean
