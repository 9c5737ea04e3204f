// y = x W^T with W packed in panels of 16 output columns (tensor/packed_weight.h):
//   float32: panel[k][c]          = W[16 p + c][k]
//   bfloat16: panel[k / 2][c][e]  = W[16 p + c][2 (k / 2) + e]   (pairs for vdpbf16ps)
// A register tile holds MR rows x (a few panels) of outputs; for each k it broadcasts one input
// per row and multiply-adds a full vector of weights into each accumulator, so W streams through
// once per MR rows and no horizontal sum is ever needed.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tensor/packed_gemm.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep

#include <hwy/cache_control.h>
#include <hwy/highway.h>

#include <algorithm>
#include <cstdlib>
#include <string_view>

#include "tensor/simd.h"

#ifndef MMDIT_PACKED_GEMM_CONSTANTS
#define MMDIT_PACKED_GEMM_CONSTANTS
namespace mmdit::simd {
// Each step of the k loop reads one 64-byte line per panel; the hardware prefetcher alone left
// the streams about a quarter short of the memory bandwidth (measured: 1.19 against 0.96 ms for
// one Euler step's bfloat16 weights on 2 threads), so each line is requested 32 steps ahead.
constexpr int64_t kPrefetchSteps = 32;
}  // namespace mmdit::simd
#endif

HWY_BEFORE_NAMESPACE();
namespace mmdit::simd {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::CappedTag<float, 16>;
constexpr int64_t kLanes = static_cast<int64_t>(hn::MaxLanes(DF()));
// 3 panels x 8 rows = 24 accumulators fit AVX-512's 32 registers; narrower targets get 1 panel x
// 4 rows (AVX2: 8 accumulators of its 16 registers).
constexpr int64_t kPanelsPerTile = kLanes >= 16 ? 3 : 1;
constexpr int64_t kRowsPerTile = kLanes >= 16 ? 8 : 4;

// Where vector v of a tile starting at `panels` sits at step k, in floats (f32) or pairs (bf16).
HWY_INLINE int64_t VectorOffset(int64_t v, int64_t panel_size) {
  return (v * kLanes / 16) * panel_size + (v * kLanes) % 16;
}

HWY_INLINE void StoreColumns(hn::Vec<DF> v, float* y, int64_t valid) {
  const DF d;
  if (valid >= kLanes)
    hn::StoreU(v, d, y);
  else if (valid > 0)
    hn::BlendedStore(v, hn::FirstN(d, static_cast<size_t>(valid)), d, y);
}

template <int MR, int NV>
HWY_INLINE void StoreTile(hn::Vec<DF> (&acc)[MR][NV], float* y, int64_t ldy, int64_t valid_cols) {
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v)
      StoreColumns(acc[i][v], y + i * ldy + v * kLanes, valid_cols - v * kLanes);
}

template <int MR, int NV>
HWY_INLINE void TileF32(const float* x, int64_t ldx, const float* panels, int64_t K, float* y,
                        int64_t ldy, int64_t valid_cols, PrefetchLines ahead) {
  const DF d;
  const int64_t panel_size = 16 * K;
  hn::Vec<DF> acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = hn::Zero(d);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t p = 0; p < NV * kLanes / 16; ++p)
      hwy::Prefetch(panels + p * panel_size + 16 * (k + kPrefetchSteps));
    ahead.step();
    hn::Vec<DF> w[NV];
    for (int v = 0; v < NV; ++v) w[v] = hn::LoadU(d, panels + VectorOffset(v, panel_size) + 16 * k);
    for (int i = 0; i < MR; ++i) {
      const auto xi = hn::Set(d, x[i * ldx + k]);
      for (int v = 0; v < NV; ++v) acc[i][v] = hn::MulAdd(xi, w[v], acc[i][v]);
    }
  }
  StoreTile<MR, NV>(acc, y, ldy, valid_cols);
}

