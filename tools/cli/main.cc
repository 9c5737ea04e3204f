// mmdit: the command-line program. Subcommands live one per file in this folder.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>

#include "tensor/blas_core.h"
#include "tensor/error.h"
#include "tensor/file_io.h"
#include "tensor/parallel.h"
#include "tools/cli/commands.h"

namespace mmdit::cli {
namespace {
std::vector<std::string> args;
}
void set_program_args(int argc, char** argv) {
  args.assign(argv, argv + argc);
}

namespace {
CLI::Validator number_check(const char* name, bool (*accept)(double), const char* requirement) {
  return CLI::Validator(
      [accept, requirement](std::string& value) {
        char* end = nullptr;
        const double x = std::strtod(value.c_str(), &end);
        if (end == value.c_str() || *end != '\0' || !accept(x))
          return std::string("must be ") + requirement + ", got " + value;
        return std::string();
      },
      name);
}
}  // namespace

const CLI::Validator& positive() {
  static const CLI::Validator check = number_check(
      "POSITIVE", [](double x) { return x > 0; }, "a positive number");
  return check;
}
std::string shell_quoted(const std::string& path) {
  const bool safe = !path.empty() && std::all_of(path.begin(), path.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || std::strchr("/._-+,:=@%", c);
  });
  if (safe) return path;
  std::string quoted = "'";
  for (const char c : path) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

std::string join_commas(const std::vector<std::string>& parts) {
  std::string text;
  for (const std::string& part : parts) text += (text.empty() ? "" : ",") + part;
  return text;
}

const CLI::Validator& thread_count() {
  static const std::string requirement =
      "from 1 to " + std::to_string(max_threads()) + " (OpenBLAS's MAX_THREADS)";
  static const CLI::Validator check = number_check(
      "THREADS", [](double x) { return x >= 1 && x <= max_threads(); }, requirement.c_str());
  return check;
}
// Fails now, instead of after a long evaluation, when the directory `path` goes in is missing or
// `path` is a directory itself (the rename of the finished file would fail).
void check_output_directory(const std::string& path, const char* flag) {
  struct stat st;
  MMDIT_CHECK(::stat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode), flag, " ", path,
              ": is a directory; name a file to write");
  try {
    check_replaceable(path);
  } catch (const Error& e) {
    fail(flag, " ", e.what());
  }
  const std::string dir = parent_directory(path);
  if (path.find('/') != std::string::npos) {
    MMDIT_CHECK(::stat(dir.c_str(), &st) == 0, flag, " ", path, ": the directory ", dir,
                " does not exist");
    MMDIT_CHECK(S_ISDIR(st.st_mode), flag, " ", path, ": ", dir, " is not a directory");
  }
  // Before the work whose result it is for, not after.
  MMDIT_CHECK(::access(dir.c_str(), W_OK | X_OK) == 0, flag, " ", path, ": cannot write in ", dir,
              ": ", std::strerror(errno));
}

const CLI::Validator& directory_name() {
  static const CLI::Validator check(
      [](std::string& value) {
        while (value.size() > 1 && value.back() == '/') value.pop_back();
        return std::string();
      },
      "DIR");
  return check;
}

