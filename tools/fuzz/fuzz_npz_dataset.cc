// libFuzzer target: a LeRobot-style .npz dataset as `mmdit train --data` reads it (the archive,
// its members, then the episode checks). Any input may be rejected, but only with mmdit::Error.
// The bytes go through a file because that is the only way libzip and load_episodes read.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

#include "tensor/error.h"
#include "train/dataset.h"
#include "train/npy.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = "/tmp/mmdit_fuzz_" + std::to_string(::getpid()) + ".npz";
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return 0;
  std::fwrite(data, 1, size, f);
  std::fclose(f);
  try {
    mmdit::load_npz(path);
    mmdit::load_episodes(path, {"state"});
  } catch (const mmdit::Error&) {
  }
  return 0;
}
