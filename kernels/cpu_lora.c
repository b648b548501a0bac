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
 * Accumulation is fp32 in the same order as the embedding_bag route (feature by feature, rank by rank).
 * The running sums of the shrink (up to 32 of its columns at a time) and of the expand (64 of y's columns at a
 * time) stay in vector registers through their loop: summed in memory, each step waited on the last one's
 * store (store-to-load latency), which made the kernel ~2x slower than its arithmetic and bytes.
 */
#include <stdint.h>
#include <stdlib.h>

#include "cpu_vec.h"

#define TOKEN_BLOCK 4
/* Vectors of eight summed in registers at once: shrink columns (4 x 8) and expand outputs (8 x 8). */
#define SHRINK_VECTORS 4
#define EXPAND_VECTORS 8

static int64_t rank_of(const void *ranks, int ranks_are_int64, int64_t slot)
{
    return ranks_are_int64 ? ((const int64_t *)ranks)[slot] : ((const int32_t *)ranks)[slot];
}

int lora_token_block(void) { return TOKEN_BLOCK; }

/* out[i] (+)= sum_{r < count} scales[r] * rows[r * stride + i] for i < 8 * vectors, r in order. The shrink is
 * this over A's rows scaled by one token's features, from zero; the expand over B's rows scaled by the token's
 * shrunk values, added to y. Inlined with constant `vectors` and `add_to_out`, so that the sums are named
 * registers. */
static inline __attribute__((always_inline)) void scaled_row_sum(
    const float *rows, int64_t stride, int64_t count, const float *scales, const int vectors, const int add_to_out,
    float *out)
{
    vec8 sums[EXPAND_VECTORS];
    for (int v = 0; v < vectors; v++) sums[v] = add_to_out ? load8(out + 8 * v) : (vec8){0};
    for (int64_t r = 0; r < count; r++) {
        const float *row = rows + r * stride;
        const vec8 scale = (vec8){0} + scales[r];
        #pragma GCC unroll 8
        for (int v = 0; v < vectors; v++) sums[v] += load8(row + 8 * v) * scale;
    }
    for (int v = 0; v < vectors; v++) store8(out + 8 * v, sums[v]);
}

/* shrunk[j] for j < columns: the slot's A rows (a) against one token's features (x). */
static void shrink(const float *a, int64_t a_width, int64_t hidden, const float *x, int64_t columns, float *shrunk)
{
    int64_t j = 0;
    /* Whole vectors while they stay inside the row (a vector past `columns` computes unused sums). */
    for (; j < columns && j + 8 <= a_width; j += 8 * SHRINK_VECTORS) {
        int64_t vectors = (columns - j + 7) / 8;
        if (vectors > SHRINK_VECTORS) vectors = SHRINK_VECTORS;
        if (j + 8 * vectors > a_width) vectors = (a_width - j) / 8;
        switch (vectors) {
        case 4: scaled_row_sum(a + j, a_width, hidden, x, 4, 0, shrunk + j); break;
        case 3: scaled_row_sum(a + j, a_width, hidden, x, 3, 0, shrunk + j); break;
        case 2: scaled_row_sum(a + j, a_width, hidden, x, 2, 0, shrunk + j); break;
        default: scaled_row_sum(a + j, a_width, hidden, x, 1, 0, shrunk + j); break;
        }
        if (vectors < SHRINK_VECTORS) { j += 8 * vectors; break; }
    }
    for (; j < columns; j++) {  /* a row narrower than a vector's reach: one column at a time */
        float sum = 0.0f;
        for (int64_t h = 0; h < hidden; h++) sum += x[h] * a[h * a_width + j];
        shrunk[j] = sum;
    }
}

static void expand(const float *b, int64_t width, int64_t rank, const float *weights, float *out)
{
    int64_t o = 0;
    for (; o + 8 * EXPAND_VECTORS <= width; o += 8 * EXPAND_VECTORS)
        scaled_row_sum(b + o, width, rank, weights, EXPAND_VECTORS, 1, out + o);
    for (; o + 8 <= width; o += 8) scaled_row_sum(b + o, width, rank, weights, 1, 1, out + o);
    for (; o < width; o++) {
        float sum = out[o];
        for (int64_t j = 0; j < rank; j++) sum += weights[j] * b[j * width + o];
        out[o] = sum;
    }
}

void lora_add_f32(
    int64_t num_items, const int64_t *item_slots, const int64_t *item_starts, const int64_t *item_counts,
    const int64_t *token_ids, const float *x, int64_t x_stride, int64_t hidden,
    const float *a_rows, int64_t a_width, int64_t max_rank, int64_t num_slices,
    const float *const *b_rows, const int64_t *out_widths, const int64_t *out_offsets,
    const void *const *slice_ranks, int ranks_are_int64, float *y, int64_t y_stride, int num_threads)
{
    #pragma omp parallel num_threads(num_threads) if (num_items > 1 && num_threads > 1)
    {
        float acc[TOKEN_BLOCK * a_width];
        #pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < num_items; item++) {
            const int64_t slot = item_slots[item];
            const int64_t count = item_counts[item];
            const int64_t *tokens = token_ids + item_starts[item];
            /* Shrink up to the last targeted slice's rank; columns in between are computed, not used. */
            int64_t columns = 0;
            for (int64_t i = 0; i < num_slices; i++) {
                const int64_t rank = rank_of(slice_ranks[i], ranks_are_int64, slot);
                if (rank) columns = i * max_rank + rank;
            }
            if (!columns) continue;
            const float *a = a_rows + slot * hidden * a_width;
            for (int64_t k = 0; k < count; k++)
                shrink(a, a_width, hidden, x + tokens[k] * x_stride, columns, acc + k * a_width);
            for (int64_t i = 0; i < num_slices; i++) {
                const int64_t rank = rank_of(slice_ranks[i], ranks_are_int64, slot);
                if (!rank) continue;
                const float *b = b_rows[i] + slot * max_rank * out_widths[i];
                for (int64_t k = 0; k < count; k++)
                    expand(b, out_widths[i], rank, acc + k * a_width + i * max_rank,
                           y + tokens[k] * y_stride + out_offsets[i]);
            }
        }
    }
}