// bfloat16 pairs widened in registers: the low half of each 32-bit lane is W[.][2p], the high
// half W[.][2p + 1]; a bfloat16 is the top 16 bits of a float32.
template <int MR, int NV>
HWY_INLINE void TileBF16(const float* x, int64_t ldx, const uint16_t* panels, int64_t K, float* y,
                         int64_t ldy, int64_t valid_cols, PrefetchLines ahead) {
  const DF d;
  const hn::RebindToUnsigned<DF> du;
  const int64_t pairs = (K + 1) / 2, panel_size = 32 * pairs;
  const auto high_half = hn::Set(du, 0xFFFF0000u);
  hn::Vec<DF> acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = hn::Zero(d);
  for (int64_t p = 0; p < pairs; ++p) {
    for (int64_t q = 0; q < NV * kLanes / 16; ++q)
      hwy::Prefetch(panels + q * panel_size + 32 * (p + kPrefetchSteps));
    ahead.step();
    hn::Vec<DF> even[NV], odd[NV];
    for (int v = 0; v < NV; ++v) {
      const uint16_t* line =
          panels + (v * kLanes / 16) * panel_size + 32 * p + 2 * ((v * kLanes) % 16);
      const auto bits = hn::LoadU(du, reinterpret_cast<const uint32_t*>(line));
      even[v] = hn::BitCast(d, hn::ShiftLeft<16>(bits));
      odd[v] = hn::BitCast(d, hn::And(bits, high_half));
    }
    const bool has_odd = 2 * p + 1 < K;  // the last pair of an odd K is padded with zeros
    for (int i = 0; i < MR; ++i) {
      const auto x0 = hn::Set(d, x[i * ldx + 2 * p]);
      const auto x1 = hn::Set(d, has_odd ? x[i * ldx + 2 * p + 1] : 0.0f);
      for (int v = 0; v < NV; ++v)
        acc[i][v] = hn::MulAdd(x1, odd[v], hn::MulAdd(x0, even[v], acc[i][v]));
    }
  }
  StoreTile<MR, NV>(acc, y, ldy, valid_cols);
}

constexpr int64_t kMaxVectors = kPanelsPerTile * 16 / kLanes;

// Calls Tile<mr, nv>::Run for runtime 1 <= mr <= MR, 1 <= nv <= NV.
template <template <int, int> class Tile, int MR, int NV, class... Args>
HWY_INLINE void DispatchTile(int64_t mr, int64_t nv, Args... args) {
  if (mr == MR) {
    if (nv == NV) return Tile<MR, NV>::Run(args...);
    if constexpr (NV > 1) return DispatchTile<Tile, MR, NV - 1>(mr, nv, args...);
  } else if constexpr (MR > 1) {
    return DispatchTile<Tile, MR - 1, kMaxVectors>(mr, nv, args...);
  }
}

template <int MR, int NV>
struct RunF32 {
  static void Run(const float* x, int64_t ldx, const float* panels, int64_t K, float* y,
                  int64_t ldy, int64_t valid_cols, PrefetchLines ahead) {
    TileF32<MR, NV>(x, ldx, panels, K, y, ldy, valid_cols, ahead);
  }
};
template <int MR, int NV>
struct RunBF16 {
  static void Run(const float* x, int64_t ldx, const uint16_t* panels, int64_t K, float* y,
                  int64_t ldy, int64_t valid_cols, PrefetchLines ahead) {
    TileBF16<MR, NV>(x, ldx, panels, K, y, ldy, valid_cols, ahead);
  }
};

// Output columns [16 * panel_begin, min(16 * panel_end, N)) of all M rows.
template <template <int, int> class Tile, class W>
void GemmPacked(const float* x, int64_t ldx, int64_t M, const W* panels, int64_t panel_size,
                int64_t steps, int64_t K, float* y, int64_t ldy, int64_t N, int64_t panel_begin,
                int64_t panel_end, PrefetchSpan ahead) {
  const int64_t groups = (panel_end - panel_begin + kPanelsPerTile - 1) / kPanelsPerTile;
  int64_t group = 0;
  for (int64_t p = panel_begin; p < panel_end; p += kPanelsPerTile, ++group) {
    const int64_t tile_panels = std::min(kPanelsPerTile, panel_end - p);
    const int64_t nv = tile_panels * 16 / kLanes;
    const int64_t valid_cols = std::min(N, 16 * (p + tile_panels)) - 16 * p;
    for (int64_t m = 0; m < M; m += kRowsPerTile) {
      // The last row tile reads its panels from cache, leaving the memory free for `ahead`.
      const bool last = m + kRowsPerTile >= M;
      DispatchTile<Tile, kRowsPerTile, kMaxVectors>(
          std::min(kRowsPerTile, M - m), nv, x + m * ldx, ldx, panels + p * panel_size, K,
          y + m * ldy + 16 * p, ldy, valid_cols,
          last ? ahead.share(group, groups, steps) : PrefetchLines{});
    }
  }
}

