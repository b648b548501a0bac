/* Eight floats as one value, shared by the CPU kernels: GCC and Clang map it onto the CPU's vector registers
 * (two on 128-bit ISAs), so that running sums stay in registers instead of going through memory. And one
 * bf16 word to fp32 and back, for the kernels' bf16 forms.
 *
 * vecw is the widest float vector the build targets: 16 lanes where the compiler may use AVX-512 (one zmm
 * register), else 8 (one ymm with AVX2, two xmm without), with the helpers of the kernels that want every lane
 * the CPU has (decode attention): bf16 rows in and out, an exp, and the sums of many vectors' lanes at once. */
#ifndef CPU_VEC_H
#define CPU_VEC_H
#include <stdint.h>
#include <string.h>

typedef float vec8 __attribute__((vector_size(32)));

static inline vec8 load8(const float *p) { vec8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, vec8 v) { memcpy(p, &v, sizeof v); }

static inline float bf16_to_f32(uint16_t bits)
{
    const uint32_t widened = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &widened, sizeof value);
    return value;
}

static inline uint16_t f32_to_bf16(float value)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);  /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);  /* round to nearest, ties to even */
    return (uint16_t)(bits >> 16);
}

/* Asks for the cache line at p ahead of its use: `near` into L1, else L2. On x86 an asm statement, because GCC deletes
 * a loop of __builtin_prefetch alone as one without effects. */
static inline void prefetch_line(const void *p, int near)
{
#if defined(__x86_64__) || defined(__i386__)
    if (near) __asm__ volatile("prefetcht0 %0" ::"m"(*(const char *)p));
    else __asm__ volatile("prefetcht1 %0" ::"m"(*(const char *)p));
#else
    if (near) __builtin_prefetch(p, 0, 3);
    else __builtin_prefetch(p, 0, 2);
#endif
}

#if defined(__AVX512F__)
#define VEC_LANES 16
#else
#define VEC_LANES 8
#endif
typedef float vecw __attribute__((vector_size(4 * VEC_LANES)));
typedef int32_t veciw __attribute__((vector_size(4 * VEC_LANES)));
typedef uint32_t vecuw __attribute__((vector_size(4 * VEC_LANES)));
typedef uint16_t vechw __attribute__((vector_size(2 * VEC_LANES)));

static inline vecw loadw(const float *p) { vecw v; memcpy(&v, p, sizeof v); return v; }
static inline void storew(float *p, vecw v) { memcpy(p, &v, sizeof v); }

/* Lanes where `mask` (a comparison's result: all ones or zero) is set from `a`, the others from `b`; C has no
 * ?: on vectors (only C++ does). */
static inline vecw select_w(veciw mask, vecw a, vecw b) { return (vecw)((mask & (veciw)a) | (~mask & (veciw)b)); }

/* VEC_LANES bf16 words as fp32: bf16 is fp32's upper half, so each word goes above a zero word. (One shuffle of
 * 16-bit lanes: GCC makes __builtin_convertvector's widening, then a shift, several instructions.) */
