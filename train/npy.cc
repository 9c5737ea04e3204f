#include "train/npy.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zip.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <set>
#include <type_traits>

#include "tensor/bytes.h"
#include "tensor/file_io.h"
#include "tensor/ops.h"

namespace mmdit {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicLen = 6;
constexpr size_t kArrayAlign = 64;  // NumPy aligns the data this way so it can be memory-mapped
constexpr uint64_t kMaxExactInteger = uint64_t{1} << 53;
// The headers NumPy writes are ~100 bytes; a long one only slows the parser down, but a limit
// keeps absurd input (and deep nesting, below) from costing more than it should.
constexpr uint64_t kMaxHeaderBytes = 1 << 20;
constexpr int kMaxLiteralDepth = 32;

// ---- a Python literal, as far as .npy headers use them ----
struct PyValue {
  enum class Kind { string, integer, boolean, none, sequence, dict } kind = Kind::none;
  std::string text;  // string contents, or the source text of any value (for messages)
  int64_t integer = 0;
  bool negative_or_huge = false;  // an integer that is < 0 or does not fit in int64
  bool boolean = false;
  std::vector<PyValue> items;     // tuple/list elements, or a dict's values
  std::vector<std::string> keys;  // a dict's keys (strings only), one per value in items
};

std::string printable(std::string_view s, size_t limit = 80) {
  std::string out;
  for (char c : s.substr(0, limit)) {
    const auto u = static_cast<unsigned char>(c);
    if (u >= 0x20 && u < 0x7F) {
      out += c;
    } else {
      static const char* hex = "0123456789abcdef";
      out += "\\x";
      out += hex[u >> 4];
      out += hex[u & 15];
    }
  }
  if (s.size() > limit) out += "...";
  return out;
}

class LiteralParser {
 public:
  LiteralParser(std::string_view text, const std::string& what) : s_(text), what_(what) {}

  PyValue parse_document() {
    PyValue v = value(0);
    skip_space();
    if (pos_ != s_.size()) error("unexpected text after the dict");
    return v;
  }

