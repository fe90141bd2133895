// Defines a strict reader and a writer for NumPy's .npy format (versions 1.0, 2.0 and 3.0), the format the
// public motion and video-feature datasets ship in. Plain C++ (no LibTorch), so the fuzz target
// tests/fuzz/fuzz_npy.cpp compiles it standalone.
//
// A .npy file is
//   magic "\x93NUMPY", uint8 major, uint8 minor,
//   header length: uint16 (1.0) or uint32 (2.0, 3.0), little-endian,
//   header: a Python dict literal {'descr': <str>, 'fortran_order': <bool>, 'shape': <tuple of int>}
//           padded with spaces and ended by '\n' (latin-1 in 1.0/2.0, UTF-8 in 3.0),
//   data:   product(shape) elements of `descr`, in C order (or Fortran order when fortran_order is True).
//
// Note [Strict npy header]: the header is parsed by a small recursive-descent parser for exactly the
// Python literals NumPy writes (quoted strings, True/False, integers, tuples of integers), not by pattern
// matching, so a header with garbage, a missing or repeated key, or an unknown key is an error. A
// Fortran-order array is transposed into C order on read; big-endian and structured dtypes are errors.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace vimo::data {

// The element types we read; the names are NumPy's descr strings.
enum class NpyDType : uint8_t {
  Float16,  // '<f2'
  Float32,  // '<f4'
  Float64,  // '<f8'
  Int32,    // '<i4'
  Int64,    // '<i8'
  UInt8,    // '|u1'
  Bool,     // '|b1'
};
size_t npy_dtype_size(NpyDType dtype);
const char* npy_descr(NpyDType dtype);

// Any error reading a .npy file or buffer; the message names the file (or buffer name) and what was wrong.
class NpyError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One array: its element type, shape and raw little-endian bytes in C (row-major) order.
struct NpyArray {
  NpyDType dtype = NpyDType::Float32;
  std::vector<int64_t> shape;  // empty for a 0-d array (one element)
  std::vector<uint8_t> data;   // numel() * npy_dtype_size(dtype) bytes
  int64_t numel() const;
  // Every element converted to float32 (booleans become 0 or 1; int64 beyond 2^24 loses precision).
  std::vector<float> to_floats() const;
  // Every element as int64; throws NpyError for floating-point dtypes.
  std::vector<int64_t> to_int64s() const;
};

// Parses a whole .npy file held in memory. `name` (a path, usually) is used in error messages. Never
// allocates more than a small multiple of `size`, whatever the header claims.
NpyArray parse_npy(const uint8_t* bytes, size_t size, const std::string& name);
// Reads and parses the file at `path`.
NpyArray read_npy(const std::string& path);

// A version 1.0 .npy file holding `values` with `shape` (C order), byte for byte as NumPy >= 1.24 writes
// it (header padded with spaces to a multiple of 64 bytes, with NumPy's spare space for growing axis 0).
std::string npy_bytes(const std::vector<int64_t>& shape, const std::vector<float>& values);    // '<f4'
std::string npy_bytes(const std::vector<int64_t>& shape, const std::vector<int64_t>& values);  // '<i8'
// Writes npy_bytes(shape, values) to `path` (plain write; callers needing atomicity write via a temp file).
void write_npy(const std::string& path, const std::vector<int64_t>& shape, const std::vector<float>& values);
void write_npy(const std::string& path, const std::vector<int64_t>& shape,
               const std::vector<int64_t>& values);

}  // namespace vimo::data
