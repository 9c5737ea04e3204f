// Whole-file I/O for the project's file formats.
//
// read_file: the bytes of a regular file; errors name the path and the system's reason.
// write_file_atomically: a reader never sees a half-written file: write "<path>.tmp.<pid>.<n>" (n
// counts the process's temp files, so that threads saving one path do not share one), locked with
// flock while it is written, fsync it, rename it over `path`, fsync the directory. On failure the
// temp file is removed, `path` is left as it was, and an mmdit::Error names the path, the step and
// the system's reason. Only a regular file is replaced: a device, FIFO, symbolic link or
// directory at `path` is refused, naming what it is, before anything is written.
#pragma once

#include <cstdint>
#include <string>

#include "tensor/error.h"

namespace mmdit {

// A regular file open for reading (closed when this goes); its size as fstat gave it.
class RegularFile {
 public:
  explicit RegularFile(const std::string& path);
  ~RegularFile();
  RegularFile(const RegularFile&) = delete;
  RegularFile& operator=(const RegularFile&) = delete;
  int fd() const { return fd_; }
  int64_t size() const { return size_; }

 private:
  int fd_;
  int64_t size_ = 0;
};

std::string read_file(const std::string& path);
void write_file_atomically(const std::string& path, const std::string& bytes);
// Throws what write_file_atomically would for what is at `path` (only a regular file, or nothing,
// may be replaced): for a command to refuse before its work rather than after.
void check_replaceable(const std::string& path);

// For writers that produce the temp file themselves (e.g. a zip library): a fresh temp name, and
// the second half of the protocol (lock, fsync, rename, fsync the directory). Such a file is not
// locked while it is written: remove_stale_temp_files spares it for its live pid, but not from
// another pid namespace, where the pid may look dead.
std::string atomic_temp_path(const std::string& path);
void commit_temp_file(const std::string& tmp, const std::string& path);
// A process killed mid-write (SIGKILL, the OOM killer) leaves its "<path>.tmp.<pid>.<n>" behind,
// as large as a checkpoint: removes those of `path` (and an older version's "<path>.tmp.<pid>")
// whose pid names no process here and which no one holds locked, as a writer in another pid
// namespace (a container sharing the volume) does. Best effort.
void remove_stale_temp_files(const std::string& path);

// An exclusive flock on a directory, held while this lives: one writer at a time for a run's
// directory. Throws, naming the directory, when another process (or another DirectoryLock here)
// holds it. Where the file system cannot lock it, nothing is locked.
class DirectoryLock {
 public:
  // The lock is held by another: the one failure a caller may want to explain.
  class Busy : public Error {
   public:
    using Error::Error;
  };
  explicit DirectoryLock(const std::string& dir);
  ~DirectoryLock();
  DirectoryLock(const DirectoryLock&) = delete;
  DirectoryLock& operator=(const DirectoryLock&) = delete;

 private:
  int fd_;
};

// "runs/a/x.npy" -> "runs/a", "x.npy" -> ".", "/x" -> "/".
std::string parent_directory(const std::string& path);
// ".npz" for "runs/Demos.NPZ"; "" when the file name has no dot.
std::string lowercase_extension(const std::string& path);

}  // namespace mmdit
