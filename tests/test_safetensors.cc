#include "tensor/safetensors.h"

#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cfloat>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <iterator>
#include <limits>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "tensor/file_io.h"
#include "tensor/ops.h"
#include "tests/test_util.h"

namespace mmdit {
namespace {

using test::le_bytes;
using test::TempDir;

namespace fs = std::filesystem;

// ---- building files by hand ----
void append_u64(std::string& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

std::string make_file(const std::string& header, const std::string& data = "") {
  std::string out;
  append_u64(out, header.size());
  return out + header + data;
}

SafetensorsFile parse(const std::string& bytes) {
  return parse_safetensors(bytes.data(), bytes.size(), "bad.safetensors");
}

// Expects parsing to fail with a message naming the file and containing `needle`.
void expect_parse_error(const std::string& bytes, const std::string& needle) {
  try {
    parse(bytes);
    ADD_FAILURE() << "no error; expected one containing: " << needle;
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("bad.safetensors: "), std::string::npos) << msg;
    EXPECT_NE(msg.find(needle), std::string::npos)
        << "message: " << msg << "\nexpected: " << needle;
  }
}

// A header with one tensor entry.
std::string one_entry(const std::string& name, const std::string& body) {
  return "{\"" + name + "\":" + body + "}";
}

template <class T>
void expect_bitwise_equal(const Tensor& a, const Tensor& b) {
  ASSERT_EQ(a.dtype(), b.dtype());
  ASSERT_EQ(a.shape(), b.shape());
  const std::vector<T> va = a.to_vector<T>(), vb = b.to_vector<T>();
  ASSERT_EQ(va.size(), vb.size());
  for (size_t i = 0; i < va.size(); ++i) {
    if constexpr (std::is_same_v<T, bool>) {
      EXPECT_EQ(va[i], vb[i]) << i;
    } else {
      EXPECT_EQ(std::memcmp(&va[i], &vb[i], sizeof(T)), 0) << i << ": " << va[i] << " vs " << vb[i];
    }
  }
}

NamedTensors sample_tensors() {
  NamedTensors t;
  t.insert("w", from_vector({1.5f, -2.f, 3.25f, 0.f, -0.f, 1e-30f}, {2, 3}));
  t.insert("b", from_vector(std::vector<double>{0.1, -1e300, 4.9e-324}, {3}));
  t.insert("mask", from_vector(std::vector<bool>{true, false, true, true, false}, {5}));
  t.insert("s", scalar(7.5f));
  t.insert("e", zeros({0, 3}));
  t.insert("x", from_vector({9.f, 8.f, 7.f}, {3}));
  return t;
}

// ---- round trips ----
TEST(Safetensors, RoundTripThroughFile) {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  const NamedTensors saved = sample_tensors();
  const std::map<std::string, std::string> meta = {
      {"format", "pt"}, {"note", "h\xC3\xA9llo \"quoted\"\n"}, {"empty", ""}};
  save_safetensors(path, saved, meta);
  const SafetensorsFile loaded = load_safetensors(path);
  EXPECT_EQ(loaded.metadata, meta);
  ASSERT_EQ(loaded.tensors.size(), saved.size());
  for (const auto& [name, t] : saved) {
    ASSERT_TRUE(loaded.tensors.contains(name)) << name;
    const Tensor& l = loaded.tensors.at(name);
    switch (t.dtype()) {
      case DType::f32:
        expect_bitwise_equal<float>(t, l);
        break;
      case DType::f64:
        expect_bitwise_equal<double>(t, l);
        break;
      case DType::boolean:
        expect_bitwise_equal<bool>(t, l);
        break;
    }
  }
  EXPECT_EQ(loaded.tensors.at("s").dim(), 0);
  EXPECT_EQ(loaded.tensors.at("e").shape(), (Shape{0, 3}));
  // Data order: element size decreasing, insertion order within a dtype.
  std::vector<std::string> order;
  for (const auto& [name, t] : loaded.tensors) order.push_back(name);
  EXPECT_EQ(order, (std::vector<std::string>{"b", "w", "s", "e", "x", "mask"}));
}

TEST(Safetensors, RoundTripSpecialValuesBitwise) {
  const float f_inf = std::numeric_limits<float>::infinity();
  const double d_nan = std::numeric_limits<double>::quiet_NaN();
  NamedTensors t;
  t.insert("f", from_vector({f_inf, -f_inf, std::numeric_limits<float>::quiet_NaN(),
                             std::numeric_limits<float>::denorm_min(), -0.f},
                            {5}));
  t.insert("d", from_vector(std::vector<double>{d_nan, -0.0, 1e-310, -1e308}, {2, 2}));
  const SafetensorsFile loaded = parse(serialize_safetensors(t));
  expect_bitwise_equal<float>(t.at("f"), loaded.tensors.at("f"));
  expect_bitwise_equal<double>(t.at("d"), loaded.tensors.at("d"));
}

TEST(Safetensors, SingleDtypeKeepsInsertionOrder) {
  NamedTensors t;
  for (const char* name : {"z", "a", "m", "b.0.w", "b.0.b"}) t.insert(name, ones({2}));
  const SafetensorsFile loaded = parse(serialize_safetensors(t));
  std::vector<std::string> order;
  for (const auto& [name, x] : loaded.tensors) order.push_back(name);
  EXPECT_EQ(order, (std::vector<std::string>{"z", "a", "m", "b.0.w", "b.0.b"}));
}

TEST(Safetensors, EmptyFileAndEmptyMetadata) {
  const std::string bytes = serialize_safetensors(NamedTensors{});
  EXPECT_EQ(bytes.size() % 8, 0u);
  const SafetensorsFile loaded = parse(bytes);
  EXPECT_TRUE(loaded.tensors.empty());
  EXPECT_TRUE(loaded.metadata.empty());
  // Empty metadata is omitted, as the reference writer does with None.
  EXPECT_EQ(bytes.find("__metadata__"), std::string::npos);
}

TEST(Safetensors, NonContiguousInputsSavedInLogicalOrder) {
  const Tensor base = from_vector({0.f, 1.f, 2.f, 3.f, 4.f, 5.f}, {2, 3});
  NamedTensors t;
  t.insert("transposed", raw::transpose(base, 0, 1));                    // (3,2)
  t.insert("strided", raw::slice(arange(10, DType::f64), 0, 1, 10, 3));  // 1,4,7
  t.insert("broadcast", raw::broadcast_to(from_vector({5.f, 6.f}, {2}), {3, 2}));
  t.insert("narrowed", raw::narrow(base, 1, 1, 2));  // offset view
  ASSERT_FALSE(t.at("transposed").is_contiguous());
  ASSERT_FALSE(t.at("strided").is_contiguous());
  const SafetensorsFile loaded = parse(serialize_safetensors(t));
  EXPECT_EQ(loaded.tensors.at("transposed").shape(), (Shape{3, 2}));
  EXPECT_EQ(loaded.tensors.at("transposed").to_vector<float>(),
            (std::vector<float>{0, 3, 1, 4, 2, 5}));
  EXPECT_EQ(loaded.tensors.at("strided").to_vector<double>(), (std::vector<double>{1, 4, 7}));
  EXPECT_EQ(loaded.tensors.at("broadcast").to_vector<float>(),
            (std::vector<float>{5, 6, 5, 6, 5, 6}));
  EXPECT_EQ(loaded.tensors.at("narrowed").to_vector<float>(), (std::vector<float>{1, 2, 4, 5}));
}

// The exact bytes of the reference layout: metadata first, compact JSON padded with spaces to a
// multiple of 8, tensors back to back by decreasing element size with no gaps.
TEST(Safetensors, SerializedLayoutMatchesReferenceWriter) {
  NamedTensors t;
  t.insert("a", from_vector({1.f, 2.f, 3.f}, {3}));
  t.insert("c", from_vector(std::vector<bool>{true, false}, {2}));
  t.insert("b", from_vector(std::vector<double>{4.0}, {1, 1}));
  const std::string bytes = serialize_safetensors(t, {{"k", "v"}});
  std::string header =
      R"({"__metadata__":{"k":"v"},"b":{"dtype":"F64","shape":[1,1],"data_offsets":[0,8]},)"
      R"("a":{"dtype":"F32","shape":[3],"data_offsets":[8,20]},)"
      R"("c":{"dtype":"BOOL","shape":[2],"data_offsets":[20,22]}})";
  ASSERT_EQ(header.size(), 191u);
  header += " ";  // to 192, a multiple of 8, as the reference pads
  const std::string data = le_bytes(std::vector<double>{4.0}) +
                           le_bytes(std::vector<float>{1, 2, 3}) + std::string("\x01\x00", 2);
  EXPECT_EQ(bytes, make_file(header, data));
  // A header already 8-aligned (192 bytes) gets no padding.
  std::string aligned = header;
  aligned.pop_back();
  aligned.replace(aligned.find(R"("v")"), 3, R"("vv")");
  ASSERT_EQ(aligned.size(), 192u);
  EXPECT_EQ(serialize_safetensors(t, {{"k", "vv"}}), make_file(aligned, data));
}

// Stored as bfloat16: every float tensor, rounded to the nearest, ties to even (the bits below
// worked out by hand from the float32 bits), after the float32 and float64 tensors' 4 and 8 bytes
// would have gone, before the bools.
TEST(Safetensors, StoresFloatsAsBfloat16WhenAsked) {
  NamedTensors t;
  t.insert("flags", from_vector(std::vector<bool>{true}, {1}));
  // 1 (0x3F800000), 1 + 2^-8 (0x3F808000: a tie, to the even 0x3F80), 1 + 3 * 2^-8 (0x3F818000:
  // a tie, to the even 0x3F82), -2.5 (0xC0200000), infinity, a quiet NaN.
  t.insert("f", from_vector({1.f, 1.f + 0x1p-8f, 1.f + 3 * 0x1p-8f, -2.5f, INFINITY, NAN}, {2, 3}));
  // Float64, rounded once: 0.1 (0x3DCCCCCD in float32) up to 0x3DCD; 1 + 2^-8 + 2^-30 just
  // past the tie, up to 0x3F81 (through float32 it would round to the tie 0x3F808000, then to
  // the even 0x3F80); 1 + 2^-8, a tie, to the even 0x3F80.
  t.insert("d", from_vector(std::vector<double>{0.1, 1 + 0x1p-8 + 0x1p-30, 1 + 0x1p-8}, {3}));
  const std::string bytes = serialize_safetensors(t, {}, StoredFloats::bf16);
  std::string header = R"({"f":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},)"
                       R"("d":{"dtype":"BF16","shape":[3],"data_offsets":[12,18]},)"
                       R"("flags":{"dtype":"BOOL","shape":[1],"data_offsets":[18,19]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  const std::string data = le_bytes(std::vector<uint16_t>{0x3F80, 0x3F80, 0x3F82, 0xC020, 0x7F80,
                                                          0x7FC0, 0x3DCD, 0x3F81, 0x3F80}) +
                           std::string("\x01", 1);
  EXPECT_EQ(bytes, make_file(header, data));
  const SafetensorsFile back = parse_safetensors(bytes.data(), bytes.size(), "bf16");
  EXPECT_EQ(back.tensors.at("d").to_vector<float>(),
            (std::vector<float>{0x1.9Ap-4f, 1 + 0x1p-7f, 1}));

