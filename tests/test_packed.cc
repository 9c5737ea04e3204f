// Packed inference weights (tensor/packed_weight.h): products against a float64 sum of the same
// (rounded) values, the documented panel layout, bfloat16 rounding, the FrozenWeights routing of
// linear layers, and the sampler that uses them.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <hwy/targets.h>

#include <bit>
#include <cfloat>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>

#include "autodiff/fused.h"
#include "nn/functional.h"
#include "nn/layers.h"
#include "tensor/packed_weight.h"
#include "tensor/parallel.h"
#include "tensor/random.h"
#include "tensor/simd.h"
#include "tests/test_util.h"
#include "train/policy.h"

namespace mmdit {
namespace {

using test::error_of;
using ::testing::HasSubstr;

float round_bf16(float x) {
  return from_bf16(to_bf16(x));
}

// y = x W^T in float64 from the values the kernel multiplies, and the scale of each output's
// terms (sum |x w|) that float32 accumulation error is proportional to.
struct Reference {
  std::vector<double> y, scale;
};
Reference reference_product(const Tensor& x, const Tensor& w, bool round_x, bool round_w) {
  const int64_t M = x.shape()[0], K = x.shape()[1], N = w.shape()[0];
  const auto xv = x.to_vector<float>(), wv = w.to_vector<float>();
  Reference r{std::vector<double>(M * N, 0.0), std::vector<double>(M * N, 0.0)};
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j)
      for (int64_t k = 0; k < K; ++k) {
        const double a = round_x ? round_bf16(xv[i * K + k]) : xv[i * K + k];
        const double b = round_w ? round_bf16(wv[j * K + k]) : wv[j * K + k];
        r.y[i * N + j] += a * b;
        r.scale[i * N + j] += std::abs(a * b);
      }
  return r;
}

void expect_close(const std::vector<float>& y, const Reference& r, int64_t K,
                  const std::string& where) {
  ASSERT_EQ(y.size(), r.y.size()) << where;
  for (size_t i = 0; i < y.size(); ++i) {
    // float32 summation of K terms: a few ulps of sum |terms| per term, bounded loosely.
    const double tol = 4.0 * K * std::numeric_limits<float>::epsilon() * r.scale[i] + 1e-30;
    ASSERT_NEAR(y[i], r.y[i], tol) << where << " element " << i;
  }
}

// W (N, K) packed by hand from the bfloat16 layout packed_gemm.cc documents:
// panel[k / 2][c][e] = W[16 p + c][2 (k / 2) + e], zero-padded.
std::vector<uint16_t> pack_bf16_by_hand(const Tensor& w) {
  const int64_t N = w.shape()[0], K = w.shape()[1];
  const auto wv = w.to_vector<float>();
  const int64_t pairs = (K + 1) / 2;
  std::vector<uint16_t> packed(static_cast<size_t>((N + 15) / 16 * pairs * 32), 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k)
      packed[((n / 16) * pairs + k / 2) * 32 + (n % 16) * 2 + k % 2] = to_bf16(wv[n * K + k]);
  return packed;
}

// M x N x K cases: ragged panels (N % 16), odd K (bfloat16 pairs), rows past one register tile.
const std::vector<std::array<int64_t, 3>> kShapes = {
    {1, 1, 1}, {2, 17, 3}, {3, 101, 7}, {9, 50, 33}, {16, 96, 256}, {19, 48, 64}, {64, 40, 130}};

TEST(PackedWeight, Float32EqualsTheExactProduct) {
  Rng rng(1);
  for (const auto& [M, N, K] : kShapes) {
    const Tensor x = rng.normal({M, K}), w = rng.normal({N, K});
    const PackedWeight packed(w, WeightPrecision::f32);
    const Tensor y = raw::matmul_packed(x, packed);
    ASSERT_EQ(y.shape(), Shape({M, N}));
    expect_close(y.to_vector<float>(), reference_product(x, w, false, false), K,
                 "f32 " + shape_str({M, N, K}));
  }
}

TEST(PackedWeight, Bfloat16EqualsTheProductOfRoundedValues) {
  Rng rng(2);
  // With vdpbf16ps the inputs are rounded too; widened, they stay float32.
  const bool rounds_inputs = simd::use_bf16_dot_kernel();
  for (const auto& [M, N, K] : kShapes) {
    const Tensor x = rng.normal({M, K}), w = rng.normal({N, K});
    const PackedWeight packed(w, WeightPrecision::bf16);
    expect_close(raw::matmul_packed(x, packed).to_vector<float>(),
                 reference_product(x, w, rounds_inputs, true), K, "bf16 " + shape_str({M, N, K}));
  }
}

// The widening kernel (the path for CPUs without AVX-512 BF16), called directly on panels built
// here from the layout packed_gemm.cc documents, so the layout is checked too.
TEST(PackedWeight, WideningKernelFollowsTheDocumentedLayout) {
  Rng rng(3);
  for (const auto& [M, N, K] : kShapes) {
    const Tensor x = rng.normal({M, K}), w = rng.normal({N, K});
    const std::vector<uint16_t> packed = pack_bf16_by_hand(w);
    const int64_t panels = (N + 15) / 16;
    std::vector<float> y(static_cast<size_t>(M * N), -1.0f);
    simd::gemm_packed_bf16(x.data<float>(), K, M, packed.data(), K, y.data(), N, N, 0, panels);
    expect_close(y, reference_product(x, w, false, true), K, "widening " + shape_str({M, N, K}));
  }
}

// The vdpbf16ps kernel, called directly: on CPUs where widening is the default it runs only
// when MMDIT_BF16_KERNEL=dot asks for it, so it is checked here whatever the default.
TEST(PackedWeight, DotKernelEqualsTheProductOfRoundedValues) {
  if (!simd::has_avx512_bf16()) GTEST_SKIP() << "this CPU has no AVX-512 BF16";
  Rng rng(4);
  for (const auto& [M, N, K] : kShapes) {
    const Tensor x = rng.normal({M, K}), w = rng.normal({N, K});
    const std::vector<uint16_t> packed = pack_bf16_by_hand(w);
    const int64_t ldxb = (K + 1) / 2 * 2, panels = (N + 15) / 16;
    std::vector<uint16_t> xb(static_cast<size_t>(M * ldxb));
    simd::to_bf16_rows(x.data<float>(), K, M, K, xb.data(), ldxb);
    std::vector<float> y(static_cast<size_t>(M * N), -1.0f);
    simd::gemm_packed_bf16_dot(xb.data(), ldxb, M, packed.data(), K, y.data(), N, N, 0, panels);
    expect_close(y, reference_product(x, w, true, true), K, "dot " + shape_str({M, N, K}));
  }
}

// The kernels are compiled for every x86 target Highway supports and picked at run time; a user's
// CPU may run one that this machine would not choose. Each target this CPU can run is forced in
// turn and held to the same float64 reference.
TEST(PackedWeight, EveryCompiledTargetGivesTheExactProduct) {
  Rng rng(10);
  const int64_t M = 19, N = 101, K = 33;
  const Tensor x = rng.normal({M, K}), w = rng.normal({N, K});
  const Reference exact = reference_product(x, w, false, false);
  const Reference rounded_w = reference_product(x, w, false, true);
  const PackedWeight f32(w, WeightPrecision::f32);
  const std::vector<uint16_t> bf16 = pack_bf16_by_hand(w);
  const int64_t panels = (N + 15) / 16;
  int tested = 0;
  for (const int64_t target : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(target);
    hwy::GetChosenTarget().Update(hwy::SupportedTargets());
    const std::string name = hwy::TargetName(target);
    expect_close(raw::matmul_packed(x, f32).to_vector<float>(), exact, K, "f32 on " + name);
    std::vector<float> y(static_cast<size_t>(M * N));
    simd::gemm_packed_bf16(x.data<float>(), K, M, bf16.data(), K, y.data(), N, N, 0, panels);
    expect_close(y, rounded_w, K, "widening bf16 on " + name);
    // Attention's small per-head kernels: x w^T, and x^T-free x (w^T)^T through gemm_small_nn.
    simd::gemm_nt(x.data<float>(), K, w.data<float>(), K, y.data(), N, M, 0, N, K);
    expect_close(y, exact, K, "gemm_nt on " + name);
    const Tensor wt = raw::contiguous(raw::transpose(w, 0, 1));  // (K, N)
    simd::gemm_small_nn(false, x.data<float>(), K, wt.data<float>(), N, y.data(), N, M, N, K);
    expect_close(y, exact, K, "gemm_small_nn on " + name);
    const Tensor xt = raw::contiguous(raw::transpose(x, 0, 1));  // (K, M): op(a) = a^T
    simd::gemm_small_nn(true, xt.data<float>(), M, wt.data<float>(), N, y.data(), N, M, N, K);
    expect_close(y, exact, K, "gemm_small_nn transposed on " + name);
    // Every row count up to 13: whole row tiles (4 or 6 rows, by target) and every remainder.
    for (int64_t m = 1; m <= 13; ++m) {
      const Tensor xm = raw::contiguous(raw::narrow(x, 0, 0, m));
      const Reference exact_m = reference_product(xm, w, false, false);
      std::vector<float> ym(static_cast<size_t>(m * N), NAN);
      simd::gemm_small_nn(false, xm.data<float>(), K, wt.data<float>(), N, ym.data(), N, m, N, K);
      expect_close(ym, exact_m, K, "gemm_small_nn, " + std::to_string(m) + " rows, on " + name);
      std::fill(ym.begin(), ym.end(), NAN);
      simd::gemm_small_nn(true, xt.data<float>(), M, wt.data<float>(), N, ym.data(), N, m, N, K);
      expect_close(ym, exact_m, K,
                   "gemm_small_nn transposed, " + std::to_string(m) + " rows, on " + name);
      // gemm_nt's edge tiles: every row and column remainder of its 4 x 4 tiles.
      for (int64_t n = 1; n <= 9; ++n) {
        const Tensor wn = raw::contiguous(raw::narrow(w, 0, 0, n));
        std::vector<float> yn(static_cast<size_t>(m * n), NAN);
        simd::gemm_nt(xm.data<float>(), K, wn.data<float>(), K, yn.data(), n, m, 0, n, K);
        expect_close(yn, reference_product(xm, wn, false, false), K,
                     "gemm_nt " + std::to_string(m) + " x " + std::to_string(n) + " on " + name);
      }
    }
    // Short softmax rows end in a partial vector, loaded and stored lane-masked.
    for (const int64_t n : {5, 18}) {
      const std::vector<float> row = rng.normal({n}).to_vector<float>();
      std::vector<float> p(static_cast<size_t>(n) + 1, -1.0f);  // one guard value past the row
      simd::softmax(row.data(), p.data(), n);
      double sum = 0;
      for (const float v : row) sum += std::exp(static_cast<double>(v));
      for (int64_t j = 0; j < n; ++j)
        EXPECT_NEAR(p[j], std::exp(static_cast<double>(row[j])) / sum, 1e-6) << name << " n=" << n;
      EXPECT_EQ(p[n], -1.0f) << "softmax wrote past its row on " << name;
    }
    ++tested;
  }
  hwy::SetSupportedTargetsForTest(0);
  hwy::GetChosenTarget().Update(hwy::SupportedTargets());
  EXPECT_GE(tested, 2);  // at least AVX2 and one other on any x86-64 CPU this project targets
}

// The checks of AttentionRows (below) on the target in use, in float32 or float64; tight for
// values of order 1, loose for sums over a row.
template <class T>
void check_attention_rows(const std::string& name, Rng& rng) {
  const DType dtype = std::is_same_v<T, float> ? DType::f32 : DType::f64;
  const double tight = std::is_same_v<T, float> ? 1e-6 : 1e-14;
  const double loose = std::is_same_v<T, float> ? 1e-5 : 1e-13;
  const T scale = T(0.125);
  for (const int64_t n : {5, 18, 37}) {
    for (const int pattern : {0, 1, 2}) {  // every other allowed, none allowed, no mask
      const std::vector<T> logits = rng.normal({n}, dtype, 0, 4).template to_vector<T>();
      const std::vector<T> dp = rng.normal({n}, dtype).template to_vector<T>();
      std::vector<T> allowed(static_cast<size_t>(n));
      for (int64_t j = 0; j < n; ++j) allowed[j] = pattern == 0 ? static_cast<T>(j % 2) : 0;
      const T* mask = pattern == 2 ? nullptr : allowed.data();
      std::vector<double> expected(static_cast<size_t>(n));
      double row_max = -INFINITY, sum = 0;
      for (int64_t j = 0; j < n; ++j) {
        expected[j] = !mask || mask[j] != 0 ? scale * static_cast<double>(logits[j])
                                            : -0.7 * static_cast<double>(FLT_MAX);
        row_max = std::max(row_max, expected[j]);
      }
      for (double& e : expected) sum += e = std::exp(e - row_max);
      for (double& e : expected) e /= sum;
      std::vector<T> p(logits);
      p.push_back(T(-1));  // guard
      T got_max = 0, got_sum = 0;
      simd::attention_softmax(p.data(), n, mask, scale, &got_max, &got_sum);
      std::vector<T> again(logits);
      again.push_back(T(-1));
      simd::attention_softmax_again(again.data(), n, mask, scale, got_max, got_sum);
      double dot = 0;
      for (int64_t j = 0; j < n; ++j) dot += static_cast<double>(dp[j]) * expected[j];
      std::vector<T> ds(dp);
      ds.push_back(T(-1));
      simd::attention_softmax_backward(ds.data(), p.data(), n, mask, scale);
      const std::string where =
          name + " n=" + std::to_string(n) + " pattern " + std::to_string(pattern);
      if constexpr (std::is_same_v<T, float>)
        EXPECT_FLOAT_EQ(got_max, static_cast<float>(row_max)) << where;
      else
        EXPECT_DOUBLE_EQ(got_max, row_max) << where;
      for (int64_t j = 0; j < n; ++j) {
        EXPECT_NEAR(p[j], expected[j], tight) << where << " j=" << j;
        EXPECT_EQ(again[j], p[j]) << where << " j=" << j;
        const double ds_expected =
            !mask || mask[j] != 0 ? scale * expected[j] * (dp[j] - dot) : 0.0;
        EXPECT_NEAR(ds[j], ds_expected, tight) << where << " j=" << j;
      }
      EXPECT_EQ(p[n], T(-1)) << where;
      EXPECT_EQ(again[n], T(-1)) << where;
      EXPECT_EQ(ds[n], T(-1)) << where;
    }
  }
  // QK-RMSNorm with the rotary embedding over strided rows, forward and backward, against the
  // closed form in float64: z = x inv gamma, inv = 1 / sqrt(mean(x^2) + eps); y = z cos +
  // rotate_half(z) sin; dz = rope^T(dy), dgamma = sum of dz x inv, dx = inv (dz gamma) - x
  // inv^3 mean(dz gamma x). d with and without partial vectors; nothing written between rows.
  for (const int64_t d : {6, 40, 64}) {
    const int64_t rows = 3, half = d / 2, ld_x = 3 * d, ld_y = 2 * d, ld_dy = d + 2;
    const double eps = 1e-6;
    const std::vector<T> x = rng.normal({rows * ld_x}, dtype).template to_vector<T>();
    const std::vector<T> dy = rng.normal({rows * ld_dy}, dtype).template to_vector<T>();
    const std::vector<T> gamma = rng.normal({d}, dtype).template to_vector<T>();
    const std::vector<T> cos = rng.normal({rows * d}, dtype).template to_vector<T>();
    const std::vector<T> sin = rng.normal({rows * d}, dtype).template to_vector<T>();
    std::vector<T> y(rows * ld_y, T(-1)), inv(rows), dx(rows * ld_x, T(-1)), dgamma(d, 0.5f), dz(d);
    simd::qk_norm_rope_rows(x.data(), ld_x, rows, d, gamma.data(), cos.data(), sin.data(), eps,
                            y.data(), ld_y, inv.data());
    simd::qk_norm_rope_rows_backward(dy.data(), ld_dy, x.data(), ld_x, rows, d, inv.data(),
                                     gamma.data(), cos.data(), sin.data(), dz.data(), dgamma.data(),
                                     dx.data());
    std::vector<double> dgamma_expected(d, 0.5);
    const std::string where = name + " d=" + std::to_string(d);
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x.data() + r * ld_x;
      const T *c = cos.data() + r * d, *sn = sin.data() + r * d, *g = dy.data() + r * ld_dy;
      double mean_square = 0;
      for (int64_t j = 0; j < d; ++j) mean_square += double(xr[j]) * xr[j] / d;
      const double row_inv = 1 / std::sqrt(mean_square + eps);
      EXPECT_NEAR(inv[r], row_inv, tight * row_inv) << where;
      std::vector<double> z(d), dzg(d);
      for (int64_t j = 0; j < d; ++j) z[j] = xr[j] * row_inv * gamma[j];
      double dot = 0;
      for (int64_t j = 0; j < half; ++j) {
        EXPECT_NEAR(y[r * ld_y + j], z[j] * c[j] - z[j + half] * sn[j], loose) << where;
        EXPECT_NEAR(y[r * ld_y + half + j], z[j + half] * c[j + half] + z[j] * sn[j + half], loose)
            << where;
        const double lo = double(g[j]) * c[j] + double(g[j + half]) * sn[j + half];
        const double hi = double(g[j + half]) * c[j + half] - double(g[j]) * sn[j];
        dzg[j] = lo;
        dzg[j + half] = hi;
      }
      for (int64_t j = 0; j < d; ++j) {
        dgamma_expected[j] += dzg[j] * xr[j] * row_inv;
        dzg[j] *= gamma[j];
        dot += dzg[j] * xr[j];
      }
      const double k3 = dot / d * row_inv * row_inv * row_inv;
      for (int64_t j = 0; j < d; ++j)
        EXPECT_NEAR(dx[r * ld_x + j], row_inv * dzg[j] - xr[j] * k3, loose)
            << where << " row " << r << " j=" << j;
      for (int64_t j = d; j < ld_x; ++j) EXPECT_EQ(dx[r * ld_x + j], T(-1)) << where;
      for (int64_t j = d; j < ld_y; ++j) EXPECT_EQ(y[r * ld_y + j], T(-1)) << where;
    }
    for (int64_t j = 0; j < d; ++j) EXPECT_NEAR(dgamma[j], dgamma_expected[j], loose) << where;
  }
}

