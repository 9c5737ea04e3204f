// libFuzzer target: a model saved by Equinox, as `mmdit import-eqx` reads it (the policy's sizes
// from its records, then every record into a BCPolicy of those sizes). Any input may be
// rejected, but only with mmdit::Error. See README "Fuzzing".
#include <cstddef>
#include <cstdint>
#include <string>

#include "tensor/error.h"
#include "tools/fuzz/input_file.h"
#include "train/equinox.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = write_input_file(data, size, ".eqx");
  if (path.empty()) return 0;
  try {
    mmdit::Rng rng(0);
    mmdit::BCPolicy policy(mmdit::equinox_policy_config(path), rng);
    mmdit::load_equinox(policy, path);
  } catch (const mmdit::Error&) {
  }
  return 0;
}