  NamedTensors huge;
  huge.insert("w", from_vector({1.f, FLT_MAX}, {2}));
  EXPECT_EQ(test::error_of([&] { serialize_safetensors(huge, {}, StoredFloats::bf16); }),
            "serialize_safetensors: tensor 'w' holds 3.40282e+38 at (1,), past bfloat16's range");
  NamedTensors wide;
  wide.insert("w", from_vector(std::vector<double>{1e300}, {1}));
  EXPECT_EQ(test::error_of([&] { serialize_safetensors(wide, {}, StoredFloats::bf16); }),
            "serialize_safetensors: tensor 'w' holds 1e+300 at (0,), past bfloat16's range");
}

TEST(Safetensors, SaveRejectsBadInput) {
  NamedTensors reserved;
  reserved.insert("__metadata__", ones({1}));
  EXPECT_THROW(serialize_safetensors(reserved), Error);
  NamedTensors undefined;
  undefined.insert("t", Tensor());
  EXPECT_THROW(serialize_safetensors(undefined), Error);
  NamedTensors bad_utf8;
  bad_utf8.insert("bad\xFF", ones({1}));
  EXPECT_EQ(test::error_of([&] { serialize_safetensors(bad_utf8); }),
            "serialize_safetensors: tensor name \"bad\xEF\xBF\xBD\" is not valid UTF-8");
  // The string at fault is named, and save_safetensors names the file, which it does not write.
  test::TempDir dir;
  const std::string path = dir.file("t.safetensors");
  EXPECT_EQ(test::error_of([&] { save_safetensors(path, undefined); }),
            path + ": not saved: serialize_safetensors: tensor 't' is undefined");
  EXPECT_EQ(test::error_of([&] {
              save_safetensors(path, NamedTensors{}, {{"note", "caf\xE9"}});
            }),
            path +
                ": not saved: serialize_safetensors: the value of metadata key \"note\" is "
                "not valid UTF-8: \"caf\xEF\xBF\xBD\"");
  EXPECT_EQ(test::error_of([&] {
              save_safetensors(path, NamedTensors{}, {{"k\xFF", "v"}});
            }),
            path +
                ": not saved: serialize_safetensors: metadata key \"k\xEF\xBF\xBD\" is not valid "
                "UTF-8");
  EXPECT_TRUE(dir.entries().empty());
}

