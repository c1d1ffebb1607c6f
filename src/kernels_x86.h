/*
 * kernels_x86.h - what the x86-64 kernel sets (kernels_avx2.c, kernels_avx512.c) share: the
 * fixed order of an 8-lane sum, the software prefetch of weight rows, and e^x.
 *
 * Everything here is static inline with the avx2,fma target, a subset of every x86-64 set's
 * target, so it inlines into all of them.
 */
#ifndef ARIANNA_KERNELS_X86_H
#define ARIANNA_KERNELS_X86_H

#if defined(__x86_64__)

#include <immintrin.h>
#include <stddef.h>

/* Register-tile helpers are always inlined with constant tile sizes, so their small loops
 * unroll fully and the accumulator arrays live in registers. */
#define AVX2_FN __attribute__((target("avx2,fma")))
#define AVX2_TILE static inline __attribute__((target("avx2,fma"), always_inline))

/* Same order as kernels.c's hsum8: (l0+l4, l1+l5, l2+l6, l3+l7) -> ((l0+l4)+(l2+l6),
 * (l1+l5)+(l3+l7)) -> sum. */
AVX2_TILE float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The largest of 8 lanes; a NaN lane may or may not win (callers let NaN through e^x). */
AVX2_TILE float hmax_avx2(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* Single-token decode (T = 1) reads every weight once, so it waits on memory, not on
 * arithmetic, and the hardware prefetcher alone does not keep up with it: the T = 1 kernels
 * also prefetch in software, about PREFETCH_BYTES ahead, in whole rows (so strided rows
 * such as the attention's key cache are fetched too).  Measured on the persona, 2-core AMD
 * EPYC (AVX2), medians of 11 interleaved runs: float32 walked one row at a time with the
 * prefetch decodes 1.5x (1 thread) to 1.7x (2 threads) faster than 4-row tiles without it,
 * and 1.3x faster than 2- or 4-row tiles with it; int8 (a quarter of the bytes, mostly in
 * L3) is best in 4-row tiles with the prefetch, 1.4-1.7x over the same without. */
#define PREFETCH_BYTES 8192

static inline int prefetch_rows(int row_bytes) { return (PREFETCH_BYTES + row_bytes - 1) / row_bytes; }

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
static inline void tile_share(int row_bytes, int k, int ntiles, int *lo, int *hi) {
    *lo = (int)((long long)row_bytes * k / ntiles) & ~63;
    *hi = k + 1 == ntiles ? row_bytes : (int)((long long)row_bytes * (k + 1) / ntiles) & ~63;
}

/* The constants of exp_avx2 and kernels_avx512.c's exp_avx512: e^x = 2^n * e^r with
 * n = round(x / ln 2) and r = x - n ln 2 (ln 2 in two parts, so r is exact to float
 * precision), e^r from a degree-7 polynomial (1 + r + r^2 (c0 + c1 r + ... + c5 r^5), the
 * Cephes expf coefficients): within 2 ulp of expf for normal results. */
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO -2.12194440e-4f
#define EXP_MAX_IN 88.0f          /* keeps n <= 127; larger x (to the overflow) are clamped */
#define EXP_OVERFLOW 88.7228394f  /* above: +inf */
#define EXP_UNDERFLOW -87.3365479f /* below: 0 (expf is subnormal there) */
static const float exp_poly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                  4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

/* e^x in 8 lanes (see the constants above); a NaN stays NaN. */
AVX2_TILE __m256 exp_avx2(__m256 x) {
    /* max_ps and min_ps return their second operand for a NaN: x's NaN goes through */
    __m256 xc = _mm256_min_ps(_mm256_set1_ps(EXP_MAX_IN), _mm256_max_ps(_mm256_set1_ps(EXP_UNDERFLOW), x));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(EXP_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), r);
    __m256 p = _mm256_set1_ps(exp_poly[0]);
    for (int k = 1; k < 6; k++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(exp_poly[k]));
    __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
    y = _mm256_blendv_ps(y, _mm256_set1_ps(__builtin_inff()), _mm256_cmp_ps(x, _mm256_set1_ps(EXP_OVERFLOW), _CMP_GT_OQ));
    return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(EXP_UNDERFLOW), _CMP_LT_OQ), y);
}

#endif /* __x86_64__ */

#endif /* ARIANNA_KERNELS_X86_H */