 private:
  [[noreturn]] void error(const std::string& message) const {
    fail(what_, ": bad header: ", message, " at offset ", pos_, " in \"", printable(s_, 200), "\"");
  }
  void skip_space() {
    while (pos_ < s_.size() &&
           (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r'))
      ++pos_;
  }
  bool eat(char c) {
    skip_space();
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  PyValue value(int depth) {
    if (depth > kMaxLiteralDepth) error("literal nested too deeply");
    skip_space();
    if (pos_ >= s_.size()) error("unexpected end of header");
    const size_t start = pos_;
    PyValue v;
    const char c = s_[pos_];
    if (c == '{') {
      v = dict(depth);
    } else if (c == '(' || c == '[') {
      v = sequence(depth);
    } else if (c == '\'' || c == '"') {
      v = string();
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      v = integer();
    } else if (s_.substr(pos_, 4) == "True") {
      v.kind = PyValue::Kind::boolean, v.boolean = true, pos_ += 4;
    } else if (s_.substr(pos_, 5) == "False") {
      v.kind = PyValue::Kind::boolean, v.boolean = false, pos_ += 5;
    } else if (s_.substr(pos_, 4) == "None") {
      v.kind = PyValue::Kind::none, pos_ += 4;
    } else {
      error(str_cat("unexpected character '", printable(s_.substr(pos_, 1)), "'"));
    }
    if (v.kind != PyValue::Kind::string) v.text = std::string(s_.substr(start, pos_ - start));
    return v;
  }
  PyValue dict(int depth) {
    PyValue v;
    v.kind = PyValue::Kind::dict;
    ++pos_;  // '{'
    while (!eat('}')) {
      skip_space();
      PyValue key = value(depth + 1);
      if (key.kind != PyValue::Kind::string) error("dict keys must be strings");
      if (!eat(':')) error("expected ':' after a dict key");
      PyValue item = value(depth + 1);
      for (const std::string& k : v.keys)
        if (k == key.text) error(str_cat("duplicate key '", printable(k), "'"));
      v.keys.push_back(key.text);
      v.items.push_back(std::move(item));
      if (eat('}')) break;
      if (!eat(',')) error("expected ',' or '}' in the dict");
    }
    return v;
  }
  PyValue sequence(int depth) {
    PyValue v;
    v.kind = PyValue::Kind::sequence;
    const char close = s_[pos_] == '(' ? ')' : ']';
    ++pos_;
    while (!eat(close)) {
      v.items.push_back(value(depth + 1));
      if (eat(close)) break;
      if (!eat(',')) error(str_cat("expected ',' or '", close, "'"));
    }
    return v;
  }
  PyValue string() {
    PyValue v;
    v.kind = PyValue::Kind::string;
    const char quote = s_[pos_++];
    for (;;) {
      if (pos_ >= s_.size()) error("unterminated string");
      const char c = s_[pos_++];
      if (c == quote) break;
      if (c == '\\') {
        if (pos_ >= s_.size()) error("unterminated string");
        v.text += s_[pos_++];  // descr strings never need more than a literal escape
      } else {
        v.text += c;
      }
    }
    return v;
  }
  PyValue integer() {
    PyValue v;
    v.kind = PyValue::Kind::integer;
    bool negative = false;
    if (s_[pos_] == '-') negative = true, ++pos_;
    if (pos_ >= s_.size() || s_[pos_] < '0' || s_[pos_] > '9') error("expected digits");
    uint64_t magnitude = 0;
    bool overflow = false;
    while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') {
      const uint64_t digit = static_cast<uint64_t>(s_[pos_++] - '0');
      if (magnitude > (std::numeric_limits<uint64_t>::max() - digit) / 10) overflow = true;
      if (!overflow) magnitude = magnitude * 10 + digit;
    }
    // Python 2 wrote long integers with an L suffix, and old files still carry it.
    if (pos_ < s_.size() && (s_[pos_] == 'L' || s_[pos_] == 'l')) ++pos_;
    if (overflow || magnitude > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
        (negative && magnitude != 0)) {
      v.negative_or_huge = true;
    } else {
      v.integer = static_cast<int64_t>(magnitude);
    }
    return v;
  }

  std::string_view s_;
  const std::string& what_;
  size_t pos_ = 0;
};

// ---- dtypes ----
enum class Kind { boolean, signed_int, unsigned_int, floating };

struct Descr {
  Kind kind;
  size_t size;
  bool big_endian;
  std::string text;
};

Descr parse_descr(const std::string& text, const std::string& what) {
  const std::string at = str_cat(what, ": dtype '", printable(text), "': ");
  std::string_view s = text;
  char order = '=';
  if (!s.empty() && (s[0] == '<' || s[0] == '>' || s[0] == '|' || s[0] == '=')) {
    order = s[0];
    s.remove_prefix(1);
  }
  if (s.size() < 2) fail(at, "unsupported dtype");
  const char code = s[0];
  size_t size = 0;
  for (char c : s.substr(1)) {
    if (c < '0' || c > '9' || size > 1000) fail(at, "unsupported dtype");
    size = size * 10 + static_cast<size_t>(c - '0');
  }
  Descr d{Kind::floating, size, false, text};
  switch (code) {
    case 'b':
      d.kind = Kind::boolean;
      if (size != 1) fail(at, "unsupported dtype");
      break;
    case 'i':
      d.kind = Kind::signed_int;
      if (size != 1 && size != 2 && size != 4 && size != 8) fail(at, "unsupported dtype");
      break;
    case 'u':
      d.kind = Kind::unsigned_int;
      if (size != 1 && size != 2 && size != 4 && size != 8) fail(at, "unsupported dtype");
      break;
    case 'f':
      if (size != 2 && size != 4 && size != 8)
        fail(at, "unsupported float size ", size, " (supported: f2, f4, f8)");
      break;
    default:
      fail(at, "unsupported dtype (supported: b1, i1, i2, i4, i8, u1, u2, u4, u8, f2, f4, f8)");
  }
  d.big_endian = order == '>' || (order == '=' && std::endian::native == std::endian::big);
  return d;
}

// ---- byte-order aware scalar loads ----
template <class Int>
void integers_to_f64(const unsigned char* src, double* dst, size_t n, bool big,
                     const std::string& what, const std::string& descr) {
  for (size_t i = 0; i < n; ++i) {
    const Int v = load_scalar<Int>(src + i * sizeof(Int), big);
    if constexpr (sizeof(Int) == 8) {
      uint64_t magnitude = static_cast<uint64_t>(v);
      if constexpr (std::is_signed_v<Int>)
        if (v < 0) magnitude = uint64_t{0} - magnitude;
      if (magnitude > kMaxExactInteger)
        fail(what, ": ", descr, " value ", v, " at element ", i,
             " is not exactly representable as float64 (|v| > 2^53)");
    }
    dst[i] = static_cast<double>(v);
  }
}

template <class Float>
void copy_floats(const unsigned char* src, Float* dst, size_t n, bool big) {
  if (!big && std::endian::native == std::endian::little) {
    if (n) std::memcpy(dst, src, n * sizeof(Float));
    return;
  }
  for (size_t i = 0; i < n; ++i) dst[i] = load_scalar<Float>(src + i * sizeof(Float), big);
}

Tensor convert(const Descr& d, const Shape& shape, const unsigned char* src, size_t n,
               const std::string& what) {
  const bool big = d.big_endian;
  if (d.kind == Kind::boolean) {
    Tensor t = empty(shape, DType::boolean);
    bool* dst = t.data<bool>();
    for (size_t i = 0; i < n; ++i) {
      if (src[i] > 1)
        fail(what, ": bool byte at element ", i, " is ", static_cast<int>(src[i]),
             " (must be 0 or 1)");
      dst[i] = src[i] != 0;
    }
    return t;
  }
  if (d.kind == Kind::floating) {
    if (d.size == 8) {
      Tensor t = empty(shape, DType::f64);
      copy_floats(src, t.data<double>(), n, big);
      return t;
    }
    Tensor t = empty(shape, DType::f32);
    float* dst = t.data<float>();
    if (d.size == 4)
      copy_floats(src, dst, n, big);
    else
      for (size_t i = 0; i < n; ++i)
        dst[i] = half_to_float(load_scalar<uint16_t>(src + 2 * i, big));
    return t;
  }
  Tensor t = empty(shape, DType::f64);
  double* dst = t.data<double>();
  const bool is_signed = d.kind == Kind::signed_int;
  switch (d.size) {
    case 1:
      is_signed ? integers_to_f64<int8_t>(src, dst, n, big, what, d.text)
                : integers_to_f64<uint8_t>(src, dst, n, big, what, d.text);
      break;
    case 2:
      is_signed ? integers_to_f64<int16_t>(src, dst, n, big, what, d.text)
                : integers_to_f64<uint16_t>(src, dst, n, big, what, d.text);
      break;
    case 4:
      is_signed ? integers_to_f64<int32_t>(src, dst, n, big, what, d.text)
                : integers_to_f64<uint32_t>(src, dst, n, big, what, d.text);
      break;
    default:
      is_signed ? integers_to_f64<int64_t>(src, dst, n, big, what, d.text)
                : integers_to_f64<uint64_t>(src, dst, n, big, what, d.text);
      break;
  }
  return t;
}

const char* npy_descr(DType t) {
  switch (t) {
    case DType::f32:
      return "<f4";
    case DType::f64:
      return "<f8";
    case DType::boolean:
      return "|b1";
  }
  fail("serialize_npy: unknown DType ", static_cast<int>(t));
}

// The preamble and header of a C-order array, padded so the data starts aligned.
std::string npy_header(const char* descr, const Shape& shape) {
  std::string dict = str_cat("{'descr': '", descr, "', 'fortran_order': False, 'shape': (");
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) dict += ", ";
    dict += std::to_string(shape[i]);
  }
  if (shape.size() == 1) dict += ",";
  dict += "), }";
  // NumPy's rule: pad with spaces, then '\n', so that the preamble plus header is a multiple of
  // kArrayAlign; version 2.0's 4-byte length is only used when 1.0's 2 bytes cannot hold it.
  for (size_t len_bytes : {size_t{2}, size_t{4}}) {
    const size_t unpadded = kMagicLen + 2 + len_bytes + dict.size() + 1;
    const size_t header_len =
        dict.size() + 1 + (kArrayAlign - unpadded % kArrayAlign) % kArrayAlign;
    if (len_bytes == 2 && header_len > 0xFFFF) continue;
    std::string out(kMagic, kMagicLen);
    out.push_back(static_cast<char>(len_bytes == 2 ? 1 : 2));
    out.push_back(0);
    for (size_t i = 0; i < len_bytes; ++i)
      out.push_back(static_cast<char>((header_len >> (8 * i)) & 0xFF));
    out += dict;
    out.append(header_len - dict.size() - 1, ' ');
    out.push_back('\n');
    return out;
  }
  fail("serialize_npy: header for shape ", shape_str(shape), " is too long");
}

// ---- files ----
std::string zip_error_text(int code) {
  zip_error_t error;
  zip_error_init_with_code(&error, code);
  std::string text = zip_error_strerror(&error);
  zip_error_fini(&error);
  return text;
}

struct ZipDiscarder {
  void operator()(zip_t* z) const { zip_discard(z); }
};
struct ZipFileCloser {
  void operator()(zip_file_t* f) const { zip_fclose(f); }
};
using ZipPtr = std::unique_ptr<zip_t, ZipDiscarder>;
using ZipFilePtr = std::unique_ptr<zip_file_t, ZipFileCloser>;

}  // namespace

