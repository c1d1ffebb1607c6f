/*
 * kernels_avx512.c - the avx512 kernel set (AVX-512F: 16-lane float32 sums; int8, the int8
 * quantizer and softmax from the avx2 set) and avx512-vnni, the same with 512-bit AVX-512 VNNI
 * int8 products.
 *
 * Float sums: each dot product keeps 16 partial sums (lane k takes the terms j = k mod 16;
 * the last n mod 16 terms enter through a masked load, as zeros elsewhere), reduced in one
 * fixed order (hsum_avx512).  Every path (one token, several, any tile) computes an output
 * element with that one sequence, so the set's own bitwise promises hold; its float32 results
 * differ from avx2's by rounding (different partial sums).
 *
 * int8 products keep the avx2 set's order exactly (8 int32 lane sums per 32-value chunk,
 * converted and added to 8 float lanes with w_scale * x_scale, chunk after chunk) so their
 * results equal avx2's bit for bit; a 512-bit register carries two such 8-lane accumulators.
 */
#include "kernels.h"
#include "kernels_avx512.h"

#if defined(__x86_64__)

/* The low and high 8 lanes. */
AVX512_TILE __m256 low8(__m512 v) { return _mm512_castps512_ps256(v); }
AVX512_TILE __m256 high8(__m512 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }

/* 16 lanes to 8 (lane k + lane k + 8), then hsum_avx2's order. */
AVX512_TILE float hsum_avx512(__m512 v) { return hsum_avx2(_mm256_add_ps(low8(v), high8(v))); }

/* ---------------------------------------------------------------- weighted sum */

/* Columns [0, 16B) of Q queries' weighted sums (Q <= WEIGHTED_QUERIES) in Q x B registers:
 * the first T rows of V are read once for all Q queries, then query q takes its own last q
 * rows; every column is one chain of FMAs over t as in the avx2 set (the same bits), and the
 * last block takes only the lanes of mask.  (Four chains per column added at the end measured
 * 0.96-1.0x of one chain on a Xeon; one pass over V for head_size 48 instead of three, 0.96-1.0x
 * there and float32 prefill 1.02-1.03x on an AMD EPYC Zen 5: bench/ab.c -c, the persona.)  V is
 * prefetched about PREFETCH_BYTES ahead: in batched decode every sequence's cache comes from
 * memory (16 sequences' caches are ~57 MB), 1.04-1.06x (twice as far: 0.92x); decode the same. */
#define WEIGHTED_QUERIES 4
AVX512_TILE void weighted_block(int Q, int B, __mmask16 mask, float *out, int ldo, const float *a, int lda,
                                const float *V, int ldv, int T) {
    __m512 acc[WEIGHTED_QUERIES][4];
    for (int q = 0; q < Q; q++)
        for (int b = 0; b < B; b++) acc[q][b] = _mm512_setzero_ps();
    int ahead = prefetch_rows(ldv * (int)sizeof(float));
    for (int t = 0; t < T + Q - 1; t++) {
        const float *v = V + (size_t)t * ldv;
        for (int b = 0; b < B; b++) _mm_prefetch((const char *)(v + (size_t)ahead * ldv + 16 * b), _MM_HINT_T0);
        __m512 vb[4];
        for (int b = 0; b < B; b++) vb[b] = b + 1 < B ? _mm512_loadu_ps(v + 16 * b) : _mm512_maskz_loadu_ps(mask, v + 16 * b);
        for (int q = 0; q < Q; q++) {
            if (t >= T + q) continue; /* query q weighs rows t < T + q */
            __m512 at = _mm512_set1_ps(a[(size_t)q * lda + t]);
            for (int b = 0; b < B; b++) acc[q][b] = _mm512_fmadd_ps(at, vb[b], acc[q][b]);
        }
    }
    for (int q = 0; q < Q; q++) {
        float *o = out + (size_t)q * ldo;
        for (int b = 0; b + 1 < B; b++) _mm512_storeu_ps(o + 16 * b, acc[q][b]);
        _mm512_mask_storeu_ps(o + 16 * (B - 1), mask, acc[q][B - 1]);
    }
}

