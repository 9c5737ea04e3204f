#include "tensor/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <set>
#include <stdexcept>
#include <string_view>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "tensor/bytes.h"
#include "tensor/file_io.h"
#include "tensor/ops.h"
#include "tensor/packed_weight.h"

namespace mmdit {
namespace {

using json = nlohmann::json;

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the reference implementation's limit
// A valid header nests three levels (header, entry, shape); the limit only keeps absurd input
// out while still letting the schema checks below explain ordinary mistakes.
constexpr int kMaxJsonDepth = 64;
constexpr uint64_t kMaxExactInteger = uint64_t{1} << 53;

// ---- the file's dtypes ----
enum class FileDType { BOOL, U8, I8, U16, I16, F16, BF16, U32, I32, F32, U64, I64, F64 };

struct FileDTypeInfo {
  const char* name;
  FileDType type;
  size_t size;
};

constexpr FileDTypeInfo kFileDTypes[] = {
    {"BOOL", FileDType::BOOL, 1}, {"U8", FileDType::U8, 1},   {"I8", FileDType::I8, 1},
    {"U16", FileDType::U16, 2},   {"I16", FileDType::I16, 2}, {"F16", FileDType::F16, 2},
    {"BF16", FileDType::BF16, 2}, {"U32", FileDType::U32, 4}, {"I32", FileDType::I32, 4},
    {"F32", FileDType::F32, 4},   {"U64", FileDType::U64, 8}, {"I64", FileDType::I64, 8},
    {"F64", FileDType::F64, 8},
};

const FileDTypeInfo* find_file_dtype(const std::string& name) {
  for (const FileDTypeInfo& info : kFileDTypes)
    if (name == info.name) return &info;
  return nullptr;
}

std::string supported_dtype_list() {
  std::string s;
  for (const FileDTypeInfo& info : kFileDTypes) {
    if (!s.empty()) s += ", ";
    s += info.name;
  }
  return s;
}

const char* file_dtype_name(DType t) {
  switch (t) {
    case DType::f32:
      return "F32";
    case DType::f64:
      return "F64";
    case DType::boolean:
      return "BOOL";
  }
  fail("safetensors: unknown DType ", static_cast<int>(t));
}

// ---- little-endian data ----
// Copies n little-endian values of T from unaligned bytes.
template <class T>
void copy_from_le(const unsigned char* src, T* dst, size_t n) {
  if constexpr (std::endian::native == std::endian::little) {
    if (n) std::memcpy(dst, src, n * sizeof(T));
  } else {
    for (size_t i = 0; i < n; ++i) dst[i] = load_scalar<T>(src + i * sizeof(T));
  }
}

void append_u64_le(std::string& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

// ---- header parsing ----
std::string describe(const json& j) {
  std::string text = j.dump(-1, ' ', false, json::error_handler_t::replace);
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  return str_cat(j.type_name(), " ", text);
}

// Parses the header JSON, rejecting duplicate keys (which JSON parsers silently merge) and
// absurd nesting.
json parse_header_json(const char* begin, const char* end, const std::string& what) {
  std::vector<std::set<std::string>> keys_by_depth;  // keys seen in the open object at each depth
  std::string entry;                                 // the current top-level key
  auto callback = [&](int depth, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        if (depth >= kMaxJsonDepth)
          fail(what, ": header nests JSON deeper than ", kMaxJsonDepth, " levels");
        if (event == json::parse_event_t::object_start) {
          if (keys_by_depth.size() <= static_cast<size_t>(depth)) keys_by_depth.resize(depth + 1);
          keys_by_depth[depth].clear();
        }
        break;
      case json::parse_event_t::key: {
        const std::string& key = parsed.get_ref<const std::string&>();
        if (depth == 1) entry = key;
        if (depth < 1 || keys_by_depth.size() < static_cast<size_t>(depth)) break;  // cannot happen
        if (!keys_by_depth[depth - 1].insert(key).second) {
          if (depth == 1 && key == "__metadata__") fail(what, ": duplicate key '__metadata__'");
          if (depth == 1) fail(what, ": duplicate tensor name '", key, "'");
          fail(what, ": '", entry, "': duplicate key '", key, "'");
        }
        break;
      }
      default:
        break;
    }
    return true;
  };
  // nlohmann's lexer takes a NUL byte for the end of input and would ignore what follows it; a
  // raw NUL is never valid JSON.
  if (const void* nul = std::memchr(begin, '\0', static_cast<size_t>(end - begin)))
    fail(what, ": header is not valid JSON: NUL byte at header offset ",
         static_cast<const char*>(nul) - begin);
  try {
    return json::parse(begin, end, callback);
  } catch (const json::exception& e) {
    fail(what, ": header is not valid JSON: ", e.what());
  }
}

struct Entry {
  std::string name;
  const FileDTypeInfo* dtype = nullptr;
  Shape shape;
  int64_t numel = 0;
  uint64_t begin = 0, end = 0;
};

Entry parse_entry(const std::string& name, const json& value, uint64_t buffer_size,
                  const std::string& what) {
  const std::string at = str_cat(what, ": tensor '", name, "': ");
  if (!value.is_object())
    fail(at, "entry must be a JSON object with dtype, shape and data_offsets, got ",
         describe(value));
  auto field = [&](const char* key) -> const json& {
    auto it = value.find(key);
    if (it == value.end()) fail(at, "missing \"", key, "\"");
    return *it;
  };
  Entry e;
  e.name = name;

  const json& dtype = field("dtype");
  if (!dtype.is_string()) fail(at, "\"dtype\" must be a string, got ", describe(dtype));
  const std::string& dtype_str = dtype.get_ref<const std::string&>();
  e.dtype = find_file_dtype(dtype_str);
  if (!e.dtype)
    fail(at, "unsupported dtype '", dtype_str, "' (supported: ", supported_dtype_list(), ")");

  const json& shape = field("shape");
  if (!shape.is_array())
    fail(at, "\"shape\" must be an array of non-negative integers, got ", describe(shape));
  for (const json& d : shape) {
    if (d.is_number_unsigned()) {
      const uint64_t v = d.get<uint64_t>();
      if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        fail(at, "shape dimension ", v, " is too large");
      e.shape.push_back(static_cast<int64_t>(v));
    } else if (d.is_number_integer()) {
      fail(at, "shape dimension ", d.get<int64_t>(), " is negative");
    } else {
      fail(at, "shape dimension must be a non-negative integer, got ", describe(d));
    }
  }
  // The product of the nonzero dims must fit, even when a zero dim makes the tensor empty:
  // strides are computed from it.
  int64_t product = 1;
  bool has_zero = false;
  for (int64_t d : e.shape) {
    if (d == 0)
      has_zero = true;
    else if (__builtin_mul_overflow(product, d, &product))
      fail(at, "shape ", shape_str(e.shape),
           " is too large: the product of its nonzero dimensions overflows int64");
  }
  e.numel = has_zero ? 0 : product;
  uint64_t nbytes = 0;
  if (__builtin_mul_overflow(static_cast<uint64_t>(e.numel), e.dtype->size, &nbytes))
    fail(at, e.dtype->name, " shape ", shape_str(e.shape), " needs more bytes than fit in uint64");

  const json& offsets = field("data_offsets");
  if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
      !offsets[1].is_number_unsigned())
    fail(at, "\"data_offsets\" must be [begin, end] with non-negative integers, got ",
         describe(offsets));
  e.begin = offsets[0].get<uint64_t>();
  e.end = offsets[1].get<uint64_t>();
  const std::string range = str_cat("data_offsets [", e.begin, ", ", e.end, "]");
  if (e.begin > e.end) fail(at, range, " have begin > end");
  if (e.end - e.begin != nbytes)
    fail(at, range, " hold ", e.end - e.begin, " bytes but ", e.dtype->name, " shape ",
         shape_str(e.shape), " needs ", nbytes);
  if (e.end > buffer_size)
    fail(at, range, " lie outside the data buffer of ", buffer_size, " bytes (file truncated?)");
  return e;
}

std::map<std::string, std::string> parse_metadata(const json& value, const std::string& what) {
  if (!value.is_object())
    fail(what, ": __metadata__ must be a JSON object of strings, got ", describe(value));
  std::map<std::string, std::string> metadata;
  for (const auto& [key, v] : value.items()) {
    if (!v.is_string())
      fail(what, ": __metadata__ value for key '", key, "' must be a string, got ", describe(v));
    metadata[key] = v.get<std::string>();
  }
  return metadata;
}

// ---- data conversion ----
template <class Int>
void integers_to_f64(const unsigned char* src, double* dst, size_t n, const std::string& at,
                     const char* dtype) {
  for (size_t i = 0; i < n; ++i) {
    const Int v = load_scalar<Int>(src + i * sizeof(Int));
    if constexpr (sizeof(Int) == 8) {
      uint64_t magnitude = static_cast<uint64_t>(v);
      if constexpr (std::is_signed_v<Int>)
        if (v < 0) magnitude = uint64_t{0} - magnitude;
      if (magnitude > kMaxExactInteger)
        fail(at, dtype, " value ", v, " at element ", i,
             " is not exactly representable as float64 (|v| > 2^53)");
    }
    dst[i] = static_cast<double>(v);
  }
}

Tensor convert(const Entry& e, const unsigned char* src, const std::string& what) {
  const std::string at = str_cat(what, ": tensor '", e.name, "': ");
  const size_t n = static_cast<size_t>(e.numel);
  const char* name = e.dtype->name;
  switch (e.dtype->type) {
    case FileDType::F32: {
      Tensor t = empty(e.shape, DType::f32);
      copy_from_le(src, t.data<float>(), n);
      return t;
    }
    case FileDType::F64: {
      Tensor t = empty(e.shape, DType::f64);
      copy_from_le(src, t.data<double>(), n);
      return t;
    }
    case FileDType::BOOL: {
      Tensor t = empty(e.shape, DType::boolean);
      bool* dst = t.data<bool>();
      for (size_t i = 0; i < n; ++i) {
        if (src[i] > 1)
          fail(at, "BOOL byte at element ", i, " is ", static_cast<int>(src[i]),
               " (must be 0 or 1)");
        dst[i] = src[i] != 0;
      }
      return t;
    }
    case FileDType::F16:
    case FileDType::BF16: {
      Tensor t = empty(e.shape, DType::f32);
      float* dst = t.data<float>();
      const bool half = e.dtype->type == FileDType::F16;
      for (size_t i = 0; i < n; ++i) {
        const uint16_t bits = load_scalar<uint16_t>(src + 2 * i);
        dst[i] = half ? half_to_float(bits) : bfloat16_to_float(bits);
      }
      return t;
    }
    default:
      break;
  }
  Tensor t = empty(e.shape, DType::f64);
  double* dst = t.data<double>();
  switch (e.dtype->type) {
    case FileDType::U8:
      integers_to_f64<uint8_t>(src, dst, n, at, name);
      break;
    case FileDType::I8:
      integers_to_f64<int8_t>(src, dst, n, at, name);
      break;
    case FileDType::U16:
      integers_to_f64<uint16_t>(src, dst, n, at, name);
      break;
    case FileDType::I16:
      integers_to_f64<int16_t>(src, dst, n, at, name);
      break;
    case FileDType::U32:
      integers_to_f64<uint32_t>(src, dst, n, at, name);
      break;
    case FileDType::I32:
      integers_to_f64<int32_t>(src, dst, n, at, name);
      break;
    case FileDType::U64:
      integers_to_f64<uint64_t>(src, dst, n, at, name);
      break;
    case FileDType::I64:
      integers_to_f64<int64_t>(src, dst, n, at, name);
      break;
    default:
      fail(at, "internal error: unhandled dtype ", name);
  }
  return t;
}

// What a file given in place of a safetensors file seems to be, from its first bytes: the
// files a user has beside a checkpoint (a dataset, a config, a plot, an .eqx or .npy model).
std::string looks_like(const unsigned char* first8) {
  const std::string_view start(reinterpret_cast<const char*>(first8), 8);
  if (start.starts_with("PK\x03\x04")) return " (it is a zip archive, e.g. an .npz dataset)";
  if (start.starts_with("\x89HDF\r\n")) return " (it is an HDF5 file, e.g. a dataset)";
  if (start.starts_with("\x93NUMPY")) return " (it is a .npy array, or an Equinox .eqx model)";
  if (start.starts_with("<")) return " (it starts like XML or SVG)";
  const size_t first = start.find_first_not_of(" \t\r\n");
  if (first != std::string_view::npos && (start[first] == '{' || start[first] == '['))
    return " (it starts like a JSON file, e.g. a config.json)";
  return "";
}

// The header's length, from a file's first 8 bytes and its size.
uint64_t header_length(const unsigned char* first8, uint64_t size, const std::string& what) {
  if (size < 8) fail(what, ": file is ", size, " bytes, too short for the 8-byte header length");
  const uint64_t header_len = load_scalar<uint64_t>(first8);
  // Any other file read as one (an .npz, a JSON config, an SVG) gives a huge length: say what the
  // file is not, not just that the length is out of range.
  if (header_len > kMaxHeaderBytes)
    fail(what, ": not a safetensors file", looks_like(first8),
         ": its first 8 bytes give a header length of ", header_len,
         ", which exceeds the limit of ", kMaxHeaderBytes, " bytes");
  if (header_len > size - 8)
    fail(what, ": header length ", header_len, " exceeds the ", size - 8,
         " bytes that follow it (file truncated?)");
  return header_len;
}

}  // namespace

