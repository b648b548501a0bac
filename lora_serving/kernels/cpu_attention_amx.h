/* cpu_attention.c's bf16 route by AMX tiles (where the build targets AMX-BF16 and AVX-512, the OS grants the tile
 * state, head_dim is a multiple of 32 and a KV head serves at most 8 query heads). One work item, one sequence's
 * KV head with its group of query heads, in three steps:
 *
 *   scores: S^T [16 keys x group] = K [16 keys x 32 dims] . Q^T, summed over head_dim / 32 tile multiplies. K is
 *     the A operand read in place: one block's 16 key rows are rows head_dim words apart. Q^T is the B operand,
 *     pairs of dims side by side per query head, built once per item. The fp32 tile is spread into one row of
 *     scores per query head (scaled), where the vector softmax of the other routes serves as it is.
 *   weights: each head's softmax weights, as bf16 in two parts, w = hi + lo (hi: w rounded to bf16; lo: the
 *     rest, rounded again), so that the value sums lose ~16 bits of w rather than 8: torch and oneDNN round w to
 *     bf16 once before their second bf16 product, which puts the result further from the exact softmax than the
 *     fp32 weights of the vector routes did. Hi rows and lo rows are one A operand of 2 x group rows: one tile
 *     multiply per 32 keys and 16 columns serves both.
 *   values: O [2 x group x 16 columns] += weights [2 x group x 32 keys] . V [32 keys x 16 columns], V the B
 *     operand: pairs of keys side by side per column, interleaved from two rows of the cache into a small scratch
 *     per 32 keys (two shuffles per 64 bytes). Up to 64 columns stay in tiles through the keys; wider heads take
 *     their columns 64 at a time.
 *
 * Tiles start at a multiple of 16 positions (a sliding window's first key may be inside the first one), so that
 * with blocks of a multiple of 16 keys every tile lies in one block and is read in place; scores of positions
 * outside first .. length - 1 are set to -inf and their value rows to zeros (whatever the cache holds there).
 * Other block sizes gather each tile's rows into a scratch tile first. */
#ifndef CPU_ATTENTION_AMX_H
#define CPU_ATTENTION_AMX_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_amx.h"
#include "cpu_vec.h"

#if HAVE_AMX && VEC_LANES == 16
#define HAVE_ATTENTION_TILES 1
/* Tile numbers (the intrinsics take literals). 0..3: the output sums, 2 x group rows x 16 columns each. */
#define TILE_WEIGHTS 4  /* A: 2 x group rows x 32 keys (hi rows, then lo rows) */
#define TILE_ROWS 5     /* A of the scores: 16 keys x 32 dims; B of the values: 16 key pairs x 16 columns */
#define TILE_SCORES 6   /* C: 16 keys x group */
#define TILE_QUERIES 7  /* B: 16 dim pairs x group */
#define TILE_KEYS 16
#define TILE_TOKENS 32   /* keys per value tile multiply */
#define TILE_COLUMNS 64  /* output columns the four output tiles hold */
#define MAX_TILE_GROUP 8 /* 2 x group rows of weights in one A tile */
#define PREFETCH_TILES 4  /* tiles of keys the scores ask for ahead; of an item's first rows, asked for early */

typedef uint16_t words32 __attribute__((vector_size(64)));

static inline int attention_tiles_serve(int64_t head_dim, int64_t group)
{
    return head_dim % 32 == 0 && group >= 1 && group <= MAX_TILE_GROUP && amx_permitted();
}

static inline void configure_attention_tiles(int64_t group)
{
    struct tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int tile = 0; tile <= TILE_WEIGHTS; tile++) config.bytes_per_row[tile] = 64, config.rows[tile] = 2 * group;
    config.bytes_per_row[TILE_ROWS] = 64, config.rows[TILE_ROWS] = 16;
    config.bytes_per_row[TILE_SCORES] = config.bytes_per_row[TILE_QUERIES] = 4 * group;
    config.rows[TILE_SCORES] = config.rows[TILE_QUERIES] = 16;
    _tile_loadconfig(&config);
}

