#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "tools/cli/commands.h"
#include "train/parity.h"

namespace mmdit::cli {

void add_parity_command(CLI::App& app) {
  struct Options {
    std::vector<std::string> cases;
    std::string dtype = "f32";
    std::optional<double> tol;
  };
  auto opts = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "parity", "Check a parity case recorded from the reference: one row per expected tensor");
  cmd->add_option("cases", opts->cases, "parity case files (.safetensors)")->required();
  cmd->add_option("--dtype", opts->dtype, "f32 or f64")
      ->check(CLI::IsMember({"f32", "f64"}))
      ->capture_default_str();
  cmd->add_option("--tol", opts->tol,
                  "tolerance on the relative error (default 1e-4 f32, 1e-5 f64)");
  cmd->callback([opts] {
    const DType dtype = opts->dtype == "f64" ? DType::f64 : DType::f32;
    bool all_ok = true;
    for (const std::string& path : opts->cases) {
      ParityReport report;
      try {
        report = run_parity(path, dtype, opts->tol);
      } catch (const Error& e) {
        if (std::string(e.what()).starts_with(path)) throw;
        fail(path, ": ", e.what());
      }
      std::fputs(report.table().c_str(), stdout);
      all_ok &= report.ok();
    }
    if (!all_ok) throw CLI::RuntimeError(1);
  });
}

}  // namespace mmdit::cli
