/*
 * kernels_amx.c - the avx512-amx kernel set: the avx512 set (its float32 kernels, SwiGLU,
 * weighted sum, quantizer and softmax) with the int8 products on Intel AMX tiles (AMX-INT8).
 *
 * An AMX tile product (tdpbssd) multiplies int8 by int8 and sums in int32, exactly, whatever
 * the tile's shape.  So this set sums each group's products exactly and then adds the groups
 * in the scalar set's order: sum += (float)isum * (w_scale * x_scale), group after group.  Its
 * int8 GEMM therefore gives the scalar set's bits, as every set's does, on every path: one
 * token, several, any row range.
 *
 * Tiles (tdpbssd C += A . B): A holds 16 weight rows x kc bytes of a group, read in place with
 * the row stride n; B holds kc / 4 rows of 4-byte columns, one column per token: a block of 16
 * tokens transposed once per block into that layout (pack_tokens).  C comes back through memory
 * as 16 x 16 int32 sums and is scaled and added in float32 registers.  One token (decode) sums
 * its groups with AVX-512 VNNI instead (gemv_grouped), but for group sizes that are not
 * multiples of 32, which take the tiles as a block of one token.
 *
 * Linux hands out the tile registers only to a process that asks (arch_prctl
 * ARCH_REQ_XCOMP_PERM), which kernels.c does before it lists this set.
 */
#include "kernels.h"
#include "kernels_avx512.h"

#if defined(__x86_64__)

#include <stdint.h>
#include <string.h>

#define AMX_TARGET "avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8,avx2,fma"
#define AMX_FN __attribute__((target(AMX_TARGET)))
#define AMX_TILE static inline __attribute__((target(AMX_TARGET), always_inline))

/* A tile holds at most 16 rows of 64 bytes: 16 weight rows, and 16 tokens of int32 sums. */
#define AMX_ROWS 16
#define AMX_TOKENS 16
#define PACKED_STRIDE (4 * AMX_TOKENS) /* bytes per row of B and C: 16 tokens' 4 bytes, or int32 sums */
/* Products over several tokens transpose a block of 16 tokens into buffers on the stack: 16 x n
 * bytes and 16 scales per group; wider inputs, or more groups, take the scalar set's kernel
 * (the same bits, slower). */
#define AMX_MAX_N 2048
#define AMX_MAX_GROUPS 256

/* The tile registers this file uses: two sets (C += A . B), so that one group's products run
 * while the other's come back.  Plain numbers: gcc's tile intrinsics paste them into the
 * instruction's register name. */
#define TILE_C0 0
#define TILE_A0 1
#define TILE_B0 2
#define TILE_C1 3
#define TILE_A1 4
#define TILE_B1 5
#define TILE_C_REST 6 /* a row range's last rows, fewer than 16: C and A with that many rows */
#define TILE_A_REST 7

/* The 64-byte operand of ldtilecfg (palette 1): bytes per row and rows of each tile register. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static void set_tile(tile_config *c, int tile, int rows, int bytes) {
    c->rows[tile] = (uint8_t)rows;
    c->colsb[tile] = (uint16_t)bytes;
}

/* Both sets for kc-byte chunks: A 16 rows x kc bytes, B kc / 4 rows of 16 tokens' 4 bytes, C
 * 16 rows x 16 int32 sums; and the rest tiles for rest_rows (< 16, 0 = none) rows. */
AMX_FN static void configure_tiles(int kc, int rest_rows) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int set = 0; set <= TILE_C1 - TILE_C0; set += TILE_C1 - TILE_C0) {
        set_tile(&c, set + TILE_C0, AMX_ROWS, PACKED_STRIDE);
        set_tile(&c, set + TILE_A0, AMX_ROWS, kc);
        set_tile(&c, set + TILE_B0, kc / 4, PACKED_STRIDE);
    }
    if (rest_rows) {
        set_tile(&c, TILE_C_REST, rest_rows, PACKED_STRIDE);
        set_tile(&c, TILE_A_REST, rest_rows, kc);
    }
    _tile_loadconfig(&c);
}

/* The bytes per tile product: the largest multiple of 4 up to 64 that divides the group. */
static int chunk_bytes(int gs) {
    int kc = 64;
    while (gs % kc) kc -= 4;
    return kc;
}

/* Tile c = one group's exact products: the group's bytes of 16 weight rows at w (row stride n)
 * against the packed tokens at b, kc bytes at a time, through tiles a and bt. */
