// Decoding and encoding the raw bytes of the file formats (safetensors, .npy): scalars of either
// byte order from unaligned memory, and the 16-bit float formats.
#pragma once

#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

namespace mmdit {

// A T stored at p (any alignment) in little- or big-endian order.
template <class T>
T load_scalar(const unsigned char* p, bool big_endian = false) {
  static_assert(sizeof(T) == 1 || sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8);
  using U = std::conditional_t<
      sizeof(T) == 1, uint8_t,
      std::conditional_t<sizeof(T) == 2, uint16_t,
                         std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>>;
  U u = 0;
  for (size_t i = 0; i < sizeof(T); ++i) {
    const size_t shift = big_endian ? 8 * (sizeof(T) - 1 - i) : 8 * i;
    u = static_cast<U>(u | (static_cast<U>(p[i]) << shift));
  }
  return std::bit_cast<T>(u);
}

// Appends n values as little-endian bytes.
template <class T>
void append_le(std::string& out, const T* src, size_t n) {
  if constexpr (std::endian::native == std::endian::little) {
    out.append(reinterpret_cast<const char*>(src), n * sizeof(T));
  } else {
    for (size_t i = 0; i < n; ++i) {
      auto bytes = std::bit_cast<std::array<unsigned char, sizeof(T)>>(src[i]);
      for (size_t b = sizeof(T); b-- > 0;) out.push_back(static_cast<char>(bytes[b]));
    }
  }
}

// IEEE binary16 -> binary32, exact for every input (the target has more range and precision).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h >> 15) << 31;
  const uint32_t exponent = (h >> 10) & 0x1F;
  const uint32_t mantissa = h & 0x3FF;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 0x1F)  // infinity, or NaN with its payload kept
    return std::bit_cast<float>(sign | 0x7F800000u | (mantissa << 13));
  return std::bit_cast<float>(sign | ((exponent + (127 - 15)) << 23) | (mantissa << 13));
}

// bfloat16 is the upper half of a binary32.
inline float bfloat16_to_float(uint16_t b) {
  return std::bit_cast<float>(static_cast<uint32_t>(b) << 16);
}

}  // namespace mmdit
