# arianna_c: `make` builds the CLI ./run and the shared library libarianna.so,
# `make test` runs the test suite, `make clean` removes what make built.
#
# Flags: -O3, -fPIC and -pthread (src/pool.c's thread pool).  Deliberately no -ffast-math
# (it would break the float32 parity with the NumPy/PyTorch reference) and no -march=native
# (the library must run on any x86-64/aarch64 machine it is copied to): the SIMD kernels in
# src/kernels_*.c are compiled per function for their instruction sets and picked at run time.

# CC: make's default, the system's cc (gcc or clang; SAN_CC must be gcc, whose libasan.so the
# sanitized Python preloads).
PYTHON ?= python3
CFLAGS ?= -O3
CFLAGS += -std=gnu11 -fPIC -Wall -Wextra -fvisibility=hidden
# No fused multiply-adds the source does not ask for: gcc's default would fuse a*b+c in plain C
# where the target has FMA (aarch64 always, x86-64 inside the AVX2/AVX-512 functions), which
# rounds once instead of twice and changes the last bits.  The kernels' intrinsics say where
# they fuse; everything else rounds as written, on every CPU.
CFLAGS += -ffp-contract=off
LDLIBS = -lm

CFLAGS += -pthread
LDFLAGS += -pthread
# The library stays mapped once loaded (dlclose does not unmap it): a state's pool workers wait
# inside library code, and a caller that unloads the library with a live state (Python does at
# exit) must not leave them to wake up in unmapped memory.  Joining them from a destructor
# instead would need a registry of every pool and would hang if a state were still in use.
LIB_LDFLAGS = -Wl,-z,nodelete

SRC = src/errors.c src/file.c src/model.c src/forward.c src/tokenizer.c src/sampler.c src/generation.c src/session.c src/batch.c \
      src/chat.c src/conversation.c src/paths.c \
      src/module.c src/blake2b.c src/kernels.c src/kernels_avx2.c src/kernels_avx512.c src/kernels_amx.c src/pool.c
HDR = src/run.h src/testing.h src/internal.h src/kernels.h src/kernels_x86.h src/kernels_avx512.h src/pool.h src/blake2b.h
# The CLI ./run: main and its option parser, on top of the library's sources.
CLI_SRC = src/cli.c src/cli_args.c
CLI_HDR = src/cli.h

.PHONY: all test clean bench

all: libarianna.so run

libarianna.so: $(SRC) $(HDR)
	$(CC) $(CFLAGS) -shared -o $@ $(SRC) $(LDFLAGS) $(LIB_LDFLAGS) $(LDLIBS)

# The CLI links the library's object code statically, so ./run works without LD_LIBRARY_PATH.
run: $(CLI_SRC) $(CLI_HDR) $(SRC) $(HDR)
	$(CC) $(CFLAGS) -o $@ $(CLI_SRC) $(SRC) $(LDFLAGS) $(LDLIBS)

test: all
	$(PYTHON) -m pytest -q tests

# The speed benchmark (bench/README.md): CLI, Python binding, NumPy reference and PyTorch side by
# side with the roofline; writes bench/results.json.  BENCH_ARGS="--quick" for a short run.
bench: all
	$(PYTHON) -m bench $(BENCH_ARGS)

clean:
	rm -f run libarianna.so
	rm -rf $(SAN_DIR) $(FUZZ_DIR) $(AARCH64_DIR) $(X86_DIR)
	rm -f build/logits_dump
	-rmdir build 2>/dev/null

# ------------------------------------------------------------------ hardening (README "Hardening")
# `make sanitize`        library + CLI with ASan + UBSan (UBSan fatal) into build-san/
# `make sanitize-check`  the C-level tests (through build-san/libarianna.so) and a short CLI
#                        generation under the sanitizers; any report fails the target
# `make fuzz FUZZ_TIME=30` builds the libFuzzer harnesses (clang) and runs each FUZZ_TIME s
# `make fuzz-replay`     the harnesses as plain programs that replay files (no clang needed)
# `make valgrind`        a short CLI generation under valgrind memcheck

