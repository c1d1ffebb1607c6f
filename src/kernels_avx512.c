/*
 * kernels_avx512.c - the avx512 kernel set (AVX-512F: 16-lane float32 sums; int8 products,
 * their packing, the int8 quantizer and softmax from the avx2 set) and avx512-vnni, the same
 * with its int8 products in 512-bit AVX-512 VNNI on weights packed for it (see "int8 GEMM"
 * below).
 *
 * Float sums: each dot product keeps 16 partial sums (lane k takes the terms j = k mod 16;
 * the last n mod 16 terms enter through a masked load, as zeros elsewhere), reduced in one
 * fixed order (hsum_avx512).  Every path (one token, several, any tile) computes an output
 * element with that one sequence, so the set's own bitwise promises hold; its float32 results
 * differ from avx2's by rounding (different partial sums).
 *
 * int8 products of avx512 are the avx2 set's kernel; avx512-vnni's sum each group whole
 * likewise, 16 rows at a time; both add the groups in the scalar set's order (its bits).
 */
#include "kernels.h"
#include "kernels_avx512.h"

#include <string.h>

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
                   * reads from L3 bound them) and 1.6x on one head's keys (kernel_bench -c 8),
                   * but 1.00x in int8 decode, 8% of whose time is the keys (bench/ab.c, Xeon) */
        int ahead = prefetch_rows(n * (int)sizeof(float));
        for (; i < r1; i++) tile_f32(1, 1, out + i, ldo, W + (size_t)i * ldw, ldw, X, ldx, n, ahead);
        return;
    }
    for (; i + TILE_ROWS <= r1; i += TILE_ROWS)
        rows_f32(TILE_ROWS, out + i, ldo, W + (size_t)i * ldw, ldw, X, ldx, T, n);
    for (; i < r1; i++) rows_f32(1, out + i, ldo, W + (size_t)i * ldw, ldw, X, ldx, T, n);
}

/* ---------------------------------------------------------------- int8 GEMM (AVX-512 VNNI) */

/* The avx512-vnni set keeps its int8 matrices packed (the layout: kernels_avx512.h).  One
 * vpdpbusd of vector j against word j of x broadcast adds that word's four products to every
 * row of the block at once, exactly in int32, and a group's sums for 16 rows come out in 16
 * lanes with no reduction; the offset adds 128 * (the group's sum of x), the same for every
 * row, so the sums start from minus that.  Each group is then added in the scalar set's order,
 * sum += (float)isum * (w_scale * x_scale): this set's int8 GEMM gives the scalar set's bits
 * (as avx512-amx's), on every path.  (The row-layout kernel before it kept the avx2 set's 8
 * partial sums per chunk, about 8 instructions per 64 weight bytes; against it, bench/ab.c, the
 * persona in int8, 2-core AMD EPYC Zen 5: decode 1.29x, 1.23x with 2 threads, prefill 1.32x,
 * batched decode 1.19x; the products alone, kernel_bench, 1.1-1.5x for one token, 2-3x for 16
 * and 64.  Tiles of 8 tokens instead of 4: prefill 0.97x, batched 1.09x.) */

/* x's group sums are computed once per call for up to this many values (token count times
 * groups); matrices with more groups than that stay in the row layout (the scalar kernel). */
#define PACK_SUMS 8192

size_t ac_packed_q8_bytes_avx512_vnni(int rows, int n, int gs) {
    if (gs % 4 || n / gs > PACK_SUMS) return 0;
    return (size_t)((rows + PACK_ROWS - 1) / PACK_ROWS) * packed_block_bytes(n, gs);
}

