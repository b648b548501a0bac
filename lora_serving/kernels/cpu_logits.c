/* What the sampler needs from each row of fp32 logits, in two passes over the row instead of torch's three (a max
 * with its index, then log_softmax, which also writes a vocabulary-wide copy): the row's maximum, the index of its
 * first maximum, and log(sum(exp(x - max))), from which any token's log-probability is x[token] - max - that.
 *
 * Built with the other CPU kernels by kernels/cpu_native.py; called by kernels/cpu_logits.py.
 *
 * As torch's argmax: the first of equal maxima wins, and a NaN counts as the maximum (the first NaN's index, the
 * maximum and the log-sum NaN). The exp is cpu_vec.h's exp_w (within 1 ulp of expf); the sum is fp32 in
 * VEC_LANES running lanes, added at the end. Rows are shared among the threads. */
#include <math.h>
#include <stdint.h>

#include "cpu_vec.h"

static void row_summary(const float *x, int64_t n, int64_t *index_out, float *max_out, float *log_sum_out)
{
    float best = -INFINITY;
    int64_t best_index = 0;
    int64_t i = 0;
    if (n >= VEC_LANES) {
        veciw lane_index, step;
        for (int lane = 0; lane < VEC_LANES; lane++) lane_index[lane] = lane;
        step = (veciw){0} + VEC_LANES;
        vecw maxima = loadw(x);
        veciw where = lane_index;
        veciw position = lane_index;
        for (i = VEC_LANES; i + VEC_LANES <= n; i += VEC_LANES) {
            position += step;
            const vecw v = loadw(x + i);
            const veciw above = (veciw)(v > maxima);  /* strict: each lane keeps its first maximum */
            maxima = select_w(above, v, maxima);
            where = (above & position) | (~above & where);
        }
        best = maxima[0];
        best_index = where[0];
        for (int lane = 1; lane < VEC_LANES; lane++)
            if (maxima[lane] > best || (maxima[lane] == best && where[lane] < best_index)) {
                best = maxima[lane];
                best_index = where[lane];
            }
    } else if (n > 0) {
        best = x[0];
        i = 1;
    }
    for (; i < n; i++)
        if (x[i] > best) {
            best = x[i];
            best_index = i;
        }

    vecw sums = {0};
    const vecw shift = (vecw){0} + best;
    int64_t j = 0;
    for (; j + VEC_LANES <= n; j += VEC_LANES) sums += exp_w(loadw(x + j) - shift);
    float sum = 0.0f;
    for (int lane = 0; lane < VEC_LANES; lane++) sum += sums[lane];
    for (; j < n; j++) sum += expf(x[j] - best);

    if (isnan(sum)) {  /* a NaN in the row (comparisons skipped it above): it is the maximum, as in argmax */
        for (int64_t k = 0; k < n; k++)
            if (isnan(x[k])) {
                *index_out = k;
                *max_out = x[k];
                *log_sum_out = x[k];
                return;
            }
    }
    *index_out = best_index;
    *max_out = best;
    *log_sum_out = logf(sum);
}

/* logits [rows][n] with a row stride of `stride` floats; each output has one entry per row. */
void logits_row_summaries(const float *logits, int64_t rows, int64_t n, int64_t stride, int64_t *indices,
                          float *maxima, float *log_sums, int num_threads)
{
    #pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1 && rows > 1)
    for (int64_t r = 0; r < rows; r++)
        row_summary(logits + r * stride, n, indices + r, maxima + r, log_sums + r);
}
