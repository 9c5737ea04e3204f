// Each subcommand of the `mmdit` program registers itself on the app from its own file.
#pragma once

#include <CLI/CLI.hpp>

namespace mmdit::cli {

void add_parity_command(CLI::App& app);
void add_inspect_commands(CLI::App& app);
// demo, train, sample, eval, info
void add_policy_commands(CLI::App& app);

}  // namespace mmdit::cli
