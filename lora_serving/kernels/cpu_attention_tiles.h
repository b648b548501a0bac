/* The arithmetic of one tile of keys or values for cpu_attention.c: a group's scores against VEC_LANES keys, as one
 * vector per query head, and a tile's values added into the results by the softmax weights. Rows come either
 * from the cache itself or from the kernel's scratch tile (widened, zero-padded); bf16 keys also in place, in
 * pairs (tile_scores' in_pairs). */
#ifndef CPU_ATTENTION_TILES_H
#define CPU_ATTENTION_TILES_H
#include <stdint.h>
#include <string.h>

#include "cpu_vec.h"

static inline int64_t whole_vectors(int64_t n) { return (n + VEC_LANES - 1) / VEC_LANES * VEC_LANES; }

#if VEC_LANES == 16
/* The dots of `queries` (1 to 3, a constant once inlined) queries, rows of `width` floats at q, with the 8 rows at
 * base + j * step, each folded to the 8 keys' partial sums (lane_sums' tree short of its last level): each row's
 * vector is read once for all the queries, 24 running sums in registers. */
static inline __attribute__((always_inline)) void half_tile_dots(vecw *folded, const float *q, int queries,
                                                                 const float *base, int64_t step, int64_t width)
{
    vecw sums[3][8];
    for (int g = 0; g < queries; g++)
        for (int j = 0; j < 8; j++) sums[g][j] = (vecw){0};
    for (int64_t c = 0; c < width; c += VEC_LANES) {
        vecw query[3];
        for (int g = 0; g < queries; g++) query[g] = loadw(q + g * width + c);
        for (int j = 0; j < 8; j++) {
            const vecw key = loadw(base + j * step + c);
            for (int g = 0; g < queries; g++) sums[g][j] += query[g] * key;
        }
    }
    for (int g = 0; g < queries; g++) {
        const vecw *s = sums[g];
        folded[g] = fold2(fold4(fold8(s[0], s[4]), fold8(s[2], s[6])), fold4(fold8(s[1], s[5]), fold8(s[3], s[7])));
    }
}

/* scores[g * padded + k] = scale * (query g . row k) for `queries` queries and a tile's 16 rows: the even rows and
 * the odd ones are the two halves of lane_sums' tree, which its last level joins. */
static inline __attribute__((always_inline)) void query_tile_scores(float *scores, int64_t padded, const float *q,
                                                                    int queries, const float *base, int64_t stride,
                                                                    int64_t width, float scale)
{
    vecw even[3], odd[3];
    half_tile_dots(even, q, queries, base, 2 * stride, width);
    half_tile_dots(odd, q, queries, base + stride, 2 * stride, width);
    for (int g = 0; g < queries; g++) storew(scores + g * padded, scale * fold1(even[g], odd[g]));
}

/* half_tile_dots for bf16 rows read in place (head_dim a multiple of 32): 32 words as 16 pairs, each 32-bit lane an
 * even element (low half) with the odd one above it, so that a shift and a mask make the even elements and the odd
 * ones fp32 vectors with no shuffle; q holds the queries split the same way (even then odd, per 32). */
static inline __attribute__((always_inline)) void half_tile_dots_pairs(vecw *folded, const float *q, int queries,
                                                                       const uint16_t *base, int64_t step,
                                                                       int64_t width)
{
    vecw sums[3][8];
    for (int g = 0; g < queries; g++)
        for (int j = 0; j < 8; j++) sums[g][j] = (vecw){0};
    for (int64_t c = 0; c < width; c += 2 * VEC_LANES) {
        vecw even_q[3], odd_q[3];
        for (int g = 0; g < queries; g++)
            even_q[g] = loadw(q + g * width + c), odd_q[g] = loadw(q + g * width + c + VEC_LANES);
        for (int j = 0; j < 8; j++) {
            vecuw pairs;
            memcpy(&pairs, base + j * step + c, sizeof pairs);
            const vecw even = (vecw)(pairs << 16), odd = (vecw)(pairs & 0xffff0000u);
            for (int g = 0; g < queries; g++) {
                sums[g][j] += even_q[g] * even;
                sums[g][j] += odd_q[g] * odd;
            }
        }
    }
    for (int g = 0; g < queries; g++) {
        const vecw *s = sums[g];
        folded[g] = fold2(fold4(fold8(s[0], s[4]), fold8(s[2], s[6])), fold4(fold8(s[1], s[5]), fold8(s[3], s[7])));
    }
}

static inline __attribute__((always_inline)) void query_tile_scores_pairs(float *scores, int64_t padded,
                                                                          const float *q, int queries,
                                                                          const uint16_t *base, int64_t stride,
                                                                          int64_t width, float scale)
{
    vecw even[3], odd[3];
    half_tile_dots_pairs(even, q, queries, base, 2 * stride, width);
    half_tile_dots_pairs(odd, q, queries, base + stride, 2 * stride, width);
    for (int g = 0; g < queries; g++) storew(scores + g * padded, scale * fold1(even[g], odd[g]));
}

