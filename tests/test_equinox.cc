// Models saved by the reference with Equinox (train/equinox.h). The .eqx files are the parity
// cases' models as eqx.tree_serialise_leaves wrote them in float32; each .eqx.json manifest,
// written by the same run, lists the records in order with the parameter each one is. The
// leaf order we derive is checked against the manifests, and the values read against the
// parity cases' parameters, which the reference wrote from the same models.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <sstream>

#include "tensor/safetensors.h"
#include "tests/test_util.h"
#include "train/dataset.h"
#include "train/equinox.h"
#include "train/npy.h"
#include "train/parity.h"
#include "train/trainer.h"

namespace mmdit {
namespace {

using Json = nlohmann::json;
using ::testing::HasSubstr;

std::string data_path(const std::string& name) {
  return std::string(MMDIT_TEST_DATA) + "/" + name;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::string write_temp(const std::string& name, const std::string& bytes) {
  const std::string path = testing::TempDir() + name;
  std::ofstream(path, std::ios::binary) << bytes;
  return path;
}

PolicyConfig policy_case_config() {
  return parity_policy_config(data_path("bc_train_step.safetensors"));
}
MMDiTConfig mmdit_case_config() {
  return parity_mmdit_config(data_path("mmdit.safetensors"));
}
InContextMMDiTConfig incontext_case_config() {
  return parity_incontext_config(data_path("incontext_mmdit.safetensors"));
}

// Our leaves against the manifest's recorded ones: path, kind, value, and the tensor each array
// fills ("param/blocks.joint_attn..." names blocks.<i>. after unstacking).
void expect_manifest_order(const std::vector<EquinoxLeaf>& ours, const std::string& manifest) {
  const Json m = Json::parse(read_bytes(data_path(manifest)));
  std::vector<Json> recorded;
  for (const Json& leaf : m.at("leaves"))
    if (leaf.at("record").get<bool>()) recorded.push_back(leaf);
  ASSERT_EQ(ours.size(), recorded.size()) << manifest;
  for (size_t i = 0; i < ours.size(); ++i) {
    const Json& r = recorded[i];
    const std::string where = str_cat(manifest, " record ", i, " (", r.at("path"), ")");
    EXPECT_EQ(ours[i].path, r.at("path").get<std::string>()) << where;
    if (r.contains("parity_name")) {
      ASSERT_EQ(ours[i].kind, EquinoxLeaf::Kind::array) << where;
      std::string name = r.at("parity_name").get<std::string>();
      name = name.substr(name.find('/') + 1);
      const bool stacked = r.at("stacked_over_blocks").get<bool>();
      EXPECT_EQ(ours[i].stacked, stacked) << where;
      if (stacked) name.replace(name.find("blocks.") + 7, 0, "0.");
      EXPECT_EQ(ours[i].names.at(0), name) << where;
      EXPECT_EQ(ours[i].names.size(), stacked ? r.at("shape")[0].get<size_t>() : 1) << where;
    } else {
      const bool integer = r.at("dtype") == "int64";
      EXPECT_EQ(ours[i].kind, integer ? EquinoxLeaf::Kind::integer : EquinoxLeaf::Kind::real)
          << where;
      EXPECT_EQ(ours[i].value, r.at("python_value").get<double>()) << where;
    }
  }
}

TEST(Equinox, LeafOrderIsTheReferencesManifest) {
  Rng rng(0);
  expect_manifest_order(equinox_leaves(policy_case_config()), "bc_train_step.eqx.json");
  const MMDiT mmdit(mmdit_case_config(), rng);
  expect_manifest_order(equinox_leaves(mmdit), "mmdit.eqx.json");
  const InContextMMDiT incontext(incontext_case_config(), rng);
  expect_manifest_order(equinox_leaves(incontext), "incontext_mmdit.eqx.json");
}

// Every parameter (and buffer) read from the .eqx equals the parity case's, which the reference
// wrote in float64 from the same model, rounded to float32.
void expect_parity_values(const nn::Module& model, const std::string& kind) {
  const SafetensorsFile f = load_safetensors(data_path(kind + ".safetensors"));
  NamedTensors ours = model.named_parameters();
  for (const auto& [name, t] : model.named_buffers()) ours.insert(name, t);
  int compared = 0;
  for (const auto& [name, expected] : f.tensors) {
    const size_t slash = name.find('/');
    const std::string group = name.substr(0, slash);
    if (group != "param" && group != "buffer") continue;
    const std::string ours_name = name.substr(slash + 1);
    ASSERT_TRUE(ours.contains(ours_name)) << kind << ": " << name;
    const Tensor expected_f32 = raw::to_dtype(expected, DType::f32);
    EXPECT_EQ(ours.at(ours_name).to_vector<float>(), expected_f32.to_vector<float>())
        << kind << ": " << name;
    ++compared;
  }
  EXPECT_EQ(compared, static_cast<int>(ours.size())) << kind;
}

TEST(Equinox, ReadsTheParityCasesModels) {
  Rng rng(1);
  MMDiT mmdit(mmdit_case_config(), rng);
  load_equinox(mmdit, data_path("mmdit.eqx"));
  expect_parity_values(mmdit, "mmdit");
  InContextMMDiT incontext(incontext_case_config(), rng);
  load_equinox(incontext, data_path("incontext_mmdit.eqx"));
  expect_parity_values(incontext, "incontext_mmdit");
  BCPolicy policy(policy_case_config(), rng);
  load_equinox(policy, data_path("bc_train_step.eqx"));
  expect_parity_values(policy, "bc_train_step");
}

// Written back, each model is the reference's file byte for byte: the same records, headers
// and order.
TEST(Equinox, SavedModelsAreTheReferencesFiles) {
  Rng rng(5);
  const auto expect_same_file = [](const std::string& written, const std::string& fixture) {
    const std::string a = read_bytes(written), b = read_bytes(data_path(fixture));
    EXPECT_EQ(a.size(), b.size()) << fixture;
    EXPECT_TRUE(a == b) << fixture << ": first difference at byte "
                        << std::mismatch(a.begin(), a.end(), b.begin(), b.end()).first - a.begin();
  };
  MMDiT mmdit(mmdit_case_config(), rng);
  load_equinox(mmdit, data_path("mmdit.eqx"));
  save_equinox(mmdit, testing::TempDir() + "mmdit.eqx");
  expect_same_file(testing::TempDir() + "mmdit.eqx", "mmdit.eqx");
  InContextMMDiT incontext(incontext_case_config(), rng);
  load_equinox(incontext, data_path("incontext_mmdit.eqx"));
  save_equinox(incontext, testing::TempDir() + "incontext_mmdit.eqx");
  expect_same_file(testing::TempDir() + "incontext_mmdit.eqx", "incontext_mmdit.eqx");
  BCPolicy policy(policy_case_config(), rng);
  load_equinox(policy, data_path("bc_train_step.eqx"));
  save_equinox(policy, testing::TempDir() + "bc_train_step.eqx");
  expect_same_file(testing::TempDir() + "bc_train_step.eqx", "bc_train_step.eqx");
}

TEST(Equinox, PolicyConfigFromTheRecords) {
  const PolicyConfig read = equinox_policy_config(data_path("bc_train_step.eqx"));
  EXPECT_EQ(read.to_json(), policy_case_config().to_json());
}

TEST(Equinox, Float64ModelGetsTheFloat32ValuesWidened) {
  Rng rng(2);
  BCPolicy policy(policy_case_config(), rng);
  policy.to(DType::f64);
  load_equinox(policy, data_path("bc_train_step.eqx"));
  EXPECT_EQ(policy.dtype(), DType::f64);
  BCPolicy f32(policy_case_config(), rng);
  load_equinox(f32, data_path("bc_train_step.eqx"));
  const Tensor w = policy.named_parameters().at("mmdit.blocks.1.to_cond.weight");
  EXPECT_EQ(w.dtype(), DType::f64);
  EXPECT_EQ(w.to_vector<double>(),
            f32.named_parameters().at("mmdit.blocks.1.to_cond.weight").to_vector<double>());
}

// The message of the error load_equinox(policy built from config, path) raises.
std::string policy_error(const PolicyConfig& config, const std::string& path) {
  Rng rng(3);
  BCPolicy policy(config, rng);
  const auto everything = [&] {
    NamedTensors all = policy.named_parameters();
    for (const auto& [name, t] : policy.named_buffers()) all.insert(name, t);
    return all;
  };
  std::vector<std::vector<float>> values;
  for (const auto& [name, t] : everything()) values.push_back(raw::clone(t).to_vector<float>());
  try {
    load_equinox(policy, path);
  } catch (const Error& e) {
    // Nothing was loaded: the parameters and buffers are as they were.
    size_t i = 0;
    for (const auto& [name, t] : everything())
      EXPECT_EQ(t.to_vector<float>(), values[i++]) << name << " changed by a failed load";
    return e.what();
  }
  ADD_FAILURE() << "no error loading " << path;
  return "";
}

TEST(Equinox, OtherHyperparametersAreNamed) {
  const std::string path = data_path("bc_train_step.eqx");
  PolicyConfig c = policy_case_config();
  c.horizon = 6;
  EXPECT_NE(policy_error(c, path).find("record 2 (horizon): is 5, the model's is 6"),
            std::string::npos)
      << policy_error(c, path);
  c = policy_case_config();
  c.depth = 3;
  EXPECT_NE(policy_error(c, path).find("has shape (2,32,16), the model's is (3,32,16) (3 blocks "
                                       "stacked)"),
            std::string::npos)
      << policy_error(c, path);
  c = policy_case_config();
  c.heads = 4;
  c.dim_head = 4;
  EXPECT_NE(policy_error(c, path).find("(mmdit.blocks.joint_attn.q_rmsnorms.0.gamma): has shape "
                                       "(2,8), the model's is (2,4)"),
            std::string::npos)
      << policy_error(c, path);
}

TEST(Equinox, MalformedFilesAreNamed) {
  const std::string bytes = read_bytes(data_path("bc_train_step.eqx"));
  const PolicyConfig c = policy_case_config();
  // Record boundaries, from the records themselves.
  std::vector<size_t> ends;
  for (size_t offset = 0; offset < bytes.size();) {
    offset += parse_npy_record(bytes.data() + offset, bytes.size() - offset, "test", false).bytes;
    ends.push_back(offset);
  }
  ASSERT_EQ(ends.size(), 84u);  // the manifest's recorded leaves
  const std::string cut = write_temp("cut.eqx", bytes.substr(0, ends[49]));
  EXPECT_NE(policy_error(c, cut).find("the file holds 50 records, but the model has 84 leaves; "
                                      "the next would be mmdit.blocks.feedforwards.0.linear_in."
                                      "weight"),
            std::string::npos)
      << policy_error(c, cut);
  const std::string torn = write_temp("torn.eqx", bytes.substr(0, ends[49] + 100));
  EXPECT_NE(policy_error(c, torn).find("record 50"), std::string::npos) << policy_error(c, torn);
  EXPECT_NE(policy_error(c, torn).find("file truncated?"), std::string::npos);
  const std::string longer =
      write_temp("longer.eqx", bytes + bytes.substr(ends[82], ends[83] - ends[82]));
  EXPECT_NE(policy_error(c, longer).find("the file holds 85 records, but the model has 84 leaves"),
            std::string::npos)
      << policy_error(c, longer);
  // The first record (n_obs_steps, an int) replaced by a float array.
  const std::string swapped =
      write_temp("swapped.eqx", serialize_npy(full({2}, 2.0)) + bytes.substr(ends[0]));
  EXPECT_NE(policy_error(c, swapped)
                .find("record 0 (n_obs_steps): holds a '<f4' array of shape "
                      "(2,), expected a Python int"),
            std::string::npos)
      << policy_error(c, swapped);
  // A size edited in the file is refused before a model of that size is built.
  const std::string huge =
      write_temp("huge.eqx", bytes.substr(0, ends[3]) + serialize_npy_int64({200000}, {}) +
                                 bytes.substr(ends[4]));
  try {
    equinox_policy_config(huge);
    ADD_FAILURE() << "no error for hidden_size 200000";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("state_encoder.weight has shape (16,3), but the sizes the "
                                         "file records make it (200000,3)"),
              std::string::npos)
        << e.what();
  }
  const std::vector<EquinoxLeaf> leaves = equinox_leaves(c);
  const auto at = [&](const std::string& leaf_path) {
    return static_cast<size_t>(
        std::find_if(leaves.begin(), leaves.end(),
                     [&](const EquinoxLeaf& l) { return l.path == leaf_path; }) -
        leaves.begin());
  };
  // Record i of `in` replaced; nested calls replace the later records first, so that the earlier
  // ones' offsets still hold.
  const auto replaced = [&](size_t i, const std::string& record, const std::string& in) {
    return in.substr(0, i ? ends[i - 1] : 0) + record + in.substr(ends[i]);
  };
  // Sizes whose product overflows int64 (2^33 heads of 2^31 wrap to 0), with an empty to_qkv to
  // match the wrapped size, are still refused: the product is formed in double.
  const std::string overflowing = replaced(
      at("mmdit.blocks.joint_attn.to_qkv.0.weight"), serialize_npy(zeros({2, 0, 16})),
      replaced(at("mmdit.blocks.joint_attn.dim_head"), serialize_npy_int64({int64_t{1} << 31}, {}),
               replaced(at("mmdit.blocks.joint_attn.heads"),
                        serialize_npy_int64({int64_t{1} << 33}, {}), bytes)));
  const std::string overflow_error =
      test::error_of([&] { equinox_policy_config(write_temp("over.eqx", overflowing)); });
  EXPECT_NE(overflow_error.find("mmdit.blocks.joint_attn.to_qkv.0.weight has shape (2,0,16), but "
                                "the sizes the file records make it (2,5.5"),
            std::string::npos)
      << overflow_error;
  // sigma = inf could not be written back into a config (JSON has no inf).
  const std::string infinite =
      replaced(at("sigma"), serialize_npy(full({}, INFINITY, DType::f64)), bytes);
  EXPECT_NE(test::error_of([&] {
              equinox_policy_config(write_temp("inf.eqx", infinite));
            }).find("sigma must be finite and >= 0, got inf"),
            std::string::npos)
      << test::error_of([&] { equinox_policy_config(write_temp("inf.eqx", infinite)); });
  EXPECT_THROW(equinox_policy_config(write_temp("empty.eqx", "")), Error);
  EXPECT_THROW(equinox_policy_config(data_path("mmdit.eqx")), Error);
}

using test::Command;
using test::run_mmdit;

// A fresh `dir` holding demos.npz: two episodes of the bc_train_step case's sizes.
Episodes write_import_demos(const std::string& dir) {
  Rng rng(4);
  Episodes data;
  data.states = rng.normal({40, 3});
  data.actions = rng.normal({40, 2});
  data.episode_starts = {0, 25, 40};
  if (::system(("rm -rf " + dir + " && mkdir -p " + dir).c_str()) != 0)
    throw std::runtime_error("cannot create " + dir);
  save_lerobot_npz(dir + "/demos.npz", data);
  return data;
}

// dir/stats.json: min-max ranges of the bc_train_step case's sizes, other than the data's.
void write_import_stats(const std::string& dir) {
  std::ofstream(dir + "/stats.json") << R"({"mode": "min_max", "state_min": [-5, -4, -3],
      "state_max": [5, 4, 3], "action_min": [-2, -1], "action_max": [2, 1.5]})";
}