.PHONY: sanitize sanitize-check fuzz fuzz-build fuzz-replay valgrind

SAN_CC ?= $(CC)
SAN_DIR = build-san
SAN_FLAGS = -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
# The sanitizer runtime Python must preload to host the sanitized library.
SAN_RUNTIME = $(shell $(SAN_CC) -print-file-name=libasan.so)
# abort_on_error for UBSan too: gcc's UBSan otherwise exits 1, which the bad-file check expects
SAN_ENV = ASAN_OPTIONS=abort_on_error=1:detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:abort_on_error=1
SAN_TESTS = tests/test_runtime.py tests/test_tokenizer.py tests/test_bad_inputs.py tests/test_modules.py \
            tests/test_cli.py tests/test_chat.py
TINY_DIR = $(SAN_DIR)/tiny

sanitize: $(SAN_DIR)/libarianna.so $(SAN_DIR)/run

$(SAN_DIR)/libarianna.so: $(SRC) $(HDR)
	@mkdir -p $(SAN_DIR)
	$(SAN_CC) $(CFLAGS) $(SAN_FLAGS) -shared -o $@ $(SRC) $(LDFLAGS) $(LIB_LDFLAGS) $(LDLIBS)

$(SAN_DIR)/run: $(CLI_SRC) $(CLI_HDR) $(SRC) $(HDR)
	@mkdir -p $(SAN_DIR)
	$(SAN_CC) $(CFLAGS) $(SAN_FLAGS) -o $@ $(CLI_SRC) $(SRC) $(LDFLAGS) $(LDLIBS)

$(TINY_DIR)/model.bin: tests/make_tiny_model.py
	$(PYTHON) tests/make_tiny_model.py $(TINY_DIR)

sanitize-check: all sanitize $(TINY_DIR)/model.bin
	$(SAN_ENV) $(SAN_DIR)/run $(TINY_DIR)/model.bin -z $(TINY_DIR)/tokenizer.bin -n 24 -s 7 -i "the thing"
	$(SAN_ENV) $(SAN_DIR)/run $(TINY_DIR)/model.bin -z $(TINY_DIR)/tokenizer.bin -n 0 -s 7 -t 0 --mmap -i "$$(printf 'caf\303\251 \377\376')"
	$(SAN_ENV) $(SAN_DIR)/run $(TINY_DIR)/tokenizer.bin -z $(TINY_DIR)/tokenizer.bin; test $$? -eq 1
	ARIANNA_C_LIB=$(SAN_DIR)/libarianna.so ARIANNA_C_RUN=$(SAN_DIR)/run LD_PRELOAD=$(SAN_RUNTIME) \
	  ASAN_OPTIONS=abort_on_error=1:detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:abort_on_error=1 \
	  $(PYTHON) -m pytest -q -p no:cacheprovider $(SAN_TESTS)

FUZZ_CC ?= clang
FUZZ_TIME ?= 30
FUZZ_DIR = build-fuzz
FUZZERS = fuzz_model_load fuzz_tokenizer_load fuzz_encode fuzz_generate fuzz_module_load fuzz_sampler \
          fuzz_chat
FUZZ_FLAGS = -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
# libFuzzer options: a stuck input or a runaway allocation counts as a failure too.
FUZZ_OPTS = -max_total_time=$(FUZZ_TIME) -timeout=60 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
            -print_final_stats=1

fuzz-build: $(addprefix $(FUZZ_DIR)/,$(FUZZERS))

$(FUZZ_DIR)/%: fuzz/%.c fuzz/fuzz_buf.h $(SRC) $(HDR)
	@mkdir -p $(FUZZ_DIR)
	$(FUZZ_CC) -std=gnu11 -pthread -Isrc $(FUZZ_FLAGS) -o $@ $< $(SRC) -lm

# The same harnesses without libFuzzer (any compiler), linked to libarianna.so (they use the
# public API only): replay files given on the command line.  The test suite runs them on
# tests/fuzz_regressions/<harness>/.
fuzz-replay: $(addprefix $(FUZZ_DIR)/replay_,$(FUZZERS))

