#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace mmdit {

// Compute dtypes. f32 is the default; f64 serves gradient checks and parity; boolean holds
// masks (one byte per element).
enum class DType : uint8_t { f32, f64, boolean };

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32:
      return 4;
    case DType::f64:
      return 8;
    case DType::boolean:
      return 1;
  }
  return 0;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32:
      return "float32";
    case DType::f64:
      return "float64";
    case DType::boolean:
      return "bool";
  }
  return "?";
}

inline bool is_floating(DType t) {
  return t == DType::f32 || t == DType::f64;
}

template <class T>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() {
  return DType::f32;
}
template <>
constexpr DType dtype_of<double>() {
  return DType::f64;
}
template <>
constexpr DType dtype_of<bool>() {
  return DType::boolean;
}

// A kernel written once as a template runs for a runtime dtype through these: fn is called with a
// value of the element type (float{}, double{} or bool{}) and reads the type off it.
template <class Fn>
decltype(auto) visit_dtype(DType t, Fn&& fn) {
  switch (t) {
    case DType::f32:
      return fn(float{});
    case DType::f64:
      return fn(double{});
    case DType::boolean:
      break;
  }
  return fn(bool{});
}
// The same for the float types; the caller has checked that t is one.
template <class Fn>
decltype(auto) visit_float_dtype(DType t, Fn&& fn) {
  if (t == DType::f32) return fn(float{});
  return fn(double{});
}

}  // namespace mmdit
