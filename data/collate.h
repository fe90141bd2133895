// Defines collation: records of a batch → LibTorch tensors, padded along the first dimension, with lengths.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "data/shard.h"

namespace vimo::data {

// A batch of B records as tensors. Every record must have the same fields with the same dtype, rank and
// extents beyond the first; the first extent may differ and is zero-padded to the batch maximum.
struct CollatedBatch {
  std::map<std::string, at::Tensor> fields;   // name → [B, max_len, rest...] (rank-0 fields: [B])
  std::map<std::string, at::Tensor> lengths;  // name → [B] int64 first extents (fields of rank >= 1)
  at::Tensor keys;                            // [B] int64 sample keys (SampleRef::key)
  int64_t size() const { return keys.defined() ? keys.size(0) : 0; }
  // The field, or an error naming it and the fields present.
  const at::Tensor& field(const std::string& name) const;
  // [B, max_len] bool, true at the first `lengths[name]` positions.
  at::Tensor mask(const std::string& name) const;
};

at::ScalarType torch_dtype(DType dtype);

// Memory for batch tensors that is handed back when the last tensor using it is freed, and reused for the
// next batch of the same size. See Note [Why batches reuse their memory] in data/collate.cpp. Thread-safe;
// tensors may outlive the pool (their memory is then freed, not cached).
class TensorPool {
 public:
  // Keeps at most `max_cached_bytes` of freed memory for reuse.
  explicit TensorPool(size_t max_cached_bytes);
  // An uninitialised CPU tensor of `shape` and `dtype`, contiguous, 64-byte aligned.
  at::Tensor empty(at::IntArrayRef shape, at::ScalarType dtype);
  size_t cached_bytes() const;
  int64_t reused() const;  // allocations served from freed memory

 private:
  struct State;
  std::shared_ptr<State> state_;
};

// Where a record came from, for error messages: a shard file and record index ("shard F: record R"), or a
// caller's label alone when `record` < 0. Formatted only when an error names it, not per record.
struct RecordOrigin {
  std::string_view source;
  int64_t record = -1;
  std::string describe() const;
};

// Collates records one at a time, each as soon as it is read, into tensors of `capacity` rows: the loader's
// path, so that a record's bytes are copied into the batch while they are still in the core's cache (Note
// [Collating record by record] in data/collate.cpp). The first record sets the fields; a later record whose
// first extent is longer than any before regrows the tensors. Errors are collate()'s.
class Collator {
 public:
  Collator(int64_t capacity, TensorPool* pool);
  // Appends `record` (its views may be reused once this returns); `origin` names it for errors.
  void add(const RecordView& record, int64_t key, const RecordOrigin& origin);
  int64_t size() const { return static_cast<int64_t>(keys_.size()); }
  // The batch of the records added (fewer rows than `capacity` when fewer were added).
  CollatedBatch finish();

 private:
  struct Column {
    std::string name;
    DType dtype = DType::UInt8;
    std::vector<int64_t> shape;    // the first record's
    int64_t row_elements = 0;      // elements per row at the current padded length
    int64_t max_len = 0;           // the current padded first extent
    std::vector<int64_t> lengths;  // first extent of each record so far
    at::Tensor values;             // [capacity, max_len, rest...]
  };
  void grow(Column& column, int64_t max_len);
  at::Tensor allocate(const std::vector<int64_t>& shape, DType dtype);
  int64_t capacity_;
  TensorPool* pool_;
  std::vector<Column> columns_;
  std::vector<int64_t> keys_;
  std::string first_where_;
  std::vector<const FieldView*> found_;  // add()'s fields of the record, in column order
};

// `where[i]` names record i for errors (e.g. "shard /d/train/shard_00003.bin: record 17"). With a `pool`,
// the batch's tensors come from it.
CollatedBatch collate(const std::vector<RecordView>& records, const std::vector<int64_t>& keys,
                      const std::vector<std::string>& where, TensorPool* pool = nullptr);
CollatedBatch collate(const std::vector<Record>& records, const std::vector<int64_t>& keys,
                      const std::vector<std::string>& where);

}  // namespace vimo::data
