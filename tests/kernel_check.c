/*
 * kernel_check.c - checks one kernel set (src/kernels.h) against float64 references and
 * against its own promises, on random inputs of awkward sizes; run by tests/test_speed_paths.py.
 *
 *   kernel_check SET     prints "skip: ..." (exit 0) when this CPU cannot run SET, else one
 *                        line per failed check (exit 1) or "ok SET" (exit 0)
 *
 * Checked: every output of a GEMM is the same bits whatever the token count T, the row range
 * and the tile it falls in (one token at a time = all tokens together = any split of the rows);
 * float32 GEMM and the weighted sum close to float64; int8 GEMM close to float64 and bitwise
 * equal to the scalar set's (every group size); the quantizer bitwise equal to ac_quantize_q8;
 * SwiGLU and softmax close to float64 (a few ulp), and softmax's NaN for a NaN or +inf input;
 * every x86-64 set's weighted sum, SwiGLU and softmax bitwise the avx2 set's.
 */
#include "kernels.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            printf(__VA_ARGS__);                                                                   \
            printf("\n");                                                                          \
            failures++;                                                                            \
        }                                                                                          \
    } while (0)

static unsigned rng = 12345;
static float frand(void) { /* uniform in [-1, 1) */
    rng = rng * 1664525u + 1013904223u;
    return (float)(rng >> 8) / 8388608.0f - 1.0f;
}

static void fill(float *x, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) x[i] = frand() * scale;
}

/* ------------------------------------------------------------------ float32 GEMM */

static void check_gemm_f32(const ac_kernels *k, int rows, int n, int T) {
    float *W = malloc(sizeof(float) * rows * n), *X = malloc(sizeof(float) * T * n);
    float *all = malloc(sizeof(float) * T * rows), *one = malloc(sizeof(float) * rows);
    float *split = malloc(sizeof(float) * T * rows);
    fill(W, (size_t)rows * n, 1.0f);
    fill(X, (size_t)T * n, 1.0f);
    k->gemm_f32(all, rows, W, n, X, n, T, n, 0, rows);
    for (int r0 = 0; r0 < rows;) { /* uneven row ranges */
        int r1 = r0 + 1 + (r0 * 7) % 11;
        r1 = r1 < rows ? r1 : rows;
        k->gemm_f32(split, rows, W, n, X, n, T, n, r0, r1);
        r0 = r1;
    }
    for (int t = 0; t < T; t++) {
        k->gemm_f32(one, rows, W, n, X + (size_t)t * n, n, 1, n, 0, rows);
        for (int i = 0; i < rows; i++) {
            double ref = 0.0, mag = 0.0;
            for (int j = 0; j < n; j++) {
                ref += (double)W[(size_t)i * n + j] * X[(size_t)t * n + j];
                mag += fabs((double)W[(size_t)i * n + j] * X[(size_t)t * n + j]);
            }
            float got = all[(size_t)t * rows + i];
            CHECK(memcmp(&got, &one[i], sizeof got) == 0, "gemm_f32 %s rows %d n %d T %d: token %d row %d: T=all %.9g != T=1 %.9g",
                  k->name, rows, n, T, t, i, got, one[i]);
            CHECK(memcmp(&got, &split[(size_t)t * rows + i], sizeof got) == 0,
                  "gemm_f32 %s rows %d n %d T %d: row %d differs with the rows split", k->name, rows, n, T, i);
            CHECK(fabs(got - ref) <= 1e-6 * mag + 1e-30, "gemm_f32 %s n %d: %.9g vs float64 %.9g", k->name, n, got, ref);
        }
    }
    free(W), free(X), free(all), free(one), free(split);
}

/* ------------------------------------------------------------------ int8 GEMM */

/* out (T, rows) of set k; W and X quantized in groups of gs (W packed first where the set
 * packs its int8 matrices, as the model does). */