/* One thread's scratch, carved from one allocation (tile_scratch_bytes) in 64-byte aligned parts. */
struct TileScratch {
    float *scores;      /* group rows of `padded` */
    uint16_t *weights;  /* 2 x group rows of `padded` bf16 words */
    uint32_t *queries;  /* head_dim / 2 rows of group pairs */
    uint16_t *rows;     /* 16 gathered key rows */
    uint16_t *pairs;    /* 4 column tiles of 16 key pairs x 16 columns */
    float *tile;        /* one score tile, 16 x group */
    float *sums;        /* 2 x group rows of head_dim */
};

static inline int64_t tile_padding(int64_t longest) { return (longest + TILE_KEYS - 1 + 31) / 32 * 32; }

static inline int64_t aligned64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

static inline int64_t tile_scratch_bytes(int64_t group, int64_t head_dim, int64_t longest)
{
    const int64_t padded = tile_padding(longest);
    return aligned64(4 * group * padded) + aligned64(2 * 2 * group * padded) + aligned64(4 * head_dim / 2 * group)
           + aligned64(2 * TILE_KEYS * head_dim) + 4 * 16 * 64 + aligned64(4 * 16 * group)
           + aligned64(4 * 2 * group * head_dim);
}

static inline struct TileScratch tile_scratch_at(char *base, int64_t group, int64_t head_dim, int64_t longest)
{
    const int64_t padded = tile_padding(longest);
    struct TileScratch s;
    s.scores = (float *)base, base += aligned64(4 * group * padded);
    s.weights = (uint16_t *)base, base += aligned64(2 * 2 * group * padded);
    s.queries = (uint32_t *)base, base += aligned64(4 * head_dim / 2 * group);
    s.rows = (uint16_t *)base, base += aligned64(2 * TILE_KEYS * head_dim);
    s.pairs = (uint16_t *)base, base += 4 * 16 * 64;
    s.tile = (float *)base, base += aligned64(4 * 16 * group);
    s.sums = (float *)base;
    return s;
}

/* Where one KV head's rows of a sequence are. */
struct TileSequence {
    const uint16_t *cache;  /* the KV head's [num_blocks, block_size, head_dim] */
    const int64_t *table;
    int64_t block_size, head_dim, first, length;
};

static inline const uint16_t *tile_row(const struct TileSequence *s, int64_t position)
{
    return s->cache + (s->table[position / s->block_size] * s->block_size + position % s->block_size) * s->head_dim;
}

/* The 16 rows of positions at .. at + 15 (at a multiple of 16, some of them in first .. length - 1) as rows
 * head_dim words apart: in place where the block holds them all, else gathered into `scratch` (zeros outside the
 * sequence's keys). */
static inline const uint16_t *tile_key_rows(const struct TileSequence *s, int64_t at, uint16_t *scratch)
{
    if (s->block_size % TILE_KEYS == 0) return tile_row(s, at);
    for (int64_t r = 0; r < TILE_KEYS; r++) {
        uint16_t *row = scratch + r * s->head_dim;
        if (at + r >= s->first && at + r < s->length) memcpy(row, tile_row(s, at + r), 2 * s->head_dim);
        else memset(row, 0, 2 * s->head_dim);
    }
    return scratch;
}

/* Asks for the 16 rows of positions at .. at + 15 (in place: blocks of a multiple of 16 keys) ahead of their use:
 * a sequence's blocks are scattered 2 KB runs (at head_dim 64), which the hardware prefetchers follow too late,
 * so that without this the tile loads wait on memory most of the time. `near`: into L1, else L2. */
static inline void prefetch_tile(const struct TileSequence *s, int64_t at, int near)
{
    if (s->block_size % TILE_KEYS || at >= s->length) return;
    const char *base = (const char *)tile_row(s, at);
    for (int64_t offset = 0; offset < 2 * TILE_KEYS * s->head_dim; offset += 64) prefetch_line(base + offset, near);
}

/* What a call's work items share: item = sequence t x kv_heads + KV head h, as in cpu_attention.c. */
struct TileCall {
    const uint16_t *k_cache, *v_cache;
    const int64_t *block_tables, *lengths, *starts;
    int64_t table_width, kv_heads, head_span, block_size, head_dim;
};

