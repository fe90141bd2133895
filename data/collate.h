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

// Where a record came from, for error messages: a shard file and record index, with the record's byte offset
// when its `shard` is given ("shard F: record R at offset O"), or a caller's label alone when `record` < 0.
// Formatted only when an error names it, not per record.
struct RecordOrigin {
  std::string_view source;
  int64_t record = -1;
  const ShardReader* shard = nullptr;  // the reader of `source`, alive while the origin is used
  std::string describe() const;
  uint64_t offset() const;  // the record's byte offset in `shard`, or 0 without one
};

// An extent of a FieldSpec that matches any.
inline constexpr int64_t kAnyExtent = -1;

struct FieldSpec {
  std::string name;
  DType dtype = DType::UInt8;
  std::vector<int64_t> shape;  // extents, kAnyExtent where any is accepted
  // For an int64 field: every value must lie in [min_value, max_value] (token ids within the vocabulary,
  // frame counts within the frames). Unchecked when min_value > max_value (the default).
  int64_t min_value = 0;
  int64_t max_value = -1;
  bool checks_values() const { return dtype == DType::Int64 && min_value <= max_value; }
};

// What every record of a batch must hold: named fields of a dtype and shape, and for int64 fields values in a
// range (fields it does not name are not collated). A record that lacks one, or holds it with another dtype,
// rank or extent, or a value out of its range, is corrupt data:
// the Collator throws CorruptDataError naming its file, record and offset, which the loader skips and counts
// with skip_corrupt (Note [One schema per split] in data/loader.cpp).
struct RecordSchema {
  std::vector<FieldSpec> fields;
  std::string source;  // who requires it, for errors: "the split's first record, shard F: record 0 ..."
  bool empty() const { return fields.empty(); }
  // `record`'s fields with their first extent free: what collation needs of every record of a batch.
  static RecordSchema of(const RecordView& record, std::string source);
};

// Collates records one at a time, each as soon as it is read, into tensors of `capacity` rows: the loader's
// path, so that a record's bytes are copied into the batch while they are still in the core's cache (Note
// [Collating record by record] in data/collate.cpp). Every record is checked against `schema` (which must
// outlive the collator) or, without one, against the first record added. A later record whose first extent
// is longer than any before regrows the tensors. A record that does not fit throws CorruptDataError and
// leaves no row.
class Collator {
 public:
  Collator(int64_t capacity, TensorPool* pool, const RecordSchema* schema = nullptr);
  // Appends `record` (its views may be reused once this returns); `origin` names it for errors.
  void add(const RecordView& record, int64_t key, const RecordOrigin& origin);
  int64_t size() const { return static_cast<int64_t>(keys_.size()); }
  // The batch of the records added (fewer rows than `capacity` when fewer were added). With a schema and no
  // record, its fields with no rows (extents that match any are 0).
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
  const RecordSchema& schema() const { return given_schema_ ? *given_schema_ : first_schema_; }
  [[noreturn]] void reject(const RecordOrigin& origin, const FieldSpec& spec, const FieldView* field) const;
  void check_values(const RecordOrigin& origin, const FieldSpec& spec, const FieldView& field) const;
  void start_columns();  // from found_, or from the schema alone when found_ is empty
  void grow(Column& column, int64_t max_len);
  at::Tensor allocate(const std::vector<int64_t>& shape, DType dtype);
  int64_t capacity_;
  TensorPool* pool_;
  const RecordSchema* given_schema_;
  RecordSchema first_schema_;  // without a given schema: the first record's (its source set on error only)
  std::string first_source_;   // the first record's origin, described on error only
  int64_t first_record_ = -1;
  const ShardReader* first_shard_ = nullptr;
  std::vector<Column> columns_;
  std::vector<int64_t> keys_;
  std::vector<const FieldView*> found_;  // add()'s fields of the record, in column order
};

// `where[i]` names record i for errors (e.g. "shard /d/train/shard_00003.bin: record 17"). With a `pool`,
// the batch's tensors come from it. Every record must fit the first one (a Collator without a schema).
CollatedBatch collate(const std::vector<RecordView>& records, const std::vector<int64_t>& keys,
                      const std::vector<std::string>& where, TensorPool* pool = nullptr);
CollatedBatch collate(const std::vector<Record>& records, const std::vector<int64_t>& keys,
                      const std::vector<std::string>& where);

}  // namespace vimo::data