// Attention's row kernels (simd_attention.cc) on every target, against the definition in float64:
// p = softmax(allowed ? scale x : -0.7 FLT_MAX), the same p again from the row's max and sum,
// and dS = scale p (dP - dot(dP, p)), 0 where masked. Rows end in partial vectors, one of them
// fully masked (uniform); nothing may be written past the row.
// Both float32 and float64 kernels.
TEST(AttentionRows, EveryCompiledTargetMatchesTheDefinition) {
  Rng rng(11);
  int tested = 0;
  for (const int64_t target : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(target);
    hwy::GetChosenTarget().Update(hwy::SupportedTargets());
    const std::string name = hwy::TargetName(target);
    check_attention_rows<float>(name + " float32", rng);
    check_attention_rows<double>(name + " float64", rng);
    ++tested;
  }
  hwy::SetSupportedTargetsForTest(0);
  hwy::GetChosenTarget().Update(hwy::SupportedTargets());
  EXPECT_GE(tested, 2);
}

TEST(PackedWeight, SameBitsOnOneAndTwoThreads) {
  Rng rng(4);
  const Tensor x = rng.normal({16, 256}), w = rng.normal({1536, 256});
  const int threads = num_threads();
  for (WeightPrecision p : {WeightPrecision::f32, WeightPrecision::bf16}) {
    const PackedWeight packed(w, p);
    set_num_threads(1);
    const auto one = raw::matmul_packed(x, packed).to_vector<float>();
    set_num_threads(2);
    const auto two = raw::matmul_packed(x, packed).to_vector<float>();
    EXPECT_EQ(one, two) << precision_name(p);
  }
  set_num_threads(threads);
}

