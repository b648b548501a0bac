/* The CPU LoRA kernel for decode-sized segments: y[t] += (x[t] @ A_s) @ B_s for the tokens of each slot.
 *
 * Built at first use by kernels/cpu_native.py (cc -O3 -march=native -fopenmp) and called through ctypes.
 * It replaces the torch path's embedding_bag calls, which sum rank-wide rows one call per shrink and
 * per expand slice, with one pass per work item: an item is up to TOKEN_BLOCK tokens of one slot, whose
 * A rows are read once for all of them and whose B rows are read once per rank for all of them. Items
 * run in parallel on torch's own OpenMP pool (the process has loaded torch's libgomp before this library,
 * so the loader binds libgomp.so.1 to that copy) with as many threads as torch uses at the call.
 *
 * Layouts (kernels/layout.py, rank-major):
 *   a_rows            [S * H, a_width]: row s * H + h holds every slice's lora_a[s, :, h], slice i's ranks
 *                     at columns i * max_rank ...
 *   b_rows[i]         [S * max_rank, out_widths[i]]: row s * max_rank + j holds lora_b_i[s, :, j]
 *   slice_ranks[i]    [S]: slice i's rank per slot (int32, or int64 when ranks_are_int64); 0 = untargeted
 *   x [T, H] and y [T, O] have unit column strides; slice i adds into y's columns out_offsets[i] ...
 *   a_compact         optional, [S * H * a_width] (kernels/cpu_native.py, CompactA): slot s's block holds row h
 *                     of its A at h * w_s, w_s = the sum of its slices' ranks, slice i's ranks after slice i-1's;
 *                     compact_ranks [S, num_slices] int64 are the ranks that block was made for. An item reads
 *                     the compact block when the slot's ranks still equal them, else a_rows. In a_rows each
 *                     slice takes max_rank columns, so a rank-8 adapter under max_rank 16 reads twice its A.
 * Accumulation is fp32 in the same order as the embedding_bag route (feature by feature, rank by rank).
 * Each row of A and of B is read once for all the tokens of an item (up to 12 running sums of eight stay in
 * vector registers: tokens x vectors), instead of once per token (a single-thread warm harness measured
 * 1.3-1.7x from it; at two threads and in the engine, where reading the adapter rows is the cost, no difference
 * was shown: docs/BENCHMARKS.md, Kernels). Summed in memory, each step would wait on the last one's store
 * (store-to-load latency), which once made the kernel ~2x slower than its arithmetic and bytes.
 *
 * Two entry points share one body: lora_add_f32 for fp32 buffers, x and y; lora_add_bf16 for bf16 ones. The bf16
 * form widens each weight row to fp32 as it loads it (bf16 is fp32's upper half: a shift), each token's x row and
 * y row into fp32 scratch first, sums in fp32 as above and rounds y to bf16 once at the end (to nearest even).
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_vec.h"

typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

/* Eight weights from fp32 or (is_bf16) bf16 elements, element offset `at`, as fp32. */
static inline __attribute__((always_inline)) vec8 load8_any(const void *base, int64_t at, int is_bf16)
{
    if (!is_bf16) return load8((const float *)base + at);
    u16x8 half;
    memcpy(&half, (const uint16_t *)base + at, sizeof half);
    return (vec8)(__builtin_convertvector(half, u32x8) << 16);
}

static inline __attribute__((always_inline)) float load1_any(const void *base, int64_t at, int is_bf16)
{
    return is_bf16 ? bf16_to_f32(((const uint16_t *)base)[at]) : ((const float *)base)[at];
}

#define TOKEN_BLOCK 4
#define MAX_SLICES 8

static int64_t rank_of(const void *ranks, int ranks_are_int64, int64_t slot)
{
    return ranks_are_int64 ? ((const int64_t *)ranks)[slot] : ((const int32_t *)ranks)[slot];
}

int lora_token_block(void) { return TOKEN_BLOCK; }

/* Up to MAX_SUMS vectors of running sums live in registers (AVX2 has 16: the rest hold a loaded row and the
 * broadcast scales). */
#define MAX_SUMS 12

/* For tokens k < K: out[k][i] (+)= sum_{r < count} scales[k][r] * rows[first + r * stride + i], i < 8 * V
 * (rows: fp32 or, is_bf16, bf16 elements). Each row is read once for all K tokens. */
