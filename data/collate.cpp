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

// Note [Collating record by record]
// A loader worker reads a batch of 64 records of ~20 KB. Read all first and collated after, each record's
// bytes were evicted from the core's cache (1.3 MB of buffers, then 1.3 MB of batch) before collation copied
// them, so every byte crossed the memory bus twice more; with two workers the loader then ran no faster than
// with one (`vimo bench data`: memory bandwidth, not the CPU, was the limit). The Collator copies each
// record into the batch as soon as it is read, from one reused buffer that stays in cache. The catch is the
// padding: the batch's padded length is the longest record's, unknown until the last one is read. The
// tensors start at the first record's length; a longer record regrows them (a new tensor, the rows so far
// copied over). Records of one length (the retrieval data) never regrow; for random lengths a batch of B
// regrows about ln B times, on average over a quarter of the rows each time.
at::Tensor Collator::allocate(const std::vector<int64_t>& shape, DType dtype) {
  const at::ScalarType type = torch_dtype(dtype);
  // Not at::zeros: it fills in an intra-op parallel region, which costs a thread handoff per field on a busy
  // machine; each row is copied and only its padding cleared.
  return pool_ ? pool_->empty(shape, type) : at::empty(shape, at::TensorOptions().dtype(type));
}

void Collator::grow(Column& column, int64_t max_len) {
  std::vector<int64_t> shape = {capacity_, max_len};
  shape.insert(shape.end(), column.shape.begin() + 1, column.shape.end());
  at::Tensor values = allocate(shape, column.dtype);
  const auto element = static_cast<int64_t>(dtype_size(column.dtype));
  const int64_t old_row = column.row_elements * element;
  const int64_t new_row = values.numel() / capacity_ * element;
  const auto* from = static_cast<const uint8_t*>(column.values.data_ptr());
  auto* to = static_cast<uint8_t*>(values.data_ptr());
  for (int64_t i = 0; i < size(); ++i) {  // rows so far: copy, then zero the longer padding
    std::memcpy(to + i * new_row, from + i * old_row, static_cast<size_t>(old_row));
    std::memset(to + i * new_row + old_row, 0, static_cast<size_t>(new_row - old_row));
  }
  column.values = values;
  column.max_len = max_len;
  column.row_elements = values.numel() / capacity_;
}

uint64_t RecordOrigin::offset() const {
  if (!shard || record < 0) return 0;
  return shard->record_offset(static_cast<uint64_t>(record));
}

std::string RecordOrigin::describe() const {
  if (record < 0) return std::string(source);
  if (!shard) return fmt::format("shard {}: record {}", source, record);
  return fmt::format("shard {}: record {} at offset {}", source, record, offset());
}

RecordSchema RecordSchema::of(const RecordView& record, std::string source) {
  RecordSchema schema;
  schema.source = std::move(source);
  for (const FieldView& field : record.fields) {
    FieldSpec spec{std::string(field.name), field.dtype, field.shape};
    if (!spec.shape.empty()) spec.shape[0] = kAnyExtent;
    schema.fields.push_back(std::move(spec));
  }
  return schema;
}

namespace {

bool fits(const FieldView& field, const FieldSpec& spec) {
  if (field.dtype != spec.dtype || field.shape.size() != spec.shape.size()) return false;
  for (size_t d = 0; d < spec.shape.size(); ++d) {
    if (spec.shape[d] != kAnyExtent && spec.shape[d] != field.shape[d]) return false;
  }
  return true;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text;
  for (size_t d = 0; d < shape.size(); ++d) {
    text += (d ? ", " : "") + (shape[d] == kAnyExtent ? std::string("*") : std::to_string(shape[d]));
  }
  return text;
}

[[noreturn]] void throw_corrupt(const RecordOrigin& origin, const std::string& what) {
  throw CorruptDataError(fmt::format("{}: {}", origin.describe(), what), std::string(origin.source),
                         origin.record, origin.offset());
}

}  // namespace

Collator::Collator(int64_t capacity, TensorPool* pool, const RecordSchema* schema)
    : capacity_(capacity), pool_(pool), given_schema_(schema) {
  keys_.reserve(static_cast<size_t>(capacity));
}

void Collator::reject(const RecordOrigin& origin, const FieldSpec& spec, const FieldView* field) const {
  const std::string source = given_schema_
                                 ? given_schema_->source
                                 : "the batch's first record, " +
                                       RecordOrigin{first_source_, first_record_, first_shard_}.describe();
  const std::string expected =
      fmt::format("expected {} [{}] ({})", dtype_name(spec.dtype), shape_text(spec.shape), source);
  if (!field) throw_corrupt(origin, fmt::format("missing field '{}', {}", spec.name, expected));
  throw_corrupt(origin, fmt::format("field '{}' is {} [{}], {}", spec.name, dtype_name(field->dtype),
                                    shape_text(field->shape), expected));
}

void Collator::check_values(const RecordOrigin& origin, const FieldSpec& spec, const FieldView& field) const {
  const size_t count = field.bytes.size() / sizeof(int64_t);
  for (size_t i = 0; i < count; ++i) {
    int64_t value = 0;
    std::memcpy(&value, field.bytes.data() + i * sizeof(int64_t), sizeof(value));  // the bytes are unaligned
    if (value < spec.min_value || value > spec.max_value) {
      throw_corrupt(origin, fmt::format("field '{}' holds {} at element {}, outside [{}, {}] ({})", spec.name,
                                        value, i, spec.min_value, spec.max_value, schema().source));
    }
  }
}

