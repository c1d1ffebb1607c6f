# arianna_c: `make` builds the CLI ./run and the shared library libarianna.so,
# `make test` runs the test suite, `make clean` removes what make built.
#
# Flags: -O3 and -fPIC, OpenMP when the compiler supports it.  Deliberately no -ffast-math
# (it would break the float32 parity with the NumPy/PyTorch reference) and no -march=native
# (the library must run on any x86-64/aarch64 machine it is copied to).

CC ?= gcc
PYTHON ?= python3
CFLAGS ?= -O3
CFLAGS += -std=gnu11 -fPIC -Wall -Wextra -fvisibility=hidden
LDLIBS = -lm

# OpenMP probe: compile and link an empty program with -fopenmp; use it only if that works.
OPENMP := $(shell echo 'int main(void){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo -fopenmp)
CFLAGS += $(OPENMP)
LDFLAGS += $(OPENMP)

SRC = src/run.c
HDR = src/run.h

.PHONY: all test clean

all: libarianna.so run

libarianna.so: $(SRC) $(HDR)
	$(CC) $(CFLAGS) -shared -o $@ $(SRC) $(LDFLAGS) $(LDLIBS)

# The CLI links the library's object code statically, so ./run works without LD_LIBRARY_PATH.
run: src/cli.c $(SRC) $(HDR)
	$(CC) $(CFLAGS) -o $@ src/cli.c $(SRC) $(LDFLAGS) $(LDLIBS)

test: all
	$(PYTHON) -m pytest -q tests

clean:
	rm -f run libarianna.so
