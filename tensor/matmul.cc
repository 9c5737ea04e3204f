// Matrix products through oneDNN (float32) and OpenBLAS. A transposed view is handed to gemm as a
// transpose flag with its leading dimension; only layouts gemm cannot express are copied.
#include <cblas.h>
#include <dnnl.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string_view>
#include <type_traits>

#include "tensor/ops.h"
#include "tensor/parallel.h"
#include "tensor/simd.h"

namespace mmdit::raw {
namespace {

struct GemmOperand {
  bool transposed;
  int64_t ld;
};

// How gemm can read a rows x cols matrix with these strides, if it can.
std::optional<GemmOperand> gemm_layout(int64_t rows, int64_t cols, int64_t row_stride,
                                       int64_t col_stride) {
  if ((col_stride == 1 || cols == 1) && (row_stride >= std::max<int64_t>(cols, 1) || rows == 1))
    return GemmOperand{false, rows == 1 ? std::max<int64_t>(cols, 1) : row_stride};
  if ((row_stride == 1 || rows == 1) && (col_stride >= std::max<int64_t>(rows, 1) || cols == 1))
    return GemmOperand{true, cols == 1 ? std::max<int64_t>(rows, 1) : col_stride};
  return std::nullopt;
}

std::optional<GemmOperand> gemm_layout(const Tensor& t) {
  const int64_t n = t.dim();
  return gemm_layout(t.shape()[n - 2], t.shape()[n - 1], t.strides()[n - 2], t.strides()[n - 1]);
}

std::atomic<SgemmLibrary> chosen_sgemm{SgemmLibrary::openblas};
std::atomic<bool> library_set{false};  // by set_sgemm_library, which MMDIT_SGEMM does not undo

// oneDNN generates its kernels for the shape at hand, but a call costs a few microseconds more
// than OpenBLAS's; below this many multiply-adds (64 x 64 x 128) OpenBLAS was faster.
constexpr int64_t kOnednnMinWork = int64_t{1} << 19;

// Returns false when oneDNN refused the product (it names no reason but a status; OpenBLAS is
// not tried instead, which would mix two libraries' rounding in one product).
bool gemm_serial(SgemmLibrary library, bool ta, bool tb, int64_t m, int64_t n, int64_t k,
                 const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                 bool accumulate) {
  if (library == SgemmLibrary::onednn)
    return dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, 1.0f, a, lda, b, ldb,
                      accumulate ? 1.0f : 0.0f, c, ldc) == dnnl_success;
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n,
              k, 1.0f, a, lda, b, ldb, accumulate ? 1.0f : 0.0f, c, ldc);
  return true;
}
bool gemm_serial(SgemmLibrary, bool ta, bool tb, int64_t m, int64_t n, int64_t k, const double* a,
                 int64_t lda, const double* b, int64_t ldb, double* c, int64_t ldc,
                 bool accumulate) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n,
              k, 1.0, a, lda, b, ldb, accumulate ? 1.0 : 0.0, c, ldc);
  return true;
}

// Up to this many rows, x W^T runs on our kernel (simd::gemm_nt) instead of OpenBLAS.
// (Measured on policy-act: 16 and 64 rows gave the same time; OpenBLAS wins from about 64.)
constexpr int64_t kSkinnyRows = 16;

bool gemm_skinny(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float* c, int64_t ldc, bool one_thread) {
  if (ta || !tb || m > kSkinnyRows) return false;
  const int64_t block = 64;
  const auto columns = [&](int64_t i) {
    simd::gemm_nt(a, lda, b, ldb, c, ldc, m, i * block, std::min(n, (i + 1) * block), k);
  };
  const int64_t blocks = (n + block - 1) / block;
  if (one_thread)
    for (int64_t i = 0; i < blocks; ++i) columns(i);
  else
    parallel_for(blocks, 2 * m * block * k, columns);
  return true;
}
bool gemm_skinny(bool, bool, int64_t, int64_t, int64_t, const double*, int64_t, const double*,
                 int64_t, double*, int64_t, bool) {
  return false;
}