// ---- other dtypes, from hand-built files ----
TEST(Safetensors, LoadsF16) {
  const std::vector<uint16_t> bits = {0x3C00, 0xC000, 0x7C00, 0xFC00, 0x0001, 0x8001,
                                      0x03FF, 0x0400, 0x7BFF, 0x8000, 0x3555, 0x0000};
  const std::string file = make_file(
      one_entry("h", R"({"dtype":"F16","shape":[12],"data_offsets":[0,24]})"), le_bytes(bits));
  const Tensor h = parse(file).tensors.at("h");
  ASSERT_EQ(h.dtype(), DType::f32);
  const std::vector<float> v = h.to_vector<float>();
  EXPECT_EQ(v[0], 1.0f);
  EXPECT_EQ(v[1], -2.0f);
  EXPECT_EQ(v[2], std::numeric_limits<float>::infinity());
  EXPECT_EQ(v[3], -std::numeric_limits<float>::infinity());
  EXPECT_EQ(v[4], std::ldexp(1.0f, -24));
  EXPECT_EQ(v[5], -std::ldexp(1.0f, -24));
  EXPECT_EQ(v[6], std::ldexp(1023.0f, -24));  // largest subnormal
  EXPECT_EQ(v[7], std::ldexp(1.0f, -14));     // smallest normal
  EXPECT_EQ(v[8], 65504.0f);                  // largest finite
  EXPECT_EQ(v[9], 0.0f);
  EXPECT_TRUE(std::signbit(v[9]));
  EXPECT_EQ(v[10], 0.333251953125f);
  EXPECT_FALSE(std::signbit(v[11]));
}

// Every one of the 65536 encodings against an independent decoding by formula.
TEST(Safetensors, F16AndBF16ConversionIsExactForEveryEncoding) {
  std::vector<uint16_t> all(65536);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i);
  const std::string header =
      R"({"h":{"dtype":"F16","shape":[65536],"data_offsets":[0,131072]},)"
      R"("b":{"dtype":"BF16","shape":[256,256],"data_offsets":[131072,262144]}})";
  const SafetensorsFile f = parse(make_file(header, le_bytes(all) + le_bytes(all)));
  const std::vector<float> h = f.tensors.at("h").to_vector<float>();
  const std::vector<float> b = f.tensors.at("b").to_vector<float>();
  for (uint32_t i = 0; i < 65536; ++i) {
    const double sign = (i & 0x8000) ? -1.0 : 1.0;
    {  // binary16: 5 exponent bits (bias 15), 10 mantissa bits
      const uint32_t e = (i >> 10) & 0x1F, m = i & 0x3FF;
      if (e == 0x1F && m != 0) {
        EXPECT_TRUE(std::isnan(h[i])) << std::hex << i;
      } else {
        const double want = e == 0x1F ? sign * INFINITY
                            : e == 0  ? sign * std::ldexp(m, -24)
                                      : sign * std::ldexp(1024 + m, static_cast<int>(e) - 25);
        EXPECT_EQ(static_cast<double>(h[i]), want) << std::hex << i;
        EXPECT_EQ(std::signbit(h[i]), sign < 0) << std::hex << i;
      }
    }
    {  // bfloat16: 8 exponent bits (bias 127), 7 mantissa bits
      const uint32_t e = (i >> 7) & 0xFF, m = i & 0x7F;
      if (e == 0xFF && m != 0) {
        EXPECT_TRUE(std::isnan(b[i])) << std::hex << i;
      } else {
        const double want = e == 0xFF ? sign * INFINITY
                            : e == 0  ? sign * std::ldexp(m, -133)
                                      : sign * std::ldexp(128 + m, static_cast<int>(e) - 134);
        EXPECT_EQ(static_cast<double>(b[i]), want) << std::hex << i;
        EXPECT_EQ(std::signbit(b[i]), sign < 0) << std::hex << i;
      }
    }
  }
  EXPECT_EQ(b[0x3F80], 1.0f);
  EXPECT_EQ(b[0xC000], -2.0f);
}

TEST(Safetensors, LoadsIntegersAsF64) {
  const int64_t two53 = int64_t{1} << 53;
  const std::string data =
      le_bytes(std::vector<int64_t>{0, -1, two53, -two53, 123456789012}) +                   // 40
      le_bytes(std::vector<uint64_t>{0, uint64_t{1} << 53}) +                                // 16
      le_bytes(std::vector<int32_t>{INT32_MIN, INT32_MAX}) +                                 // 8
      le_bytes(std::vector<uint32_t>{UINT32_MAX, 5}) +                                       // 8
      le_bytes(std::vector<int16_t>{INT16_MIN, INT16_MAX}) +                                 // 4
      le_bytes(std::vector<uint16_t>{UINT16_MAX, 0}) +                                       // 4
      le_bytes(std::vector<int8_t>{-128, 127}) + le_bytes(std::vector<uint8_t>{0, 255, 7});  // 5
  const std::string header = R"({"i64":{"dtype":"I64","shape":[5],"data_offsets":[0,40]},)"
                             R"("u64":{"dtype":"U64","shape":[2],"data_offsets":[40,56]},)"
                             R"("i32":{"dtype":"I32","shape":[2],"data_offsets":[56,64]},)"
                             R"("u32":{"dtype":"U32","shape":[2],"data_offsets":[64,72]},)"
                             R"("i16":{"dtype":"I16","shape":[2],"data_offsets":[72,76]},)"
                             R"("u16":{"dtype":"U16","shape":[2],"data_offsets":[76,80]},)"
                             R"("i8":{"dtype":"I8","shape":[2],"data_offsets":[80,82]},)"
                             R"("u8":{"dtype":"U8","shape":[3],"data_offsets":[82,85]}})";
  const SafetensorsFile f = parse(make_file(header, data));
  auto values = [&](const char* name) {
    EXPECT_EQ(f.tensors.at(name).dtype(), DType::f64) << name;
    return f.tensors.at(name).to_vector<double>();
  };
  const double d53 = 9007199254740992.0;
  EXPECT_EQ(values("i64"), (std::vector<double>{0, -1, d53, -d53, 123456789012.0}));
  EXPECT_EQ(values("u64"), (std::vector<double>{0, d53}));
  EXPECT_EQ(values("i32"), (std::vector<double>{-2147483648.0, 2147483647.0}));
  EXPECT_EQ(values("u32"), (std::vector<double>{4294967295.0, 5}));
  EXPECT_EQ(values("i16"), (std::vector<double>{-32768, 32767}));
  EXPECT_EQ(values("u16"), (std::vector<double>{65535, 0}));
  EXPECT_EQ(values("i8"), (std::vector<double>{-128, 127}));
  EXPECT_EQ(values("u8"), (std::vector<double>{0, 255, 7}));
  // File order is data order.
  EXPECT_EQ(f.tensors[0].first, "i64");
  EXPECT_EQ(f.tensors[7].first, "u8");
}

