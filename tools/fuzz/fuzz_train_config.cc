// libFuzzer target: the JSON a checkpoint's metadata and `--config` files hold (TrainConfig, with
// the policy's config inside, and the normaliser's statistics). Any input may be rejected, but
// only with mmdit::Error. See README "Fuzzing".
#include <cstddef>
#include <cstdint>
#include <string>

#include "tensor/error.h"
#include "train/trainer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const mmdit::TrainConfig c = mmdit::TrainConfig::from_json(text);
    c.validate();
    mmdit::TrainConfig::from_json(c.to_json());
  } catch (const mmdit::Error&) {
  }
  try {
    mmdit::Normalizer::from_json(text);
  } catch (const mmdit::Error&) {
  }
  return 0;
}
