// Implements the .npy reader and writer of npy.h: the header's Python-literal parser (Note [Strict npy
// header]), bounds checks against the file size, dtype conversion and Fortran-to-C transposition.
#include "data/npy.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <optional>

namespace vimo::data {
namespace {

constexpr char kMagic[6] = {'\x93', 'N', 'U', 'M', 'P', 'Y'};
constexpr size_t kMaxRank = 64;  // NumPy's NPY_MAXDIMS (32 before NumPy 2) is below this

struct DescrEntry {
  const char* descr;
  NpyDType dtype;
};
constexpr DescrEntry kDescrs[] = {
    {"<f2", NpyDType::Float16}, {"<f4", NpyDType::Float32}, {"<f8", NpyDType::Float64},
    {"<i4", NpyDType::Int32},   {"<i8", NpyDType::Int64},   {"|u1", NpyDType::UInt8},
    {"|b1", NpyDType::Bool},
};

// The three header values, as parsed.
struct Header {
  std::optional<std::string> descr;
  std::optional<bool> fortran_order;
  std::optional<std::vector<int64_t>> shape;
};

// Recursive-descent parser for the header dict: { key: value, ... } with an optional trailing comma,
// where a value is a quoted string, True, False, or a tuple of non-negative integers.
class HeaderParser {
 public:
  HeaderParser(const std::string& text, const std::string& name) : text_(text), name_(name) {}

  Header parse() {
    Header header;
    skip_space();
    expect('{');
    skip_space();
    while (peek() != '}') {
      const size_t key_at = pos_;
      const std::string key = parse_string();
      skip_space();
      expect(':');
      skip_space();
      if (key == "descr") {
        if (header.descr) fail(key_at, "key 'descr' appears twice");
        if (peek() == '[') fail(pos_, "structured dtypes (a list descr) are not supported");
        header.descr = parse_string();
      } else if (key == "fortran_order") {
        if (header.fortran_order) fail(key_at, "key 'fortran_order' appears twice");
        header.fortran_order = parse_bool();
      } else if (key == "shape") {
        if (header.shape) fail(key_at, "key 'shape' appears twice");
        header.shape = parse_shape();
      } else {
        fail(key_at, fmt::format("unexpected key '{}' (a .npy header has exactly 'descr', 'fortran_order' "
                                 "and 'shape')",
                                 key));
      }
      skip_space();
      if (peek() == ',') {
        ++pos_;
        skip_space();
      } else if (peek() != '}') {
        fail(pos_, "expected ',' or '}' after a value");
      }
    }
    ++pos_;  // '}'
    // NumPy pads with spaces and ends the header with '\n'; nothing else may follow the dict.
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\r')) ++pos_;
    if (pos_ < text_.size() && text_[pos_] == '\n') ++pos_;
    if (pos_ != text_.size()) fail(pos_, "unexpected bytes after the header dict");
    if (!header.descr || !header.fortran_order || !header.shape) {
      fail(pos_, "the header lacks one of the keys 'descr', 'fortran_order', 'shape'");
    }
    return header;
  }

 private:
  [[noreturn]] void fail(size_t at, const std::string& what) const {
    throw NpyError(
        fmt::format("{}: malformed .npy header at byte {} of the header: {}. HINT: the file "
                    "is not a NumPy .npy file, or it is corrupt",
                    name_, at, what));
  }
  char peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }
  void expect(char c) {
    if (peek() != c) fail(pos_, fmt::format("expected '{}'", c));
    ++pos_;
  }
  void skip_space() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t')) ++pos_;
  }
  std::string parse_string() {
    const char quote = peek();
    if (quote != '\'' && quote != '"') fail(pos_, "expected a quoted string");
    ++pos_;
    std::string value;
    while (true) {
      if (pos_ >= text_.size()) fail(pos_, "unterminated string");
      const char c = text_[pos_++];
      if (c == quote) return value;
      if (c == '\\') fail(pos_ - 1, "escape sequences in strings are not supported");
      if (c == '\n') fail(pos_ - 1, "newline inside a string");
      value += c;
    }
  }
  bool parse_bool() {
    if (text_.compare(pos_, 4, "True") == 0) {
      pos_ += 4;
      return true;
    }
    if (text_.compare(pos_, 5, "False") == 0) {
      pos_ += 5;
      return false;
    }
    fail(pos_, "expected True or False for 'fortran_order'");
  }
  int64_t parse_int() {
    const size_t start = pos_;
    int64_t value = 0;
    while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') {
      const int digit = text_[pos_] - '0';
      if (value > (std::numeric_limits<int64_t>::max() - digit) / 10)
        fail(start, "dimension overflows int64");
      value = value * 10 + digit;
      ++pos_;
    }
    if (pos_ == start) fail(start, "expected a non-negative integer dimension");
    if (peek() == 'L') ++pos_;  // Python 2 long literal, as in files written by NumPy under Python 2
    return value;
  }
  // A Python tuple: "()", "(n,)", "(n, m)", "(n, m,)". "(n)" is an int in Python, not a tuple: rejected.
  std::vector<int64_t> parse_shape() {
    expect('(');
    skip_space();
    std::vector<int64_t> shape;
    bool trailing_comma = false;
    while (peek() != ')') {
      if (shape.size() == kMaxRank) fail(pos_, fmt::format("more than {} dimensions", kMaxRank));
      shape.push_back(parse_int());
      skip_space();
      trailing_comma = false;
      if (peek() == ',') {
        ++pos_;
        trailing_comma = true;
        skip_space();
      } else if (peek() != ')') {
        fail(pos_, "expected ',' or ')' in the shape tuple");
      }
    }
    if (shape.size() == 1 && !trailing_comma) fail(pos_, "shape '(n)' is not a tuple (NumPy writes '(n,)')");
    ++pos_;  // ')'
    return shape;
  }

  const std::string& text_;
  const std::string& name_;
  size_t pos_ = 0;
};