#define GROUP_PRODUCTS(c, a, bt, w, b)                                                              \
    do {                                                                                            \
        _tile_zero(c);                                                                              \
        for (int k = 0; k < gs; k += kc) {                                                          \
            _tile_loadd(a, (w) + k, n);                                                             \
            _tile_loadd(bt, (b) + (size_t)(k / 4) * AMX_TOKENS, PACKED_STRIDE);                     \
            _tile_dpbssd(c, a, bt);                                                                 \
        }                                                                                           \
    } while (0)

/* ---------------------------------------------------------------- one token */

/* One token (decode) has no use for a tile's 16 columns, and a one-column tile product waits on
 * its round trip through memory: with group sizes that are multiples of 32, AVX-512 VNNI sums
 * the groups instead (measured 1.2-1.3x one-column tiles; bench/ab.c -c, the persona in int8).
 * 16 rows at a time: the group's bytes go through vpdpbusd, accumulating in int32, and a tree
 * of integer adds (exact, so its order does not matter) leaves one sum per row.  The weights
 * take vpdpbusd's unsigned side (offset_bytes), so what comes back off is 128 * (the group's
 * sum of x), the same for every row.
 *
 * The tree (reduce_halves) takes 8 registers of two "halves" each (8 partial sums in lanes
 * 0-7 and 8 in lanes 8-15; half h = 2 * register + (lanes 8-15)) and leaves half h's sum in
 * lane LANE_OF(h). */
#define LANE_OF(h) (4 * ((h) % 4) + (h) / 4)

/* Integer lanes added, in float32-typed registers (for the float shuffles). */
#define ADD_I32(a, b) _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)))