void Collator::start_columns() {
  const std::vector<FieldSpec>& specs = schema().fields;
  columns_.clear();
  for (size_t c = 0; c < specs.size(); ++c) {
    Column column;
    column.name = specs[c].name;
    column.dtype = specs[c].dtype;
    // The record's extents, or with no record (an empty batch) the schema's, 0 where any would do.
    column.shape = found_.empty() ? specs[c].shape : found_[c]->shape;
    for (int64_t& extent : column.shape) extent = std::max<int64_t>(extent, 0);
    column.lengths.reserve(static_cast<size_t>(capacity_));
    std::vector<int64_t> shape = {capacity_};
    shape.insert(shape.end(), column.shape.begin(), column.shape.end());
    column.values = allocate(shape, column.dtype);
    column.max_len = column.shape.empty() ? 0 : column.shape[0];
    column.row_elements = column.values.numel() / std::max<int64_t>(capacity_, 1);
    columns_.push_back(std::move(column));
  }
}

void Collator::add(const RecordView& record, int64_t key, const RecordOrigin& origin) {
  if (size() == capacity_) throw std::logic_error("Collator: more records than its capacity");
  if (keys_.empty() && !given_schema_) first_schema_ = RecordSchema::of(record, "");
  // Check every field before copying any, so that a bad record leaves no row.
  const std::vector<FieldSpec>& specs = schema().fields;
  std::vector<const FieldView*>& found = found_;  // reused: no allocation per record
  found.resize(specs.size());
  for (size_t c = 0; c < specs.size(); ++c) {
    found[c] = record.find(specs[c].name);
    if (!found[c] || !fits(*found[c], specs[c])) reject(origin, specs[c], found[c]);
    if (specs[c].checks_values()) check_values(origin, specs[c], *found[c]);
  }
  if (keys_.empty()) {
    first_source_ = std::string(origin.source);
    first_record_ = origin.record;
    first_shard_ = origin.shard;
    start_columns();
  }
  for (size_t c = 0; c < columns_.size(); ++c) {
    // A schema's extent that matches any, past the first: collation still needs the batch's to agree.
    const Column& column = columns_[c];
    const std::vector<int64_t>& shape = found[c]->shape;
    if (shape.size() > 1 && !std::equal(shape.begin() + 1, shape.end(), column.shape.begin() + 1)) {
      throw_corrupt(origin,
                    fmt::format("field '{}' is {} [{}], but the batch's first record, {}, has [{}] (only the "
                                "first extent may differ within a batch)",
                                column.name, dtype_name(found[c]->dtype), shape_text(shape),
                                RecordOrigin{first_source_, first_record_, first_shard_}.describe(),
                                shape_text(column.shape)));
    }
  }
  const int64_t row = size();
  for (size_t c = 0; c < columns_.size(); ++c) {
    Column& column = columns_[c];
    const FieldView& field = *found[c];
    if (!column.shape.empty()) {
      if (field.shape[0] > column.max_len) grow(column, field.shape[0]);
      column.lengths.push_back(field.shape[0]);
    }
    const int64_t row_bytes = column.row_elements * static_cast<int64_t>(dtype_size(column.dtype));
    uint8_t* out = static_cast<uint8_t*>(column.values.data_ptr()) + row * row_bytes;
    if (!field.bytes.empty()) std::memcpy(out, field.bytes.data(), field.bytes.size());
    std::memset(out + field.bytes.size(), 0, static_cast<size_t>(row_bytes) - field.bytes.size());
  }
  keys_.push_back(key);
}

CollatedBatch Collator::finish() {
  CollatedBatch batch;
  const int64_t rows = size();
  if (rows == 0) {
    found_.clear();
    start_columns();
  }
  batch.keys = at::tensor(keys_, at::kLong);
  for (Column& column : columns_) {
    // Fewer rows than the capacity (records skipped as corrupt): the leading rows, still contiguous.
    batch.fields[column.name] = rows == capacity_ ? column.values : column.values.narrow(0, 0, rows);
    if (!column.shape.empty()) batch.lengths[column.name] = at::tensor(column.lengths, at::kLong);
  }
  return batch;
}

CollatedBatch collate(const std::vector<RecordView>& records, const std::vector<int64_t>& keys,
                      const std::vector<std::string>& where, TensorPool* pool) {
  if (keys.size() != records.size() || where.size() != records.size()) {
    throw std::logic_error("collate: records, keys and names differ in length");
  }
  Collator collator(static_cast<int64_t>(records.size()), pool);
  for (size_t i = 0; i < records.size(); ++i) collator.add(records[i], keys[i], {where[i]});
  return collator.finish();
}

CollatedBatch collate(const std::vector<Record>& records, const std::vector<int64_t>& keys,
                      const std::vector<std::string>& where) {
  std::vector<RecordView> views;
  views.reserve(records.size());
  for (const Record& record : records) views.push_back(RecordView::of(record));
  return collate(views, keys, where);
}

}  // namespace vimo::data
