/* y = x @ W.T (+ bias) for a few rows of x, reading W in the blocked layout oneDNN packed it into.
 *
 * Built with cpu_lora.c into one library by kernels/cpu_native.py and called through ctypes by
 * kernels/cpu_matvec.py, which checks before using it that a packed weight is laid out as read here:
 *   w [num_blocks][in_features][block], output row o = b * block + j at w[b][k][j]; the last block is
 *   zero-padded to `block` rows.
 * That layout suits a matrix-vector product: for each block, y[block rows] += W[b][k][:] * x[k] over k,
 * streaming the weight once, with no horizontal sums. At one or two rows (a decode at batch 1 or 2) oneDNN's
 * own inner product read the same bytes 1.2-1.7x slower on a 2-core AVX2 VM, mostly fixed cost per call.
 * Each output sums over k in order, as oneDNN's does, so most shapes give identical fp32 results.
 * Blocks run in parallel on torch's OpenMP pool (see cpu_lora.c), as many threads as torch uses.
 */
#include <stdint.h>
#include <string.h>

#include "cpu_vec.h"

#define MAX_ROWS 4
#define MAX_BLOCK 64
/* Inputs processed per pass over a chunk of the block: the chunk (K_CHUNK x 64 floats, 16 KB) stays in L1 while
 * every row of x multiplies it. */
#define K_CHUNK 64

int matvec_max_rows(void) { return MAX_ROWS; }

/* Inlined with a constant `block`, so that the loops over its vectors unroll into named registers. */
static inline __attribute__((always_inline)) void block_product(
    const float *w, int64_t in_features, const int block, const float *x, int64_t x_stride, int64_t rows,
    float *acc)
{
    const int vectors = block / 8;
    for (int64_t t = 0; t < rows; t++) memset(acc + t * block, 0, sizeof(float) * block);
    for (int64_t k0 = 0; k0 < in_features; k0 += K_CHUNK) {
        const int64_t k1 = k0 + K_CHUNK < in_features ? k0 + K_CHUNK : in_features;
        for (int64_t t = 0; t < rows; t++) {
            vec8 sums[MAX_BLOCK / 8];
            #pragma GCC unroll 8
            for (int v = 0; v < vectors; v++) sums[v] = load8(acc + t * block + 8 * v);
            const float *xt = x + t * x_stride;
            for (int64_t k = k0; k < k1; k++) {
                const float *wk = w + k * block;
                const vec8 feature = (vec8){0} + xt[k];
                #pragma GCC unroll 8
                for (int v = 0; v < vectors; v++) sums[v] += load8(wk + 8 * v) * feature;
            }
            #pragma GCC unroll 8
            for (int v = 0; v < vectors; v++) store8(acc + t * block + 8 * v, sums[v]);
        }
    }
}

/* block is 8, 16, 32 or 64 and rows <= MAX_ROWS (the caller checks); x has unit column stride. */
void packed_matvec_f32(const float *w, int64_t out_features, int64_t in_features, int64_t block,
                       const float *x, int64_t x_stride, int64_t rows, const float *bias,
                       float *y, int64_t y_stride, int num_threads)
{
    const int64_t num_blocks = (out_features + block - 1) / block;
    #pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1 && num_blocks > 1)
    for (int64_t b = 0; b < num_blocks; b++) {
        float acc[MAX_ROWS * MAX_BLOCK];
        const float *wb = w + b * block * in_features;
        switch (block) {
        case 64: block_product(wb, in_features, 64, x, x_stride, rows, acc); break;
        case 32: block_product(wb, in_features, 32, x, x_stride, rows, acc); break;
        case 16: block_product(wb, in_features, 16, x, x_stride, rows, acc); break;
        default: block_product(wb, in_features, 8, x, x_stride, rows, acc); break;
        }
        const int64_t first = b * block;
        const int64_t width = out_features - first < block ? out_features - first : block;
        for (int64_t t = 0; t < rows; t++) {
            float *out = y + t * y_stride + first;
            for (int64_t j = 0; j < width; j++) out[j] = acc[t * block + j] + (bias ? bias[first + j] : 0.0f);
        }
    }
}

/* The bf16 form: y (bf16) = x (bf16) @ W.T (+ bias, fp32), reading W as oneDNN packs bf16 weights for CPUs with
 * bf16 dot products:
 *   w [num_blocks][padded_in / 2][block][2] bf16: output row o = b * block + j, inputs k = 2 * p + {0, 1} at
 *   w[b][p][j][k % 2]; padded_in is in_features rounded up by oneDNN (its padding holds zeros, and so do the
 *   rows that pad the last block).
 * Pairs of inputs sit side by side in one 32-bit word per output, the operand layout of AVX-512's vdpbf16ps
 * (acc += w[2i] * x[2i] + w[2i+1] * x[2i+1] per fp32 lane): 64 bytes of weight are one instruction against the
 * pair (x[2p], x[2p+1]) broadcast. Elsewhere the word is split into its two bf16 halves by a shift and a mask.
 * Sums are fp32, rounded to bf16 once at the end (to nearest even), bias added before. */

typedef float vec16 __attribute__((vector_size(64)));
typedef uint32_t pairs16 __attribute__((vector_size(64)));  /* 16 outputs x (even input, odd input) */

