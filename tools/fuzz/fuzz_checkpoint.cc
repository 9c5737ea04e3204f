// libFuzzer target: a whole checkpoint as `mmdit sample`/`eval` and LoadedPolicy read it
// (safetensors, then the config and normaliser in its metadata, then the parameters into a
// BCPolicy). Any input may be rejected, but only with mmdit::Error. See README "Fuzzing".
#include <cstddef>
#include <cstdint>
#include <string>

#include "tensor/error.h"
#include "tools/fuzz/input_file.h"
#include "train/trainer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = write_input_file(data, size, ".safetensors");
  if (path.empty()) return 0;
  try {
    mmdit::load_policy(path, /*use_ema=*/true, mmdit::WeightPrecision::f32);
  } catch (const mmdit::Error&) {
  }
  return 0;
}