/* Columns [0, n) of Q queries' sums: 64 at a time, the rest of the whole vectors (a head of 48
 * for one) in one more pass over V, and the last n % 16 columns. */
AVX512_TILE void weighted_queries(int Q, float *out, int ldo, const float *a, int lda, const float *V, int ldv, int T,
                                  int n) {
    int j = 0;
    for (; j + 64 <= n; j += 64) weighted_block(Q, 4, 0xFFFF, out + j, ldo, a, lda, V + j, ldv, T);
    switch ((n - j) / 16) { /* a constant block count */
    case 3: weighted_block(Q, 3, 0xFFFF, out + j, ldo, a, lda, V + j, ldv, T); break;
    case 2: weighted_block(Q, 2, 0xFFFF, out + j, ldo, a, lda, V + j, ldv, T); break;
    case 1: weighted_block(Q, 1, 0xFFFF, out + j, ldo, a, lda, V + j, ldv, T); break;
    }
    j += (n - j) / 16 * 16;
    if (j < n) weighted_block(Q, 1, first_lanes(n - j), out + j, ldo, a, lda, V + j, ldv, T);
}

AVX512_FN void ac_weighted_sum_avx512(float *out, int ldo, const float *a, int lda, const float *V, int ldv, int T, int R,
                                      int n) {
    for (int r = 0; r < R; r += WEIGHTED_QUERIES) {
        float *o = out + (size_t)r * ldo;
        const float *ar = a + (size_t)r * lda;
        switch (R - r >= WEIGHTED_QUERIES ? WEIGHTED_QUERIES : R - r) { /* a constant query count */
        case WEIGHTED_QUERIES: weighted_queries(WEIGHTED_QUERIES, o, ldo, ar, lda, V, ldv, T + r, n); break;
        case 3: weighted_queries(3, o, ldo, ar, lda, V, ldv, T + r, n); break;
        case 2: weighted_queries(2, o, ldo, ar, lda, V, ldv, T + r, n); break;
        default: weighted_queries(1, o, ldo, ar, lda, V, ldv, T + r, n); break;
        }
    }
}

/* ---------------------------------------------------------------- float32 GEMM */

/* Products over several tokens go in tiles of TILE_ROWS weight rows x TILE_TOKENS tokens:
 * 4 x 4 keeps 16 accumulators, 4 token vectors and a weight vector in registers, 16 FMAs per
 * 8 loads.  Measured (bench/kernel_bench.c built -O3 like the library, persona shapes, T = 16
 * and 64, weights from L3): 4 x 4 66 GFLOP/s on average, 4 x 3 and 6 x 3 61-64, 2 x 8 55, 8 x 3
 * 39-46 (the compiler spills its 24 accumulators). */
#define TILE_ROWS 4
#define TILE_TOKENS 4

/* One level of a reduction tree over two 16-lane vectors a and b: the sum of the two shuffles
 * lo and hi of (a, b), each taking half its elements from a and half from b, so that every
 * result lane adds two lanes of one input.  REDUCE_QUARTERS shuffles 128-bit quarters
 * (shuffle_f32x4: quarters 0-1 from a, 2-3 from b), REDUCE_FLOATS floats within each quarter
 * (shuffle_ps: floats 0-1 from a, 2-3 from b). */
#define REDUCE_QUARTERS(a, b, lo, hi) _mm512_add_ps(_mm512_shuffle_f32x4(a, b, lo), _mm512_shuffle_f32x4(a, b, hi))
#define REDUCE_FLOATS(a, b, lo, hi) _mm512_add_ps(_mm512_shuffle_ps(a, b, lo), _mm512_shuffle_ps(a, b, hi))

