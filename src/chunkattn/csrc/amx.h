// AMX tiles (Intel Xeon 4th generation and later: amx_tile, amx_bf16) for chunkattn's CPU kernels: the tile
// configuration every kernel uses and the Linux permission a process needs before its first tile instruction.
// CHUNKATTN_AMX is defined where the build targets such a CPU (-march=native on one); the kernels still ask
// amx_permitted() at run time and keep their other paths when it is false.
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && \
    defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

#define CHUNKATTN_AMX 1

namespace chunkattn {

// Palette 1: up to 8 tiles of up to 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands a process the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM); a tile instruction
// without it raises SIGILL. Asked once per process; a kernel that refuses keeps every caller on its other path.
inline bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// The configuration of chunkattn's kernels, loaded by the calling thread: tiles 0-7 all 16 rows x 64 bytes (a 16 x
// 16 float32 accumulator, a 16 x 32 bf16 A operand, a 16 x 16 pair B operand). Release with _tile_release().
inline void load_tile_config() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = 64;
  }
  _tile_loadconfig(&cfg);
}

}  // namespace chunkattn
#endif
