// Defines a reader and writer of the safetensors file layout (readable by Python's `safetensors`):
//   uint64 little-endian header length N, N bytes of JSON header, then the raw tensor bytes.
//   header: { "<name>": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//             "__metadata__": {"<key>": "<string value>", ...} }
// Hand-written because Debian ships no C++ safetensors library and the layout is this small.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <string>
#include <vector>

namespace vimo::checkpoints {

struct TensorFile {
  std::map<std::string, at::Tensor> tensors;  // CPU, contiguous
  std::map<std::string, std::string> metadata;
};

// Writes `file` to `path` and fsyncs it. Tensors are written in name order (F32, F64, BF16, F16, I64, I32,
// U8).
void write_safetensors(const std::string& path, const TensorFile& file);

// Reads `path` in one pass; errors name the file and the tensor that is malformed. With `xxh3`, also the
// file's checksum (XXH3-64 as 16 hex digits, as checkpoint manifests give it), from the same pass.
TensorFile read_safetensors(const std::string& path, std::string* xxh3 = nullptr);

// Where one tensor's bytes lie in a safetensors file.
struct TensorEntry {
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> shape;
  uint64_t offset = 0;  // of its first byte, from the start of the file
  uint64_t bytes = 0;
};

// A file's header alone: every tensor's dtype, shape and place, checked against the file's size, and the
// metadata. Reads no tensor data.
struct TensorFileIndex {
  std::string path;
  std::map<std::string, TensorEntry> tensors;
  std::map<std::string, std::string> metadata;
};
TensorFileIndex read_safetensors_index(const std::string& path);

// Elements [first, first + count) of tensor `name` of an indexed file, flattened: a 1-D tensor of `count`.
// Errors name the file and the tensor.
at::Tensor read_safetensors_elements(const TensorFileIndex& index, const std::string& name, int64_t first,
                                     int64_t count);

}  // namespace vimo::checkpoints
