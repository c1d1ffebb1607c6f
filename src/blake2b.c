/*
 * blake2b.c - BLAKE2b-256 as RFC 7693 specifies it: unkeyed, one call over a whole buffer.
 *
 * Why BLAKE2b: a standard hash that Python has built in (hashlib.blake2b) and that portable C
 * runs at several hundred MB/s, so fingerprinting a 28.6 MB base costs tens of milliseconds.
 */
#include "blake2b.h"

#include <stdint.h>
#include <string.h>

#define BLOCK_BYTES 128
#define ROUNDS 12

/* The initialization vector (the SHA-512 one) and the message schedule of each round. */
static const uint64_t IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

static const uint8_t SIGMA[10][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
};

static uint64_t rotr(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

/* The mixing function G on four words of the working vector. */
static void mix(uint64_t *v, int a, int b, int c, int d, uint64_t x, uint64_t y) {
    v[a] += v[b] + x;
    v[d] = rotr(v[d] ^ v[a], 32);
    v[c] += v[d];
    v[b] = rotr(v[b] ^ v[c], 24);
    v[a] += v[b] + y;
    v[d] = rotr(v[d] ^ v[a], 16);
    v[c] += v[d];
    v[b] = rotr(v[b] ^ v[c], 63);
}

/* Folds one 128-byte block into h; bytes = message bytes hashed so far, including this block. */
static void compress(uint64_t h[8], const unsigned char *block, uint64_t bytes, int last) {
    uint64_t m[16], v[16];
    memcpy(m, block, sizeof m); /* the words are little-endian, as is the host */
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = IV[i];
    }
    v[12] ^= bytes; /* the counter's high word stays 0: inputs are far below 2^64 bytes */
    if (last) v[14] = ~v[14];
#pragma GCC unroll 12
    for (int r = 0; r < ROUNDS; r++) {
        const uint8_t *s = SIGMA[r % 10];
        mix(v, 0, 4, 8, 12, m[s[0]], m[s[1]]);
        mix(v, 1, 5, 9, 13, m[s[2]], m[s[3]]);
        mix(v, 2, 6, 10, 14, m[s[4]], m[s[5]]);
        mix(v, 3, 7, 11, 15, m[s[6]], m[s[7]]);
        mix(v, 0, 5, 10, 15, m[s[8]], m[s[9]]);
        mix(v, 1, 6, 11, 12, m[s[10]], m[s[11]]);
        mix(v, 2, 7, 8, 13, m[s[12]], m[s[13]]);
        mix(v, 3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
}

void ac_blake2b_256(const void *data, size_t n, unsigned char out[BLAKE2B_256_BYTES]) {
    const unsigned char *p = data;
    uint64_t h[8];
    memcpy(h, IV, sizeof h);
    h[0] ^= 0x01010000ULL ^ BLAKE2B_256_BYTES; /* depth 1, fanout 1, no key, digest length */
    size_t done = 0;
    /* Every full block but the last: the final block (full or not) is compressed with the
     * last-block flag, and an empty message still compresses one zero block. */
    while (n - done > BLOCK_BYTES) {
        compress(h, p + done, done + BLOCK_BYTES, 0);
        done += BLOCK_BYTES;
    }
    unsigned char tail[BLOCK_BYTES] = {0};
    if (n > done) memcpy(tail, p + done, n - done);
    compress(h, tail, n, 1);
    memcpy(out, h, BLAKE2B_256_BYTES);
}