std::string path_in(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

void add_threads_option(CLI::App* cmd, int& threads) {
  cmd->add_option("--threads", threads, "threads (default: OMP_NUM_THREADS or all cores)")
      ->check(thread_count());
}

const CLI::Validator& non_negative() {
  static const CLI::Validator check = number_check(
      "NONNEGATIVE", [](double x) { return x >= 0; }, "a number >= 0");
  return check;
}
namespace {
// "0100" -> "100"; "0x10", "1e3" or "ten" -> the message. CLI11 alone reads a leading 0 as octal
// ("0100" is 64, "09" refused) and 0x, 0o and 0b as hexadecimal, octal and binary.
template <class T>
std::string to_decimal(std::string& value) {
  std::string_view digits(value);
  if (!digits.empty() && digits.front() == '+') digits.remove_prefix(1);
  T number{};
  const char* end = digits.data() + digits.size();
  std::from_chars_result r = std::from_chars(digits.data(), end, number);
  if (r.ec == std::errc::invalid_argument && std::is_unsigned_v<T> && !digits.empty() &&
      digits.front() == '-') {
    int64_t negative = 0;  // a whole number, just not one of T's (unless it is -0)
    r = std::from_chars(digits.data(), end, negative);
    if (r.ptr == end && r.ec == std::errc())
      r.ec = negative == 0 ? std::errc() : std::errc::result_out_of_range;
  }
  if (digits.empty() || r.ptr != end || r.ec == std::errc::invalid_argument)
    return "must be a whole number written in decimal digits, got " + value;
  // Out of range on one side only: naming both limits offered negative values to an option
  // that refuses them (--steps -9223372036854775808 ...).
  if (r.ec != std::errc())
    return digits.front() == '-'
               ? str_cat("must be at least ", std::numeric_limits<T>::min(), ", got ", value)
               : str_cat("must be at most ", std::numeric_limits<T>::max(), ", got ", value);
  value = std::to_string(number);
  return std::string();
}
}  // namespace

void read_integers_as_decimal(CLI::App& app) {
  // No description: the help keeps showing "INT:POSITIVE".
  static const CLI::Validator signed_check(to_decimal<int64_t>, "", "DECIMAL");
  static const CLI::Validator unsigned_check(to_decimal<uint64_t>, "", "DECIMAL");
  for (CLI::Option* option : app.get_options()) {
    // "INT", or "INT:POSITIVE" with the descriptions of the option's checks.
    const std::string full = option->get_type_name();
    const std::string type = full.substr(0, full.find(':'));
    if (type == "INT")
      option->transform(signed_check);
    else if (type == "UINT")
      option->transform(unsigned_check);
  }
  for (CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; }))
    read_integers_as_decimal(*sub);
}

const CLI::Validator& non_empty() {
  static const CLI::Validator check(
      [](std::string& value) { return value.empty() ? std::string("must not be empty") : ""; },
      "NONEMPTY");
  return check;
}

void reexecute_self() {
  std::vector<char*> argv;
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  restart_program(argv.data());
}

}  // namespace mmdit::cli

int main(int argc, char** argv) {
  mmdit::cli::set_program_args(argc, argv);
  mmdit::use_the_best_openblas_core(argv);
  // The library lowers it without a word (tensor/parallel.cc); --threads above it is an error.
  if (const char* omp = std::getenv("OMP_NUM_THREADS");
      omp && std::atoi(omp) > mmdit::max_threads())
    std::fprintf(stderr, "mmdit: OMP_NUM_THREADS=%s lowered to %d (OpenBLAS's MAX_THREADS)\n", omp,
                 mmdit::max_threads());
  CLI::App app{"mmdit: MMDiT models and flow-matching policies in C++"};
  app.require_subcommand(1);
  mmdit::cli::add_policy_commands(app);
  mmdit::cli::add_parity_command(app);
  mmdit::cli::add_inspect_commands(app);
  mmdit::cli::add_bench_command(app);
  mmdit::cli::read_integers_as_decimal(app);
  // CLI11 says only "A subcommand is required" for `mmdit trian`.
  if (argc > 1 && argv[1][0] != '-') {
    std::string names;
    bool known = false;
    for (const CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; })) {
      known |= sub->get_name() == argv[1];
      names += (names.empty() ? "" : ", ") + sub->get_name();
    }
    if (!known) {
      std::fprintf(stderr, "error: unknown command '%s' (commands: %s; see mmdit --help)\n",
                   argv[1], names.c_str());
      return 1;
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const mmdit::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  // Results that did not reach stdout (a full disk, a closed descriptor) are a failure. Only a
  // failure of this flush leaves its cause in errno; an earlier one's is long gone.
  if (std::fflush(stdout) != 0) {
    std::fprintf(stderr, "error: writing the output failed: %s\n", std::strerror(errno));
    return 1;
  }
  if (std::ferror(stdout)) {
    std::fprintf(stderr, "error: writing the output failed (stdout refused a write)\n");
    return 1;
  }
  return 0;
}
