// The two products of decode attention on AMX-BF16 tiles (Intel Advanced Matrix Extensions), for bf16
// KV caches: decode_attention_cpu.cpp calls these per (request chunk, KV head group) where the CPU has AMX.
//
// On AVX-512 each (head, position) pair costs a 64-wide dot product, a share of a horizontal sum and a
// 64-wide FMA row: on a TinyLlama-shaped layer (8 query heads per KV head) that made attention compute-bound
// at ~6 GB/s. A tile multiply does 16 x 16 x 32 bf16 products in one instruction, so both products here
// are nearly free and what is left is the softmax and the reads.
//
// Scores, S^T = K Q^T: A = 16 cached K rows (positions) x 32 head dims, loaded straight from the paged
// cache with its token stride when the 16 positions share a block (else gathered); B = Q^T in pairs of
// head dims (VNNI layout), N = G query heads; C = S^T [16 positions x G] fp32, written to scores[G][L].
// Values, O = P V: A = P [G heads x 32 positions] rounded to bf16 (as HF's bf16 eager attention does
// before its P V matmul); B = 32 V rows interleaved in position pairs, 16 head dims per tile; four C
// tiles [G x 16 dims] accumulate a chunk's positions (64 head dims per pass).
//
// Every tile is configured 16 rows x 64 bytes (palette 1); rows past G heads are zero or ignored, and
// positions past the chunk are zero rows in A and B, never read from the cache. Invariant: the caller
// holds a TileScope on this thread around the calls.
#include "decode_attention_amx.h"

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cpuid.h>
#include <cstdlib>
#include <cstring>

#define FRUGAL_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace frugal::amx {
namespace {

constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl: ask Linux for the AMX tile data state
constexpr long kXFeatureXtileData = 18;

bool detect() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amx_bf16 = edx & (1u << 22), amx_tile = edx & (1u << 24);
  if (!amx_bf16 || !amx_tile || !__builtin_cpu_supports("avx512bf16")) return false;
  // Without the kernel's permission the first tile instruction raises SIGILL.
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXFeatureXtileData) == 0;
}

std::atomic<bool>& enabled_flag() {
  static std::atomic<bool> flag{[] {
    const char* off = std::getenv("FRUGAL_NO_AMX");
    return off == nullptr || off[0] == '\0' || off[0] == '0';
  }()};
  return flag;
}

struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// B tile rows of V: pairs (v[2r][d], v[2r+1][d]) for 16 head dims d, from 32 dims of two rows (or zeros).
FRUGAL_AMX inline void interleave_pair(const uint16_t* row0, const uint16_t* row1, __m512i lo, __m512i hi,
                                       uint32_t* out_lo, uint32_t* out_hi) {
  const __m512i a = row0 ? _mm512_loadu_si512(row0) : _mm512_setzero_si512();
  const __m512i b = row1 ? _mm512_loadu_si512(row1) : _mm512_setzero_si512();
  _mm512_store_si512(out_lo, _mm512_permutex2var_epi16(a, lo, b));
  _mm512_store_si512(out_hi, _mm512_permutex2var_epi16(a, hi, b));
}

// The staging buffers of one 32-position step of O = P V.
struct ValueStep {
  alignas(64) uint16_t p_rows[16][32];  // A: P rows (heads) in bf16; rows past G stay zero
  alignas(64) uint32_t v[4][16][16];    // B per 16 head dims: V rows interleaved in position pairs
};

