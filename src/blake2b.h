/*
 * blake2b.h - BLAKE2b (RFC 7693), the hash behind a model's fingerprint.
 *
 * A knowledge module records the fingerprint of the base model it was trained on (BLAKE2b with a
 * 32-byte digest, unkeyed, over the whole base file), so that applying it to another base is
 * refused.  Python computes the same digest with hashlib.blake2b(data, digest_size=32).
 */
#ifndef ARIANNA_BLAKE2B_H
#define ARIANNA_BLAKE2B_H

#include <stddef.h>

#define BLAKE2B_256_BYTES 32

/* out receives the 32-byte BLAKE2b-256 digest of data[0..n). */
void ac_blake2b_256(const void *data, size_t n, unsigned char out[BLAKE2B_256_BYTES]);

#endif /* ARIANNA_BLAKE2B_H */
