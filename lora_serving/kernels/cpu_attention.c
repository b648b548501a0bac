/* Decode attention on CPU, straight from the paged KV cache: out[t, h] = softmax(scale * q[t, h] . K_t) V_t for
 * one query token per sequence, every sequence and head in one call.
 *
 * Built with the other CPU kernels by kernels/cpu_native.py; called by kernels/cpu_attention.py. Torch's way
 * (handler/attention.py) is one scaled_dot_product_attention call per sequence and layer, or one over all of
 * them after gathering their blocks into a padded tensor: at one query row per sequence both cost several
 * times the bytes they read (docs/BENCHMARKS.md). Here each work item, one sequence's one KV head with the
 * query heads that share it (grouped-query attention reads K/V once for the group), walks the sequence's
 * block table and reads its keys and values in place, wherever the blocks are.
 *
 * Layouts: q [T, q_heads, d] with strides (q_token_stride, q_head_stride, 1); cache [kv_heads, num_blocks,
 * block_size, d] contiguous, for K and for V; block_tables [T, table_width] int64; token t attends to keys
 * starts[t] .. lengths[t] - 1 (starts NULL: from 0); out [T, q_heads, d] contiguous. Query head h uses KV head
 * h / (q_heads / kv_heads), as in the reference implementation. Scores and sums are fp32.
 *
 * Two entry points share one body: _f32 for fp32 q, caches and out, _bf16 for bf16 ones (raw 16-bit words).
 * The bf16 form widens each query, key and value row to fp32 as it reads it (a shift: bf16 is fp32's upper
 * half), so everything after the read is the fp32 arithmetic, and rounds the output to bf16 (to nearest even)
 * as torch's bf16 attention does.
 *
 * The keys go by tiles of VEC_LANES (cpu_vec.h: 16 with AVX-512, else 8): one tile's dot products with a query
 * are VEC_LANES running vector sums whose lanes are summed all together at the end (lane_sums' tree), so that a
 * tile's scores come out as one vector with no horizontal sum per key (with AVX-512's 32 registers, for up to
 * three query heads at once: each key vector read once for them all); the softmax's exp is a vector one
 * (exp_w); and the weighted sum of values adds a tile's rows into the result, held in registers through the
 * tile, scaled by 1/sum of the weights once at the end (cpu_attention_tiles.h).
 *
 * A tile is read in place when it is VEC_LANES fp32 rows of one block with head_dim a multiple of VEC_LANES;
 * otherwise (bf16, a ragged head_dim, a tile across blocks: small blocks, a sliding window's start, a
 * sequence's last keys) its rows are first gathered into a scratch tile, widened to fp32 and padded with zeros
 * to a whole number of vectors, which the loops then read as they read the cache. With AVX-512, bf16 keys of a
 * whole tile in one block are read in place too when head_dim is a multiple of 32: 32 words as 16 pairs of an
 * even and an odd element, against queries split the same way (tile_scores' in_pairs); the values are still
 * gathered (in pairs they measured slower: each row would be widened once per query head).
 *
 * bf16 on a CPU with AMX (and the OS's leave to use it) takes AMX tile multiplies instead, where head_dim is a
 * multiple of 32 and a KV head serves at most 8 query heads (cpu_attention_amx.h): keys read in place as the
 * A operand of the scores, the same fp32 softmax, the weights as two bf16 parts against the values in pairs.
 * The vector route above stays for every other case and CPU, and where the caller asks for it
 * (paged_decode_attention_bf16_vectors; tests compare the two).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_attention_amx.h"
#include "cpu_attention_tiles.h"
#include "cpu_vec.h"

/* n elements from `source` (fp32 or bf16 words, by `is_bf16`) as fp32 into `row`. */
static inline __attribute__((always_inline)) void widen_row(const void *source, int is_bf16, int64_t n, float *row)
{
    if (!is_bf16) {
        memcpy(row, source, sizeof(float) * n);
        return;
    }
    const uint16_t *words = source;
    int64_t i = 0;
    for (; i + VEC_LANES <= n; i += VEC_LANES) storew(row + i, load_bf16w(words + i));
    for (; i < n; i++) row[i] = bf16_to_f32(words[i]);
}

