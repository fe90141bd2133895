// Defines repack_dataset (`vimo data pack`): rewrites a dataset with another shard size or compression,
// record for record, verifying every record's checksum on the way.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "data/dataset_writer.h"

namespace vimo::data {

struct PackReport {
  uint64_t records = 0, shards_in = 0, shards_out = 0, bytes_in = 0, bytes_out = 0;
};

// Reads every split of the dataset at `source` in manifest order and writes it to `out` (which must differ)
// with `options`; extra files and metadata are carried over. `progress(records_done, records_total)` is
// called every few thousand records when given.
PackReport repack_dataset(const std::string& source, const std::string& out,
                          const DatasetWriterOptions& options,
                          const std::function<void(uint64_t, uint64_t)>& progress = {});

}  // namespace vimo::data
