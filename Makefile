# lifeboat: `make demo` and `make test` work on a fresh Debian machine; both install
# what is missing first (Debian packages through scripts/deps.sh, Go modules through
# the module proxy).
GO       ?= go
BIN      := bin/lifeboat
# The longest packages first (go test starts them in this order, two at a
# time on a 2-core machine), so that no long one starts last and runs alone.
PKGS     := ./cmd/lifeboat ./virt ./protect ./failover ./bench ./...
# Packages whose concurrency gets the race detector in the suite, longest first.
RACE_PKGS := ./protect/... ./recovery/... ./failback/... ./virt/... ./nbd/... ./qga/... ./wire/... ./disksink/... ./daemon/...

.PHONY: all deps build demo test test-race check bench bench-metadata soak fuzz proto clean guest

all: build

deps:
	@bash scripts/deps.sh

build:
	$(GO) build -o $(BIN) ./cmd/lifeboat

demo: deps build
	./$(BIN) demo

check:
	@bash scripts/ci-checks.sh

# The whole suite: real QEMU, real NBD, real QMP. Under CI=true a missing tool fails.
# The guest freeze tests run once, in the -race -short pass, which runs them
# although they boot guests (testenv.Race).
FREEZE_TESTS := ^(TestLateFreeze|TestQuiesceFailureFallsBackAndThaws|TestLibvirtLateFreeze)$$
test: deps check
	$(GO) test -count=1 -timeout 20m -skip '$(FREEZE_TESTS)' $(PKGS)
	$(GO) test -count=1 -race -short -timeout 20m $(RACE_PKGS)

test-race: deps
	$(GO) test -count=1 -race -timeout 30m $(PKGS)

# Benchmarks against the named peers (nbdcopy, qemu-img convert, rsync), side by side.
bench: deps build
	$(GO) run ./bench $(BENCH_ARGS)

# The metadata bound: a 16 TiB sparse disk, its initial sync, a 4 TiB discard and a
# retention merge, with each site's peak RSS (a few minutes).
bench-metadata: deps
	$(GO) run ./bench -only metadata $(BENCH_ARGS)

# Long fault and soak campaigns (a short version of each runs in `make test`).
soak: deps
	LIFEBOAT_LONG=1 $(GO) test -count=1 -timeout 60m -run 'Fault|Soak|Kill|TestLibvirtFailbackCommands' ./...

# Every fuzz target for FUZZTIME each (go test -fuzz takes one target at a
# time). Their seeds run in `make test` too.
FUZZTIME ?= 30s
FUZZ = $(GO) test -run '^$$' -fuzztime $(FUZZTIME) -fuzz
fuzz:
	$(FUZZ) '^FuzzReplies$$' ./nbd
	$(FUZZ) '^FuzzHandshake$$' ./nbd
	$(FUZZ) '^FuzzReplicate$$' ./wire
	$(FUZZ) '^FuzzSiteReplies$$' ./wire
	$(FUZZ) '^FuzzDecodeBlocksFrame$$' ./wire
	$(FUZZ) '^FuzzQMP$$' ./qemu
	$(FUZZ) '^FuzzReadReply$$' ./qga
	$(FUZZ) '^FuzzConfig$$' ./daemon
	$(FUZZ) '^FuzzCatalogRecords$$' ./recovery
	$(FUZZ) '^FuzzRecordEntries$$' ./recovery

proto:
	protoc --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative wire/wirepb/wire.proto

guest: deps
	bash test/guest/build.sh out/guest

clean:
	rm -rf bin out
