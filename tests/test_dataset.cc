#include "train/dataset.h"

#include <gtest/gtest.h>
#include <hdf5.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zip.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "tensor/file_io.h"
#include "tensor/ops.h"
#include "tensor/random.h"
#include "tests/test_util.h"
#include "train/npy.h"

namespace mmdit {
namespace {

using test::le_bytes;
using test::TempDir;

namespace fs = std::filesystem;

void write_bytes(const std::string& path, const std::string& bytes) {
  // A fresh file rather than a truncated one: ext4 flushes a truncated-and-rewritten file to
  // disk on close, which makes the loops over thousands of variants below slow.
  std::error_code ec;
  fs::remove(path, ec);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Runs `f` and expects an mmdit::Error whose message contains every one of `needles`.
template <class F>
void expect_error(F&& f, const std::vector<std::string>& needles) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one containing: " << needles.front();
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const std::string& needle : needles)
      EXPECT_NE(msg.find(needle), std::string::npos)
          << "message: " << msg << "\nexpected: " << needle;
  }
}

void expect_same(const Tensor& a, const Tensor& b) {
  ASSERT_EQ(a.dtype(), b.dtype());
  ASSERT_EQ(a.shape(), b.shape());
  if (a.dtype() == DType::boolean) {
    EXPECT_EQ(a.to_vector<bool>(), b.to_vector<bool>());
  } else {
    const std::vector<double> va = a.to_vector<double>(), vb = b.to_vector<double>();
    for (size_t i = 0; i < va.size(); ++i)
      EXPECT_EQ(std::bit_cast<uint64_t>(va[i]), std::bit_cast<uint64_t>(vb[i]))
          << i << ": " << va[i] << " vs " << vb[i];
  }
}

// A .npy file from a header dict and raw data, framed as format `major`.0.
std::string npy_bytes(const std::string& dict, const std::string& data, int major = 1) {
  std::string header = dict;
  const size_t preamble = major == 1 ? 10 : 12;
  while ((preamble + header.size() + 1) % 64) header += ' ';
  header += '\n';
  std::string out("\x93NUMPY", 6);
  out.push_back(static_cast<char>(major));
  out.push_back(0);
  for (size_t i = 0; i < preamble - 8; ++i)
    out.push_back(static_cast<char>((header.size() >> (8 * i)) & 0xFF));
  return out + header + data;
}

template <class T>
std::string be_bytes(const std::vector<T>& values) {
  std::string out;
  for (T v : values) {
    std::string le = le_bytes(std::vector<T>{v});
    out.append(le.rbegin(), le.rend());
  }
  return out;
}

Tensor parse(const std::string& bytes) {
  return parse_npy(bytes.data(), bytes.size(), "x.npy");
}

// A zip archive of (member name, bytes) written with libzip, each member stored or deflated.
void write_zip(const std::string& path, const std::vector<std::pair<std::string, std::string>>& m,
               int32_t method) {
  int code = 0;
  zip_t* z = zip_open(path.c_str(), ZIP_CREATE | ZIP_TRUNCATE, &code);
  ASSERT_NE(z, nullptr);
  for (const auto& [name, bytes] : m) {
    zip_source_t* src = zip_source_buffer(z, bytes.data(), bytes.size(), 0);
    ASSERT_NE(src, nullptr);
    const zip_int64_t index = zip_file_add(z, name.c_str(), src, 0);
    ASSERT_GE(index, 0);
    ASSERT_EQ(zip_set_file_compression(z, static_cast<zip_uint64_t>(index), method,
                                       method == ZIP_CM_DEFLATE ? 9 : 0),
              0);
  }
  ASSERT_EQ(zip_close(z), 0);
}

// A 1 MB deflated member can inflate to gigabytes: reading stops as soon as it holds more than
// its .npy header's shape needs (it used to inflate the whole member, 2 GB, before refusing it).
TEST(Npz, StopsReadingAMemberPastItsHeadersLength) {
  TempDir dir;
  std::string bomb = serialize_npy(zeros({120, 4}));
  bomb.append(std::string(size_t{4} << 20, '\0'));
  const std::string path = dir.file("bomb.npz");
  write_zip(path, {{"observation.state.npy", bomb}}, ZIP_CM_DEFLATE);
  expect_error([&] { load_npz(path); },
               {path, "array 'observation.state'", "holds more than the 2048 bytes its .npy header",
                "(65536 read so far"});
}

// ---- .npy ----

TEST(Npy, RoundTripsEveryDtypeAndShape) {
  TempDir dir;
  const std::vector<Tensor> cases = {
      from_vector({1.5f, -2.f, 3.25f, 0.f, -0.f, 1e-30f}, {2, 3}),
      from_vector(std::vector<double>{0.1, -1e300, 4.9e-324, INFINITY}, {4}),
      from_vector(std::vector<bool>{true, false, true, true, false, false}, {3, 1, 2}),
      scalar(7.5f),
      scalar(-3.0, DType::f64),
      zeros({0}),
      zeros({2, 0, 3}, DType::f64),
      zeros({0}, DType::boolean),
  };
  for (const Tensor& t : cases) {
    SCOPED_TRACE(shape_str(t.shape()) + " " + dtype_name(t.dtype()));
    const std::string path = dir.file("a.npy");
    save_npy(path, t);
    expect_same(load_npy(path), t);
    EXPECT_EQ(dir.entries(), std::vector<std::string>{"a.npy"});  // no temp file left
  }
}

