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
 * bytes), the same for all 16 rows, and each set takes it back off per token and group. */
#define PACK_ROWS 16

/* A multiple of 64 for every packed shape (gs % 4 == 0, so n % 4 == 0). */
static inline size_t packed_block_bytes(int n, int gs) {
    return (size_t)PACK_ROWS * n + (size_t)(n / gs) * PACK_ROWS * sizeof(float);
}

/* The lanes of packed block b that hold rows of the range [r0, r1). */
AVX512_TILE __mmask16 block_lanes(int b, int r0, int r1) {
    int lo = b * PACK_ROWS < r0 ? r0 - b * PACK_ROWS : 0;
    int hi = (b + 1) * PACK_ROWS > r1 ? r1 - b * PACK_ROWS : PACK_ROWS;
    return (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1));
}

#endif /* __x86_64__ */

#endif /* ARIANNA_KERNELS_AVX512_H */
