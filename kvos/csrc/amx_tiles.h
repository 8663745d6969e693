/*
 * The AMX tile unit's plumbing shared by kvos's CPU kernels: the tile configuration's memory
 * layout, the process's request for the tile state, and a thread's borrowing of the unit.
 *
 * KVOS_AMX is defined where the compiler targets a CPU with AMX-BF16 (and AVX512-BF16, which the
 * kernels use around the tiles). Linux hands the tile state to a process only after it asks
 * (arch_prctl); where that is refused the kernels take their AVX-512 paths.
 */
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define KVOS_AMX 1

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace kvos {

/* LDTILECFG's 64 bytes: palette 1, then per tile its bytes per row and its rows. */
struct alignas(64) TileConfig {
  uint8_t palette = 0;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};

  void set(int tile, int64_t tile_rows, int64_t bytes_per_row) {
    palette = 1;
    rows[tile] = static_cast<uint8_t>(tile_rows);
    colsb[tile] = static_cast<uint16_t>(bytes_per_row);
  }
};

/* Whether this process may use the tile unit (asked once). */
inline bool amx_usable() {
  static const bool usable = [] {
    constexpr long kReqXcompPerm = 0x1023;  // ARCH_REQ_XCOMP_PERM
    constexpr long kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}

/* One thread's use of the tile unit for a stretch of work (a parallel chunk). The configuration it
 * found is put back at the end, or the unit released if it had none, so other users in the process
 * (oneDNN's AMX GEMMs, which may keep their configuration loaded between calls) are left as they
 * were. Loading a configuration zeroes every tile. */
class TileUse {
 public:
  TileUse() { _tile_storeconfig(&found_); }
  ~TileUse() {
    if (found_.palette != 0) {
      _tile_loadconfig(&found_);
    } else if (loaded_) {
      _tile_release();
    }
  }
  TileUse(const TileUse&) = delete;
  TileUse& operator=(const TileUse&) = delete;

  void load(const TileConfig& config) {
    _tile_loadconfig(&config);
    loaded_ = true;
  }

 private:
  TileConfig found_;
  bool loaded_ = false;
};

}  // namespace kvos

#else

namespace kvos {

/* Built without AMX: no kernel uses the tile unit. */
inline bool amx_usable() { return false; }

}  // namespace kvos

#endif