// Two products run together give each the bits it has alone, whichever is wide, on 1 and 2
// threads, and count the same FLOPs; products that do not pair (both wide, both narrow) too.
TEST(PackedWeight, PairGivesTheBitsOfTwoProducts) {
  struct Case {
    int64_t rows0, out0, in0, rows1, out1, in1;
  };
  const std::vector<Case> cases = {{16, 1536, 256, 2, 256, 512}, {2, 96, 64, 16, 1024, 256},
                                   {9, 50, 33, 1, 101, 7},       {3, 17, 130, 20, 48, 3},
                                   {16, 64, 32, 12, 40, 32},     {2, 64, 32, 5, 40, 32}};
  Rng rng(6);
  const int threads = num_threads();
  for (WeightPrecision p : {WeightPrecision::f32, WeightPrecision::bf16})
    for (const Case& c : cases)
      for (int t : {1, 2}) {
        set_num_threads(t);
        const Tensor x0 = rng.normal({c.rows0, c.in0}), w0 = rng.normal({c.out0, c.in0});
        const Tensor x1 = rng.normal({1, c.rows1, c.in1}), w1 = rng.normal({c.out1, c.in1});
        const PackedWeight p0(w0, p), p1(w1, p);
        // Kept alive: the caching allocator would hand their blocks, values and all, to the pair.
        const Tensor alone0 = raw::matmul_packed(x0, p0), alone1 = raw::matmul_packed(x1, p1);
        const int64_t flops0 = raw::matmul_flops();
        const auto [y0, y1] = raw::matmul_packed_pair(x0, p0, x1, p1);
        const std::string where =
            str_cat(precision_name(p), " ", c.rows0, "x", c.out0, "x", c.in0, " with ", c.rows1,
                    "x", c.out1, "x", c.in1, " on ", t, " thread(s)");
        EXPECT_EQ(raw::matmul_flops() - flops0,
                  2 * (c.rows0 * c.out0 * c.in0 + c.rows1 * c.out1 * c.in1))
            << where;
        EXPECT_EQ(y0.shape(), Shape({c.rows0, c.out0})) << where;
        EXPECT_EQ(y1.shape(), Shape({1, c.rows1, c.out1})) << where;
        EXPECT_EQ(y0.to_vector<float>(), alone0.to_vector<float>()) << where;
        EXPECT_EQ(y1.to_vector<float>(), alone1.to_vector<float>()) << where;
      }
  set_num_threads(threads);
  const PackedWeight w(rng.normal({8, 4}), WeightPrecision::f32);
  EXPECT_THAT(error_of([&] {
                raw::matmul_packed_pair(rng.normal({16, 4}), w, rng.normal({2, 5}), w);
              }),
              ::testing::HasSubstr("(2,5) does not end in the packed weight's in-features 4"));
}