uint32_t read_le(const uint8_t* p, size_t bytes) {
  uint32_t value = 0;
  for (size_t i = 0; i < bytes; ++i) value |= static_cast<uint32_t>(p[i]) << (8 * i);
  return value;
}

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf / nan
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;  // +-0
  } else {        // subnormal half: normalize
    int shift = 0;
    while (!(mantissa & 0x400u)) {
      mantissa <<= 1;
      ++shift;
    }
    bits = sign | (static_cast<uint32_t>(113 - shift) << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

template <typename T>
T load(const uint8_t* p) {
  T value;
  std::memcpy(&value, p, sizeof value);  // little-endian host (x86-64, aarch64)
  return value;
}

// Reorders `data` (elements of `item` bytes, Fortran order for `shape`) into C order.
std::vector<uint8_t> fortran_to_c(const std::vector<uint8_t>& data, const std::vector<int64_t>& shape,
                                  size_t item) {
  const size_t rank = shape.size();
  if (data.empty() || rank < 2) return data;
  std::vector<uint8_t> out(data.size());
  std::vector<int64_t> fortran_stride(rank, 1), index(rank, 0);
  for (size_t d = 1; d < rank; ++d) fortran_stride[d] = fortran_stride[d - 1] * shape[d - 1];
  const size_t count = data.size() / item;
  for (size_t c = 0; c < count; ++c) {  // c walks C order; index is its multi-index (odometer)
    int64_t source = 0;
    for (size_t d = 0; d < rank; ++d) source += index[d] * fortran_stride[d];
    std::memcpy(&out[c * item], &data[static_cast<size_t>(source) * item], item);
    for (size_t d = rank; d-- > 0;) {
      if (++index[d] < shape[d]) break;
      index[d] = 0;
    }
  }
  return out;
}

std::string shape_repr(const std::vector<int64_t>& shape) {  // Python's repr of the shape tuple
  if (shape.empty()) return "()";
  if (shape.size() == 1) return fmt::format("({},)", shape[0]);
  return fmt::format("({})", fmt::join(shape, ", "));
}

// NumPy >= 1.24 `_write_array_header` + `_wrap_header` (version 1.0): the dict with keys sorted and a
// trailing ", ", then spare spaces so axis 0 can grow to 21 digits in place, then spaces and '\n' so the
// whole prefix is a multiple of 64 bytes. (When it already is, NumPy still adds 64: we do the same.)
std::string npy_file(const char* descr, const std::vector<int64_t>& shape, const void* values, size_t bytes) {
  int64_t numel = 1;
  for (int64_t d : shape) {
    if (d < 0) throw NpyError(fmt::format("npy_bytes: negative dimension in shape {}", shape_repr(shape)));
    numel *= d;
  }
  const size_t item = descr[2] == '8' ? 8 : 4;
  if (static_cast<size_t>(numel) * item != bytes) {
    throw NpyError(fmt::format("npy_bytes: shape {} holds {} elements but {} were given", shape_repr(shape),
                               numel, bytes / item));
  }
  std::string header =
      fmt::format("{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}", descr, shape_repr(shape));
  if (!shape.empty()) header.append(21 - std::to_string(shape[0]).size(), ' ');
  const size_t with_newline = header.size() + 1;
  const size_t pad = 64 - ((sizeof kMagic + 2 + 2 + with_newline) % 64);
  header.append(pad, ' ');
  header += '\n';
  if (header.size() > 0xffff)
    throw NpyError("npy_bytes: header longer than 65535 bytes (too many dimensions)");
  std::string out(kMagic, sizeof kMagic);
  out += '\x01';
  out += '\x00';
  out += static_cast<char>(header.size() & 0xff);
  out += static_cast<char>(header.size() >> 8);
  out += header;
  out.append(static_cast<const char*>(values), bytes);
  return out;
}

void write_file(const std::string& path, const std::string& bytes) {
  std::FILE* file = std::fopen(path.c_str(), "wb");
  if (!file) throw NpyError(fmt::format("{}: cannot create: {}", path, std::strerror(errno)));
  const bool ok = std::fwrite(bytes.data(), 1, bytes.size(), file) == bytes.size();
  const std::string error = ok ? "" : std::strerror(errno);
  if (std::fclose(file) != 0 || !ok) {
    throw NpyError(fmt::format("{}: cannot write: {}", path, error.empty() ? std::strerror(errno) : error));
  }
}

}  // namespace

size_t npy_dtype_size(NpyDType dtype) {
  switch (dtype) {
    case NpyDType::Float16:
      return 2;
    case NpyDType::Float32:
    case NpyDType::Int32:
      return 4;
    case NpyDType::Float64:
    case NpyDType::Int64:
      return 8;
    case NpyDType::UInt8:
    case NpyDType::Bool:
      return 1;
  }
  return 0;
}

const char* npy_descr(NpyDType dtype) {
  for (const DescrEntry& entry : kDescrs) {
    if (entry.dtype == dtype) return entry.descr;
  }
  return "?";
}

int64_t NpyArray::numel() const {
  uint64_t n = 1;  // unsigned: no overflow UB for a zero-size array with huge other dimensions
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return static_cast<int64_t>(n);
}

std::vector<float> NpyArray::to_floats() const {
  const size_t n = data.size() / npy_dtype_size(dtype);
  std::vector<float> out(n);
  const uint8_t* p = data.data();
  for (size_t i = 0; i < n; ++i) {
    switch (dtype) {
      case NpyDType::Float16:
        out[i] = half_to_float(load<uint16_t>(p + 2 * i));
        break;
      case NpyDType::Float32:
        out[i] = load<float>(p + 4 * i);
        break;
      case NpyDType::Float64:
        out[i] = static_cast<float>(load<double>(p + 8 * i));
        break;
      case NpyDType::Int32:
        out[i] = static_cast<float>(load<int32_t>(p + 4 * i));
        break;
      case NpyDType::Int64:
        out[i] = static_cast<float>(load<int64_t>(p + 8 * i));
        break;
      case NpyDType::UInt8:
        out[i] = static_cast<float>(p[i]);
        break;
      case NpyDType::Bool:
        out[i] = p[i] ? 1.0f : 0.0f;
        break;
    }
  }
  return out;
}

std::vector<int64_t> NpyArray::to_int64s() const {
  const size_t n = data.size() / npy_dtype_size(dtype);
  std::vector<int64_t> out(n);
  const uint8_t* p = data.data();
  for (size_t i = 0; i < n; ++i) {
    switch (dtype) {
      case NpyDType::Int32:
        out[i] = load<int32_t>(p + 4 * i);
        break;
      case NpyDType::Int64:
        out[i] = load<int64_t>(p + 8 * i);
        break;
      case NpyDType::UInt8:
        out[i] = p[i];
        break;
      case NpyDType::Bool:
        out[i] = p[i] ? 1 : 0;
        break;
      default:
        throw NpyError(
            fmt::format("to_int64s: the array holds {} (floating point), not integers", npy_descr(dtype)));
    }
  }
  return out;
}

NpyArray parse_npy(const uint8_t* bytes, size_t size, const std::string& name) {
  if (size < 10 || std::memcmp(bytes, kMagic, sizeof kMagic) != 0) {
    throw NpyError(
        fmt::format("{}: not a .npy file (bad magic: the file must start with \"\\x93NUMPY\"; "
                    "it has {} bytes)",
                    name, size));
  }
  const int major = bytes[6], minor = bytes[7];
  if ((major != 1 && major != 2 && major != 3) || minor != 0) {
    throw NpyError(fmt::format("{}: unsupported .npy format version {}.{} (supported: 1.0, 2.0, 3.0)", name,
                               major, minor));
  }
  const size_t length_bytes = major == 1 ? 2 : 4;
  const size_t prefix = 8 + length_bytes;
  if (size < prefix) {
    throw NpyError(fmt::format("{}: truncated .npy file: {} bytes, the header length alone needs {}", name,
                               size, prefix));
  }
  const size_t header_length = read_le(bytes + 8, length_bytes);
  if (header_length > size - prefix) {
    throw NpyError(
        fmt::format("{}: truncated .npy header: it claims {} bytes, the file has {} after the "
                    "header length",
                    name, header_length, size - prefix));
  }
  const std::string text(reinterpret_cast<const char*>(bytes + prefix), header_length);
  for (size_t i = 0; i < text.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if (c >= 0x80 || (c < 0x20 && c != '\n' && c != '\t' && c != '\r')) {
      throw NpyError(
          fmt::format("{}: malformed .npy header: byte {} of the header is {:#04x}, not printable "
                      "ASCII",
                      name, i, c));
    }
  }
  const Header header = HeaderParser(text, name).parse();

  NpyArray array;
  bool known = false;
  for (const DescrEntry& entry : kDescrs) {
    if (*header.descr == entry.descr) {
      array.dtype = entry.dtype;
      known = true;
    }
  }
  if (!known) {
    std::string supported;
    for (const DescrEntry& entry : kDescrs)
      supported += fmt::format("{}'{}'", supported.empty() ? "" : ", ", entry.descr);
    throw NpyError(
        fmt::format("{}: unsupported dtype '{}' (supported: {}; big-endian '>' dtypes are not). "
                    "HINT: convert with numpy, e.g. np.save(path, a.astype('<f4'))",
                    name, *header.descr, supported));
  }
  array.shape = *header.shape;

  // Bound the element count by the bytes present before allocating anything: a header claiming a huge
  // shape is an error, not an allocation.
  const size_t item = npy_dtype_size(array.dtype);
  const size_t available = size - prefix - header_length;
  uint64_t numel = 1;
  bool overflow = false;
  for (int64_t d : array.shape)
    numel = d == 0 ? 0 : numel;  // a zero dimension: no data, however large the rest
  for (int64_t d : array.shape) {
    if (numel == 0) break;
    const uint64_t dim = static_cast<uint64_t>(d);
    if (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / item / dim) overflow = true;
    numel *= dim;
  }
  if (overflow || numel * item != available) {
    const std::string expected =
        overflow ? "more than 2^64" : fmt::format("{}", static_cast<unsigned long long>(numel * item));
    throw NpyError(
        fmt::format("{}: {} .npy data: shape {} of '{}': expected {} bytes of data, the file has {}", name,
                    !overflow && numel * item > available ? "truncated" : "wrong size of",
                    shape_repr(array.shape), *header.descr, expected, available));
  }
  const uint8_t* data = bytes + prefix + header_length;
  array.data.assign(data, data + available);
  if (*header.fortran_order) array.data = fortran_to_c(array.data, array.shape, item);
  return array;
}

NpyArray read_npy(const std::string& path) {
  std::FILE* file = std::fopen(path.c_str(), "rb");
  if (!file) throw NpyError(fmt::format("{}: cannot open: {}", path, std::strerror(errno)));
  std::vector<uint8_t> bytes;
  uint8_t buffer[1 << 16];
  size_t got;
  while ((got = std::fread(buffer, 1, sizeof buffer, file)) > 0)
    bytes.insert(bytes.end(), buffer, buffer + got);
  const bool failed = std::ferror(file);
  std::fclose(file);
  if (failed) throw NpyError(fmt::format("{}: read error", path));
  return parse_npy(bytes.data(), bytes.size(), path);
}

std::string npy_bytes(const std::vector<int64_t>& shape, const std::vector<float>& values) {
  return npy_file("<f4", shape, values.data(), values.size() * sizeof(float));
}

std::string npy_bytes(const std::vector<int64_t>& shape, const std::vector<int64_t>& values) {
  return npy_file("<i8", shape, values.data(), values.size() * sizeof(int64_t));
}

void write_npy(const std::string& path, const std::vector<int64_t>& shape, const std::vector<float>& values) {
  write_file(path, npy_bytes(shape, values));
}

void write_npy(const std::string& path, const std::vector<int64_t>& shape,
               const std::vector<int64_t>& values) {
  write_file(path, npy_bytes(shape, values));
}

}  // namespace vimo::data
