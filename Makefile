# Hopper: the two commands a fresh machine needs are `make run` and `make test`.
CARGO ?= cargo
ARGS ?=
# Seconds each fuzz target runs under `make fuzz`.
FUZZ_SECONDS ?= 180

.PHONY: run test build release bench fuzz lint fmt clean

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

## Every fuzz target (fuzz/) for FUZZ_SECONDS each under libFuzzer; needs nightly, not part of
## `make test` (see docs/operations.md). Crashes land in fuzz/artifacts/<target>/.
fuzz:
	@rustup run nightly rustc --version >/dev/null 2>&1 || \
		{ echo "make fuzz needs the nightly toolchain: rustup toolchain install nightly"; exit 1; }
	@$(CARGO) fuzz --version >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	@for target in $$($(CARGO) +nightly fuzz list); do \
		mkdir -p fuzz/corpus/$$target; \
		seeds=$$(test -d fuzz/seeds/$$target && echo fuzz/seeds/$$target); \
		echo "== fuzzing $$target for $(FUZZ_SECONDS) s"; \
		$(CARGO) +nightly fuzz run $$target fuzz/corpus/$$target $$seeds -- \
			-max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
