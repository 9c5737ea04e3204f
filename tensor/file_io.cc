#include "tensor/file_io.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

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

[[noreturn]] void abandon(const std::string& tmp, const std::string& path, const char* step,
                          int err) {
  ::unlink(tmp.c_str());
  fail(path, ": ", step, " '", tmp, "' failed: ", std::strerror(err));
}

}  // namespace

std::string read_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, ": cannot open: ", std::strerror(errno));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) fail(path, ": cannot stat: ", std::strerror(errno));
  if (!S_ISREG(st.st_mode)) fail(path, ": not a regular file");
  std::string bytes;
  try {
    bytes.resize(static_cast<size_t>(st.st_size));
  } catch (const std::exception&) {  // bad_alloc, length_error
    fail(path, ": file of ", st.st_size, " bytes is too large to read into memory");
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
  return str_cat(path, ".tmp.", ::getpid());
}

void commit_temp_file(const std::string& tmp, const std::string& path) {
  const int fd = ::open(tmp.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) abandon(tmp, path, "reopening", errno);
  const int sync_rc = ::fsync(fd);
  const int sync_err = errno;
  ::close(fd);
  if (sync_rc != 0) abandon(tmp, path, "fsync of", sync_err);
  if (::rename(tmp.c_str(), path.c_str()) != 0) abandon(tmp, path, "renaming", errno);
  fsync_directory(parent_directory(path));
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

void remove_stale_temp_files(const std::string& path) {
  const std::string dir = parent_directory(path);
  const size_t slash = path.find_last_of('/');
  const std::string prefix = (slash == std::string::npos ? path : path.substr(slash + 1)) + ".tmp.";
  DIR* listing = ::opendir(dir.c_str());
  if (!listing) return;
  while (const dirent* entry = ::readdir(listing)) {
    const std::string name = entry->d_name;
    if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0) continue;
    pid_t pid = 0;
    const char* digits = name.data() + prefix.size();
    const auto [end, ec] = std::from_chars(digits, name.data() + name.size(), pid);
    if (ec != std::errc() || end != name.data() + name.size() || pid <= 0) continue;
    if (::kill(pid, 0) != 0 && errno == ESRCH) ::unlink((dir + "/" + name).c_str());
  }
  ::closedir(listing);
}

void write_file_atomically(const std::string& path, const std::string& bytes) {
  const std::string tmp = atomic_temp_path(path);
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd < 0) fail(path, ": cannot create temporary file '", tmp, "': ", std::strerror(errno));
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = n < 0 ? errno : EIO;
      ::close(fd);
      abandon(tmp, path, "writing", err);
    }
    done += static_cast<size_t>(n);
  }
  if (::close(fd) != 0) abandon(tmp, path, "closing", errno);
  commit_temp_file(tmp, path);
}

}  // namespace mmdit