void GemmPackedF32(const float* x, int64_t ldx, int64_t M, const float* panels, int64_t K, float* y,
                   int64_t ldy, int64_t N, int64_t panel_begin, int64_t panel_end,
                   PrefetchSpan ahead) {
  GemmPacked<RunF32>(x, ldx, M, panels, 16 * K, K, K, y, ldy, N, panel_begin, panel_end, ahead);
}

void GemmPackedBF16(const float* x, int64_t ldx, int64_t M, const uint16_t* panels, int64_t K,
                    float* y, int64_t ldy, int64_t N, int64_t panel_begin, int64_t panel_end,
                    PrefetchSpan ahead) {
  const int64_t pairs = (K + 1) / 2;
  GemmPacked<RunBF16>(x, ldx, M, panels, 32 * pairs, pairs, K, y, ldy, N, panel_begin, panel_end,
                      ahead);
}

}  // namespace HWY_NAMESPACE
}  // namespace mmdit::simd
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MMDIT_HAVE_DPBF16 1
#endif

namespace mmdit::simd {

HWY_EXPORT(GemmPackedF32);
HWY_EXPORT(GemmPackedBF16);

void gemm_packed_f32(const float* x, int64_t ldx, int64_t m, const float* panels, int64_t k,
                     float* y, int64_t ldy, int64_t n, int64_t panel_begin, int64_t panel_end,
                     PrefetchSpan ahead) {
  HWY_DYNAMIC_DISPATCH(GemmPackedF32)
  (x, ldx, m, panels, k, y, ldy, n, panel_begin, panel_end, ahead);
}

void gemm_packed_bf16(const float* x, int64_t ldx, int64_t m, const uint16_t* panels, int64_t k,
                      float* y, int64_t ldy, int64_t n, int64_t panel_begin, int64_t panel_end,
                      PrefetchSpan ahead) {
  HWY_DYNAMIC_DISPATCH(GemmPackedBF16)
  (x, ldx, m, panels, k, y, ldy, n, panel_begin, panel_end, ahead);
}

// AVX-512 BF16's vdpbf16ps: Highway 1.0.3 (Debian 12) does not emit it, so this one kernel uses
// the intrinsics, compiled for that extension alone and called only where the CPU reports it.
#ifdef MMDIT_HAVE_DPBF16
#define MMDIT_TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

bool has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
  return has;
}

bool use_bf16_dot_kernel() {
  static const bool use = [] {
    if (!has_avx512_bf16()) return false;
    if (const char* choice = std::getenv("MMDIT_BF16_KERNEL")) {
      const std::string_view c = choice;
      MMDIT_CHECK(c == "dot" || c == "widen", "MMDIT_BF16_KERNEL must be 'dot' or 'widen', not '",
                  c, "'");
      return c == "dot";
    }
    return __builtin_cpu_is("amd") != 0;
  }();
  return use;
}

namespace {

template <int MR, int NP>
MMDIT_TARGET_BF16 inline void TileDot(const uint16_t* xb, int64_t ldxb, const uint16_t* panels,
                                      int64_t pairs, float* y, int64_t ldy, int64_t valid_cols,
                                      PrefetchLines ahead) {
  const int64_t panel_size = 32 * pairs;
  __m512 acc[MR][NP];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    for (int j = 0; j < NP; ++j)
      _mm_prefetch(
          reinterpret_cast<const char*>(panels + j * panel_size + 32 * (p + kPrefetchSteps)),
          _MM_HINT_T0);
    ahead.step();
    __m512bh w[NP];
    for (int j = 0; j < NP; ++j)
      w[j] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(panels + j * panel_size + 32 * p));
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      __builtin_memcpy(&pair, xb + i * ldxb + 2 * p, sizeof pair);
      const __m512bh xi = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
      for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xi, w[j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NP; ++j) {
      const int64_t valid = valid_cols - 16 * j;
      if (valid >= 16)
        _mm512_storeu_ps(y + i * ldy + 16 * j, acc[i][j]);
      else if (valid > 0)
        _mm512_mask_storeu_ps(y + i * ldy + 16 * j, static_cast<__mmask16>((1u << valid) - 1),
                              acc[i][j]);
    }
}