#define MAX_BF16_BLOCK 64
/* Bytes ahead of the current pair that each thread asks the memory system for: the weight is read once per
 * step, from DRAM, so the next blocks' lines are requested before they are needed. */
#define PREFETCH_BYTES 1024

#ifdef __AVX512BF16__
#include <immintrin.h>
static inline vec16 dot_pairs(vec16 acc, pairs16 w, uint32_t x_pair)
{
    return (vec16)_mm512_dpbf16_ps((__m512)acc, (__m512bh)w, (__m512bh)_mm512_set1_epi32((int)x_pair));
}
#else
static inline vec16 dot_pairs(vec16 acc, pairs16 w, uint32_t x_pair)
{
    const vec16 even = (vec16)(w << 16), odd = (vec16)(w & 0xffff0000u);
    return acc + even * bf16_to_f32((uint16_t)x_pair) + odd * bf16_to_f32((uint16_t)(x_pair >> 16));
}
#endif

static inline uint32_t load_pair(const uint16_t *p) { uint32_t v; memcpy(&v, p, sizeof v); return v; }

/* Inlined with constant `block` and `rows`, so that every row's sums for the block stay in registers while the
 * block's weight streams past once. */
static inline __attribute__((always_inline)) void bf16_block_product(
    const uint16_t *w, int64_t in_features, const int block, const uint16_t *x, int64_t x_stride,
    const int rows, float *acc)
{
    const int vectors = block / 16;
    const int64_t full_pairs = in_features / 2;
    vec16 sums[MAX_ROWS][MAX_BF16_BLOCK / 16];
    #pragma GCC unroll 4
    for (int t = 0; t < rows; t++)
        #pragma GCC unroll 4
        for (int v = 0; v < vectors; v++) sums[t][v] = (vec16){0};
    for (int64_t p = 0; p < full_pairs; p++) {
        const uint16_t *wp = w + p * block * 2;
        __builtin_prefetch((const char *)wp + PREFETCH_BYTES);
        if (block == 64) __builtin_prefetch((const char *)wp + PREFETCH_BYTES + 128);
        pairs16 weights[MAX_BF16_BLOCK / 16];
        #pragma GCC unroll 4
        for (int v = 0; v < vectors; v++) memcpy(&weights[v], wp + 32 * v, sizeof weights[v]);
        #pragma GCC unroll 4
        for (int t = 0; t < rows; t++) {
            const uint32_t x_pair = load_pair(x + t * x_stride + 2 * p);
            #pragma GCC unroll 4
            for (int v = 0; v < vectors; v++) sums[t][v] = dot_pairs(sums[t][v], weights[v], x_pair);
        }
    }
    if (in_features % 2) {  /* the last input pairs with oneDNN's zero padding: its x half is 0 too */
        const uint16_t *wp = w + full_pairs * block * 2;
        for (int t = 0; t < rows; t++) {
            const uint32_t x_pair = x[t * x_stride + in_features - 1];
            for (int v = 0; v < vectors; v++) {
                pairs16 weights;
                memcpy(&weights, wp + 32 * v, sizeof weights);
                sums[t][v] = dot_pairs(sums[t][v], weights, x_pair);
            }
        }
    }
    #pragma GCC unroll 4
    for (int t = 0; t < rows; t++)
        #pragma GCC unroll 4
        for (int v = 0; v < vectors; v++) memcpy(acc + t * block + 16 * v, &sums[t][v], sizeof sums[t][v]);
}

#define BF16_ROWS_CASES(block) \
    switch (rows) { \
    case 1: bf16_block_product(wb, in_features, block, x, x_stride, 1, acc); break; \
    case 2: bf16_block_product(wb, in_features, block, x, x_stride, 2, acc); break; \
    case 3: bf16_block_product(wb, in_features, block, x, x_stride, 3, acc); break; \
    default: bf16_block_product(wb, in_features, block, x, x_stride, 4, acc); break; \
    }

/* block is 16, 32 or 64, padded_in even and >= in_features, 1 <= rows <= MAX_ROWS (the caller checks); x has
 * unit column stride. */
void packed_matvec_bf16(const uint16_t *w, int64_t out_features, int64_t in_features, int64_t padded_in,
                        int64_t block, const uint16_t *x, int64_t x_stride, int64_t rows, const float *bias,
                        uint16_t *y, int64_t y_stride, int num_threads)
{
    const int64_t num_blocks = (out_features + block - 1) / block;
    #pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1 && num_blocks > 1)
    for (int64_t b = 0; b < num_blocks; b++) {
        float acc[MAX_ROWS * MAX_BF16_BLOCK];
        const uint16_t *wb = w + b * block * padded_in;
        switch (block) {
        case 64: BF16_ROWS_CASES(64) break;
        case 32: BF16_ROWS_CASES(32) break;
        default: BF16_ROWS_CASES(16) break;
        }
        const int64_t first = b * block;
        const int64_t width = out_features - first < block ? out_features - first : block;
        for (int64_t t = 0; t < rows; t++) {
            uint16_t *out = y + t * y_stride + first;
            for (int64_t j = 0; j < width; j++)
                out[j] = f32_to_bf16(acc[t * block + j] + (bias ? bias[first + j] : 0.0f));
        }
    }
}