Tensor parse_npy(const void* bytes, size_t size, const std::string& what) {
  return parse_npy_record(bytes, size, what, /*whole=*/true).value;
}

namespace {

// parse_npy_record; with check_data false, the data after the header is not looked for (the
// header alone is checked, and the record's length returned).
NpyRecord parse_record(const void* bytes, size_t size, const std::string& what, bool whole,
                       bool read_data, bool check_data) {
  const auto* p = static_cast<const unsigned char*>(bytes);
  if (size < kMagicLen || std::memcmp(p, kMagic, kMagicLen) != 0)
    fail(what, ": not a .npy file (bad magic: expected \"\\x93NUMPY\", got \"",
         printable(std::string_view(reinterpret_cast<const char*>(p), std::min<size_t>(size, 6))),
         "\")");
  if (size < kMagicLen + 2) fail(what, ": file truncated in the format version");
  const int major = p[6], minor = p[7];
  if ((major != 1 && major != 2 && major != 3) || minor != 0)
    fail(what, ": unsupported .npy format version ", major, ".", minor,
         " (supported: 1.0, 2.0, 3.0)");
  const size_t len_bytes = major == 1 ? 2 : 4;
  const size_t preamble = kMagicLen + 2 + len_bytes;
  if (size < preamble) fail(what, ": file truncated in the header length");
  uint64_t header_len = 0;
  for (size_t i = 0; i < len_bytes; ++i) header_len |= uint64_t{p[8 + i]} << (8 * i);
  if (header_len > kMaxHeaderBytes)
    fail(what, ": header length ", header_len, " exceeds the limit of ", kMaxHeaderBytes, " bytes");
  if (header_len > size - preamble)
    fail(what, ": header length ", header_len, " exceeds the ", size - preamble,
         " bytes that follow it (file truncated?)");
  const std::string_view header(reinterpret_cast<const char*>(p + preamble), header_len);

  const PyValue dict = LiteralParser(header, what).parse_document();
  if (dict.kind != PyValue::Kind::dict)
    fail(what, ": bad header: expected a dict, got \"", printable(header), "\"");
  const PyValue *descr = nullptr, *fortran = nullptr, *shape_value = nullptr;
  for (size_t i = 0; i < dict.keys.size(); ++i) {
    const std::string& key = dict.keys[i];
    const PyValue& value = dict.items[i];
    if (key == "descr")
      descr = &value;
    else if (key == "fortran_order")
      fortran = &value;
    else if (key == "shape")
      shape_value = &value;
    else
      fail(what, ": bad header: unexpected key '", printable(key),
           "' (expected descr, fortran_order, shape)");
  }
  if (!descr || !fortran || !shape_value)
    fail(what, ": bad header: missing key '",
         !descr     ? "descr"
         : !fortran ? "fortran_order"
                    : "shape",
         "' in \"", printable(header), "\"");
  if (descr->kind != PyValue::Kind::string)
    fail(what, ": unsupported dtype ", printable(descr->text),
         " (structured dtypes are not supported)");
  if (fortran->kind != PyValue::Kind::boolean)
    fail(what, ": bad header: fortran_order must be True or False, got ", printable(fortran->text));
  if (fortran->boolean)
    fail(what,
         ": fortran_order is True; only C-order arrays are supported (save a C-contiguous"
         " copy, e.g. np.ascontiguousarray)");
  if (shape_value->kind != PyValue::Kind::sequence)
    fail(what, ": bad header: shape must be a tuple of integers, got ",
         printable(shape_value->text));
  Shape shape;
  for (const PyValue& d : shape_value->items) {
    if (d.kind != PyValue::Kind::integer)
      fail(what, ": bad header: shape dimension must be an integer, got ", printable(d.text));
    if (d.negative_or_huge)
      fail(what, ": bad header: shape dimension ", printable(d.text), " is negative or too large");
    shape.push_back(d.integer);
  }
  const Descr d = parse_descr(descr->text, what);

  int64_t product = 1;
  bool has_zero = false;
  for (int64_t dim : shape) {
    if (dim == 0)
      has_zero = true;
    else if (__builtin_mul_overflow(product, dim, &product))
      fail(what, ": shape ", shape_str(shape), " is too large");
  }
  const uint64_t numel = has_zero ? 0 : static_cast<uint64_t>(product);
  uint64_t nbytes = 0;
  if (__builtin_mul_overflow(numel, d.size, &nbytes))
    fail(what, ": shape ", shape_str(shape), " is too large");
  const uint64_t available = size - preamble - header_len;
  if (check_data && (whole ? available != nbytes : available < nbytes))
    fail(what, ": ", d.text, " shape ", shape_str(shape), " needs ", nbytes,
         " bytes of data but the file holds ", available,
         available < nbytes ? " (file truncated?)" : "");
  const size_t record_bytes = static_cast<size_t>(preamble + header_len + nbytes);
  if (!read_data) return {Tensor(), d.text, shape, record_bytes};
  return {convert(d, shape, p + preamble + header_len, static_cast<size_t>(numel), what), d.text,
          shape, record_bytes};
}

// The whole length of the record whose first `size` bytes are at p, once they hold its header
// (checked as parse_npy_record checks it); 0 before.
size_t npy_record_length(const unsigned char* p, size_t size, const std::string& what) {
  if (size < kMagicLen + 2) return 0;
  const size_t len_bytes = p[6] == 1 ? 2 : 4;
  if (size < kMagicLen + 2 + len_bytes) return 0;
  uint64_t header_len = 0;
  for (size_t i = 0; i < len_bytes; ++i) header_len |= uint64_t{p[8 + i]} << (8 * i);
  if (header_len <= kMaxHeaderBytes && size < kMagicLen + 2 + len_bytes + header_len) return 0;
  return parse_record(p, size, what, /*whole=*/false, /*read_data=*/false, /*check_data=*/false)
      .bytes;
}

}  // namespace

