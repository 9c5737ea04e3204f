// libFuzzer target: a LeRobot-style .npz dataset as `mmdit train --data` reads it (the archive,
// its members, then the episode checks). Any input may be rejected, but only with mmdit::Error.
// The bytes go through a file because that is the only way libzip and load_episodes read.
#include <cstddef>
#include <cstdint>
#include <string>

#include "tensor/error.h"
#include "tools/fuzz/input_file.h"
#include "train/dataset.h"
#include "train/npy.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = write_input_file(data, size, ".npz");
  if (path.empty()) return 0;
  try {
    mmdit::load_npz(path);
    mmdit::load_episodes(path, {"state"});
  } catch (const mmdit::Error&) {
  }
  return 0;
}
