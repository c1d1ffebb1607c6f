/*
 * kernels_avx2.c - the avx2 kernel set (AVX2 + FMA: 8-lane float32 sums, int8 products through
 * maddubs) and avx2-vnni, the same set with its int8 dot products in AVX-VNNI's vpdpbusd.
 *
 * Float sums keep kernels.c's lane structure (lane k of 8 takes the terms j = k mod 8, reduced
 * by hsum_avx2 in hsum8's order), so this set's float32 sums differ from scalar's only by FMA
 * rounding.  The two int8 dot products give the same exact int32 sums, which both add in the
 * scalar set's order, so their int8 products are the scalar set's bits.  Compiled per function
 * for its targets: the library needs no -mavx2.
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

/* The sums of a0..a3 (token t, rows 0-3) to out[0..3] and, when both, of b0..b3 (token t + 1)
 * to out[ldo..ldo+3], each reduced with exactly hsum_avx2's additions (lane k + lane k+4,
 * then + k+2, then + k+1), so every output has the bits it has on the one-token path, in 21
 * instructions instead of 8 x 6.  The tree pairs (a_r, b_r) first, which leaves token t's
 * four sums in the low half of the result and token t + 1's in the high half.  Against one
 * hsum_avx2 per output (bench/ab.c, the persona, both orders, 9-11 rounds, an Intel Xeon VM
 * with AC_KERNEL=avx2): prefill 1.15-1.18x on one thread (CPU time), 1.13-1.14x on two,
 * batched decode 1.07-1.11x. */
