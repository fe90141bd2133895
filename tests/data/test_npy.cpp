// Tests the .npy reader and writer: byte-exact agreement with files as NumPy writes them, every supported
// dtype, versions 2.0/3.0, Fortran order, and a named error for each kind of bad file.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "data/npy.h"
#include "tests/test_support.h"

namespace vimo::data {
namespace {

using vimo::testing::expect_error;

template <typename T>
std::string raw(const std::vector<T>& values) {
  return std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
}

// A .npy file assembled by hand: magic, version, header length (2 or 4 bytes), header text, data.
std::string assemble(int major, const std::string& header, const std::string& data) {
  std::string out = std::string("\x93NUMPY", 6) + static_cast<char>(major) + '\0';
  const uint32_t length = static_cast<uint32_t>(header.size());
  for (int i = 0; i < (major == 1 ? 2 : 4); ++i) out += static_cast<char>((length >> (8 * i)) & 0xff);
  return out + header + data;
}

NpyArray parse(const std::string& bytes, const std::string& name = "test.npy") {
  return parse_npy(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), name);
}

// np.save(f, np.array([1.0, 2.0, 3.0])) with NumPy 1.26: a 118-byte header (length byte 'v'), 128 bytes
// before the data. (NumPy 1.16-1.23 wrote the same bytes for this shape: without the spare growth spaces
// the padding to 64 is longer by as much.)
const std::string kNumpyFloat64Header =
    "{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }" + std::string(60, ' ') + "\n";

TEST(Npy, ReadsAFileAsNumpyWritesIt) {
  const std::string file = assemble(1, kNumpyFloat64Header, raw(std::vector<double>{1.0, 2.0, 3.0}));
  ASSERT_EQ(file.size(), 128u + 24u);
  EXPECT_EQ(file.substr(0, 10), std::string("\x93NUMPY\x01\x00v\x00", 10));
  const NpyArray array = parse(file);
  EXPECT_EQ(array.dtype, NpyDType::Float64);
  EXPECT_EQ(array.shape, std::vector<int64_t>{3});
  EXPECT_EQ(array.to_floats(), (std::vector<float>{1.0f, 2.0f, 3.0f}));
}

TEST(Npy, WriterMatchesNumpyBytes) {
  // np.save(f, np.array([1, 2, 3], dtype='<f4')): same header as above with '<f4'.
  const std::string expected_header =
      "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }" + std::string(60, ' ') + "\n";
  const std::vector<float> values = {1.5f, -2.0f, 3.25f};
  EXPECT_EQ(npy_bytes({3}, values), assemble(1, expected_header, raw(values)));
  // np.save(f, np.zeros((2, 3), dtype='<i8')): "(2, 3)", 20 growth spaces, then 38 of padding to 128.
  const std::string header_2d =
      "{'descr': '<i8', 'fortran_order': False, 'shape': (2, 3), }" + std::string(58, ' ') + "\n";
  const std::vector<int64_t> ints = {0, 1, 2, 3, 4, -5};
  EXPECT_EQ(npy_bytes({2, 3}, ints), assemble(1, header_2d, raw(ints)));
  // A 0-d array: "()" and no growth spaces.
  const std::string bytes0 = npy_bytes(std::vector<int64_t>{}, std::vector<float>{7.0f});
  EXPECT_EQ(bytes0.size() % 64, 4u);  // 64-byte aligned prefix plus one float
  EXPECT_NE(bytes0.find("'shape': (), }"), std::string::npos);
}

TEST(Npy, RoundTripsAnyRank) {
  for (const std::vector<int64_t>& shape :
       std::vector<std::vector<int64_t>>{{}, {0}, {5}, {2, 3}, {2, 1, 4}, {3, 0, 2}, {1, 2, 1, 2, 1}}) {
    int64_t numel = 1;
    for (int64_t d : shape) numel *= d;
    std::vector<float> floats(numel);
    std::vector<int64_t> ints(numel);
    for (int64_t i = 0; i < numel; ++i) {
      floats[i] = 0.5f * static_cast<float>(i) - 3.0f;
      ints[i] = (i - 2) * 1000000007LL;
    }
    const NpyArray f = parse(npy_bytes(shape, floats));
    EXPECT_EQ(f.shape, shape);
    EXPECT_EQ(f.to_floats(), floats);
    const NpyArray n = parse(npy_bytes(shape, ints));
    EXPECT_EQ(n.dtype, NpyDType::Int64);
    EXPECT_EQ(n.to_int64s(), ints);
  }
}

TEST(Npy, ReadsEveryDtype) {
  auto header = [](const std::string& descr, const std::string& shape) {
    return "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape + ", }\n";
  };
  // float16: 1.0, -2.5, 65504 (max), 2^-24 (smallest subnormal), inf
  const std::vector<uint16_t> halves = {0x3c00, 0xc100, 0x7bff, 0x0001, 0x7c00};
  const NpyArray h = parse(assemble(1, header("<f2", "(5,)"), raw(halves)));
  const std::vector<float> hf = h.to_floats();
  EXPECT_EQ(hf[0], 1.0f);
  EXPECT_EQ(hf[1], -2.5f);
  EXPECT_EQ(hf[2], 65504.0f);
  EXPECT_EQ(hf[3], std::ldexp(1.0f, -24));
  EXPECT_TRUE(std::isinf(hf[4]));
  EXPECT_EQ(parse(assemble(1, header("<i4", "(2,)"), raw(std::vector<int32_t>{-7, 9}))).to_int64s(),
            (std::vector<int64_t>{-7, 9}));
  EXPECT_EQ(parse(assemble(1, header("|u1", "(3,)"), std::string("\x00\x7f\xff", 3))).to_floats(),
            (std::vector<float>{0.0f, 127.0f, 255.0f}));
  EXPECT_EQ(parse(assemble(1, header("|b1", "(3,)"), std::string("\x01\x00\x01", 3))).to_floats(),
            (std::vector<float>{1.0f, 0.0f, 1.0f}));
  expect_error([&] { parse(assemble(1, header("<f4", "(1,)"), raw(std::vector<float>{1.0f}))).to_int64s(); },
               {"to_int64s", "<f4"});
}