static void gemm_q8(const ac_kernels *k, float *out, const int8_t *Wq, const float *Ws, const int8_t *Xq,
                    const float *Xs, int rows, int n, int T, int gs, int r0, int r1) {
    size_t bytes = k->packed_q8_bytes ? k->packed_q8_bytes(rows, n, gs) : 0;
    if (!bytes) {
        k->gemm_q8(out, rows, Wq, Ws, Xq, Xs, T, n, gs, r0, r1);
        return;
    }
    CHECK(bytes % 64 == 0, "packed_q8_bytes %s rows %d n %d gs %d: %zu, not a multiple of 64", k->name, rows, n, gs, bytes);
    void *packed = aligned_alloc(64, bytes);
    CHECK(packed != NULL, "out of memory");
    if (!packed) return;
    k->pack_q8(packed, Wq, Ws, rows, n, gs);
    k->gemm_q8(out, rows, packed, NULL, Xq, Xs, T, n, gs, r0, r1);
    free(packed);
}

static void check_gemm_q8(const ac_kernels *k, int rows, int n, int T, int gs) {
    float *W = malloc(sizeof(float) * rows * n), *X = malloc(sizeof(float) * T * n);
    int8_t *Wq = malloc((size_t)rows * n), *Xq = malloc((size_t)T * n);
    float *Ws = malloc(sizeof(float) * rows * n / gs), *Xs = malloc(sizeof(float) * T * n / gs);
    float *all = malloc(sizeof(float) * T * rows), *one = malloc(sizeof(float) * rows);
    float *split = malloc(sizeof(float) * T * rows), *ref = malloc(sizeof(float) * T * rows);
    fill(W, (size_t)rows * n, 1.0f);
    fill(X, (size_t)T * n, 3.0f);
    W[0] = 0.0f; /* a weight of -128 (not produced by the quantizer, allowed in a file) below */
    ac_quantize_q8(Wq, Ws, W, rows * n, gs);
    ac_quantize_q8(Xq, Xs, X, T * n, gs);
    Wq[0] = -128;
    gemm_q8(k, all, Wq, Ws, Xq, Xs, rows, n, T, gs, 0, rows);
    for (int r0 = 0; r0 < rows;) {
        int r1 = r0 + 1 + (r0 * 5) % 9;
        r1 = r1 < rows ? r1 : rows;
        gemm_q8(k, split, Wq, Ws, Xq, Xs, rows, n, T, gs, r0, r1);
        r0 = r1;
    }
    gemm_q8(&ac_kernels_scalar, ref, Wq, Ws, Xq, Xs, rows, n, T, gs, 0, rows);
    for (int t = 0; t < T; t++) {
        gemm_q8(k, one, Wq, Ws, Xq + (size_t)t * n, Xs + (size_t)t * (n / gs), rows, n, 1, gs, 0, rows);
        for (int i = 0; i < rows; i++) {
            double exact = 0.0, mag = 0.0;
            for (int j = 0; j < n; j++) {
                double p = (double)Wq[(size_t)i * n + j] * Ws[((size_t)i * n + j) / gs] * Xq[(size_t)t * n + j] *
                           Xs[((size_t)t * n + j) / gs];
                exact += p;
                mag += fabs(p);
            }
            float got = all[(size_t)t * rows + i];
            CHECK(memcmp(&got, &one[i], sizeof got) == 0, "gemm_q8 %s n %d T %d gs %d: token %d row %d: T=all != T=1",
                  k->name, n, T, gs, t, i);
            CHECK(memcmp(&got, &split[(size_t)t * rows + i], sizeof got) == 0,
                  "gemm_q8 %s n %d T %d gs %d: row %d differs with the rows split", k->name, n, T, gs, i);
            CHECK(fabs(got - exact) <= 1e-6 * mag + 1e-30, "gemm_q8 %s n %d gs %d: %.9g vs float64 %.9g", k->name, n, gs,
                  got, exact);
            CHECK(memcmp(&got, &ref[(size_t)t * rows + i], sizeof got) == 0,
                  "gemm_q8 %s n %d T %d gs %d: token %d row %d: %.9g != the scalar set's %.9g", k->name, n, T, gs, t,
                  i, got, ref[(size_t)t * rows + i]);
        }
    }
    free(W), free(X), free(Wq), free(Xq), free(Ws), free(Xs), free(all), free(one), free(split), free(ref);
}

/* ------------------------------------------------------------------ the rest */

/* R = 5 queries at consecutive positions (query r weighs T + r rows): close to float64, and
 * each query's sums the same bits as when it is computed alone. */
