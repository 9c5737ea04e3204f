// libFuzzer target: the members of a LeRobot-style .npz, as `mmdit train --data` reads them, in
// an archive the harness writes itself. fuzz_npz_dataset mutates whole archives, whose members
// libzip then refuses on their CRC before the .npy parser or the episode checks see them; here
// every input reaches both. Any input may be rejected, but only with mmdit::Error.
//
// The input is a list of members, each one byte choosing its name, two bytes (little-endian) its
// length, then that many bytes of .npy file.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "tensor/error.h"
#include "tools/fuzz/input_file.h"
#include "train/dataset.h"
#include "train/npy.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const char* const names[] = {"observation.state", "action", "episode_index", "extra"};
  std::vector<std::pair<std::string, std::string>> members;
  size_t at = 0;
  while (at + 3 <= size && members.size() < 8) {
    const std::string name = names[data[at] % 4];
    const size_t length =
        std::min<size_t>(data[at + 1] | (size_t{data[at + 2]} << 8), size - at - 3);
    members.emplace_back(name, std::string(reinterpret_cast<const char*>(data + at + 3), length));
    at += 3 + length;
  }
  const std::string& path = input_file_path(".npz");
  try {
    mmdit::save_npz_members(path, members);
  } catch (const mmdit::Error&) {
    return 0;  // e.g. a name twice: no archive to read
  }
  try {
    mmdit::load_npz(path);
    mmdit::load_episodes(path, {"state"});
  } catch (const mmdit::Error&) {
  }
  return 0;
}
