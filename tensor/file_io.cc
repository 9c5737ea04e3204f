#include "tensor/file_io.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <exception>

#include "tensor/error.h"

namespace mmdit {
namespace {

// Makes a completed rename durable. Best effort: the new file is already in place, so a failure
// here must not be reported as a failed save.
void fsync_directory(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  (void)::fsync(fd);
  ::close(fd);
}

// Removes the temp file (closing `fd` after, when it is open, so that its lock covers the unlink).
[[noreturn]] void abandon(const std::string& tmp, int fd, const std::string& path, const char* step,
                          int err) {
  ::unlink(tmp.c_str());
  if (fd >= 0) ::close(fd);
  fail(path, ": ", step, " '", tmp, "' failed: ", std::strerror(err));
}

// Writable where it may be: NFS emulates flock with fcntl locks, whose exclusive lock needs a
// writable file. A file its owner may not write (a umask of 0222) is opened read-only, as fsync
// and a local flock need no more.
int open_for_lock(const std::string& path, int flags) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW | flags);
  if (fd >= 0 || (errno != EACCES && errno != EROFS)) return fd;
  return ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | flags);
}

int lock_file(int fd, int operation) {
  int rc;
  do rc = ::flock(fd, operation);
  while (rc != 0 && errno == EINTR);
  return rc;
}

bool is_unlinked(int fd) {
  struct stat st {};
  return ::fstat(fd, &st) == 0 && st.st_nlink == 0;
}

const char* file_kind(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISLNK(mode)) return "a symbolic link";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a regular file";
}

}  // namespace

// The rename would put a regular file in the place of whatever is at `path`: a device such as
// /dev/null (the save run as root replaced it), a FIFO, or a symbolic link, which would lose its
// target.
void check_replaceable(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0 || S_ISREG(st.st_mode)) return;
  fail(path, ": is ", file_kind(st.st_mode),
       ", which a save would replace with a regular file; give the path of a regular file");
}

namespace {

// The lock tells remove_stale_temp_files that the file is being written: a writer in another pid
// namespace (a container sharing the volume) has a pid that looks dead from here. The cleanup may
// lock the file between our open and our flock; it unlinks the file before letting go, so a file
// found unlinked once locked is given up for a new name. A file system without flock (ENOLCK)
// gets no lock: the save goes on, and the cleanup, which cannot lock either, leaves the file.
int create_locked_temp_file(const std::string& path, std::string& tmp) {
  check_replaceable(path);
  for (int attempt = 0;; ++attempt) {
    tmp = atomic_temp_path(path);
    // O_EXCL: a writer in another pid namespace can have our pid, a dead process our name.
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0) {
      if (errno == EEXIST && attempt < 100) continue;
      if (errno == ENAMETOOLONG)
        fail(path, ": cannot create temporary file '", tmp, "': ", std::strerror(errno),
             " (the file name with the temporary suffix passes the file system's limit; choose a "
             "name some 20 characters shorter)");
      fail(path, ": cannot create temporary file '", tmp, "': ", std::strerror(errno));
    }
    if (lock_file(fd, LOCK_EX) != 0 || !is_unlinked(fd)) return fd;
    ::close(fd);
  }
}

// fsync, rename, then close: the lock is held until the file has left its temp name.
void commit_locked(int fd, const std::string& tmp, const std::string& path) {
  if (::fsync(fd) != 0) abandon(tmp, fd, path, "fsync of", errno);
  if (::rename(tmp.c_str(), path.c_str()) != 0) abandon(tmp, fd, path, "renaming", errno);
  ::close(fd);  // its errors are the write's, which the fsync above has reported
  fsync_directory(parent_directory(path));
}

}  // namespace

namespace {

// Opening a FIFO to read waits for a writer, forever if none comes, before fstat could refuse
// it: O_NONBLOCK returns at once. On a regular file it only makes the open fail with EWOULDBLOCK
// where it would wait for another process's write lease to be broken, and that open is
// repeated without it.
int open_to_read(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd >= 0 || errno != EWOULDBLOCK) return fd;
  return ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
}

}  // namespace

RegularFile::RegularFile(const std::string& path) : fd_(open_to_read(path)) {
  if (fd_ < 0) fail(path, ": cannot open: ", std::strerror(errno));
  struct stat st {};
  const bool stat_ok = ::fstat(fd_, &st) == 0;
  const int error = errno;
  if (!stat_ok || !S_ISREG(st.st_mode)) {
    ::close(fd_);  // no destructor runs for a constructor that throws
    if (!stat_ok) fail(path, ": cannot stat: ", std::strerror(error));
    fail(path, ": not a regular file");
  }
  size_ = st.st_size;
}

RegularFile::~RegularFile() {
  ::close(fd_);
}

