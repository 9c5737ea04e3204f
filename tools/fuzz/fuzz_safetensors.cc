// libFuzzer target: safetensors bytes (checkpoints, parity cases) are untrusted input. Any input
// may be rejected, but only with mmdit::Error: another exception, a crash or a sanitizer report
// is a bug. See README "Fuzzing".
#include <cstddef>
#include <cstdint>

#include "tensor/error.h"
#include "tensor/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const mmdit::SafetensorsFile file = mmdit::parse_safetensors(data, size, "fuzz");
    // What was accepted round-trips through our own writer.
    const std::string bytes = mmdit::serialize_safetensors(file.tensors, file.metadata);
    mmdit::parse_safetensors(bytes.data(), bytes.size(), "fuzz (written back)");
  } catch (const mmdit::Error&) {
  }
  return 0;
}