// linear_fused_each: the loop's values, scopes and undefined outputs, packed or not.
TEST(FrozenWeights, LinearEachEqualsTheLoop) {
  Rng rng(10);
  const std::vector<Tensor> xs = {rng.normal({1, 2, 32}), Tensor(), rng.normal({1, 16, 24}),
                                  rng.normal({3, 8})};
  const std::vector<Tensor> ws = {rng.normal({48, 32}), rng.normal({8, 8}), rng.normal({40, 24}),
                                  rng.normal({16, 8})};
  const std::vector<Tensor> bs = {rng.normal({48}), Tensor(), Tensor(), rng.normal({16})};
  for (std::optional<WeightPrecision> p : std::initializer_list<std::optional<WeightPrecision>>{
           std::nullopt, WeightPrecision::f32, WeightPrecision::bf16}) {
    FrozenWeights frozen(p.value_or(WeightPrecision::f32));
    std::optional<UseFrozenWeights> use;
    if (p) use.emplace(frozen);
    const std::vector<Tensor> ys = linear_fused_each(xs, ws, bs);
    ASSERT_EQ(ys.size(), 4u);
    EXPECT_FALSE(ys[1].defined());
    for (size_t i : {0, 2, 3})
      EXPECT_EQ(ys[i].to_vector<float>(), linear_fused(xs[i], ws[i], bs[i]).to_vector<float>())
          << (p ? precision_name(*p) : "plain") << " input " << i;
  }
  // A product of 512 rows leaves the packed kernel (in bfloat16 for the rounded weight on the
  // sgemm, where the packed kernel widens) beside one that stays on it.
  const std::vector<Tensor> many = {rng.normal({2, 256, 8}), xs[0]};
  const std::vector<Tensor> many_ws = {rng.normal({12, 8}), ws[0]}, many_bs = {Tensor(), bs[0]};
  const Tensor unrounded = nn::linear(many[0], many_ws[0], Tensor());
  for (WeightPrecision p : {WeightPrecision::f32, WeightPrecision::bf16}) {
    FrozenWeights frozen(p);
    const UseFrozenWeights use(frozen);
    const std::vector<Tensor> ys = linear_fused_each(many, many_ws, many_bs);
    for (size_t i : {0, 1})
      EXPECT_EQ(ys[i].to_vector<float>(),
                linear_fused(many[i], many_ws[i], many_bs[i]).to_vector<float>())
          << precision_name(p) << " input " << i;
    if (p == WeightPrecision::bf16) {
      EXPECT_GT(test::max_abs_diff(ys[0], unrounded), 0.0) << "the weight was not rounded";
    }
  }
  // On a tape, each product is its own node under its own scope, with its gradient.
  Tape tape;
  Tensor x0 = xs[0], w2 = ws[2];
  tape.watch(x0);
  tape.watch(w2);
  const std::vector<Tensor> ys = linear_fused_each(
      {x0, Tensor(), xs[2], xs[3]}, {ws[0], ws[1], w2, ws[3]}, bs, {"m0", "m1", "m2", "m3"});
  ASSERT_EQ(tape.nodes().size(), 2u);
  EXPECT_EQ(tape.nodes()[0].scope, "m0");
  EXPECT_EQ(tape.nodes()[1].scope, "m2");
  // Closed forms of the gradient of sum(y0) + sum(y2): every token row of dx0 is the column sums
  // of ws[0], and every one of dw2's 40 rows is the column sums of xs[2] over its 16 tokens.
  const std::vector<Tensor> g = tape.gradient(sum(ys[0]) + sum(ys[2]), {x0, w2});
  EXPECT_LT(test::max_abs_diff(g[0], raw::broadcast_to(raw::sum(ws[0], {0}), {1, 2, 32})), 1e-5)
      << "d/dx0";
  EXPECT_LT(test::max_abs_diff(g[1], raw::broadcast_to(raw::sum(xs[2], {0, 1}), {40, 24})), 1e-4)
      << "d/dw2";
  EXPECT_THAT(
      error_of([&] { linear_fused_each(xs, ws, {bs[0]}); }),
      ::testing::HasSubstr("linear_fused_each: 4 inputs, 4 weights, 1 biases and 0 scopes"));
  const nn::Linear layer(8, 16, true, rng);
  EXPECT_THAT(error_of([&] {
                nn::linear_each({&layer}, {xs[3], xs[3]});
              }),
              ::testing::HasSubstr("linear_each: 1 layers for 2 inputs"));
  // A modality's input that does not fit its layer is named as linear names it.
  EXPECT_THAT(
      error_of([&] {
        nn::linear_each({&layer, &layer}, {xs[3], xs[0]});
      }),
      ::testing::HasSubstr("linear: input (1,2,32) does not end in the weight's in-features 8"));
}