// mmdit import-eqx: a checkpoint whose parameters and EMA are the .eqx model's, with the data's
// normalisation, that load_policy (sample, eval) reads and train --resume continues.
TEST(EquinoxCli, ImportWritesACheckpointOfTheModel) {
  const std::string dir = testing::TempDir() + "import_eqx";
  const Episodes data = write_import_demos(dir);
  Rng rng(5);  // initial weights, which the .eqx replaces
  const std::string eqx = data_path("bc_train_step.eqx");
  Command r =
      run_mmdit(str_cat("import-eqx ", eqx, " --data ", dir, "/demos.npz --out ", dir, "/run"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("BCPolicy, 18754 parameters"), std::string::npos) << r.output;

  BCPolicy expected(policy_case_config(), rng);
  load_equinox(expected, eqx);
  for (const bool use_ema : {true, false}) {
    const LoadedPolicy loaded = load_policy(dir + "/run/checkpoint.safetensors", use_ema);
    EXPECT_EQ(loaded.config.policy.to_json(), policy_case_config().to_json());
    EXPECT_EQ(loaded.step, 0);
    for (const auto& [name, t] : expected.named_parameters())
      EXPECT_EQ(loaded.policy->named_parameters().at(name).to_vector<float>(), t.to_vector<float>())
          << name << (use_ema ? " (EMA)" : "");
    const Normalizer n = make_normalizer(data, "min_max");
    EXPECT_EQ(loaded.normalizer.state_max.to_vector<float>(), n.state_max.to_vector<float>());
    EXPECT_EQ(loaded.normalizer.action_min.to_vector<float>(), n.action_min.to_vector<float>());
  }

  // And back: the checkpoint's EMA written as the reference would is the file imported.
  r = run_mmdit(
      str_cat("export-eqx ", dir, "/run/checkpoint.safetensors --out ", dir, "/exported.eqx"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(read_bytes(dir + "/exported.eqx") == read_bytes(eqx));

  r = run_mmdit(str_cat("import-eqx ", eqx, " --data ", dir, "/demos.npz --obs-keys state --out ",
                        dir, "/run3"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("import-eqx: --obs-keys selects HDF5 observation groups"),
            std::string::npos)
      << r.output;
  r = run_mmdit(str_cat("import-eqx ", eqx, " --data ", dir, "/demos.npz --out ", dir, "/run"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("already holds a checkpoint; pass --overwrite"), std::string::npos)
      << r.output;
  std::ofstream(dir + "/config.json") << R"({"policy": {"hidden_size": 32}, "sample_steps": 4})";
  r = run_mmdit(str_cat("import-eqx ", eqx, " --data ", dir, "/demos.npz --out ", dir,
                        "/run2 --config ", dir, "/config.json"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("policy.hidden_size is 32, but the Equinox model's is 16"),
            std::string::npos)
      << r.output;
  r = run_mmdit(str_cat("train --resume ", dir, "/run/checkpoint.safetensors --data ", dir,
                        "/demos.npz --steps 2"));
  EXPECT_EQ(r.status, 0) << r.output;
  // Imported again over the fine-tuned run: its logs go with it.
  r = run_mmdit(
      str_cat("import-eqx ", eqx, " --data ", dir, "/demos.npz --out ", dir, "/run --overwrite"));
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(load_policy(dir + "/run/checkpoint.safetensors").step, 0);
  EXPECT_FALSE(std::ifstream(dir + "/run/metrics.csv").good());
}

// The reference agent normalises with the ranges of its config, which need not be the data's:
// --stats gives them, and the checkpoint acts with them.
TEST(EquinoxCli, ImportTakesTheStatisticsGiven) {
  const std::string dir = testing::TempDir() + "import_eqx_stats";
  write_import_demos(dir);
  const std::string eqx = data_path("bc_train_step.eqx");
  write_import_stats(dir);
  Command r = run_mmdit(str_cat("import-eqx ", eqx, " --data ", dir, "/demos.npz --stats ", dir,
                                "/stats.json --out ", dir, "/run"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr(str_cat("normalisation (min_max) from ", dir, "/stats.json")));
  const LoadedPolicy loaded = load_policy(dir + "/run/checkpoint.safetensors");
  EXPECT_EQ(loaded.normalizer.state_min.to_vector<float>(), (std::vector<float>{-5, -4, -3}));
  EXPECT_EQ(loaded.normalizer.action_max.to_vector<float>(), (std::vector<float>{2, 1.5}));

  for (const auto& [stats, message] : std::vector<std::pair<std::string, std::string>>{
           {R"({"mode": "min_max", "state_min": [0, 0], "state_max": [1, 1],
                "action_min": [0, 0], "action_max": [1, 1]})",
            "normalizer: 'state_min' is float32 (2,); expected (state_dim,) = (3,)"},
           {R"({"state_min": [0, 0, 0]})", "normalizer: expected an object with a 'mode'"},
           {R"({"mode": "min_max", "state_min": [-5, -4, -3], "state_max": [5, 4, 3],
                "action_min": [-2, -1], "action_max": [2, 1.5], "state_mena": [0, 0, 0]})",
            "normalizer: unknown key 'state_mena' (the keys are mode, state_min,"}}) {
    std::ofstream(dir + "/bad.json") << stats;
    r = run_mmdit(str_cat("import-eqx ", eqx, " --data ", dir, "/demos.npz --stats ", dir,
                          "/bad.json --out ", dir, "/bad"));
    EXPECT_NE(r.status, 0);
    EXPECT_THAT(r.output, HasSubstr(str_cat("import-eqx: --stats ", dir, "/bad.json: ")));
    EXPECT_THAT(r.output, HasSubstr(message));
    EXPECT_FALSE(std::ifstream(dir + "/bad/checkpoint.safetensors").good());
  }

  // The reference agent's own layout of the ranges, [minima, maxima], gives the same statistics.
  std::ofstream(dir + "/pairs.json") << R"({"mode": "min_max",
      "state_min_max": [[-5, -4, -3], [5, 4, 3]], "action_min_max": [[-2, -1], [2, 1.5]]})";
  r = run_mmdit(str_cat("import-eqx ", eqx, " --stats ", dir, "/pairs.json --out ", dir, "/pairs"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(load_policy(dir + "/pairs/checkpoint.safetensors").normalizer.to_json(),
            loaded.normalizer.to_json());

  // The statistics' mode is the run's, unless --config sets another.
  std::ofstream(dir + "/z.json") << R"({"mode": "z_score", "state_mean": [0, 0, 0],
      "state_std": [1, 1, 1], "action_mean": [0, 0], "action_std": [1, 1]})";
  r = run_mmdit(str_cat("import-eqx ", eqx, " --stats ", dir, "/z.json --out ", dir, "/z"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr(str_cat("normalisation (z_score) from ", dir, "/z.json")));
  EXPECT_EQ(load_policy(dir + "/z/checkpoint.safetensors").normalizer.mode,
            Normalizer::Mode::z_score);
  std::ofstream(dir + "/min_max.json") << R"({"normalization": "min_max"})";
  r = run_mmdit(str_cat("import-eqx ", eqx, " --stats ", dir, "/z.json --config ", dir,
                        "/min_max.json --out ", dir, "/conflict"));
  EXPECT_NE(r.status, 0);
  EXPECT_THAT(r.output,
              HasSubstr(str_cat("import-eqx: --stats ", dir,
                                "/z.json holds z_score statistics, "
                                "and --config ",
                                dir, "/min_max.json sets \"normalization\": \"min_max\"")));
  EXPECT_FALSE(std::ifstream(dir + "/conflict/config.json").good());
}

// The losses of metrics.csv, one per step.
std::vector<double> logged_losses(const std::string& metrics) {
  std::vector<double> losses;
  std::istringstream rows(read_bytes(metrics));
  std::string row;
  std::getline(rows, row);  // the header
  while (std::getline(rows, row)) {
    long long step = 0;
    double loss = 0;
    if (std::sscanf(row.c_str(), "%lld,%lf", &step, &loss) == 2) losses.push_back(loss);
  }
  return losses;
}

// With --stats, the data is not needed: the checkpoint acts as one imported with data, and
// train --resume, given data, continues it exactly as it continues that one.
TEST(EquinoxCli, ImportWithoutDataNeedsOnlyTheStatistics) {
  const std::string dir = testing::TempDir() + "import_eqx_no_data";
  write_import_demos(dir);
  const std::string eqx = data_path("bc_train_step.eqx");
  write_import_stats(dir);
  Command r = run_mmdit(str_cat("import-eqx ", eqx, " --data ", dir, "/demos.npz --stats ", dir,
                                "/stats.json --out ", dir, "/with_data"));
  ASSERT_EQ(r.status, 0) << r.output;
  r = run_mmdit(
      str_cat("import-eqx ", eqx, " --stats ", dir, "/stats.json --out ", dir, "/without_data"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("no data recorded: train --resume continues on any data"));

  const LoadedPolicy a = load_policy(dir + "/with_data/checkpoint.safetensors"),
                     b = load_policy(dir + "/without_data/checkpoint.safetensors");
  EXPECT_EQ(b.normalizer.to_json(), a.normalizer.to_json());
  for (const auto& [name, t] : a.policy->named_parameters())
    EXPECT_EQ(b.policy->named_parameters().at(name).to_vector<float>(), t.to_vector<float>())
        << name;

  for (const char* run : {"with_data", "without_data"}) {
    r = run_mmdit(str_cat("train --resume ", dir, "/", run, "/checkpoint.safetensors --data ", dir,
                          "/demos.npz --steps 3 --threads 1"));
    ASSERT_EQ(r.status, 0) << r.output;
  }
  const std::vector<double> losses = logged_losses(dir + "/with_data/metrics.csv");
  EXPECT_EQ(losses.size(), 3u);
  EXPECT_EQ(logged_losses(dir + "/without_data/metrics.csv"), losses);

  // Observation keys given without data are recorded, for HDF5 data a later run reads.
  r = run_mmdit(str_cat("import-eqx ", eqx, " --stats ", dir, "/stats.json --obs-keys a,b --out ",
                        dir, "/keys"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(read_checkpoint_info(dir + "/keys/checkpoint.safetensors").obs_keys,
            (std::vector<std::string>{"a", "b"}));

  r = run_mmdit(str_cat("import-eqx ", eqx, " --out ", dir, "/neither"));
  EXPECT_NE(r.status, 0);
  EXPECT_THAT(r.output, HasSubstr("import-eqx: give --stats, the statistics the agent normalised "
                                  "with (its config's state_min_max and action_min_max), or "
                                  "--data"));
  EXPECT_FALSE(std::ifstream(dir + "/neither/config.json").good());
}

// import-eqx --overwrite removed the old run, and then refused to save weights holding a NaN
// ("the previous file, if any, is kept", with no file left). Everything the save would refuse is
// refused first: the run in --out stays as it was, its checkpoint, logs and config.json.
TEST(EquinoxCli, ARefusedImportLeavesTheRunItWouldReplace) {
  const std::string dir = testing::TempDir() + "import_eqx_refused";
  write_import_demos(dir);
  Rng rng(5);
  const std::string eqx = data_path("bc_train_step.eqx"), run = dir + "/run";
  Command r = run_mmdit(str_cat("import-eqx ", eqx, " --data ", dir, "/demos.npz --out ", run));
  ASSERT_EQ(r.status, 0) << r.output;
  r = run_mmdit(str_cat("train --resume ", run, "/checkpoint.safetensors --data ", dir,
                        "/demos.npz --steps 2"));
  ASSERT_EQ(r.status, 0) << r.output;
  const std::string config = read_bytes(run + "/config.json"),
                    metrics = read_bytes(run + "/metrics.csv");

  BCPolicy policy(policy_case_config(), rng);
  load_equinox(policy, eqx);
  const Tensor w = policy.named_parameters().at("state_encoder.weight");
  raw::copy_into(raw::narrow(raw::narrow(w, 0, 0, 1), 1, 1, 1), full({1, 1}, NAN));
  save_equinox(policy, dir + "/nan.eqx");
  r = run_mmdit(str_cat("import-eqx ", dir, "/nan.eqx --data ", dir, "/demos.npz --out ", run,
                        " --overwrite"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find(str_cat(dir, "/nan.eqx: not imported (", run,
                                  " is left as it was): tensor 'param/state_encoder.weight' "
                                  "holds nan at (0,1)")),
            std::string::npos)
      << r.output;
  EXPECT_EQ(load_policy(run + "/checkpoint.safetensors").step, 2);
  EXPECT_EQ(read_bytes(run + "/config.json"), config);
  EXPECT_EQ(read_bytes(run + "/metrics.csv"), metrics);
}

}  // namespace
}  // namespace mmdit
