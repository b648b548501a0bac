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
 */
#include <stdint.h>
#include <stdlib.h>

#define TOKEN_BLOCK 4

static int64_t rank_of(const void *ranks, int ranks_are_int64, int64_t slot)
{
    return ranks_are_int64 ? ((const int64_t *)ranks)[slot] : ((const int32_t *)ranks)[slot];
}

int lora_token_block(void) { return TOKEN_BLOCK; }

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
            for (int64_t k = 0; k < count; k++)
                for (int64_t j = 0; j < columns; j++) acc[k * a_width + j] = 0.0f;
            const float *a = a_rows + slot * hidden * a_width;
            for (int64_t h = 0; h < hidden; h++) {
                const float *row = a + h * a_width;
                for (int64_t k = 0; k < count; k++) {
                    const float feature = x[tokens[k] * x_stride + h];
                    float *shrunk = acc + k * a_width;
                    for (int64_t j = 0; j < columns; j++) shrunk[j] += feature * row[j];
                }
            }
            for (int64_t i = 0; i < num_slices; i++) {
                const int64_t rank = rank_of(slice_ranks[i], ranks_are_int64, slot);
                const int64_t width = out_widths[i];
                const float *b = b_rows[i] + slot * max_rank * width;
                for (int64_t j = 0; j < rank; j++) {
                    const float *row = b + j * width;
                    for (int64_t k = 0; k < count; k++) {
                        const float weight = acc[k * a_width + i * max_rank + j];
                        float *out = y + tokens[k] * y_stride + out_offsets[i];
                        for (int64_t o = 0; o < width; o++) out[o] += weight * row[o];
                    }
                }
            }
        }
    }
}