/* Where a sequence's keys (or values) are: position -> element offset in the cache. */
struct Sequence {
    const char *cache;
    int64_t element, head_offset, block_size, head_dim;
    const int64_t *table;
};

static inline int64_t row_at(const struct Sequence *s, int64_t position)
{
    return s->head_offset + (s->table[position / s->block_size] * s->block_size + position % s->block_size)
                                * s->head_dim;
}

/* Asks for the rows of positions from .. from + n - 1 ahead of their use (`near`: into L1, else L2): a sequence's
 * blocks are scattered runs of block_size rows, which the hardware prefetchers follow too late. */
static inline void prefetch_positions(const struct Sequence *s, int64_t from, int64_t n, int near)
{
    const int64_t row_bytes = s->element * s->head_dim;
    while (n > 0) {
        const int64_t left_in_block = s->block_size - from % s->block_size;
        const int64_t run = n < left_in_block ? n : left_in_block;
        const char *base = s->cache + s->element * row_at(s, from);
        for (int64_t offset = 0; offset < run * row_bytes; offset += 64) prefetch_line(base + offset, near);
        from += run;
        n -= run;
    }
}

/* Keys asked for this many positions ahead of the tile being scored (into L1). */
#define PREFETCH_KEYS (4 * VEC_LANES)

/* The tile of positions first .. first + n - 1 (n <= VEC_LANES) as rows of `*stride` floats from the returned
 * pointer: the cache itself when it holds them so, else `scratch` (VEC_LANES rows of whole_vectors(head_dim),
 * whose columns past head_dim are zero), gathered and widened there, rows past n zeroed. */
static inline __attribute__((always_inline)) const float *tile_rows(const struct Sequence *s, int is_bf16,
                                                                    int64_t first, int64_t n, float *scratch,
                                                                    int64_t *stride)
{
    if (!is_bf16 && n == VEC_LANES && s->head_dim % VEC_LANES == 0
        && first % s->block_size + VEC_LANES <= s->block_size) {
        *stride = s->head_dim;
        return (const float *)(s->cache + s->element * row_at(s, first));
    }
    const int64_t width = whole_vectors(s->head_dim);
    if (width == s->head_dim && first % s->block_size + n <= s->block_size) {  /* n consecutive rows: one run */
        widen_row(s->cache + s->element * row_at(s, first), is_bf16, n * width, scratch);
    } else {
        int64_t block = first / s->block_size, offset = first % s->block_size;
        for (int64_t k = 0; k < n; k++) {
            const int64_t at = s->head_offset + (s->table[block] * s->block_size + offset) * s->head_dim;
            widen_row(s->cache + s->element * at, is_bf16, s->head_dim, scratch + k * width);
            if (++offset == s->block_size) offset = 0, block++;
        }
    }
    if (n < VEC_LANES) memset(scratch + n * width, 0, sizeof(float) * (VEC_LANES - n) * width);
    *stride = width;
    return scratch;
}

/* The largest lane of v. */
static inline float lane_max(vecw v)
{
    float top = v[0];
    for (int k = 1; k < VEC_LANES; k++) top = v[k] > top ? v[k] : top;
    return top;
}