$(FUZZ_DIR)/replay_%: fuzz/%.c fuzz/fuzz_buf.h fuzz/replay.c libarianna.so src/run.h
	@mkdir -p $(FUZZ_DIR)
	$(CC) -std=gnu11 -O1 -g -Wall -Wextra -Isrc -o $@ fuzz/replay.c $< -L. -larianna \
	  -Wl,-rpath,'$$ORIGIN/..' $(LDLIBS)

# Each harness starts from the generated seeds, its saved corpus and the regression files in
# tests/fuzz_regressions/<harness>/; a crasher is saved in build-fuzz/crashes/<harness>/.
fuzz: all fuzz-build
	$(PYTHON) fuzz/make_seeds.py $(FUZZ_DIR)/seeds
	@for f in $(FUZZERS); do \
	  mkdir -p $(FUZZ_DIR)/corpus/$$f $(FUZZ_DIR)/crashes/$$f $(FUZZ_DIR)/seeds/$$f; \
	  dirs="$(FUZZ_DIR)/corpus/$$f $(FUZZ_DIR)/seeds/$$f"; \
	  [ -d tests/fuzz_regressions/$$f ] && dirs="$$dirs tests/fuzz_regressions/$$f"; \
	  echo "== $$f for $(FUZZ_TIME) s (log: $(FUZZ_DIR)/$$f.log)"; \
	  if ./$(FUZZ_DIR)/$$f $$dirs $(FUZZ_OPTS) -artifact_prefix=$(FUZZ_DIR)/crashes/$$f/ \
	       > $(FUZZ_DIR)/$$f.log 2>&1; then \
	    grep -E '^#[0-9]+.*DONE|^stat::' $(FUZZ_DIR)/$$f.log; \
	  else \
	    tail -n 60 $(FUZZ_DIR)/$$f.log; echo "$$f FAILED: crasher in $(FUZZ_DIR)/crashes/$$f/"; exit 1; \
	  fi; \
	done

valgrind: all $(TINY_DIR)/model.bin
	valgrind --leak-check=full --show-leak-kinds=all --errors-for-leak-kinds=all --error-exitcode=1 \
	  ./run $(TINY_DIR)/model.bin -z $(TINY_DIR)/tokenizer.bin -n 16 -s 7 -i "the thing"

# ------------------------------------------------------------------ aarch64 (README "Portability")
# `make check-aarch64` cross-builds the library and the CLI for aarch64 (where the portable
# scalar kernels run) into build-aarch64/, then runs it under qemu-user on the persona: its
# logits (tests/logits_dump.c), float32 and int8, must be bit for bit the native scalar set's,
# and the CLI's greedy text byte for byte the native CLI's.  Needs
# gcc-aarch64-linux-gnu and qemu-user (.ci/run installs them).

.PHONY: check-aarch64

AARCH64_CC ?= aarch64-linux-gnu-gcc
AARCH64_EMU ?= qemu-aarch64 -L /usr/aarch64-linux-gnu
AARCH64_DIR = build-aarch64
PERSONA_RUN = persona/arianna_v1_base.bin -z persona/tok4096.bin -t 0 -n 32 -i "Resonance is"

$(AARCH64_DIR)/libarianna.so: $(SRC) $(HDR)
	@mkdir -p $(AARCH64_DIR)
	$(AARCH64_CC) $(CFLAGS) -shared -o $@ $(SRC) $(LDFLAGS) $(LIB_LDFLAGS) $(LDLIBS)

$(AARCH64_DIR)/run: $(CLI_SRC) $(CLI_HDR) $(SRC) $(HDR)
	@mkdir -p $(AARCH64_DIR)
	$(AARCH64_CC) $(CFLAGS) -o $@ $(CLI_SRC) $(SRC) $(LDFLAGS) $(LDLIBS)

$(AARCH64_DIR)/logits_dump: tests/logits_dump.c $(SRC) $(HDR)
	@mkdir -p $(AARCH64_DIR)
	$(AARCH64_CC) $(CFLAGS) -Isrc -o $@ tests/logits_dump.c $(SRC) $(LDFLAGS) $(LDLIBS)