static inline __attribute__((always_inline)) void scaled_row_sums(
    const void *rows, int64_t first, int64_t stride, int64_t count, const float *const *scales, const int V,
    const int K, const int add_to_out, const int is_bf16, float *const *out)
{
    vec8 sums[MAX_SUMS];
    for (int k = 0; k < K; k++)
        for (int v = 0; v < V; v++) sums[k * V + v] = add_to_out ? load8(out[k] + 8 * v) : (vec8){0};
    for (int64_t r = 0; r < count; r++) {
        const int64_t row = first + r * stride;
        #pragma GCC unroll 12
        for (int v = 0; v < V; v++) {
            const vec8 value = load8_any(rows, row + 8 * v, is_bf16);
            #pragma GCC unroll 4
            for (int k = 0; k < K; k++) sums[k * V + v] += value * scales[k][r];
        }
    }
    for (int k = 0; k < K; k++)
        for (int v = 0; v < V; v++) store8(out[k] + 8 * v, sums[k * V + v]);
}

/* Every (vectors, tokens) pair that vectors_for allows, each compiled with constant bounds so that its sums are
 * registers. */
#define CASE(V, K) case (V) * 8 + (K):                                                                      \
    if (is_bf16) scaled_row_sums(rows, first, stride, count, scales, V, K, add_to_out, 1, out);               \
    else scaled_row_sums(rows, first, stride, count, scales, V, K, add_to_out, 0, out);                       \
    break;
static void scaled_row_sums_any(const void *rows, int64_t first, int64_t stride, int64_t count,
                                const float *const *scales, int vectors, int tokens, int add_to_out, int is_bf16,
                                float *const *out)
{
    switch (vectors * 8 + tokens) {
    CASE(1, 1) CASE(2, 1) CASE(3, 1) CASE(4, 1) CASE(5, 1) CASE(6, 1) CASE(7, 1) CASE(8, 1)
    CASE(1, 2) CASE(2, 2) CASE(3, 2) CASE(4, 2) CASE(5, 2) CASE(6, 2)
    CASE(1, 3) CASE(2, 3) CASE(3, 3) CASE(4, 3)
    CASE(1, 4) CASE(2, 4) CASE(3, 4)
    default: break;
    }
}
#undef CASE

/* The most vectors of columns a pass takes for `tokens` tokens: tokens x vectors <= MAX_SUMS. */
static int vectors_for(int tokens) { return tokens == 1 ? 8 : tokens == 2 ? 6 : tokens == 3 ? 4 : 3; }

/* shrunk[k][j] for j < columns, k < count: the slot's A rows (a, from element a_first) against each token's
 * features. */
static void shrink(const void *a, int64_t a_first, int64_t a_width, int64_t hidden, const float *const *xs,
                   int count, int64_t columns, int is_bf16, float *const *shrunk)
{
    const int max_vectors = vectors_for(count);
    int64_t j = 0;
    for (; j < columns && j + 8 <= a_width;) {
        int64_t vectors = (columns - j + 7) / 8;
        if (vectors > max_vectors) vectors = max_vectors;
        if (j + 8 * vectors > a_width) vectors = (a_width - j) / 8;
        float *outs[TOKEN_BLOCK];
        for (int k = 0; k < count; k++) outs[k] = shrunk[k] + j;
        scaled_row_sums_any(a, a_first + j, a_width, hidden, xs, (int)vectors, count, 0, is_bf16, outs);
        j += 8 * vectors;
    }
    for (; j < columns; j++) {  /* a row narrower than a vector's reach: one column at a time */
        for (int k = 0; k < count; k++) {
            float sum = 0.0f;
            for (int64_t h = 0; h < hidden; h++) sum += xs[k][h] * load1_any(a, a_first + h * a_width + j, is_bf16);
            shrunk[k][j] = sum;
        }
    }
}

static void expand(const void *b, int64_t b_first, int64_t width, int64_t rank, const float *const *weights,
                   int count, int is_bf16, float *const *out)
{
    const int max_vectors = vectors_for(count);
    int64_t o = 0;
    float *outs[TOKEN_BLOCK];
    for (; o + 8 <= width;) {
        int64_t vectors = (width - o) / 8;
        if (vectors > max_vectors) vectors = max_vectors;
        for (int k = 0; k < count; k++) outs[k] = out[k] + o;
        scaled_row_sums_any(b, b_first + o, width, rank, weights, (int)vectors, count, 1, is_bf16, outs);
        o += 8 * vectors;
    }
    for (; o < width; o++) {
        for (int k = 0; k < count; k++) {
            float sum = out[k][o];
            for (int64_t j = 0; j < rank; j++) sum += weights[k][j] * load1_any(b, b_first + j * width + o, is_bf16);
            out[k][o] = sum;
        }
    }
}