/* The 16 sums of a full tile at once: acc[r][c] for r, c < 4 reduced with exactly
 * hsum_avx512's additions (lane k + lane k+8, then + k+4, + k+2, + k+1), so every output has
 * the bits it has on the one-token path, in 45 instructions instead of 16 x 9.  Fed in row-major
 * order, the tree leaves token c's 4 rows in quarter c of the result: one 4-float store each. */
_Static_assert(TILE_ROWS == 4 && TILE_TOKENS == 4, "store_tile_sums reduces a 4 x 4 tile");
AVX512_TILE void store_tile_sums(float *out, int ldo, __m512 acc[TILE_ROWS][TILE_TOKENS]) {
    const __m512 *a = &acc[0][0];
    __m512 half[8], quarter[4], pair[2];
    for (int i = 0; i < 8; i++) /* lanes 0-7: a[2i]'s k + k+8; lanes 8-15: a[2i+1]'s */
        half[i] = REDUCE_QUARTERS(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0), _MM_SHUFFLE(3, 2, 3, 2));
    for (int i = 0; i < 4; i++) /* quarter q: a[4i+q]'s k + k+4 */
        quarter[i] = REDUCE_QUARTERS(half[2 * i], half[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0), _MM_SHUFFLE(3, 1, 3, 1));
    for (int i = 0; i < 2; i++) /* quarter q, floats 0-1: a[8i+q]'s k + k+2; floats 2-3: a[8i+4+q]'s */
        pair[i] = REDUCE_FLOATS(quarter[2 * i], quarter[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0), _MM_SHUFFLE(3, 2, 3, 2));
    /* quarter q, float j: a[q + 4j]'s whole sum, i.e. token q, row j */
    __m512 sums = REDUCE_FLOATS(pair[0], pair[1], _MM_SHUFFLE(2, 0, 2, 0), _MM_SHUFFLE(3, 1, 3, 1));
    _mm_storeu_ps(out, _mm512_extractf32x4_ps(sums, 0));
    _mm_storeu_ps(out + (size_t)ldo, _mm512_extractf32x4_ps(sums, 1));
    _mm_storeu_ps(out + 2 * (size_t)ldo, _mm512_extractf32x4_ps(sums, 2));
    _mm_storeu_ps(out + 3 * (size_t)ldo, _mm512_extractf32x4_ps(sums, 3));
}

/* 16 floats at p, the lanes outside mask as zeros (a plain load for a constant full mask). */
AVX512_TILE __m512 load16(__mmask16 mask, const float *p) {
    return mask == 0xFFFF ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(mask, p);
}

/* Chunk j (16 floats, the lanes of mask) of R weight rows x C tokens into acc; ahead > 0
 * prefetches rows ahead.. ahead+R-1 further on, one cache line per row. */
AVX512_TILE void tile_chunk_f32(int R, int C, __m512 acc[TILE_ROWS][TILE_TOKENS], const float *W, int ldw,
                                const float *X, int ldx, int j, __mmask16 mask, int ahead) {
    __m512 x[TILE_TOKENS];
    if (ahead)
        for (int r = 0; r < R; r++) _mm_prefetch((const char *)(W + (size_t)(ahead + r) * ldw + j), _MM_HINT_T0);
    for (int c = 0; c < C; c++) x[c] = load16(mask, X + (size_t)c * ldx + j);
    for (int r = 0; r < R; r++) {
        __m512 w = load16(mask, W + (size_t)r * ldw + j);
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_fmadd_ps(w, x[c], acc[r][c]);
    }
}

/* R weight rows x C tokens, each accumulator one dot product updated once per 16-float chunk
 * of n: the whole chunks, then the tail chunk masked (so the loop over whole chunks computes
 * no mask: float32 prefill 1.13x, decode 1.02x, bench/ab.c -c, AMD EPYC Zen 5). */
