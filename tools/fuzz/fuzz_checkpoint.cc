// libFuzzer target: a whole checkpoint as `mmdit sample`/`eval` and LoadedPolicy read it
// (safetensors, then the config and normaliser in its metadata, then the parameters into a
// BCPolicy). Any input may be rejected, but only with mmdit::Error. See README "Fuzzing".
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

#include "tensor/error.h"
#include "train/trainer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = "/tmp/mmdit_fuzz_" + std::to_string(::getpid()) + ".safetensors";
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return 0;
  std::fwrite(data, 1, size, f);
  std::fclose(f);
  try {
    mmdit::load_policy(path, /*use_ema=*/true, mmdit::WeightPrecision::f32);
  } catch (const mmdit::Error&) {
  }
  return 0;
}