void ac_pack_q8_avx512_vnni(void *dst, const int8_t *Wq, const float *Ws, int rows, int n, int gs) {
    int ng = n / gs, words = n / 4;
    unsigned char *blk = dst;
    for (int b = 0; b * PACK_ROWS < rows; b++, blk += packed_block_bytes(n, gs)) {
        float *scale = (float *)(blk + (size_t)PACK_ROWS * n);
        for (int r = 0; r < PACK_ROWS; r++) {
            int row = b * PACK_ROWS + r;
            const int8_t *w = Wq + (size_t)(row < rows ? row : 0) * n;
            for (int j = 0; j < words; j++)
                for (int k = 0; k < 4; k++)
                    blk[((size_t)j * PACK_ROWS + r) * 4 + k] = row < rows ? (unsigned char)(w[4 * j + k] ^ 0x80) : 0x80;
            for (int g = 0; g < ng; g++)
                scale[(size_t)g * PACK_ROWS + r] = row < rows ? Ws[(size_t)row * ng + g] : 0.0f;
        }
    }
}

/* sums[t * ng + g] = 128 * (group g's sum of token t's values), for T tokens. */
VNNI512_TILE void offset_sums(int32_t *sums, const int8_t *Xq, int T, int n, int gs) {
    int ng = n / gs;
    const __m512i ones = _mm512_set1_epi8(1);
    for (int t = 0; t < T; t++)
        for (int g = 0; g < ng; g++) {
            const int8_t *x = Xq + (size_t)t * n + (size_t)g * gs;
            __m512i acc = _mm512_setzero_si512();
            int k = 0;
            for (; k + 64 <= gs; k += 64) acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512(x + k));
            if (k < gs) /* the last 4-60 bytes */
                acc = _mm512_dpbusd_epi32(acc, ones, _mm512_maskz_loadu_epi8(((__mmask64)1 << (gs - k)) - 1, x + k));
            sums[t * ng + g] = 128 * _mm512_reduce_add_epi32(acc);
        }
}

/* Rows of one packed block (the lanes of store) for C tokens (C <= PACKED_TILE_TOKENS): token
 * c's x at Xq + c * n, its scales at Xs + c * ng, its offset sums at sums + c * ng; A int32
 * accumulators per token over a group's words (added at the end: exact).  ahead > 0 prefetches
 * that many bytes further on in the packed matrix. */
#define PACKED_TILE_TOKENS 4
VNNI512_TILE void packed_tile(int C, int A, float *out, int ldo, const unsigned char *blk, const int8_t *Xq,
                              const float *Xs, const int32_t *sums, int n, int gs, __mmask16 store, int ahead) {
    int ng = n / gs, per_group = gs / 4;
    const __m512i *w = (const __m512i *)blk;
    const float *scale = (const float *)(blk + (size_t)PACK_ROWS * n);
    __m512 acc[PACKED_TILE_TOKENS];
    for (int c = 0; c < C; c++) acc[c] = _mm512_setzero_ps();
    for (int g = 0; g < ng; g++) {
        __m512i isum[PACKED_TILE_TOKENS][4];
        for (int c = 0; c < C; c++) {
            isum[c][0] = _mm512_set1_epi32(-sums[(size_t)c * ng + g]);
            for (int a = 1; a < A; a++) isum[c][a] = _mm512_setzero_si512();
        }
        for (int j = 0; j < per_group; j += A)
            for (int a = 0; a < A && j + a < per_group; a++) {
                int word = g * per_group + j + a;
                if (ahead) _mm_prefetch((const char *)(w + word) + ahead, _MM_HINT_T0);
                __m512i wv = _mm512_load_si512(w + word);
                for (int c = 0; c < C; c++) {
                    int32_t xw;
                    memcpy(&xw, Xq + (size_t)c * n + 4 * (size_t)word, sizeof xw);
                    isum[c][a] = _mm512_dpbusd_epi32(isum[c][a], wv, _mm512_set1_epi32(xw));
                }
            }
        __m512 s = _mm512_load_ps(scale + (size_t)g * PACK_ROWS);
        for (int c = 0; c < C; c++) {
            __m512i total = isum[c][0];
            for (int a = 1; a < A; a++) total = _mm512_add_epi32(total, isum[c][a]);
            __m512 d = _mm512_cvtepi32_ps(total);
            acc[c] = _mm512_add_ps(acc[c], _mm512_mul_ps(d, _mm512_mul_ps(s, _mm512_set1_ps(Xs[(size_t)c * ng + g]))));
        }
    }
    for (int c = 0; c < C; c++) _mm512_mask_storeu_ps(out + (size_t)c * ldo, store, acc[c]);
}