TEST(Npy, WritesNumpysHeaderLayout) {
  const std::string bytes = serialize_npy(zeros({2, 3}));
  ASSERT_GE(bytes.size(), 10u);
  EXPECT_EQ(bytes.substr(0, 8), std::string("\x93NUMPY\x01\x00", 8));
  const size_t header_len = static_cast<uint8_t>(bytes[8]) | static_cast<uint8_t>(bytes[9]) << 8;
  EXPECT_EQ((10 + header_len) % 64, 0u);  // the data starts 64-byte aligned
  EXPECT_EQ(bytes.size(), 10 + header_len + 6 * 4);
  const std::string header = bytes.substr(10, header_len);
  EXPECT_EQ(header.rfind("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 0), 0u)
      << header;
  EXPECT_EQ(header.back(), '\n');
  EXPECT_NE(serialize_npy(zeros({5}, DType::f64)).find("'descr': '<f8'"), std::string::npos);
  EXPECT_NE(serialize_npy(zeros({5}, DType::f64)).find("'shape': (5,)"), std::string::npos);
  EXPECT_NE(serialize_npy(scalar(1)).find("'shape': ()"), std::string::npos);
  EXPECT_NE(serialize_npy(zeros({1}, DType::boolean)).find("'descr': '|b1'"), std::string::npos);
}

// Files of consecutive records (Equinox's .eqx): each record's length and header dtype, with
// the bytes after it left alone; parse_npy still wants exactly one record.
TEST(Npy, RecordsOneAfterAnother) {
  const std::string first = serialize_npy(from_vector(std::vector<float>{1, 2, 3}, {3}));
  const std::string second = serialize_npy_int64({7}, {});
  const std::string both = first + second;
  const NpyRecord a = parse_npy_record(both.data(), both.size(), "both", /*whole=*/false);
  EXPECT_EQ(a.bytes, first.size());
  EXPECT_EQ(a.descr, "<f4");
  EXPECT_EQ(a.value.to_vector<float>(), (std::vector<float>{1, 2, 3}));
  const NpyRecord b =
      parse_npy_record(both.data() + a.bytes, both.size() - a.bytes, "both", /*whole=*/false);
  EXPECT_EQ(b.bytes, second.size());
  EXPECT_EQ(b.descr, "<i8");
  EXPECT_EQ(b.value.item(), 7.0);
  EXPECT_EQ(b.value.dim(), 0);
  expect_error([&] { parse_npy(both.data(), both.size(), "both"); },
               {str_cat("needs 12 bytes of data but the file holds ", both.size() - 128)});
  expect_error([&] { parse_npy_record(first.data(), first.size() - 1, "cut", false); },
               {"(file truncated?)"});
}

TEST(Npy, SavesNonContiguousViewsInLogicalOrder) {
  const Tensor t = from_vector({1.f, 2.f, 3.f, 4.f, 5.f, 6.f}, {2, 3});
  const Tensor tt = raw::transpose(t, 0, 1);
  const Tensor back = parse(serialize_npy(tt));
  EXPECT_EQ(back.shape(), (Shape{3, 2}));
  EXPECT_EQ(back.to_vector<float>(), (std::vector<float>{1, 4, 2, 5, 3, 6}));
}

// '=' is the writing machine's own byte order, little-endian on the machines we run on; '>' is
// big-endian, swapped on reading.
TEST(Npy, ReadsNativeAndBigEndianByteOrders) {
  const Tensor native = parse(npy_bytes("{'descr': '=f4', 'fortran_order': False, 'shape': (2,), }",
                                        le_bytes<float>({1.5f, -2.0f})));
  EXPECT_EQ(native.to_vector<float>(), (std::vector<float>{1.5f, -2.0f}));
  std::string big = le_bytes<float>({1.5f, -2.0f});
  std::reverse(big.begin(), big.begin() + 4);
  std::reverse(big.begin() + 4, big.end());
  const Tensor swapped =
      parse(npy_bytes("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", big));
  EXPECT_EQ(swapped.to_vector<float>(), (std::vector<float>{1.5f, -2.0f}));
}

TEST(Npy, ReadsHandWrittenIntegerFiles) {
  const Tensor i8 =
      parse(npy_bytes("{'descr': '<i8', 'fortran_order': False, 'shape': (2, 2), }",
                      le_bytes<int64_t>({1, -2, int64_t{1} << 53, -(int64_t{1} << 53)})));
  EXPECT_EQ(i8.dtype(), DType::f64);
  EXPECT_EQ(i8.shape(), (Shape{2, 2}));
  EXPECT_EQ(i8.to_vector<double>(),
            (std::vector<double>{1, -2, 9007199254740992.0, -9007199254740992.0}));
  expect_error(
      [] {
        parse(npy_bytes("{'descr': '<i8', 'fortran_order': False, 'shape': (1,), }",
                        le_bytes<int64_t>({(int64_t{1} << 53) + 1})));
      },
      {"x.npy", "2^53"});
  const Tensor u1 = parse(npy_bytes("{'descr': '|u1', 'fortran_order': False, 'shape': (3,), }",
                                    std::string("\x00\x7f\xff", 3)));
  EXPECT_EQ(u1.to_vector<double>(), (std::vector<double>{0, 127, 255}));
  const Tensor i4 = parse(npy_bytes("{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }",
                                    le_bytes<int32_t>({-7, 2147483647})));
  EXPECT_EQ(i4.to_vector<double>(), (std::vector<double>{-7, 2147483647}));
  const Tensor u8 = parse(npy_bytes("{'descr': '<u8', 'fortran_order': False, 'shape': (1,), }",
                                    le_bytes<uint64_t>({uint64_t{1} << 53})));
  EXPECT_EQ(u8.to_vector<double>(), (std::vector<double>{9007199254740992.0}));
  expect_error(
      [] {
        parse(npy_bytes("{'descr': '<u8', 'fortran_order': False, 'shape': (1,), }",
                        le_bytes<uint64_t>({~uint64_t{0}})));
      },
      {"2^53"});
}

TEST(Npy, ByteSwapsBigEndianData) {
  const Tensor f4 = parse(npy_bytes("{'descr': '>f4', 'fortran_order': False, 'shape': (3,), }",
                                    be_bytes<float>({1.5f, -2.f, 1e-30f})));
  EXPECT_EQ(f4.dtype(), DType::f32);
  EXPECT_EQ(f4.to_vector<float>(), (std::vector<float>{1.5f, -2.f, 1e-30f}));
  const Tensor f8 = parse(npy_bytes("{'descr': '>f8', 'fortran_order': False, 'shape': (2,), }",
                                    be_bytes<double>({0.1, -1e300})));
  EXPECT_EQ(f8.to_vector<double>(), (std::vector<double>{0.1, -1e300}));
  const Tensor i2 = parse(npy_bytes("{'descr': '>i2', 'fortran_order': False, 'shape': (2,), }",
                                    be_bytes<int16_t>({-300, 1000})));
  EXPECT_EQ(i2.to_vector<double>(), (std::vector<double>{-300, 1000}));
}

TEST(Npy, ReadsOtherHeaderSpellingsAndVersions) {
  // Key order, double quotes, a list for the shape, Python 2's L suffix, no trailing comma.
  const Tensor a = parse(npy_bytes("{\"shape\": [2L, 1], 'fortran_order':False,'descr':\"<f4\"}",
                                   le_bytes<float>({3, 4})));
  EXPECT_EQ(a.shape(), (Shape{2, 1}));
  EXPECT_EQ(a.to_vector<float>(), (std::vector<float>{3, 4}));
  for (int major : {2, 3}) {
    const Tensor b = parse(npy_bytes("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }",
                                     le_bytes<double>({2.5}), major));
    EXPECT_EQ(b.to_vector<double>(), (std::vector<double>{2.5}));
  }
  const Tensor h = parse(npy_bytes("{'descr': '<f2', 'fortran_order': False, 'shape': (3,), }",
                                   le_bytes<uint16_t>({0x3C00, 0xC000, 0x0001})));
  EXPECT_EQ(h.dtype(), DType::f32);
  EXPECT_EQ(h.to_vector<float>(), (std::vector<float>{1.f, -2.f, std::ldexp(1.f, -24)}));
  const Tensor b1 = parse(npy_bytes("{'descr': '|b1', 'fortran_order': False, 'shape': (2,), }",
                                    std::string("\x01\x00", 2)));
  EXPECT_EQ(b1.to_vector<bool>(), (std::vector<bool>{true, false}));
}

TEST(Npy, RejectsMalformedFiles) {
  const std::string f4_dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }";
  const std::string two_floats = le_bytes<float>({1, 2});
  expect_error([] { parse("hello world, not numpy"); }, {"x.npy", "bad magic"});
  expect_error([&] { parse(npy_bytes(f4_dict, two_floats, 4)); }, {"x.npy", "version 4.0"});
  expect_error(
      [&] {
        parse(npy_bytes("{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }", two_floats));
      },
      {"x.npy", "fortran_order"});
  expect_error(
      [&] {
        parse(npy_bytes("{'descr': '<c8', 'fortran_order': False, 'shape': (1,), }", two_floats));
      },
      {"x.npy", "'<c8'", "unsupported dtype"});
  expect_error(
      [&] {
        parse(npy_bytes("{'descr': '|O', 'fortran_order': False, 'shape': (1,), }", "12345678"));
      },
      {"'|O'", "unsupported"});
  expect_error(
      [&] {
        parse(npy_bytes("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }",
                        two_floats));
      },
      {"structured"});
  expect_error([&] { parse(npy_bytes(f4_dict, two_floats.substr(0, 7))); },
               {"x.npy", "needs 8 bytes", "holds 7", "truncated"});
  expect_error([&] { parse(npy_bytes(f4_dict, two_floats + "xx")); }, {"needs 8", "holds 10"});
  expect_error([&] { parse(npy_bytes("{'descr': '<f4', 'shape': (2,), }", two_floats)); },
               {"missing key 'fortran_order'"});
  expect_error(
      [&] {
        parse(npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}",
                        two_floats));
      },
      {"unexpected key 'x'"});
  expect_error(
      [&] {
        parse(npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }", two_floats));
      },
      {"negative"});
  expect_error(
      [&] {
        parse(
            npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 'a'), }", two_floats));
      },
      {"integer"});
  expect_error(
      [&] {
        parse(
            npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': "
                      "(4294967296, 4294967296, 4294967296), }",
                      two_floats));
      },
      {"too large"});
  expect_error(
      [&] { parse(npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (2,", "")); },
      {"bad header"});
  expect_error([&] { parse(npy_bytes("[1, 2]", two_floats)); }, {"expected a dict"});
  expect_error(
      [&] {
        parse(npy_bytes("{'descr': '|b1', 'fortran_order': False, 'shape': (2,), }", "\x01\x02"));
      },
      {"must be 0 or 1"});
  expect_error([&] { parse(npy_bytes(std::string(100, '('), "")); }, {"nested too deeply"});
  expect_error([&] { load_npy("/nonexistent/dir/a.npy"); },
               {"/nonexistent/dir/a.npy", "cannot open"});
}

TEST(Npy, TruncatedAndCorruptedFilesRaiseErrors) {
  TempDir dir;
  const std::string path = dir.file("t.npy");
  const std::string good = serialize_npy(from_vector({1.f, 2.f, 3.f}, {3}));
  for (size_t n = 0; n < good.size(); ++n) {
    write_bytes(path, good.substr(0, n));
    EXPECT_THROW(load_npy(path), Error) << "prefix of " << n << " bytes";
  }
  // Every single-byte corruption either still parses or is reported; none may crash.
  for (size_t i = 0; i < good.size(); ++i) {
    for (unsigned char x : {0x01, 0x80, 0xFF}) {
      std::string bad = good;
      bad[i] = static_cast<char>(bad[i] ^ x);
      try {
        parse(bad);
      } catch (const Error&) {
      }
    }
  }
}

TEST(Npy, SaveFailsCleanlyWhenTheDirectoryIsMissing) {
  TempDir dir;
  const std::string path = dir.file("missing/a.npy");
  expect_error([&] { save_npy(path, zeros({2})); }, {path, "temporary"});
  EXPECT_TRUE(dir.entries().empty());
}

// ---- .npz ----

TEST(Npz, RoundTripKeepsNamesAndOrder) {
  TempDir dir;
  NamedTensors arrays;
  arrays.insert("observation.state", from_vector({1.f, 2.f, 3.f, 4.f}, {2, 2}));
  arrays.insert("action", from_vector(std::vector<double>{0.5, -0.5}, {2, 1}));
  arrays.insert("mask", from_vector(std::vector<bool>{true, false}, {2}));
  arrays.insert("s", scalar(3.f));
  arrays.insert("empty", zeros({0, 4}));
  const std::string path = dir.file("a.npz");
  save_npz(path, arrays);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"a.npz"});
  const NamedTensors back = load_npz(path);
  ASSERT_EQ(back.size(), arrays.size());
  for (size_t i = 0; i < arrays.size(); ++i) {
    EXPECT_EQ(back[i].first, arrays[i].first);
    expect_same(back[i].second, arrays[i].second);
  }
  // Members are stored, named "<name>.npy", as np.savez writes them.
  int code = 0;
  zip_t* z = zip_open(path.c_str(), ZIP_RDONLY, &code);
  ASSERT_NE(z, nullptr);
  zip_stat_t st;
  ASSERT_EQ(zip_stat_index(z, 0, 0, &st), 0);
  EXPECT_STREQ(st.name, "observation.state.npy");
  EXPECT_EQ(st.comp_method, ZIP_CM_STORE);
  zip_discard(z);

  // Overwriting works and leaves no temp file; an empty archive round-trips too.
  save_npz(path, NamedTensors{});
  EXPECT_TRUE(load_npz(path).empty());
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"a.npz"});
}

