/*
 * kernels_avx512.h - what the AVX-512 kernel sets (kernels_avx512.c, kernels_amx.c) share:
 * their target attributes, lane masks, byte helpers for vpdpbusd and a 16 x 16 transpose.
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

/* Signed bytes as unsigned ones offset by 128 (b ^ 0x80 = b + 128), for vpdpbusd's unsigned
 * operand: what the offset adds comes back off as 128 * (the other operand's sum). */
VNNI512_TILE __m512i offset_bytes(__m512i b) { return _mm512_xor_si512(b, _mm512_set1_epi8((char)0x80)); }

/* Two 32-byte chunks side by side. */
VNNI512_TILE __m512i pair_bytes(const int8_t *lo, const int8_t *hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)lo)),
                              _mm256_loadu_si256((const __m256i *)hi), 1);
}

/* The 16 x 16 transpose of r (rows become columns), in place, in 64 shuffles: each step
 * reads a few registers and writes the same ones, so nothing is copied. */
AVX512_TILE void transpose16(__m512 r[16]) {
    for (int i = 0; i < 8; i++) { /* in each 128-bit quarter: rows 2i, 2i+1 interleaved */
        __m512 a = r[2 * i], b = r[2 * i + 1];
        r[2 * i] = _mm512_unpacklo_ps(a, b);
        r[2 * i + 1] = _mm512_unpackhi_ps(a, b);
    }
    for (int i = 0; i < 4; i++) { /* quarter q of r[4i + c]: column 4q + c of rows 4i..4i+3 */
        __m512d a = _mm512_castps_pd(r[4 * i]), b = _mm512_castps_pd(r[4 * i + 1]);
        __m512d c = _mm512_castps_pd(r[4 * i + 2]), d = _mm512_castps_pd(r[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int c = 0; c < 4; c++) { /* quarter q of r[c], r[4 + c], r[8 + c], r[12 + c] -> column 4q + c */
        __m512 u0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88), u1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);
        __m512 u2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88), u3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
        r[c] = _mm512_shuffle_f32x4(u0, u2, 0x88);
        r[8 + c] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
        r[4 + c] = _mm512_shuffle_f32x4(u1, u3, 0x88);
        r[12 + c] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
    }
}

#endif /* __x86_64__ */

#endif /* ARIANNA_KERNELS_AVX512_H */
