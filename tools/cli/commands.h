// Each subcommand of the `mmdit` program registers itself on the app from its own file.
#pragma once

#include <CLI/CLI.hpp>
#include <string>
#include <vector>

namespace mmdit::cli {

void add_parity_command(CLI::App& app);
void add_inspect_commands(CLI::App& app);
// demo, train, sample, eval, info
void add_policy_commands(CLI::App& app);
void add_bench_command(CLI::App& app);

// Checks for numeric options. CLI11's PositiveNumber reports a 0 as "Value 0 not in range
// 0.000000 to
// 179769313486231570814527423731704356798070567525844996598917476803157260780028538..."; these say
// "--threads: must be a positive number, got 0".
const CLI::Validator& positive();
const CLI::Validator& non_negative();
// For seeds, as a transform: a whole number that fits in 64 bits unsigned, passed on in decimal.
// CLI11 alone takes "-1" as 2^64 - 1, clamps larger numbers and reads a leading 0 as octal.
const CLI::Validator& seed_number();
// For paths: an empty --out would otherwise put the run's files in the root directory.
const CLI::Validator& non_empty();

// The command line as main() received it.
void set_program_args(int argc, char** argv);
const std::vector<std::string>& program_args();

// Starts this program again with the same command line and the environment as it is now, so
// that OpenBLAS is loaded afresh and reads OPENBLAS_CORETYPE. Returns only if that failed.
void reexecute_self();

}  // namespace mmdit::cli
