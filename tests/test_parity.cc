// Parity cases (train/parity.h) that ask for something the run cannot do, or that it would not
// check: each is a case of tests/data changed in memory and saved to a temporary file, and the
// run must fail naming what is wrong instead of reporting PASS on less than the file asks.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <functional>
#include <map>
#include <string>

#include "tensor/safetensors.h"
#include "tests/test_util.h"
#include "train/parity.h"

namespace mmdit {
namespace {

using ::testing::HasSubstr;
using Json = nlohmann::json;

// A case of tests/data with its tensors and config open to edits.
class EditedCase {
 public:
  explicit EditedCase(const std::string& name)
      : file_(load_safetensors(std::string(MMDIT_TEST_DATA) + "/" + name + ".safetensors")),
        config_(Json::parse(file_.metadata.at("config"))) {}

  Json& config() { return config_; }
  const Tensor& at(const std::string& name) const { return file_.tensors.at(name); }
  // Every tensor renamed by `rename`; an empty new name drops it.
  void rename(const std::function<std::string(const std::string&)>& rename) {
    NamedTensors renamed;
    for (const auto& [name, t] : file_.tensors)
      if (const std::string to = rename(name); !to.empty()) renamed.insert(to, t);
    file_.tensors = renamed;
  }
  void rename(const std::string& from, const std::string& to) {
    rename([&](const std::string& name) { return name == from ? to : name; });
  }
  void add(const std::string& name, const Tensor& t) { file_.tensors.insert(name, t); }

  // The case saved as it now is.
  const std::string& save() {
    std::map<std::string, std::string> metadata = file_.metadata;
    metadata["config"] = config_.dump();
    save_safetensors(path_, file_.tensors, metadata);
    return path_;
  }
  ParityReport run() { return run_parity(save(), DType::f64); }
  // The message of the error the run throws.
  std::string error() {
    const std::string& path = save();
    return test::error_of([&] { run_parity(path, DType::f64); });
  }

 private:
  test::TempDir dir_;
  std::string path_ = dir_.file("case.safetensors");
  SafetensorsFile file_;
  Json config_;
};

// The unedited cases pass through EditedCase: the failures below are the edits'.
TEST(ParityCases, UneditedCasesPass) {
  for (const char* name : {"bc_sample", "bc_train_step"}) {
    EditedCase c(name);
    const ParityReport report = c.run();
    EXPECT_TRUE(report.ok()) << report.table();
  }
}

// ---- policy kinds: every tensor is one the kind reads or checks

TEST(ParityCases, PolicyCaseRejectsAMisspeltExpectation) {
  EditedCase c("bc_sample");
  c.add("expect/action", c.at("expect/actions"));
  EXPECT_THAT(c.error(), HasSubstr("'expect/action' is not an expectation a 'bc_sample' case "
                                   "checks (it checks expect/actions)"));
}

TEST(ParityCases, PolicyTrainStepRejectsAMisspeltExpectationPrefix) {
  EditedCase c("bc_train_step");
  c.rename("expect/param_after/state_encoder.bias", "expect/param_afer/state_encoder.bias");
  EXPECT_THAT(c.error(), HasSubstr("'expect/param_afer/state_encoder.bias' is not an expectation "
                                   "a 'bc_train_step' case checks"));
}

TEST(ParityCases, PolicyCaseRejectsATensorItDoesNotRead) {
  EditedCase sample("bc_sample");
  sample.add("mask", full({7, 7}, 1, DType::boolean));
  EXPECT_THAT(sample.error(), HasSubstr("unexpected tensor 'mask' in a 'bc_sample' case"));
  // What a training step reads, a sampling run does not.
  EditedCase with_actions("bc_sample");
  with_actions.add("batch/action", with_actions.at("noise/a0"));
  EXPECT_THAT(with_actions.error(),
              HasSubstr("unexpected tensor 'batch/action' in a 'bc_sample' case"));
}

}  // namespace
}  // namespace mmdit