AVX512_TILE void tile_f32(int R, int C, float *out, int ldo, const float *W, int ldw, const float *X,
                          int ldx, int n, int ahead) {
    __m512 acc[TILE_ROWS][TILE_TOKENS];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
    int whole = n & ~15;
    for (int j = 0; j < whole; j += 16) tile_chunk_f32(R, C, acc, W, ldw, X, ldx, j, 0xFFFF, ahead);
    if (whole < n) tile_chunk_f32(R, C, acc, W, ldw, X, ldx, whole, first_lanes(n - whole), ahead);
    if (R == TILE_ROWS && C == TILE_TOKENS) {
        store_tile_sums(out, ldo, acc);
        return;
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) out[(size_t)c * ldo + r] = hsum_avx512(acc[r][c]);
}

/* R rows against all T tokens, TILE_TOKENS at a time (the R rows stay in L1 while X
 * streams); each tile prefetches its share of the R rows 2R on (kernels_x86.h). */
AVX512_TILE void rows_f32(int R, float *out, int ldo, const float *W, int ldw, const float *X, int ldx,
                          int T, int n) {
    int ntiles = (T + TILE_TOKENS - 1) / TILE_TOKENS;
    for (int t = 0, k = 0; t < T; k++, t += TILE_TOKENS) {
        int lo, hi;
        tile_share(n * (int)sizeof(float), k, ntiles, &lo, &hi);
        prefetch_share(R, W + (size_t)(2 * R) * ldw, (size_t)ldw * sizeof(float), lo, hi);
        float *o = out + (size_t)t * ldo;
        const float *x = X + (size_t)t * ldx;
        switch (T - t >= TILE_TOKENS ? TILE_TOKENS : T - t) { /* a constant token count per tile */
        case TILE_TOKENS: tile_f32(R, TILE_TOKENS, o, ldo, W, ldw, x, ldx, n, 0); break;
        case 3: tile_f32(R, 3, o, ldo, W, ldw, x, ldx, n, 0); break;
        case 2: tile_f32(R, 2, o, ldo, W, ldw, x, ldx, n, 0); break;
        default: tile_f32(R, 1, o, ldo, W, ldw, x, ldx, n, 0); break;
        }
    }
}

AVX512_FN void ac_gemm_f32_avx512(float *out, int ldo, const float *W, int ldw, const float *X, int ldx, int T,
                                  int n, int r0, int r1) {
    int i = r0;
    if (T == 1) { /* one row at a time with the prefetch (kernels_x86.h).  16 rows at a time, their
                   * sums reduced together, measured the same on the weight matrices (their
                   * reads from L3 bound them) and 1.6x on one head's keys, too small a part of
                   * decode for the code (kernel_bench -c 8) */
        int ahead = prefetch_rows(n * (int)sizeof(float));
        for (; i < r1; i++) tile_f32(1, 1, out + i, ldo, W + (size_t)i * ldw, ldw, X, ldx, n, ahead);
        return;
    }
    for (; i + TILE_ROWS <= r1; i += TILE_ROWS)
        rows_f32(TILE_ROWS, out + i, ldo, W + (size_t)i * ldw, ldw, X, ldx, T, n);
    for (; i < r1; i++) rows_f32(1, out + i, ldo, W + (size_t)i * ldw, ldw, X, ldx, T, n);
}

/* ---------------------------------------------------------------- int8 GEMM (AVX-512 VNNI) */

/* The int32 lane sums of int8 products, 64 bytes at a time: lane l sums bytes 4l .. 4l+3, so
 * lanes 0-7 hold a 32-byte chunk's 8 sums exactly as avx2's dot32_q8 gives them, and lanes 8-15
 * another chunk's.  vpdpbusd multiplies unsigned by signed bytes: the weights go in offset by
 * 128 (w ^ 0x80 = w + 128 as an unsigned byte, offset_bytes), which adds 128 * (the lane's sum
 * of x), the same for every weight row: the sums start from minus that, computed once per
 * chunk of x (one more vpdpbusd), and come out exact.  (Offsetting x instead costs that
 * vpdpbusd per weight vector; measured, bench/ab.c, the persona in int8, 2-core AMD EPYC Zen 5:
 * prefill 1.10x, batched decode 1.03x, and with rows_tile_q8's scales decode 1.11x at one
 * thread, 1.31x at two.) */
