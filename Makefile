# The two commands of the README: `make demo` and `make test`. Both install what they
# need first (scripts/setup.sh is idempotent and skips apt when nothing is missing).

CARGO ?= cargo

.PHONY: all setup build demo test lint clean

all: build

setup:
	@./scripts/setup.sh

build: setup
	$(CARGO) build --workspace --bins --locked

## A simulated camera, the relay and the agent; ffprobe pulls video through the tunnel.
demo: build
	$(CARGO) run --quiet --locked -p e2e --bin demo

## Every test: unit, byte-exact echo, real RTSP end to end, reconnects, bad input.
## The e2e tests start the real binaries, so they are built first.
test: build
	$(CARGO) test --workspace --locked

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

clean:
	$(CARGO) clean
