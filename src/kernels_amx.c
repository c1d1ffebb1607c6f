/*
 * kernels_amx.c - the avx512-amx kernel set: the avx512-vnni set (its float32 kernels, SwiGLU,
 * weighted sum, quantizer, softmax, int8 packing and one-token int8 products) with the int8
 * products over several tokens on Intel AMX tiles (AMX-INT8).
 *
 * The weights are packed as for avx512-vnni (kernels_avx512.h): in a block of 16 rows, 64-byte
 * vector j holds 4-byte word j of every row, offset by 128.  That is the layout of a tile
 * product's B operand, 16 columns of 4 bytes per tile row, so a block's words for a group load
 * as one B tile with no reordering, and the tokens' bytes load as the A tile straight from the
 * quantized activations (row stride n).  tdpbsud (A signed, B unsigned) then leaves C[t][r] =
 * token t's exact int32 sum over the group with row r, plus the offset's 128 * (the group's sum
 * of token t's bytes), which a second product in the same tile takes back off.  C comes back
 * through memory as one 16-lane vector per token (lane r: row r), so each group is scaled and
 * added in the scalar set's order, sum += (float)isum * (w_scale * x_scale), and a token's 16
 * outputs store together.  This set's int8 GEMM therefore gives the scalar set's bits, as every
 * set's does.
 *
 * Fewer than AMX_MIN_TOKENS tokens (decode, and the last tokens of a prompt) take the VNNI
 * kernel instead: a tile product costs about the same for 1 token as for 16.
 *
 * Linux hands out the tile registers only to a process that asks (arch_prctl
 * ARCH_REQ_XCOMP_PERM), which kernels.c does before it lists this set.
 */
#include "kernels.h"
#include "kernels_avx512.h"

#if defined(__x86_64__)

#include <stdint.h>
#include <string.h>

#define AMX_TARGET "avx512f,avx512bw,avx512vnni,amx-tile,amx-int8,avx2,fma"
#define AMX_FN __attribute__((target(AMX_TARGET)))
#define AMX_TILE static inline __attribute__((target(AMX_TARGET), always_inline))

/* A tile holds at most 16 rows of 64 bytes: 16 tokens, and 16 weight rows' 4-byte columns. */
#define AMX_TOKENS 16
#define AMX_MIN_TOKENS 10
/* The products over several tokens keep 16 tokens' scales of each group on the stack; matrices
 * with more groups take the VNNI kernel. */
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
#define TILE_MINUS 6 /* B: bytes of -128, for the offset */

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

/* Both sets for C tokens and kc-byte chunks of a group: A C rows x kc bytes, B kc / 4 rows of
 * 16 weight rows' 4 bytes, C C rows x 16 int32 sums. */
AMX_FN static void configure_tiles(int C, int kc) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int set = 0; set <= TILE_C1 - TILE_C0; set += TILE_C1 - TILE_C0) {
        set_tile(&c, set + TILE_C0, C, 64);
        set_tile(&c, set + TILE_A0, C, kc);
        set_tile(&c, set + TILE_B0, kc / 4, 64);
    }
    set_tile(&c, TILE_MINUS, kc / 4, 64);
    _tile_loadconfig(&c);
}

/* The bytes per tile product: the largest multiple of 4 up to 64 that divides the group. */
static int chunk_bytes(int gs) {
    int kc = 64;
    while (gs % kc) kc -= 4;
    return kc;
}

/* x_scale[16 g + t] = token t's scale of group g (Xs: C tokens' ng scales each), 0 past C. */
static void block_scales(float *x_scale, const float *Xs, int C, int ng) {
    for (int g = 0; g < ng; g++)
        for (int t = 0; t < AMX_TOKENS; t++) x_scale[g * AMX_TOKENS + t] = t < C ? Xs[(size_t)t * ng + g] : 0.0f;
}

/* Tile c = group g's exact sums for the configured tokens at x (row stride n) against the
 * block's packed words at w, kc bytes at a time, through tiles a and b: each chunk's product
 * with the offset weights, less its product with bytes of -128 (tile TILE_MINUS), which takes
 * the offset back off in the tile unit.  (Subtracting 128 * x's sums in the vector code after
 * the products instead: 0.85-0.96x the products alone, kernel_bench at 16 and 250 tokens, as
 * the vector code bounds them.) */
#define GROUP_PRODUCTS(c, a, b, g)                                                                                   \
    do {                                                                                                             \
        _tile_zero(c);                                                                                               \
        for (int k = (g) * gs; k < ((g) + 1) * gs; k += kc) {                                                        \
            _tile_loadd(a, x + k, n);                                                                                \
            _tile_loadd(b, w + (size_t)k * PACK_ROWS, 64);                                                           \
            _tile_dpbssd(c, a, TILE_MINUS);                                                                          \
            _tile_dpbsud(c, a, b);                                                                                   \
        }                                                                                                            \
    } while (0)

/* acc[t] += group g's sums (sums + 16 t, lane r: row r), scaled lane by lane: the scalar set's
 * sum += isum * (w_scale * x_scale).  All 16 tokens: a constant count keeps acc in registers
 * (about 1.1x a loop to C, kernel_bench at 16 and 64 tokens); the tokens past the block's are
 * not stored. */