VNNI512_TILE __m512i minus_weight_offset(__m512i x) {
    return _mm512_sub_epi32(_mm512_setzero_si512(),
                            _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8((char)0x80), x));
}

/* Two 8-float vectors side by side. */
VNNI512_TILE __m512 pair_halves(__m256 lo, __m256 hi) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1));
}

/* *lo in the low 8 lanes, *hi in the high 8. */
VNNI512_TILE __m512 pair_floats(const float *lo, const float *hi) { return pair_halves(_mm256_set1_ps(*lo), _mm256_set1_ps(*hi)); }

/* Stores the two 8-lane sums of acc: the low one to *lo, the high one to *hi unless hi is NULL. */
VNNI512_TILE void store_pair(float *lo, float *hi, __m512 acc) {
    *lo = hsum_avx2(low8(acc));
    if (hi) *hi = hsum_avx2(high8(acc));
}

/* Tiles: decode, Q8_DECODE_PAIRS row pairs; more tokens, Q8_ROWS rows x Q8_PAIRS token pairs.
 * Measured (bench/kernel_bench.c built -O3 like the library, persona shapes, weights from L3):
 * decode (rows_tile_q8 below, 2-core AMD EPYC Zen 5) 4 pairs 77-130 GOP/s, 6 or 8 about the
 * same, 2 pairs 65-115, the earlier kernel (a second vpdpbusd per weight vector for its offset,
 * scales multiplied chunk by chunk) 62-84; T = 16 and 64 (Xeon): 8 x 2 98-100, 6 x 2 95, 4 x 4
 * 92-96, 8 x 1 86-94, 4 x 2 77-93, 4 x 3 83-87. */
#define Q8_DECODE_PAIRS 4
#define Q8_ROWS 8
#define Q8_PAIRS 2

/* One token, P pairs of weight rows: pair p holds rows 2p (low lanes) and 2p + 1 (high lanes),
 * rows >= R repeat row R - 1 (and are not stored).  ahead > 0 prefetches as tile_q8 in avx2.
 * The scales w_scale * x_scale are multiplied SCALE_GROUPS groups at a time (the same
 * products) and each chunk's pair of them is broadcast with one permute. */
#define SCALE_GROUPS 8
VNNI512_TILE void rows_tile_q8(int P, int R, float *out, const int8_t *Wq, const float *Ws, const int8_t *Xq,
                               const float *Xs, int n, int gs, int ahead) {
    int ng = n / gs;
    const int8_t *w_row[2 * Q8_DECODE_PAIRS];
    const float *ws_row[2 * Q8_DECODE_PAIRS];
    for (int r = 0; r < 2 * P; r++) {
        int row = r < R ? r : R - 1;
        w_row[r] = Wq + (size_t)row * n;
        ws_row[r] = Ws + (size_t)row * ng;
        if (ahead) _mm_prefetch((const char *)(Ws + (size_t)(ahead + row) * ng), _MM_HINT_T0);
    }
    const __m512i high_half = _mm512_set_epi32(8, 8, 8, 8, 8, 8, 8, 8, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 acc[Q8_DECODE_PAIRS];
    for (int p = 0; p < P; p++) acc[p] = _mm512_setzero_ps();
    for (int g0 = 0; g0 < ng; g0 += SCALE_GROUPS) {
        int groups = ng - g0 < SCALE_GROUPS ? ng - g0 : SCALE_GROUPS;
        __mmask8 loaded = (__mmask8)((1u << groups) - 1);
        __m256 xs = _mm256_maskz_loadu_ps(loaded, Xs + g0);
        __m512 scales[Q8_DECODE_PAIRS]; /* lane j: group g0 + j of row 2p; lane 8 + j: of row 2p + 1 */
        for (int p = 0; p < P; p++)
            scales[p] = _mm512_mul_ps(pair_halves(_mm256_maskz_loadu_ps(loaded, ws_row[2 * p] + g0),
                                                  _mm256_maskz_loadu_ps(loaded, ws_row[2 * p + 1] + g0)),
                                      pair_halves(xs, xs));
        for (int k = g0 * gs; k < (g0 + groups) * gs; k += 32) {
            if (ahead && (k & 63) == 0)
                for (int r = 0; r < R; r++) _mm_prefetch((const char *)(Wq + (size_t)(ahead + r) * n + k), _MM_HINT_T0);
            __m512i x = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(Xq + k)));
            __m512i start = minus_weight_offset(x);
            __m512i lane = _mm512_add_epi32(_mm512_set1_epi32(k / gs - g0), high_half);
            for (int p = 0; p < P; p++) {
                __m512i w = offset_bytes(pair_bytes(w_row[2 * p] + k, w_row[2 * p + 1] + k));
                __m512 d = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, w, x));
                acc[p] = _mm512_fmadd_ps(d, _mm512_permutexvar_ps(lane, scales[p]), acc[p]);
            }
        }
    }
    for (int p = 0; p < P; p++) store_pair(out + 2 * p, 2 * p + 1 < R ? out + 2 * p + 1 : NULL, acc[p]);
}