/* query_tile_scores, or its form for bf16 rows in pairs (a constant once inlined). */
static inline __attribute__((always_inline)) void query_tile_scores_any(float *scores, int64_t padded,
                                                                        const float *q, int queries,
                                                                        const void *base, int64_t stride,
                                                                        int64_t width, float scale, int in_pairs)
{
    if (in_pairs) query_tile_scores_pairs(scores, padded, q, queries, base, stride, width, scale);
    else query_tile_scores(scores, padded, q, queries, base, stride, width, scale);
}
#endif

/* `row` (n floats, a multiple of 2 * VEC_LANES) with each run of 2 * VEC_LANES split into its even elements, then
 * its odd ones, into `split`: the order in which tile_scores reads bf16 keys in pairs. */
static inline void split_pairs(const float *row, int64_t n, float *split)
{
    for (int64_t c = 0; c < n; c += 2 * VEC_LANES)
        for (int i = 0; i < VEC_LANES; i++) {
            split[c + i] = row[c + 2 * i];
            split[c + VEC_LANES + i] = row[c + 2 * i + 1];
        }
}

#if VEC_LANES != 16
/* Lane k of the result: q . row k, for the VEC_LANES rows at base + k * stride, `width` floats each (a multiple of
 * VEC_LANES). */
static inline vecw tile_dots(const float *q, const float *base, int64_t stride, int64_t width)
{
    vecw sums[VEC_LANES];
    for (int k = 0; k < VEC_LANES; k++) sums[k] = (vecw){0};
    for (int64_t c = 0; c < width; c += VEC_LANES) {
        const vecw query = loadw(q + c);
        for (int k = 0; k < VEC_LANES; k++) sums[k] += query * loadw(base + k * stride + c);
    }
    return lane_sums(sums);
}
#endif

/* scores[g * padded + k] = scale * (query g . row k) for the group's queries (rows of `width` at queries) and a
 * tile's rows: fp32 rows, or with `in_pairs` (AVX-512 only) bf16 rows of one block read in place in pairs, the
 * queries split likewise (split_pairs). */
static inline void tile_scores(float *scores, int64_t padded, const float *queries, int64_t group, const void *base,
                               int64_t stride, int64_t width, float scale, int in_pairs)
{
#if VEC_LANES == 16
    for (int64_t g = 0; g < group; g += 3) {
        float *at = scores + g * padded;
        const float *q = queries + g * width;
        switch (group - g) {
        case 1: query_tile_scores_any(at, padded, q, 1, base, stride, width, scale, in_pairs); break;
        case 2: query_tile_scores_any(at, padded, q, 2, base, stride, width, scale, in_pairs); break;
        default: query_tile_scores_any(at, padded, q, 3, base, stride, width, scale, in_pairs); break;
        }
    }
#else  /* 16 vector registers (AVX2): one query at a time, fp32 rows only */
    (void)in_pairs;
    for (int64_t g = 0; g < group; g++)
        storew(scores + g * padded, scale * tile_dots(queries + g * width, base, stride, width));
#endif
}

/* out[0 .. width) += the sum over k of weights[k] * row k, for the same rows as tile_dots, `vectors` (a constant
 * once inlined) vectors wide: out's vectors stay in registers through the tile, each weight is read once, and two
 * running sums per vector (even and odd rows) keep the additions from waiting on each other. */
static inline __attribute__((always_inline)) void accumulate_vectors(float *out, const float *weights,
                                                                     const float *base, int64_t stride, int vectors)
{
    vecw even[vectors], odd[vectors];
    for (int c = 0; c < vectors; c++) even[c] = loadw(out + c * VEC_LANES), odd[c] = (vecw){0};
    for (int k = 0; k < VEC_LANES; k += 2) {
        const vecw w0 = (vecw){0} + weights[k], w1 = (vecw){0} + weights[k + 1];
        for (int c = 0; c < vectors; c++) {
            even[c] += w0 * loadw(base + k * stride + c * VEC_LANES);
            odd[c] += w1 * loadw(base + (k + 1) * stride + c * VEC_LANES);
        }
    }
    for (int c = 0; c < vectors; c++) storew(out + c * VEC_LANES, even[c] + odd[c]);
}

/* The same for any width (a multiple of VEC_LANES): head_dims up to 8 vectors by a fixed-width form each. */
static inline void tile_accumulate(float *out, const float *weights, const float *base, int64_t stride,
                                   int64_t width)
{
    switch (width / VEC_LANES) {
    case 1: accumulate_vectors(out, weights, base, stride, 1); return;
    case 2: accumulate_vectors(out, weights, base, stride, 2); return;
    case 3: accumulate_vectors(out, weights, base, stride, 3); return;
    case 4: accumulate_vectors(out, weights, base, stride, 4); return;
    case 5: accumulate_vectors(out, weights, base, stride, 5); return;
    case 6: accumulate_vectors(out, weights, base, stride, 6); return;
    case 7: accumulate_vectors(out, weights, base, stride, 7); return;
    case 8: accumulate_vectors(out, weights, base, stride, 8); return;
    }
    for (int64_t c = 0; c < width; c += 8 * VEC_LANES) {
        const int64_t left = (width - c) / VEC_LANES;
        if (left >= 8) accumulate_vectors(out + c, weights, base + c, stride, 8);
        else tile_accumulate(out + c, weights, base + c, stride, left * VEC_LANES);
    }
}

#endif