AMX_TILE __m512i reduce_halves(const __m512 v[8]) {
    __m512 q[4], h[2];
    for (int i = 0; i < 4; i++) /* quarter j: half 4i + j's 4 partials */
        q[i] = ADD_I32(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int i = 0; i < 2; i++) /* quarter j: half 8i + j's 2 partials, then half 8i + 4 + j's */
        h[i] = ADD_I32(_mm512_shuffle_ps(q[2 * i], q[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                       _mm512_shuffle_ps(q[2 * i], q[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* quarter j: halves j, 4 + j, 8 + j, 12 + j */
    return _mm512_castps_si512(ADD_I32(_mm512_shuffle_ps(h[0], h[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                       _mm512_shuffle_ps(h[0], h[1], _MM_SHUFFLE(3, 1, 3, 1))));
}

/* One group: the 16 rows' sums of bytes [at, at + gs) against x, plus 128 * x's sum, lane r
 * row r.  Two rows to a register (halves: rows 2p and 2p + 1), 32 bytes at a time. */
AMX_TILE __m512i group_row_sums(const int8_t *const w_row[16], size_t at, const int8_t *x, int gs) {
    __m512i acc[8];
    for (int p = 0; p < 8; p++) acc[p] = _mm512_setzero_si512();
    for (int k = 0; k < gs; k += 32) {
        __m512i xk = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(x + k)));
        for (int p = 0; p < 8; p++)
            acc[p] = _mm512_dpbusd_epi32(acc[p], offset_bytes(pair_bytes(w_row[2 * p] + at + k, w_row[2 * p + 1] + at + k)), xk);
    }
    __m512 v[8];
    for (int p = 0; p < 8; p++) v[p] = _mm512_castsi512_ps(acc[p]);
    const __m512i by_row = _mm512_setr_epi32(LANE_OF(0), LANE_OF(1), LANE_OF(2), LANE_OF(3), LANE_OF(4), LANE_OF(5),
                                             LANE_OF(6), LANE_OF(7), LANE_OF(8), LANE_OF(9), LANE_OF(10), LANE_OF(11),
                                             LANE_OF(12), LANE_OF(13), LANE_OF(14), LANE_OF(15));
    return _mm512_permutexvar_epi32(by_row, reduce_halves(v));
}

/* Two groups of 32 bytes, [at, at + 64): sums[0] the first one's (as group_row_sums), sums[1]
 * the second's.  One row to a register (halves: its two groups), no 32-byte inserts. */
AMX_TILE void group_pair_row_sums(__m512i sums[2], const int8_t *const w_row[16], size_t at, const int8_t *x) {
    __m512i xk = _mm512_loadu_si512(x);
    __m512 v[16];
    for (int r = 0; r < 16; r++)
        v[r] = _mm512_castsi512_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), offset_bytes(_mm512_loadu_si512(w_row[r] + at)), xk));
    __m512i lo = reduce_halves(v), hi = reduce_halves(v + 8); /* half h: row h / 2 (+ 8 in hi), group h % 2 */
#define PAIR_LANE(r, group) ((r) < 8 ? LANE_OF(2 * (r) + (group)) : 16 + LANE_OF(2 * ((r) - 8) + (group)))
#define PAIR_INDEX(group)                                                                                            \
    _mm512_setr_epi32(PAIR_LANE(0, group), PAIR_LANE(1, group), PAIR_LANE(2, group), PAIR_LANE(3, group),             \
                      PAIR_LANE(4, group), PAIR_LANE(5, group), PAIR_LANE(6, group), PAIR_LANE(7, group),             \
                      PAIR_LANE(8, group), PAIR_LANE(9, group), PAIR_LANE(10, group), PAIR_LANE(11, group),           \
                      PAIR_LANE(12, group), PAIR_LANE(13, group), PAIR_LANE(14, group), PAIR_LANE(15, group))
    sums[0] = _mm512_permutex2var_epi32(lo, PAIR_INDEX(0), hi);
    sums[1] = _mm512_permutex2var_epi32(lo, PAIR_INDEX(1), hi);
#undef PAIR_INDEX
#undef PAIR_LANE
}

/* scale[16k + r] = the scale of group g0 + k of row r (the last row past rows), for k < 16 and
 * g0 + k < ng (0 for the groups past ng): 16 rows' scales transposed (a gather per group is
 * slower). */
AMX_TILE void lane_scales(float *scale, const float *Ws, int ng, int rows, int g0) {
    int count = ng - g0 < 16 ? ng - g0 : 16;
    __m512 r[16];
    for (int l = 0; l < 16; l++) r[l] = _mm512_maskz_loadu_ps(first_lanes(count), Ws + (size_t)(l < rows ? l : rows - 1) * ng + g0);
    transpose16(r);
    for (int k = 0; k < 16; k++) _mm512_store_ps(scale + 16 * k, r[k]); /* past count: zeros */
}

/* acc + group g's sums scaled: the scalar set's sum += isum * (w_scale * x_scale), lane by lane. */
AMX_TILE __m512 add_group(__m512 acc, __m512i sums, int32_t x_offset, const float *scale, float x_scale) {
    __m512 s = _mm512_mul_ps(_mm512_load_ps(scale), _mm512_set1_ps(x_scale));
    __m512 d = _mm512_cvtepi32_ps(_mm512_sub_epi32(sums, _mm512_set1_epi32(x_offset)));
    return _mm512_add_ps(acc, _mm512_mul_ps(d, s));
}

/* Rows [r0, r1) for one token, prefetching about PREFETCH_BYTES ahead (kernels_x86.h): each
 * group step fetches its share of a row tile's bytes that far on. */
AMX_TILE void gemv_grouped(float *out, const int8_t *Wq, const float *Ws, const int8_t *Xq, const float *Xs, int n,
                           int gs, int r0, int r1) {
    int ng = n / gs, ahead = prefetch_rows(n);
    int32_t x_offset[AMX_MAX_GROUPS]; /* 128 * each group's sum of x */
    for (int g = 0; g < ng; g++) {
        int32_t sum = 0;
        for (int j = 0; j < gs; j++) sum += Xq[(size_t)g * gs + j];
        x_offset[g] = 128 * sum;
    }
    float scale[16 * 16] __attribute__((aligned(64)));
    for (int i = r0; i < r1; i += 16) {
        int rows = r1 - i < 16 ? r1 - i : 16;
        const int8_t *w_row[16];
        for (int r = 0; r < 16; r++) w_row[r] = Wq + (size_t)(i + (r < rows ? r : rows - 1)) * n;
        __m512 acc = _mm512_setzero_ps();
        for (int g = 0; g < ng;) {
            if (g % 16 == 0) lane_scales(scale, Ws + (size_t)i * ng, ng, rows, g);
            /* group g's share of the 16 rows ahead (16 n bytes in all, contiguous) */
            const char *pf = (const char *)(Wq + (size_t)(i + ahead) * n) + (size_t)g * 16 * gs;
            for (int b = 0; b < 16 * gs; b += 64) _mm_prefetch(pf + b, _MM_HINT_T0);
            size_t at = (size_t)g * gs;
            if (gs == 32 && g + 1 < ng) { /* g is even here, so g and g + 1 share their block of scales */
                __m512i sums[2];
                group_pair_row_sums(sums, w_row, at, Xq + at);
                acc = add_group(acc, sums[0], x_offset[g], scale + 16 * (g % 16), Xs[g]);
                acc = add_group(acc, sums[1], x_offset[g + 1], scale + 16 * ((g + 1) % 16), Xs[g + 1]);
                g += 2;
            } else {
                acc = add_group(acc, group_row_sums(w_row, at, Xq + at, gs), x_offset[g], scale + 16 * (g % 16), Xs[g]);
                g += 1;
            }
        }
        _mm512_mask_storeu_ps(out + i, first_lanes(rows), acc);
    }
}

/* ---------------------------------------------------------------- several tokens */

/* The B operand for tokens [0, C) (C <= 16) of X (n bytes each): packed[j * 16 + t] = the
 * 4 bytes j of token t (zeros for t >= C); and their scales by group, packed_s[g * 16 + t]. */
AMX_TILE void pack_tokens(int32_t *packed, float *packed_s, const int8_t *Xq, const float *Xs, int C, int n,
                          int gs) {
    int words = n / 4, ng = n / gs;
    for (int j = 0; j < words; j += 16) {
        __mmask16 m = words - j >= 16 ? 0xFFFF : first_lanes(words - j);
        __m512 r[16];
        for (int t = 0; t < 16; t++)
            r[t] = t < C ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(m, Xq + (size_t)t * n + 4 * j)) : _mm512_setzero_ps();
        transpose16(r);
        for (int k = 0; k < 16 && j + k < words; k++) _mm512_store_ps(packed + (size_t)(j + k) * 16, r[k]);
    }
    for (int g = 0; g < ng; g++)
        for (int t = 0; t < 16; t++) packed_s[g * 16 + t] = t < C ? Xs[(size_t)t * ng + g] : 0.0f;
}

/* acc[r] += group g's sums of row r (lane t: token t), scaled: the scalar set's
 * sum += isum * (w_scale * x_scale), lane by lane.  Rows from `rows` on repeat the last row's
 * scale (they are not stored). */
AMX_TILE void add_group_sums(__m512 acc[AMX_ROWS], const int32_t *sums, const float *Ws, int ng, int g,
                             const float *packed_s, int rows) {
    __m512 x_scale = _mm512_load_ps(packed_s + g * AMX_TOKENS);
    for (int r = 0; r < AMX_ROWS; r++) {
        __m512 scale = _mm512_mul_ps(_mm512_set1_ps(Ws[(size_t)(r < rows ? r : rows - 1) * ng + g]), x_scale);
        __m512 d = _mm512_cvtepi32_ps(_mm512_load_si512(sums + r * AMX_TOKENS));
        acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(d, scale));
    }
}