AMX_TILE void add_group(__m512 acc[AMX_TOKENS], const int32_t *sums, const float *scale, const float *x_scale,
                        int g) {
    __m512 s = _mm512_load_ps(scale + (size_t)g * PACK_ROWS);
    for (int t = 0; t < AMX_TOKENS; t++) {
        __m512i isum = _mm512_load_si512(sums + t * PACK_ROWS);
        __m512 xs = _mm512_set1_ps(x_scale[g * AMX_TOKENS + t]);
        acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(s, xs)));
    }
}

/* One packed block's rows (the lanes of store) for the C configured tokens: token t's bytes at
 * x + t * n, their scales as block_scales leaves them.  Groups go in pairs, one per set of
 * tiles, each pair prefetching its share of the next block (contiguous). */
AMX_TILE void block_tokens(int C, float *out, int ldo, const unsigned char *w, const int8_t *x, const float *x_scale,
                           int n, int gs, int kc, __mmask16 store) {
    int ng = n / gs;
    const float *scale = (const float *)(w + (size_t)PACK_ROWS * n);
    const char *next = (const char *)w + packed_block_bytes(n, gs);
    int32_t sums[2][AMX_TOKENS * PACK_ROWS] __attribute__((aligned(64)));
    if (C < AMX_TOKENS) memset(sums, 0, sizeof sums); /* the rows no tile stores */
    __m512 acc[AMX_TOKENS];
    for (int t = 0; t < AMX_TOKENS; t++) acc[t] = _mm512_setzero_ps();
    int g = 0;
    for (; g + 1 < ng; g += 2) {
        for (int b = 0; b < 2 * PACK_ROWS * gs; b += 64) _mm_prefetch(next + (size_t)g * PACK_ROWS * gs + b, _MM_HINT_T0);
        GROUP_PRODUCTS(TILE_C0, TILE_A0, TILE_B0, g);
        GROUP_PRODUCTS(TILE_C1, TILE_A1, TILE_B1, g + 1);
        _tile_stored(TILE_C0, sums[0], 64);
        _tile_stored(TILE_C1, sums[1], 64);
        add_group(acc, sums[0], scale, x_scale, g);
        add_group(acc, sums[1], scale, x_scale, g + 1);
    }
    if (g < ng) {
        GROUP_PRODUCTS(TILE_C0, TILE_A0, TILE_B0, g);
        _tile_stored(TILE_C0, sums[0], 64);
        add_group(acc, sums[0], scale, x_scale, g);
    }
    for (int t = 0; t < AMX_TOKENS; t++)
        if (t < C) _mm512_mask_storeu_ps(out + (size_t)t * ldo, store, acc[t]);
}
#undef GROUP_PRODUCTS

/* Rows [r0, r1) of a packed matrix (Ws NULL) for T tokens, AMX_TOKENS at a time, each block of
 * tokens against every row block; the row layout (shapes that stay unpacked), matrices of more
 * than AMX_MAX_GROUPS groups and the last tokens when fewer than AMX_MIN_TOKENS are left go to
 * the VNNI kernel (the same bits). */
AMX_FN static void gemm_q8_amx(float *out, int ldo, const int8_t *Wq, const float *Ws, const int8_t *Xq,
                               const float *Xs, int T, int n, int gs, int r0, int r1) {
    int ng = n / gs, kc = chunk_bytes(gs), configured = 0, t = 0;
    const unsigned char *P = (const unsigned char *)Wq;
    size_t block = packed_block_bytes(n, gs);
    float x_scale[AMX_MAX_GROUPS * AMX_TOKENS];
    int8_t minus[64]; /* every row of TILE_MINUS (a row stride of 0) */
    memset(minus, -128, sizeof minus);
    for (; !Ws && ng <= AMX_MAX_GROUPS && T - t >= AMX_MIN_TOKENS; t += AMX_TOKENS) {
        int C = T - t < AMX_TOKENS ? T - t : AMX_TOKENS;
        if (C != configured) {
            configure_tiles(configured = C, kc);
            _tile_loadd(TILE_MINUS, minus, 0);
        }
        const int8_t *x = Xq + (size_t)t * n;
        block_scales(x_scale, Xs + (size_t)t * ng, C, ng);
        for (int b = r0 / PACK_ROWS; b * PACK_ROWS < r1; b++) {
            __mmask16 store = block_lanes(b, r0, r1);
            block_tokens(C, out + (size_t)t * ldo + (size_t)b * PACK_ROWS, ldo, P + (size_t)b * block, x, x_scale,
                         n, gs, kc, store);
        }
    }
    if (configured) _tile_release();
    if (t < T)
        ac_gemm_q8_avx512_vnni(out + (size_t)t * ldo, ldo, Wq, Ws, Xq + (size_t)t * n, Xs + (size_t)t * ng, T - t, n,
                               gs, r0, r1);
}

const ac_kernels ac_kernels_avx512_amx = {"avx512-amx", ac_gemm_f32_avx512, gemm_q8_amx, ac_weighted_sum_avx512,
                                          ac_quantize_q8_avx2, ac_swiglu_avx512, ac_softmax_avx2,
                                          ac_packed_q8_bytes_avx512_vnni, ac_pack_q8_avx512_vnni};

#endif /* __x86_64__ */
