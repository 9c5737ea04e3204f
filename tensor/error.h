// The one exception type of the project, and helpers that build its messages.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace mmdit {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Formats a shape the way error messages and printing show it: (3,4), (5,) or ().
inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ",";
    s += std::to_string(shape[i]);
  }
  if (shape.size() == 1) s += ",";
  return s + ")";
}

template <class... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

template <class... Args>
[[noreturn]] void fail(const Args&... args) {
  throw Error(str_cat(args...));
}

}  // namespace mmdit

// Throws mmdit::Error with the concatenated message when `cond` is false.
#define MMDIT_CHECK(cond, ...)               \
  do {                                       \
    if (!(cond)) ::mmdit::fail(__VA_ARGS__); \
  } while (0)