static inline void item_sequences(const struct TileCall *c, int64_t item, struct TileSequence *keys,
                                  struct TileSequence *values)
{
    const int64_t t = item / c->kv_heads, h = item % c->kv_heads;
    const int64_t *table = c->block_tables + t * c->table_width;
    const int64_t first = c->starts ? c->starts[t] : 0;
    *keys = (struct TileSequence){c->k_cache + h * c->head_span, table, c->block_size, c->head_dim, first,
                                  c->lengths[t]};
    *values = *keys;
    values->cache = c->v_cache + h * c->head_span;
}

/* Asks for an item's first keys and values into L2, while the thread still works on the item before it: without
 * it each item began with its first tiles' wait on memory (a tenth of the time at contexts of ~100 keys). */
static inline void prefetch_item_start(const struct TileCall *c, int64_t item)
{
    struct TileSequence keys, values;
    item_sequences(c, item, &keys, &values);
    const int64_t origin = keys.first - keys.first % TILE_KEYS;
    for (int64_t k = 0; k < PREFETCH_TILES; k++) {
        prefetch_tile(&keys, origin + k * TILE_KEYS, 0);
        prefetch_tile(&values, origin + k * TILE_KEYS, 0);
    }
}

/* The value rows of positions at .. at + 31 as B operands for columns c0 .. c0 + 16 x tiles: for tile j, 16 rows
 * of (V[2p][c], V[2p + 1][c]) for its 16 columns c, rows outside first .. length - 1 read as zeros. */
static inline void tile_value_pairs(const struct TileSequence *s, int64_t at, int64_t c0, int tiles,
                                    uint16_t *pairs)
{
    const uint16_t *rows[TILE_TOKENS];
    for (int half = 0; half < 2; half++) {
        const int64_t start = at + half * TILE_KEYS;
        const uint16_t *base = NULL;
        if (s->block_size % TILE_KEYS == 0 && start < s->length) base = tile_row(s, start);
        for (int r = 0; r < TILE_KEYS; r++) {
            const int64_t position = start + r;
            const int valid = position >= s->first && position < s->length;
            rows[half * TILE_KEYS + r] = !valid ? NULL : base ? base + r * s->head_dim : tile_row(s, position);
        }
    }
    const words32 zero = {0};
    for (int p = 0; p < TILE_TOKENS / 2; p++)
        for (int k = 0; k < tiles / 2; k++) {
            words32 even = zero, odd = zero;
            if (rows[2 * p]) memcpy(&even, rows[2 * p] + c0 + 32 * k, 64);
            if (rows[2 * p + 1]) memcpy(&odd, rows[2 * p + 1] + c0 + 32 * k, 64);
            const words32 low = __builtin_shufflevector(even, odd, 0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7,
                                                        39, 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15,
                                                        47);
            const words32 high = __builtin_shufflevector(even, odd, 16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53,
                                                         22, 54, 23, 55, 24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29,
                                                         61, 30, 62, 31, 63);
            memcpy(pairs + (2 * k) * 512 + p * 32, &low, 64);
            memcpy(pairs + (2 * k + 1) * 512 + p * 32, &high, 64);
        }
}

/* The item's bf16 outputs, group rows of head_dim words at out, for the queries q + g * q_head_stride. The
 * softmax is that of cpu_attention.c (softmax_weights, passed in so that this header needs none of its parts). */