NpyRecord parse_npy_record(const void* bytes, size_t size, const std::string& what, bool whole,
                           bool read_data) {
  return parse_record(bytes, size, what, whole, read_data, /*check_data=*/true);
}

std::string serialize_npy(const Tensor& t) {
  MMDIT_CHECK(t.defined(), "serialize_npy: undefined tensor");
  const Tensor c = raw::contiguous(t);
  std::string out = npy_header(npy_descr(c.dtype()), c.shape());
  const size_t n = static_cast<size_t>(c.numel());
  out.reserve(out.size() + c.nbytes());
  switch (c.dtype()) {
    case DType::f32:
      append_le(out, c.data<float>(), n);
      break;
    case DType::f64:
      append_le(out, c.data<double>(), n);
      break;
    case DType::boolean: {
      // Read as bytes and normalize, so the file holds only 0 and 1.
      const auto* b = static_cast<const unsigned char*>(c.raw_data());
      for (size_t i = 0; i < n; ++i) out.push_back(b[i] ? 1 : 0);
      break;
    }
  }
  return out;
}

std::string serialize_npy_int64(const std::vector<int64_t>& values, const Shape& shape) {
  for (int64_t d : shape) MMDIT_CHECK(d >= 0, "serialize_npy_int64: bad shape ", shape_str(shape));
  MMDIT_CHECK(static_cast<size_t>(shape_numel(shape)) == values.size(),
              "serialize_npy_int64: ", values.size(), " values do not fill shape ",
              shape_str(shape));
  std::string out = npy_header("<i8", shape);
  append_le(out, values.data(), values.size());
  return out;
}

