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

#include "cpu_amx.h"
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
 * Pairs of inputs sit side by side in one 32-bit word per output: the B operand of an AMX tile multiply as it
 * stands (used where the CPU and OS allow tiles, below), and the operand layout of AVX-512's vdpbf16ps
 * (acc += w[2i] * x[2i] + w[2i+1] * x[2i+1] per fp32 lane), where 64 bytes of weight are one instruction per
 * row against the pair (x[2p], x[2p+1]) broadcast. Without either, the word is split into its two bf16 halves
 * by a shift and a mask. Sums are fp32, rounded to bf16 once at the end (to nearest even), bias added before.
 * The weight is read once per step, from memory: each block's bytes are contiguous and each thread takes a
 * contiguous run of blocks, so the hardware prefetchers see a few long streams. */

typedef float vec16 __attribute__((vector_size(64)));
typedef uint32_t pairs16 __attribute__((vector_size(64)));  /* 16 outputs x (even input, odd input) */

#define MAX_BF16_BLOCK 64
/* Bytes ahead of the current pair that the dot-product form asks for: a few percent at one row, more at four,
 * on an AVX-512 Xeon with AMX turned off (the tile form gained nothing from it there). */
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
        #pragma GCC unroll 4
        for (int line = 0; line < block * 4; line += 64) __builtin_prefetch((const char *)wp + PREFETCH_BYTES + line);
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

#if HAVE_AMX
/* With AMX the same layout is a tile multiply's B operand as it stands: 16 input pairs x 16 outputs (64 bytes a
 * row, the block's row pitch apart) against an A tile of up to 16 x rows x 32 inputs. One tile multiply serves
 * those rows at the cost of one, where vdpbf16ps costs one instruction per row per 64 bytes of weight and limits
 * three or four rows to less than the memory's speed on a core with one 512-bit unit. */
#define TILE_INPUTS 32
/* Rows of x per A tile: more rows are multiplied in chunks of this many, each against the block's weight (which
 * the first chunk brought into the core's cache). */
#define ROWS_PER_TILE 16
/* Tiles 0..3 hold the sums of the block's 16-output groups; the intrinsics take tile numbers as literals. */
#define TILE_A 4
#define TILE_B0 5
#define TILE_B1 6

static void configure_tiles(int64_t rows)
{
    struct tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int tile = 0; tile <= TILE_B1; tile++) {
        config.bytes_per_row[tile] = 64;
        config.rows[tile] = tile >= TILE_B0 ? TILE_INPUTS / 2 : (uint8_t)rows;
    }
    _tile_loadconfig(&config);
}

/* One chunk of up to ROWS_PER_TILE rows of x against one block: acc [rows][block] fp32. */
static void amx_block_product(const uint16_t *w, int64_t in_features, int64_t padded_in, int block,
                              const uint16_t *x, int64_t x_stride, int64_t rows, float *acc)
{
    const int64_t pitch = block * 4;  /* bytes from one input pair's row of the block to the next */
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t k0 = 0; k0 < padded_in; k0 += TILE_INPUTS) {
        const uint16_t *wk = w + k0 * block;
        uint16_t tail[ROWS_PER_TILE][TILE_INPUTS];
        if (k0 + TILE_INPUTS <= in_features) {
            _tile_loadd(TILE_A, x + k0, x_stride * 2);
        } else {  /* x ends inside this chunk: the rest of its inputs are zeros, as the weight's padding is */
            memset(tail, 0, sizeof tail);
            for (int64_t t = 0; t < rows; t++)
                if (k0 < in_features) memcpy(tail[t], x + t * x_stride + k0, (in_features - k0) * 2);
            compiler_memory_barrier();
            _tile_loadd(TILE_A, tail, sizeof tail[0]);
        }
        _tile_loadd(TILE_B0, wk, pitch);
        _tile_dpbf16ps(0, TILE_A, TILE_B0);
        if (block >= 32) {
            _tile_loadd(TILE_B1, wk + 32, pitch);
            _tile_dpbf16ps(1, TILE_A, TILE_B1);
        }
        if (block == 64) {
            _tile_loadd(TILE_B0, wk + 64, pitch);
            _tile_dpbf16ps(2, TILE_A, TILE_B0);
            _tile_loadd(TILE_B1, wk + 96, pitch);
            _tile_dpbf16ps(3, TILE_A, TILE_B1);
        }
    }
    _tile_stored(0, acc, pitch);
    if (block >= 32) _tile_stored(1, acc + 16, pitch);
    if (block == 64) { _tile_stored(2, acc + 32, pitch); _tile_stored(3, acc + 48, pitch); }
    compiler_memory_barrier();
}
#endif