TEST(Safetensors, RejectsInexactInt64) {
  const std::string i64 = R"({"dtype":"I64","shape":[2],"data_offsets":[0,16]})";
  expect_parse_error(
      make_file(one_entry("big", i64), le_bytes(std::vector<int64_t>{1, (int64_t{1} << 53) + 1})),
      "tensor 'big': I64 value 9007199254740993 at element 1 is not exactly representable");
  expect_parse_error(make_file(one_entry("neg", i64), le_bytes(std::vector<int64_t>{INT64_MIN, 0})),
                     "tensor 'neg': I64 value -9223372036854775808 at element 0");
  expect_parse_error(make_file(one_entry("u", R"({"dtype":"U64","shape":[],"data_offsets":[0,8]})"),
                               le_bytes(std::vector<uint64_t>{UINT64_MAX})),
                     "tensor 'u': U64 value 18446744073709551615 at element 0");
}

TEST(Safetensors, BoolBytesMustBeZeroOrOne) {
  const std::string entry = R"({"dtype":"BOOL","shape":[3],"data_offsets":[0,3]})";
  const Tensor ok =
      parse(make_file(one_entry("m", entry), std::string("\x01\x00\x01", 3))).tensors.at("m");
  EXPECT_EQ(ok.to_vector<bool>(), (std::vector<bool>{true, false, true}));
  expect_parse_error(make_file(one_entry("m", entry), std::string("\x01\x02\x00", 3)),
                     "tensor 'm': BOOL byte at element 1 is 2 (must be 0 or 1)");
}

// ---- header validation ----
TEST(Safetensors, AcceptsPaddingGapsAndEmptyTensorsInsideRanges) {
  // Header padded with spaces (and a newline), a gap between tensors, trailing bytes, an empty
  // tensor whose offsets lie inside another's range, keys in any order.
  const std::string header = R"({"b":{"data_offsets":[16,20],"shape":[1],"dtype":"F32"},)"
                             R"("e":{"dtype":"F64","shape":[0,5],"data_offsets":[2,2]},)"
                             R"("a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}   )"
                             "\n  ";
  std::string data(24, '\0');
  const std::string one = le_bytes(std::vector<float>{1.f}),
                    two = le_bytes(std::vector<float>{2.f});
  data.replace(0, 4, one);
  data.replace(16, 4, two);
  const SafetensorsFile f = parse(make_file(header, data));
  ASSERT_EQ(f.tensors.size(), 3u);
  EXPECT_EQ(f.tensors[0].first, "a");
  EXPECT_EQ(f.tensors[1].first, "e");
  EXPECT_EQ(f.tensors[2].first, "b");
  EXPECT_EQ(f.tensors.at("a").item(), 1.0);
  EXPECT_EQ(f.tensors.at("b").item(), 2.0);
  EXPECT_EQ(f.tensors.at("e").shape(), (Shape{0, 5}));
}

TEST(Safetensors, RejectsBadFraming) {
  expect_parse_error("", "file is 0 bytes, too short");
  expect_parse_error(std::string("\x02\x00\x00", 3), "file is 3 bytes, too short");
  std::string too_long;
  append_u64(too_long, 100);
  expect_parse_error(too_long + "{}", "header length 100 exceeds the 2 bytes that follow it");
  std::string huge;
  append_u64(huge, 100'000'001);
  expect_parse_error(huge + "{}",
                     "not a safetensors file: its first 8 bytes give a header length "
                     "of 100000001, which exceeds the limit of 100000000 bytes");
  // The files a user keeps beside a checkpoint, given in its place, say what they seem to be.
  const std::string filler(64, 'x');
  for (const auto& [start, kind] : std::vector<std::pair<std::string, std::string>>{
           {std::string("PK\x03\x04\x14\x00\x00\x00", 8), "is a zip archive, e.g. an .npz dataset"},
           {"\x89HDF\r\n\x1a\n", "is an HDF5 file"},
           {std::string("\x93NUMPY\x01\x00", 8), "is a .npy array, or an Equinox .eqx model"},
           {"{\n  \"policy", "starts like a JSON file"},
           {"<svg xml", "starts like XML or SVG"}})
    expect_parse_error(start + filler, "not a safetensors file (it " + kind);
  std::string max;
  append_u64(max, UINT64_MAX);
  expect_parse_error(max + "{}", "exceeds the limit");
}

TEST(Safetensors, RejectsBadJson) {
  expect_parse_error(make_file(""), "header is not valid JSON");
  expect_parse_error(make_file("{\"a\":"), "header is not valid JSON");
  expect_parse_error(make_file("{} x"), "header is not valid JSON");
  expect_parse_error(make_file(std::string("{}\0\0", 4)),
                     "header is not valid JSON: NUL byte at header offset 2");
  expect_parse_error(make_file(std::string("{}\0x", 4)), "NUL byte");
  expect_parse_error(make_file("{\"\xFF\":1}"), "header is not valid JSON");  // invalid UTF-8
  expect_parse_error(make_file("[1,2]"), "header must be a JSON object, got array");
  expect_parse_error(make_file("\"x\""), "header must be a JSON object, got string");
  expect_parse_error(make_file(std::string(100000, '[')), "deeper than 64 levels");
  expect_parse_error(make_file(std::string(100000, '[') + std::string(100000, ']')),
                     "deeper than 64 levels");
}