/* row[0 .. padded) = e^(row - max(row[0 .. count))), 0 past count; returns their sum. */
static inline float softmax_weights(float *row, int64_t count, int64_t padded)
{
    for (int64_t p = count; p < padded; p++) row[p] = -INFINITY;
    vecw top = (vecw){0} - INFINITY;
    for (int64_t p = 0; p < padded; p += VEC_LANES) {
        const vecw scores = loadw(row + p);
        top = select_w((veciw)(scores > top), scores, top);
    }
    const float highest = lane_max(top);
    vecw sums = {0};
    for (int64_t p = 0; p < padded; p += VEC_LANES) {
        const vecw weights = exp_w(loadw(row + p) - highest);
        storew(row + p, weights);
        sums += weights;
    }
    float total = 0.0f;
    for (int k = 0; k < VEC_LANES; k++) total += sums[k];
    return total;
}

/* Returns 0, or -1 when scratch memory could not be had (nothing is written then). Pointers are to fp32 or, with
 * is_bf16, to bf16 elements; strides and offsets count elements. */
static inline __attribute__((always_inline)) int paged_decode_attention(
    int is_bf16, int64_t num_tokens, const void *q, int64_t q_token_stride, int64_t q_head_stride, int64_t q_heads,
    int64_t kv_heads, int64_t head_dim, const void *k_cache, const void *v_cache, int64_t num_blocks,
    int64_t block_size, const int64_t *block_tables, int64_t table_width, const int64_t *lengths,
    const int64_t *starts, float scale, void *out, int num_threads, int allow_tiles)
{
    const int64_t element = is_bf16 ? 2 : 4;
    const char *q_bytes = q;
    const int64_t group = q_heads / kv_heads;
    const int64_t head_span = num_blocks * block_size * head_dim;
    const int64_t width = whole_vectors(head_dim);
    int64_t longest = 1;
    for (int64_t t = 0; t < num_tokens; t++) {
        const int64_t count = lengths[t] - (starts ? starts[t] : 0);
        if (count > longest) longest = count;
    }
    const int64_t num_items = num_tokens * kv_heads;
    /* Per thread: the scores, the group's queries and results in fp32 (rows of `width`), one tile, one row of
     * bf16 output words. Zeroed: the columns past head_dim must read as 0. */
    const int64_t scratch_floats = group * whole_vectors(longest) + 3 * group * width + VEC_LANES * width + width;
    /* bf16 keys are read in place, in pairs, where head_dim is whole runs of 2 * VEC_LANES (AVX-512 only). */
    const int in_pairs = VEC_LANES == 16 && is_bf16 && head_dim % (2 * VEC_LANES) == 0;
#if HAVE_ATTENTION_TILES
    const int use_tiles = is_bf16 && allow_tiles && attention_tiles_serve(head_dim, group);
    const int64_t scratch_bytes = use_tiles ? tile_scratch_bytes(group, head_dim, longest)
                                            : (int64_t)sizeof(float) * scratch_floats;
#else
    (void)allow_tiles;
    const int64_t scratch_bytes = sizeof(float) * scratch_floats;
#endif
    int failed = 0;
    int64_t next_item = 0;  /* the tile route's work queue */
    #pragma omp parallel num_threads(num_threads) if (num_threads > 1 && num_items > 1)
    {
        float *scores = NULL;
        if (posix_memalign((void **)&scores, 64, scratch_bytes) == 0)
            memset(scores, 0, scratch_bytes);
        else
            scores = NULL;
        #pragma omp atomic
        failed += scores == NULL;
        #pragma omp barrier
#if HAVE_ATTENTION_TILES
        if (!failed && use_tiles) {
            struct TileScratch tile_scratch = tile_scratch_at((char *)scores, group, head_dim, longest);
            const struct TileCall call = {k_cache, v_cache, block_tables, lengths, starts, table_width, kv_heads,
                                          head_span, block_size, head_dim};
            configure_attention_tiles(group);
            /* Items as omp's dynamic schedule hands them out, but each thread claims its next item before it
             * works on the current one, so that it can ask for the next one's first rows ahead. */
            int64_t item = __atomic_fetch_add(&next_item, 1, __ATOMIC_RELAXED);
            while (item < num_items) {
                const int64_t following = __atomic_fetch_add(&next_item, 1, __ATOMIC_RELAXED);
                if (following < num_items) prefetch_item_start(&call, following);
                const int64_t t = item / kv_heads, h = item % kv_heads;
                struct TileSequence keys, values;
                item_sequences(&call, item, &keys, &values);
                const uint16_t *queries = (const uint16_t *)q + t * q_token_stride + h * group * q_head_stride;
                attention_item_tiles(&keys, &values, queries, q_head_stride, group, scale, &tile_scratch,
                                     (uint16_t *)out + (t * q_heads + h * group) * head_dim, softmax_weights);
                item = following;
            }
            /* Gives the tile state back, so that the thread's context switches stop saving 8 KB of it. */
            _tile_release();
        } else
#endif
        if (!failed) {
            float *queries = scores + group * whole_vectors(longest), *result = queries + group * width;
            float *tile = result + group * width, *split = tile + VEC_LANES * width + width;
            uint16_t *words = (uint16_t *)(tile + VEC_LANES * width);
            #pragma omp for schedule(dynamic, 1)
            for (int64_t item = 0; item < num_items; item++) {
                const int64_t t = item / kv_heads, h = item % kv_heads;
                const int64_t first = starts ? starts[t] : 0, count = lengths[t] - first;
                const int64_t padded = whole_vectors(count);
                const int64_t *table = block_tables + t * table_width;
                const struct Sequence keys = {k_cache, element, h * head_span, block_size, head_dim, table};
                const struct Sequence values = {v_cache, element, h * head_span, block_size, head_dim, table};
                for (int64_t g = 0; g < group; g++)
                    widen_row(q_bytes + element * (t * q_token_stride + (h * group + g) * q_head_stride), is_bf16,
                              head_dim, queries + g * width);
                if (in_pairs) split_pairs(queries, group * width, split);
                prefetch_positions(&keys, first, count < PREFETCH_KEYS ? count : PREFETCH_KEYS, 1);
                for (int64_t p = 0; p < count; p += VEC_LANES) {
                    const int64_t n = count - p < VEC_LANES ? count - p : VEC_LANES;
                    /* The keys PREFETCH_KEYS ahead into L1, this tile's values into L2 for the weighted sum. */
                    if (p + PREFETCH_KEYS < count) {
                        const int64_t ahead = count - p - PREFETCH_KEYS;
                        prefetch_positions(&keys, first + p + PREFETCH_KEYS, ahead < VEC_LANES ? ahead : VEC_LANES, 1);
                    }
                    prefetch_positions(&values, first + p, n, 0);
#if VEC_LANES == 16
                    if (in_pairs && n == VEC_LANES && (first + p) % block_size + VEC_LANES <= block_size) {
                        const uint16_t *rows = (const uint16_t *)k_cache + row_at(&keys, first + p);
                        tile_scores(scores + p, padded, split, group, rows, head_dim, width, scale, 1);
                        continue;
                    }
#endif
                    int64_t stride;
                    const float *rows = tile_rows(&keys, is_bf16, first + p, n, tile, &stride);
                    tile_scores(scores + p, padded, queries, group, rows, stride, width, scale, 0);
                }
                float inverse[group];
                for (int64_t g = 0; g < group; g++) {
                    const float total = softmax_weights(scores + g * padded, count, padded);
                    inverse[g] = total > 0.0f ? 1.0f / total : 0.0f;
                    memset(result + g * width, 0, sizeof(float) * width);
                }
                for (int64_t p = 0; p < count; p += VEC_LANES) {
                    const int64_t n = count - p < VEC_LANES ? count - p : VEC_LANES;
                    if (p + 2 * VEC_LANES < count) {  /* the values two tiles ahead, from L2 into L1 */
                        const int64_t ahead = count - p - 2 * VEC_LANES;
                        prefetch_positions(&values, first + p + 2 * VEC_LANES, ahead < VEC_LANES ? ahead : VEC_LANES, 1);
                    }
                    int64_t stride;
                    const float *rows = tile_rows(&values, is_bf16, first + p, n, tile, &stride);
                    for (int64_t g = 0; g < group; g++)
                        tile_accumulate(result + g * width, scores + g * padded + p, rows, stride, width);
                }
                for (int64_t g = 0; g < group; g++) {
                    float *row = result + g * width;
                    for (int64_t i = 0; i < width; i += VEC_LANES) storew(row + i, loadw(row + i) * inverse[g]);
                    const int64_t out_at = (t * q_heads + h * group + g) * head_dim;
                    if (is_bf16) {
                        for (int64_t i = 0; i < width; i += VEC_LANES) store_bf16w(words + i, loadw(row + i));
                        memcpy((uint16_t *)out + out_at, words, sizeof(uint16_t) * head_dim);
                    } else {
                        memcpy((float *)out + out_at, row, sizeof(float) * head_dim);
                    }
                }
            }
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
int paged_decode_attention_f32(
    int64_t num_tokens, const float *q, int64_t q_token_stride, int64_t q_head_stride, int64_t q_heads,
    int64_t kv_heads, int64_t head_dim, const float *k_cache, const float *v_cache, int64_t num_blocks,
    int64_t block_size, const int64_t *block_tables, int64_t table_width, const int64_t *lengths,
    const int64_t *starts, float scale, float *out, int num_threads)
{
    return paged_decode_attention(0, num_tokens, q, q_token_stride, q_head_stride, q_heads, kv_heads, head_dim,
                                  k_cache, v_cache, num_blocks, block_size, block_tables, table_width, lengths,
                                  starts, scale, out, num_threads, 1);
}

/* The bf16 form: by AMX tiles where they serve (attention_tiles_serve_here), else by vectors; the _vectors entry
 * takes the vector route always (tests compare the two; benchmarks too). */
#define BF16_ENTRY(name, allow_tiles)                                                                              \
    int name(int64_t num_tokens, const uint16_t *q, int64_t q_token_stride, int64_t q_head_stride, int64_t q_heads, \
             int64_t kv_heads, int64_t head_dim, const uint16_t *k_cache, const uint16_t *v_cache,                  \
             int64_t num_blocks, int64_t block_size, const int64_t *block_tables, int64_t table_width,              \
             const int64_t *lengths, const int64_t *starts, float scale, uint16_t *out, int num_threads)            \
    {                                                                                                               \
        return paged_decode_attention(1, num_tokens, q, q_token_stride, q_head_stride, q_heads, kv_heads, head_dim, \
                                      k_cache, v_cache, num_blocks, block_size, block_tables, table_width, lengths, \
                                      starts, scale, out, num_threads, allow_tiles);                                \
    }
BF16_ENTRY(paged_decode_attention_bf16, 1)
BF16_ENTRY(paged_decode_attention_bf16_vectors, 0)
#undef BF16_ENTRY

/* Whether the bf16 form multiplies with AMX tiles for this head_dim and group of query heads per KV head. */
int attention_tiles_serve_here(int64_t head_dim, int64_t group)
{
#if HAVE_ATTENTION_TILES
    return attention_tiles_serve(head_dim, group);
#else
    (void)head_dim, (void)group;
    return 0;
#endif
}

/* exp_w over n floats, for the tests that hold it to expf. */
void attention_exp_f32(const float *x, float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i += VEC_LANES) {
        float lanes[VEC_LANES] = {0};
        const int64_t m = n - i < VEC_LANES ? n - i : VEC_LANES;
        memcpy(lanes, x + i, sizeof(float) * m);
        storew(lanes, exp_w(loadw(lanes)));
        memcpy(y + i, lanes, sizeof(float) * m);
    }
}

/* The lanes of the vectors the kernel was built for (16 with AVX-512, else 8). */
int attention_vector_lanes(void) { return VEC_LANES; }