// The same arrays give the same bytes whenever they are written: the members are dated at the zip
// epoch, 1980-01-01 00:00, not at the time of writing (np.savez dates them now).
TEST(Npz, TheSameArraysGiveTheSameBytes) {
  TempDir dir;
  NamedTensors arrays;
  arrays.insert("a", from_vector({1.f, 2.f}, {2}));
  arrays.insert("b", from_vector({3.f}, {1}));
  save_npz(dir.file("x.npz"), arrays);
  const std::string bytes = read_file(dir.file("x.npz"));
  int code = 0;
  zip_t* z = zip_open(dir.file("x.npz").c_str(), ZIP_RDONLY, &code);
  ASSERT_NE(z, nullptr);
  for (zip_uint64_t i = 0; i < 2; ++i) {
    zip_stat_t st;
    ASSERT_EQ(zip_stat_index(z, i, 0, &st), 0);
    std::tm epoch{};
    epoch.tm_year = 80, epoch.tm_mon = 0, epoch.tm_mday = 1, epoch.tm_isdst = -1;
    EXPECT_EQ(st.mtime, std::mktime(&epoch)) << st.name;  // libzip reads DOS times as local time
  }
  zip_discard(z);
  // The local header's DOS time and date (offsets 10 and 12 of the first member's header).
  ASSERT_GT(bytes.size(), 14u);
  EXPECT_EQ(bytes.substr(10, 4), std::string("\x00\x00\x21\x00", 4));
  save_npz(dir.file("y.npz"), arrays);
  EXPECT_TRUE(read_file(dir.file("y.npz")) == bytes);
}

TEST(Npz, LoadsDeflatedMembers) {
  TempDir dir;
  std::vector<float> values(5000);
  for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i % 17) * 0.25f;
  const Tensor big = from_vector(values, {1000, 5});
  const Tensor small = from_vector(std::vector<double>{1, 2, 3}, {3});
  const std::string path = dir.file("deflated.npz");
  write_zip(path, {{"big.npy", serialize_npy(big)}, {"small.npy", serialize_npy(small)}},
            ZIP_CM_DEFLATE);
  {
    int code = 0;
    zip_t* z = zip_open(path.c_str(), ZIP_RDONLY, &code);
    ASSERT_NE(z, nullptr);
    zip_stat_t st;
    ASSERT_EQ(zip_stat_index(z, 0, 0, &st), 0);
    EXPECT_EQ(st.comp_method, ZIP_CM_DEFLATE);
    EXPECT_LT(st.comp_size, st.size / 4);
    zip_discard(z);
  }
  const NamedTensors back = load_npz(path);
  ASSERT_EQ(back.size(), 2u);
  expect_same(back.at("big"), big);
  expect_same(back.at("small"), small);
}

std::string from_hex(const std::string& hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2)
    out.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  return out;
}

// Archives written the way np.savez and np.savez_compressed write them: Python's zipfile with
// force_zip64=True (zip64 extra fields in the local headers), stored and deflated. Members:
// observation.state <f4 (2, 2) = 1..4, episode_index <i8 (2,) = 7, 7, action <f8 (2, 1).
TEST(Npz, LoadsArchivesWrittenByPythonsZipfile) {
  const std::string stored = from_hex(
      "504b03042d0000000000000021004efb2075ffffffffffffffff150014006f62736572766174696f6e2e73746174"
      "652e6e70790100100090000000000000009000000000000000934e554d5059010076007b276465736372273a2027"
      "3c6634272c2027666f727472616e5f6f72646572273a2046616c73652c20277368617065273a2028322c2032292c"
      "207d2020202020202020202020202020202020202020202020202020202020202020202020202020202020202020"
      "20202020202020202020202020200a0000803f000000400000404000008040504b03042d0000000000000021008c"
      "9b6df2ffffffffffffffff11001400657069736f64655f696e6465782e6e70790100100090000000000000009000"
      "000000000000934e554d5059010076007b276465736372273a20273c6938272c2027666f727472616e5f6f726465"
      "72273a2046616c73652c20277368617065273a2028322c292c207d20202020202020202020202020202020202020"
      "20202020202020202020202020202020202020202020202020202020202020202020202020202020200a07000000"
      "000000000700000000000000504b03042d0000000000000021001553e4faffffffffffffffff0a00140061637469"
      "6f6e2e6e70790100100090000000000000009000000000000000934e554d5059010076007b276465736372273a20"
      "273c6638272c2027666f727472616e5f6f72646572273a2046616c73652c20277368617065273a2028322c203129"
      "2c207d20202020202020202020202020202020202020202020202020202020202020202020202020202020202020"
      "2020202020202020202020202020200a000000000000e03f000000000000e0bf504b01022d032d00000000000000"
      "21004efb207590000000900000001500000000000000000000008001000000006f62736572766174696f6e2e7374"
      "6174652e6e7079504b01022d032d0000000000000021008c9b6df290000000900000001100000000000000000000"
      "008001d7000000657069736f64655f696e6465782e6e7079504b01022d032d0000000000000021001553e4fa9000"
      "0000900000000a00000000000000000000008001aa010000616374696f6e2e6e7079504b05060000000003000300"
      "ba000000760200000000");
  const std::string deflated = from_hex(
      "504b03042d0000000800000021004efb2075ffffffffffffffff150014006f62736572766174696f6e2e73746174"
      "652e6e707901001000900000000000000053000000000000009bec17ea1b10c9c850c650ad9e925a9c5ca46ea5a0"
      "6e9366a2aea3a09e965f54529498179f5f94920a12774bcc294e058a17672416a402f91a463a0a469a3a0ab50a64"
      "032e0686067b060606072002e2060700504b03042d0000000800000021008c9b6df2ffffffffffffffff11001400"
      "657069736f64655f696e6465782e6e707901001000900000000000000049000000000000009bec17ea1b10c9c850"
      "c650ad9e925a9c5ca46ea5a06e9369a1aea3a09e965f54529498179f5f94920a12774bcc294e058a17672416a402"
      "f91a463a9a3a0ab50a14002e76060880d100504b03042d0000000800000021001553e4faffffffffffffffff0a00"
      "1400616374696f6e2e6e70790100100090000000000000004e000000000000009bec17ea1b10c9c850c650ad9e92"
      "5a9c5ca46ea5a06e9366a1aea3a09e965f54529498179f5f94920a12774bcc294e058a17672416a402f91a463a0a"
      "869a3a0ab50a64032e063078600fa5f70300504b01022d032d0000000800000021004efb20755300000090000000"
      "1500000000000000000000008001000000006f62736572766174696f6e2e73746174652e6e7079504b01022d032d"
      "0000000800000021008c9b6df2490000009000000011000000000000000000000080019a000000657069736f6465"
      "5f696e6465782e6e7079504b01022d032d0000000800000021001553e4fa4e000000900000000a00000000000000"
      "00000000800126010000616374696f6e2e6e7079504b05060000000003000300ba000000b00100000000");
  TempDir dir;
  for (const std::string* bytes : {&stored, &deflated}) {
    const std::string path = dir.file("python.npz");
    write_bytes(path, *bytes);
    const NamedTensors arrays = load_npz(path);
    ASSERT_EQ(arrays.size(), 3u);
    EXPECT_EQ(arrays[0].first, "observation.state");
    expect_same(arrays[0].second, from_vector({1.f, 2.f, 3.f, 4.f}, {2, 2}));
    expect_same(arrays.at("episode_index"), from_vector(std::vector<double>{7, 7}, {2}));
    expect_same(arrays.at("action"), from_vector(std::vector<double>{0.5, -0.5}, {2, 1}));
    const Episodes ep = load_lerobot_npz(path);
    EXPECT_EQ(ep.episode_starts, (std::vector<int64_t>{0, 2}));
  }
}

TEST(Npz, SaveFailsCleanlyWhenTheDirectoryIsMissing) {
  TempDir dir;
  NamedTensors arrays;
  arrays.insert("a", zeros({2}));
  const std::string path = dir.file("missing/a.npz");
  expect_error([&] { save_npz(path, arrays); }, {path});
  EXPECT_TRUE(dir.entries().empty());
}