TEST(Safetensors, RejectsBadEntries) {
  const std::string ok_data(24, '\0');
  // Expects an error naming the file and the tensor, containing `needle`.
  auto entry_error = [&](const std::string& body, const std::string& needle) {
    SCOPED_TRACE(body);
    expect_parse_error(make_file(one_entry("blocks.0.w", body), ok_data), needle);
    expect_parse_error(make_file(one_entry("blocks.0.w", body), ok_data), "tensor 'blocks.0.w': ");
  };
  entry_error("5", "entry must be a JSON object");
  entry_error("[]", "entry must be a JSON object");
  entry_error(R"({"shape":[2,3],"data_offsets":[0,24]})", "missing \"dtype\"");
  entry_error(R"({"dtype":"F32","data_offsets":[0,24]})", "missing \"shape\"");
  entry_error(R"({"dtype":"F32","shape":[2,3]})", "missing \"data_offsets\"");
  entry_error(R"({"dtype":5,"shape":[2,3],"data_offsets":[0,24]})",
              "\"dtype\" must be a string, got number 5");
  entry_error(R"({"dtype":"F8_E4M3","shape":[2,3],"data_offsets":[0,24]})",
              "unsupported dtype 'F8_E4M3' (supported: BOOL, U8");
  entry_error(R"({"dtype":"f32","shape":[2,3],"data_offsets":[0,24]})", "unsupported dtype 'f32'");
  entry_error(R"({"dtype":"F32","shape":"2,3","data_offsets":[0,24]})",
              "\"shape\" must be an array of non-negative integers, got string");
  entry_error(R"({"dtype":"F32","shape":[2,-3],"data_offsets":[0,24]})",
              "shape dimension -3 is negative");
  entry_error(R"({"dtype":"F32","shape":[2,3.0],"data_offsets":[0,24]})",
              "shape dimension must be a non-negative integer, got number 3.0");
  entry_error(R"({"dtype":"F32","shape":[2,"3"],"data_offsets":[0,24]})",
              "shape dimension must be a non-negative integer, got string");
  entry_error(R"({"dtype":"F32","shape":[[2,3]],"data_offsets":[0,24]})",
              "shape dimension must be a non-negative integer, got array");
  entry_error(R"({"dtype":"F32","shape":[1e3],"data_offsets":[0,24]})",
              "shape dimension must be a non-negative integer");
  entry_error(R"({"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,24]})",
              "shape dimension 18446744073709551615 is too large");
  entry_error(R"({"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,24]})",
              "shape (4294967296,4294967296) is too large: the product of its nonzero dimensions "
              "overflows int64");
  entry_error(R"({"dtype":"F32","shape":[0,4294967296,4294967296],"data_offsets":[0,0]})",
              "overflows int64");
  entry_error(R"({"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,24]})",
              "needs more bytes than fit in uint64");
  entry_error(R"({"dtype":"F32","shape":[2,3],"data_offsets":[0]})",
              "\"data_offsets\" must be [begin, end] with non-negative integers, got array [0]");
  entry_error(R"({"dtype":"F32","shape":[2,3],"data_offsets":[0,24,48]})",
              "\"data_offsets\" must be [begin, end]");
  entry_error(R"({"dtype":"F32","shape":[2,3],"data_offsets":[-1,23]})",
              "\"data_offsets\" must be [begin, end]");
  entry_error(R"({"dtype":"F32","shape":[2,3],"data_offsets":[0,"24"]})",
              "\"data_offsets\" must be [begin, end]");
  entry_error(R"({"dtype":"F32","shape":[2,3],"data_offsets":{"begin":0,"end":24}})",
              "\"data_offsets\" must be [begin, end]");
  entry_error(R"({"dtype":"F32","shape":[2,3],"data_offsets":[0,24.0]})",
              "\"data_offsets\" must be [begin, end]");
  entry_error(R"({"dtype":"F32","shape":[2,3],"data_offsets":[24,0]})",
              "data_offsets [24, 0] have begin > end");
  entry_error(R"({"dtype":"F32","shape":[2,3],"data_offsets":[0,12]})",
              "data_offsets [0, 12] hold 12 bytes but F32 shape (2,3) needs 24");
  entry_error(R"({"dtype":"F32","shape":[2,3],"data_offsets":[8,32]})",
              "data_offsets [8, 32] lie outside the data buffer of 24 bytes");
  entry_error(
      R"({"dtype":"F32","shape":[],"data_offsets":[18446744073709551612,18446744073709551615]})",
      "data_offsets [18446744073709551612, 18446744073709551615] hold 3 bytes but F32 shape () "
      "needs 4");
  entry_error(
      R"({"dtype":"F32","shape":[],"data_offsets":[18446744073709551611,18446744073709551615]})",
      "lie outside the data buffer of 24 bytes");
  // The exact message, file name first.
  try {
    parse_safetensors(nullptr, 0, "model.safetensors");  // size 0: must not touch the pointer
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.safetensors: file is 0 bytes"), std::string::npos);
  }
  try {
    const std::string f = make_file(
        one_entry("blocks.0.w", R"({"dtype":"F32","shape":[2,3],"data_offsets":[0,12]})"), ok_data);
    parse_safetensors(f.data(), f.size(), "model.safetensors");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(),
                 "model.safetensors: tensor 'blocks.0.w': data_offsets [0, 12] hold 12 bytes but "
                 "F32 shape (2,3) needs 24");
  }
}

TEST(Safetensors, RejectsOverlapsAndDuplicates) {
  const std::string data(16, '\0');
  expect_parse_error(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                               R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                               data),
                     "tensors 'a' (data_offsets [0, 8]) and 'b' (data_offsets [4, 12]) overlap");
  expect_parse_error(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                               R"("b":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})",
                               data),
                     "overlap");
  expect_parse_error(  // one range inside another
      make_file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                R"("b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}})",
                data),
      "tensors 'a' (data_offsets [0, 16]) and 'b' (data_offsets [4, 6]) overlap");
  const std::string entry = R"({"dtype":"F32","shape":[1],"data_offsets":[0,4]})";
  expect_parse_error(make_file("{\"a\":" + entry + ",\"a\":" + entry + "}", data),
                     "duplicate tensor name 'a'");
  expect_parse_error(make_file(R"({"__metadata__":{},"__metadata__":{}})"),
                     "duplicate key '__metadata__'");
  expect_parse_error(
      make_file(R"({"a":{"dtype":"F32","dtype":"F64","shape":[1],"data_offsets":[0,4]}})", data),
      "'a': duplicate key 'dtype'");
  expect_parse_error(make_file(R"({"__metadata__":{"k":"1","k":"2"}})"),
                     "'__metadata__': duplicate key 'k'");
}

