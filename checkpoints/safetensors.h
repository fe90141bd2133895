// Defines a reader and writer of the safetensors file layout (readable by Python's `safetensors`):
//   uint64 little-endian header length N, N bytes of JSON header, then the raw tensor bytes.
//   header: { "<name>": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//             "__metadata__": {"<key>": "<string value>", ...} }
// Hand-written because Debian ships no C++ safetensors library and the layout is this small.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <string>

namespace vimo::checkpoints {

struct TensorFile {
  std::map<std::string, at::Tensor> tensors;  // CPU, contiguous
  std::map<std::string, std::string> metadata;
};

// Writes `file` to `path` and fsyncs it. Tensors are written in name order (F32, F64, BF16, F16, I64, I32,
// U8).
void write_safetensors(const std::string& path, const TensorFile& file);

// Reads `path`; errors name the file and the tensor that is malformed.
TensorFile read_safetensors(const std::string& path);

}  // namespace vimo::checkpoints