/* 16 rows for the packed tokens, C of them stored: accumulator r holds row r, lane t token t;
 * transposed at the end so each token's rows store together.  Groups go in pairs, one per set
 * of tiles, each step prefetching its share of the next row tile (16 n bytes, contiguous). */
AMX_TILE void token_rows(int C, float *out, int ldo, const int8_t *Wq, const float *Ws, const int32_t *packed,
                         const float *packed_s, int n, int gs, int kc) {
    int ng = n / gs;
    int32_t sums[2][AMX_ROWS * AMX_TOKENS] __attribute__((aligned(64)));
    __m512 acc[AMX_ROWS];
    for (int r = 0; r < AMX_ROWS; r++) acc[r] = _mm512_setzero_ps();
    const char *next_tile = (const char *)(Wq + (size_t)AMX_ROWS * n);
    int g = 0;
    for (; g + 1 < ng; g += 2) {
        for (int b = 0; b < 2 * AMX_ROWS * gs; b += 64) _mm_prefetch(next_tile + (size_t)g * AMX_ROWS * gs + b, _MM_HINT_T0);
        GROUP_PRODUCTS(TILE_C0, TILE_A0, TILE_B0, Wq + (size_t)g * gs, packed + (size_t)g * gs / 4 * AMX_TOKENS);
        GROUP_PRODUCTS(TILE_C1, TILE_A1, TILE_B1, Wq + (size_t)(g + 1) * gs, packed + (size_t)(g + 1) * gs / 4 * AMX_TOKENS);
        _tile_stored(TILE_C0, sums[0], PACKED_STRIDE);
        _tile_stored(TILE_C1, sums[1], PACKED_STRIDE);
        add_group_sums(acc, sums[0], Ws, ng, g, packed_s, AMX_ROWS);
        add_group_sums(acc, sums[1], Ws, ng, g + 1, packed_s, AMX_ROWS);
    }
    if (g < ng) {
        GROUP_PRODUCTS(TILE_C0, TILE_A0, TILE_B0, Wq + (size_t)g * gs, packed + (size_t)g * gs / 4 * AMX_TOKENS);
        _tile_stored(TILE_C0, sums[0], PACKED_STRIDE);
        add_group_sums(acc, sums[0], Ws, ng, g, packed_s, AMX_ROWS);
    }
    transpose16(acc);
    for (int t = 0; t < C; t++) _mm512_storeu_ps(out + (size_t)t * ldo, acc[t]);
}

