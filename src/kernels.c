/*
 * kernels.c - the compute kernels behind kernels.h: a portable scalar set, an AVX2+FMA set
 * on x86-64, and the run-time choice between them.
 *
 * Float sums: each dot product keeps 8 partial sums (lane k takes the terms j = k mod 8),
 * reduces them in one fixed order (hsum8), then adds the n mod 8 leftover terms in order.
 * The scalar set uses the same lane structure (it also lets the compiler vectorize it on
 * any target without reassociating anything), so the two sets differ only by FMA rounding.
 */
#include "kernels.h"

#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

/* ======================================================================== quantization */

void ac_quantize_q8(int8_t *q, float *s, const float *x, int n, int gs) {
    for (int g = 0; g < n / gs; g++) {
        const float *xg = x + (size_t)g * gs;
        int8_t *qg = q + (size_t)g * gs;
        float amax = 0.0f;
        for (int j = 0; j < gs; j++) {
            float a = fabsf(xg[j]);
            if (a > amax) amax = a;
        }
        float scale = amax / 127.0f;
        s[g] = scale;
        for (int j = 0; j < gs; j++) {
            float v = scale > 0.0f ? xg[j] / scale : 0.0f;
            /* |v| <= 127 up to rounding; the clamp also keeps a NaN input defined (-> 0) */
            v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
            qg[j] = v == v ? (int8_t)nearbyintf(v) : 0;
        }
    }
}

void ac_dequantize_q8(float *x, const int8_t *q, const float *s, int n, int gs) {
    for (int j = 0; j < n; j++) x[j] = (float)q[j] * s[j / gs];
}

/* ======================================================================== scalar set */

