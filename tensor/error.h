// The project's exception type (and its one refinement, OutOfMemory), and helpers that build
// their messages.
#pragma once

#include <charconv>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "tensor/shape.h"

namespace mmdit {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A tensor's storage could not be allocated. Its own class so that the code that asked for the
// memory (building a model of a config's sizes, a training step at a batch size) can say which
// setting to lower.
class OutOfMemory : public Error {
 public:
  using Error::Error;
};

// Formats a shape the way error messages and printing show it: (3,4), (5,) or ().
inline std::string shape_str(const Shape& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ",";
    s += std::to_string(shape[i]);
  }
  if (shape.size() == 1) s += ",";
  return s + ")";
}

namespace detail {
// Strings and integers are appended directly: names built on hot paths (NameScope's
// "blocks.3") would otherwise each pay for an ostringstream and its locale. Everything else
// (floating point, enums, char types) is formatted by operator<< as before.
template <class T>
void append(std::string& s, const T& value) {
  if constexpr (std::is_pointer_v<T> && std::is_convertible_v<T, std::string_view>) {
    s += value ? std::string_view(value) : std::string_view("(null)");
  } else if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    s += std::string_view(value);  // strings, and literals (arrays)
  } else if constexpr (std::is_integral_v<T> && sizeof(T) > 1 && !std::is_same_v<T, bool>) {
    char buf[24];
    s.append(buf, std::to_chars(buf, buf + sizeof buf, value).ptr);
  } else {
    std::ostringstream os;
    os << value;
    s += os.str();
  }
}
}  // namespace detail

template <class... Args>
std::string str_cat(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

template <class... Args>
[[noreturn]] void fail(const Args&... args) {
  throw Error(str_cat(args...));
}

// Names in messages: "'a', 'b'", or "none".
inline std::string quoted_list(const std::vector<std::string>& names) {
  if (names.empty()) return "none";
  std::string s;
  for (const std::string& n : names) {
    if (!s.empty()) s += ", ";
    s += "'" + n + "'";
  }
  return s;
}

// For configurations: "<who>: <field> must be positive, got <value>", and for a list the
// entry's index too.
inline void check_positive(const char* who, const char* field, int64_t value) {
  if (value <= 0) fail(who, ": ", field, " must be positive, got ", value);
}
inline void check_positive(const char* who, const char* field, const std::vector<int64_t>& values) {
  for (size_t i = 0; i < values.size(); ++i)
    if (values[i] <= 0) fail(who, ": ", field, "[", i, "] must be positive, got ", values[i]);
}
// check_positive, then the value: for member initialisers, which run before a constructor's body.
inline int64_t positive(const char* who, const char* field, int64_t value) {
  check_positive(who, field, value);
  return value;
}

}  // namespace mmdit

// Throws mmdit::Error with the concatenated message when `cond` is false.
#define MMDIT_CHECK(cond, ...)               \
  do {                                       \
    if (!(cond)) ::mmdit::fail(__VA_ARGS__); \
  } while (0)
