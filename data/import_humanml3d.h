// Defines the HumanML3D importer (`vimo data import humanml3d SRC OUT`): the public HumanML3D layout in,
// motion shards out (DatasetWriter, kind "motion"), with the sample rules of the T2M / T2M-GPT loaders.
//
// Input layout (as distributed; KIT-ML has the same layout: set feature_dim 251, fps 12.5, min_length 24):
//   SRC/new_joint_vecs/<name>.npy   [T, 263] float32 (float64 / float16 accepted, stored as float32)
//   SRC/texts/<name>.txt            one caption per line: caption#tagged tokens#from#to, e.g.
//                                   "a man walks forward.#a/DET man/NOUN walk/VERB forward/ADV#0.0#0.0"
//   SRC/{train,val,test}.txt        one motion name per line (mirrored motions are the names "M<name>")
//   SRC/Mean.npy, SRC/Std.npy       [263] feature statistics
//
// Note [HumanML3D sample rules] (Text2MotionDataset in T2M-GPT's dataset_TM_eval.py, which the VimoRAG
// evaluation inherits):
//   - a motion with T < min_length (40) or T >= max_length (200) frames is dropped, with all its captions;
//   - from/to are seconds at `fps` (20); from == to == 0 (NaN counts as 0) means the whole motion: those
//     captions form one sample of the whole motion;
//   - any other from/to makes a separate one-caption sample of frames [int(from*fps), int(to*fps)) (float64
//     product truncated toward zero, slice clamped to [0, T] as Python does), itself dropped when shorter
//     than min_length or at least max_length frames;
//   - a motion with no whole-motion caption yields only its segment samples.
// Deviations, each counted in the report instead of the original's silent `except: pass`: names whose
// motion or text file is missing (an error with `strict`); lines that do not parse (fewer than 4 '#'
// fields, a from/to that is not a number, negative or infinite; an error with `strict`). Extra '#' inside
// a caption are kept: the last three fields are tokens, from and to. Blank lines, trailing whitespace and
// CRLF are ignored in text and split files, and so is a UTF-8 byte order mark. A name listed twice in a split
// is imported once; a name listed in two splits is an error naming both lines (the motion would be trained on
// and tested on), and so is a name that is not a file stem ("../x"). Mean.npy and Std.npy must be float
// [feature_dim], finite, with every std positive.
//
// Output records (one per sample), in split-file order, a motion's whole sample before its segments:
//   id        Int64   [1]        sample index within the split
//   name      UInt8   [len]      the motion name, or "<name>[begin:end]" for a segment sample
//   motion    Float32 [T, 263]   raw features (normalize with mean.npy / std.npy)
//   captions  UInt8   [len]      the sample's captions joined by '\n'
//   tokens    UInt8   [len]      their tagged tokens ("a/DET man/NOUN ..."), joined by '\n' likewise
//   length    Int64   [1]        T
//   range     Int64   [2]        [begin, end) frames of the source motion (0, T for the whole motion)
// Extra files: mean.npy, std.npy ([263] float32). Metadata "humanml3d": options and the report.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "data/dataset_writer.h"

namespace vimo::data {

struct HumanML3DImportOptions {
  std::vector<std::string> splits = {"train", "val", "test"};  // SRC/<split>.txt each, all required
  int64_t feature_dim = 263;                                   // 251 for KIT-ML
  double fps = 20.0;                                           // 12.5 for KIT-ML; at most 1000
  int64_t min_length = 40;                                     // frames; shorter samples are dropped
  int64_t max_length = 200;  // frames; samples this long or longer are dropped
  bool strict = false;       // missing files and unparsable caption lines are errors instead of counted skips
  DatasetWriterOptions writer;
};

// What happened to one split's names and captions.
struct HumanML3DSplitReport {
  int64_t names = 0;              // distinct names listed in the split file
  int64_t duplicate_names = 0;    // repeated lines of the split file (imported once)
  int64_t missing_motion = 0;     // new_joint_vecs/<name>.npy absent
  int64_t missing_text = 0;       // texts/<name>.txt absent (motion present)
  int64_t motions_too_short = 0;  // whole motion below min_length (its segments are not considered)
  int64_t motions_too_long = 0;   // whole motion at or above max_length
  int64_t segments_too_short = 0;
  int64_t segments_too_long = 0;
  int64_t bad_caption_lines = 0;           // lines that do not parse (see the Note)
  int64_t motions_without_samples = 0;     // kept motions whose captions produced no sample
  int64_t whole_samples = 0;               // records of whole motions
  int64_t segment_samples = 0;             // records of sub-segments
  int64_t captions = 0;                    // captions in all records
  std::vector<std::string> missing_names;  // the first 20 missing names, for the summary
  int64_t records() const { return whole_samples + segment_samples; }
};

struct HumanML3DImportReport {
  std::map<std::string, HumanML3DSplitReport> splits;
  // One line per split: "train: 1200 records (1000 whole, 200 segments), dropped 3 short / 5 long motions,
  // ...".
  std::string summary() const;
};

// Imports SRC (the layout above) into the dataset directory `out`. Throws std::runtime_error naming the
// file (and line) for bad input: a split file or Mean/Std missing, a malformed or truncated .npy, a motion
// whose width is not feature_dim; with `strict`, also for missing files and unparsable caption lines.
HumanML3DImportReport import_humanml3d(const std::string& source, const std::string& out,
                                       const HumanML3DImportOptions& options = {});

// One parsed line of a texts/<name>.txt file (exposed for tests).
struct HumanML3DCaption {
  std::string caption, tokens;
  double from = 0.0, to = 0.0;  // seconds; NaN already replaced by 0
};
// Parses one line (already stripped of the line break); throws std::runtime_error with `where` (file:line)
// for a line that does not parse.
HumanML3DCaption parse_humanml3d_caption(const std::string& line, const std::string& where);

// The non-blank lines of a text file, each with its 1-based line number, with leading and trailing
// whitespace (and the CR of CRLF) removed as Python's str.strip() does, and a UTF-8 byte order mark at the
// start of the file dropped (Windows editors write one; it would stick to the first name). Shared by the
// importers; throws std::runtime_error naming the file when it cannot be read.
struct NumberedLine {
  int64_t number;
  std::string text;
};
std::vector<NumberedLine> read_trimmed_lines(const std::string& path);

// Throws std::runtime_error "<where>: invalid <what> '<stem>'" unless `stem` names a file inside one folder:
// not empty, no '/' or NUL, not "." or "..". Names read from input files become paths (<folder>/<stem>.npy),
// and "../x" would read from outside the folder.
void check_file_stem(const std::string& stem, const std::string& what, const std::string& where);

}  // namespace vimo::data