SafetensorsFile parse_safetensors(const void* bytes, size_t size, const std::string& what) {
  const auto* p = static_cast<const unsigned char*>(bytes);
  const uint64_t header_len = header_length(p, size, what);
  const char* header_begin = reinterpret_cast<const char*>(p + 8);
  const json header = parse_header_json(header_begin, header_begin + header_len, what);
  if (!header.is_object()) fail(what, ": header must be a JSON object, got ", describe(header));

  const unsigned char* buffer = p + 8 + header_len;
  const uint64_t buffer_size = size - 8 - header_len;
  SafetensorsFile file;
  std::vector<Entry> entries;
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__")
      file.metadata = parse_metadata(value, what);
    else
      entries.push_back(parse_entry(name, value, buffer_size, what));
  }

  // File order is data order (names break ties between empty tensors).
  std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  const Entry* previous = nullptr;  // the last nonempty range; ranges are sorted by begin
  for (const Entry& e : entries) {
    if (e.begin == e.end) continue;
    if (previous && e.begin < previous->end)
      fail(what, ": tensors '", previous->name, "' (data_offsets [", previous->begin, ", ",
           previous->end, "]) and '", e.name, "' (data_offsets [", e.begin, ", ", e.end,
           "]) overlap");
    previous = &e;
  }

  try {
    for (const Entry& e : entries) file.tensors.insert(e.name, convert(e, buffer + e.begin, what));
  } catch (const OutOfMemory& e) {
    throw OutOfMemory(str_cat(what, ": its tensors do not fit in memory: ", e.what()));
  } catch (const std::bad_alloc&) {
    throw OutOfMemory(str_cat(what, ": its tensors do not fit in memory"));
  }
  return file;
}

