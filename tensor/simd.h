// The SIMD kernels: plain loops over contiguous memory, written once with Highway and compiled
// for every x86 target; the best one for the running CPU is picked at run time
// (HWY_DYNAMIC_DISPATCH). Everything above this file deals with shapes and strides and calls
// these on contiguous rows.
#pragma once

#include <cstdint>

#include "tensor/ops.h"

// For plain loops outside Highway: GCC compiles the function for AVX-512, AVX2 and baseline
// x86-64 and picks one when the program loads, so auto-vectorised loops use the wide registers.
// Not under AddressSanitizer or ThreadSanitizer: the pick runs instrumented code before their
// runtimes start, and the program crashes while loading.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && \
    !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
#define MMDIT_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MMDIT_SIMD_CLONES
#endif

namespace mmdit::simd {

// out[i] = a[i * a_step] op b[i * b_step]; steps are 0 (a broadcast scalar) or 1.
void binary(raw::BinaryOp op, const float* a, int64_t a_step, const float* b, int64_t b_step,
            float* out, int64_t n);
void binary(raw::BinaryOp op, const double* a, int64_t a_step, const double* b, int64_t b_step,
            double* out, int64_t n);
void unary(raw::UnaryOp op, const float* x, float* out, int64_t n);
void unary(raw::UnaryOp op, const double* x, double* out, int64_t n);

float sum(const float* x, int64_t n);
double sum(const double* x, int64_t n);
float dot(const float* a, const float* b, int64_t n);
double dot(const double* a, const double* b, int64_t n);
float max(const float* x, int64_t n);
double max(const double* x, int64_t n);
// sum((x - mean)^2)
float sum_squared_deviation(const float* x, float mean, int64_t n);
double sum_squared_deviation(const double* x, double mean, int64_t n);

void softmax(const float* x, float* out, int64_t n);
void softmax(const double* x, double* out, int64_t n);
void log_softmax(const float* x, float* out, int64_t n);
void log_softmax(const double* x, double* out, int64_t n);

// Attention's rows (simd_attention.cc). A row of logits becomes probabilities in place:
// x[j] = scale x[j] where allowed[j] != 0 (allowed null: everywhere), else -0.7 FLT_MAX as in the
// reference; then softmax. The row's max and sum of exponentials come back through max_out and
// sum_out, and attention_softmax_again recomputes the same probabilities from them.
void attention_softmax(float* x, int64_t n, const float* allowed, float scale, float* max_out,
                       float* sum_out);
void attention_softmax(double* x, int64_t n, const double* allowed, double scale, double* max_out,
                       double* sum_out);
void attention_softmax_again(float* x, int64_t n, const float* allowed, float scale, float row_max,
                             float row_sum);
void attention_softmax_again(double* x, int64_t n, const double* allowed, double scale,
                             double row_max, double row_sum);
// dP into dS in place, given the probabilities p: ds[j] = scale p[j] (ds[j] - dot(ds, p)) where
// allowed[j] != 0, else 0.
void attention_softmax_backward(float* ds, const float* p, int64_t n, const float* allowed,
                                float scale);
void attention_softmax_backward(double* ds, const double* p, int64_t n, const double* allowed,
                                double scale);

// QK-RMSNorm and the rotary embedding of `rows` rows of d values (d even), row r read at
// x + r ld_x and written at y + r ld_y: y = rope(x inv gamma), inv[r] = 1 / sqrt(mean(x^2) + eps),
// with row r's cos and sin at cos + r d, sin + r d (simd_attention.cc).
void qk_norm_rope_rows(const float* x, int64_t ld_x, int64_t rows, int64_t d, const float* gamma,
                       const float* cos, const float* sin, double eps, float* y, int64_t ld_y,
                       float* inv);
void qk_norm_rope_rows(const double* x, int64_t ld_x, int64_t rows, int64_t d, const double* gamma,
                       const double* cos, const double* sin, double eps, double* y, int64_t ld_y,
                       double* inv);
// Its backward: from dy (rows ld_dy apart), the rows x and their inv, dx (rows ld_x apart, as x)
// and dgamma += the gamma gradient of every row; dz is scratch of d values.
void qk_norm_rope_rows_backward(const float* dy, int64_t ld_dy, const float* x, int64_t ld_x,
                                int64_t rows, int64_t d, const float* inv, const float* gamma,
                                const float* cos, const float* sin, float* dz, float* dgamma,
                                float* dx);
void qk_norm_rope_rows_backward(const double* dy, int64_t ld_dy, const double* x, int64_t ld_x,
                                int64_t rows, int64_t d, const double* inv, const double* gamma,
                                const double* cos, const double* sin, double* dz, double* dgamma,
                                double* dx);

// y[i * ldy + j] = sum_k x[i * ldx + k] * w[j * ldw + k] for i < m, j in [n_begin, n_end): a
// product x W^T with few rows, W read once without packing (simd_gemm.cc).
void gemm_nt(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy,
             int64_t m, int64_t n_begin, int64_t n_end, int64_t k);

// c (m x n) = op(a) b, op(a) = a (m x k, rows of lda) or, with ta, a^T (a is k x m); b is k x n
// with rows of ldb. For products too small for a gemm call's fixed cost (simd_gemm.cc).
void gemm_small_nn(bool ta, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                   int64_t ldc, int64_t m, int64_t n, int64_t k);

// Rows of one register tile of the packed kernels (at most; 4 on CPUs without AVX-512).
constexpr int64_t kPackedTileRows = 8;
// Memory that a packed product fetches into the L2 cache while its last row tile computes from
// cache, when the memory would otherwise be idle (PackedWeight::multiply). Empty by default.
struct PrefetchLines {
  const char* next = nullptr;
  int64_t per_step = 0, left = 0;  // cache lines per k step, and in all
  void step() {
    if (left <= 0) return;
    for (int64_t i = 0; i < per_step; ++i, next += 64) __builtin_prefetch(next, 0, 2);
    left -= per_step;
  }
};
struct PrefetchSpan {
  const char* begin = nullptr;
  int64_t lines = 0;
  // Part i of n, spread over `steps` k steps.
  PrefetchLines share(int64_t i, int64_t n, int64_t steps) const {
    if (lines <= 0) return {};
    const int64_t from = lines * i / n, to = lines * (i + 1) / n;
    return {begin + 64 * from, (to - from + steps - 1) / steps, to - from};
  }
};

// y = x W^T for W packed in panels of 16 output columns (tensor/packed_weight.h), writing output
// columns [16 * panel_begin, min(16 * panel_end, n)) of all m rows (packed_gemm.cc).
void gemm_packed_f32(const float* x, int64_t ldx, int64_t m, const float* panels, int64_t k,
                     float* y, int64_t ldy, int64_t n, int64_t panel_begin, int64_t panel_end,
                     PrefetchSpan ahead = {});
// bfloat16 panels widened to float32 in registers; x stays float32.
void gemm_packed_bf16(const float* x, int64_t ldx, int64_t m, const uint16_t* panels, int64_t k,
                      float* y, int64_t ldy, int64_t n, int64_t panel_begin, int64_t panel_end,
                      PrefetchSpan ahead = {});
// Whether the CPU has AVX-512 BF16 (vdpbf16ps), which the two functions below need.
bool has_avx512_bf16();
// Whether packed bfloat16 products run on vdpbf16ps rather than widening to float32. AMD's Zen 4
// and 5 execute vdpbf16ps at the rate of an FMA, twice the multiply-adds; Intel's Sapphire and
// Emerald Rapids at half that rate, where widening is faster (one Euler step's products on 2
// threads, family 6 model 207: 1.44 ms widened, 2.35 ms with vdpbf16ps) and keeps the inputs
// float32. MMDIT_BF16_KERNEL=dot or =widen overrides the choice.
bool use_bf16_dot_kernel();
// x (m, k) float32 rounded to bfloat16 rows of ld_out >= k elements, zero-padded.
void to_bf16_rows(const float* x, int64_t ldx, int64_t m, int64_t k, uint16_t* out, int64_t ld_out);
// The bfloat16 panels times bfloat16 inputs xb (rows of ldxb >= k rounded up to even),
// products summed in float32 by vdpbf16ps.
void gemm_packed_bf16_dot(const uint16_t* xb, int64_t ldxb, int64_t m, const uint16_t* panels,
                          int64_t k, float* y, int64_t ldy, int64_t n, int64_t panel_begin,
                          int64_t panel_end, PrefetchSpan ahead = {});

// out[i] += x[i] * scale
void axpy(float scale, const float* x, float* out, int64_t n);
void axpy(double scale, const double* x, double* out, int64_t n);

}  // namespace mmdit::simd
