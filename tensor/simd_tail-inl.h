// Loads of a vector's first lanes, for the partial last vector of a row, shared by the Highway
// kernel files (included once per target by each, hence the toggle guard).
#if defined(MMDIT_TENSOR_SIMD_TAIL_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef MMDIT_TENSOR_SIMD_TAIL_INL_H_
#undef MMDIT_TENSOR_SIMD_TAIL_INL_H_
#else
#define MMDIT_TENSOR_SIMD_TAIL_INL_H_
#endif

#include <hwy/highway.h>

#include <algorithm>
#include <cstdint>

HWY_BEFORE_NAMESPACE();
namespace mmdit::simd {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// The first `count` < Lanes(d) values at p, the other lanes set to `fill`. AVX2 and AVX-512 mask
// the access itself; Highway 1.0.3's SSE4 MaskedLoad is a full aligned load, which can read past
// the end of the array (a crash the all-targets test found), so there the lanes go through a
// buffer. (BlendedStore, the matching store, is safe on every target.)
template <class D>
HWY_INLINE hn::Vec<D> LoadFirst(D d, const hn::TFromD<D>* p, int64_t count, hn::TFromD<D> fill) {
#if HWY_TARGET <= HWY_AVX2
  const auto mask = hn::FirstN(d, static_cast<size_t>(count));
  return hn::IfThenElse(mask, hn::MaskedLoad(mask, d, p), hn::Set(d, fill));
#else
  HWY_ALIGN hn::TFromD<D> buf[hn::MaxLanes(D())];
  std::fill(buf, buf + hn::Lanes(d), fill);
  std::copy(p, p + count, buf);
  return hn::Load(d, buf);
#endif
}

}  // namespace HWY_NAMESPACE
}  // namespace mmdit::simd
HWY_AFTER_NAMESPACE();

#endif  // MMDIT_TENSOR_SIMD_TAIL_INL_H_