SafetensorsFile load_safetensors(const std::string& path) {
  const std::string bytes = read_file(path);
  return parse_safetensors(bytes.data(), bytes.size(), path);
}

std::map<std::string, std::string> load_safetensors_metadata(const std::string& path) {
  const RegularFile file(path);
  const int fd = file.fd();
  const auto read_at = [&](char* into, size_t n, off_t offset) {
    for (size_t done = 0; done < n;) {
      const ssize_t got = ::pread(fd, into + done, n - done, offset + static_cast<off_t>(done));
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) fail(path, ": read failed: ", std::strerror(errno));
      if (got == 0) fail(path, ": file ended while reading its header (truncated meanwhile?)");
      done += static_cast<size_t>(got);
    }
  };
  const uint64_t size = static_cast<uint64_t>(file.size());
  unsigned char first8[8] = {};
  if (size >= 8) read_at(reinterpret_cast<char*>(first8), 8, 0);
  const uint64_t header_len = header_length(first8, size, path);
  std::string header(static_cast<size_t>(header_len), '\0');
  read_at(header.data(), header.size(), 8);
  const json parsed = parse_header_json(header.data(), header.data() + header.size(), path);
  if (!parsed.is_object()) fail(path, ": header must be a JSON object, got ", describe(parsed));
  const auto it = parsed.find("__metadata__");
  return it == parsed.end() ? std::map<std::string, std::string>{} : parse_metadata(*it, path);
}

