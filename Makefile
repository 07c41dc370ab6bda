# The two commands of the README: `make demo` and `make test`. Both install what they
# need first (scripts/setup.sh is idempotent and skips apt when nothing is missing).

CARGO ?= cargo

.PHONY: all setup build demo test bench soak lint fuzz firmware clean

all: build

setup:
	@./scripts/setup.sh

build: setup
	$(CARGO) build --workspace --bins --locked

## A simulated camera, the relay and the agent; ffprobe pulls video through the tunnel.
demo: build
	$(CARGO) run --quiet --locked -p e2e --bin demo

## Every test: unit, byte-exact echo, real RTSP end to end, reconnects, bad input, and
## the camera package on an emulated ARM camera. The e2e tests start the real binaries
## and the package, so they are built first; the update tests also take the camera a
## build of the next version.
NEXT_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1 | awk -F. '{ printf "%s.%s.%d", $$1, $$2, $$3 + 1 }')
test: build
	@CAMERA=dahua-2449s-il ./scripts/firmware.sh
	@CAMERA=dahua-2449s-il VERSION=$(NEXT_VERSION) ./scripts/firmware.sh
	@CAMERA=generic-aarch64 ./scripts/firmware.sh
	$(CARGO) test --workspace --locked

## Our tunnel against direct TCP, rathole, bore and rusnel, in one run (release
## builds; peers installed once into ~/.cache/camera-relay-bench). Short by default;
## BENCH_ARGS="--long" for the long run, "--paths direct,ours" for a subset.
bench: setup
	$(CARGO) build --release --locked -p relay -p agent -p certs -p bench
	./target/release/bench run --out bench/results $(BENCH_ARGS)

## The soak: four cameras' Watcher sessions through the NAT lab's impaired camera link
## (25 ms each way, 1 % loss, NAT rebound every minute) for SOAK_MINUTES (default 10);
## fails on any byte lost, a reconnect, or leaked memory, descriptors or CLOSE_WAIT
## sockets. Report in bench/results/soak.md (docs/reliability.md). `make test` runs a
## one-minute version.
SOAK_MINUTES ?= 10
soak: setup
	$(CARGO) build --release --locked -p relay -p agent -p e2e -p bench
	./target/release/bench soak --minutes $(SOAK_MINUTES) --out bench/results

## Fuzz the control-message and stream-header decoders, FUZZ_SECONDS each, growing the
## corpus in fuzz/corpus (which `make test` replays). cargo-fuzz needs nightly-only
## flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them, since no nightly can
## be fetched on the build machines.
FUZZ_SECONDS ?= 60
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	@for target in control stream_header; do \
	  echo "fuzzing $$target for $(FUZZ_SECONDS) s"; \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$target fuzz/corpus/$$target -- \
	    -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 || exit 1; \
	done

## The camera package: make firmware CAMERA=dahua-2449s-il [RELAY_URL=… AGENT_ID=…
## TOKEN=… CA=… AGENT_CERT=… AGENT_KEY=… FALLBACK_DNS=…]; without CAMERA it lists the
## known models.
firmware:
	@CAMERA="$(CAMERA)" RELAY_URL="$(RELAY_URL)" AGENT_ID="$(AGENT_ID)" TOKEN="$(TOKEN)" \
	  CA="$(CA)" AGENT_CERT="$(AGENT_CERT)" AGENT_KEY="$(AGENT_KEY)" \
	  FALLBACK_DNS="$(FALLBACK_DNS)" ./scripts/firmware.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

clean:
	$(CARGO) clean