// C = op(A) op(B), split into one block of rows or columns per thread, each block a
// single-threaded gemm (OpenBLAS runs single-threaded inside a parallel region). This was faster
// than OpenBLAS's own threading on every bench workload (policy-act at batch 1: 94 against
// 152 ms), and inside one of our parallel regions it stays on the calling thread.
template <class T>
void threaded_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
                   const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate = false,
                   bool one_thread = false) {
  if (!accumulate && gemm_skinny(ta, tb, m, n, k, a, lda, b, ldb, c, ldc, one_thread)) return;
  // Saturated: at the sizes the check below refuses, m n k would overflow (undefined behaviour).
  int64_t work = 0;
  if (__builtin_mul_overflow(m, n, &work) || __builtin_mul_overflow(work, k, &work))
    work = std::numeric_limits<int64_t>::max();
  // Chosen for the whole product: one product's blocks all round as one library does.
  SgemmLibrary library = SgemmLibrary::openblas;
  if constexpr (std::is_same_v<T, float>)
    if (work >= kOnednnMinWork) library = sgemm_library();
  // OpenBLAS takes sizes as blasint (int in Debian's build): past its range they would wrap and
  // address other memory. Checked here, before the parallel region, which an exception may not
  // leave.
  if (library == SgemmLibrary::openblas)
    for (const int64_t size : {m, n, k, lda, ldb, ldc})
      MMDIT_CHECK(size <= std::numeric_limits<blasint>::max(), "matmul: the product (", m, " x ", k,
                  " by ", k, " x ", n, ", leading dimensions ", lda, ", ", ldb, ", ", ldc,
                  ") has a size past OpenBLAS's integers (at most ",
                  std::numeric_limits<blasint>::max(), ")");
  // A team (run_as_team) splits the product in its own region; any other region, and an item
  // of a team's loop, runs it here.
  detail::Team* team = detail::led_team();
  const bool in_region = team == nullptr && omp_get_level() > 0;
  // num_threads() first: read on a thread's first product, it is the OpenMP setting, which the
  // next line may lower.
  const int process_threads = num_threads();
  const int threads = in_region || one_thread ? 1 : process_threads;
  // A block that runs outside our regions (the product on one thread, or a small one) still
  // goes to OpenBLAS or oneDNN, which size a team of their own from this thread's OpenMP
  // setting: on a thread the process's count never reached (a controller's std::thread) it is
  // OMP_NUM_THREADS, and OpenBLAS would take it for its own count too.
  if (!in_region && omp_get_max_threads() != threads) omp_set_num_threads(threads);
  auto refused = [&] {
    fail("matmul: oneDNN's sgemm refused the product (", ta ? "A^T" : "A", " ", m, " x ", k, ", ",
         tb ? "B^T" : "B", " ", k, " x ", n, ", leading dimensions ", lda, ", ", ldb, ", ", ldc,
         "); MMDIT_SGEMM=openblas runs it on OpenBLAS");
  };
  if (threads == 1 || work < 64 * 64 * 64) {
    if (!gemm_serial(library, ta, tb, m, n, k, a, lda, b, ldb, c, ldc, accumulate)) refused();
    return;
  }
  // Split the longer side, in multiples of 16 so that each block keeps whole SIMD tiles. A tail
  // of fewer than 16 joins the block before it: oneDNN computes so few rows (one, as a
  // matrix-vector product) otherwise than as the last rows of a larger block, and a product's
  // values would then change with the number of threads.
  const bool split_rows = m >= n;
  const int64_t extent = split_rows ? m : n;
  const int64_t chunk = std::max<int64_t>(16, (extent / threads + 15) / 16 * 16);
  int64_t blocks = (extent + chunk - 1) / chunk;
  if (blocks > 1 && extent - (blocks - 1) * chunk < 16) --blocks;
  std::atomic<bool> all_done{true};
  const auto product_block = [&](int64_t blk) {
    const int64_t start = blk * chunk, len = blk == blocks - 1 ? extent - start : chunk;
    const bool done =
        split_rows ? gemm_serial(library, ta, tb, len, n, k, a + (ta ? start : start * lda), lda, b,
                                 ldb, c + start * ldc, ldc, accumulate)
                   : gemm_serial(library, ta, tb, m, len, k, a, lda, b + (tb ? start * ldb : start),
                                 ldb, c + start, ldc, accumulate);
    if (!done) all_done = false;
  };
  parallel_for(blocks, work / blocks, product_block);
  if (!all_done) refused();
}