TEST(Npz, RejectsBadArchives) {
  TempDir dir;
  const std::string not_zip = dir.file("not_zip.npz");
  write_bytes(not_zip, "this is not a zip archive at all, just some text bytes");
  expect_error([&] { load_npz(not_zip); }, {not_zip, "not an .npz"});
  const std::string empty = dir.file("empty.npz");
  write_bytes(empty, "");
  expect_error([&] { load_npz(empty); }, {empty, "empty file"});
  expect_error([&] { load_npz(dir.file("absent.npz")); }, {"absent.npz", "cannot open"});

  const std::string other = dir.file("other.npz");
  write_zip(other, {{"a.npy", serialize_npy(zeros({1}))}, {"notes.txt", "hello"}}, ZIP_CM_STORE);
  expect_error([&] { load_npz(other); }, {other, "'notes.txt'", "not a .npy"});

  const std::string broken = dir.file("broken.npz");
  write_zip(
      broken,
      {{"good.npy", serialize_npy(zeros({1}))},
       {"bad.npy", npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", "1234")}},
      ZIP_CM_STORE);
  expect_error([&] { load_npz(broken); }, {broken, "array 'bad'", "needs 12 bytes"});

  // Python's zipfile writes a repeated member name; libzip refuses to create one, so rename the
  // second member in the bytes (local header and central directory alike).
  const std::string twice = dir.file("twice.npz");
  write_zip(twice, {{"a.npy", serialize_npy(zeros({1}))}, {"b.npy", serialize_npy(zeros({1}))}},
            ZIP_CM_STORE);
  std::string bytes = read_bytes(twice);
  for (size_t at = bytes.find("b.npy"); at != std::string::npos; at = bytes.find("b.npy", at))
    bytes[at] = 'a';
  write_bytes(twice, bytes);
  expect_error([&] { load_npz(twice); }, {twice, "two members with the same name"});
}

TEST(Npz, TruncatedAndCorruptedArchivesRaiseErrors) {
  TempDir dir;
  NamedTensors arrays;
  arrays.insert("a", from_vector({1.f, 2.f}, {2}));
  arrays.insert("b", from_vector(std::vector<bool>{true}, {1}));
  const std::string source = dir.file("source.npz");
  save_npz(source, arrays);
  const std::string good = read_bytes(source);
  const std::string deflated_path = dir.file("deflated.npz");
  write_zip(deflated_path, {{"a.npy", serialize_npy(zeros({64}))}}, ZIP_CM_DEFLATE);
  const std::string deflated = read_bytes(deflated_path);
  const std::string path = dir.file("t.npz");
  for (const std::string* bytes : {&good, &deflated}) {
    for (size_t n = 0; n < bytes->size(); ++n) {
      write_bytes(path, bytes->substr(0, n));
      EXPECT_THROW(load_npz(path), Error) << "prefix of " << n << " bytes";
    }
    for (size_t i = 0; i < bytes->size(); ++i) {
      std::string bad = *bytes;
      bad[i] = static_cast<char>(bad[i] ^ 0xFF);
      write_bytes(path, bad);
      try {
        load_npz(path);
      } catch (const Error&) {
      }
    }
  }
}

// ---- LeRobot ----

// Three episodes of lengths 1, 4 and 7. Frame t of episode e has state
// [100e + t, -(100e + t)] and action [100e + t + 0.5, 1000 + 100e + t, 7], so every value in a
// window names the frame it came from.
constexpr int64_t kLengths[] = {1, 4, 7};

float state_value(int64_t e, int64_t t, int64_t d) {
  return d == 0 ? static_cast<float>(100 * e + t) : -static_cast<float>(100 * e + t);
}
float action_value(int64_t e, int64_t t, int64_t d) {
  return d == 0   ? static_cast<float>(100 * e + t) + 0.5f
         : d == 1 ? static_cast<float>(1000 + 100 * e + t)
                  : 7.f;
}

// The arrays as LeRobot would export them, with episode indices 5, 6, 9 and an integer dtype.
std::vector<std::pair<std::string, std::string>> lerobot_members() {
  std::vector<float> state;
  std::vector<double> action;
  std::vector<int64_t> index;
  const int64_t ids[] = {5, 6, 9};
  for (int64_t e = 0; e < 3; ++e)
    for (int64_t t = 0; t < kLengths[e]; ++t) {
      for (int64_t d = 0; d < 2; ++d) state.push_back(state_value(e, t, d));
      for (int64_t d = 0; d < 3; ++d) action.push_back(action_value(e, t, d));
      index.push_back(ids[e]);
    }
  const auto n = static_cast<int64_t>(index.size());
  return {{"observation.state", serialize_npy(from_vector(state, {n, 2}))},
          {"action", serialize_npy(from_vector(action, {n, 3}))},
          {"episode_index", serialize_npy_int64(index, {n})},
          {"timestamp", serialize_npy(zeros({n}))}};
}

TEST(LeRobot, LoadsEpisodes) {
  TempDir dir;
  const std::string path = dir.file("demo.npz");
  save_npz_members(path, lerobot_members());
  const Episodes ep = load_lerobot_npz(path);
  EXPECT_EQ(ep.episode_starts, (std::vector<int64_t>{0, 1, 5, 12}));
  EXPECT_EQ(ep.num_episodes(), 3);
  EXPECT_EQ(ep.num_frames(), 12);
  EXPECT_EQ(ep.state_dim(), 2);
  EXPECT_EQ(ep.act_dim(), 3);
  EXPECT_EQ(ep.episode_length(2), 7);
  EXPECT_EQ(ep.states.dtype(), DType::f32);
  EXPECT_EQ(ep.actions.dtype(), DType::f32);
  const std::vector<float> s = ep.states.to_vector<float>(), a = ep.actions.to_vector<float>();
  int64_t f = 0;
  for (int64_t e = 0; e < 3; ++e)
    for (int64_t t = 0; t < kLengths[e]; ++t, ++f) {
      for (int64_t d = 0; d < 2; ++d) EXPECT_EQ(s[f * 2 + d], state_value(e, t, d));
      for (int64_t d = 0; d < 3; ++d) EXPECT_EQ(a[f * 3 + d], action_value(e, t, d));
    }
  // load_episodes dispatches on the extension.
  EXPECT_EQ(load_episodes(path).episode_starts, ep.episode_starts);
}

// A LeRobot export holds more than the three arrays a policy needs: task strings, images, a
// README. Those are skipped unread (they used to be parsed, so a string array refused the file
// and an image array was converted to float64 in memory).
TEST(LeRobot, SkipsTheArraysItDoesNotUseUnread) {
  TempDir dir;
  std::vector<std::pair<std::string, std::string>> members;
  for (auto& [name, bytes] : lerobot_members()) members.emplace_back(name + ".npy", bytes);
  members.emplace_back("task.npy", npy_bytes("{'descr': '<U9', 'fortran_order': False, "
                                             "'shape': (12,), }",
                                             std::string(12 * 36, '\0')));
  members.emplace_back("README.txt", "not an array");
  const std::string path = dir.file("with_extras.npz");
  write_zip(path, members, ZIP_CM_DEFLATE);
  const std::string plain = dir.file("plain.npz");
  save_npz_members(plain, lerobot_members());
  const Episodes ep = load_lerobot_npz(path), expected = load_lerobot_npz(plain);
  EXPECT_EQ(ep.episode_starts, expected.episode_starts);
  expect_same(ep.states, expected.states);
  expect_same(ep.actions, expected.actions);
  // All arrays, as load_npz reads them by default, includes the ones it cannot read.
  expect_error([&] { load_npz(path); }, {path, "array 'task'", "unsupported dtype"});
  const NamedTensors picked = load_npz(path, {"action", "timestamp"});
  EXPECT_EQ(picked.size(), 2u);
  EXPECT_EQ(picked.at("timestamp").shape(), (Shape{12}));
  // A missing one is named with every member of the archive.
  members.erase(members.begin() + 1);  // action.npy
  write_zip(path, members, ZIP_CM_STORE);
  expect_error([&] { load_lerobot_npz(path); },
               {path, "missing key 'action'",
                "'observation.state', 'episode_index', 'timestamp', 'task', 'README.txt'"});
}

TEST(LeRobot, SaveRoundTrips) {
  TempDir dir;
  const std::string src = dir.file("demo.npz");
  save_npz_members(src, lerobot_members());
  const Episodes ep = load_lerobot_npz(src);
  const std::string path = dir.file("copy.NPZ");
  save_lerobot_npz(path, ep);
  const Episodes back = load_episodes(path);
  EXPECT_EQ(back.episode_starts, ep.episode_starts);
  expect_same(back.states, ep.states);
  expect_same(back.actions, ep.actions);
  // episode_index is written as int64 numbered from 0.
  const std::string bytes = read_bytes(path);
  EXPECT_NE(bytes.find("'descr': '<i8'"), std::string::npos);
  EXPECT_EQ(load_npz(path).at("episode_index").to_vector<double>(),
            (std::vector<double>{0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2}));
}

TEST(LeRobot, WindowsMatchNaiveIndexingForEverySample) {
  TempDir dir;
  const std::string path = dir.file("demo.npz");
  save_npz_members(path, lerobot_members());
  const Episodes ep = load_lerobot_npz(path);
  const int64_t n_obs = 2, horizon = 5;
  const WindowSampler sampler(ep, n_obs, horizon, 123);
  ASSERT_EQ(sampler.num_frames(), 12);

  std::vector<int64_t> all(12);
  for (int64_t i = 0; i < 12; ++i) all[i] = i;
  const Batch b = sampler.get(all);
  ASSERT_EQ(b.state.shape(), (Shape{12, n_obs, 2}));
  ASSERT_EQ(b.action.shape(), (Shape{12, horizon, 3}));
  ASSERT_EQ(b.action_is_pad.shape(), (Shape{12, horizon}));
  ASSERT_EQ(b.state.dtype(), DType::f32);
  ASSERT_EQ(b.action_is_pad.dtype(), DType::boolean);
  const std::vector<float> st = b.state.to_vector<float>(), ac = b.action.to_vector<float>();
  const std::vector<bool> pad = b.action_is_pad.to_vector<bool>();

  int64_t i = 0;
  for (int64_t e = 0; e < 3; ++e)
    for (int64_t t = 0; t < kLengths[e]; ++t, ++i) {
      SCOPED_TRACE("episode " + std::to_string(e) + " t " + std::to_string(t));
      for (int64_t k = 0; k < n_obs; ++k) {
        const int64_t src = std::clamp<int64_t>(t - n_obs + 1 + k, 0, kLengths[e] - 1);
        for (int64_t d = 0; d < 2; ++d)
          EXPECT_EQ(st[(i * n_obs + k) * 2 + d], state_value(e, src, d)) << "obs step " << k;
      }
      for (int64_t k = 0; k < horizon; ++k) {
        const int64_t want = t - n_obs + 1 + k;
        const int64_t src = std::clamp<int64_t>(want, 0, kLengths[e] - 1);
        EXPECT_EQ(pad[i * horizon + k], want < 0 || want >= kLengths[e]) << "action step " << k;
        for (int64_t d = 0; d < 3; ++d)
          EXPECT_EQ(ac[(i * horizon + k) * 3 + d], action_value(e, src, d)) << "action step " << k;
      }
    }

  // Spot checks written out by hand: the 1-frame episode, and both ends of the 4-frame one.
  auto pads = [&](int64_t sample) {
    return std::vector<bool>(pad.begin() + sample * horizon, pad.begin() + (sample + 1) * horizon);
  };
  EXPECT_EQ(pads(0), (std::vector<bool>{true, false, true, true, true}));
  EXPECT_EQ(pads(1), (std::vector<bool>{true, false, false, false, false}));
  EXPECT_EQ(pads(4), (std::vector<bool>{false, false, true, true, true}));
  EXPECT_EQ(pads(5), (std::vector<bool>{true, false, false, false, false}));
  EXPECT_EQ(pads(8), (std::vector<bool>{false, false, false, false, false}));
  EXPECT_EQ(pads(11), (std::vector<bool>{false, false, true, true, true}));
  EXPECT_EQ(st[(1 * n_obs + 0) * 2], 100.f);  // episode 1, t 0: the first frame repeated
  EXPECT_EQ(st[(1 * n_obs + 1) * 2], 100.f);
  EXPECT_EQ(ac[(4 * horizon + 4) * 3], 103.5f);  // episode 1, t 3: clamped to its last frame

  // get() follows the order asked for, repeats included.
  const Batch some = sampler.get({11, 0, 11});
  const std::vector<float> s2 = some.state.to_vector<float>();
  EXPECT_EQ(s2[0 * n_obs * 2 + 2], 206.f);
  EXPECT_EQ(s2[1 * n_obs * 2 + 2], 0.f);
  EXPECT_EQ(s2[2 * n_obs * 2 + 2], 206.f);
  EXPECT_EQ(sampler.get({}).state.shape(), (Shape{0, n_obs, 2}));
}

TEST(LeRobot, RejectsBadArrays) {
  const std::string what = "demo.npz";
  auto arrays = [](Tensor state, Tensor action, Tensor index) {
    NamedTensors a;
    if (state.defined()) a.insert("observation.state", state);
    if (action.defined()) a.insert("action", action);
    if (index.defined()) a.insert("episode_index", index);
    return a;
  };
  const auto idx = [](std::vector<double> v) {
    const auto n = static_cast<int64_t>(v.size());
    return from_vector(v, {n});
  };
  const Tensor s4 = zeros({4, 2}), a4 = zeros({4, 3});
  expect_error(
      [&] {
        load_lerobot_arrays(arrays(s4, Tensor(), idx({0, 0, 1, 1})), what);
      },
      {what, "missing key 'action'", "'observation.state'", "'episode_index'"});
  expect_error(
      [&] {
        load_lerobot_arrays(arrays(zeros({4}), a4, idx({0, 0, 1, 1})), what);
      },
      {what, "'observation.state' must be (N, dim)", "(4,)"});
  expect_error(
      [&] {
        load_lerobot_arrays(arrays(s4, zeros({5, 3}), idx({0, 0, 1, 1})), what);
      },
      {what, "number of frames", "has 5"});
  expect_error(
      [&] {
        load_lerobot_arrays(arrays(s4, a4, idx({0, 0, 1, 0})), what);
      },
      {what, "value 0 reappears at frame 3", "contiguous"});
  expect_error(
      [&] {
        load_lerobot_arrays(arrays(s4, a4, idx({0, 0.5, 1, 1})), what);
      },
      {"'episode_index'[1] = 0.5 is not an integer"});
  expect_error(
      [&] {
        load_lerobot_arrays(arrays(zeros({0, 2}), zeros({0, 3}), idx({})), what);
      },
      {what, "empty"});
  expect_error(
      [&] {
        load_lerobot_arrays(arrays(zeros({4, 2}, DType::boolean), a4, idx({0, 0, 1, 1})), what);
      },
      {"must be numeric", "bool"});
  expect_error(
      [&] {
        load_lerobot_arrays(arrays(s4, zeros({4, 0}), idx({0, 0, 1, 1})), what);
      },
      {"'action' has no features"});
  Tensor nan_state = zeros({4, 2});
  nan_state.data<float>()[5] = NAN;
  expect_error(
      [&] {
        load_lerobot_arrays(arrays(nan_state, a4, idx({0, 0, 1, 1})), what);
      },
      {"observation.state[2, 1]", "finite"});
  // Float episode indices and a single episode are fine.
  const Episodes one = load_lerobot_arrays(arrays(s4, a4, idx({3, 3, 3, 3})), what);
  EXPECT_EQ(one.episode_starts, (std::vector<int64_t>{0, 4}));

  Episodes bad = one;
  bad.episode_starts = {0, 2, 2, 4};
  expect_error([&] { validate_episodes(bad, "x"); }, {"episode 1 is empty"});
  TempDir dir;
  expect_error([&] { save_lerobot_npz(dir.file("bad.npz"), bad); }, {"bad.npz", "episode 1"});
  expect_error([&] { load_episodes(dir.file("data.csv")); }, {"unknown dataset format '.csv'"});
}

// ---- robomimic HDF5 ----

// Writes HDF5 files with the C API; every handle is closed before the file is used.
class H5Writer {
 public:
  explicit H5Writer(const std::string& path)
      : file_(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT)) {
    if (file_ < 0) throw std::runtime_error("H5Fcreate failed: " + path);
  }
  ~H5Writer() { H5Fclose(file_); }
  void group(const std::string& path) {
    const hid_t g = H5Gcreate2(file_, path.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (g < 0) throw std::runtime_error("H5Gcreate2 failed: " + path);
    H5Gclose(g);
  }
  // cols == 0 writes a rank-1 (rows,) dataset.
  void dataset(const std::string& path, hsize_t rows, hsize_t cols,
               const std::vector<double>& values, hid_t file_type = H5T_IEEE_F32LE) {
    const hsize_t dims[2] = {rows, cols};
    const hid_t space = H5Screate_simple(cols == 0 ? 1 : 2, dims, nullptr);
    const hid_t d =
        H5Dcreate2(file_, path.c_str(), file_type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (d < 0) throw std::runtime_error("H5Dcreate2 failed: " + path);
    if (!values.empty())
      H5Dwrite(d, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data());
    H5Dclose(d);
    H5Sclose(space);
  }

 private:
  hid_t file_;
};

double pos_value(int64_t demo, int64_t t, int64_t d) {
  return 100.0 * demo + t + 0.5 * d;
}
double vel_value(int64_t demo, int64_t t) {
  return -(100.0 * demo + t);
}
double act_value(int64_t demo, int64_t t, int64_t d) {
  return 1000.0 * demo + t + 0.25 * d;
}

struct DemoSpec {
  int64_t number, length;
  bool with_vel = true;
  int64_t vel_length = -1;  // defaults to length
  bool with_actions = true;
};

// data/demo_<i> with obs/pos (T, 2) float32, obs/vel (T, 1) float64 and actions (T, 3) float64.
void write_robomimic(const std::string& path, const std::vector<DemoSpec>& demos) {
  H5Writer w(path);
  w.group("data");
  w.group("mask");  // robomimic's filter-key group, ignored
  w.group("data/env_meta");
  for (const DemoSpec& demo : demos) {
    const std::string g = "data/demo_" + std::to_string(demo.number);
    const int64_t len = demo.length;
    w.group(g);
    w.group(g + "/obs");
    std::vector<double> pos, vel, act;
    const int64_t vel_len = demo.vel_length < 0 ? len : demo.vel_length;
    for (int64_t t = 0; t < len; ++t) {
      for (int64_t d = 0; d < 2; ++d) pos.push_back(pos_value(demo.number, t, d));
      for (int64_t d = 0; d < 3; ++d) act.push_back(act_value(demo.number, t, d));
    }
    for (int64_t t = 0; t < vel_len; ++t) vel.push_back(vel_value(demo.number, t));
    w.dataset(g + "/obs/pos", len, 2, pos);
    if (demo.with_vel) w.dataset(g + "/obs/vel", vel_len, 1, vel, H5T_IEEE_F64LE);
    w.dataset(g + "/obs/image_like", len, 0, std::vector<double>(len, 0.0));
    if (demo.with_actions) w.dataset(g + "/actions", len, 3, act, H5T_IEEE_F64BE);
  }
}

TEST(Robomimic, LoadsDemosInNumericOrderAndConcatenatesObsKeys) {
  TempDir dir;
  const std::string path = dir.file("demo.hdf5");
  // Written (and listed by HDF5) in the lexical order demo_0, demo_1, demo_10, demo_2.
  write_robomimic(path, {{0, 2}, {1, 3}, {10, 4}, {2, 1}});
  const Episodes ep = load_robomimic_hdf5(path, {"pos", "vel"});
  EXPECT_EQ(ep.episode_starts, (std::vector<int64_t>{0, 2, 5, 6, 10}));
  ASSERT_EQ(ep.states.shape(), (Shape{10, 3}));
  ASSERT_EQ(ep.actions.shape(), (Shape{10, 3}));
  const std::vector<float> s = ep.states.to_vector<float>(), a = ep.actions.to_vector<float>();
  int64_t f = 0;
  for (const auto& [demo, len] :
       std::vector<std::pair<int64_t, int64_t>>{{0, 2}, {1, 3}, {2, 1}, {10, 4}})
    for (int64_t t = 0; t < len; ++t, ++f) {
      SCOPED_TRACE("demo " + std::to_string(demo) + " t " + std::to_string(t));
      EXPECT_EQ(s[f * 3 + 0], static_cast<float>(pos_value(demo, t, 0)));
      EXPECT_EQ(s[f * 3 + 1], static_cast<float>(pos_value(demo, t, 1)));
      EXPECT_EQ(s[f * 3 + 2], static_cast<float>(vel_value(demo, t)));
      for (int64_t d = 0; d < 3; ++d)
        EXPECT_EQ(a[f * 3 + d], static_cast<float>(act_value(demo, t, d)));
    }

  // The order of obs_keys is the order of the features; rank-1 datasets count as one feature.
  const Episodes swapped = load_episodes(path, {"vel", "image_like", "pos"});
  ASSERT_EQ(swapped.states.shape(), (Shape{10, 4}));
  const std::vector<float> s2 = swapped.states.to_vector<float>();
  EXPECT_EQ(s2[0], static_cast<float>(vel_value(0, 0)));
  EXPECT_EQ(s2[1], 0.f);
  EXPECT_EQ(s2[2], static_cast<float>(pos_value(0, 0, 0)));
  EXPECT_EQ(s2[9 * 4 + 3], static_cast<float>(pos_value(10, 3, 1)));

  // The same file under .h5 goes through load_episodes with the default key "state".
  const std::string h5 = dir.file("demo.H5");
  fs::copy_file(path, h5);
  expect_error([&] { load_episodes(h5); }, {"demo_0", "no observation key 'state'", "'pos'"});
}

// Each read installs a fault handler for its file and puts back the one it replaced. Readers on
// two threads must take turns, or one puts back the other's handler, which then stays, naming a
// file long closed at any later fault (and, handing the fault back to itself, never ending).
TEST(Robomimic, ReadersOnTwoThreadsLeaveTheFaultHandlersAsTheyWere) {
  TempDir dir;
  const std::string path = dir.file("demo.hdf5");
  write_robomimic(path, {{0, 20}, {1, 30}, {2, 10}});
  struct sigaction before {};
  sigaction(SIGSEGV, nullptr, &before);
  const Episodes alone = load_robomimic_hdf5(path, {"pos", "vel"});
  std::vector<std::vector<float>> states(2);
  std::vector<std::string> errors(2);
  std::vector<std::thread> readers;
  for (size_t r = 0; r < 2; ++r)
    readers.emplace_back([&, r] {
      try {
        for (int i = 0; i < 50; ++i)
          states[r] = load_robomimic_hdf5(path, {"pos", "vel"}).states.to_vector<float>();
      } catch (const Error& e) {
        errors[r] = e.what();
      }
    });
  for (std::thread& t : readers) t.join();
  struct sigaction after {};
  sigaction(SIGSEGV, nullptr, &after);
  EXPECT_EQ(after.sa_handler, before.sa_handler);
  EXPECT_EQ(after.sa_sigaction, before.sa_sigaction);
  for (size_t r = 0; r < 2; ++r) {
    EXPECT_EQ(errors[r], "") << "reader " << r;
    EXPECT_EQ(states[r], alone.states.to_vector<float>()) << "reader " << r;
  }
}

// What an interrupted writer leaves: a dataset created but never written, and a chunked one
// with only its first chunk written. HDF5 would read both as zeros.
TEST(Robomimic, RejectsDatasetsThatWereNeverWritten) {
  TempDir dir;
  auto one_demo_without_actions = [](H5Writer& w) {
    w.group("data");
    w.group("data/demo_0");
    w.group("data/demo_0/obs");
    w.dataset("data/demo_0/obs/pos", 4, 2, std::vector<double>(8, 1.0));
  };
  const std::string unwritten = dir.file("unwritten.hdf5");
  {
    H5Writer w(unwritten);
    one_demo_without_actions(w);
    w.dataset("data/demo_0/actions", 4, 3, {});
  }
  expect_error([&] { load_robomimic_hdf5(unwritten, {"pos"}); },
               {unwritten, "'data/demo_0/actions' holds no stored data (never written"});

  const std::string partial = dir.file("partial.hdf5");
  {
    H5Writer w(partial);
    one_demo_without_actions(w);
  }
  {
    const hid_t file = H5Fopen(partial.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    const hsize_t dims[2] = {4, 3}, chunk[2] = {2, 3}, start[2] = {0, 0}, count[2] = {2, 3};
    const hid_t space = H5Screate_simple(2, dims, nullptr);
    const hid_t plist = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(plist, 2, chunk);
    const hid_t set = H5Dcreate2(file, "data/demo_0/actions", H5T_IEEE_F32LE, space, H5P_DEFAULT,
                                 plist, H5P_DEFAULT);
    const hid_t rows = H5Screate_simple(2, count, nullptr);
    H5Sselect_hyperslab(space, H5S_SELECT_SET, start, nullptr, count, nullptr);
    const std::vector<float> first(6, 2.0f);
    H5Dwrite(set, H5T_NATIVE_FLOAT, rows, space, H5P_DEFAULT, first.data());
    H5Sclose(rows);
    H5Dclose(set);
    H5Pclose(plist);
    H5Sclose(space);
    H5Fclose(file);
  }
  expect_error([&] { load_robomimic_hdf5(partial, {"pos"}); },
               {partial, "'data/demo_0/actions' is only partly stored (1 of its 2 chunks"});
}

// What h5py writes with compression="gzip" (robomimic's --compress), or for a resizable dataset
// a logger appends to: chunks, deflated, the last one sticking out past the extent. libhdf5
// reports such a complete dataset as "part allocated", and every one was refused as only partly
// stored.
TEST(Robomimic, ReadsCompressedDatasetsWithAPartialLastChunk) {
  TempDir dir;
  const std::string path = dir.file("gzip.hdf5");
  std::vector<float> actions(5 * 3);
  for (size_t i = 0; i < actions.size(); ++i) actions[i] = 0.25f * static_cast<float>(i) - 1.0f;
  {
    H5Writer w(path);
    w.group("data");
    w.group("data/demo_0");
    w.group("data/demo_0/obs");
    w.dataset("data/demo_0/obs/pos", 5, 2, std::vector<double>(10, 0.5));
  }
  for (const bool deflate : {true, false}) {
    const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    const char* name = "data/demo_0/actions";
    if (!deflate) H5Ldelete(file, name, H5P_DEFAULT);
    const hsize_t dims[2] = {5, 3}, chunk[2] = {2, 3};
    const hid_t space = H5Screate_simple(2, dims, nullptr);
    const hid_t plist = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(plist, 2, chunk);
    if (deflate) {
      H5Pset_shuffle(plist);
      H5Pset_deflate(plist, 4);
    }
    const hid_t set =
        H5Dcreate2(file, name, H5T_IEEE_F32LE, space, H5P_DEFAULT, plist, H5P_DEFAULT);
    H5Dwrite(set, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, actions.data());
    H5Dclose(set);
    H5Pclose(plist);
    H5Sclose(space);
    H5Fclose(file);
    SCOPED_TRACE(deflate ? "deflated" : "chunked");
    const Episodes e = load_robomimic_hdf5(path, {"pos"});
    EXPECT_EQ(e.actions.to_vector<float>(), actions);
  }
}

// tests/data/robomimic_wild_address.hdf5 is a 10 KB robomimic file (two demos of obs/pos,
// obs/vel and actions) with 8 bytes at offset 704 set to 0xff, as fuzz_hdf5_dataset found it:
// Debian 12's libhdf5 1.10.8 reads through that address and faults inside H5Fopen's callers.
// What cannot be caught in-process must at least name the file; a libhdf5 that refuses the
// file instead must do it through an mmdit::Error.
TEST(RobomimicDeathTest, AFileThatCrashesLibhdf5NamesTheFile) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const std::string path = std::string(MMDIT_TEST_DATA) + "/robomimic_wild_address.hdf5";
  // Killed by the signal, or exit 1 when AddressSanitizer's handler takes the fault after ours.
  const auto crashed_or_refused = [](int status) {
    return !WIFEXITED(status) || WEXITSTATUS(status) != 0;
  };
  EXPECT_EXIT(
      {
        try {
          load_episodes(path, {"pos", "vel"});
        } catch (const Error& e) {
          std::fprintf(stderr, "refused: %s\n", e.what());
          std::exit(3);
        }
        std::exit(0);
      },
      crashed_or_refused,
      "(mmdit: the HDF5 library crashed reading .*/robomimic_wild_address.hdf5: the file is "
      "malformed|refused: .*/robomimic_wild_address.hdf5)");
}

TEST(Robomimic, RejectsBadFiles) {
  TempDir dir;
  // HDF5's own reason reaches the message (its printing to stderr is off).
  const std::string truncated = dir.file("truncated.hdf5");
  write_robomimic(truncated, {{0, 2}});
  write_bytes(truncated, read_bytes(truncated).substr(0, 3000));
  expect_error([&] { load_robomimic_hdf5(truncated, {"pos"}); },
               {truncated, "cannot open the HDF5 file (HDF5: truncated file"});
  const std::string missing_key = dir.file("missing_key.hdf5");
  write_robomimic(missing_key, {{0, 2}, {1, 2}, {2, 3, /*with_vel=*/false}});
  expect_error(
      [&] {
        load_robomimic_hdf5(missing_key, {"pos", "vel"});
      },
      {missing_key, "demo 'demo_2'", "no observation key 'vel'",
       "obs keys present: 'image_like', 'pos'"});

  const std::string lengths = dir.file("lengths.hdf5");
  write_robomimic(lengths, {{0, 2}, {1, 4, true, /*vel_length=*/3}});
  expect_error(
      [&] {
        load_robomimic_hdf5(lengths, {"pos", "vel"});
      },
      {lengths, "demo 'demo_1'", "'data/demo_1/obs/vel' has 3 frames", "actions have 4"});

  const std::string no_actions = dir.file("no_actions.hdf5");
  write_robomimic(no_actions, {{0, 2}, {3, 2, true, -1, /*with_actions=*/false}});
  expect_error([&] { load_robomimic_hdf5(no_actions, {"pos"}); },
               {no_actions, "demo 'demo_3'", "no 'actions'"});

  const std::string zero = dir.file("zero.hdf5");
  write_robomimic(zero, {{0, 2}, {1, 0}});
  expect_error([&] { load_robomimic_hdf5(zero, {"pos"}); }, {"demo 'demo_1' has no frames"});

  const std::string no_data = dir.file("no_data.hdf5");
  {
    H5Writer w(no_data);
    w.group("mask");
  }
  expect_error([&] { load_robomimic_hdf5(no_data, {"pos"}); },
               {no_data, "no 'data' group", "'mask'"});

  const std::string no_demos = dir.file("no_demos.hdf5");
  {
    H5Writer w(no_demos);
    w.group("data");
    w.group("data/demo_x");
  }
  expect_error([&] { load_robomimic_hdf5(no_demos, {"pos"}); }, {"no demo_<i> groups"});

  const std::string bad_types = dir.file("bad_types.hdf5");
  {
    H5Writer w(bad_types);
    w.group("data");
    w.group("data/demo_0");
    w.group("data/demo_0/obs");
    w.dataset("data/demo_0/obs/pos", 2, 1, {1, 2}, H5T_STD_I32LE);
    w.dataset("data/demo_0/obs/name", 2, 1, {}, H5T_C_S1);
    w.dataset("data/demo_0/actions", 2, 1, {1, 2});
  }
  // Integers are numbers too (as in the LeRobot loader); strings are not.
  EXPECT_EQ(load_robomimic_hdf5(bad_types, {"pos"}).states.to_vector<float>(),
            (std::vector<float>{1, 2}));
  expect_error([&] { load_robomimic_hdf5(bad_types, {"name"}); },
               {"'data/demo_0/obs/name' is not numeric"});

  const std::string dims = dir.file("dims.hdf5");
  {
    H5Writer w(dims);
    w.group("data");
    for (int i : {0, 1}) {
      const std::string g = "data/demo_" + std::to_string(i);
      w.group(g);
      w.group(g + "/obs");
      w.dataset(g + "/obs/pos", 2, 1 + i, std::vector<double>(2 * (1 + i), 0.0));
      w.dataset(g + "/actions", 2, 1, {1, 2});
    }
  }
  expect_error([&] { load_robomimic_hdf5(dims, {"pos"}); },
               {"demo 'demo_1'", "'pos' has 2 dimensions", "'demo_0' has 1"});

  const std::string text = dir.file("text.hdf5");
  write_bytes(text, "definitely not HDF5\n");
  expect_error([&] { load_robomimic_hdf5(text, {"pos"}); }, {text, "not an HDF5 file"});
  expect_error([&] { load_robomimic_hdf5(dir.file("absent.hdf5"), {"pos"}); },
               {"absent.hdf5", "cannot open"});
  expect_error([&] { load_robomimic_hdf5(missing_key, {}); }, {"no observation keys"});
  expect_error([&] { load_robomimic_hdf5(missing_key, {"pos", "pos"}); }, {"given twice"});

  // A truncated HDF5 file is reported, not crashed on.
  const std::string good = read_bytes(missing_key);
  const std::string cut = dir.file("cut.hdf5");
  for (size_t n : {size_t{0}, size_t{8}, size_t{100}, good.size() / 2, good.size() - 1}) {
    write_bytes(cut, good.substr(0, n));
    EXPECT_THROW(load_robomimic_hdf5(cut, {"pos"}), Error) << n;
  }
}

// Files that libhdf5 opens but cannot read as they stand: the message says why, in the file's
// own terms, not only that it failed.
TEST(Robomimic, SaysWhyAMemberCannotBeRead) {
  TempDir dir;
  const std::string links = dir.file("links.hdf5");
  write_robomimic(links, {{0, 2}});
  {
    const hid_t file = H5Fopen(links.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(file, 0);
    ASSERT_GE(H5Lcreate_soft("/data/nowhere", file, "data/demo_1", H5P_DEFAULT, H5P_DEFAULT), 0);
    ASSERT_GE(H5Lcreate_external("absent.hdf5", "/data/demo_0", file, "data/demo_2", H5P_DEFAULT,
                                 H5P_DEFAULT),
              0);
    H5Fclose(file);
  }
  expect_error([&] { load_robomimic_hdf5(links, {"pos"}); },
               {links, "cannot open 'data/demo_1', a soft link to '/data/nowhere'"});
  {
    const hid_t file = H5Fopen(links.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(H5Ldelete(file, "data/demo_1", H5P_DEFAULT), 0);
    H5Fclose(file);
  }
  expect_error([&] { load_robomimic_hdf5(links, {"pos"}); },
               {links,
                "cannot open 'data/demo_2', an external link to '/data/demo_0' in "
                "'absent.hdf5'",
                "(HDF5: unable to open"});

  // A filter this libhdf5 does not have (h5py's lzf, say): registered only while writing.
  const std::string filtered = dir.file("filtered.hdf5");
  constexpr H5Z_filter_t kFilter = 32000;
  const H5Z_class2_t pass_through = {
      H5Z_CLASS_T_VERS,
      kFilter,
      1,
      1,
      "stand-in",
      nullptr,
      nullptr,
      [](unsigned, size_t, const unsigned[], size_t bytes, size_t*, void**) { return bytes; }};
  ASSERT_GE(H5Zregister(&pass_through), 0);
  {
    const hid_t file = H5Fcreate(filtered.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    for (const char* g : {"data", "data/demo_0", "data/demo_0/obs"})
      H5Gclose(H5Gcreate2(file, g, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
    const hsize_t dims[2] = {2, 1};
    const hid_t space = H5Screate_simple(2, dims, nullptr);
    const hid_t plist = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(plist, 2, dims);
    H5Pset_filter(plist, kFilter, H5Z_FLAG_MANDATORY, 0, nullptr);
    const float values[2] = {1, 2};
    for (const char* name : {"data/demo_0/obs/pos", "data/demo_0/actions"}) {
      const hid_t set =
          H5Dcreate2(file, name, H5T_IEEE_F32LE, space, H5P_DEFAULT, plist, H5P_DEFAULT);
      ASSERT_GE(H5Dwrite(set, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, values), 0);
      H5Dclose(set);
    }
    H5Pclose(plist);
    H5Sclose(space);
    H5Fclose(file);
  }
  ASSERT_GE(H5Zunregister(kFilter), 0);
  expect_error([&] { load_robomimic_hdf5(filtered, {"pos"}); },
               {filtered, "cannot read 'data/demo_0/actions'",
                "(HDF5: required filter 'stand-in' is not registered)"});

  // A virtual dataset reads what its sources lack as zeros: refused, naming what it is.
  const std::string source = dir.file("source.hdf5"), virtual_file = dir.file("virtual.hdf5");
  write_robomimic(source, {{0, 2}});
  write_robomimic(virtual_file, {{0, 2}, {1, 2}});
  {
    const hid_t file = H5Fopen(virtual_file.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(H5Ldelete(file, "data/demo_1/actions", H5P_DEFAULT), 0);
    const hsize_t dims[2] = {2, 3};
    const hid_t space = H5Screate_simple(2, dims, nullptr);
    const hid_t plist = H5Pcreate(H5P_DATASET_CREATE);
    ASSERT_GE(H5Pset_virtual(plist, space, source.c_str(), "data/demo_0/actions", space), 0);
    const hid_t set = H5Dcreate2(file, "data/demo_1/actions", H5T_IEEE_F64LE, space, H5P_DEFAULT,
                                 plist, H5P_DEFAULT);
    ASSERT_GE(set, 0);
    H5Dclose(set);
    H5Pclose(plist);
    H5Sclose(space);
    H5Fclose(file);
  }
  expect_error([&] { load_robomimic_hdf5(virtual_file, {"pos"}); },
               {virtual_file, "'data/demo_1/actions' is a virtual dataset", "not supported"});
}

// Demos are ordered by number: a name whose number cannot be ordered is refused, not dropped.
TEST(Robomimic, RefusesDemoNumbersThatGiveNoOrder) {
  TempDir dir;
  const std::string path = dir.file("numbers.hdf5");
  write_robomimic(path, {{0, 2}, {7, 2}});
  const auto rename = [&](const char* from, const char* to) {
    const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(H5Lmove(file, from, file, to, H5P_DEFAULT, H5P_DEFAULT), 0);
    H5Fclose(file);
  };
  rename("data/demo_0", "data/demo_007");
  expect_error([&] { load_robomimic_hdf5(path, {"pos"}); },
               {path, "demos 'demo_007' and 'demo_7' have the same number"});
  rename("data/demo_007", "data/demo_99999999999999999999");
  expect_error([&] { load_robomimic_hdf5(path, {"pos"}); },
               {path, "demo 'demo_99999999999999999999' has a number too large"});
  rename("data/demo_99999999999999999999", "data/demo_9223372036854775807");
  EXPECT_EQ(load_robomimic_hdf5(path, {"pos"}).episode_starts, (std::vector<int64_t>{0, 2, 4}));
}

// ---- statistics ----

TEST(NormStats, MatchesNaiveLoops) {
  Rng rng(7);
  const int64_t n = 257, dim = 4;
  Tensor data = raw::add_scalar(rng.normal({n, dim}, DType::f64, 0, 3), 1000.0);
  double* p = data.data<double>();
  for (int64_t i = 0; i < n; ++i) p[i * dim + 2] = 5.0;  // a constant column: std 0
  for (const Tensor& input : {data, raw::to_dtype(data, DType::f32)}) {
    const NormStats stats = compute_stats(input);
    const std::vector<double> x = input.to_vector<double>();
    for (const Tensor* t : {&stats.min, &stats.max, &stats.mean, &stats.std}) {
      EXPECT_EQ(t->dtype(), DType::f32);
      EXPECT_EQ(t->shape(), (Shape{dim}));
    }
    for (int64_t j = 0; j < dim; ++j) {
      double lo = x[j], hi = x[j], sum = 0;
      for (int64_t i = 0; i < n; ++i) {
        lo = std::min(lo, x[i * dim + j]);
        hi = std::max(hi, x[i * dim + j]);
        sum += x[i * dim + j];
      }
      const double mean = sum / n;
      double sq = 0;
      for (int64_t i = 0; i < n; ++i) sq += (x[i * dim + j] - mean) * (x[i * dim + j] - mean);
      const double sd = std::sqrt(sq / n);
      EXPECT_EQ(stats.min.to_vector<float>()[j], static_cast<float>(lo));
      EXPECT_EQ(stats.max.to_vector<float>()[j], static_cast<float>(hi));
      EXPECT_FLOAT_EQ(stats.mean.to_vector<float>()[j], static_cast<float>(mean));
      EXPECT_FLOAT_EQ(stats.std.to_vector<float>()[j], static_cast<float>(sd));
    }
    EXPECT_EQ(stats.std.to_vector<float>()[2], 0.f);
  }
  expect_error([] { compute_stats(zeros({0, 3})); }, {"no rows"});
  expect_error([] { compute_stats(zeros({3})); }, {"(N, dim)"});
}

// ---- WindowSampler ----

Episodes small_episodes() {
  Episodes ep;
  const int64_t n = 12;
  std::vector<float> s(n), a(n * 2);
  for (int64_t i = 0; i < n; ++i) s[i] = static_cast<float>(i), a[2 * i] = a[2 * i + 1] = 0.5f * i;
  ep.states = from_vector(s, {n, 1});
  ep.actions = from_vector(a, {n, 2});
  ep.episode_starts = {0, 1, 5, 12};
  return ep;
}

TEST(WindowSampler, NextIsDeterministicAndCoversEachEpochOnce) {
  const Episodes ep = small_episodes();
  WindowSampler a(ep, 2, 3, 42), b(ep, 2, 3, 42), c(ep, 2, 3, 43);
  std::vector<std::vector<int64_t>> epochs;
  std::vector<int64_t> current;
  for (int step = 0; step < 30; ++step) {
    const std::vector<int64_t> ia = a.next_indices(4);
    EXPECT_EQ(ia, b.next_indices(4));
    current.insert(current.end(), ia.begin(), ia.end());
    if (current.size() == 12) {
      std::vector<int64_t> sorted = current;
      std::sort(sorted.begin(), sorted.end());
      for (int64_t i = 0; i < 12; ++i) EXPECT_EQ(sorted[i], i);  // each sample exactly once
      epochs.push_back(current);
      current.clear();
    }
  }
  ASSERT_EQ(epochs.size(), 10u);
  EXPECT_EQ(a.position(), (std::pair<int64_t, int64_t>{9, 12}));
  EXPECT_EQ(epochs[0], a.permutation(0));
  EXPECT_EQ(epochs[7], a.permutation(7));
  EXPECT_NE(epochs[0], epochs[1]);
  EXPECT_EQ(std::set<std::vector<int64_t>>(epochs.begin(), epochs.end()).size(), 10u);
  EXPECT_NE(a.permutation(0), c.permutation(0));

  // next() is get() of those indices.
  WindowSampler d(ep, 2, 3, 42);
  const Batch batch = d.next(4);
  const Batch expected = d.get(epochs[0]);
  expect_same(batch.state, raw::narrow(expected.state, 0, 0, 4));
  expect_same(batch.action, raw::narrow(expected.action, 0, 0, 4));
  expect_same(batch.action_is_pad, raw::narrow(expected.action_is_pad, 0, 0, 4));

  // Large permutations are permutations too.
  Episodes big;
  big.states = zeros({1000, 1});
  big.actions = zeros({1000, 1});
  big.episode_starts = {0, 1000};
  std::vector<int64_t> perm = WindowSampler(big, 1, 1, 5).permutation(3);
  std::sort(perm.begin(), perm.end());
  for (int64_t i = 0; i < 1000; ++i) ASSERT_EQ(perm[i], i);
}

// Every ordering of 4 samples is equally likely: over 24000 epochs each of the 24 appears about
// 1000 times (a chi-square of 23 degrees of freedom; 60 is exceeded with probability 3e-5, and
// the seeds are fixed). A biased shuffle, e.g. Sattolo's (j < i), which makes every epoch one
// cycle and so leaves no sample in place, reaches only 6 of them.
TEST(WindowSampler, EveryOrderingIsEquallyLikely) {
  Episodes four;
  four.states = zeros({4, 1});
  four.actions = zeros({4, 1});
  four.episode_starts = {0, 4};
  const WindowSampler sampler(four, 1, 1, 5);
  std::map<std::vector<int64_t>, int> counts;
  int fixed_points = 0;
  const int epochs = 24000;
  for (int64_t epoch = 0; epoch < epochs; ++epoch) {
    const std::vector<int64_t> perm = sampler.permutation(epoch);
    ++counts[perm];
    for (int64_t i = 0; i < 4; ++i) fixed_points += perm[i] == i;
  }
  EXPECT_EQ(counts.size(), 24u);
  double chi_square = 0;
  for (const auto& [perm, n] : counts) chi_square += (n - 1000.0) * (n - 1000.0) / 1000.0;
  EXPECT_LT(chi_square, 60) << counts.size() << " orderings";
  // A uniform permutation leaves one sample in place on average.
  EXPECT_NEAR(static_cast<double>(fixed_points) / epochs, 1.0, 0.05);
}

TEST(WindowSampler, DropsThePartialBatchAtTheEndOfAnEpoch) {
  WindowSampler s(small_episodes(), 1, 1, 9);
  const std::vector<int64_t> p0 = s.permutation(0), p1 = s.permutation(1);
  EXPECT_EQ(s.next_indices(5), std::vector<int64_t>(p0.begin(), p0.begin() + 5));
  EXPECT_EQ(s.next_indices(5), std::vector<int64_t>(p0.begin() + 5, p0.begin() + 10));
  EXPECT_EQ(s.position(), (std::pair<int64_t, int64_t>{0, 10}));
  EXPECT_EQ(s.next_indices(5), std::vector<int64_t>(p1.begin(), p1.begin() + 5));
  EXPECT_EQ(s.position(), (std::pair<int64_t, int64_t>{1, 5}));

  // A batch larger than the dataset is filled from whole fresh epochs.
  const std::vector<int64_t> big = s.next_indices(30);
  std::vector<int64_t> want;
  for (int64_t e : {2, 3}) {
    const std::vector<int64_t> p = s.permutation(e);
    want.insert(want.end(), p.begin(), p.end());
  }
  const std::vector<int64_t> p4 = s.permutation(4);
  want.insert(want.end(), p4.begin(), p4.begin() + 6);
  EXPECT_EQ(big, want);
  EXPECT_EQ(s.position(), (std::pair<int64_t, int64_t>{5, 0}));
  EXPECT_EQ(s.next(12).state.shape(), (Shape{12, 1, 1}));
  EXPECT_EQ(s.position(), (std::pair<int64_t, int64_t>{5, 12}));
}

TEST(WindowSampler, SetPositionRestoresTheExactStream) {
  const Episodes ep = small_episodes();
  WindowSampler a(ep, 2, 4, 1234);
  for (int i = 0; i < 7; ++i) a.next(5);
  const auto [epoch, offset] = a.position();
  std::vector<Batch> rest;
  for (int i = 0; i < 9; ++i) rest.push_back(a.next(5));

  WindowSampler b(ep, 2, 4, 1234);
  b.set_position(epoch, offset);
  for (int i = 0; i < 9; ++i) {
    const Batch batch = b.next(5);
    expect_same(batch.state, rest[i].state);
    expect_same(batch.action, rest[i].action);
    expect_same(batch.action_is_pad, rest[i].action_is_pad);
  }
  EXPECT_EQ(b.position(), a.position());
}

TEST(WindowSampler, RejectsBadArguments) {
  const Episodes ep = small_episodes();
  expect_error([&] { WindowSampler(ep, 0, 3, 0); }, {"n_obs_steps must be in [1,"});
  expect_error([&] { WindowSampler(ep, 2, 0, 0); }, {"horizon must be in [1,"});
  WindowSampler s(ep, 2, 3, 0);
  expect_error([&] { s.get({0, 12}); }, {"sample index 12 out of range [0, 12)"});
  expect_error([&] { s.get({-1}); }, {"sample index -1"});
  expect_error([&] { s.next(0); }, {"batch_size must be in [1, 1048576], got 0"});
  // Reserved before anything else: this was a bare std::bad_alloc.
  expect_error([&] { s.next(int64_t{1} << 40); },
               {"WindowSampler::next: batch_size must be in [1, 1048576], got 1099511627776"});
  expect_error([&] { s.set_position(0, 13); }, {"offset 13 out of range"});
  expect_error([&] { s.set_position(-1, 0); }, {"negative epoch"});
  Episodes bad = ep;
  bad.episode_starts = {0, 5, 11};
  expect_error([&] { WindowSampler(bad, 1, 1, 0); }, {"must end at N = 12"});
  bad.actions = zeros({11, 2});
  bad.episode_starts = {0, 12};
  expect_error([&] { WindowSampler(bad, 1, 1, 0); }, {"states have 12 frames but actions have 11"});
}

}  // namespace
}  // namespace mmdit