/* Rows [r0, r1) of a packed matrix for T tokens: token chunks whose offset sums fit PACK_SUMS,
 * each row block against all the chunk's tokens, PACKED_TILE_TOKENS at a time (one token:
 * four accumulators per group, several: two). */
VNNI512_TILE void gemm_q8_packed(float *out, int ldo, const unsigned char *P, const int8_t *Xq, const float *Xs, int T,
                                 int n, int gs, int r0, int r1) {
    int ng = n / gs, chunk = PACK_SUMS / ng;
    size_t block = packed_block_bytes(n, gs);
    int32_t sums[PACK_SUMS];
    for (int t0 = 0; t0 < T; t0 += chunk) {
        int tokens = T - t0 < chunk ? T - t0 : chunk;
        offset_sums(sums, Xq + (size_t)t0 * n, tokens, n, gs);
        for (int b = r0 / PACK_ROWS; b * PACK_ROWS < r1; b++) {
            __mmask16 store = block_lanes(b, r0, r1);
            const unsigned char *blk = P + (size_t)b * block;
            float *o = out + (size_t)t0 * ldo + (size_t)b * PACK_ROWS;
            for (int t = 0; t < tokens; t += PACKED_TILE_TOKENS) {
                const int8_t *x = Xq + (size_t)(t0 + t) * n;
                const float *xs = Xs + (size_t)(t0 + t) * ng;
                const int32_t *sm = sums + (size_t)t * ng;
                float *ot = o + (size_t)t * ldo;
                switch (tokens - t >= PACKED_TILE_TOKENS ? PACKED_TILE_TOKENS : tokens - t) { /* constant sizes */
                case 4: packed_tile(4, 2, ot, ldo, blk, x, xs, sm, n, gs, store, 0); break;
                case 3: packed_tile(3, 2, ot, ldo, blk, x, xs, sm, n, gs, store, 0); break;
                case 2: packed_tile(2, 2, ot, ldo, blk, x, xs, sm, n, gs, store, 0); break;
                default: packed_tile(1, 4, ot, ldo, blk, x, xs, sm, n, gs, store, T == 1 ? PREFETCH_BYTES : 0); break;
                }
            }
        }
    }
}

/* Packed matrices (Ws NULL, see above) and the row layout of shapes that stay unpacked both in
 * the scalar set's order. */
VNNI512_FN void ac_gemm_q8_avx512_vnni(float *out, int ldo, const int8_t *Wq, const float *Ws, const int8_t *Xq,
                                       const float *Xs, int T, int n, int gs, int r0, int r1) {
    if (Ws) ac_gemm_q8_scalar(out, ldo, Wq, Ws, Xq, Xs, T, n, gs, r0, r1);
    else if (gs == 32) gemm_q8_packed(out, ldo, (const unsigned char *)Wq, Xq, Xs, T, n, 32, r0, r1);
    else gemm_q8_packed(out, ldo, (const unsigned char *)Wq, Xq, Xs, T, n, gs, r0, r1);
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
                                      ac_quantize_q8_avx2, ac_swiglu_avx512, ac_softmax_avx2, ac_packed_q8_bytes_avx2,
                                      ac_pack_q8_avx2};
const ac_kernels ac_kernels_avx512_vnni = {"avx512-vnni", ac_gemm_f32_avx512, ac_gemm_q8_avx512_vnni,
                                           ac_weighted_sum_avx512, ac_quantize_q8_avx2, ac_swiglu_avx512,
                                           ac_softmax_avx2, ac_packed_q8_bytes_avx512_vnni, ac_pack_q8_avx512_vnni};

#endif /* __x86_64__ */