$(AARCH64_DIR)/native_logits_dump: build/logits_dump
	@mkdir -p $(AARCH64_DIR)
	cp $< $@

build/logits_dump: tests/logits_dump.c $(SRC) $(HDR)
	@mkdir -p build
	$(CC) $(CFLAGS) -Isrc -o $@ tests/logits_dump.c $(SRC) $(LDFLAGS) $(LDLIBS)

check-aarch64: run $(AARCH64_DIR)/libarianna.so $(AARCH64_DIR)/run $(AARCH64_DIR)/logits_dump $(AARCH64_DIR)/native_logits_dump
	@AC_KERNEL=scalar $(AARCH64_DIR)/native_logits_dump persona/arianna_v1_base.bin > $(AARCH64_DIR)/native-logits.raw
	@$(AARCH64_EMU) $(AARCH64_DIR)/logits_dump persona/arianna_v1_base.bin > $(AARCH64_DIR)/aarch64-logits.raw
	@cmp $(AARCH64_DIR)/native-logits.raw $(AARCH64_DIR)/aarch64-logits.raw
	@echo "aarch64: the persona's logits, float32 and int8, bit for bit the native scalar set's ($$(wc -c < $(AARCH64_DIR)/aarch64-logits.raw) bytes)"
	@for q in f32 int8; do \
	  flags=$$([ $$q = int8 ] && echo "-q int8"); \
	  ./run $(PERSONA_RUN) $$flags > $(AARCH64_DIR)/native-$$q.txt 2>/dev/null || exit 1; \
	  $(AARCH64_EMU) $(AARCH64_DIR)/run $(PERSONA_RUN) $$flags > $(AARCH64_DIR)/aarch64-$$q.txt 2>/dev/null || exit 1; \
	  cmp $(AARCH64_DIR)/native-$$q.txt $(AARCH64_DIR)/aarch64-$$q.txt || exit 1; \
	  echo "aarch64 $$q: greedy text identical to the native CLI's ($$(wc -c < $(AARCH64_DIR)/aarch64-$$q.txt) bytes)"; \
	done

# ------------------------------------------------------------- older x86-64 CPUs (README "Portability")
# `make check-x86-cpus` runs tests/logits_dump.c under qemu-x86_64 as CPUs without AVX-512
# (qemu's emulator has none of AVX-512, VNNI or AMX): each CPU:SET pair says which kernel set the
# library must pick there, and its logits, float32 and int8, must be bit for bit what the
# native machine gives with AC_KERNEL=SET.  So the automatic choice never lands on a set the
# CPU lacks, and the sets it does land on compute the same there as here.  Needs qemu-user.

.PHONY: check-x86-cpus

X86_EMU ?= qemu-x86_64
X86_CPUS ?= Haswell:avx2 Nehalem:scalar
X86_DIR = build/x86-cpus

check-x86-cpus: build/logits_dump
	@mkdir -p $(X86_DIR)
	@for pair in $(X86_CPUS); do \
	  cpu=$${pair%%:*}; set=$${pair##*:}; \
	  AC_KERNEL=$$set build/logits_dump persona/arianna_v1_base.bin > $(X86_DIR)/native-$$set.raw 2>/dev/null || exit 1; \
	  env -u AC_KERNEL $(X86_EMU) -cpu $$cpu build/logits_dump persona/arianna_v1_base.bin \
	    > $(X86_DIR)/$$cpu.raw 2> $(X86_DIR)/$$cpu.err || { cat $(X86_DIR)/$$cpu.err; exit 1; }; \
	  picked=$$(sed -n 's/^kernels: //p' $(X86_DIR)/$$cpu.err); \
	  [ "$$picked" = "$$set" ] || { echo "x86-64 $$cpu: the library picked '$$picked', not $$set"; exit 1; }; \
	  cmp $(X86_DIR)/native-$$set.raw $(X86_DIR)/$$cpu.raw || exit 1; \
	  echo "x86-64 $$cpu (qemu): picked $$set; logits, float32 and int8, bit for bit the native $$set set's"; \
	done
