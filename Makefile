# infmoe: build, test, run, bench, data, deps. `make help` lists the targets.
CC      := gcc
PKGS    := hdf5-openmpi yaml-0.1 ompi-c zlib libpcre2-8 jansson
CFLAGS  ?= -O3 -march=native
CFLAGS  += -std=c11 -ffp-contract=off -fno-math-errno -fopenmp -Wall -Wextra -Wno-unused-parameter -Iinclude \
           $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
LDLIBS  := -ldnnl $(shell pkg-config --libs $(PKGS) 2>/dev/null) -lm
MPIRUN  := mpirun $(if $(filter 0,$(shell id -u)),--allow-run-as-root) --oversubscribe

LIB_SRC := $(filter-out src/main.c,$(wildcard src/*.c))
LIB_OBJ := $(LIB_SRC:src/%.c=build/obj/%.o)
HEADERS := $(wildcard include/infmoe/*.h)
TESTS   := $(patsubst tests/%.c,build/tests/%,$(wildcard tests/test_*.c))
TOOLS   := $(patsubst tests/%.c,build/tests/%,$(wildcard tests/tool_*.c))
MPI_TESTS := $(patsubst tests/%.c,build/tests/%,$(wildcard tests/mpi_*.c))
BENCHES := $(patsubst bench/%.c,build/bench/%,$(wildcard bench/*.c))

.PHONY: all deps data run test bench clean help
all: build/infmoe $(TESTS) $(MPI_TESTS) $(TOOLS) $(BENCHES)

help:
	@echo "make run    install dependencies, build, prepare the demo corpus, train a demo model on 2 ranks"
	@echo "make test   build and run every test (prints 'N passed, N failed')"
	@echo "make bench  build and run the benchmarks (prints figures; not tests)"
	@echo "make data   build the demo corpus in data/demo from Debian's fortunes text (and its mc.bin)"
	@echo "make deps   install the Debian packages infmoe needs (scripts/install-deps.sh)"
	@echo "make all    build build/infmoe, the tests and the benchmarks"

deps:
	@bash scripts/install-deps.sh

build/obj/%.o: src/%.c $(HEADERS) | build/obj
	$(CC) $(CFLAGS) -c $< -o $@

# ops.c's 16-float vectors are static inline helpers, so no call passes one; without
# AVX-512, gcc still notes that their calling convention changed in GCC 4.6
build/obj/ops.o: CFLAGS += -Wno-psabi

build/libinfmoe.a: $(LIB_OBJ)
	ar rcs $@ $^

build/infmoe: src/main.c build/libinfmoe.a
	$(CC) $(CFLAGS) $< build/libinfmoe.a $(LDLIBS) -o $@

build/tests/%: tests/%.c $(wildcard tests/*.h) build/libinfmoe.a | build/tests
	$(CC) $(CFLAGS) -Itests $< build/libinfmoe.a $(LDLIBS) -o $@

build/bench/%: bench/%.c build/libinfmoe.a | build/bench
	$(CC) $(CFLAGS) $< build/libinfmoe.a $(LDLIBS) -o $@

build/obj build/tests build/bench:
	mkdir -p $@

DEMO_TEXT := $(filter-out %.dat %.u8,$(wildcard /usr/share/games/fortunes/*))
data: data/demo/train.bin data/demo/mc.bin

data/demo/train.bin: build/infmoe
	@if [ -z "$(DEMO_TEXT)" ]; then echo "make data: no text in /usr/share/games/fortunes (run 'make deps')"; exit 1; fi
	@echo "prep: demo corpus from $(words $(DEMO_TEXT)) fortunes files"
	@build/infmoe prep --text $(DEMO_TEXT) --out data/demo

# multiple-choice items from the part of the text that became val.bin (eval --mc)
data/demo/mc.bin: data/demo/train.bin
	@build/infmoe prep --mc-from $(DEMO_TEXT) --out data/demo/mc.bin

run:
	@bash scripts/install-deps.sh
	$(MAKE) all data
	OMP_NUM_THREADS=1 $(MPIRUN) -np 2 build/infmoe train configs/tiny-topk.yaml
	build/infmoe stats checkpoints/tiny-topk/stats.h5
	/usr/bin/python3 tools/plot_train.py checkpoints/tiny-topk/train.log -o checkpoints/tiny-topk/train.png

test: all data
	@bash tests/run.sh

bench: all
	@bash bench/run.sh

clean:
	rm -rf build