AVX2_TILE void store_tile_sums(float *out, int ldo, __m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 b0,
                               __m256 b1, __m256 b2, __m256 b3, int both) {
    /* lanes 0-3: a_r's k + k+4; lanes 4-7: b_r's */
    __m256 h0 = _mm256_add_ps(_mm256_permute2f128_ps(a0, b0, 0x20), _mm256_permute2f128_ps(a0, b0, 0x31));
    __m256 h1 = _mm256_add_ps(_mm256_permute2f128_ps(a1, b1, 0x20), _mm256_permute2f128_ps(a1, b1, 0x31));
    __m256 h2 = _mm256_add_ps(_mm256_permute2f128_ps(a2, b2, 0x20), _mm256_permute2f128_ps(a2, b2, 0x31));
    __m256 h3 = _mm256_add_ps(_mm256_permute2f128_ps(a3, b3, 0x20), _mm256_permute2f128_ps(a3, b3, 0x31));
    /* per half, floats 0-1: row 0's (k + k+4) + (k+2 + k+6) for k = 0, 1; floats 2-3: row 1's
     * (q1: rows 2 and 3) */
    __m256 q0 = _mm256_add_ps(_mm256_shuffle_ps(h0, h1, _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm256_shuffle_ps(h0, h1, _MM_SHUFFLE(3, 2, 3, 2)));
    __m256 q1 = _mm256_add_ps(_mm256_shuffle_ps(h2, h3, _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm256_shuffle_ps(h2, h3, _MM_SHUFFLE(3, 2, 3, 2)));
    /* per half, float r: row r's whole sum */
    __m256 sums = _mm256_add_ps(_mm256_shuffle_ps(q0, q1, _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm256_shuffle_ps(q0, q1, _MM_SHUFFLE(3, 1, 3, 1)));
    _mm_storeu_ps(out, _mm256_castps256_ps128(sums));
    if (both) _mm_storeu_ps(out + (size_t)ldo, _mm256_extractf128_ps(sums, 1));
}

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
    if (R == 4 && j == n) { /* a full-height tile and no leftover terms; with one token, the b
                              * operands repeat the a ones and are not stored */
        store_tile_sums(out, ldo, acc[0][0], acc[1][0], acc[2][0], acc[3][0], acc[0][C > 1], acc[1][C > 1],
                        acc[2][C > 1], acc[3][C > 1], C > 1);
        if (C == 3) store_tile_sums(out + 2 * (size_t)ldo, ldo, acc[0][2], acc[1][2], acc[2][2], acc[3][2],
                                    acc[0][2], acc[1][2], acc[2][2], acc[3][2], 0);
        return;
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

/* int8 matrices are packed at load for these sets, in blocks of PACK8_ROWS rows: first the
 * rows' values, 4 at a time (word j of the block = bytes 4j .. 4j+3 of its 8 rows, 32 bytes:
 * row r's at offset 4r, so one load holds a word of every row), then their scales by group
 * (8 floats per group), padded to a multiple of 64 bytes.  A broadcast word of x then meets
 * all 8 rows in one vector, and each lane sums its row's groups in order, one group at a
 * time: the scalar set's order, so the results are the scalar set's bits.  Rows past the
 * matrix's end are zeros.  (The row-layout kernel before it took 4 rows at a time, with 8
 * partial sums per row and a conversion, a scaling and a reduction of them per 32 values;
 * against it, bench/ab.c, the persona in int8, 2-core AMD EPYC Zen 3 (AVX2 only), both
 * orders: decode 1.44-1.45x on one thread and 1.34-1.55x on two, prefill 1.21-1.23x, batched
 * decode 1.08-1.14x.  Packing costs about 9 ms at load, mostly page faults.) */
#define PACK8_ROWS 8

static size_t pack8_block_bytes(int n, int gs) {
    size_t bytes = (size_t)PACK8_ROWS * n + (size_t)(n / gs) * PACK8_ROWS * sizeof(float);
    return (bytes + 63) & ~(size_t)63;
}

/* Groups of whole words (gs % 4 == 0, so n % 4 == 0) pack; other shapes stay in the row
 * layout, which the scalar kernel multiplies. */
size_t ac_packed_q8_bytes_avx2(int rows, int n, int gs) {
    if (gs % 4) return 0;
    return (size_t)((rows + PACK8_ROWS - 1) / PACK8_ROWS) * pack8_block_bytes(n, gs);
}

void ac_pack_q8_avx2(void *dst, const int8_t *Wq, const float *Ws, int rows, int n, int gs) {
    int ng = n / gs, words = n / 4;
    size_t block = pack8_block_bytes(n, gs), tail = block - (size_t)PACK8_ROWS * (n + 4 * ng);
    unsigned char *out = dst;
    for (int b = 0; b * PACK8_ROWS < rows; b++) { /* written in order, a block at a time */
        int in_block = rows - b * PACK8_ROWS < PACK8_ROWS ? rows - b * PACK8_ROWS : PACK8_ROWS;
        const int8_t *w = Wq + (size_t)b * PACK8_ROWS * n;
        const float *ws = Ws + (size_t)b * PACK8_ROWS * ng;
        for (int j = 0; j < words; j++, out += 4 * PACK8_ROWS) {
            for (int r = 0; r < in_block; r++) memcpy(out + 4 * r, w + (size_t)r * n + 4 * j, 4);
            memset(out + 4 * in_block, 0, 4 * (size_t)(PACK8_ROWS - in_block));
        }
        float *scale = (float *)out;
        for (int g = 0; g < ng; g++)
            for (int r = 0; r < PACK8_ROWS; r++) scale[g * PACK8_ROWS + r] = r < in_block ? ws[(size_t)r * ng + g] : 0.0f;
        out += (size_t)ng * PACK8_ROWS * sizeof(float);
        memset(out, 0, tail);
        out += tail;
    }
}

/* acc + the products w[k] * x[k] summed by 4 in int32 (lane l adds k = 4l .. 4l+3: in the
 * packed layout, a word of row l times the broadcast word of x).  Both instructions need an
 * unsigned left operand, so it gets |w| and x carries w's sign (x * sign(w)).  avx2: maddubs
 * adds pairs into int16 (at most 2 * 128 * 127, no saturation for quantized activations,
 * |x| <= 127), madd pairs of those into int32.  vnni: AVX-VNNI's vpdpbusd adds the four
 * products of a lane into acc in one instruction; it is written as inline assembly ({vex}: the
 * AVX-VNNI encoding, not AVX-512's) so that this tile keeps the avx2 target and the avx2 set
 * never contains the instruction. */
AVX2_TILE __m256i dot_add_q8(int vnni, __m256i acc, __m256i abs_w, __m256i w, __m256i x) {
    __m256i signed_x = _mm256_sign_epi8(x, w);
    if (vnni) {
        __asm__("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(abs_w), "x"(signed_x));
        return acc;
    }
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(abs_w, signed_x), _mm256_set1_epi16(1)));
}

/* The rows of one packed block (the lanes in store) for C tokens: token c's x at Xq + c * n,
 * its scales at Xs + c * ng.  A int32 accumulators per token over a group's words (added at
 * the end: exact), so that vpdpbusd's latency overlaps.  ahead > 0 prefetches that many bytes
 * further on in the packed matrix. */
#define PACK8_TILE_TOKENS 4
AVX2_TILE void packed8_tile(int vnni, int C, int A, float *out, int ldo, const unsigned char *blk,
                            const int8_t *Xq, const float *Xs, int n, int gs, __m256i store, int ahead) {
    int ng = n / gs, per_group = gs / 4;
    const __m256i *w = (const __m256i *)blk;
    const float *scale = (const float *)(blk + (size_t)PACK8_ROWS * n);
    __m256 acc[PACK8_TILE_TOKENS];
    for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
    for (int g = 0; g < ng; g++) {
        __m256i isum[PACK8_TILE_TOKENS][2];
        for (int c = 0; c < C; c++)
            for (int a = 0; a < A; a++) isum[c][a] = _mm256_setzero_si256();
        for (int j = 0; j < per_group; j += A)
            for (int a = 0; a < A && j + a < per_group; a++) {
                int word = g * per_group + j + a;
                if (ahead && (word & 1) == 0) _mm_prefetch((const char *)(w + word) + ahead, _MM_HINT_T0);
                __m256i wv = _mm256_load_si256(w + word);
                __m256i abs_w = _mm256_sign_epi8(wv, wv);
                for (int c = 0; c < C; c++) {
                    int32_t xw;
                    memcpy(&xw, Xq + (size_t)c * n + 4 * (size_t)word, sizeof xw);
                    isum[c][a] = dot_add_q8(vnni, isum[c][a], abs_w, wv, _mm256_set1_epi32(xw));
                }
            }
        __m256 s = _mm256_load_ps(scale + (size_t)g * PACK8_ROWS);
        for (int c = 0; c < C; c++) {
            __m256i total = A > 1 ? _mm256_add_epi32(isum[c][0], isum[c][1]) : isum[c][0];
            __m256 d = _mm256_cvtepi32_ps(total);
            acc[c] = _mm256_add_ps(acc[c], _mm256_mul_ps(d, _mm256_mul_ps(s, _mm256_broadcast_ss(Xs + (size_t)c * ng + g))));
        }
    }
    for (int c = 0; c < C; c++) _mm256_maskstore_ps(out + (size_t)c * ldo, store, acc[c]);
}

/* Rows [r0, r1) of a packed matrix for T tokens: each row block against all the tokens,
 * PACK8_TILE_TOKENS at a time. */
AVX2_TILE void gemm_q8_packed8(int vnni, float *out, int ldo, const unsigned char *P, const int8_t *Xq,
                               const float *Xs, int T, int n, int gs, int r0, int r1) {
    int ng = n / gs, A = vnni ? 2 : 1;
    size_t block = pack8_block_bytes(n, gs);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int b = r0 / PACK8_ROWS; b * PACK8_ROWS < r1; b++) {
        int lo = r0 - b * PACK8_ROWS, hi = r1 - b * PACK8_ROWS;
        __m256i store = _mm256_and_si256(_mm256_cmpgt_epi32(lane, _mm256_set1_epi32(lo - 1)),
                                         _mm256_cmpgt_epi32(_mm256_set1_epi32(hi), lane));
        const unsigned char *blk = P + (size_t)b * block;
        float *o = out + (size_t)b * PACK8_ROWS;
        for (int t = 0; t < T; t += PACK8_TILE_TOKENS) {
            const int8_t *x = Xq + (size_t)t * n;
            const float *xs = Xs + (size_t)t * ng;
            float *ot = o + (size_t)t * ldo;
            switch (T - t >= PACK8_TILE_TOKENS ? PACK8_TILE_TOKENS : T - t) { /* constant sizes */
            case 4: packed8_tile(vnni, 4, A, ot, ldo, blk, x, xs, n, gs, store, 0); break;
            case 3: packed8_tile(vnni, 3, A, ot, ldo, blk, x, xs, n, gs, store, 0); break;
            case 2: packed8_tile(vnni, 2, A, ot, ldo, blk, x, xs, n, gs, store, 0); break;
            default: packed8_tile(vnni, 1, A, ot, ldo, blk, x, xs, n, gs, store, T == 1 ? PREFETCH_BYTES : 0); break;
            }
        }
    }
}

/* Packed matrices (Ws NULL, see above) in gemm_q8_packed8, gs = 32, the default, in a copy
 * of its own with the group size a constant; shapes that stay in the row layout in the scalar
 * kernel (the same order). */
AVX2_TILE void gemm_q8_any(int vnni, float *out, int ldo, const int8_t *Wq, const float *Ws, const int8_t *Xq,
                           const float *Xs, int T, int n, int gs, int r0, int r1) {
    const unsigned char *P = (const unsigned char *)Wq;
    if (Ws) ac_gemm_q8_scalar(out, ldo, Wq, Ws, Xq, Xs, T, n, gs, r0, r1);
    else if (gs == 32) gemm_q8_packed8(vnni, out, ldo, P, Xq, Xs, T, n, 32, r0, r1);
    else gemm_q8_packed8(vnni, out, ldo, P, Xq, Xs, T, n, gs, r0, r1);
}

AVX2_FN void ac_gemm_q8_avx2(float *out, int ldo, const int8_t *Wq, const float *Ws, const int8_t *Xq,
                             const float *Xs, int T, int n, int gs, int r0, int r1) {
    gemm_q8_any(0, out, ldo, Wq, Ws, Xq, Xs, T, n, gs, r0, r1);
}

__attribute__((target("avx2,fma,avxvnni"))) static void gemm_q8_avx2_vnni(
    float *out, int ldo, const int8_t *Wq, const float *Ws, const int8_t *Xq, const float *Xs, int T,
    int n, int gs, int r0, int r1) {
    gemm_q8_any(1, out, ldo, Wq, Ws, Xq, Xs, T, n, gs, r0, r1);
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
                                    ac_quantize_q8_avx2, swiglu_avx2, ac_softmax_avx2, ac_packed_q8_bytes_avx2,
                                    ac_pack_q8_avx2};
const ac_kernels ac_kernels_avx2_vnni = {"avx2-vnni", gemm_f32_avx2, gemm_q8_avx2_vnni, weighted_sum_avx2,
                                         ac_quantize_q8_avx2, swiglu_avx2, ac_softmax_avx2,
                                         ac_packed_q8_bytes_avx2, ac_pack_q8_avx2};

#endif /* __x86_64__ */