constexpr int64_t kDotRows = 8, kDotPanels = 3;

template <int MR>
MMDIT_TARGET_BF16 void dispatch_dot(int64_t mr, int64_t np, const uint16_t* xb, int64_t ldxb,
                                    const uint16_t* panels, int64_t pairs, float* y, int64_t ldy,
                                    int64_t valid_cols, PrefetchLines ahead) {
  if (mr != MR) {
    if constexpr (MR > 1)
      dispatch_dot<MR - 1>(mr, np, xb, ldxb, panels, pairs, y, ldy, valid_cols, ahead);
    return;
  }
  if (np == 3) return TileDot<MR, 3>(xb, ldxb, panels, pairs, y, ldy, valid_cols, ahead);
  if (np == 2) return TileDot<MR, 2>(xb, ldxb, panels, pairs, y, ldy, valid_cols, ahead);
  TileDot<MR, 1>(xb, ldxb, panels, pairs, y, ldy, valid_cols, ahead);
}

}  // namespace

MMDIT_TARGET_BF16 void to_bf16_rows(const float* x, int64_t ldx, int64_t m, int64_t k,
                                    uint16_t* out, int64_t ld_out) {
  for (int64_t i = 0; i < m; ++i) {
    const float* row = x + i * ldx;
    uint16_t* dst = out + i * ld_out;
    int64_t j = 0;
    for (; j + 16 <= k; j += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j),
                          reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(row + j))));
    if (j < k) {
      const __mmask16 mask = static_cast<__mmask16>((1u << (k - j)) - 1);
      const __m256bh b = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, row + j));
      _mm256_mask_storeu_epi16(dst + j, mask, reinterpret_cast<__m256i>(b));
    }
    for (int64_t pad = k; pad < ld_out; ++pad) dst[pad] = 0;
  }
}

MMDIT_TARGET_BF16 void gemm_packed_bf16_dot(const uint16_t* xb, int64_t ldxb, int64_t m,
                                            const uint16_t* panels, int64_t k, float* y,
                                            int64_t ldy, int64_t n, int64_t panel_begin,
                                            int64_t panel_end, PrefetchSpan ahead) {
  const int64_t pairs = (k + 1) / 2;
  const int64_t groups = (panel_end - panel_begin + kDotPanels - 1) / kDotPanels;
  int64_t group = 0;
  for (int64_t p = panel_begin; p < panel_end; p += kDotPanels, ++group) {
    const int64_t np = std::min(kDotPanels, panel_end - p);
    const int64_t valid_cols = std::min(n, 16 * (p + np)) - 16 * p;
    for (int64_t i = 0; i < m; i += kDotRows) {
      const bool last = i + kDotRows >= m;
      dispatch_dot<kDotRows>(std::min(kDotRows, m - i), np, xb + i * ldxb, ldxb,
                             panels + p * 32 * pairs, pairs, y + i * ldy + 16 * p, ldy, valid_cols,
                             last ? ahead.share(group, groups, pairs) : PrefetchLines{});
    }
  }
}
#else
bool has_avx512_bf16() {
  return false;
}
bool use_bf16_dot_kernel() {
  return false;
}
void to_bf16_rows(const float*, int64_t, int64_t, int64_t, uint16_t*, int64_t) {
  MMDIT_CHECK(false, "to_bf16_rows: built without AVX-512 BF16 support");
}
void gemm_packed_bf16_dot(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, float*,
                          int64_t, int64_t, int64_t, int64_t, PrefetchSpan) {
  MMDIT_CHECK(false, "gemm_packed_bf16_dot: built without AVX-512 BF16 support");
}
#endif

}  // namespace mmdit::simd
#endif  // HWY_ONCE