TEST(Npy, ReadsVersions2And3DoubleQuotesAndPython2Longs) {
  const std::vector<float> values = {1.0f, 2.0f};
  const std::string h2 =
      "{\"descr\": \"<f4\", \"shape\": (2L,), \"fortran_order\": False}" + std::string(9, ' ') + "\n";
  EXPECT_EQ(parse(assemble(2, h2, raw(values))).to_floats(), values);
  EXPECT_EQ(parse(assemble(3, h2, raw(values))).shape, std::vector<int64_t>{2});
}

TEST(Npy, TransposesFortranOrder) {
  // np.asfortranarray([[1, 2, 3], [4, 5, 6]]) stores columns first: 1 4 2 5 3 6.
  const std::string header = "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }\n";
  const NpyArray array = parse(assemble(1, header, raw(std::vector<float>{1, 4, 2, 5, 3, 6})));
  EXPECT_EQ(array.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(array.to_floats(), (std::vector<float>{1, 2, 3, 4, 5, 6}));
  // Rank 3 [2, 2, 2]: Fortran element (i, j, k) at i + 2j + 4k.
  const std::string header3 = "{'descr': '<i8', 'fortran_order': True, 'shape': (2, 2, 2), }\n";
  std::vector<int64_t> fortran(8);
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      for (int k = 0; k < 2; ++k) fortran[i + 2 * j + 4 * k] = 100 * i + 10 * j + k;
  EXPECT_EQ(parse(assemble(1, header3, raw(fortran))).to_int64s(),
            (std::vector<int64_t>{0, 1, 10, 11, 100, 101, 110, 111}));
}

TEST(Npy, NamesEachKindOfBadFile) {
  const std::string good = npy_bytes({4, 3}, std::vector<float>(12, 1.0f));
  expect_error([&] { parse("not numpy at all", "a.npy"); }, {"a.npy", "bad magic"});
  expect_error([&] { parse(good.substr(0, 5), "a.npy"); }, {"a.npy", "bad magic"});
  std::string version = good;
  version[6] = 4;
  expect_error([&] { parse(version, "v.npy"); }, {"v.npy", "unsupported .npy format version 4.0"});
  expect_error([&] { parse(good.substr(0, good.size() - 8), "t.npy"); },
               {"t.npy", "truncated", "expected 48 bytes of data, the file has 40"});
  expect_error([&] { parse(good + "xx", "x.npy"); }, {"x.npy", "expected 48 bytes of data, the file has 50"});
  expect_error([&] { parse(good.substr(0, 40), "h.npy"); }, {"h.npy", "truncated .npy header"});

  auto with_header = [](const std::string& header) {
    return assemble(1, header + "\n", std::string(8, '\0'));
  };
  const std::vector<std::pair<std::string, std::string>> bad_headers = {
      {"{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", "unsupported dtype '>f4'"},
      {"{'descr': '<c8', 'fortran_order': False, 'shape': (1,), }", "unsupported dtype '<c8'"},
      {"{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }", "structured dtypes"},
      {"{'descr': '<f4', 'fortran_order': False}", "lacks one of the keys"},
      {"{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2,)}", "'descr' appears twice"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}", "unexpected key 'x'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2)}", "not a tuple"},
      {"{'descr': '<f4', 'fortran_order': false, 'shape': (2,)}", "True or False"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2,)} trailing", "after the header dict"},
      {"{'descr': '<f4, 'fortran_order': False, 'shape': (2,)}", "expected ',' or '}' after a value"},
      {"{'descr' '<f4', 'fortran_order': False, 'shape': (2,)}", "expected ':'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (-2,)}", "non-negative integer"},
      {"{'descr': '<f4' 'fortran_order': False, 'shape': (2,)}", "expected ',' or '}'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3 4)}", "expected ',' or ')'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,)}", "overflows"},
      {"'descr': '<f4', 'fortran_order': False, 'shape': (2,)}", "expected '{'"},
      {"{'descr': 'f\\4', 'fortran_order': False, 'shape': (2,)}", "escape"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2,)\x01}", "not printable"},
  };
  for (const auto& [header, message] : bad_headers) {
    SCOPED_TRACE(header);
    expect_error([&] { parse(with_header(header), "bad.npy"); }, {"bad.npy", message});
  }
  // A header claiming an enormous shape is an error before any allocation.
  expect_error(
      [&] {
        parse(
            with_header("{'descr': '<f8', 'fortran_order': False, 'shape': (1099511627776, 1099511627776)}"),
            "big.npy");
      },
      {"big.npy", "expected more than 2^64 bytes of data, the file has 8"});
  expect_error(
      [&] {
        parse(with_header("{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 16)}"), "big.npy");
      },
      {"big.npy", "expected 549755813888 bytes of data, the file has 8"});
  // A zero-size array with huge other dimensions is fine (no data).
  EXPECT_EQ(
      parse(assemble(1, "{'descr': '<f8', 'fortran_order': False, 'shape': (4611686018427387904, 0)}\n", ""))
          .numel(),
      0);
  expect_error([] { read_npy("/nonexistent/dir/m.npy"); }, {"/nonexistent/dir/m.npy", "cannot open"});
}

}  // namespace
}  // namespace vimo::data
