// Reading and writing NumPy .npy files and .npz archives (a zip of .npy files).
//
// .npy layout: the magic "\x93NUMPY", a major and minor version byte, the header length
// (uint16 little-endian for version 1.0, uint32 for 2.0 and 3.0), the header (a Python dict
// literal such as "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }", space-padded
// and ending with '\n'), then the data in C order.
//
// Loading converts every simple numeric dtype exactly into ours:
//   f4 -> f32, f8 -> f64, f2 -> f32, b1 -> boolean (bytes must be 0 or 1),
//   i1 i2 i4 u1 u2 u4 -> f64, and i8 u8 -> f64 when |v| <= 2^53.
// Either byte order is accepted ('<', '>', '|' or '='); big-endian data is byte-swapped.
// Rejected with an error naming the dtype: complex, strings, objects, datetimes, structured
// dtypes; and fortran_order True.
//
// Files are untrusted input: every malformed file raises mmdit::Error whose message starts with
// the file name (and, inside an .npz, the array name) and says what is wrong. Nothing is read out
// of bounds, and allocations are bounded by the bytes actually present.
//
// Saving writes format 1.0 (2.0 when the header needs it) with dtypes '<f4', '<f8' and '|b1',
// and the header padded so the data starts 64-byte aligned, as NumPy does. .npz archives are
// written with stored (uncompressed) members named "<name>.npy", as np.savez does, dated
// 1980-01-01 (np.savez dates them now) so that the same arrays give the same bytes. Both savers
// are atomic: they write "<path>.tmp.<pid>.<n>", fsync it and rename it over `path`; on failure the
// temp file is removed and `path` is left as it was.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "tensor/named_tensors.h"

namespace mmdit {

Tensor load_npy(const std::string& path);
// Members keep the archive's order; names lose their ".npy" suffix ("observation.state.npy" ->
// "observation.state"). Members that are not .npy files are rejected; directory entries are
// skipped.
NamedTensors load_npz(const std::string& path);
// Only the arrays named in `keys`, each required (a missing one is named with the archive's
// arrays). Other members are skipped unread, whatever they hold: a dataset's images or strings
// cost nothing when only its state is wanted.
NamedTensors load_npz(const std::string& path, const std::vector<std::string>& keys);

void save_npy(const std::string& path, const Tensor& t);
void save_npz(const std::string& path, const NamedTensors& arrays);

// ---- lower level: the same formats in memory ----

// Parses the bytes of a .npy file; `what` (a path, or "path: array 'name'") starts every error.
Tensor parse_npy(const void* bytes, size_t size, const std::string& what);
// One .npy record at the start of `bytes`: its array, its dtype as the header gives it ('<i8',
// '<f4', ...: loading turns integers into floats, the descr still tells them apart), its shape
// and its length. With `whole`, the record must fill `size` exactly, as parse_npy requires;
// otherwise bytes may follow it, as in files of consecutive records (Equinox's
// tree_serialise_leaves). Without `read_data`, only the header is read and checked (value stays
// undefined): a reader can refuse what it does not want before converting anything.
struct NpyRecord {
  Tensor value;
  std::string descr;
  Shape shape;
  size_t bytes = 0;
};
NpyRecord parse_npy_record(const void* bytes, size_t size, const std::string& what, bool whole,
                           bool read_data = true);
// The bytes of a .npy file holding `t` (made contiguous as needed).
std::string serialize_npy(const Tensor& t);
// The bytes of an int64 ('<i8') .npy file: for integer arrays such as episode indices, which
// our dtypes do not hold but Python readers expect to be integers.
std::string serialize_npy_int64(const std::vector<int64_t>& values, const Shape& shape);
// Writes an .npz whose members are already serialized .npy files, (name without ".npy",
// bytes) in order, atomically as save_npz does.
void save_npz_members(const std::string& path,
                      const std::vector<std::pair<std::string, std::string>>& members);

}  // namespace mmdit
