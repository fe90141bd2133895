// Implements the Field and Record helpers of shard.h; the writer and reader are in shard_writer.cpp and
// shard_reader.cpp, the byte layout they share in shard_layout.h.
#include "data/shard.h"

#include <fmt/format.h>

#include <cstring>
#include <limits>
#include <stdexcept>
#include <utility>

#include "data/shard_layout.h"

namespace vimo::data {

using namespace shard_layout;

// Product of a shape's extents times the element size, or throws when it overflows or is negative.
// `where` names the field or record in the error ("field 'x'").
uint64_t shard_layout::checked_byte_count(const std::vector<int64_t>& shape, DType dtype,
                                          std::string_view where) {
  uint64_t count = dtype_size(dtype);
  for (const int64_t extent : shape) {
    if (extent < 0)
      throw std::runtime_error(fmt::format("{}: negative extent {} in the shape", where, extent));
    if (extent != 0 && count > std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(extent)) {
      throw std::runtime_error(fmt::format("{}: the shape's byte count overflows 64 bits", where));
    }
    count *= static_cast<uint64_t>(extent);
  }
  return count;
}

namespace {

template <typename T>
Field field_from_values(std::string name, DType dtype, std::vector<int64_t> shape,
                        const std::vector<T>& values) {
  Field field;
  field.name = std::move(name);
  field.dtype = dtype;
  field.shape = std::move(shape);
  const uint64_t bytes = checked_byte_count(field.shape, dtype, "field '" + field.name + "'");
  if (bytes != values.size() * sizeof(T)) {
    throw std::runtime_error(fmt::format("field '{}': shape holds {} elements but {} values were given",
                                         field.name, bytes / sizeof(T), values.size()));
  }
  const auto* p = reinterpret_cast<const uint8_t*>(values.data());
  field.bytes.assign(p, p + bytes);
  return field;
}

template <typename T>
std::vector<T> field_values(const Field& field, DType expected) {
  if (field.dtype != expected) {
    throw std::runtime_error(fmt::format("field '{}': expected dtype {}, found {}", field.name,
                                         dtype_name(expected), dtype_name(field.dtype)));
  }
  const uint64_t bytes = checked_byte_count(field.shape, field.dtype, "field '" + field.name + "'");
  if (bytes != field.bytes.size()) {
    throw std::runtime_error(
        fmt::format("field '{}': shape needs {} bytes, found {}", field.name, bytes, field.bytes.size()));
  }
  std::vector<T> values(bytes / sizeof(T));
  if (bytes) std::memcpy(values.data(), field.bytes.data(), bytes);
  return values;
}

}  // namespace

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::Float32:
      return 4;
    case DType::Int64:
      return 8;
    case DType::Int32:
      return 4;
    case DType::UInt8:
      return 1;
    case DType::Float16:
    case DType::BFloat16:
      return 2;
    case DType::Float64:
      return 8;
  }
  throw std::runtime_error(fmt::format("unknown shard dtype code {}", static_cast<int>(dtype)));
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::Float32:
      return "float32";
    case DType::Int64:
      return "int64";
    case DType::Int32:
      return "int32";
    case DType::UInt8:
      return "uint8";
    case DType::Float16:
      return "float16";
    case DType::BFloat16:
      return "bfloat16";
    case DType::Float64:
      return "float64";
  }
  return "unknown";
}

Field Field::from_floats(std::string name, std::vector<int64_t> shape, const std::vector<float>& values) {
  return field_from_values(std::move(name), DType::Float32, std::move(shape), values);
}

Field Field::from_int64s(std::string name, std::vector<int64_t> shape, const std::vector<int64_t>& values) {
  return field_from_values(std::move(name), DType::Int64, std::move(shape), values);
}

Field Field::from_string(std::string name, const std::string& text) {
  return field_from_values(std::move(name), DType::UInt8, {static_cast<int64_t>(text.size())},
                           std::vector<uint8_t>(text.begin(), text.end()));
}

Field Field::from_bytes(std::string name, DType dtype, std::vector<int64_t> shape,
                        std::vector<uint8_t> bytes) {
  Field field;
  field.name = std::move(name);
  field.dtype = dtype;
  field.shape = std::move(shape);
  const uint64_t expected = checked_byte_count(field.shape, dtype, "field '" + field.name + "'");
  if (expected != bytes.size()) {
    throw std::runtime_error(
        fmt::format("field '{}': shape needs {} bytes, found {}", field.name, expected, bytes.size()));
  }
  field.bytes = std::move(bytes);
  return field;
}

std::vector<float> Field::floats() const { return field_values<float>(*this, DType::Float32); }
std::vector<int64_t> Field::int64s() const { return field_values<int64_t>(*this, DType::Int64); }

std::string Field::text() const {
  const std::vector<uint8_t> bytes = field_values<uint8_t>(*this, DType::UInt8);
  return std::string(bytes.begin(), bytes.end());
}

int64_t Field::numel() const {
  int64_t n = 1;
  for (const int64_t extent : shape) n *= extent;
  return n;
}

const Field& Record::get(const std::string& name) const {
  for (const Field& field : fields) {
    if (field.name == name) return field;
  }
  std::string present;
  for (const Field& field : fields) present += (present.empty() ? "" : ", ") + field.name;
  throw std::runtime_error(fmt::format("record has no field '{}' (fields: {})", name, present));
}

}  // namespace vimo::data
