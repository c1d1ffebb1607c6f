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
 * Kernel sets (one per x86-64 generation, each a file of its own, compiled with per-function
 * target attributes so the library itself needs no -mavx2 or -march):
 *
 *   scalar       portable C, any CPU (kernels.c)
 *   avx2         AVX2 + FMA: 8-lane float32 sums, int8 through maddubs on weights packed for
 *                it at load, 8 rows to a vector (kernels_avx2.c)
 *   avx2-vnni    the avx2 set with its int8 dot products in AVX-VNNI vpdpbusd (kernels_avx2.c)
 *   avx512       AVX-512F: 16-lane float32 sums; int8 as in avx2 (kernels_avx512.c)
 *   avx512-vnni  the avx512 set with its int8 products in 512-bit AVX-512 VNNI vpdpbusd, on
 *                weights packed for it at load, 16 rows to a vector (kernels_avx512.c)
 *   avx512-amx   the avx512-vnni set with its int8 products over several tokens on AMX-INT8
 *                tiles, on the same packed weights (kernels_amx.c)
 *
 * The best set the CPU supports is picked once, on first use (ac_kernels_get); AC_KERNEL=NAME
 * in the environment forces a set (kernels.c says what happens to a name the CPU lacks).
 * Float32 products are the same within a set, not between sets of different lane counts (the
 * partial sums differ).  int8 products are exact int32 sums, one per group, and every set
 * scales and adds them in the scalar set's order: every set's int8 GEMM gives the scalar set's
 * bits.  So sets with the same float32 lanes (avx2 and avx2-vnni; avx512, avx512-vnni and
 * avx512-amx) give bitwise equal logits for int8 models as well as float32 ones.
 *
 * int8 ("Q8_0"): a tensor of n values in groups of gs is stored as n int8 values q and n/gs
 * float scales s, with value[j] ~= q[j] * s[j / gs].  Activations are quantized the same way
 * on the fly, and the int8 x int8 products of a group are summed exactly in int32.
 */
#ifndef ARIANNA_KERNELS_H
#define ARIANNA_KERNELS_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    const char *name; /* one of the names above */

    /* float32 GEMM as above; out must not overlap W or X. */
    void (*gemm_f32)(float *out, int ldo, const float *W, int ldw, const float *X, int ldx, int T,
                     int n, int r0, int r1);

    /* int8 GEMM: W = (Wq, Ws), X = (Xq, Xs) in groups of gs (gs divides n); ldw = ldx = n. */
    void (*gemm_q8)(float *out, int ldo, const int8_t *Wq, const float *Ws, const int8_t *Xq,
                    const float *Xs, int T, int n, int gs, int r0, int r1);

    /* The attention's weighted sums of values for R queries at consecutive positions: query r
     * (r in [0, R)) weighs the first T + r rows of V, out[r * ldo + j] = sum over t in [0, T + r)
     * of a[r * lda + t] * V[t * ldv + j] for j in [0, n), summed in order of t (out must not
     * overlap a or V).  A query's sums have the same bits however many are computed together. */
    void (*weighted_sum)(float *out, int ldo, const float *a, int lda, const float *V, int ldv, int T, int R, int n);

    /* ac_quantize_q8 (below), bitwise the same result, faster (activations on the fly). */
    void (*quantize_q8)(int8_t *q, float *s, const float *x, int n, int gs);

    /* The SwiGLU gate: h[i] = silu(h[i]) * g[i], silu(v) = v * (1 / (1 + e^-v)), i in [0, n). */
    void (*swiglu)(float *h, const float *g, int n);

    /* x = softmax(x) over [0, n) (n >= 1); returns the sum of the exponentials: in [1, n]
     * unless x held an infinity or a NaN (then it is NaN and so is every x[i]).  The SIMD sets'
     * e^x is within 2 ulp of expf's. */
    float (*softmax)(float *x, int n);

    /* int8 matrices in the set's own layout (NULL members: the row layout above everywhere):
     * the bytes a rows x n matrix in groups of gs takes packed, a multiple of 64 (0: that shape
     * stays in the row layout), and the packing (dst 64-byte aligned).  The model packs each
     * int8 matrix once; gemm_q8 then gets the packed matrix as Wq and NULL as Ws. */
    size_t (*packed_q8_bytes)(int rows, int n, int gs);
    void (*pack_q8)(void *dst, const int8_t *Wq, const float *Ws, int rows, int n, int gs);
} ac_kernels;

