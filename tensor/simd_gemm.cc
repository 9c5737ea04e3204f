// Products with few rows, y = x W^T, as a policy computes them when acting on one observation:
// (16, 256) @ (256, 1536). OpenBLAS packs all of W into its panel format on every call, which for
// so few rows costs more than the arithmetic. Here each output is a dot product of two
// contiguous rows, computed in 4 x 4 register tiles, so W is read once, straight from memory.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tensor/simd_gemm.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep

#include <hwy/highway.h>

#include <algorithm>

#include "tensor/simd.h"

HWY_BEFORE_NAMESPACE();
namespace mmdit::simd {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// y[i][j] = dot(x row i, w row j) for an MR x NR tile.
template <int MR, int NR>
HWY_INLINE void Tile(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y,
                     int64_t ldy, int64_t K) {
  const hn::ScalableTag<float> d;
  const int64_t L = static_cast<int64_t>(hn::Lanes(d));
  hn::Vec<decltype(d)> acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = hn::Zero(d);
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    hn::Vec<decltype(d)> wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = hn::LoadU(d, w + j * ldw + k);
    for (int i = 0; i < MR; ++i) {
      const auto xv = hn::LoadU(d, x + i * ldx + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = hn::MulAdd(xv, wv[j], acc[i][j]);
    }
  }
  if (k < K) {
    const auto mask = hn::FirstN(d, static_cast<size_t>(K - k));
    hn::Vec<decltype(d)> wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = hn::MaskedLoad(mask, d, w + j * ldw + k);
    for (int i = 0; i < MR; ++i) {
      const auto xv = hn::MaskedLoad(mask, d, x + i * ldx + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = hn::MulAdd(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[i * ldy + j] = hn::GetLane(hn::SumOfLanes(d, acc[i][j]));
}

template <int MR>
HWY_INLINE void TileRows(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y,
                         int64_t ldy, int64_t K, int64_t nr) {
  switch (nr) {
    case 4:
      return Tile<MR, 4>(x, ldx, w, ldw, y, ldy, K);
    case 3:
      return Tile<MR, 3>(x, ldx, w, ldw, y, ldy, K);
    case 2:
      return Tile<MR, 2>(x, ldx, w, ldw, y, ldy, K);
    default:
      return Tile<MR, 1>(x, ldx, w, ldw, y, ldy, K);
  }
}

void GemmNTF32(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy,
               int64_t M, int64_t n_begin, int64_t n_end, int64_t K) {
  for (int64_t n = n_begin; n < n_end; n += 4) {
    const int64_t nr = std::min<int64_t>(4, n_end - n);
    for (int64_t m = 0; m < M; m += 4) {
      const float* xt = x + m * ldx;
      const float* wt = w + n * ldw;
      float* yt = y + m * ldy + n;
      switch (std::min<int64_t>(4, M - m)) {
        case 4:
          TileRows<4>(xt, ldx, wt, ldw, yt, ldy, K, nr);
          break;
        case 3:
          TileRows<3>(xt, ldx, wt, ldw, yt, ldy, K, nr);
          break;
        case 2:
          TileRows<2>(xt, ldx, wt, ldw, yt, ldy, K, nr);
          break;
        default:
          TileRows<1>(xt, ldx, wt, ldw, yt, ldy, K, nr);
          break;
      }
    }
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace mmdit::simd
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace mmdit::simd {

HWY_EXPORT(GemmNTF32);

void gemm_nt(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy,
             int64_t m, int64_t n_begin, int64_t n_end, int64_t k) {
  HWY_DYNAMIC_DISPATCH(GemmNTF32)(x, ldx, w, ldw, y, ldy, m, n_begin, n_end, k);
}

}  // namespace mmdit::simd
#endif  // HWY_ONCE
