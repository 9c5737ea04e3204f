// Reading and writing Hugging Face safetensors files.
//
// Layout: an 8-byte little-endian uint64 N, N bytes of UTF-8 JSON (the header), then the data
// buffer. The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}
// (offsets relative to the start of the buffer, data little-endian and row-major) and may hold a
// "__metadata__" object of string -> string.
//
// Loading accepts every dtype that converts exactly into ours:
//   F32 -> f32, F64 -> f64, BOOL -> boolean (bytes must be 0 or 1),
//   F16, BF16 -> f32 (exact, including subnormals, infinities and NaN),
//   I8, I16, I32, U8, U16, U32 -> f64, and I64, U64 -> f64 when |v| <= 2^53.
// Anything else (F8 variants, complex, ...) is rejected with an error naming the dtype.
//
// Files are untrusted input: every malformed header or buffer raises mmdit::Error whose message
// starts with the file name (`what`), names the tensor when one is involved and says what is
// wrong. Nothing is read out of bounds and allocations are bounded by a multiple of the file size
// (the file itself, and its tensors as converted: 8 bytes per element of a 1-byte integer type;
// headers above 100 MB are rejected, as the reference implementation does). Overlapping data ranges
// are rejected; gaps between ranges are tolerated.
//
// Saving writes F32, F64 and BOOL, and BF16 when asked (StoredFloats below). The layout matches the
// reference writer, so the reference loader (which requires the data ranges to tile the buffer with
// no gaps) reads our files: the JSON header is padded with spaces to a multiple of 8 bytes, and the
// tensors are laid out back to back in order of decreasing element size (f64, then f32, then bool;
// insertion order within a dtype), so every tensor starts at an offset that is a multiple of its
// element size and the buffer itself starts 8-byte aligned in the file.
#pragma once

#include <cstddef>
#include <map>
#include <string>

#include "tensor/named_tensors.h"

namespace mmdit {

struct SafetensorsFile {
  // In order of data offset (which, for files written by save_safetensors with a single dtype,
  // is the insertion order of the saved NamedTensors).
  NamedTensors tensors;
  std::map<std::string, std::string> metadata;  // the "__metadata__" object, empty if absent
};

// Reads and parses a whole file. A missing or unreadable file raises an Error with the path and
// the system's reason.
SafetensorsFile load_safetensors(const std::string& path);

// The "__metadata__" object alone (empty if absent), reading only the file's header: the length
// and the header JSON are checked as load_safetensors checks them, the tensors are not read.
std::map<std::string, std::string> load_safetensors_metadata(const std::string& path);

// Parses a file's bytes already in memory; `what` (usually the path) starts every error message.
// The returned tensors own their storage and do not refer to `bytes`.
SafetensorsFile parse_safetensors(const void* bytes, size_t size, const std::string& what);

// How float tensors are stored: as they are (F32, F64), or as BF16, rounded to the nearest
// bfloat16, ties to even (half the bytes of float32, for weights shipped to a robot; loading
// widens them back to float32 exactly). A finite value that would round past bfloat16's range
// is an error naming the tensor.
enum class StoredFloats { as_is, bf16 };

// The bytes of a safetensors file holding `tensors` (made contiguous as needed) and `metadata`
// ("__metadata__" is omitted when `metadata` is empty). A tensor may not be named
// "__metadata__"; names and metadata must be valid UTF-8.
std::string serialize_safetensors(const NamedTensors& tensors,
                                  const std::map<std::string, std::string>& metadata = {},
                                  StoredFloats floats = StoredFloats::as_is);

// Writes atomically: serializes, writes "<path>.tmp.<pid>.<n>", fsyncs it, renames it over `path`
// and fsyncs the directory. On any failure the temp file is removed, `path` is left as it was
// (absent or with its old contents) and an Error names the path and the system's reason.
void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata = {},
                      StoredFloats floats = StoredFloats::as_is);

}  // namespace mmdit