Tensor load_npy(const std::string& path) {
  const std::string bytes = read_file(path);
  return parse_npy(bytes.data(), bytes.size(), path);
}

void save_npy(const std::string& path, const Tensor& t) {
  write_file_atomically(path, serialize_npy(t));
}

NamedTensors load_npz(const std::string& path) {
  return load_npz(path, {});
}

NamedTensors load_npz(const std::string& path, const std::vector<std::string>& keys) {
  {
    // libzip opens a zero-byte file as an empty archive; for a dataset that is a mistake.
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) fail(path, ": cannot open: ", std::strerror(errno));
    if (!S_ISREG(st.st_mode)) fail(path, ": not a regular file");
    if (st.st_size == 0) fail(path, ": empty file, not an .npz (zip) archive");
  }
  int code = 0;
  ZipPtr archive(zip_open(path.c_str(), ZIP_RDONLY | ZIP_CHECKCONS, &code));
  if (!archive) {
    if (code == ZIP_ER_NOZIP) fail(path, ": not an .npz file (not a zip archive, or truncated)");
    if (code == ZIP_ER_EXISTS) fail(path, ": the archive holds two members with the same name");
    fail(path, ": cannot open as an .npz (zip) archive: ", zip_error_text(code));
  }
  const zip_int64_t count = zip_get_num_entries(archive.get(), 0);
  if (count < 0) fail(path, ": cannot list the archive's members");
  NamedTensors arrays;
  std::set<std::string> names;
  std::vector<std::string> members;  // every array's name, for a missing key's message
  const std::set<std::string> wanted(keys.begin(), keys.end());
  for (zip_int64_t i = 0; i < count; ++i) {
    const auto index = static_cast<zip_uint64_t>(i);
    zip_stat_t st;
    zip_stat_init(&st);
    if (zip_stat_index(archive.get(), index, 0, &st) != 0 || !(st.valid & ZIP_STAT_NAME) ||
        !(st.valid & ZIP_STAT_SIZE))
      fail(path, ": cannot read archive member #", i, ": ", zip_strerror(archive.get()));
    const std::string member = st.name;
    if (!member.empty() && member.back() == '/') continue;  // a directory entry
    constexpr std::string_view kSuffix = ".npy";
    const bool is_npy =
        member.size() >= kSuffix.size() && std::string_view(member).ends_with(kSuffix);
    const std::string name = is_npy ? member.substr(0, member.size() - kSuffix.size()) : member;
    if (!wanted.empty()) {
      members.push_back(printable(name));
      if (!wanted.contains(name)) continue;  // not read at all
    }
    if (!is_npy) fail(path, ": archive member '", printable(member), "' is not a .npy file");
    const std::string what = str_cat(path, ": array '", printable(name), "'");
    if (!names.insert(name).second) fail(what, ": appears twice in the archive");

    ZipFilePtr file(zip_fopen_index(archive.get(), index, 0));
    if (!file) fail(what, ": cannot open archive member: ", zip_strerror(archive.get()));
    // The declared size is untrusted: reserve a bounded amount and let the data itself grow
    // the buffer, so a lying header cannot make us allocate what is not there.
    std::string bytes;
    bytes.reserve(static_cast<size_t>(std::min<zip_uint64_t>(st.size, 1 << 24)));
    std::array<char, 1 << 16> chunk;
    size_t record_length = 0;  // once the header is in
    try {
      for (;;) {
        const zip_int64_t n = zip_fread(file.get(), chunk.data(), chunk.size());
        if (n < 0) fail(what, ": cannot read archive member: ", zip_file_strerror(file.get()));
        if (n == 0) break;
        bytes.append(chunk.data(), static_cast<size_t>(n));
        if (bytes.size() > st.size)
          fail(what, ": archive member holds more than its declared ", st.size, " bytes");
        // A small deflated member can declare and inflate to gigabytes past what its header's
        // shape needs: stop at the header's length.
        if (record_length == 0)
          record_length = npy_record_length(reinterpret_cast<const unsigned char*>(bytes.data()),
                                            bytes.size(), what);
        if (record_length != 0 && bytes.size() > record_length)
          fail(what, ": archive member holds more than the ", record_length,
               " bytes its .npy header declares (", bytes.size(), " read so far, ", st.size,
               " declared by the archive)");
      }
    } catch (const std::bad_alloc&) {
      fail(what, ": archive member of ", st.size, " bytes does not fit in memory");
    }
    if (bytes.size() != st.size)
      fail(what, ": archive member holds ", bytes.size(), " bytes, declared ", st.size,
           " (archive truncated?)");
    arrays.insert(name, parse_npy(bytes.data(), bytes.size(), what));
  }
  for (const std::string& key : keys)
    if (!arrays.contains(key))
      fail(path, ": missing key '", printable(key), "' (keys present: ", quoted_list(members), ")");
  return arrays;
}

