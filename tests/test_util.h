// Helpers shared by the test files.
#pragma once

#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "nn/module.h"
#include "tensor/bytes.h"
#include "tensor/error.h"
#include "tensor/ops.h"
#include "tensor/parallel.h"
#include "tensor/random.h"
#include "tensor/tensor.h"

namespace mmdit::test {

// The message of the mmdit::Error that f throws, or a marker saying it threw none.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no mmdit::Error thrown)";
}

// The text of a file of this repository (README.md, docs/...), for tests that hold the docs to
// what the code prints.
inline std::string read_source(const std::string& path) {
  std::ifstream in(std::string(MMDIT_SOURCE_DIR) + "/" + path);
  EXPECT_TRUE(in.good()) << "cannot read " << path;
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// For a death test's child: from here on allocations past what the process has mapped plus
// `headroom` bytes fail, whatever the kernel's overcommit mode. One OpenMP thread, so that worker
// threads created later need no room of their own.
inline void limit_address_space(size_t headroom) {
  set_num_threads(1);
  std::ifstream statm("/proc/self/statm");
  long pages = 0;
  statm >> pages;
  const rlim_t bound = static_cast<rlim_t>(pages) * static_cast<rlim_t>(::getpagesize()) + headroom;
  const rlimit limit{bound, bound};
  ::setrlimit(RLIMIT_AS, &limit);
}

// What the mmdit program printed (stdout and stderr) and its exit status (-1 if it did not exit).
struct Command {
  int status;
  std::string output;
};
// env_prefix runs the program under `env`, e.g. "env -u OPENBLAS_CORETYPE ".
inline Command run_mmdit(const std::string& args, const std::string& env_prefix = "") {
  Command r{-1, ""};
  FILE* p = ::popen((env_prefix + MMDIT_BINARY + " " + args + " 2>&1").c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  const int status = ::pclose(p);
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

// max |a - b| over the elements, in float64; a and b must have one shape.
inline double max_abs_diff(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.shape(), b.shape());
  const auto x = a.to_vector<double>(), y = b.to_vector<double>();
  double m = 0;
  for (size_t i = 0; i < x.size() && i < y.size(); ++i) m = std::max(m, std::abs(x[i] - y[i]));
  return m;
}

// Gives every parameter (zero-initialised ones included) values from N(0, scale^2), so that
// tests about what a trained model does are not trivially satisfied by adaLN-Zero.
inline void randomize(nn::Module& m, Rng& rng, double scale = 0.3) {
  for (const auto& [name, p] : m.named_parameters())
    raw::copy_into(p, rng.normal(p.shape(), p.dtype(), 0, scale));
}

// The values as little-endian bytes, as files store them.
template <class T>
std::string le_bytes(const std::vector<T>& values) {
  std::string out;
  append_le(out, values.data(), values.size());
  return out;
}

// A fresh directory under the test temp dir, removed with everything in it at scope exit.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "mmdit_test") {
    std::string pattern =
        (std::filesystem::path(::testing::TempDir()) / (prefix + "_XXXXXX")).string();
    char* made = ::mkdtemp(pattern.data());
    if (!made) throw std::runtime_error("mkdtemp failed for " + pattern);
    path_ = made;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& e : std::filesystem::directory_iterator(path_))
      names.push_back(e.path().filename());
    std::sort(names.begin(), names.end());
    return names;
  }

 private:
  std::filesystem::path path_;
};

}  // namespace mmdit::test
