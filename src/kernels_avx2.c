/*
 * kernels_avx2.c - the avx2 kernel set (AVX2 + FMA: 8-lane float32 sums, int8 products through
 * maddubs) and avx2-vnni, the same set with its int8 dot products in AVX-VNNI's vpdpbusd.
 *
 * Float sums keep kernels.c's lane structure (lane k of 8 takes the terms j = k mod 8, reduced
 * by hsum_avx2 in hsum8's order), so this set differs from scalar only by FMA rounding.  The
 * two int8 dot products give the same exact int32 lane sums, so avx2 and avx2-vnni agree bit
 * for bit.  Compiled per function for its targets: the library needs no -mavx2.
 */
#include "kernels.h"
#include "kernels_x86.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__)

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

/* Every column is one chain of FMAs over t, as in every x86-64 set (the same bits). */
AVX2_FN static void weighted_sum_avx2(float *out, int ldo, const float *a, int lda, const float *V, int ldv, int T,
                                      int R, int n) {
    for (int r = 0; r < R; r++) { /* one query at a time */
        float *o = out + (size_t)r * ldo;
        const float *ar = a + (size_t)r * lda;
        int j = 0;
        for (; j + 32 <= n; j += 32) weighted_block(4, o + j, ar, V + j, ldv, T + r);
        for (; j + 8 <= n; j += 8) weighted_block(1, o + j, ar, V + j, ldv, T + r);
        for (; j < n; j++) {
            float sum = 0.0f;
            for (int t = 0; t < T + r; t++) sum = fmaf(ar[t], V[(size_t)t * ldv + j], sum);
            o[j] = sum;
        }
    }
}

/* ---------------------------------------------------------------- float32 GEMM */

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

/* R rows against all T tokens, 3 at a time (the R rows stay in L1 while X streams); each
 * tile prefetches its share of the R rows 2R on (kernels_x86.h). */
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

/* The 8 int32 lane sums of the 32 products w[k] * x[k] (lane l sums k = 4l .. 4l+3).  Both
 * instructions need an unsigned left operand, so it gets |w| and x carries w's sign
 * (x * sign(w)).  avx2: maddubs adds pairs into int16 (at most 2 * 128 * 127, no saturation
 * for quantized activations, |x| <= 127), madd pairs of those into int32.  vnni: AVX-VNNI's
 * vpdpbusd adds the four products of a lane into int32 in one instruction; it is written as
 * inline assembly ({vex}: the AVX-VNNI encoding, not AVX-512's) so that this tile keeps the
 * avx2 target and the avx2 set never contains the instruction. */
AVX2_TILE __m256i dot32_q8(int vnni, __m256i abs_w, __m256i w, __m256i x) {
    __m256i signed_x = _mm256_sign_epi8(x, w);
    if (vnni) {
        __m256i acc = _mm256_setzero_si256();
        __asm__("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(abs_w), "x"(signed_x));
        return acc;
    }
    return _mm256_madd_epi16(_mm256_maddubs_epi16(abs_w, signed_x), _mm256_set1_epi16(1));
}

/* R weight rows x C tokens of int8; each 32-value chunk's int32 lane sums are converted to
 * float and accumulated scaled by w_scale * x_scale of their group.  Callers pass gs as the
 * constant 32 where they can (then k / gs is a shift and the loop a single stream of chunks).
 * ahead > 0 prefetches the quantized rows and scales ahead rows further on, as tile_f32. */
AVX2_TILE void tile_q8(int vnni, int R, int C, float *out, int ldo, const int8_t *Wq, const float *Ws,
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
                __m256 d = _mm256_cvtepi32_ps(dot32_q8(vnni, abs_w, w, x[c]));
                acc[r][c] = _mm256_fmadd_ps(d, _mm256_mul_ps(ws, xs[c]), acc[r][c]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) out[(size_t)c * ldo + r] = hsum_avx2(acc[r][c]);
}

/* Rows [r0, r1) against all T tokens: tiles of 4 rows x 2 tokens; ahead as in tile_q8. */
AVX2_TILE void gemm_q8_tiles(int vnni, float *out, int ldo, const int8_t *Wq, const float *Ws,
                             const int8_t *Xq, const float *Xs, int T, int n, int gs, int r0, int r1,
                             int ahead) {
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
            if (T - t >= 2 && R == 4) tile_q8(vnni, 4, 2, o, ldo, w, ws, x, xs, n, gs, pf);
            else if (T - t >= 2) tile_q8(vnni, 1, 2, o, ldo, w, ws, x, xs, n, gs, pf);
            else if (R == 4) tile_q8(vnni, 4, 1, o, ldo, w, ws, x, xs, n, gs, pf);
            else tile_q8(vnni, 1, 1, o, ldo, w, ws, x, xs, n, gs, pf);
            t += T - t >= 2 ? 2 : 1;
        }
        i += R;
    }
}

/* decode prefetches about PREFETCH_BYTES ahead; with more tokens a row group takes longer,
 * and two groups (8 rows) on is far enough (int8 weights are a quarter of the bytes and
 * mostly stay in L3: rows_f32's spread prefetch measured no faster here).  gs = 32, the
 * default, gets its own copy with the group size a constant. */
