// libFuzzer target: .npy bytes (datasets, observations for `mmdit sample`) are untrusted input.
// Any input may be rejected, but only with mmdit::Error. See README "Fuzzing".
#include <cstddef>
#include <cstdint>

#include "tensor/error.h"
#include "train/npy.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const mmdit::Tensor t = mmdit::parse_npy(data, size, "fuzz");
    const std::string bytes = mmdit::serialize_npy(t);
    mmdit::parse_npy(bytes.data(), bytes.size(), "fuzz (written back)");
  } catch (const mmdit::Error&) {
  }
  return 0;
}