/* The 32 sums of a full tile (Q8_ROWS rows x Q8_PAIRS token pairs, C = 4 tokens) at once, with
 * exactly hsum_avx2's additions for each 8-lane half (lane k + k+4, then + k+2, + k+1): 42
 * shuffles and adds instead of 32 horizontal sums.  Fed in row-major order, the tree leaves
 * token t's rows 0-3 in quarter t of the first result and rows 4-7 in quarter t of the second. */
_Static_assert(Q8_ROWS == 8 && Q8_PAIRS == 2, "store_q8_tile_sums reduces an 8 x 2 tile");
VNNI512_TILE void store_q8_tile_sums(float *out, int ldo, __m512 acc[Q8_ROWS][Q8_PAIRS]) {
    const __m512 *a = &acc[0][0];
    __m512 fours[8], twos[4], sums[2];
    for (int i = 0; i < 8; i++) /* quarters: a[2i]'s two halves' k + k+4, then a[2i+1]'s */
        fours[i] = REDUCE_QUARTERS(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0), _MM_SHUFFLE(3, 1, 3, 1));
    for (int i = 0; i < 4; i++)
        twos[i] = REDUCE_FLOATS(fours[2 * i], fours[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0), _MM_SHUFFLE(3, 2, 3, 2));
    for (int i = 0; i < 2; i++)
        sums[i] = REDUCE_FLOATS(twos[2 * i], twos[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0), _MM_SHUFFLE(3, 1, 3, 1));
    for (int half = 0; half < 2; half++) { /* the quarter index must be a constant */
        float *o = out + 4 * half;
        _mm_storeu_ps(o, _mm512_extractf32x4_ps(sums[half], 0));
        _mm_storeu_ps(o + (size_t)ldo, _mm512_extractf32x4_ps(sums[half], 1));
        _mm_storeu_ps(o + 2 * (size_t)ldo, _mm512_extractf32x4_ps(sums[half], 2));
        _mm_storeu_ps(o + 3 * (size_t)ldo, _mm512_extractf32x4_ps(sums[half], 3));
    }
}

/* R weight rows, Q pairs of tokens: pair q holds tokens 2q (low lanes) and 2q + 1 (high),
 * tokens >= C repeat token C - 1 (and are not stored). */