TEST(Safetensors, RejectsBadMetadata) {
  expect_parse_error(make_file(R"({"__metadata__":[]})"),
                     "__metadata__ must be a JSON object of strings, got array");
  expect_parse_error(make_file(R"({"__metadata__":"x"})"), "__metadata__ must be a JSON object");
  expect_parse_error(make_file(R"({"__metadata__":{"a":"1","n":2}})"),
                     "__metadata__ value for key 'n' must be a string, got number 2");
  expect_parse_error(make_file(R"({"__metadata__":{"a":null}})"),
                     "__metadata__ value for key 'a' must be a string, got null");
  const SafetensorsFile f = parse(make_file(R"({"__metadata__":{"a":"1","b":"\u00e9"}})"));
  EXPECT_EQ(f.metadata, (std::map<std::string, std::string>{{"a", "1"}, {"b", "\xC3\xA9"}}));
}

// ---- robustness ----
std::string valid_file_bytes() {
  NamedTensors t = sample_tensors();
  t.insert("z", from_vector(std::vector<double>{1, 2, 3, 4}, {2, 2}));
  return serialize_safetensors(t, {{"format", "pt"}, {"x", "y"}});
}

TEST(Safetensors, EveryTruncationIsAnError) {
  const std::string bytes = valid_file_bytes();
  ASSERT_NO_THROW(parse(bytes));
  for (size_t n = 0; n < bytes.size(); ++n) {
    // A heap copy of exactly n bytes, so that ASan catches any read past the end.
    std::vector<char> prefix(bytes.begin(), bytes.begin() + n);
    EXPECT_THROW(parse_safetensors(prefix.data(), prefix.size(), "prefix"), Error) << n;
  }
}

// Random single-byte corruptions: each file either loads or throws mmdit::Error (never crashes,
// never throws anything else). Run under ASan/UBSan to catch out-of-bounds reads.
TEST(Safetensors, CorruptedBytesLoadOrThrow) {
  const std::string bytes = valid_file_bytes();
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = header_len << 8 | static_cast<unsigned char>(bytes[i]);
  const size_t header_end = 8 + header_len;
  std::mt19937 rng(12345);
  int loaded = 0, rejected = 0;
  for (int iter = 0; iter < 4000; ++iter) {
    std::vector<char> corrupt(bytes.begin(), bytes.end());
    // Half the flips anywhere, half inside the length field and header, where they matter.
    const size_t limit = iter % 2 ? corrupt.size() : header_end;
    const int flips = iter < 2000 ? 1 : 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < flips; ++k) {
      const size_t pos = rng() % limit;
      const auto mask = static_cast<char>(1 + rng() % 255);
      corrupt[pos] = static_cast<char>(corrupt[pos] ^ mask);
    }
    try {
      parse_safetensors(corrupt.data(), corrupt.size(), "fuzz");
      ++loaded;
    } catch (const Error&) {
      ++rejected;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "iteration " << iter << ": non-mmdit exception: " << e.what();
    }
  }
  EXPECT_GT(loaded, 0);
  EXPECT_GT(rejected, 0);
}

// ---- files ----
TEST(Safetensors, MissingOrUnreadableFile) {
  TempDir dir;
  const std::string missing = dir.file("nope.safetensors");
  try {
    load_safetensors(missing);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(missing), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(std::strerror(ENOENT)), std::string::npos) << e.what();
  }
  try {
    load_safetensors(dir.path().string());
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not a regular file"), std::string::npos) << e.what();
  }
  // A FIFO is refused at once: opening one to read would wait for a writer that never comes.
  const std::string fifo = dir.file("fifo.safetensors");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0) << std::strerror(errno);
  auto load = std::async(std::launch::async, [&] { load_safetensors(fifo); });
  if (load.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
    ADD_FAILURE() << "load_safetensors waits on a FIFO";
    ::close(::open(fifo.c_str(), O_WRONLY | O_NONBLOCK));  // a writer lets the open return
  }
  try {
    load.get();
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not a regular file"), std::string::npos) << e.what();
  }
  // A malformed file names its path.
  const std::string bad = dir.file("bad.safetensors");
  { std::ofstream(bad) << "short"; }
  try {
    load_safetensors(bad);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(bad + ": file is 5 bytes"), std::string::npos) << e.what();
  }
}

// The metadata alone, for a caller that needs a large file's settings before its tensors: the
// header is read and checked as load_safetensors checks it, the buffer is not read at all.
TEST(Safetensors, MetadataAloneReadsOnlyTheHeader) {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "h\xC3\xA9llo"}};
  save_safetensors(path, sample_tensors(), meta);
  EXPECT_EQ(load_safetensors_metadata(path), meta);
  save_safetensors(dir.file("plain.safetensors"), sample_tensors());
  EXPECT_TRUE(load_safetensors_metadata(dir.file("plain.safetensors")).empty());
  // Cut after the header: the tensors are gone, the metadata is not.
  const std::string bytes = read_file(path);
  uint64_t header_length = 0;
  std::memcpy(&header_length, bytes.data(), 8);
  const std::string cut = dir.file("cut.safetensors");
  write_file_atomically(cut, bytes.substr(0, 8 + header_length));
  EXPECT_THROW(load_safetensors(cut), Error);
  EXPECT_EQ(load_safetensors_metadata(cut), meta);
  // A header cut short, a file too short for the length, and a missing file: the errors of
  // load_safetensors, naming the path.
  for (const std::string& broken : {bytes.substr(0, 8 + header_length / 2), bytes.substr(0, 5)}) {
    write_file_atomically(cut, broken);
    const std::string full_error = test::error_of([&] { load_safetensors(cut); });
    EXPECT_EQ(test::error_of([&] { load_safetensors_metadata(cut); }), full_error);
    EXPECT_EQ(full_error.rfind(cut + ": ", 0), 0u) << full_error;
  }
  EXPECT_EQ(test::error_of([&] { load_safetensors_metadata(dir.file("nope")); }),
            test::error_of([&] { load_safetensors(dir.file("nope")); }));
  EXPECT_EQ(test::error_of([&] { load_safetensors_metadata(dir.path().string()); }),
            test::error_of([&] { load_safetensors(dir.path().string()); }));
}