/* A step's work items (the same for every module of one hidden size): item n is item_counts[n] <= TOKEN_BLOCK
 * tokens of slot item_slots[n], listed at token_ids[item_starts[n]] ... */
struct lora_items {
    int64_t num_items;
    const int64_t *item_slots, *item_starts, *item_counts, *token_ids;
};

/* One fused projection's buffers and slot ranks (the layouts above), fixed while the engine runs. */
struct lora_buffers {
    const void *a_rows;        /* fp32, or bf16 when is_bf16 (as b_rows and a_compact) */
    int64_t a_width, max_rank, num_slices;
    const void *const *b_rows;
    const int64_t *out_widths, *out_offsets;
    const void *const *slice_ranks;
    int64_t ranks_are_int64;
    void *a_compact;           /* NULL: none */
    int64_t *compact_ranks;
    int64_t is_bf16;
};

int lora_max_slices(void) { return MAX_SLICES; }

/* Copies slot's A rows from a_rows into its compact block at the slot's current ranks and records them. Called
 * after each write of the slot's weights and ranks (kernels/group.py, LoraGroup.slot_written). */
void lora_compact_slot(const struct lora_buffers *buffers, int64_t hidden, int64_t slot)
{
    const int64_t num_slices = buffers->num_slices, a_width = buffers->a_width, max_rank = buffers->max_rank;
    int64_t ranks[MAX_SLICES], width = 0;
    for (int64_t i = 0; i < num_slices; i++) {
        ranks[i] = rank_of(buffers->slice_ranks[i], (int)buffers->ranks_are_int64, slot);
        width += ranks[i];
    }
    const int64_t element = buffers->is_bf16 ? 2 : 4;
    const char *rows = (const char *)buffers->a_rows + element * slot * hidden * a_width;
    char *block = (char *)buffers->a_compact + element * slot * hidden * a_width;
    for (int64_t h = 0; h < hidden; h++) {
        char *out = block + element * h * width;
        for (int64_t i = 0; i < num_slices; i++) {
            memcpy(out, rows + element * (h * a_width + i * max_rank), ranks[i] * element);
            out += element * ranks[i];
        }
    }
    for (int64_t i = 0; i < num_slices; i++) buffers->compact_ranks[slot * num_slices + i] = ranks[i];
}

/* The body of both entry points: x, y and the buffers fp32, or bf16 when is_bf16 (buffers->is_bf16 agrees).
 * Returns 0, or -1 when the bf16 scratch memory could not be had (nothing is written then). */
