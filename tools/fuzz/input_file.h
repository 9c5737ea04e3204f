// For readers that take a path (libzip, load_episodes, load_policy): the fuzz input written to a
// file of this process, overwritten by each input.
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

// The file's path, or "" if it could not be written.
inline std::string write_input_file(const uint8_t* data, size_t size, const char* suffix) {
  static const std::string stem = "/tmp/mmdit_fuzz_" + std::to_string(::getpid());
  const std::string path = stem + suffix;
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return "";
  const bool written = std::fwrite(data, 1, size, f) == size;
  return std::fclose(f) == 0 && written ? path : "";
}
