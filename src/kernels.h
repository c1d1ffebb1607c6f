/*
 * kernels.h - arianna_c's internal compute kernels (not part of the public API).
 *
 * Every matrix product in the forward pass is a "dot form" GEMM: the weights W are
 * (rows, n) row-major as stored in the model file (row stride ldw), the activations X are T
 * tokens of n values each (row stride ldx), and
 *
 *     out[t * ldo + i] = sum_j W[i * ldw + j] * X[t * ldx + j]   for i in [r0, r1), t in [0, T).
 *
 * Attention scores use it too: W = the cached keys of one head, X = a block of queries.
 * T = 1 is the decode matvec; T > 1 is prompt prefill or batched decode.  Callers split the
 * row range between threads.
 *
 * Determinism: every kernel computes each output element with the same operation sequence
 * whatever T, the row range or the register tile the element falls in, so a row's result
 * does not depend on how rows are split between threads or on how many tokens are computed
 * together.  Prefill, batched decode and single-token decode therefore give bitwise equal
 * results with a given kernel set.
 *
 * Kernel sets: "scalar" (portable C, any CPU) and, on x86-64, "avx2" (AVX2 + FMA, compiled
 * with per-function target attributes so the library itself needs no -mavx2).  The best set
 * the CPU supports is picked once, on first use; AC_KERNEL=scalar in the environment forces
 * the portable set (tests compare the two).  There is no AVX-512 set: it could not be tested
 * on the machines this was written on.
 *
 * int8 ("Q8_0"): a tensor of n values in groups of gs is stored as n int8 values q and n/gs
 * float scales s, with value[j] ~= q[j] * s[j / gs].  Activations are quantized the same way
 * on the fly, and the int8 x int8 products of a group are summed exactly in int32.
 */
#ifndef ARIANNA_KERNELS_H
#define ARIANNA_KERNELS_H

#include <stdint.h>

typedef struct {
    const char *name; /* "scalar" or "avx2" */

    /* float32 GEMM as above; out must not overlap W or X. */
    void (*gemm_f32)(float *out, int ldo, const float *W, int ldw, const float *X, int ldx, int T,
                     int n, int r0, int r1);

    /* int8 GEMM: W = (Wq, Ws), X = (Xq, Xs) in groups of gs (gs divides n); ldw = ldx = n. */
    void (*gemm_q8)(float *out, int ldo, const int8_t *Wq, const float *Ws, const int8_t *Xq,
                    const float *Xs, int T, int n, int gs, int r0, int r1);

    /* The attention's weighted sum of values: out[j] = sum over t in [0, T) of a[t] * V[t * ldv + j]
     * for j in [0, n), summed in order of t (out must not overlap a or V). */
    void (*weighted_sum)(float *out, const float *a, const float *V, int ldv, int T, int n);

    /* ac_quantize_q8 (below), bitwise the same result, faster (activations on the fly). */
    void (*quantize_q8)(int8_t *q, float *s, const float *x, int n, int gs);
} ac_kernels;

/* The kernel set in use (chosen once, thread-safe). */
const ac_kernels *ac_kernels_get(void);

/* Symmetric per-group quantization of x[0..n) (gs divides n): s[g] = max|x| / 127 over group
 * g, q[j] = round-half-even(x[j] / s[g]) (0 for an all-zero group).  Portable C with a fixed
 * result on every CPU, used for weights at load time and for activations. */
void ac_quantize_q8(int8_t *q, float *s, const float *x, int n, int gs);

/* x[j] = q[j] * s[j / gs] for j in [0, n). */
void ac_dequantize_q8(float *x, const int8_t *q, const float *s, int n, int gs);

#endif /* ARIANNA_KERNELS_H */
