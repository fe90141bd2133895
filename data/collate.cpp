// Implements collate(): one tensor per field, filled by memcpy of each record's bytes into its padded row.
#include "data/collate.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
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

// Note [Why batches reuse their memory]
// A batch's tensors are megabytes each (64 records of 16 x 256 float32 features: 1 MiB), so glibc serves
// them with fresh mmap'd pages, and the first write to every 4 KiB page is a page fault that the kernel
// answers by zeroing the page. Collation then writes each byte twice (the zeroing, then the copy), with a
// fault per page: in `vimo bench data` that halved the loader's throughput against read_record alone. A
// trainer holds at most a few batches at a time (prefetch + the one in use), so the loader keeps the memory
// of freed batches and hands it to the next batch of the same size: the pages stay mapped and warm. Sizes
// are rounded up to 64 KiB, so batches whose padded length varies a little share blocks; a freed block
// that would push the cache past its limit is freed instead.
struct TensorPool::State {
  std::mutex mutex;
  std::multimap<size_t, void*> free_blocks;  // size → block
  size_t cached = 0;
  size_t max_cached;
  int64_t reused = 0;
  explicit State(size_t max) : max_cached(max) {}
  ~State() {
    for (auto& [size, block] : free_blocks) std::free(block);
  }
  void give_back(void* block, size_t size) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (cached + size <= max_cached) {
        free_blocks.emplace(size, block);
        cached += size;
        return;
      }
    }
    std::free(block);
  }
};

constexpr size_t kPoolGranule = size_t{64} << 10;
constexpr size_t kPoolAlignment = 64;

TensorPool::TensorPool(size_t max_cached_bytes) : state_(std::make_shared<State>(max_cached_bytes)) {}

at::Tensor TensorPool::empty(at::IntArrayRef shape, at::ScalarType dtype) {
  int64_t numel = 1;
  for (const int64_t extent : shape) numel *= extent;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  const size_t size = std::max<size_t>((bytes + kPoolGranule - 1) / kPoolGranule, 1) * kPoolGranule;
  void* block = nullptr;
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    const auto it = state_->free_blocks.find(size);
    if (it != state_->free_blocks.end()) {
      block = it->second;
      state_->free_blocks.erase(it);
      state_->cached -= size;
      ++state_->reused;
    }
  }
  if (block == nullptr) {
    block = std::aligned_alloc(kPoolAlignment, size);
    if (block == nullptr) throw std::bad_alloc();
  }
  // The deleter holds the pool's state, so a tensor that outlives the pool still frees its block.
  return at::from_blob(
      block, shape, [state = state_, size](void* p) { state->give_back(p, size); },
      at::TensorOptions().dtype(dtype));
}

size_t TensorPool::cached_bytes() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->cached;
}

int64_t TensorPool::reused() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->reused;
}

CollatedBatch collate(const std::vector<RecordView>& records, const std::vector<int64_t>& keys,
                      const std::vector<std::string>& where, TensorPool* pool) {
  CollatedBatch batch;
  const auto B = static_cast<int64_t>(records.size());
  if (keys.size() != records.size() || where.size() != records.size()) {
    throw std::logic_error("collate: records, keys and names differ in length");
  }
  batch.keys = at::tensor(keys, at::kLong);
  if (B == 0) return batch;
  const RecordView& first = records.front();
  std::vector<const FieldView*> column(records.size());
  for (const FieldView& model : first.fields) {
    // Check every record's field against the first record's, and find the longest first extent.
    int64_t max_len = 0;
    for (size_t i = 0; i < records.size(); ++i) {
      const FieldView* found = records[i].find(model.name);
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
    const at::ScalarType dtype = torch_dtype(model.dtype);
    at::Tensor values = pool ? pool->empty(shape, dtype) : at::empty(shape, at::TensorOptions().dtype(dtype));
    const int64_t row_bytes = values.numel() / B * static_cast<int64_t>(dtype_size(model.dtype));
    auto* base = static_cast<uint8_t*>(values.data_ptr());
    for (int64_t i = 0; i < B; ++i) {
      const std::span<const uint8_t> bytes = column[static_cast<size_t>(i)]->bytes;
      uint8_t* row = base + i * row_bytes;
      if (!bytes.empty()) std::memcpy(row, bytes.data(), bytes.size());
      std::memset(row + bytes.size(), 0, static_cast<size_t>(row_bytes) - bytes.size());
    }
    if (!model.shape.empty()) {
      at::Tensor length = at::empty({B}, at::kLong);
      int64_t* out = length.data_ptr<int64_t>();
      for (int64_t i = 0; i < B; ++i) out[i] = column[static_cast<size_t>(i)]->shape[0];
      batch.lengths[std::string(model.name)] = length;
    }
    batch.fields[std::string(model.name)] = values;
  }
  return batch;
}

CollatedBatch collate(const std::vector<Record>& records, const std::vector<int64_t>& keys,
                      const std::vector<std::string>& where) {
  std::vector<RecordView> views;
  views.reserve(records.size());
  for (const Record& record : records) views.push_back(RecordView::of(record));
  return collate(views, keys, where);
}

}  // namespace vimo::data
