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
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* n elements from `source` (fp32 or bf16 words, by `is_bf16`) as fp32 into `row`. */
static inline __attribute__((always_inline)) void widen_row(const void *source, int is_bf16, int64_t n, float *row)
{
    if (!is_bf16) {
        memcpy(row, source, sizeof(float) * n);
        return;
    }
    const uint16_t *words = source;
    for (int64_t i = 0; i < n; i++) row[i] = bf16_to_f32(words[i]);
}

/* Returns 0, or -1 when scratch memory could not be had (nothing is written then). Pointers are to fp32 or, with
 * is_bf16, to bf16 elements; strides and offsets count elements. */
static inline __attribute__((always_inline)) int paged_decode_attention(
    int is_bf16, int64_t num_tokens, const void *q, int64_t q_token_stride, int64_t q_head_stride, int64_t q_heads,
    int64_t kv_heads, int64_t head_dim, const void *k_cache, const void *v_cache, int64_t num_blocks,
    int64_t block_size, const int64_t *block_tables, int64_t table_width, const int64_t *lengths,
    const int64_t *starts, float scale, void *out, int num_threads)
{
    const int64_t element = is_bf16 ? 2 : 4;
    const char *q_bytes = q, *k_bytes = k_cache, *v_bytes = v_cache;
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
        /* Per thread: the scores, the group's queries and results in fp32, one widened key or value row. */
        float *scores = malloc(sizeof(float) * (group * longest + 2 * group * head_dim + head_dim));
        #pragma omp atomic
        failed += scores == NULL;
        #pragma omp barrier
        if (!failed) {
            float *queries = scores + group * longest, *result = queries + group * head_dim;
            float *row_buffer = result + group * head_dim;
            #pragma omp for schedule(dynamic, 1)
            for (int64_t item = 0; item < num_items; item++) {
                const int64_t t = item / kv_heads, h = item % kv_heads;
                const int64_t first = starts ? starts[t] : 0, count = lengths[t] - first;
                const int64_t *table = block_tables + t * table_width;
                for (int64_t g = 0; g < group; g++)
                    widen_row(q_bytes + element * (t * q_token_stride + (h * group + g) * q_head_stride), is_bf16,
                              head_dim, queries + g * head_dim);
                for (int64_t p = 0; p < count; p++) {
                    const int64_t position = first + p;
                    const int64_t at = h * head_span + (table[position / block_size] * block_size
                                                        + position % block_size) * head_dim;
                    const float *key = is_bf16 ? row_buffer : (const float *)(k_bytes + element * at);
                    if (is_bf16) widen_row(k_bytes + element * at, 1, head_dim, row_buffer);
                    for (int64_t g = 0; g < group; g++)
                        scores[g * count + p] = scale * dot(queries + g * head_dim, key, head_dim);
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
                    const int64_t at = h * head_span + (table[position / block_size] * block_size
                                                        + position % block_size) * head_dim;
                    const float *value = is_bf16 ? row_buffer : (const float *)(v_bytes + element * at);
                    if (is_bf16) widen_row(v_bytes + element * at, 1, head_dim, row_buffer);
                    for (int64_t g = 0; g < group; g++) {
                        const float weight = scores[g * count + p];
                        float *o = result + g * head_dim;
                        for (int64_t i = 0; i < head_dim; i++) o[i] += weight * value[i];
                    }
                }
                const int64_t out_at = (t * q_heads + h * group) * head_dim;
                if (is_bf16) {
                    uint16_t *destination = (uint16_t *)out + out_at;
                    for (int64_t i = 0; i < group * head_dim; i++) destination[i] = f32_to_bf16(result[i]);
                } else {
                    memcpy((float *)out + out_at, result, sizeof(float) * group * head_dim);
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
                                  starts, scale, out, num_threads);
}

int paged_decode_attention_bf16(
    int64_t num_tokens, const uint16_t *q, int64_t q_token_stride, int64_t q_head_stride, int64_t q_heads,
    int64_t kv_heads, int64_t head_dim, const uint16_t *k_cache, const uint16_t *v_cache, int64_t num_blocks,
    int64_t block_size, const int64_t *block_tables, int64_t table_width, const int64_t *lengths,
    const int64_t *starts, float scale, uint16_t *out, int num_threads)
{
    return paged_decode_attention(1, num_tokens, q, q_token_stride, q_head_stride, q_heads, kv_heads, head_dim,
                                  k_cache, v_cache, num_blocks, block_size, block_tables, table_width, lengths,
                                  starts, scale, out, num_threads);
}
