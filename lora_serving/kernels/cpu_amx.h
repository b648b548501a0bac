/* What the CPU kernels need to use AMX tiles (cpu_matvec.c's bf16 matvec, cpu_attention.c's bf16 decode attention):
 * HAVE_AMX where the build targets AMX-BF16 on Linux, the tile configuration's layout, the one-time request for
 * the tile state, and a compiler barrier for the buffers tiles read and write. */
#ifndef CPU_AMX_H
#define CPU_AMX_H
#include <stdint.h>

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define HAVE_AMX 1
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* The 64-byte operand of _tile_loadconfig (palette 1): bytes per row and rows of each of the 8 tiles. */
struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
};

/* Linux lets a process use tile data only after it asks (once); torch's oneDNN asks too. */
static inline int amx_permitted(void)
{
    static int state;  /* 0: not asked yet; 1 granted; -1 refused */
    if (state == 0) state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
    return state > 0;
}

/* GCC's tile intrinsics do not tell the compiler they read or write memory: without this it may drop stores to a
 * buffer a tile load reads, or read a buffer before the tile store that fills it. */
static inline void compiler_memory_barrier(void) { __asm__ volatile("" ::: "memory"); }
#else
#define HAVE_AMX 0
#endif

#endif