static inline void attention_item_tiles(const struct TileSequence *keys, const struct TileSequence *values,
                                        const uint16_t *q, int64_t q_head_stride, int64_t group, float scale,
                                        struct TileScratch *s, uint16_t *out,
                                        float (*softmax)(float *, int64_t, int64_t))
{
    const int64_t head_dim = keys->head_dim, first = keys->first, length = keys->length;
    if (length <= first) {  /* no keys: zeros, as the vector routes give */
        memset(out, 0, 2 * group * head_dim);
        return;
    }
    const int64_t lead = first % TILE_KEYS, origin = first - lead, span = length - origin;
    const int64_t padded = (span + TILE_TOKENS - 1) / TILE_TOKENS * TILE_TOKENS;
    for (int64_t p = 0; p < head_dim / 2; p++)
        for (int64_t g = 0; g < group; g++) memcpy(s->queries + p * group + g, q + g * q_head_stride + 2 * p, 4);
    const __m512i spread = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32((int)group));
    for (int64_t t0 = 0; t0 < span; t0 += TILE_KEYS) {
        prefetch_tile(keys, origin + t0 + PREFETCH_TILES * TILE_KEYS, 1);
        prefetch_tile(values, origin + t0, 0);
        const uint16_t *rows = tile_key_rows(keys, origin + t0, s->rows);
        compiler_memory_barrier();
        _tile_zero(TILE_SCORES);
        for (int64_t c = 0; c < head_dim; c += 32) {
            _tile_loadd(TILE_ROWS, rows + c, 2 * head_dim);
            _tile_loadd(TILE_QUERIES, s->queries + c / 2 * group, 4 * group);
            _tile_dpbf16ps(TILE_SCORES, TILE_ROWS, TILE_QUERIES);
        }
        _tile_stored(TILE_SCORES, s->tile, 4 * group);
        compiler_memory_barrier();
        for (int64_t g = 0; g < group; g++) {
            const vecw scores = (vecw)_mm512_i32gather_ps(spread, s->tile + g, 4);
            storew(s->scores + g * padded + t0, scale * scores);
        }
    }
    float inverse[MAX_TILE_GROUP];
    for (int64_t g = 0; g < group; g++) {
        float *row = s->scores + g * padded;
        for (int64_t i = 0; i < lead; i++) row[i] = -INFINITY;
        const float total = softmax(row, span, padded);
        inverse[g] = total > 0.0f ? 1.0f / total : 0.0f;
        uint16_t *high = s->weights + g * padded, *low = s->weights + (group + g) * padded;
        for (int64_t i = 0; i < padded; i += VEC_LANES) {
            const vecw weights = loadw(row + i);
            store_bf16w(high + i, weights);
            store_bf16w(low + i, weights - load_bf16w(high + i));
        }
    }
    for (int64_t c0 = 0; c0 < head_dim; c0 += TILE_COLUMNS) {
        const int tiles = (head_dim - c0 < TILE_COLUMNS ? head_dim - c0 : TILE_COLUMNS) / 16;  /* 2 or 4 */
        _tile_zero(0);
        _tile_zero(1);
        if (tiles == 4) {
            _tile_zero(2);
            _tile_zero(3);
        }
        for (int64_t t0 = 0; t0 < span; t0 += TILE_TOKENS) {
            prefetch_tile(values, origin + t0 + 2 * TILE_TOKENS, 1);
            prefetch_tile(values, origin + t0 + 2 * TILE_TOKENS + TILE_KEYS, 1);
            tile_value_pairs(values, origin + t0, c0, tiles, s->pairs);
            compiler_memory_barrier();
            _tile_loadd(TILE_WEIGHTS, s->weights + t0, 2 * padded);
            _tile_loadd(TILE_ROWS, s->pairs, 64);
            _tile_dpbf16ps(0, TILE_WEIGHTS, TILE_ROWS);
            _tile_loadd(TILE_ROWS, s->pairs + 512, 64);
            _tile_dpbf16ps(1, TILE_WEIGHTS, TILE_ROWS);
            if (tiles == 4) {
                _tile_loadd(TILE_ROWS, s->pairs + 2 * 512, 64);
                _tile_dpbf16ps(2, TILE_WEIGHTS, TILE_ROWS);
                _tile_loadd(TILE_ROWS, s->pairs + 3 * 512, 64);
                _tile_dpbf16ps(3, TILE_WEIGHTS, TILE_ROWS);
            }
        }
        _tile_stored(0, s->sums + c0, 4 * head_dim);
        _tile_stored(1, s->sums + c0 + 16, 4 * head_dim);
        if (tiles == 4) {
            _tile_stored(2, s->sums + c0 + 32, 4 * head_dim);
            _tile_stored(3, s->sums + c0 + 48, 4 * head_dim);
        }
        compiler_memory_barrier();
    }
    for (int64_t g = 0; g < group; g++) {
        const float *high = s->sums + g * head_dim, *low = s->sums + (group + g) * head_dim;
        for (int64_t i = 0; i < head_dim; i += VEC_LANES)
            store_bf16w(out + g * head_dim + i, (loadw(high + i) + loadw(low + i)) * inverse[g]);
    }
}
#else
#define HAVE_ATTENTION_TILES 0
#endif

#endif