#define BF16_ROWS_CASES(block) \
    switch (rows) { \
    case 1: bf16_block_product(wb, in_features, block, x, x_stride, 1, acc); break; \
    case 2: bf16_block_product(wb, in_features, block, x, x_stride, 2, acc); break; \
    case 3: bf16_block_product(wb, in_features, block, x, x_stride, 3, acc); break; \
    default: bf16_block_product(wb, in_features, block, x, x_stride, 4, acc); break; \
    }

/* The most rows one call takes where tiles serve (in chunks of ROWS_PER_TILE), and whether they serve a weight of
 * padded_in inputs here: 0 where the dot-product form takes every call (at most MAX_ROWS rows). */
#define MAX_TILE_CALL_ROWS 64
int matvec_bf16_tile_rows(int64_t padded_in)
{
#if HAVE_AMX
    return padded_in % TILE_INPUTS == 0 && amx_permitted() ? MAX_TILE_CALL_ROWS : 0;
#else
    (void)padded_in;
    return 0;
#endif
}

static inline void store_bf16_rows(const float *acc, int64_t block, int64_t first, int64_t width, int64_t rows,
                                   const float *bias, uint16_t *y, int64_t y_stride)
{
    for (int64_t t = 0; t < rows; t++) {
        uint16_t *out = y + t * y_stride + first;
        for (int64_t j = 0; j < width; j++)
            out[j] = f32_to_bf16(acc[t * block + j] + (bias ? bias[first + j] : 0.0f));
    }
}

/* block is 16, 32 or 64, padded_in even and >= in_features; x has unit column stride. allow_tiles 0 takes the
 * dot-product form even where AMX is there (tests compare the two). rows: 1..MAX_TILE_CALL_ROWS where
 * matvec_bf16_tile_rows(padded_in) is nonzero and tiles are allowed, else 1..MAX_ROWS (the caller checks). */
void packed_matvec_bf16(const uint16_t *w, int64_t out_features, int64_t in_features, int64_t padded_in,
                        int64_t block, const uint16_t *x, int64_t x_stride, int64_t rows, const float *bias,
                        uint16_t *y, int64_t y_stride, int num_threads, int allow_tiles)
{
    const int64_t num_blocks = (out_features + block - 1) / block;
#if HAVE_AMX
    const int use_amx = allow_tiles && matvec_bf16_tile_rows(padded_in) > 0;
#else
    (void)allow_tiles;
#endif
    #pragma omp parallel num_threads(num_threads) if (num_threads > 1 && num_blocks > 1)
    {
#if HAVE_AMX
        int64_t configured_rows = 0;
#endif
        /* nowait: the end of the region is then the one place a thread waits for the other (each wait for a
         * thread the scheduler has not run yet costs more than a small weight's reads on a shared machine). */
        #pragma omp for schedule(static) nowait
        for (int64_t b = 0; b < num_blocks; b++) {
            const uint16_t *wb = w + b * block * padded_in;
            const int64_t first = b * block;
            const int64_t width = out_features - first < block ? out_features - first : block;
#if HAVE_AMX
            if (use_amx) {
                float acc[ROWS_PER_TILE * MAX_BF16_BLOCK];
                for (int64_t t0 = 0; t0 < rows; t0 += ROWS_PER_TILE) {
                    const int64_t chunk = rows - t0 < ROWS_PER_TILE ? rows - t0 : ROWS_PER_TILE;
                    if (chunk != configured_rows) configure_tiles(configured_rows = chunk);
                    amx_block_product(wb, in_features, padded_in, (int)block, x + t0 * x_stride, x_stride, chunk,
                                      acc);
                    store_bf16_rows(acc, block, first, width, chunk, bias, y + t0 * y_stride, y_stride);
                }
                continue;
            }
#endif
            float acc[MAX_ROWS * MAX_BF16_BLOCK];
            switch (block) {
            case 64: BF16_ROWS_CASES(64) break;
            case 32: BF16_ROWS_CASES(32) break;
            default: BF16_ROWS_CASES(16) break;
            }
            store_bf16_rows(acc, block, first, width, rows, bias, y, y_stride);
        }
#if HAVE_AMX
        /* Gives the tile state back, so that the thread's context switches stop saving 8 KB of it. */
        if (configured_rows) _tile_release();
#endif
    }
}