// When b is one matrix shared by the whole batch and a is contiguous, the batched product is a
// single large gemm: (batch*M, K) @ (K, N).
bool folds_into_one_gemm(const Tensor& a, const Tensor& b) {
  for (int64_t i = 0; i < b.dim() - 2; ++i)
    if (b.strides()[i] != 0 && b.shape()[i] != 1) return false;
  return a.is_contiguous();
}

template <class T>
void matmul_typed(Tensor a, Tensor b, const Tensor& out, const Shape& batch) {
  const int64_t M = a.shape()[a.dim() - 2], K = a.shape()[a.dim() - 1];
  const int64_t N = b.shape()[b.dim() - 1];
  Shape a_shape = batch, b_shape = batch;
  a_shape.insert(a_shape.end(), {M, K});
  b_shape.insert(b_shape.end(), {K, N});
  T* c = out.data<T>();
  if (K == 0) {  // before the layouts: gemm_layout has none for an empty (M, 0) operand
    std::fill_n(c, out.numel(), T(0));
    return;
  }
  a = broadcast_to(a, a_shape);
  b = broadcast_to(b, b_shape);
  if (!gemm_layout(a)) a = broadcast_to(contiguous(a), a_shape);
  if (!gemm_layout(b)) b = broadcast_to(contiguous(b), b_shape);
  const GemmOperand la = *gemm_layout(a), lb = *gemm_layout(b);
  const int64_t batches = shape_numel(batch);
  if (batches > 1 && folds_into_one_gemm(a, b)) {
    threaded_gemm(false, lb.transposed, batches * M, N, K, a.data<T>(), K, b.data<T>(), lb.ld, c,
                  N);
    return;
  }
  const int64_t nb = static_cast<int64_t>(batch.size());
  auto offset = [&](const Tensor& t, int64_t index) {
    int64_t off = 0;
    for (int64_t d = nb - 1; d >= 0; --d) {
      off += (index % batch[d]) * t.strides()[d];
      index /= batch[d];
    }
    return off;
  };
  const T* pa = a.data<T>();
  const T* pb = b.data<T>();
  auto one = [&](int64_t i) {
    threaded_gemm(la.transposed, lb.transposed, M, N, K, pa + offset(a, i), la.ld,
                  pb + offset(b, i), lb.ld, c + i * M * N, N);
  };
  // Many small products (attention heads) parallelise better over the batch, each gemm on one
  // thread, than inside each gemm; big ones are left to OpenBLAS's threads.
  if (M * N * K < 128 * 128 * 128)
    parallel_for(batches, 2 * M * N * K, one);
  else
    for (int64_t i = 0; i < batches; ++i) one(i);
}

}  // namespace