static inline vecw load_bf16w(const uint16_t *p)
{
    vechw half;
    memcpy(&half, p, sizeof half);
    const vechw zero = {0};
#if VEC_LANES == 16
    return (vecw)__builtin_shufflevector(zero, half, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24,
                                         9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
#else
    return (vecw)__builtin_shufflevector(zero, half, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
#endif
}

/* VEC_LANES floats to bf16 words, rounded to nearest even as f32_to_bf16 does (NaN stays NaN). */
static inline void store_bf16w(uint16_t *p, vecw v)
{
    const vecuw bits = (vecuw)v;
    const vecuw rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const veciw is_nan = (veciw)((bits & 0x7fffffffu) > 0x7f800000u);
    const vechw half = __builtin_convertvector((vecuw)select_w(is_nan, (vecw)((bits >> 16) | 0x40u), (vecw)rounded),
                                              vechw);
    memcpy(p, &half, sizeof half);
}

/* e^x in every lane, within a couple of ulp of expf for x in [-87, 88] (results of 2^-126 and below, down to
 * x = -104, are as exact as a denormal allows; x < -110 gives 0, NaN stays NaN; x above 88.7 is taken as 88.7).
 * x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so that n ln2's part is exact), e^r by its Taylor series
 * to r^7 (truncation below 0.1 ulp there), and 2^n in two factors, so that a result below 2^-126 is
 * rounded once, into a denormal, rather than lost. */
static inline vecw exp_w(vecw x)
{
    const vecw lowest = (vecw){0} - 110.0f, highest = (vecw){0} + 88.7f;
    x = select_w((veciw)(x < lowest), lowest, x);
    x = select_w((veciw)(x > highest), highest, x);
    const float round_bias = 12582912.0f;  /* 1.5 * 2^23: adding it rounds to an integer, kept in the low bits */
    const vecw biased = x * 1.44269504088896341f + round_bias;
    const vecw n = biased - round_bias;
    const veciw whole = (veciw)biased - (veciw)((vecw){0} + round_bias);
    vecw r = x - n * 0.693359375f;   /* ln2's upper bits: n * it is exact for |n| < 2^15 */
    r = r - n * -2.12194440054690583e-4f;  /* ln2 - 0.693359375 */
    vecw p = (vecw){0} + 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const veciw first = whole >> 1, second = whole - first;
    return p * (vecw)((first + 127) << 23) * (vecw)((second + 127) << 23);
}

/* A vector whose lane k is the sum of the lanes of v[k], for VEC_LANES vectors: pairs of vectors fold into one
 * (half of each one's lanes added to its other half) at each of log2(VEC_LANES) levels, VEC_LANES - 1 folds in all
 * instead of a horizontal sum per vector. Each level interleaves its pairs' halves, so that the folds put v[k]'s
 * sum in lane bitreverse(k): reading the inputs in bit-reversed order puts them back. */
#define FOLD(x, y, ...) (__builtin_shufflevector(x, y, __VA_ARGS__))
#if VEC_LANES == 16
static inline vecw fold8(vecw x, vecw y)
{
    return FOLD(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
           + FOLD(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
static inline vecw fold4(vecw x, vecw y)
{
    return FOLD(x, y, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27)
           + FOLD(x, y, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
}
static inline vecw fold2(vecw x, vecw y)
{
    return FOLD(x, y, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29)
           + FOLD(x, y, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
}
static inline vecw fold1(vecw x, vecw y)
{
    return FOLD(x, y, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30)
           + FOLD(x, y, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}
static inline vecw lane_sums(const vecw v[16])
{
    const vecw a0 = fold8(v[0], v[8]), a1 = fold8(v[4], v[12]), a2 = fold8(v[2], v[10]), a3 = fold8(v[6], v[14]);
    const vecw a4 = fold8(v[1], v[9]), a5 = fold8(v[5], v[13]), a6 = fold8(v[3], v[11]), a7 = fold8(v[7], v[15]);
    const vecw b0 = fold4(a0, a1), b1 = fold4(a2, a3), b2 = fold4(a4, a5), b3 = fold4(a6, a7);
    return fold1(fold2(b0, b1), fold2(b2, b3));
}
#else
static inline vecw fold4(vecw x, vecw y)
{
    return FOLD(x, y, 0, 1, 2, 3, 8, 9, 10, 11) + FOLD(x, y, 4, 5, 6, 7, 12, 13, 14, 15);
}
static inline vecw fold2(vecw x, vecw y)
{
    return FOLD(x, y, 0, 1, 8, 9, 4, 5, 12, 13) + FOLD(x, y, 2, 3, 10, 11, 6, 7, 14, 15);
}
static inline vecw fold1(vecw x, vecw y)
{
    return FOLD(x, y, 0, 8, 2, 10, 4, 12, 6, 14) + FOLD(x, y, 1, 9, 3, 11, 5, 13, 7, 15);
}
static inline vecw lane_sums(const vecw v[8])
{
    const vecw a0 = fold4(v[0], v[4]), a1 = fold4(v[2], v[6]), a2 = fold4(v[1], v[5]), a3 = fold4(v[3], v[7]);
    return fold1(fold2(a0, a1), fold2(a2, a3));
}
#endif
#undef FOLD

#endif