/* The kernel set in use (chosen once, thread-safe). */
const ac_kernels *ac_kernels_get(void);

/* The set called name if this CPU can run it, else NULL (for tools that compare sets). */
const ac_kernels *ac_kernels_named(const char *name);

/* The sets themselves, for kernels.c's choice; use ac_kernels_get() everywhere else. */
extern const ac_kernels ac_kernels_scalar;
#if defined(__x86_64__)
extern const ac_kernels ac_kernels_avx2, ac_kernels_avx2_vnni, ac_kernels_avx512, ac_kernels_avx512_vnni,
    ac_kernels_avx512_amx;
#endif

/* Members one set lends another: the portable int8 GEMM (for shapes that stay in the row
 * layout) and softmax (with libm's expf, for callers that want it on every CPU), and the avx2
 * set's int8 GEMM, packing, quantizer and softmax (the avx512 set's), and the avx512 set's
 * float32 GEMM, weighted sum and SwiGLU and the avx512-vnni set's int8 GEMM and packing (the
 * avx512-amx set's). */
void ac_gemm_q8_scalar(float *out, int ldo, const int8_t *Wq, const float *Ws, const int8_t *Xq,
                       const float *Xs, int T, int n, int gs, int r0, int r1);
float ac_softmax_scalar(float *x, int n);
#if defined(__x86_64__)
void ac_gemm_q8_avx2(float *out, int ldo, const int8_t *Wq, const float *Ws, const int8_t *Xq,
                     const float *Xs, int T, int n, int gs, int r0, int r1);
size_t ac_packed_q8_bytes_avx2(int rows, int n, int gs);
void ac_pack_q8_avx2(void *dst, const int8_t *Wq, const float *Ws, int rows, int n, int gs);
void ac_quantize_q8_avx2(int8_t *q, float *s, const float *x, int n, int gs);
float ac_softmax_avx2(float *x, int n);
void ac_gemm_f32_avx512(float *out, int ldo, const float *W, int ldw, const float *X, int ldx, int T, int n, int r0,
                        int r1);
void ac_weighted_sum_avx512(float *out, int ldo, const float *a, int lda, const float *V, int ldv, int T, int R,
                            int n);
void ac_swiglu_avx512(float *h, const float *g, int n);
void ac_gemm_q8_avx512_vnni(float *out, int ldo, const int8_t *Wq, const float *Ws, const int8_t *Xq,
                            const float *Xs, int T, int n, int gs, int r0, int r1);
size_t ac_packed_q8_bytes_avx512_vnni(int rows, int n, int gs);
void ac_pack_q8_avx512_vnni(void *dst, const int8_t *Wq, const float *Ws, int rows, int n, int gs);
#endif

/* Symmetric per-group quantization of x[0..n) (gs divides n): s[g] = max|x| / 127 over group
 * g, q[j] = round-half-even(x[j] / s[g]) (0 for an all-zero group).  Portable C with a fixed
 * result on every CPU, used for weights at load time and for activations. */
void ac_quantize_q8(int8_t *q, float *s, const float *x, int n, int gs);

/* x[j] = q[j] * s[j / gs] for j in [0, n); gs divides n. */
void ac_dequantize_q8(float *x, const int8_t *q, const float *s, int n, int gs);

#endif /* ARIANNA_KERNELS_H */
