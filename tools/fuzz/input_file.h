// For readers that take a path (libzip, load_episodes, load_policy): the fuzz input written to a
// file of this process, overwritten by each input.
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

// This process's file for its inputs, removed when the process exits normally (libFuzzer's fork
// mode starts many; one that crashes leaves its file, the crash's input).
inline const std::string& input_file_path(const char* suffix) {
  struct RemovedAtExit {
    std::string path;
    ~RemovedAtExit() { std::remove(path.c_str()); }
  };
  static const RemovedAtExit file{"/tmp/mmdit_fuzz_" + std::to_string(::getpid()) + suffix};
  return file.path;
}

// The input written to input_file_path(suffix); "" if it could not be written.
inline std::string write_input_file(const uint8_t* data, size_t size, const char* suffix) {
  const std::string& path = input_file_path(suffix);
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return "";
  const bool written = std::fwrite(data, 1, size, f) == size;
  return std::fclose(f) == 0 && written ? path : "";
}