/* The fixed reduction order of 8 partial sums, shared with hsum_avx2. */
static float hsum8(const float l[8]) {
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

static float dot_scalar(const float *a, const float *b, int n) {
    float lane[8] = {0};
    int j = 0;
    for (; j + 8 <= n; j += 8)
        for (int k = 0; k < 8; k++) lane[k] += a[j + k] * b[j + k];
    float sum = hsum8(lane);
    for (; j < n; j++) sum += a[j] * b[j];
    return sum;
}

static void weighted_sum_scalar(float *out, const float *a, const float *V, int ldv, int T, int n) {
    memset(out, 0, (size_t)n * sizeof(float));
    for (int t = 0; t < T; t++)
        for (int j = 0; j < n; j++) out[j] += a[t] * V[(size_t)t * ldv + j];
}

static void gemm_f32_scalar(float *out, int ldo, const float *W, int ldw, const float *X, int ldx,
                            int T, int n, int r0, int r1) {
    for (int i = r0; i < r1; i++)
        for (int t = 0; t < T; t++)
            out[(size_t)t * ldo + i] = dot_scalar(W + (size_t)i * ldw, X + (size_t)t * ldx, n);
}

static void gemm_q8_scalar(float *out, int ldo, const int8_t *Wq, const float *Ws,
                           const int8_t *Xq, const float *Xs, int T, int n, int gs, int r0,
                           int r1) {
    int ng = n / gs;
    for (int i = r0; i < r1; i++) {
        const int8_t *w = Wq + (size_t)i * n;
        const float *ws = Ws + (size_t)i * ng;
        for (int t = 0; t < T; t++) {
            const int8_t *x = Xq + (size_t)t * n;
            const float *xs = Xs + (size_t)t * ng;
            float sum = 0.0f;
            for (int g = 0; g < ng; g++) {
                int32_t isum = 0;
                for (int j = g * gs; j < (g + 1) * gs; j++) isum += (int32_t)w[j] * (int32_t)x[j];
                sum += (float)isum * (ws[g] * xs[g]);
            }
            out[(size_t)t * ldo + i] = sum;
        }
    }
}

static const ac_kernels scalar_kernels = {"scalar", gemm_f32_scalar, gemm_q8_scalar, weighted_sum_scalar,
                                          ac_quantize_q8};

/* ======================================================================== AVX2 + FMA set */

#if defined(__x86_64__)

#define AVX2_FN __attribute__((target("avx2,fma")))
/* Register-tile helpers are always inlined with constant tile sizes, so their small loops
 * unroll fully and the accumulator arrays live in registers. */
#define AVX2_TILE static inline __attribute__((target("avx2,fma"), always_inline))

/* Same order as hsum8: (l0+l4, l1+l5, l2+l6, l3+l7) -> ((l0+l4)+(l2+l6), (l1+l5)+(l3+l7)) -> sum. */
AVX2_TILE float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Columns [0, 8B) of the weighted sum, kept in B registers over all T rows (one pass over V
 * instead of a load and store of out per row). */
AVX2_TILE void weighted_block(int B, float *out, const float *a, const float *V, int ldv, int T) {
    __m256 acc[4];
    for (int b = 0; b < B; b++) acc[b] = _mm256_setzero_ps();
    for (int t = 0; t < T; t++) {
        __m256 at = _mm256_set1_ps(a[t]);
        for (int b = 0; b < B; b++)
            acc[b] = _mm256_fmadd_ps(at, _mm256_loadu_ps(V + (size_t)t * ldv + 8 * b), acc[b]);
    }
    for (int b = 0; b < B; b++) _mm256_storeu_ps(out + 8 * b, acc[b]);
}

AVX2_FN static void weighted_sum_avx2(float *out, const float *a, const float *V, int ldv, int T, int n) {
    int j = 0;
    for (; j + 32 <= n; j += 32) weighted_block(4, out + j, a, V + j, ldv, T);
    for (; j + 8 <= n; j += 8) weighted_block(1, out + j, a, V + j, ldv, T);
    for (; j < n; j++) {
        float sum = 0.0f;
        for (int t = 0; t < T; t++) sum += a[t] * V[(size_t)t * ldv + j];
        out[j] = sum;
    }
}

/* ---------------------------------------------------------------- float32 GEMM */

/* Single-token decode (T = 1) reads every weight once, so it waits on memory, not on
 * arithmetic, and the hardware prefetcher alone does not keep up with it: the T = 1 kernels
 * also prefetch in software, about PREFETCH_BYTES ahead, in whole rows (so strided rows
 * such as the attention's key cache are fetched too).  Measured on the persona, 2-core AMD
 * EPYC (AVX2), medians of 11 interleaved runs: float32 walked one row at a time with the
 * prefetch decodes 1.5x (1 thread) to 1.7x (2 threads) faster than 4-row tiles without it,
 * and 1.3x faster than 2- or 4-row tiles with it; int8 (a quarter of the bytes, mostly in
 * L3) is best in 4-row tiles with the prefetch, 1.4-1.7x over the same without. */
#define PREFETCH_BYTES 8192

static int prefetch_rows(int row_bytes) { return (PREFETCH_BYTES + row_bytes - 1) / row_bytes; }

/* R weight rows x C tokens: R*C accumulators, each one dot product, updated once per
 * 8-float chunk of n.  4 x 3 uses 12 accumulators + 3 token vectors + 1 weight vector = the
 * 16 ymm registers, with 12 FMAs per 7 loads.  ahead > 0 prefetches rows ahead.. ahead+R-1
 * further on, one cache line per row every two chunks. */
AVX2_TILE void tile_f32(int R, int C, float *out, int ldo, const float *W, int ldw, const float *X,
                       int ldx, int n, int ahead) {
    __m256 acc[4][3];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 x[3];
        if (ahead && (j & 15) == 0)
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)(W + (size_t)(ahead + r) * ldw + j), _MM_HINT_T0);
        for (int c = 0; c < C; c++) x[c] = _mm256_loadu_ps(X + (size_t)c * ldx + j);
        for (int r = 0; r < R; r++) {
            __m256 w = _mm256_loadu_ps(W + (size_t)r * ldw + j);
            for (int c = 0; c < C; c++) acc[r][c] = _mm256_fmadd_ps(w, x[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float sum = hsum_avx2(acc[r][c]);
            for (int k = j; k < n; k++) sum += W[(size_t)r * ldw + k] * X[(size_t)c * ldx + k];
            out[(size_t)c * ldo + r] = sum;
        }
}

/* Products over several tokens (T > 1) read each weight row from memory once and then from
 * L1.  So that the first tile of a row group does not wait on memory, every tile of a group
 * first prefetches its share of the row group after next: a group's fetch is spread over the
 * tiles of the group before it.  Measured on persona-shaped products with cold weights, float32:
 * 1.4x at T = 16 and 1.3x at T = 64 over prefetching the whole group in its first tile;
 * end to end, batched decode (16 sequences) 1.09-1.17x and prefill 1.10-1.13x. */

/* Prefetches bytes [lo, hi) of each of R rows, row r at base + r * stride. */
AVX2_TILE void prefetch_share(int R, const void *base, size_t stride, int lo, int hi) {
    for (int r = 0; r < R; r++)
        for (int b = lo; b < hi; b += 64) _mm_prefetch((const char *)base + r * stride + b, _MM_HINT_T0);
}

/* Tile k of ntiles prefetches bytes [lo, hi) of rows of row_bytes bytes (whole cache lines). */
static void tile_share(int row_bytes, int k, int ntiles, int *lo, int *hi) {
    *lo = (int)((long long)row_bytes * k / ntiles) & ~63;
    *hi = k + 1 == ntiles ? row_bytes : (int)((long long)row_bytes * (k + 1) / ntiles) & ~63;
}

/* R rows against all T tokens, 3 at a time (the R rows stay in L1 while X streams); each
 * tile prefetches its share of the R rows 2R on. */
AVX2_TILE void rows_f32(int R, float *out, int ldo, const float *W, int ldw, const float *X,
                       int ldx, int T, int n) {
    int ntiles = (T + 2) / 3;
    for (int t = 0, k = 0; t < T; k++) {
        int lo, hi;
        tile_share(n * (int)sizeof(float), k, ntiles, &lo, &hi);
        prefetch_share(R, W + (size_t)(2 * R) * ldw, (size_t)ldw * sizeof(float), lo, hi);
        float *o = out + (size_t)t * ldo;
        const float *x = X + (size_t)t * ldx;
        if (T - t >= 3) tile_f32(R, 3, o, ldo, W, ldw, x, ldx, n, 0);
        else if (T - t == 2) tile_f32(R, 2, o, ldo, W, ldw, x, ldx, n, 0);
        else tile_f32(R, 1, o, ldo, W, ldw, x, ldx, n, 0);
        t += T - t >= 3 ? 3 : T - t;
    }
}

AVX2_FN static void gemm_f32_avx2(float *out, int ldo, const float *W, int ldw, const float *X,
                                  int ldx, int T, int n, int r0, int r1) {
    int i = r0;
    if (T == 1) {
        int ahead = prefetch_rows(n * (int)sizeof(float));
        for (; i < r1; i++) tile_f32(1, 1, out + i, ldo, W + (size_t)i * ldw, ldw, X, ldx, n, ahead);
        return;
    }
    for (; i + 4 <= r1; i += 4) rows_f32(4, out + i, ldo, W + (size_t)i * ldw, ldw, X, ldx, T, n);
    for (; i < r1; i++) rows_f32(1, out + i, ldo, W + (size_t)i * ldw, ldw, X, ldx, T, n);
}

/* ---------------------------------------------------------------- int8 GEMM */

/* The 8 int32 partial sums of the 32 products w[k] * x[k]: maddubs needs an unsigned left
 * operand, so it gets |w| and x carries w's sign (x * sign(w)); pairs of int16 products
 * (at most 2 * 127 * 127, no saturation for quantized values) then widen to int32. */
AVX2_TILE __m256i dot32_q8(__m256i abs_w, __m256i w, __m256i x) {
    __m256i p16 = _mm256_maddubs_epi16(abs_w, _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

/* R weight rows x C tokens of int8; each 32-value chunk's int32 lane sums are converted to
 * float and accumulated scaled by w_scale * x_scale of their group.  Callers pass gs as the
 * constant 32 where they can (then k / gs is a shift and the loop a single stream of chunks).
 * ahead > 0 prefetches the quantized rows and scales ahead rows further on, as tile_f32. */
AVX2_TILE void tile_q8(int R, int C, float *out, int ldo, const int8_t *Wq, const float *Ws,
                       const int8_t *Xq, const float *Xs, int n, int gs, int ahead) {
    int ng = n / gs;
    if (ahead)
        for (int r = 0; r < R; r++) _mm_prefetch((const char *)(Ws + (size_t)(ahead + r) * ng), _MM_HINT_T0);
    __m256 acc[4][2];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
    for (int k = 0; k < n; k += 32) {
        int g = k / gs;
        if (ahead && (k & 63) == 0)
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)(Wq + (size_t)(ahead + r) * n + k), _MM_HINT_T0);
        __m256i x[2];
        __m256 xs[2];
        for (int c = 0; c < C; c++) {
            x[c] = _mm256_loadu_si256((const __m256i *)(Xq + (size_t)c * n + k));
            xs[c] = _mm256_broadcast_ss(Xs + (size_t)c * ng + g);
        }
        for (int r = 0; r < R; r++) {
            __m256i w = _mm256_loadu_si256((const __m256i *)(Wq + (size_t)r * n + k));
            __m256i abs_w = _mm256_sign_epi8(w, w);
            __m256 ws = _mm256_broadcast_ss(Ws + (size_t)r * ng + g);
            for (int c = 0; c < C; c++) {
                __m256 d = _mm256_cvtepi32_ps(dot32_q8(abs_w, w, x[c]));
                acc[r][c] = _mm256_fmadd_ps(d, _mm256_mul_ps(ws, xs[c]), acc[r][c]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) out[(size_t)c * ldo + r] = hsum_avx2(acc[r][c]);
}

/* Rows [r0, r1) against all T tokens: tiles of 4 rows x 2 tokens; ahead as in tile_q8. */
AVX2_TILE void gemm_q8_tiles(float *out, int ldo, const int8_t *Wq, const float *Ws, const int8_t *Xq,
                             const float *Xs, int T, int n, int gs, int r0, int r1, int ahead) {
    int ng = n / gs;
    for (int i = r0; i < r1;) {
        int R = r1 - i >= 4 ? 4 : 1;
        const int8_t *w = Wq + (size_t)i * n;
        const float *ws = Ws + (size_t)i * ng;
        for (int t = 0; t < T;) {
            float *o = out + (size_t)t * ldo + i;
            const int8_t *x = Xq + (size_t)t * n;
            const float *xs = Xs + (size_t)t * ng;
            int pf = t == 0 ? ahead : 0;
            if (T - t >= 2 && R == 4) tile_q8(4, 2, o, ldo, w, ws, x, xs, n, gs, pf);
            else if (T - t >= 2) tile_q8(1, 2, o, ldo, w, ws, x, xs, n, gs, pf);
            else if (R == 4) tile_q8(4, 1, o, ldo, w, ws, x, xs, n, gs, pf);
            else tile_q8(1, 1, o, ldo, w, ws, x, xs, n, gs, pf);
            t += T - t >= 2 ? 2 : 1;
        }
        i += R;
    }
}

AVX2_FN static void gemm_q8_avx2(float *out, int ldo, const int8_t *Wq, const float *Ws,
                                 const int8_t *Xq, const float *Xs, int T, int n, int gs, int r0,
                                 int r1) {
    if (gs % 32) { /* groups that are not whole 32-byte vectors: the portable kernel */
        gemm_q8_scalar(out, ldo, Wq, Ws, Xq, Xs, T, n, gs, r0, r1);
        return;
    }
    /* decode prefetches about PREFETCH_BYTES ahead; with more tokens a row group takes
     * longer, and two groups (8 rows) on is far enough (int8 weights are a quarter of the
     * bytes and mostly stay in L3: rows_f32's spread prefetch measured no faster here) */
    int ahead = T == 1 ? prefetch_rows(n) : 8;
    if (gs == 32) gemm_q8_tiles(out, ldo, Wq, Ws, Xq, Xs, T, n, 32, r0, r1, ahead);
    else gemm_q8_tiles(out, ldo, Wq, Ws, Xq, Xs, T, n, gs, r0, r1, ahead);
}

/* ---------------------------------------------------------------- int8 quantization */

/* Same arithmetic as ac_quantize_q8, 8 lanes at a time: the maximum and the division are
 * exact, NaN quotients become 0 before the clamp, and rounding is to nearest even (the
 * default mode nearbyintf uses), so the results are bitwise equal. */
AVX2_FN static void quantize_q8_avx2(int8_t *q, float *s, const float *x, int n, int gs) {
    if (gs % 32) {
        ac_quantize_q8(q, s, x, n, gs);
        return;
    }
    const __m256 sign = _mm256_set1_ps(-0.0f), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int g = 0; g < n / gs; g++) {
        const float *xg = x + (size_t)g * gs;
        int8_t *qg = q + (size_t)g * gs;
        __m256 amax = _mm256_setzero_ps();
        for (int j = 0; j < gs; j += 8) /* max_ps returns its 2nd operand for a NaN 1st: skipped */
            amax = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(xg + j)), amax);
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float scale = _mm_cvtss_f32(m4) / 127.0f;
        s[g] = scale;
        if (!(scale > 0.0f)) {
            memset(qg, 0, (size_t)gs);
            continue;
        }
        __m256 vs = _mm256_set1_ps(scale);
        for (int j = 0; j < gs; j += 32) {
            __m256i i32[4];
            for (int k = 0; k < 4; k++) {
                __m256 v = _mm256_div_ps(_mm256_loadu_ps(xg + j + 8 * k), vs);
                v = _mm256_and_ps(v, _mm256_cmp_ps(v, v, _CMP_ORD_Q)); /* NaN -> 0 */
                v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
                i32[k] = _mm256_cvtps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            }
            /* the packs work per 128-bit lane; the permute restores element order */
            __m256i i16a = _mm256_packs_epi32(i32[0], i32[1]), i16b = _mm256_packs_epi32(i32[2], i32[3]);
            __m256i i8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(i16a, i16b), order);
            _mm256_storeu_si256((__m256i *)(qg + j), i8);
        }
    }
}

static const ac_kernels avx2_kernels = {"avx2", gemm_f32_avx2, gemm_q8_avx2, weighted_sum_avx2,
                                        quantize_q8_avx2};

#endif /* __x86_64__ */

/* ======================================================================== dispatch */

static const ac_kernels *g_kernels = &scalar_kernels;
static pthread_once_t g_kernels_once = PTHREAD_ONCE_INIT;

static void choose_kernels(void) {
    const char *forced = getenv("AC_KERNEL");
    if (forced && strcmp(forced, "scalar") == 0) return;
#if defined(__x86_64__)
    __builtin_cpu_init(); /* we may run before libgcc's own constructor has */
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) g_kernels = &avx2_kernels;
#endif
}

const ac_kernels *ac_kernels_get(void) {
    pthread_once(&g_kernels_once, choose_kernels);
    return g_kernels;
}
