/* Eight floats as one value, shared by the CPU kernels: GCC and Clang map it onto the CPU's vector registers
 * (two on 128-bit ISAs), so that running sums stay in registers instead of going through memory. */
#ifndef CPU_VEC_H
#define CPU_VEC_H
#include <string.h>

typedef float vec8 __attribute__((vector_size(32)));

static inline vec8 load8(const float *p) { vec8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, vec8 v) { memcpy(p, &v, sizeof v); }

#endif