TEST(PackedWeight, KeepsLeadingDimensionsAndCountsFlops) {
  Rng rng(5);
  const Tensor x = rng.normal({2, 3, 8}), w = rng.normal({5, 8});
  const PackedWeight packed(w, WeightPrecision::f32);
  const int64_t flops0 = raw::matmul_flops();
  const Tensor y = raw::matmul_packed(x, packed);
  EXPECT_EQ(raw::matmul_flops() - flops0, 2 * 6 * 5 * 8);
  EXPECT_EQ(y.shape(), Shape({2, 3, 5}));
  EXPECT_LT(test::max_abs_diff(y, raw::matmul(x, raw::transpose(w, 0, 1))), 1e-5);
}

TEST(PackedWeight, BadInputsNameWhatIsWrong) {
  Rng rng(6);
  EXPECT_NE(error_of([&] {
              PackedWeight(rng.normal({4, 8}, DType::f64), WeightPrecision::f32);
            }).find("expected a float32 weight (out, in), got float64 (4,8)"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              PackedWeight(rng.normal({4}), WeightPrecision::f32);
            }).find("got float32 (4,)"),
            std::string::npos);
  const PackedWeight packed(rng.normal({4, 8}), WeightPrecision::bf16);
  EXPECT_NE(error_of([&] {
              raw::matmul_packed(rng.normal({3, 7}), packed);
            }).find("input float32 (3,7) does not end in the packed weight's in-features 8"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              parse_precision("fp8");
            }).find("unknown weight precision 'fp8' (expected f32 or bf16)"),
            std::string::npos);
}