VNNI512_TILE void tokens_tile_q8(int R, int Q, int C, float *out, int ldo, const int8_t *Wq, const float *Ws,
                                 const int8_t *Xq, const float *Xs, int n, int gs, int ahead) {
    int ng = n / gs;
    if (ahead)
        for (int r = 0; r < R; r++) _mm_prefetch((const char *)(Ws + (size_t)(ahead + r) * ng), _MM_HINT_T0);
    const int8_t *x_tok[2 * Q8_PAIRS];
    const float *xs_tok[2 * Q8_PAIRS];
    for (int c = 0; c < 2 * Q; c++) {
        int tok = c < C ? c : C - 1;
        x_tok[c] = Xq + (size_t)tok * n;
        xs_tok[c] = Xs + (size_t)tok * ng;
    }
    __m512 acc[Q8_ROWS][Q8_PAIRS];
    for (int r = 0; r < R; r++)
        for (int q = 0; q < Q; q++) acc[r][q] = _mm512_setzero_ps();
    for (int k = 0; k < n; k += 32) {
        int g = k / gs;
        if (ahead && (k & 63) == 0)
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)(Wq + (size_t)(ahead + r) * n + k), _MM_HINT_T0);
        __m512i x[Q8_PAIRS], start[Q8_PAIRS];
        __m512 xs[Q8_PAIRS];
        for (int q = 0; q < Q; q++) {
            x[q] = pair_bytes(x_tok[2 * q] + k, x_tok[2 * q + 1] + k);
            start[q] = minus_weight_offset(x[q]);
            xs[q] = pair_floats(xs_tok[2 * q] + g, xs_tok[2 * q + 1] + g);
        }
        for (int r = 0; r < R; r++) {
            __m512i w = offset_bytes(_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(Wq + (size_t)r * n + k))));
            __m512 ws = _mm512_set1_ps(Ws[(size_t)r * ng + g]);
            for (int q = 0; q < Q; q++) {
                __m512 d = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start[q], w, x[q]));
                acc[r][q] = _mm512_fmadd_ps(d, _mm512_mul_ps(ws, xs[q]), acc[r][q]);
            }
        }
    }
    if (R == Q8_ROWS && Q == Q8_PAIRS && C == 2 * Q8_PAIRS) {
        store_q8_tile_sums(out, ldo, acc);
        return;
    }
    for (int r = 0; r < R; r++)
        for (int q = 0; q < Q; q++)
            store_pair(out + (size_t)(2 * q) * ldo + r, 2 * q + 1 < C ? out + (size_t)(2 * q + 1) * ldo + r : NULL,
                       acc[r][q]);
}

/* Decode (T = 1): rows in tiles of Q8_DECODE_PAIRS pairs, prefetching about PREFETCH_BYTES
 * ahead.  More tokens: tiles of Q8_ROWS rows x Q8_PAIRS token pairs, prefetching 8 rows on (as
 * avx2's int8 kernel). */
VNNI512_TILE void gemm_q8_pairs(float *out, int ldo, const int8_t *Wq, const float *Ws, const int8_t *Xq,
                                const float *Xs, int T, int n, int gs, int r0, int r1) {
    int ng = n / gs;
    if (T == 1) {
        int ahead = prefetch_rows(n);
        int i = r0;
        for (; i + 2 * Q8_DECODE_PAIRS <= r1; i += 2 * Q8_DECODE_PAIRS)
            rows_tile_q8(Q8_DECODE_PAIRS, 2 * Q8_DECODE_PAIRS, out + i, Wq + (size_t)i * n, Ws + (size_t)i * ng, Xq, Xs, n,
                         gs, ahead);
        for (; i < r1; i += 2)
            rows_tile_q8(1, r1 - i >= 2 ? 2 : 1, out + i, Wq + (size_t)i * n, Ws + (size_t)i * ng, Xq, Xs, n, gs, ahead);
        return;
    }
    for (int i = r0; i < r1;) {
        int R = r1 - i >= Q8_ROWS ? Q8_ROWS : 1;
        const int8_t *w = Wq + (size_t)i * n;
        const float *ws = Ws + (size_t)i * ng;
        for (int t = 0; t < T; t += 2 * Q8_PAIRS) {
            float *o = out + (size_t)t * ldo + i;
            const int8_t *x = Xq + (size_t)t * n;
            const float *xs = Xs + (size_t)t * ng;
            int C = T - t >= 2 * Q8_PAIRS ? 2 * Q8_PAIRS : T - t, pf = t == 0 ? 8 : 0, Q = (C + 1) / 2;
            if (R == Q8_ROWS && Q == Q8_PAIRS) tokens_tile_q8(Q8_ROWS, Q8_PAIRS, C, o, ldo, w, ws, x, xs, n, gs, pf);
            else if (R == Q8_ROWS) tokens_tile_q8(Q8_ROWS, Q, C, o, ldo, w, ws, x, xs, n, gs, pf);
            else tokens_tile_q8(1, Q, C, o, ldo, w, ws, x, xs, n, gs, pf);
        }
        i += R;
    }
}

