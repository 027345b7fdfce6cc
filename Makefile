# Hopper: the two commands a fresh machine needs are `make run` and `make test`.
CARGO ?= cargo
ARGS ?=

.PHONY: run test build release bench lint fmt clean

## Start the broker with its embedded defaults (127.0.0.1:5680, ./hopper-data).
run:
	$(CARGO) run --release -p hopper-broker --bin hopperd -- $(ARGS)

## Every test: unit tests and the integration tests that start the real binaries.
test:
	$(CARGO) build --workspace --bins --examples
	$(CARGO) test --workspace

build:
	$(CARGO) build --workspace --bins --examples

release:
	$(CARGO) build --release --workspace --bins

## The headline benchmark against a broker started on a free port (see docs/benchmarks.md).
bench: release
	./scripts/bench.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
