# Function dataplane: build, test, demo.
#
#   make demo         run npm + lb-agent with the example functions on this machine
#   make test         everything CI runs: lint, unit, service and system tests
#   make test-system  system tests only (real binaries on loopback)
#   make images       container images (see docker/)

CARGO       ?= cargo
PYTHON      ?= python3
# Where the Python FDK used by the "unmodified Python function" test is installed. It must
# be readable by the unprivileged user functions run as, so not under /root.
FN_TEST_PYTHONPATH ?= /opt/fn-test-python
export FN_TEST_PYTHONPATH

.PHONY: all build lint fmt test test-unit test-system test-deps demo certs images clean

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

test-unit:
	$(CARGO) test --workspace --lib

test-system: test-deps
	$(CARGO) build --workspace --bins
	$(CARGO) test -p fn-system-tests --no-fail-fast

certs:
	$(CARGO) run --quiet -p fn-certs -- --out deploy/certs --keep

demo: build
	bash deploy/demo.sh

images:
	@echo "make images arrives with the Deployment work (docker/); not built yet"
	@exit 1

clean:
	$(CARGO) clean