static void check_weighted_sum(const ac_kernels *k, int T, int n) {
    enum { R = 5 };
    int rows = T + R - 1, lda = rows + 2, ldo = n + 1;
    float *a = malloc(sizeof(float) * R * lda), *V = malloc(sizeof(float) * rows * (n + 3));
    float *out = malloc(sizeof(float) * R * ldo), *one = malloc(sizeof(float) * n);
    fill(a, (size_t)R * lda, 1.0f);
    fill(V, (size_t)rows * (n + 3), 1.0f);
    k->weighted_sum(out, ldo, a, lda, V, n + 3, T, R, n);
    for (int r = 0; r < R; r++) {
        const float *ar = a + (size_t)r * lda, *o = out + (size_t)r * ldo;
        k->weighted_sum(one, n, ar, lda, V, n + 3, T + r, 1, n);
        CHECK(memcmp(one, o, sizeof(float) * n) == 0, "weighted_sum %s T %d n %d: query %d of %d != alone", k->name, T,
              n, r, R);
        for (int j = 0; j < n; j++) {
            double ref = 0.0, mag = 0.0;
            for (int t = 0; t < T + r; t++) {
                ref += (double)ar[t] * V[(size_t)t * (n + 3) + j];
                mag += fabs((double)ar[t] * V[(size_t)t * (n + 3) + j]);
            }
            CHECK(fabs(o[j] - ref) <= 1e-6 * mag + 1e-30, "weighted_sum %s T %d n %d: query %d column %d %.9g vs %.9g",
                  k->name, T, n, r, j, o[j], ref);
        }
    }
    free(a), free(V), free(out), free(one);
}

static void check_quantize(const ac_kernels *k, int n, int gs) {
    float *x = malloc(sizeof(float) * n), *s1 = malloc(sizeof(float) * n / gs), *s2 = malloc(sizeof(float) * n / gs);
    int8_t *q1 = malloc((size_t)n), *q2 = malloc((size_t)n);
    fill(x, (size_t)n, 2.0f);
    for (int j = 0; j < gs && j < n; j++) x[j] = (float)(j - gs / 2) + 0.5f; /* halves: rounding to even */
    x[n - 1] = NAN;
    ac_quantize_q8(q1, s1, x, n, gs);
    k->quantize_q8(q2, s2, x, n, gs);
    CHECK(memcmp(q1, q2, (size_t)n) == 0 && memcmp(s1, s2, sizeof(float) * n / gs) == 0,
          "quantize_q8 %s n %d gs %d: not ac_quantize_q8's bytes", k->name, n, gs);
    free(x), free(s1), free(s2), free(q1), free(q2);
}

/* The x86-64 sets' weighted sum, SwiGLU and softmax give the avx2 set's bits. */
static void check_like_avx2(const ac_kernels *k, const ac_kernels *avx2, int n) {
    for (int T = 1; T <= 41; T += 8) {
        float *w = malloc(sizeof(float) * T), *V = malloc(sizeof(float) * T * n), *o1 = malloc(sizeof(float) * n),
              *o2 = malloc(sizeof(float) * n);
        fill(w, (size_t)T, 1.0f);
        fill(V, (size_t)T * n, 1.0f);
        k->weighted_sum(o1, n, w, T, V, n, T, 1, n);
        avx2->weighted_sum(o2, n, w, T, V, n, T, 1, n);
        CHECK(memcmp(o1, o2, sizeof(float) * n) == 0, "weighted_sum %s T %d n %d: not avx2's bits", k->name, T, n);
        free(w), free(V), free(o1), free(o2);
    }
    float *a = malloc(sizeof(float) * n), *b = malloc(sizeof(float) * n), *g = malloc(sizeof(float) * n);
    fill(a, (size_t)n, 20.0f);
    fill(g, (size_t)n, 1.0f);
    memcpy(b, a, sizeof(float) * n);
    k->swiglu(a, g, n);
    avx2->swiglu(b, g, n);
    CHECK(memcmp(a, b, sizeof(float) * n) == 0, "swiglu %s n %d: not avx2's bits", k->name, n);
    fill(a, (size_t)n, 20.0f);
    memcpy(b, a, sizeof(float) * n);
    float sa = k->softmax(a, n), sb = avx2->softmax(b, n);
    CHECK(memcmp(a, b, sizeof(float) * n) == 0 && memcmp(&sa, &sb, sizeof sa) == 0, "softmax %s n %d: not avx2's bits",
          k->name, n);
    free(a), free(b), free(g);
}

