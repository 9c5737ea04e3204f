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
// --threads: from 1 to max_threads().
const CLI::Validator& thread_count();
// --threads, with its default stated.
void add_threads_option(CLI::App* cmd, int& threads);
// For a directory option: "runs/x/" is read as "runs/x", so that the paths made from it read
// runs/x/checkpoint.safetensors.
const CLI::Validator& directory_name();
// `name` in directory `dir` ("runs/x", "/" or "" for the working directory).
std::string path_in(const std::string& dir, const std::string& name);
// For paths: an empty --out would otherwise put the run's files in the root directory.
const CLI::Validator& non_empty();

// Gives every whole-number option of `app` and its subcommands (CLI11's types INT and UINT) a
// transform that reads the value as decimal digits only and passes it on in canonical decimal,
// refusing anything else with a message naming the option: CLI11 alone reads "0100" as octal 64,
// "0x10" as 16, takes "-1" for an unsigned option as 2^64 - 1 and clamps larger numbers. main()
// calls it once, after every command has added its options.
void read_integers_as_decimal(CLI::App& app);

// Fails now, instead of after the work, when a file output `path` given by `flag` cannot be
// written: its directory is missing or unwritable, or it is a directory, device, FIFO or link.
void check_output_directory(const std::string& path, const char* flag);

// `path` as a shell reads it back: as it is when it holds only safe characters, else in single
// quotes ("runs/my run" -> 'runs/my run'), for commands a message suggests.
std::string shell_quoted(const std::string& path);

// "a,b,c"
std::string join_commas(const std::vector<std::string>& parts);

// The command line as main() received it.
void set_program_args(int argc, char** argv);

// Starts this program again with the same command line and the environment as it is now, so
// that OpenBLAS is loaded afresh and reads OPENBLAS_CORETYPE. Returns only if that failed.
void reexecute_self();

}  // namespace mmdit::cli
