// libFuzzer target: a robomimic-style HDF5 dataset as `mmdit train --data` reads it (the groups,
// each demo's observation keys and actions, then the episode checks). Any input may be
// rejected, but only with mmdit::Error. Seed it with a robomimic file (README, "Fuzzing").
#include <cstddef>
#include <cstdint>
#include <string>

#include "tensor/error.h"
#include "tools/fuzz/input_file.h"
#include "train/dataset.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = write_input_file(data, size, ".hdf5");
  if (path.empty()) return 0;
  try {
    mmdit::load_episodes(path, {"pos", "vel"});
  } catch (const mmdit::Error&) {
  }
  return 0;
}