AVX2_TILE void gemm_q8_x8(int vnni, float *out, int ldo, const int8_t *Wq, const float *Ws,
                          const int8_t *Xq, const float *Xs, int T, int n, int gs, int r0, int r1) {
    int ahead = T == 1 ? prefetch_rows(n) : 8;
    if (gs == 32) gemm_q8_tiles(vnni, out, ldo, Wq, Ws, Xq, Xs, T, n, 32, r0, r1, ahead);
    else gemm_q8_tiles(vnni, out, ldo, Wq, Ws, Xq, Xs, T, n, gs, r0, r1, ahead);
}

AVX2_FN void ac_gemm_q8_avx2(float *out, int ldo, const int8_t *Wq, const float *Ws, const int8_t *Xq,
                             const float *Xs, int T, int n, int gs, int r0, int r1) {
    if (gs % 32) /* groups that are not whole 32-byte vectors: the portable kernel */
        ac_gemm_q8_scalar(out, ldo, Wq, Ws, Xq, Xs, T, n, gs, r0, r1);
    else
        gemm_q8_x8(0, out, ldo, Wq, Ws, Xq, Xs, T, n, gs, r0, r1);
}

__attribute__((target("avx2,fma,avxvnni"))) static void gemm_q8_avx2_vnni(
    float *out, int ldo, const int8_t *Wq, const float *Ws, const int8_t *Xq, const float *Xs, int T,
    int n, int gs, int r0, int r1) {
    if (gs % 32)
        ac_gemm_q8_scalar(out, ldo, Wq, Ws, Xq, Xs, T, n, gs, r0, r1);
    else
        gemm_q8_x8(1, out, ldo, Wq, Ws, Xq, Xs, T, n, gs, r0, r1);
}

/* ---------------------------------------------------------------- int8 quantization */

/* Same arithmetic as ac_quantize_q8, 8 lanes at a time: the maximum and the division are
 * exact, NaN quotients become 0 before the clamp, and rounding is to nearest even (the
 * default mode nearbyintf uses), so the results are bitwise equal. */
AVX2_FN void ac_quantize_q8_avx2(int8_t *q, float *s, const float *x, int n, int gs) {
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

/* ---------------------------------------------------------------- SwiGLU, softmax */

/* The lanes [0, n) of 8 (n < 8): for the last, partial vector of an array. */
AVX2_TILE __m256i first_lanes(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

AVX2_TILE __m256 swiglu8(__m256 v, __m256 g) {
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 e = exp_avx2(_mm256_xor_ps(v, _mm256_set1_ps(-0.0f)));
    return _mm256_mul_ps(_mm256_mul_ps(v, _mm256_div_ps(one, _mm256_add_ps(one, e))), g);
}

AVX2_FN static void swiglu_avx2(float *h, const float *g, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(h + i, swiglu8(_mm256_loadu_ps(h + i), _mm256_loadu_ps(g + i)));
    if (i < n) {
        __m256i m = first_lanes(n - i);
        _mm256_maskstore_ps(h + i, m, swiglu8(_mm256_maskload_ps(h + i, m), _mm256_maskload_ps(g + i, m)));
    }
}

/* The maximum, the exponentials and their sum 8 lanes at a time (the sum's lanes reduced by
 * hsum_avx2), then the division. */
AVX2_FN float ac_softmax_avx2(float *x, int n) {
    int full = n & ~7;
    __m256i tail = first_lanes(n - full);
    __m256 vmax = _mm256_set1_ps(x[0]);
    for (int i = 0; i < full; i += 8) vmax = _mm256_max_ps(_mm256_loadu_ps(x + i), vmax);
    float max = hmax_avx2(vmax);
    for (int i = full; i < n; i++) max = x[i] > max ? x[i] : max;
    __m256 vm = _mm256_set1_ps(max), vsum = _mm256_setzero_ps();
    for (int i = 0; i < full; i += 8) {
        __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
        _mm256_storeu_ps(x + i, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    if (full < n) { /* masked-off lanes load as 0 and add exp(0 - max) nowhere: they are cleared */
        __m256 e = exp_avx2(_mm256_sub_ps(_mm256_maskload_ps(x + full, tail), vm));
        e = _mm256_and_ps(e, _mm256_castsi256_ps(tail));
        _mm256_maskstore_ps(x + full, tail, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum_avx2(vsum);
    __m256 vs = _mm256_set1_ps(sum);
    for (int i = 0; i < full; i += 8) _mm256_storeu_ps(x + i, _mm256_div_ps(_mm256_loadu_ps(x + i), vs));
    for (int i = full; i < n; i++) x[i] /= sum;
    return sum;
}

const ac_kernels ac_kernels_avx2 = {"avx2", gemm_f32_avx2, ac_gemm_q8_avx2, weighted_sum_avx2,
                                    ac_quantize_q8_avx2, swiglu_avx2, ac_softmax_avx2, NULL, NULL};
const ac_kernels ac_kernels_avx2_vnni = {"avx2-vnni", gemm_f32_avx2, gemm_q8_avx2_vnni, weighted_sum_avx2,
                                         ac_quantize_q8_avx2, swiglu_avx2, ac_softmax_avx2, NULL, NULL};

#endif /* __x86_64__ */
