/* AMX set-up shared by the kernels that use it: asking Linux for the tile state, the tile configuration of
 * linear.c and prefill_attention.c, and rows packed as AMX's B operand (linear.c's activations, prefill's keys).
 * AMX's tile products are why the decode matmuls read their weights at the memory's speed (oneDNN reached
 * ~9-12 GB/s on them) and why prompt attention reaches 280-308 GFLOP/s against SDPA's 120-131
 * (docs/benchmarks.md, issue 6). decode_attention.c configures its own tiles (rows per query group). */
#include "kernels.h"

#if HAVE_AMX
#include <sys/syscall.h>
#include <unistd.h>

/* Linux hands out AMX's 8 KB of tile state only to processes that ask: arch_prctl(ARCH_REQ_XCOMP_PERM,
 * XFEATURE_XTILEDATA) */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* 0 once AMX is granted to this process; -1 when it is not (or when built without AMX, below) */
int amx_init(void) { return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); }

/* This thread's 8 tiles as 16 rows x 64 bytes each (the only shape linear.c and prefill_attention.c use). A
 * constant in memory: gcc drops stores into a local config as dead (the builtin's read is invisible to it). */
static const TileConfig TILES_16x64 = {
    .palette = 1,
    .colsb = {TILE_ROW_BYTES, TILE_ROW_BYTES, TILE_ROW_BYTES, TILE_ROW_BYTES,
              TILE_ROW_BYTES, TILE_ROW_BYTES, TILE_ROW_BYTES, TILE_ROW_BYTES},
    .rows = {TILE_ROWS, TILE_ROWS, TILE_ROWS, TILE_ROWS, TILE_ROWS, TILE_ROWS, TILE_ROWS, TILE_ROWS}};
void amx_tiles_16x64(void) { _tile_loadconfig(&TILES_16x64); }

/* x [M, K] (rows `stride` bf16 apart) -> [K/32][tiles][16 input pairs][16 rows] of bf16 pairs (32 bits), rows
 * past M zero: AMX's B operand with x's rows as its columns */
void pack_rows(const uint16_t *x, int64_t stride, int64_t M, int64_t K, int64_t tiles, uint32_t *out) {
    for (int64_t k = 0; k < K / 32; k++)
        for (int64_t t = 0; t < tiles; t++) {
            __m512i r[16];
            for (int m = 0; m < 16; m++)
                r[m] = t * 16 + m < M ? _mm512_loadu_si512(x + (t * 16 + m) * stride + k * 32)
                                      : _mm512_setzero_si512();
            transpose16(r);
            for (int p = 0; p < 16; p++) _mm512_store_si512(out + ((k * tiles + t) * 16 + p) * 16, r[p]);
        }
}
#else
int amx_init(void) { return -1; }
#endif