VNNI512_FN static void gemm_q8_avx512_vnni(float *out, int ldo, const int8_t *Wq, const float *Ws,
                                           const int8_t *Xq, const float *Xs, int T, int n, int gs, int r0,
                                           int r1) {
    if (gs % 32) ac_gemm_q8_scalar(out, ldo, Wq, Ws, Xq, Xs, T, n, gs, r0, r1);
    else if (gs == 32) gemm_q8_pairs(out, ldo, Wq, Ws, Xq, Xs, T, n, 32, r0, r1);
    else gemm_q8_pairs(out, ldo, Wq, Ws, Xq, Xs, T, n, gs, r0, r1);
}

/* ---------------------------------------------------------------- SwiGLU */

/* e^x in 16 lanes: exp_avx2's steps (kernels_x86.h), lane for lane the same results. */
AVX512_TILE __m512 exp_avx512(__m512 x) {
    __m512 xc = _mm512_min_ps(_mm512_set1_ps(EXP_MAX_IN), _mm512_max_ps(_mm512_set1_ps(EXP_UNDERFLOW), x));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(EXP_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), xc);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
    __m512 p = _mm512_set1_ps(exp_poly[0]);
    for (int k = 1; k < 6; k++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(exp_poly[k]));
    __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    y = _mm512_mul_ps(y, _mm512_castsi512_ps(bits));
    y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, _mm512_set1_ps(EXP_OVERFLOW), _CMP_GT_OQ),
                           _mm512_set1_ps(__builtin_inff()));
    return _mm512_maskz_mov_ps(~_mm512_cmp_ps_mask(x, _mm512_set1_ps(EXP_UNDERFLOW), _CMP_LT_OQ), y);
}

/* Element for element the avx2 set's SwiGLU (the same bits).  (Softmax is the avx2 set's: its
 * sum of 8 lanes keeps attention, and so int8 results, bitwise equal to the avx2 set's where
 * the float32 products agree.) */
AVX512_TILE __m512 swiglu16(__m512 v, __m512 g) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 e = exp_avx512(_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), _mm512_set1_epi32((int)0x80000000))));
    return _mm512_mul_ps(_mm512_mul_ps(v, _mm512_div_ps(one, _mm512_add_ps(one, e))), g);
}

AVX512_FN void ac_swiglu_avx512(float *h, const float *g, int n) {
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? 0xFFFF : first_lanes(n - i);
        _mm512_mask_storeu_ps(h + i, m, swiglu16(_mm512_maskz_loadu_ps(m, h + i), _mm512_maskz_loadu_ps(m, g + i)));
    }
}

const ac_kernels ac_kernels_avx512 = {"avx512", ac_gemm_f32_avx512, ac_gemm_q8_avx2, ac_weighted_sum_avx512,
                                      ac_quantize_q8_avx2, ac_swiglu_avx512, ac_softmax_avx2};
const ac_kernels ac_kernels_avx512_vnni = {"avx512-vnni", ac_gemm_f32_avx512, gemm_q8_avx512_vnni,
                                           ac_weighted_sum_avx512, ac_quantize_q8_avx2, ac_swiglu_avx512,
                                           ac_softmax_avx2};

#endif /* __x86_64__ */