/* The last rows (< 16) of a range, one group at a time through the rest tiles. */
AMX_TILE void token_rest_rows(int rows, int C, float *out, int ldo, const int8_t *Wq, const float *Ws,
                              const int32_t *packed, const float *packed_s, int n, int gs, int kc) {
    int ng = n / gs;
    int32_t sums[AMX_ROWS * AMX_TOKENS] __attribute__((aligned(64)));
    memset(sums, 0, sizeof sums); /* the rows past `rows` stay 0 */
    __m512 acc[AMX_ROWS];
    for (int r = 0; r < AMX_ROWS; r++) acc[r] = _mm512_setzero_ps();
    for (int g = 0; g < ng; g++) {
        GROUP_PRODUCTS(TILE_C_REST, TILE_A_REST, TILE_B0, Wq + (size_t)g * gs, packed + (size_t)g * gs / 4 * AMX_TOKENS);
        _tile_stored(TILE_C_REST, sums, PACKED_STRIDE);
        add_group_sums(acc, sums, Ws, ng, g, packed_s, rows);
    }
    transpose16(acc);
    for (int t = 0; t < C; t++) _mm512_mask_storeu_ps(out + (size_t)t * ldo, first_lanes(rows), acc[t]);
}
#undef GROUP_PRODUCTS

/* ---------------------------------------------------------------- the GEMM */

/* Inputs too wide for the buffers take the scalar set's kernel, whose bits these are. */
AMX_FN static void gemm_q8_amx(float *out, int ldo, const int8_t *Wq, const float *Ws, const int8_t *Xq,
                               const float *Xs, int T, int n, int gs, int r0, int r1) {
    if (T == 1 && gs % 32 == 0 && n / gs <= AMX_MAX_GROUPS) { /* no buffer of n bytes: any width */
        gemv_grouped(out, Wq, Ws, Xq, Xs, n, gs, r0, r1);
        return;
    }
    if (n > AMX_MAX_N || n / gs > AMX_MAX_GROUPS || gs % 4) {
        ac_gemm_q8_scalar(out, ldo, Wq, Ws, Xq, Xs, T, n, gs, r0, r1);
        return;
    }
    int ng = n / gs, kc = chunk_bytes(gs), full_end = r0 + (r1 - r0) / AMX_ROWS * AMX_ROWS;
    configure_tiles(kc, r1 - full_end);
    int32_t packed[AMX_MAX_N / 4 * AMX_TOKENS] __attribute__((aligned(64)));
    float packed_s[AMX_MAX_GROUPS * AMX_TOKENS] __attribute__((aligned(64)));
    for (int t = 0; t < T; t += AMX_TOKENS) {
        int C = T - t < AMX_TOKENS ? T - t : AMX_TOKENS;
        float *o = out + (size_t)t * ldo;
        pack_tokens(packed, packed_s, Xq + (size_t)t * n, Xs + (size_t)t * ng, C, n, gs);
        for (int i = r0; i < full_end; i += AMX_ROWS)
            token_rows(C, o + i, ldo, Wq + (size_t)i * n, Ws + (size_t)i * ng, packed, packed_s, n, gs, kc);
        if (full_end < r1)
            token_rest_rows(r1 - full_end, C, o + full_end, ldo, Wq + (size_t)full_end * n, Ws + (size_t)full_end * ng,
                            packed, packed_s, n, gs, kc);
    }
    _tile_release();
}

const ac_kernels ac_kernels_avx512_amx = {"avx512-amx", ac_gemm_f32_avx512, gemm_q8_amx, ac_weighted_sum_avx512,
                                          ac_quantize_q8_avx2, ac_swiglu_avx512, ac_softmax_avx2, NULL, NULL};

#endif /* __x86_64__ */
