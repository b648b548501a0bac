/* Eight floats as one value, shared by the CPU kernels: GCC and Clang map it onto the CPU's vector registers
 * (two on 128-bit ISAs), so that running sums stay in registers instead of going through memory. And one
 * bf16 word to fp32 and back, for the kernels' bf16 forms. */
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

#endif
