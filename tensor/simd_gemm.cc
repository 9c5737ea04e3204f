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
#include "tensor/simd_tail-inl.h"

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
    const int64_t rest = K - k;
    hn::Vec<decltype(d)> wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = LoadFirst(d, w + j * ldw + k, rest, 0.0f);
    for (int i = 0; i < MR; ++i) {
      const auto xv = LoadFirst(d, x + i * ldx + k, rest, 0.0f);
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

// c (m x n) = op(a) b with b's rows contiguous, for the small per-head products of attention:
// a tile of MR rows x kVectors vectors of c stays in registers while l runs over the inner
// dimension; each step broadcasts op(a)[i][l] and multiply-adds row l of b. The tile, b's
// vectors and the broadcast must fit in the registers: AVX-512 has 32, AVX2 and SSE 16, where
// a 4 x 4 tile spilled its accumulators to the stack on every step.
constexpr int kVectors = HWY_MAX_BYTES >= 64 ? 4 : 2;
constexpr int kTileRows = HWY_MAX_BYTES >= 64 ? 4 : 6;

template <int MR>
HWY_INLINE void RowsTimesMatrix(bool ta, const float* a, int64_t lda, const float* b, int64_t ldb,
                                float* c, int64_t ldc, int64_t n, int64_t k) {
  const hn::ScalableTag<float> d;
  const int64_t L = static_cast<int64_t>(hn::Lanes(d));
  for (int64_t col = 0; col < n; col += kVectors * L) {
    const int64_t width = std::min<int64_t>(kVectors * L, n - col);
    const int64_t full = width / L;  // whole vectors; then at most one partial
    const size_t rest = static_cast<size_t>(width - full * L);
    hn::Vec<decltype(d)> acc[MR][kVectors];
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < kVectors; ++v) acc[i][v] = hn::Zero(d);
    for (int64_t l = 0; l < k; ++l) {
      const float* bl = b + l * ldb + col;
      hn::Vec<decltype(d)> bv[kVectors];
      for (int v = 0; v < kVectors; ++v)
        bv[v] = v < full            ? hn::LoadU(d, bl + v * L)
                : v == full && rest ? LoadFirst(d, bl + v * L, static_cast<int64_t>(rest), 0.0f)
                                    : hn::Zero(d);
      for (int i = 0; i < MR; ++i) {
        const auto ai = hn::Set(d, ta ? a[l * lda + i] : a[i * lda + l]);
        for (int v = 0; v < kVectors; ++v) acc[i][v] = hn::MulAdd(ai, bv[v], acc[i][v]);
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < kVectors; ++v) {
        float* ci = c + i * ldc + col + v * L;
        if (v < full)
          hn::StoreU(acc[i][v], d, ci);
        else if (v == full && rest)
          hn::BlendedStore(acc[i][v], hn::FirstN(d, rest), d, ci);
      }
  }
}

// The last m % kTileRows rows in one smaller tile.
template <int MR>
HWY_INLINE void LastRowsTimesMatrix(int64_t rows, bool ta, const float* a, int64_t lda,
                                    const float* b, int64_t ldb, float* c, int64_t ldc, int64_t n,
                                    int64_t k) {
  if constexpr (MR > 0) {
    if (rows == MR) return RowsTimesMatrix<MR>(ta, a, lda, b, ldb, c, ldc, n, k);
    LastRowsTimesMatrix<MR - 1>(rows, ta, a, lda, b, ldb, c, ldc, n, k);
  }
}

void GemmSmallNNF32(bool ta, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                    int64_t ldc, int64_t m, int64_t n, int64_t k) {
  // Row r of op(a) starts at a + r (a transposed: its column r) or at a + r * lda.
  const auto row = [&](int64_t r) { return ta ? a + r : a + r * lda; };
  int64_t i = 0;
  for (; i + kTileRows <= m; i += kTileRows)
    RowsTimesMatrix<kTileRows>(ta, row(i), lda, b, ldb, c + i * ldc, ldc, n, k);
  if (i < m)
    LastRowsTimesMatrix<kTileRows - 1>(m - i, ta, row(i), lda, b, ldb, c + i * ldc, ldc, n, k);
}

}  // namespace HWY_NAMESPACE
}  // namespace mmdit::simd
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace mmdit::simd {

HWY_EXPORT(GemmNTF32);
HWY_EXPORT(GemmSmallNNF32);

void gemm_small_nn(bool ta, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                   int64_t ldc, int64_t m, int64_t n, int64_t k) {
  HWY_DYNAMIC_DISPATCH(GemmSmallNNF32)(ta, a, lda, b, ldb, c, ldc, m, n, k);
}

void gemm_nt(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy,
             int64_t m, int64_t n_begin, int64_t n_end, int64_t k) {
  HWY_DYNAMIC_DISPATCH(GemmNTF32)(x, ldx, w, ldw, y, ldy, m, n_begin, n_end, k);
}

}  // namespace mmdit::simd
#endif  // HWY_ONCE