// Fills `step` for positions [p0, p0 + 32) and head dims [d0, d0 + 16 * tiles).
FRUGAL_AMX void build_value_step(const Group& a, const float* weights, int64_t p0, int64_t d0, int tiles,
                                 ValueStep& step) {
  const int64_t G = a.G, L = a.end - a.start;
  const int n = int(std::min<int64_t>(32, L - p0));
  const __mmask16 lo_mask = __mmask16(n >= 16 ? 0xFFFF : (1u << n) - 1);
  const __mmask16 hi_mask = __mmask16(n <= 16 ? 0 : n >= 32 ? 0xFFFF : (1u << (n - 16)) - 1);
  for (int64_t g = 0; g < G; ++g) {  // round to nearest even; zero past the chunk
    const float* w = weights + g * L + p0;
    const __m512 lo = _mm512_maskz_loadu_ps(lo_mask, w), hi = _mm512_maskz_loadu_ps(hi_mask, w + 16);
    _mm512_store_si512(step.p_rows[g], (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                      5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23, 54, 22,
                                      53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  for (int r = 0; r < 16; ++r) {  // V rows 2r and 2r + 1 of the step; zero past the chunk
    const int64_t j0 = p0 + 2 * r, j1 = j0 + 1;
    const uint16_t* row0 = j0 < L ? reinterpret_cast<const uint16_t*>(a.v_base + a.slots[j0]) + d0 : nullptr;
    const uint16_t* row1 = j1 < L ? reinterpret_cast<const uint16_t*>(a.v_base + a.slots[j1]) + d0 : nullptr;
    for (int t = 0; t < tiles; t += 2)
      interleave_pair(row0 ? row0 + 16 * t : nullptr, row1 ? row1 + 16 * t : nullptr, lo, hi, step.v[t][r],
                      step.v[t + 1][r]);
  }
}

// O tiles 0-3 += P V for one built step; P in tile 4, V alternately in 5, 6, 7 (tiles are not renamed:
// a load into the tile the previous multiply reads would wait for it).
FRUGAL_AMX void accumulate_value_step(const ValueStep& step, int tiles) {
  // (The tile intrinsics paste their register numbers into the assembly: literals only.)
  _tile_loadd(4, step.p_rows, 64);
  _tile_loadd(5, step.v[0], 64);
  _tile_dpbf16ps(0, 4, 5);
  _tile_loadd(6, step.v[1], 64);
  _tile_dpbf16ps(1, 4, 6);
  if (tiles > 2) {
    _tile_loadd(7, step.v[2], 64);
    _tile_dpbf16ps(2, 4, 7);
    _tile_loadd(5, step.v[3], 64);
    _tile_dpbf16ps(3, 4, 5);
  }
}

FRUGAL_AMX void load_config(const TileConfig& config) {
  // GCC 12 may drop the stores to a struct read only by ldtilecfg (the llama.cpp AMX crash): keep them.
  __asm__ __volatile__("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

FRUGAL_AMX void release_tiles() { _tile_release(); }

}  // namespace

bool available() {
  static const bool ok = detect();
  return ok;
}

bool enabled() { return available() && enabled_flag().load(std::memory_order_relaxed); }

void set_enabled(bool on) { enabled_flag().store(on); }

bool supports(int64_t G, int64_t D) { return G >= 4 && G <= 16 && (D == 32 || D == 64 || D == 128); }

TileScope::TileScope() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  load_config(config);
}

TileScope::~TileScope() { release_tiles(); }

// Up to four groups of 16 positions at once, one accumulator tile each (tiles 0-3), their K rows loaded
// alternately into tiles 4 and 5 and Q^T steps alternately into 6 and 7, so that a tile load never waits
// for the multiply just issued (tiles are not renamed).
FRUGAL_AMX void scores(const Group& a, float* scores) {
  const int64_t G = a.G, D = a.D, L = a.end - a.start, steps = D / 32;
  // Q^T in head-dim pairs: qt[s][r][g] = (q[g][32 s + 2 r], q[g][32 s + 2 r + 1]); columns past G zero.
  alignas(64) uint32_t qt[4][16][16];
  std::memset(qt, 0, sizeof(qt[0]) * steps);
  for (int64_t g = 0; g < G; ++g) {
    const uint32_t* q = reinterpret_cast<const uint32_t*>(a.q_bf16 + g * D);
    for (int64_t s = 0; s < steps; ++s)
      for (int r = 0; r < 16; ++r) qt[s][r][g] = q[16 * s + r];
  }
  alignas(64) uint16_t gathered[4][16][128];
  alignas(64) float st[4][16][16];
  const int64_t row_bytes = D * 2;
  const __m512i column = _mm512_set_epi32(240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 16, 0);
  const __m512 scale = _mm512_set1_ps(a.scale);
  for (int64_t p0 = 0; p0 < L; p0 += 64) {
    const int groups = int(std::min<int64_t>(4, (L - p0 + 15) / 16));
    for (int64_t j = p0 + 64; j < std::min(L, p0 + 128); ++j)  // the next rows
      for (int64_t offset = 0; offset < row_bytes; offset += 64)
        _mm_prefetch(reinterpret_cast<const char*>(a.k_base + a.slots[j]) + offset, _MM_HINT_T0);
    const char* base[4];
    int64_t stride[4];
    for (int i = 0; i < groups; ++i) {
      const int64_t first = p0 + 16 * i;
      const int n = int(std::min<int64_t>(16, L - first));
      bool in_place = n == 16;  // 16 rows evenly spaced (within one block): load them where they are
      for (int j = 1; in_place && j < 16; ++j) in_place = a.slots[first + j] == a.slots[first] + j * a.token_stride;
      if (in_place) {
        base[i] = reinterpret_cast<const char*>(a.k_base + a.slots[first]);
        stride[i] = a.token_stride * 2;
        continue;
      }
      for (int j = 0; j < 16; ++j) {
        if (j < n) std::memcpy(gathered[i][j], a.k_base + a.slots[first + j], row_bytes);
        else std::memset(gathered[i][j], 0, row_bytes);
      }
      base[i] = reinterpret_cast<const char*>(gathered[i]);
      stride[i] = sizeof(gathered[i][0]);
    }
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
// (The tile intrinsics paste their register numbers into the assembly: literals only.)
#define FRUGAL_AMX_SCORE_GROUPS(QT)                                      \
  _tile_loadd(4, base[0] + 64 * s, stride[0]);                           \
  _tile_dpbf16ps(0, 4, QT);                                              \
  if (groups > 1) {                                                      \
    _tile_loadd(5, base[1] + 64 * s, stride[1]);                         \
    _tile_dpbf16ps(1, 5, QT);                                            \
  }                                                                      \
  if (groups > 2) {                                                      \
    _tile_loadd(4, base[2] + 64 * s, stride[2]);                         \
    _tile_dpbf16ps(2, 4, QT);                                            \
  }                                                                      \
  if (groups > 3) {                                                      \
    _tile_loadd(5, base[3] + 64 * s, stride[3]);                         \
    _tile_dpbf16ps(3, 5, QT);                                            \
  }
    for (int64_t s = 0; s < steps; ++s) {
      if (s % 2 == 0) {
        _tile_loadd(6, qt[s], 64);
        FRUGAL_AMX_SCORE_GROUPS(6)
      } else {
        _tile_loadd(7, qt[s], 64);
        FRUGAL_AMX_SCORE_GROUPS(7)
      }
    }
#undef FRUGAL_AMX_SCORE_GROUPS
    _tile_stored(0, st[0], 64);
    if (groups > 1) _tile_stored(1, st[1], 64);
    if (groups > 2) _tile_stored(2, st[2], 64);
    if (groups > 3) _tile_stored(3, st[3], 64);
    for (int i = 0; i < groups; ++i) {
      const int64_t first = p0 + 16 * i;
      const int n = int(std::min<int64_t>(16, L - first));
      const __mmask16 valid = __mmask16((1u << n) - 1);
      for (int64_t g = 0; g < G; ++g) {  // column g of S^T: head g's 16 scores
        const __m512 col = _mm512_i32gather_ps(_mm512_add_epi32(column, _mm512_set1_epi32(int(g))), &st[i][0][0], 4);
        _mm512_mask_storeu_ps(scores + g * L + first, valid, _mm512_mul_ps(col, scale));
      }
    }
  }
}

// O = P V, 32 positions per step into tiles 0-3 (16 head dims each), software-pipelined: step k + 1 is
// built (vector stores) before step k's tiles load its buffers, so no tile load waits for fresh stores.
FRUGAL_AMX void values(const Group& a, const float* weights, float* acc) {
  const int64_t G = a.G, D = a.D, L = a.end - a.start, steps = (L + 31) / 32;
  ValueStep staged[2];
  std::memset(staged[0].p_rows, 0, sizeof(staged[0].p_rows));
  std::memset(staged[1].p_rows, 0, sizeof(staged[1].p_rows));
  alignas(64) float out[16][64];
  for (int64_t d0 = 0; d0 < D; d0 += 64) {  // 64 head dims (four O tiles) per pass
    const int tiles = int(std::min<int64_t>(4, (D - d0) / 16));
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    if (steps > 0) build_value_step(a, weights, 0, d0, tiles, staged[0]);
    for (int64_t k = 0; k < steps; ++k) {
      if (k + 1 < steps) build_value_step(a, weights, 32 * (k + 1), d0, tiles, staged[(k + 1) & 1]);
      accumulate_value_step(staged[k & 1], tiles);
    }
    _tile_stored(0, out[0], sizeof(out[0]));
    _tile_stored(1, out[0] + 16, sizeof(out[0]));
    if (tiles > 2) {
      _tile_stored(2, out[0] + 32, sizeof(out[0]));
      _tile_stored(3, out[0] + 48, sizeof(out[0]));
    }
    for (int64_t g = 0; g < G; ++g) std::memcpy(acc + g * D + d0, out[g], 16 * tiles * sizeof(float));
  }
}

}  // namespace frugal::amx