TEST(Bfloat16, RoundsToNearestTiesToEven) {
  EXPECT_EQ(to_bf16(1.0f), 0x3F80);
  // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
  EXPECT_EQ(to_bf16(1.0f + 0x1p-8f), 0x3F80);
  // 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: even is 1 + 2^-6.
  EXPECT_EQ(to_bf16(1.0f + 3 * 0x1p-8f), 0x3F82);
  EXPECT_EQ(to_bf16(1.0f + 0x1p-8f + 0x1p-20f), 0x3F81);  // above halfway: up
  EXPECT_EQ(to_bf16(-2.0f), 0xC000);
  EXPECT_EQ(from_bf16(to_bf16(std::numeric_limits<float>::infinity())),
            std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(from_bf16(to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  // The largest float rounds past bfloat16's largest finite value, to infinity.
  EXPECT_TRUE(std::isinf(from_bf16(to_bf16(std::numeric_limits<float>::max()))));
  // 8 significant bits: a relative error of at most half an ulp, 2^-8, for normal values.
  Rng rng(7);
  for (float v : rng.normal({1000}).to_vector<float>())
    EXPECT_LE(std::abs(round_bf16(v) - v), std::abs(v) * 0x1p-8f);
}

TEST(FrozenWeights, LinearLayersUseThePackedCopyOnlyInsideTheScope) {
  Rng rng(8);
  const Tensor x = rng.normal({4, 32}), w = rng.normal({24, 32}), b = rng.normal({24});
  const Tensor plain = nn::linear(x, w, b);
  FrozenWeights frozen(WeightPrecision::bf16);
  EXPECT_EQ(frozen.bytes(), 0u);
  Tensor packed;
  {
    const UseFrozenWeights use(frozen);
    EXPECT_EQ(frozen_weights(), &frozen);
    packed = nn::linear(x, w, b);
  }
  EXPECT_EQ(frozen_weights(), nullptr);
  // Packed on first use, as bfloat16, the 24 outputs padded to two panels of 16.
  EXPECT_EQ(frozen.bytes(), 32u * 32u * 2u);
  // The bfloat16 result differs from float32 by the rounding, and no more.
  const double diff = test::max_abs_diff(packed, plain);
  EXPECT_GT(diff, 0.0);
  EXPECT_LT(diff, 32 * 6.0 * 0x1p-8);
  // Outside the scope the layer is the float32 product again.
  EXPECT_EQ(nn::linear(x, w, b).to_vector<float>(), plain.to_vector<float>());
}

// Frozen weights are packed for products of up to 511 rows (bound by reading the weight); from
// 512 rows the product runs on the sgemm: in float32 on the weight as it is, the same values as
// outside the scope, and in bfloat16 on the weight rounded for each product, the packed product's
// values summed in another order; but where the packed kernel multiplies bfloat16 pairs
// (vdpbf16ps; MMDIT_BF16_KERNEL=dot runs this test that way) bfloat16 stays packed.
TEST(FrozenWeights, ManyRowsRunOnTheSgemm) {
  Rng rng(11);
  const Tensor w = rng.normal({24, 32}), b = rng.normal({24});
  const Tensor many = rng.normal({2, 256, 32}), few = rng.normal({511, 32});
  FrozenWeights f32(WeightPrecision::f32), bf16(WeightPrecision::bf16);
  Tensor y_many, y_few, y_many_bf16, y_few_bf16;
  {
    const UseFrozenWeights use(f32);
    y_many = nn::linear(many, w, b);
    EXPECT_EQ(f32.bytes(), 0u) << "512 rows were packed";
    y_few = nn::linear(few, w, b);
    EXPECT_EQ(f32.bytes(), 32u * 32u * 4u) << "511 rows were not packed";
  }
  {
    const UseFrozenWeights use(bf16);
    y_many_bf16 = nn::linear(many, w, b);
    const bool packed = simd::use_bf16_dot_kernel();
    EXPECT_EQ(bf16.bytes(), packed ? 32u * 32u * 2u : 0u) << "512 rows in bfloat16";
    y_few_bf16 = nn::linear(few, w, b);
    EXPECT_EQ(bf16.bytes(), 32u * 32u * 2u) << "511 rows were not packed in bfloat16";
  }
  EXPECT_EQ(y_many.to_vector<float>(), nn::linear(many, w, b).to_vector<float>());
  EXPECT_LT(test::max_abs_diff(y_few, nn::linear(few, w, b)), 1e-5);

  // Without the bias, against float64 sums of the rounded values.
  const bool rounds_inputs = simd::use_bf16_dot_kernel();
  const Tensor rows = raw::reshape(many, {512, 32});
  {
    const UseFrozenWeights use(bf16);
    expect_close(nn::linear(rows, w, Tensor()).to_vector<float>(),
                 reference_product(rows, w, rounds_inputs, true), 32, "512 rows in bfloat16");
    expect_close(nn::linear(few, w, Tensor()).to_vector<float>(),
                 reference_product(few, w, rounds_inputs, true), 32, "511 rows in bfloat16");
  }
  EXPECT_GT(test::max_abs_diff(y_many_bf16, y_many), 0.0) << "the weights were not rounded";
  // A first row of the 512 alone (packed) and within them (on the sgemm): the same values up to
  // the order of the sums.
  const Tensor first = raw::slice(rows, 0, 0, 1);
  Tensor first_packed;
  {
    const UseFrozenWeights use(bf16);
    first_packed = nn::linear(first, w, b);
  }
  EXPECT_LT(
      test::max_abs_diff(first_packed, raw::slice(raw::reshape(y_many_bf16, {512, 24}), 0, 0, 1)),
      1e-5);
}

// A product the tape records multiplies by the weight itself, as its backward does (a packed
// copy may be rounded to bfloat16); one with neither operand on the tape stays packed. A
// sampler's output used as a constant target inside value_and_grad was refused.
TEST(FrozenWeights, ProductsOnTheActiveTapeUseTheWeightItself) {
  Rng rng(12);
  const Tensor w = rng.normal({8, 16}), b = rng.normal({8}), x = rng.normal({3, 16});
  const std::vector<float> plain = nn::linear(x, w, b).to_vector<float>();
  // d sum(y) / dx: every row is the column sums of w.
  const Tensor column_sums = raw::broadcast_to(raw::sum(w, {0}, true), {3, 16});
  for (WeightPrecision p : {WeightPrecision::f32, WeightPrecision::bf16}) {
    FrozenWeights frozen(p);
    const UseFrozenWeights use(frozen);
    {
      Tape tape;
      Tensor watched = x;
      tape.watch(watched);
      const Tensor y = nn::linear(watched, w, b);
      EXPECT_EQ(y.to_vector<float>(), plain) << precision_name(p);
      EXPECT_LT(test::max_abs_diff(tape.gradient(sum(y), {watched})[0], column_sums), 1e-5);
    }
    {
      Tape tape;
      Tensor watched = w;
      tape.watch(watched);
      EXPECT_EQ(nn::linear(x, watched, b).to_vector<float>(), plain) << precision_name(p);
    }
    EXPECT_EQ(frozen.bytes(), 0u) << precision_name(p) << ": packed on the tape";
    Tape tape;
    const Tensor off_tape = nn::linear(x, w, b);
    EXPECT_GT(frozen.bytes(), 0u) << precision_name(p) << ": not packed off the tape";
    EXPECT_TRUE(tape.nodes().empty());
    if (p == WeightPrecision::bf16) {
      EXPECT_GT(test::max_abs_diff(off_tape, from_vector(plain, {3, 8})), 0.0);
    }
  }
}

// The rounding before the sgemm is to_bf16's, NaN and infinity included.
TEST(FrozenWeights, RoundedWeightsAreToBf16s) {
  const float nan = std::numeric_limits<float>::quiet_NaN(),
              inf = std::numeric_limits<float>::infinity();
  const std::vector<float> values = {
      1.0f,   1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, -2.0f + 0x1p-20f, inf, -inf, FLT_MAX,
      1e-30f, 3.14159f};
  const int64_t n = static_cast<int64_t>(values.size());
  // x = (1): y[0][j] = 1 * round(W[j][0]), exactly.
  const Tensor w = from_vector(values, {n, 1});
  const Tensor y = raw::matmul_bf16_rounded(from_vector(std::vector<float>{1.0f}, {1, 1}), w);
  const std::vector<float> got = y.to_vector<float>();
  ASSERT_EQ(got.size(), values.size());
  for (int64_t i = 0; i < n; ++i)
    EXPECT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(round_bf16(values[i])))
        << "value " << values[i];
  const Tensor with_nan = raw::matmul_bf16_rounded(from_vector(std::vector<float>{1.0f}, {1, 1}),
                                                   from_vector(std::vector<float>{nan}, {1, 1}));
  EXPECT_TRUE(std::isnan(with_nan.to_vector<float>()[0]));
  EXPECT_NE(error_of([&] {
              raw::matmul_bf16_rounded(from_vector(std::vector<float>{1, 2}, {1, 2}), w);
            }).find("matmul_bf16_rounded: input float32 (1,2) and weight float32 (9,1)"),
            std::string::npos);
}

// Packed copies were found by the weight's data address alone. A new weight given a freed
// weight's block by the caching allocator was multiplied as the freed one (4s for 8s), the
// transpose view of a square weight as the weight itself, and the first rows of a weight were
// refused as a changed model. Each product here is x = ones times W^T: the row sums of W.
TEST(FrozenWeights, WeightsAtTheSameAddressAreEachMultipliedAsThemselves) {
  for (WeightPrecision p : {WeightPrecision::f32, WeightPrecision::bf16}) {
    SCOPED_TRACE(precision_name(p));
    FrozenWeights frozen(p);
    const UseFrozenWeights use(frozen);
    {
      const Tensor freed = full({3, 4}, 1.0);
      EXPECT_EQ(linear_fused(ones({1, 4}), freed).to_vector<float>(), std::vector<float>(3, 4));
    }
    const Tensor twos = full({3, 4}, 2.0);
    EXPECT_EQ(linear_fused(ones({1, 4}), twos).to_vector<float>(), std::vector<float>(3, 8));
    const Tensor w = from_vector({1.f, 2.f, 3.f, 4.f}, {2, 2});  // [[1, 2], [3, 4]]
    EXPECT_EQ(linear_fused(ones({1, 2}), w).to_vector<float>(), (std::vector<float>{3, 7}));
    EXPECT_EQ(linear_fused(ones({1, 2}), raw::transpose(w, 0, 1)).to_vector<float>(),
              (std::vector<float>{4, 6}));
    EXPECT_EQ(linear_fused(ones({1, 2}), raw::narrow(w, 0, 0, 1)).to_vector<float>(),
              (std::vector<float>{3}));
    // w's packed copy is used again; five weights packed once each, one panel of 16 outputs
    // over their 4 + 4 + 2 + 2 + 2 inputs.
    EXPECT_EQ(linear_fused(ones({1, 2}), w).to_vector<float>(), (std::vector<float>{3, 7}));
    EXPECT_EQ(frozen.bytes(), 16u * 14u * (p == WeightPrecision::f32 ? 4u : 2u));
  }
}

TEST(FrozenWeights, SamplerInFloat32MatchesTheUnpackedEulerLoop) {
  PolicyConfig c;
  c.n_obs_steps = 2;
  c.state_dim = 3;
  c.horizon = 5;
  c.act_dim = 2;
  c.hidden_size = 32;
  c.depth = 2;
  c.dim_cond = 48;
  c.timestep_embed_dim = 16;
  c.dim_head = 8;
  c.heads = 2;
  c.validate();
  Rng rng(9);
  BCPolicy policy(c, rng);
  test::randomize(policy, rng, 0.2);
  const Tensor state = rng.normal({3, 2, 3}), a0 = rng.normal({3, 5, 2});
  const int64_t steps = 4;
  const Tensor obs = policy.encode_observations(state);
  Tensor a = a0;
  for (int64_t k = 0; k < steps; ++k) {
    const Tensor t = full({3}, static_cast<double>(k) / steps);
    a = a + policy.velocity(obs, a, t) * (1.0 / steps);
  }
  const Tensor f32 = EulerSampler(policy, steps, 1.0, WeightPrecision::f32)(state, a0);
  const Tensor bf16 = EulerSampler(policy, steps, 1.0, WeightPrecision::bf16)(state, a0);
  EXPECT_LT(test::max_abs_diff(f32, a), 1e-5);
  const double bf16_diff = test::max_abs_diff(bf16, a);
  EXPECT_GT(bf16_diff, 0.0);
  EXPECT_LT(bf16_diff, 0.05);
}

}  // namespace
}  // namespace mmdit