TEST(Safetensors, SaveIntoMissingDirectoryThrowsAndLeavesNothing) {
  TempDir dir;
  const std::string path = dir.file("no/such/dir/model.safetensors");
  try {
    save_safetensors(path, sample_tensors());
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(dir.path() / "no"));
  EXPECT_TRUE(dir.entries().empty());
}

// The rename puts a regular file in the place of whatever was at the path: run as root, saving to
// /dev/null replaced the device. Only a regular file (or nothing) is replaced.
TEST(Safetensors, SaveReplacesOnlyARegularFile) {
  TempDir dir;
  const std::string fifo = dir.file("fifo"), link = dir.file("link"), target = dir.file("target"),
                    directory = dir.file("directory");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0644), 0);
  write_file_atomically(target, "kept");
  ASSERT_EQ(::symlink("target", link.c_str()), 0);
  ASSERT_EQ(::mkdir(directory.c_str(), 0755), 0);
  for (const auto& path_and_kind : std::vector<std::pair<std::string, std::string>>{
           {fifo, "a FIFO"}, {link, "a symbolic link"}, {directory, "a directory"}}) {
    // Not a structured binding: Clang 14 cannot capture one in the lambdas below.
    const std::string &path = path_and_kind.first, &kind = path_and_kind.second;
    EXPECT_EQ(test::error_of([&] { save_safetensors(path, sample_tensors()); }),
              path + ": is " + kind +
                  ", which a save would replace with a regular file; give the path of a regular "
                  "file");
    EXPECT_THAT(test::error_of([&] { write_file_atomically(path, "x"); }),
                ::testing::HasSubstr(path + ": is " + kind));
    // A writer that made its temp file itself: refused at the commit, the temp file removed.
    const std::string tmp = atomic_temp_path(path);
    write_file_atomically(tmp, "x");
    EXPECT_THAT(test::error_of([&] { commit_temp_file(tmp, path); }),
                ::testing::HasSubstr(path + ": is " + kind));
    EXPECT_FALSE(fs::exists(tmp));
  }
  struct stat st {};
  ASSERT_EQ(::lstat(fifo.c_str(), &st), 0);
  EXPECT_TRUE(S_ISFIFO(st.st_mode));
  ASSERT_EQ(::lstat(link.c_str(), &st), 0);
  EXPECT_TRUE(S_ISLNK(st.st_mode));
  EXPECT_EQ(read_file(target), "kept");
  EXPECT_EQ(dir.entries(), (std::vector<std::string>{"directory", "fifo", "link", "target"}));
}

// A name that fits, but not with the temporary suffix, is named as such.
TEST(Safetensors, SaveUnderANameTooLongForItsTempFileSaysSo) {
  TempDir dir;
  const std::string path = dir.file(std::string(246, 'b') + ".npy");
  EXPECT_THAT(test::error_of([&] { write_file_atomically(path, "x"); }),
              ::testing::HasSubstr("(the file name with the temporary suffix passes the file "
                                   "system's limit; choose a name some 20 characters shorter)"));
  EXPECT_TRUE(dir.entries().empty());
}

TEST(Safetensors, OverwriteReplacesFileAndLeavesNoTempFile) {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  NamedTensors first;
  first.insert("a", ones({3}));
  save_safetensors(path, first, {{"v", "1"}});
  NamedTensors second;
  second.insert("b", full({2, 2}, 4.0, DType::f64));
  save_safetensors(path, second, {{"v", "2"}});
  const SafetensorsFile loaded = load_safetensors(path);
  EXPECT_EQ(loaded.metadata.at("v"), "2");
  ASSERT_EQ(loaded.tensors.size(), 1u);
  EXPECT_EQ(loaded.tensors.at("b").to_vector<double>(), (std::vector<double>{4, 4, 4, 4}));
  EXPECT_EQ(dir.entries(), (std::vector<std::string>{"model.safetensors"}));
}

TEST(Safetensors, FailedSaveLeavesOldFileUntouched) {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  NamedTensors good;
  good.insert("a", from_vector({1.f, 2.f}, {2}));
  save_safetensors(path, good);
  const auto before = fs::file_size(path);

  // Serialization fails before anything is written.
  NamedTensors bad;
  bad.insert("__metadata__", ones({1}));
  EXPECT_THROW(save_safetensors(path, bad), Error);
  // The rename fails: the target is a non-empty directory.
  const std::string dir_target = dir.file("target");
  fs::create_directory(dir_target);
  { std::ofstream(dir.file("target/keep")) << "x"; }
  EXPECT_THROW(save_safetensors(dir_target, good), Error);
  EXPECT_TRUE(fs::is_directory(dir_target));

  EXPECT_EQ(fs::file_size(path), before);
  EXPECT_EQ(load_safetensors(path).tensors.at("a").to_vector<float>(), (std::vector<float>{1, 2}));
  EXPECT_EQ(dir.entries(), (std::vector<std::string>{"model.safetensors", "target"}));
}

// The pid of a child that has exited and been reaped: it names no process now, as a killed
// writer's does. 0 if the child could not be made.
pid_t dead_pid() {
  const pid_t child = fork();
  if (child == 0) _exit(0);
  int status = 0;
  return child > 0 && waitpid(child, &status, 0) == child ? child : 0;
}

// A killed writer's temp file goes; a live process's (ours) stays, and so do other names.
TEST(Safetensors, StaleTempFilesOfDeadWritersAreRemoved) {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  const pid_t child = dead_pid();
  ASSERT_GT(child, 0);
  for (const std::string& name :
       {"model.safetensors.tmp." + std::to_string(child),
        "model.safetensors.tmp." + std::to_string(getpid()),
        std::string("model.safetensors.tmp.notapid"), "other.tmp." + std::to_string(child)})
    std::ofstream(dir.file(name)) << "partial";
  remove_stale_temp_files(path);
  EXPECT_EQ(dir.entries(),
            (std::vector<std::string>{"model.safetensors.tmp." + std::to_string(getpid()),
                                      "model.safetensors.tmp.notapid",
                                      "other.tmp." + std::to_string(child)}));
}