Tensor matmul(const Tensor& a, const Tensor& b) {
  MMDIT_CHECK(a.dim() >= 2 && b.dim() >= 2, "matmul: shapes ", shape_str(a.shape()), " and ",
              shape_str(b.shape()), " are incompatible (both need at least 2 dimensions)");
  MMDIT_CHECK(is_floating(a.dtype()) && a.dtype() == b.dtype(), "matmul: dtypes ",
              dtype_name(a.dtype()), " and ", dtype_name(b.dtype()),
              " are not the same float type");
  const int64_t M = a.shape()[a.dim() - 2], K = a.shape()[a.dim() - 1];
  const int64_t K2 = b.shape()[b.dim() - 2], N = b.shape()[b.dim() - 1];
  MMDIT_CHECK(K == K2, "matmul: shapes ", shape_str(a.shape()), " and ", shape_str(b.shape()),
              " are incompatible");
  Shape batch;
  try {
    batch = broadcast_shapes(Shape(a.shape().begin(), a.shape().end() - 2),
                             Shape(b.shape().begin(), b.shape().end() - 2), "matmul");
  } catch (const Error&) {
    fail("matmul: shapes ", shape_str(a.shape()), " and ", shape_str(b.shape()),
         " are incompatible (their batch dimensions do not broadcast)");
  }
  Shape out_shape = batch;
  out_shape.insert(out_shape.end(), {M, N});
  Tensor out = empty(out_shape, a.dtype());
  if (out.numel() == 0) return out;
  add_matmul_flops(2 * out.numel() * K);
  if (a.dtype() == DType::f32)
    matmul_typed<float>(a, b, out, batch);
  else
    matmul_typed<double>(a, b, out, batch);
  return out;
}

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
          const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  add_matmul_flops(2 * m * n * k);
  threaded_gemm<float>(ta, tb, m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const double* a, int64_t lda,
          const double* b, int64_t ldb, double* c, int64_t ldc, bool accumulate) {
  add_matmul_flops(2 * m * n * k);
  threaded_gemm<double>(ta, tb, m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

void gemm_on_this_thread(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a,
                         int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc) {
  add_matmul_flops(2 * m * n * k);
  threaded_gemm<float>(ta, tb, m, n, k, a, lda, b, ldb, c, ldc, false, /*one_thread=*/true);
}
void gemm_on_this_thread(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const double* a,
                         int64_t lda, const double* b, int64_t ldb, double* c, int64_t ldc) {
  add_matmul_flops(2 * m * n * k);
  threaded_gemm<double>(ta, tb, m, n, k, a, lda, b, ldb, c, ldc, false, /*one_thread=*/true);
}

SgemmLibrary sgemm_library() {
  static const bool environment_read = [] {
    if (library_set) return true;  // set_sgemm_library's choice stands
    const char* name = std::getenv("MMDIT_SGEMM");
    if (!name || !*name) {
      chosen_sgemm.store(default_sgemm_library());
      return true;
    }
    try {
      chosen_sgemm.store(parse_sgemm_library(name));
    } catch (const Error& e) {
      fail("MMDIT_SGEMM: ", e.what());
    }
    return true;
  }();
  (void)environment_read;
  return chosen_sgemm.load(std::memory_order_relaxed);
}

SgemmLibrary default_sgemm_library() {
  const unsigned isa = dnnl_get_effective_cpu_isa();
  return (isa & dnnl_cpu_isa_avx512_core) == dnnl_cpu_isa_avx512_core ? SgemmLibrary::onednn
                                                                      : SgemmLibrary::openblas;
}

void set_sgemm_library(SgemmLibrary library) {
  library_set = true;
  chosen_sgemm.store(library);
}

const char* sgemm_library_name(SgemmLibrary library) {
  return library == SgemmLibrary::onednn ? "onednn" : "openblas";
}

SgemmLibrary parse_sgemm_library(std::string_view name) {
  if (name == "onednn") return SgemmLibrary::onednn;
  if (name == "openblas") return SgemmLibrary::openblas;
  fail("unknown sgemm library '", name, "': choose onednn or openblas");
}

int64_t matmul_flops() {
  return detail::thread_matmul_flops().load(std::memory_order_relaxed);
}
void add_matmul_flops(int64_t flops) {
  detail::thread_matmul_flops().fetch_add(flops, std::memory_order_relaxed);
}

}  // namespace mmdit::raw