namespace {

// The nearest bfloat16 to a double, ties to even: through float32 rounded to odd (toward zero,
// with the last bit set when inexact), whose 16 spare bits keep the second rounding from meeting
// a tie the first one made.
uint16_t bf16_of_double(double x) {
  float f = static_cast<float>(x);
  if (std::isfinite(x) && static_cast<double>(f) != x) {
    if (std::abs(static_cast<double>(f)) > std::abs(x)) f = std::nextafter(f, 0.0f);
    f = std::bit_cast<float>(std::bit_cast<uint32_t>(f) | 1u);
  }
  return to_bf16(f);
}

// `t`'s values as bfloat16; a finite one that rounds past bfloat16's range (the last half ulp
// below FLT_MAX, or a float64 past float32's range) is an error naming `name`.
std::vector<uint16_t> bfloat16_values(const Tensor& t, const std::string& name) {
  const Tensor c = raw::contiguous(t);
  std::vector<uint16_t> out(static_cast<size_t>(c.numel()));
  for (int64_t i = 0; i < c.numel(); ++i) {
    const double x = c.dtype() == DType::f32 ? c.data<float>()[i] : c.data<double>()[i];
    out[static_cast<size_t>(i)] =
        c.dtype() == DType::f32 ? to_bf16(static_cast<float>(x)) : bf16_of_double(x);
    MMDIT_CHECK(!std::isfinite(x) || std::isfinite(from_bf16(out[static_cast<size_t>(i)])),
                "serialize_safetensors: tensor '", name, "' holds ", x, " at ",
                shape_str(unravel_index(i, t.shape())), ", past bfloat16's range");
  }
  return out;
}

}  // namespace