// Two threads saving one path. With one temp name per process each truncated the other's file: a
// reader could find a mix of the two or a truncated file, and a rename could fail because the
// other thread had renamed the file already.
TEST(Safetensors, ThreadsSavingOnePathEachWriteTheirOwnTempFile) {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  // Of different lengths, so that a truncated file is not either of them.
  const std::string a(size_t{256} << 10, 'a'), b((size_t{256} << 10) + 12345, 'b');
  write_file_atomically(path, a);
  std::atomic<int> running{0}, errors{0};
  std::string first_error;
  std::atomic<bool> go{false};
  const auto save = [&](const std::string& bytes) {
    while (!go.load()) std::this_thread::yield();
    for (int i = 0; i < 40; ++i) try {
        write_file_atomically(path, bytes);
      } catch (const Error& e) {
        if (errors++ == 0) first_error = e.what();
      }
    --running;
  };
  running = 2;
  std::thread ta(save, std::cref(a)), tb(save, std::cref(b));
  go = true;
  int reads = 0, torn = 0;
  std::string torn_size;
  while (running.load() > 0) {
    const std::string got = read_file(path);
    ++reads;
    if (got != a && got != b && torn++ == 0) torn_size = std::to_string(got.size());
  }
  ta.join();
  tb.join();
  EXPECT_EQ(errors.load(), 0) << first_error;
  EXPECT_EQ(torn, 0) << "of " << reads << " reads, the first of " << torn_size << " bytes";
  const std::string last = read_file(path);
  EXPECT_TRUE(last == a || last == b) << last.size() << " bytes";
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"model.safetensors"});
}

// A writer in another pid namespace (a container sharing the volume) has a pid that names no
// process here: its lock on the temp file tells the cleanup that it is still writing.
TEST(Safetensors, StaleTempFileCleanupSparesLockedFiles) {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  const pid_t other = dead_pid();
  ASSERT_GT(other, 0);
  const std::string prefix = "model.safetensors.tmp.";
  const std::string locked = prefix + std::to_string(other) + ".3",
                    locked_old_name = prefix + std::to_string(other),
                    stale = prefix + std::to_string(other) + ".4",
                    ours = prefix + std::to_string(getpid()) + ".5";
  for (const std::string& name : {locked, locked_old_name, stale, ours})
    std::ofstream(dir.file(name)) << "partial";
  std::vector<int> fds;
  for (const std::string& name : {locked, locked_old_name}) {
    fds.push_back(::open(dir.file(name).c_str(), O_RDWR | O_CLOEXEC));
    ASSERT_GE(fds.back(), 0);
    ASSERT_EQ(::flock(fds.back(), LOCK_EX), 0);
  }
  remove_stale_temp_files(path);
  std::vector<std::string> kept{locked, locked_old_name, ours};
  std::sort(kept.begin(), kept.end());
  EXPECT_EQ(dir.entries(), kept);
  // The writer is gone (or done): its file goes.
  for (int fd : fds) ::close(fd);
  remove_stale_temp_files(path);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{ours});
}

// Under a umask of 0222 temp files are made read-only to their owner. Reopened for writing (for
// the lock), libzip's was refused ("reopening ... Permission denied") and a stale one never went.
// Root may write anything, so the checks run in a child that has become nobody.
TEST(Safetensors, ReadOnlyTempFilesAreCommittedAndCleanedUp) {
  TempDir dir;
  const std::string path = dir.file("archive.npz");
  const auto check = [&] {
    const mode_t old_umask = ::umask(0222);
    const std::string tmp = path + ".tmp." + std::to_string(getpid()) + ".0";
    std::ofstream(tmp) << "done";
    ::umask(old_umask);
    if (::access(tmp.c_str(), W_OK) == 0) return 10;  // still writable: nothing tested
    try {
      commit_temp_file(tmp, path);
    } catch (const Error& e) {
      std::fprintf(stderr, "%s\n", e.what());
      return 11;
    }
    if (read_file(path) != "done") return 12;
    const pid_t gone = dead_pid();
    if (gone == 0) return 13;
    const std::string stale = path + ".tmp." + std::to_string(gone) + ".1";
    std::ofstream(stale) << "partial";
    ::chmod(stale.c_str(), 0444);
    remove_stale_temp_files(path);
    return std::filesystem::exists(stale) ? 14 : 0;
  };
  if (geteuid() != 0) {
    EXPECT_EQ(check(), 0);
    return;
  }
  ASSERT_EQ(::chmod(dir.path().c_str(), 0777), 0);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) _exit(setgid(65534) == 0 && setuid(65534) == 0 ? check() : 20);
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

// ---- the reference implementation's output ----
TEST(Safetensors, LoadsParityFixture) {
  const std::string path = std::string(MMDIT_TEST_DATA) + "/rms_norm.safetensors";
  const SafetensorsFile f = load_safetensors(path);
  EXPECT_EQ(f.metadata.at("format"), "mmdit-parity/1");
  EXPECT_EQ(f.metadata.at("kind"), "rms_norm");
  ASSERT_FALSE(f.tensors.empty());
  for (const auto& [name, t] : f.tensors) EXPECT_EQ(t.dtype(), DType::f64) << name;
  ASSERT_TRUE(f.tensors.contains("input/x"));
  ASSERT_TRUE(f.tensors.contains("param/gamma"));
  EXPECT_EQ(f.tensors.at("param/gamma").dim(), 1);
  EXPECT_EQ(f.tensors.at("input/x").size(-1), f.tensors.at("param/gamma").size(0));

  // Our writer reproduces the reference writer's bytes: same layout, same data, same tensor
  // entries. Only the order of the __metadata__ keys may differ (the reference keeps them in a
  // hash map), so the headers are compared from the first tensor entry on.
  std::ifstream in(path, std::ios::binary);
  const std::string original((std::istreambuf_iterator<char>(in)),
                             std::istreambuf_iterator<char>());
  const std::string ours = serialize_safetensors(f.tensors, f.metadata);
  ASSERT_EQ(ours.size(), original.size());
  EXPECT_EQ(ours.substr(0, 8), original.substr(0, 8));  // header length
  const std::string first_entry = "\"" + f.tensors[0].first + "\":{\"dtype\"";
  const size_t ours_at = ours.find(first_entry), original_at = original.find(first_entry);
  ASSERT_NE(ours_at, std::string::npos);
  ASSERT_EQ(ours_at, original_at);
  EXPECT_EQ(ours.substr(ours_at), original.substr(original_at));
}

}  // namespace
}  // namespace mmdit
