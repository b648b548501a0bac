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
