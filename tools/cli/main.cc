// mmdit: the command-line program. Subcommands live one per file in this folder.
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>

#include "tensor/blas_core.h"
#include "tensor/error.h"
#include "tools/cli/commands.h"

namespace mmdit::cli {
namespace {
std::vector<std::string> args;
}
void set_program_args(int argc, char** argv) {
  args.assign(argv, argv + argc);
}
const std::vector<std::string>& program_args() {
  return args;
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
const CLI::Validator& non_negative() {
  static const CLI::Validator check = number_check(
      "NONNEGATIVE", [](double x) { return x >= 0; }, "a number >= 0");
  return check;
}
const CLI::Validator& seed_number() {
  static const CLI::Validator check(
      [](std::string& value) {
        uint64_t seed = 0;
        const char* end = value.data() + value.size();
        const auto [stop, error] = std::from_chars(value.data(), end, seed);
        if (value.empty() || error != std::errc() || stop != end)
          return "must be a whole number from 0 to 18446744073709551615, got " + value;
        // CLI11 reads a leading 0 as octal: "010" would be 8, and "09" refused.
        value = std::to_string(seed);
        return std::string();
      },
      "SEED");
  return check;
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
  CLI::App app{"mmdit: MMDiT models and flow-matching policies in C++"};
  app.require_subcommand(1);
  mmdit::cli::add_policy_commands(app);
  mmdit::cli::add_parity_command(app);
  mmdit::cli::add_inspect_commands(app);
  mmdit::cli::add_bench_command(app);
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
  return 0;
}
