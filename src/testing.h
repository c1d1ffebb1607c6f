/*
 * testing.h - functions the library exports for its tests and fuzzers, not part of the API
 * (bindings do not declare them): ways to run one computation along two code paths so the
 * tests can compare them.  Never installed.
 */
#ifndef ARIANNA_TESTING_H
#define ARIANNA_TESTING_H

#include "run.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The logits of ac_logits, computed one ac_forward per token (the decode path) instead of
 * one prefill pass. */
AC_API int ac_logits_stepwise(ac_state *state, const int *tokens, int n_tokens, float *out);

#ifdef __cplusplus
}
#endif

#endif /* ARIANNA_TESTING_H */
