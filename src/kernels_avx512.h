/*
 * kernels_avx512.h - what the AVX-512 kernel sets (kernels_avx512.c, kernels_amx.c) share:
 * their target attributes, lane masks and the layout of int8 matrices packed for VNNI.
 */
#ifndef ARIANNA_KERNELS_AVX512_H
#define ARIANNA_KERNELS_AVX512_H

#include "kernels_x86.h"

#if defined(__x86_64__)

#include <stdint.h>

#define AVX512_FN __attribute__((target("avx512f,avx2,fma")))
#define AVX512_TILE static inline __attribute__((target("avx512f,avx2,fma"), always_inline))
#define VNNI512_FN __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma")))
#define VNNI512_TILE static inline __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma"), always_inline))

/* The first n (<= 16) lanes. */
AVX512_TILE __mmask16 first_lanes(int n) { return (__mmask16)((1u << n) - 1); }

/* ---------------------------------------------------------------- int8 matrices packed for VNNI */

/* The avx512-vnni and avx512-amx sets keep their int8 matrices packed (the model packs each
 * once, at load): blocks of PACK_ROWS rows, each block n / 4 vectors of 64 bytes, vector j
 * holding 4-byte word j of every row of the block (row r's bytes 4j .. 4j+3 at 4r), offset by
 * 128 (w ^ 0x80 = w + 128 as an unsigned byte, the unsigned side of vpdpbusd and tdpbsud), then
 * the block's scales, 16 floats per group (lane r: row r's).  Rows past the matrix are zero
 * weights with zero scales.  What the offset adds to a product with x is 128 * (the sum of x's
 * bytes), the same for all 16 rows, and comes back off per token and group (offset_sums). */
#define PACK_ROWS 16
/* x's group sums are computed once per call for up to this many values (token count times
 * groups); matrices with more groups than that stay in the row layout (the scalar kernel). */
#define PACK_SUMS 8192

/* A multiple of 64 for every packed shape (gs % 4 == 0, so n % 4 == 0). */
static inline size_t packed_block_bytes(int n, int gs) {
    return (size_t)PACK_ROWS * n + (size_t)(n / gs) * PACK_ROWS * sizeof(float);
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

#endif /* __x86_64__ */

#endif /* ARIANNA_KERNELS_AVX512_H */
