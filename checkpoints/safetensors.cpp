// safetensors layout reader and writer (see safetensors.h).
#include "checkpoints/safetensors.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <vector>

namespace vimo::checkpoints {
namespace {

struct DTypeName {
  at::ScalarType type;
  const char* name;
};
constexpr DTypeName kDTypes[] = {{at::kFloat, "F32"}, {at::kDouble, "F64"}, {at::kBFloat16, "BF16"},
                                 {at::kHalf, "F16"},  {at::kLong, "I64"},   {at::kInt, "I32"},
                                 {at::kByte, "U8"}};

const char* dtype_to_name(at::ScalarType type) {
  for (const auto& d : kDTypes) {
    if (d.type == type) return d.name;
  }
  throw std::invalid_argument(std::string("safetensors: unsupported dtype ") + at::toString(type));
}

at::ScalarType name_to_dtype(const std::string& name, const std::string& path, const std::string& tensor) {
  for (const auto& d : kDTypes) {
    if (name == d.name) return d.type;
  }
  throw std::runtime_error(path + ": tensor '" + tensor + "' has unsupported dtype '" + name + "'");
}

}  // namespace

void write_safetensors(const std::string& path, const TensorFile& file) {
  nlohmann::ordered_json header;
  if (!file.metadata.empty()) header["__metadata__"] = file.metadata;
  uint64_t offset = 0;
  std::vector<at::Tensor> ordered;
  for (const auto& [name, tensor] : file.tensors) {
    at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
    const uint64_t bytes = t.numel() * t.element_size();
    header[name] = {{"dtype", dtype_to_name(t.scalar_type())},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    ordered.push_back(t);
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the format pads the header to 8-byte alignment with spaces
  const uint64_t header_length = text.size();

  std::FILE* out = std::fopen(path.c_str(), "wb");
  if (!out) throw std::runtime_error("cannot create " + path + ": " + std::strerror(errno));
  bool ok = std::fwrite(&header_length, 8, 1, out) == 1 &&
            std::fwrite(text.data(), 1, text.size(), out) == text.size();
  for (const at::Tensor& t : ordered) {
    const size_t bytes = t.numel() * t.element_size();
    ok = ok && (bytes == 0 || std::fwrite(t.data_ptr(), 1, bytes, out) == bytes);
  }
  ok = ok && std::fflush(out) == 0 && ::fsync(fileno(out)) == 0;
  ok = (std::fclose(out) == 0) && ok;
  if (!ok) throw std::runtime_error("writing " + path + " failed: " + std::strerror(errno) + " (disk full?)");
}

TensorFileIndex read_safetensors_index(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  in.seekg(0, std::ios::end);
  const uint64_t file_size = in.tellg();
  in.seekg(0);
  uint64_t header_length = 0;
  if (file_size < 8 || !in.read(reinterpret_cast<char*>(&header_length), 8) ||
      header_length > file_size - 8) {
    throw std::runtime_error(path + ": not a safetensors file (header length out of range)");
  }
  std::string text(header_length, '\0');
  in.read(text.data(), header_length);
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    throw std::runtime_error(path + ": malformed safetensors header: " + e.what());
  }
  const uint64_t data_start = 8 + header_length, data_size = file_size - data_start;
  TensorFileIndex index;
  index.path = path;
  if (!header.is_object())
    throw std::runtime_error(path + ": malformed safetensors header: not a JSON object");
  for (const auto& [name, entry] : header.items()) {
    try {
      if (name == "__metadata__") {
        for (const auto& [key, value] : entry.items()) index.metadata[key] = value.get<std::string>();
        continue;
      }
      TensorEntry tensor;
      tensor.dtype = name_to_dtype(entry.at("dtype").get<std::string>(), path, name);
      tensor.shape = entry.at("shape").get<std::vector<int64_t>>();
      const auto offsets = entry.at("data_offsets").get<std::vector<uint64_t>>();
      uint64_t elements = 1;
      for (const int64_t size : tensor.shape) {
        if (size < 0 || __builtin_mul_overflow(elements, static_cast<uint64_t>(size), &elements) ||
            elements > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
          throw std::runtime_error(path + ": tensor '" + name + "' has a negative or overflowing shape");
        }
      }
      if (__builtin_mul_overflow(elements, static_cast<uint64_t>(at::elementSize(tensor.dtype)),
                                 &tensor.bytes) ||
          offsets.size() != 2 || offsets[1] < offsets[0] || offsets[1] - offsets[0] != tensor.bytes ||
          offsets[1] > data_size) {
        throw std::runtime_error(path + ": tensor '" + name +
                                 "' has data offsets that do not match its shape or the file size");
      }
      tensor.offset = data_start + offsets[0];
      index.tensors[name] = std::move(tensor);
    } catch (const nlohmann::json::exception& e) {
      throw std::runtime_error(path + ": malformed safetensors header entry '" + name + "': " + e.what());
    }
  }
  return index;
}

at::Tensor read_safetensors_elements(const TensorFileIndex& index, const std::string& name, int64_t first,
                                     int64_t count) {
  const auto it = index.tensors.find(name);
  if (it == index.tensors.end()) throw std::runtime_error(index.path + ": no tensor '" + name + "'");
  const TensorEntry& entry = it->second;
  const uint64_t element = at::elementSize(entry.dtype), elements = entry.bytes / element;
  if (first < 0 || count < 0 || static_cast<uint64_t>(first + count) > elements) {
    throw std::runtime_error(fmt::format("{}: elements [{}, {}) of tensor '{}' are out of its {}", index.path,
                                         first, first + count, name, elements));
  }
  at::Tensor out = at::empty({count}, at::TensorOptions().dtype(entry.dtype));  // [count]
  if (count == 0) return out;
  std::ifstream in(index.path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + index.path);
  in.seekg(static_cast<std::streamoff>(entry.offset + first * element));
  if (!in.read(static_cast<char*>(out.data_ptr()), static_cast<std::streamsize>(count * element))) {
    throw std::runtime_error(index.path + ": tensor '" + name + "' is truncated");
  }
  return out;
}

TensorFile read_safetensors(const std::string& path, std::string* xxh3) {
  const TensorFileIndex index = read_safetensors_index(path);
  TensorFile file;
  file.metadata = index.metadata;
  std::vector<std::pair<const std::string*, const TensorEntry*>> by_offset;
  for (const auto& [name, entry] : index.tensors) {
    file.tensors[name] = at::empty(entry.shape, at::TensorOptions().dtype(entry.dtype));
    by_offset.emplace_back(&name, &entry);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const auto& a, const auto& b) { return a.second->offset < b.second->offset; });
  // One pass from the first byte to the last, hashing all of it when asked (the checksum the manifest gives
  // costs no second read of the file). Tensors are read straight into their memory; bytes between them (a
  // file of another writer may have some) are read into `gap`.
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> state(XXH3_createState(), &XXH3_freeState);
  XXH3_64bits_reset(state.get());
  std::vector<char> gap;
  uint64_t at_byte = 0;
  const auto take = [&](char* into, uint64_t bytes, const std::string& what) {
    if (bytes != 0 && !in.read(into, static_cast<std::streamsize>(bytes)))
      throw std::runtime_error(path + ": " + what + " is truncated");
    if (xxh3) XXH3_64bits_update(state.get(), into, bytes);
    at_byte += bytes;
  };
  const auto skip_to = [&](uint64_t offset, const std::string& what) {
    while (at_byte < offset) {
      gap.resize(std::min<uint64_t>(offset - at_byte, 1 << 20));
      take(gap.data(), gap.size(), what);
    }
  };
  for (const auto& [name, entry] : by_offset) {
    if (entry->offset < at_byte)  // the format forbids overlaps
      throw std::runtime_error(path + ": tensor '" + *name + "' overlaps the tensor before it");
    skip_to(entry->offset, "the data before tensor '" + *name + "'");
    take(static_cast<char*>(file.tensors[*name].data_ptr()), entry->bytes, "tensor '" + *name + "'");
  }
  if (xxh3) {
    skip_to(std::filesystem::file_size(path), "the end of the file");  // the header too, if no tensor came
    *xxh3 = fmt::format("{:016x}", XXH3_64bits_digest(state.get()));
  }
  return file;
}

}  // namespace vimo::checkpoints
