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
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu_vec.h"

static inline float dot(const float *a, const float *b, int64_t n)
{
    vec8 partial = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) partial += load8(a + i) * load8(b + i);
    float sum = 0.0f;
    for (int j = 0; j < 8; j++) sum += partial[j];
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* Returns 0, or -1 when scratch memory could not be had (nothing is written then). */
int paged_decode_attention_f32(
    int64_t num_tokens, const float *q, int64_t q_token_stride, int64_t q_head_stride, int64_t q_heads,
    int64_t kv_heads, int64_t head_dim, const float *k_cache, const float *v_cache, int64_t num_blocks,
    int64_t block_size, const int64_t *block_tables, int64_t table_width, const int64_t *lengths,
    const int64_t *starts, float scale, float *out, int num_threads)
{
    const int64_t group = q_heads / kv_heads;
    const int64_t head_span = num_blocks * block_size * head_dim;
    int64_t longest = 1;
    for (int64_t t = 0; t < num_tokens; t++) {
        const int64_t count = lengths[t] - (starts ? starts[t] : 0);
        if (count > longest) longest = count;
    }
    const int64_t num_items = num_tokens * kv_heads;
    int failed = 0;
    #pragma omp parallel num_threads(num_threads) if (num_threads > 1 && num_items > 1)
    {
        float *scores = malloc(sizeof(float) * group * longest);
        #pragma omp atomic
        failed += scores == NULL;
        #pragma omp barrier
        if (!failed) {
            #pragma omp for schedule(dynamic, 1)
            for (int64_t item = 0; item < num_items; item++) {
                const int64_t t = item / kv_heads, h = item % kv_heads;
                const int64_t first = starts ? starts[t] : 0, count = lengths[t] - first;
                const int64_t *table = block_tables + t * table_width;
                const float *keys = k_cache + h * head_span, *values = v_cache + h * head_span;
                const float *query = q + t * q_token_stride + h * group * q_head_stride;
                float *result = out + (t * q_heads + h * group) * head_dim;
                for (int64_t p = 0; p < count; p++) {
                    const int64_t position = first + p;
                    const float *key = keys + (table[position / block_size] * block_size
                                               + position % block_size) * head_dim;
                    for (int64_t g = 0; g < group; g++)
                        scores[g * count + p] = scale * dot(query + g * q_head_stride, key, head_dim);
                }
                for (int64_t g = 0; g < group; g++) {
                    float *row = scores + g * count, highest = -INFINITY, total = 0.0f;
                    for (int64_t p = 0; p < count; p++) highest = row[p] > highest ? row[p] : highest;
                    for (int64_t p = 0; p < count; p++) total += row[p] = expf(row[p] - highest);
                    for (int64_t p = 0; p < count; p++) row[p] /= total;
                    for (int64_t i = 0; i < head_dim; i++) result[g * head_dim + i] = 0.0f;
                }
                for (int64_t p = 0; p < count; p++) {
                    const int64_t position = first + p;
                    const float *value = values + (table[position / block_size] * block_size
                                                   + position % block_size) * head_dim;
                    for (int64_t g = 0; g < group; g++) {
                        const float weight = scores[g * count + p];
                        float *o = result + g * head_dim;
                        for (int64_t i = 0; i < head_dim; i++) o[i] += weight * value[i];
                    }
                }
            }
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
