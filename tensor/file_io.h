// Whole-file I/O for the project's file formats.
//
// read_file: the bytes of a regular file; errors name the path and the system's reason.
// write_file_atomically: a reader never sees a half-written file: write "<path>.tmp.<pid>", fsync
// it, rename it over `path`, fsync the directory. On failure the temp file is removed, `path` is
// left as it was, and an mmdit::Error names the path, the step and the system's reason.
#pragma once

#include <string>

namespace mmdit {

std::string read_file(const std::string& path);
void write_file_atomically(const std::string& path, const std::string& bytes);

// For writers that produce the temp file themselves (e.g. a zip library): the temp name to use,
// and the second half of the protocol (fsync, rename, fsync the directory).
std::string atomic_temp_path(const std::string& path);
void commit_temp_file(const std::string& tmp, const std::string& path);
// A process killed mid-write (SIGKILL, the OOM killer) leaves its "<path>.tmp.<pid>" behind, as
// large as a checkpoint: removes those of `path` whose process no longer runs. Best effort.
void remove_stale_temp_files(const std::string& path);

// "runs/a/x.npy" -> "runs/a", "x.npy" -> ".", "/x" -> "/".
std::string parent_directory(const std::string& path);
// ".npz" for "runs/Demos.NPZ"; "" when the file name has no dot.
std::string lowercase_extension(const std::string& path);

}  // namespace mmdit