std::string serialize_safetensors(const NamedTensors& tensors,
                                  const std::map<std::string, std::string>& metadata,
                                  StoredFloats floats) {
  struct Item {
    const std::string* name;
    Tensor data;                 // contiguous; undefined when stored as bfloat16
    std::vector<uint16_t> bf16;  // the values, when stored as bfloat16
    Shape shape;
    size_t element_size() const { return data.defined() ? dtype_size(data.dtype()) : 2; }
    int64_t numel() const {
      return data.defined() ? data.numel() : static_cast<int64_t>(bf16.size());
    }
  };
  std::vector<Item> items;
  items.reserve(tensors.size());
  for (const auto& [name, t] : tensors) {
    MMDIT_CHECK(t.defined(), "serialize_safetensors: tensor '", name, "' is undefined");
    MMDIT_CHECK(name != "__metadata__",
                "serialize_safetensors: a tensor may not be named '__metadata__'");
    if (floats == StoredFloats::bf16 && is_floating(t.dtype()))
      items.push_back({&name, Tensor(), bfloat16_values(t, name), t.shape()});
    else
      items.push_back({&name, raw::contiguous(t), {}, t.shape()});
  }
  // Decreasing element size keeps every tensor aligned to its element size with no gaps, as the
  // reference writer does (its loader rejects gaps).
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return a.element_size() > b.element_size();
  });

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [key, value] : metadata) m[key] = value;
    header["__metadata__"] = std::move(m);
  }
  uint64_t offset = 0;
  for (const Item& item : items) {
    const uint64_t nbytes = static_cast<uint64_t>(item.numel()) * item.element_size();
    nlohmann::ordered_json shape = nlohmann::ordered_json::array();
    for (int64_t d : item.shape) shape.push_back(d);
    nlohmann::ordered_json entry = nlohmann::ordered_json::object();
    entry["dtype"] = item.data.defined() ? file_dtype_name(item.data.dtype()) : "BF16";
    entry["shape"] = std::move(shape);
    entry["data_offsets"] = nlohmann::ordered_json::array({offset, offset + nbytes});
    header[*item.name] = std::move(entry);
    offset += nbytes;
  }
  std::string header_text;
  try {
    header_text = header.dump();
  } catch (const nlohmann::ordered_json::exception& e) {
    // Name the string at fault: the header's own message gives only a byte index into it.
    const auto invalid = [](const std::string& text) {
      try {
        (void)nlohmann::json(text).dump();
        return false;
      } catch (const nlohmann::json::exception&) {
        return true;
      }
    };
    // Invalid bytes escaped, so that the message itself is valid text.
    const auto shown = [](const std::string& text) {
      return nlohmann::json(text).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    };
    for (const auto& [name, t] : tensors)
      MMDIT_CHECK(!invalid(name), "serialize_safetensors: tensor name ", shown(name),
                  " is not valid UTF-8");
    for (const auto& [key, value] : metadata) {
      MMDIT_CHECK(!invalid(key), "serialize_safetensors: metadata key ", shown(key),
                  " is not valid UTF-8");
      MMDIT_CHECK(!invalid(value), "serialize_safetensors: the value of metadata key ", shown(key),
                  " is not valid UTF-8: ", shown(value));
    }
    fail("serialize_safetensors: tensor names and metadata must be valid UTF-8: ", e.what());
  }
  header_text.append((8 - header_text.size() % 8) % 8, ' ');
  MMDIT_CHECK(header_text.size() <= kMaxHeaderBytes, "serialize_safetensors: header of ",
              header_text.size(), " bytes exceeds the limit of ", kMaxHeaderBytes, " bytes");

  std::string out;
  out.reserve(8 + header_text.size() + offset);
  append_u64_le(out, header_text.size());
  out += header_text;
  for (const Item& item : items) {
    const size_t n = static_cast<size_t>(item.numel());
    if (!item.data.defined()) {
      append_le(out, item.bf16.data(), n);
      continue;
    }
    switch (item.data.dtype()) {
      case DType::f32:
        append_le(out, item.data.data<float>(), n);
        break;
      case DType::f64:
        append_le(out, item.data.data<double>(), n);
        break;
      case DType::boolean: {
        // Read as bytes and normalize, so the file holds only 0 and 1.
        const auto* b = static_cast<const unsigned char*>(item.data.raw_data());
        for (size_t i = 0; i < n; ++i) out.push_back(b[i] ? 1 : 0);
        break;
      }
    }
  }
  return out;
}

void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata, StoredFloats floats) {
  std::string bytes;
  try {
    bytes = serialize_safetensors(tensors, metadata, floats);
  } catch (const Error& e) {
    fail(path, ": not saved: ", e.what());
  }
  write_file_atomically(path, bytes);
}

}  // namespace mmdit