static void check_swiglu(const ac_kernels *k, int n) {
    float *h = malloc(sizeof(float) * n), *g = malloc(sizeof(float) * n), *h0 = malloc(sizeof(float) * n);
    fill(h, (size_t)n, 30.0f);
    fill(g, (size_t)n, 1.0f);
    memcpy(h0, h, sizeof(float) * n);
    k->swiglu(h, g, n);
    for (int i = 0; i < n; i++) {
        double v = h0[i], ref = v / (1.0 + exp(-v)) * g[i];
        CHECK(fabs(h[i] - ref) <= 4e-7 * fabs(ref) + 1e-37, "swiglu %s n %d: silu(%.9g) * %.9g = %.9g, float64 %.9g",
              k->name, n, h0[i], g[i], h[i], ref);
    }
    free(h), free(g), free(h0);
}

static void check_softmax(const ac_kernels *k, int n) {
    float *x = malloc(sizeof(float) * n), *x0 = malloc(sizeof(float) * n);
    fill(x, (size_t)n, 40.0f);
    memcpy(x0, x, sizeof(float) * n);
    float sum = k->softmax(x, n);
    float max = x0[0];
    double ref_sum = 0.0;
    for (int i = 1; i < n; i++) max = x0[i] > max ? x0[i] : max;
    /* the float32 difference x - max, as the kernels take it (exact in float64 from there) */
    for (int i = 0; i < n; i++) ref_sum += exp((double)(x0[i] - max));
    CHECK(fabs(sum - ref_sum) <= 1e-6 * ref_sum, "softmax %s n %d: sum %.9g vs %.9g", k->name, n, sum, ref_sum);
    for (int i = 0; i < n; i++) {
        double ref = exp((double)(x0[i] - max)) / ref_sum;
        CHECK(fabs(x[i] - ref) <= 1e-6 * ref + 1e-38, "softmax %s n %d: [%d] %.9g vs %.9g", k->name, n, i, x[i], ref);
    }
    for (int bad = 0; bad < 2; bad++) {
        fill(x, (size_t)n, 1.0f);
        x[n / 2] = bad ? INFINITY : NAN;
        CHECK(isnan(k->softmax(x, n)) && isnan(x[0]), "softmax %s n %d: a %s input does not give NaN", k->name, n,
              bad ? "+inf" : "NaN");
    }
    free(x), free(x0);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: kernel_check SET\n");
        return 2;
    }
    const ac_kernels *k = ac_kernels_named(argv[1]);
    if (!k) {
        printf("skip: this CPU (or build) cannot run the %s kernels\n", argv[1]);
        return 0;
    }
    const ac_kernels *avx2 = strcmp(k->name, "scalar") ? ac_kernels_named("avx2") : NULL;
    const int sizes[] = {1, 5, 8, 16, 23, 48, 100, 288};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++)
        for (int T = 1; T <= 19; T += 6) check_gemm_f32(k, 37, sizes[s], T);
    for (int T = 1; T <= 19; T += 3) {
        check_gemm_q8(k, 29, 96, T, 32);
        check_gemm_q8(k, 29, 288, T, 32); /* the persona's shape: 9 groups */
        check_gemm_q8(k, 29, 128, T, 64);
        check_gemm_q8(k, 13, 48, T, 16);
        check_gemm_q8(k, 37, 48, T, 16);
        check_gemm_q8(k, 40, 288, T, 96);
        check_gemm_q8(k, 20, 2560, T, 32); /* a wide input: 80 groups */
    }
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        check_weighted_sum(k, 1 + (int)s * 9, sizes[s]);
        check_swiglu(k, sizes[s]);
        check_softmax(k, sizes[s]);
        if (avx2) check_like_avx2(k, avx2, sizes[s]);
    }
    check_quantize(k, 96, 32);
    check_quantize(k, 128, 64);
    check_quantize(k, 48, 16);
    if (failures) return 1;
    printf("ok %s\n", k->name);
    return 0;
}
