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
  for (const char* name : {"bc_sample", "bc_train_step", "mmdit", "multihead_rms_norm",
                           "joint_attention", "rms_norm"}) {
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

// ---- module kinds: every input, cotangent and expectation is one the case has

TEST(ParityCases, ModuleCaseRejectsAnInputTheModuleDoesNotRead) {
  EditedCase c("rms_norm");
  c.add("mask", full({4, 4}, 1, DType::boolean));
  EXPECT_THAT(c.error(), HasSubstr("'mask' is not an input of a 'rms_norm' case"));
  // A third modality for a model of two.
  EditedCase m("joint_attention");
  m.add("input/5", m.at("input/0"));
  EXPECT_THAT(m.error(), HasSubstr("'input/5' is not an input of a 'joint_attention' case"));
}

TEST(ParityCases, ModuleCaseRejectsACotangentForNoOutput) {
  EditedCase c("mmdit");
  c.add("cotangent/7", ones({1}, DType::f64));
  EXPECT_THAT(c.error(),
              HasSubstr("'cotangent/7' is for no output of the 'mmdit' case (its outputs: 0, 1)"));
  // One of another shape than its output was an error of the product: "mul: shapes (2,5,16) and
  // (2,3,4) cannot be broadcast together".
  EditedCase swapped("mmdit");
  swapped.rename([](const std::string& name) {
    return name == "cotangent/0" ? "cotangent/1" : name == "cotangent/1" ? "cotangent/0" : name;
  });
  EXPECT_THAT(swapped.error(),
              HasSubstr("'cotangent/0' has shape (2,3,4) but output 0 has shape (2,5,16)"));
}

TEST(ParityCases, ModuleCaseNamesAnExpectedOutputItDoesNotHave) {
  EditedCase c("mmdit");
  c.add("expect/output/7", ones({1}, DType::f64));
  EXPECT_THAT(c.error(), HasSubstr("'expect/output/7' expects output '7', which the 'mmdit' case "
                                   "does not have (its outputs: 0, 1)"));
}

// ---- configs: whole numbers, known keys, RoPE

TEST(ParityCases, FractionalSizesAreAnErrorNotTruncated) {
  EditedCase heads("mmdit");
  heads.config()["heads"] = 2.9;
  EXPECT_THAT(heads.error(), HasSubstr("'mmdit' config: 'heads' must be an integer, got 2.9"));
  EditedCase list("mmdit");
  list.config()["dim_modalities"] = Json::array({16, 8.5});
  EXPECT_THAT(list.error(),
              HasSubstr("'mmdit' config: 'dim_modalities[1]' must be an integer, got 8.5"));
  EditedCase policy("bc_sample");
  policy.config()["dim_head"] = 8.5;
  EXPECT_THAT(policy.error(),
              HasSubstr("'bc_sample' config: 'dim_head' must be an integer, got 8.5"));
  EditedCase steps("bc_sample");
  steps.config()["steps"] = 4.5;
  EXPECT_THAT(steps.error(), HasSubstr("'bc_sample' config: 'steps' must be an integer, got 4.5"));
  EditedCase lr("bc_train_step");
  lr.config()["lr"] = "0.01";
  EXPECT_THAT(lr.error(), HasSubstr("'bc_train_step' config: 'lr' must be a number, got \"0.01\""));
}

TEST(ParityCases, UnknownConfigKeysAreAnError) {
  // Misspelt, heads would fall back to the reference's default of 8.
  EditedCase mmdit("mmdit");
  mmdit.config()["head"] = mmdit.config()["heads"];
  mmdit.config().erase("heads");
  EXPECT_THAT(mmdit.error(), HasSubstr("'mmdit' config: unknown key 'head' (this kind reads "));
  EditedCase module("feedforward");
  module.config()["dim_cond"] = 4;
  EXPECT_THAT(module.error(), HasSubstr("'feedforward' config: unknown key 'dim_cond'"));
  EditedCase policy("bc_sample");
  policy.config()["lr"] = 0.1;  // a training step's, not a sampling run's
  EXPECT_THAT(policy.error(), HasSubstr("'bc_sample' config: unknown key 'lr'"));
  // The functions that read a case's model config are as strict.
  EXPECT_THAT([&] { parity_mmdit_config(mmdit.save()); },
              testing::ThrowsMessage<Error>(HasSubstr("unknown key 'head'")));
  EXPECT_THAT([&] { parity_policy_config(policy.save()); },
              testing::ThrowsMessage<Error>(HasSubstr("unknown key 'lr'")));
}

TEST(ParityCases, RopeMustBeTrue) {
  for (const Json& rope : {Json(false), Json(1), Json("true")}) {
    EditedCase c("joint_attention");
    c.config()["rope"] = rope;
    EXPECT_THAT(c.error(),
                HasSubstr(str_cat("'joint_attention' config: 'rope' must be true (the models "
                                  "always apply the rotary embedding; there is no variant "
                                  "without it), got ",
                                  rope.dump())));
  }
  EditedCase policy("bc_sample");
  policy.config()["rope"] = false;
  EXPECT_THAT(policy.error(), HasSubstr("'rope' must be true"));
}

TEST(ParityCases, MultiheadRmsNormChecksTheHeadAxis) {
  EditedCase c("multihead_rms_norm");  // input/x (3, 5, 8)
  c.config()["heads"] = 2;
  EXPECT_THAT(c.error(), HasSubstr("a 'multihead_rms_norm' case: 'input/x' has shape (3,5,8); "
                                   "expected (heads, S, dim_head) = (2, S, 8)"));
  EditedCase zero("multihead_rms_norm");
  zero.config()["heads"] = 0;
  EXPECT_THAT(zero.error(),
              HasSubstr("'multihead_rms_norm' config: heads must be positive, got 0"));
  EditedCase missing("multihead_rms_norm");
  missing.config().erase("heads");
  EXPECT_THAT(missing.error(), HasSubstr("'multihead_rms_norm' config: missing 'heads'"));
}

}  // namespace
}  // namespace mmdit
