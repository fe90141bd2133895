// Implements collate(): one tensor per field, filled by memcpy of each record's bytes into its padded row.
#include "data/collate.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cstring>
#include <stdexcept>

namespace vimo::data {

at::ScalarType torch_dtype(DType dtype) {
  switch (dtype) {
    case DType::Float32:
      return at::kFloat;
    case DType::Int64:
      return at::kLong;
    case DType::Int32:
      return at::kInt;
    case DType::UInt8:
      return at::kByte;
    case DType::Float16:
      return at::kHalf;
    case DType::BFloat16:
      return at::kBFloat16;
    case DType::Float64:
      return at::kDouble;
  }
  throw std::runtime_error(fmt::format("no tensor dtype for shard dtype code {}", static_cast<int>(dtype)));
}

const at::Tensor& CollatedBatch::field(const std::string& name) const {
  const auto it = fields.find(name);
  if (it == fields.end()) {
    std::vector<std::string> names;
    for (const auto& [n, unused] : fields) names.push_back(n);
    throw std::runtime_error(
        fmt::format("batch has no field '{}' (fields: {})", name, fmt::join(names, ", ")));
  }
  return it->second;
}

at::Tensor CollatedBatch::mask(const std::string& name) const {
  const at::Tensor& values = field(name);
  const at::Tensor& length = lengths.at(name);                                      // [B]
  return at::arange(values.size(1), at::kLong).unsqueeze(0) < length.unsqueeze(1);  // [B, max_len]
}

CollatedBatch collate(const std::vector<Record>& records, const std::vector<int64_t>& keys,
                      const std::vector<std::string>& where) {
  CollatedBatch batch;
  const auto B = static_cast<int64_t>(records.size());
  if (keys.size() != records.size() || where.size() != records.size()) {
    throw std::logic_error("collate: records, keys and names differ in length");
  }
  batch.keys = at::tensor(keys, at::kLong);
  if (B == 0) return batch;
  const Record& first = records.front();
  for (size_t f = 0; f < first.fields.size(); ++f) {
    const Field& model = first.fields[f];
    // Check every record's field against the first record's, and find the longest first extent.
    int64_t max_len = 0;
    std::vector<const Field*> column(records.size());
    for (size_t i = 0; i < records.size(); ++i) {
      const Field* found = nullptr;
      for (const Field& candidate : records[i].fields) {
        if (candidate.name == model.name) found = &candidate;
      }
      if (!found)
        throw std::runtime_error(
            fmt::format("{}: missing field '{}' (present in the batch's first record, {})", where[i],
                        model.name, where[0]));
      const bool same_tail =
          found->shape.size() == model.shape.size() &&
          std::equal(found->shape.begin() + (model.shape.empty() ? 0 : 1), found->shape.end(),
                     model.shape.begin() + (model.shape.empty() ? 0 : 1));
      if (found->dtype != model.dtype || !same_tail) {
        throw std::runtime_error(
            fmt::format("{}: field '{}' is {} [{}], but {} has {} [{}] (only the first extent may "
                        "differ within a batch)",
                        where[i], model.name, dtype_name(found->dtype), fmt::join(found->shape, ", "),
                        where[0], dtype_name(model.dtype), fmt::join(model.shape, ", ")));
      }
      if (!model.shape.empty()) max_len = std::max(max_len, found->shape[0]);
      column[i] = found;
    }
    std::vector<int64_t> shape = {B};
    if (!model.shape.empty()) {
      shape.push_back(max_len);
      shape.insert(shape.end(), model.shape.begin() + 1, model.shape.end());
    }
    // Not at::zeros: it fills in an intra-op parallel region, which costs a thread handoff per field on a
    // busy machine; each row is copied and only its padding cleared.
    at::Tensor values = at::empty(shape, at::TensorOptions().dtype(torch_dtype(model.dtype)));
    const int64_t row_bytes = values.numel() / B * static_cast<int64_t>(dtype_size(model.dtype));
    auto* base = static_cast<uint8_t*>(values.data_ptr());
    for (int64_t i = 0; i < B; ++i) {
      const std::vector<uint8_t>& bytes = column[static_cast<size_t>(i)]->bytes;
      uint8_t* row = base + i * row_bytes;
      if (!bytes.empty()) std::memcpy(row, bytes.data(), bytes.size());
      std::memset(row + bytes.size(), 0, static_cast<size_t>(row_bytes) - bytes.size());
    }
    if (!model.shape.empty()) {
      at::Tensor length = at::empty({B}, at::kLong);
      int64_t* out = length.data_ptr<int64_t>();
      for (int64_t i = 0; i < B; ++i) out[i] = column[static_cast<size_t>(i)]->shape[0];
      batch.lengths[model.name] = length;
    }
    batch.fields[model.name] = values;
  }
  return batch;
}

}  // namespace vimo::data