std::string read_file(const std::string& path) {
  const RegularFile file(path);
  const int fd = file.fd();
  std::string bytes;
  try {
    bytes.resize(static_cast<size_t>(file.size()));
  } catch (const std::exception&) {  // bad_alloc, length_error
    fail(path, ": file of ", file.size(), " bytes is too large to read into memory");
  }
  size_t done = 0;
  for (;;) {
    if (done == bytes.size()) bytes.resize(bytes.size() + 4096);  // the file grew meanwhile
    const ssize_t n = ::read(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail(path, ": read failed: ", std::strerror(errno));
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  bytes.resize(done);
  return bytes;
}

std::string atomic_temp_path(const std::string& path) {
  // Threads of one process saving the same path each need their own file: with one name, each
  // truncated the other's and the rename could publish a mix.
  static std::atomic<uint64_t> next{0};
  return str_cat(path, ".tmp.", ::getpid(), ".", next.fetch_add(1, std::memory_order_relaxed));
}

void commit_temp_file(const std::string& tmp, const std::string& path) {
  try {
    check_replaceable(path);
  } catch (const Error&) {
    ::unlink(tmp.c_str());
    throw;
  }
  const int fd = open_for_lock(tmp, 0);
  if (fd < 0) abandon(tmp, -1, path, "reopening", errno);
  (void)lock_file(fd, LOCK_EX);  // best effort, as for the files written here
  commit_locked(fd, tmp, path);
}

DirectoryLock::DirectoryLock(const std::string& dir)
    : fd_(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)) {
  if (fd_ < 0) fail(dir, ": cannot open the directory to lock it: ", std::strerror(errno));
  if (lock_file(fd_, LOCK_EX | LOCK_NB) == 0) return;
  const int error = errno;
  ::close(fd_);
  fd_ = -1;
  // Best effort, as for the temp files: a file system that cannot lock (ENOLCK, or a network
  // file system refusing flock on a directory) goes on unlocked rather than refusing the run.
  if (error == EWOULDBLOCK) throw Busy(str_cat(dir, ": another process holds its lock"));
}

DirectoryLock::~DirectoryLock() {
  if (fd_ >= 0) ::close(fd_);
}

std::string parent_directory(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::string lowercase_extension(const std::string& path) {
  const size_t dot = path.find_last_of('.'), slash = path.find_last_of('/');
  if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) return "";
  std::string ext = path.substr(dot);
  for (char& c : ext) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return ext;
}

namespace {

// The pid in "<pid>" (an older version's name) or "<pid>.<n>"; 0 for any other name.
pid_t temp_file_pid(const char* begin, const char* end) {
  pid_t pid = 0;
  auto [p, ec] = std::from_chars(begin, end, pid);
  if (ec != std::errc() || pid <= 0) return 0;
  if (p != end) {
    uint64_t n = 0;
    if (*p != '.') return 0;
    const auto [q, ec2] = std::from_chars(p + 1, end, n);
    if (ec2 != std::errc() || q != end) return 0;
  }
  return pid;
}

}  // namespace

void remove_stale_temp_files(const std::string& path) {
  const std::string dir = parent_directory(path);
  const size_t slash = path.find_last_of('/');
  const std::string prefix = (slash == std::string::npos ? path : path.substr(slash + 1)) + ".tmp.";
  DIR* listing = ::opendir(dir.c_str());
  if (!listing) return;
  while (const dirent* entry = ::readdir(listing)) {
    const std::string name = entry->d_name;
    if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0) continue;
    const pid_t pid = temp_file_pid(name.data() + prefix.size(), name.data() + name.size());
    // A live pid keeps its file: a writer of this namespace that holds no lock (an older version,
    // or a zip library between its own rename and commit_temp_file) is still writing.
    if (pid == 0 || ::kill(pid, 0) == 0 || errno != ESRCH) continue;
    const std::string file = dir + "/" + name;
    const int fd = open_for_lock(file, O_NONBLOCK);
    if (fd < 0) continue;
    // A writer in another pid namespace looks dead here; its lock says otherwise. The name must
    // still be the locked file's: it may have been renamed away and taken by a new writer since.
    struct stat locked {};
    struct stat named {};
    if (lock_file(fd, LOCK_EX | LOCK_NB) == 0 && ::fstat(fd, &locked) == 0 &&
        ::lstat(file.c_str(), &named) == 0 && locked.st_dev == named.st_dev &&
        locked.st_ino == named.st_ino)
      ::unlink(file.c_str());
    ::close(fd);
  }
  ::closedir(listing);
}

void write_file_atomically(const std::string& path, const std::string& bytes) {
  std::string tmp;
  const int fd = create_locked_temp_file(path, tmp);
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) abandon(tmp, fd, path, "writing", n < 0 ? errno : EIO);
    done += static_cast<size_t>(n);
  }
  commit_locked(fd, tmp, path);
}

}  // namespace mmdit
