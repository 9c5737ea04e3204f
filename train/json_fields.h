// Reading the JSON configs' whole-number fields as written: nlohmann's get<>() converts silently,
// wrapping 2^64 - 1 to -1 and -1 to 2^64 - 1, which validation would then report as values no one
// wrote.
#pragma once

#include <cstdint>
#include <limits>
#include <string>

#include <nlohmann/json.hpp>

#include "tensor/error.h"

namespace mmdit {

// `config` names the file's kind in messages ("train config").
inline int64_t json_int64(const nlohmann::json& value, const char* config, const std::string& key) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  MMDIT_CHECK(value.is_number_integer(), config, ": '", key, "' must be an integer, got ",
              value.dump());
  MMDIT_CHECK(!value.is_number_unsigned() || value.get<uint64_t>() <= uint64_t{kMax}, config, ": '",
              key, "' must be an integer no larger than ", kMax, ", got ", value.dump());
  return value.get<int64_t>();
}

inline uint64_t json_uint64(const nlohmann::json& value, const char* config,
                            const std::string& key) {
  MMDIT_CHECK(
      value.is_number_unsigned() || (value.is_number_integer() && value.get<int64_t>() >= 0),
      config, ": '", key, "' must be an integer in [0, ", std::numeric_limits<uint64_t>::max(),
      "], got ", value.dump());
  return value.get<uint64_t>();
}

}  // namespace mmdit