static inline __attribute__((always_inline)) int lora_add(
    const int is_bf16, const struct lora_items *items, const struct lora_buffers *buffers, const void *x,
    int64_t x_stride, int64_t hidden, void *y, int64_t y_stride, int num_threads)
{
    const int64_t num_items = items->num_items;
    const int64_t *item_slots = items->item_slots, *item_starts = items->item_starts;
    const int64_t *item_counts = items->item_counts, *token_ids = items->token_ids;
    const void *a_rows = buffers->a_rows;
    const int64_t a_width = buffers->a_width, max_rank = buffers->max_rank, num_slices = buffers->num_slices;
    const void *const *b_rows = buffers->b_rows;
    const int64_t *out_widths = buffers->out_widths, *out_offsets = buffers->out_offsets;
    const void *const *slice_ranks = buffers->slice_ranks;
    const int ranks_are_int64 = (int)buffers->ranks_are_int64;
    /* bf16: the y columns the slices write, widened per token into scratch (x's row too). */
    int64_t out_span = 0;
    for (int64_t i = 0; i < num_slices; i++)
        if (out_offsets[i] + out_widths[i] > out_span) out_span = out_offsets[i] + out_widths[i];
    const int64_t scratch_floats = TOKEN_BLOCK * (hidden + out_span);
    float *scratches = NULL;
    if (is_bf16 && (scratches = malloc(sizeof(float) * scratch_floats * (num_threads > 1 ? num_threads : 1))) == NULL)
        return -1;
    #pragma omp parallel num_threads(num_threads) if (num_items > 1 && num_threads > 1)
    {
        float acc[TOKEN_BLOCK * a_width];
        float *scratch = is_bf16 ? scratches + scratch_floats * omp_get_thread_num() : NULL;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < num_items; item++) {
            const int64_t slot = item_slots[item];
            const int64_t count = item_counts[item];
            const int64_t *tokens = token_ids + item_starts[item];
            int64_t ranks[MAX_SLICES], compact_width = 0;
            int compact = buffers->a_compact != NULL;
            for (int64_t i = 0; i < num_slices; i++) {
                ranks[i] = rank_of(slice_ranks[i], ranks_are_int64, slot);
                compact_width += ranks[i];
                compact = compact && buffers->compact_ranks[slot * num_slices + i] == ranks[i];
            }
            if (!compact_width) continue;
            /* Where slice i's ranks start in a row of A (and in a token's shrunk values), the row's width and how
             * many columns to shrink: in a_rows up to the last targeted slice's rank (the columns in between are
             * computed, not used). */
            int64_t first_column[MAX_SLICES], stride, columns = 0;
            const void *a;
            if (compact) {
                for (int64_t i = 0; i < num_slices; i++) first_column[i] = columns, columns += ranks[i];
                a = buffers->a_compact;
                stride = columns;
            } else {
                for (int64_t i = 0; i < num_slices; i++) {
                    first_column[i] = i * max_rank;
                    if (ranks[i]) columns = i * max_rank + ranks[i];
                }
                a = a_rows;
                stride = a_width;
            }
            const float *xs[TOKEN_BLOCK];
            float *shrunk[TOKEN_BLOCK], *ys[TOKEN_BLOCK];
            for (int64_t k = 0; k < count; k++) {
                if (is_bf16) {
                    float *x_row = scratch + k * hidden, *y_row = scratch + TOKEN_BLOCK * hidden + k * out_span;
                    const uint16_t *x_words = (const uint16_t *)x + tokens[k] * x_stride;
                    const uint16_t *y_words = (const uint16_t *)y + tokens[k] * y_stride;
                    for (int64_t h = 0; h < hidden; h++) x_row[h] = load1_any(x_words, h, 1);
                    for (int64_t o = 0; o < out_span; o++) y_row[o] = load1_any(y_words, o, 1);
                    xs[k] = x_row;
                    ys[k] = y_row;
                } else {
                    xs[k] = (const float *)x + tokens[k] * x_stride;
                    ys[k] = (float *)y + tokens[k] * y_stride;
                }
                shrunk[k] = acc + k * a_width;
            }
            shrink(a, slot * hidden * a_width, stride, hidden, xs, (int)count, columns, is_bf16, shrunk);
            for (int64_t i = 0; i < num_slices; i++) {
                const int64_t rank = ranks[i];
                if (!rank) continue;
                const float *weights[TOKEN_BLOCK];
                float *outs[TOKEN_BLOCK];
                for (int64_t k = 0; k < count; k++) {
                    weights[k] = acc + k * a_width + first_column[i];
                    outs[k] = ys[k] + out_offsets[i];
                }
                expand(b_rows[i], slot * max_rank * out_widths[i], out_widths[i], rank, weights, (int)count, is_bf16,
                       outs);
            }
            if (is_bf16) {
                for (int64_t k = 0; k < count; k++) {
                    uint16_t *y_words = (uint16_t *)y + tokens[k] * y_stride;
                    for (int64_t i = 0; i < num_slices; i++)
                        if (ranks[i])
                            for (int64_t o = out_offsets[i]; o < out_offsets[i] + out_widths[i]; o++)
                                y_words[o] = f32_to_bf16(ys[k][o]);
                }
            }
        }
    }
    free(scratches);
    return 0;
}

/* Called through ctypes with two struct pointers made once (per step, per module) instead of twenty scalars:
 * ctypes converts each argument at every call, 32 calls a decode step. */
void lora_add_f32(const struct lora_items *items, const struct lora_buffers *buffers, const float *x,
                  int64_t x_stride, int64_t hidden, float *y, int64_t y_stride, int num_threads)
{
    lora_add(0, items, buffers, x, x_stride, hidden, y, y_stride, num_threads);
}

int lora_add_bf16(const struct lora_items *items, const struct lora_buffers *buffers, const uint16_t *x,
                   int64_t x_stride, int64_t hidden, uint16_t *y, int64_t y_stride, int num_threads)
{
    return lora_add(1, items, buffers, x, x_stride, hidden, y, y_stride, num_threads);
}