namespace {
constexpr zip_uint16_t kDosMidnight = 0;
constexpr zip_uint16_t kDosJanuary1st1980 =
    (0 << 9) | (1 << 5) | 1;  // years since 1980, month, day
}  // namespace

void save_npz_members(const std::string& path,
                      const std::vector<std::pair<std::string, std::string>>& members) {
  std::set<std::string> names;
  for (const auto& [name, bytes] : members) {
    MMDIT_CHECK(name.find('\0') == std::string::npos, path, ": array name contains a NUL byte");
    MMDIT_CHECK(names.insert(name).second, path, ": duplicate array name '", name, "'");
  }
  if (members.empty()) {
    // libzip deletes an archive left with no members instead of writing one; NumPy writes the
    // bare end-of-central-directory record, so do that.
    std::string eocd = "PK\x05\x06";
    eocd.append(18, '\0');
    write_file_atomically(path, eocd);
    return;
  }
  const std::string tmp = atomic_temp_path(path);
  int code = 0;
  zip_t* archive = zip_open(tmp.c_str(), ZIP_CREATE | ZIP_TRUNCATE, &code);
  if (!archive) fail(path, ": cannot create temporary archive '", tmp, "': ", zip_error_text(code));
  auto abandon = [&](const std::string& message) {
    zip_discard(archive);
    ::unlink(tmp.c_str());
    fail(path, ": ", message);
  };
  for (const auto& [name, bytes] : members) {
    // The buffers stay alive (they belong to `members`) until zip_close below reads them.
    zip_source_t* source = zip_source_buffer(archive, bytes.data(), bytes.size(), 0);
    if (!source) abandon(str_cat("cannot add '", name, ".npy': ", zip_strerror(archive)));
    const zip_int64_t index =
        zip_file_add(archive, (name + ".npy").c_str(), source, ZIP_FL_ENC_GUESS);
    if (index < 0) {
      zip_source_free(source);
      abandon(str_cat("cannot add '", name, ".npy': ", zip_strerror(archive)));
    }
    if (zip_set_file_compression(archive, static_cast<zip_uint64_t>(index), ZIP_CM_STORE, 0) != 0)
      abandon(str_cat("cannot store '", name, ".npy': ", zip_strerror(archive)));
    // The zip epoch (1980-01-01 00:00), not the clock: the same arrays give the same bytes, so
    // that a dataset's hash says whether its data changed.
    if (zip_file_set_dostime(archive, static_cast<zip_uint64_t>(index), kDosMidnight,
                             kDosJanuary1st1980, 0) != 0)
      abandon(str_cat("cannot date '", name, ".npy': ", zip_strerror(archive)));
  }
  if (zip_close(archive) != 0)
    abandon(str_cat("writing '", tmp, "' failed: ", zip_strerror(archive)));
  commit_temp_file(tmp, path);
}

void save_npz(const std::string& path, const NamedTensors& arrays) {
  std::vector<std::pair<std::string, std::string>> members;
  members.reserve(arrays.size());
  for (const auto& [name, t] : arrays) {
    MMDIT_CHECK(t.defined(), path, ": array '", name, "' is undefined");
    members.emplace_back(name, serialize_npy(t));
  }
  save_npz_members(path, members);
}

}  // namespace mmdit
