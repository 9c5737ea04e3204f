// TrainingState: a user training loop's model, AdamW, EMA and random generator saved to one file
// and restored, so that a run continues as if it had never stopped.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <tuple>

#include "autodiff/ops.h"
#include "autodiff/value_and_grad.h"
#include "nn/layers.h"
#include "tensor/file_io.h"
#include "tests/test_util.h"
#include "train/training_state.h"

namespace mmdit {
namespace {

using ::testing::HasSubstr;

// A model of two layers and a buffer, as a user might write one.
class Regressor : public nn::Module {
 public:
  explicit Regressor(Rng& rng) : hidden_(3, 8, true, rng), out_(8, 2, true, rng) {
    register_module("hidden", hidden_);
    register_module("out", out_);
    output_scale = register_buffer("output_scale", from_vector(std::vector<float>{0.5f, 2.f}, {2}));
  }
  Tensor operator()(const Tensor& x) const { return out_(tanh(hidden_(x))) * output_scale; }
  Tensor output_scale;

 private:
  nn::Linear hidden_, out_;
};

// A training loop's objects. `init_seed` sets the initial weights: a run restored from a file must
// not depend on them.
struct LoopState {
  explicit LoopState(uint64_t init_seed)
      : init(init_seed),
        model(init),
        optimizer(model.named_parameters(), {.lr = 1e-2, .weight_decay = 1e-3}),
        ema(model.named_parameters(), 0.9),
        rng(init_seed + 100) {}
  TrainingState state() {
    return {.model = model, .optimizer = &optimizer, .ema = &ema, .rng = &rng};
  }
  // Steps on batches drawn from the run's own generator, as a training loop draws its noise.
  void train(int steps) {
    for (int i = 0; i < steps; ++i) {
      const Tensor x = rng.normal({16, 3});
      const Tensor y = rng.normal({16, 2});
      auto loss_fn = [&](const Regressor& m) { return mean(square(m(x) - y)); };
      auto [loss, grads] = value_and_grad(loss_fn)(model);
      optimizer.update(model.named_parameters(), grads);
      ema.update(model.named_parameters());
    }
  }
  Rng init;
  Regressor model;
  AdamW optimizer;
  EMA ema;
  Rng rng;
};

void expect_identical(const NamedTensors& a, const NamedTensors& b, const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (const auto& [name, t] : a)
    EXPECT_EQ(test::max_abs_diff(t, b.at(name)), 0.0) << what << " " << name;
}

TEST(TrainingState, ARestoredRunContinuesBitForBit) {
  test::TempDir dir;
  LoopState straight(1);
  straight.train(10);

  LoopState first_half(1);
  first_half.train(5);
  const std::string path = dir.file("run.safetensors");
  {
    auto& [init, model, optimizer, ema, rng] = first_half;
    TrainingState state{.model = model, .optimizer = &optimizer, .ema = &ema, .rng = &rng};
    state.save(path, {{"epoch", "3"}});
  }

  LoopState second_half(2);  // other initial weights and another generator, all to be replaced
  auto& [init, model, optimizer, ema, rng] = second_half;
  TrainingState state{.model = model, .optimizer = &optimizer, .ema = &ema, .rng = &rng};
  const std::map<std::string, std::string> metadata = state.load(path);
  EXPECT_EQ(metadata, (std::map<std::string, std::string>{{"epoch", "3"}}));
  EXPECT_EQ(second_half.optimizer.step(), 5);
  expect_identical(second_half.model.named_buffers(), first_half.model.named_buffers(), "buffer");
  second_half.train(5);

  expect_identical(second_half.model.named_parameters(), straight.model.named_parameters(),
                   "parameter");
  expect_identical(second_half.ema.params(), straight.ema.params(), "EMA");
  expect_identical(second_half.optimizer.first_moments(), straight.optimizer.first_moments(), "m");
  expect_identical(second_half.optimizer.second_moments(), straight.optimizer.second_moments(),
                   "v");
  EXPECT_EQ(second_half.optimizer.step(), 10);
  EXPECT_EQ(second_half.rng.next_u64(), straight.rng.next_u64());
}

TEST(TrainingState, TheFileNamesItsTensorsAsMmditTrainsCheckpointsDo) {
  test::TempDir dir;
  LoopState run(1);
  run.train(2);
  const std::string path = dir.file("run.safetensors");
  run.state().save(path);
  const SafetensorsFile file = load_safetensors(path);
  std::vector<std::string> names;
  for (const auto& [name, t] : file.tensors) names.push_back(name);
  EXPECT_THAT(names,
              ::testing::UnorderedElementsAre(
                  "param/hidden.weight", "param/hidden.bias", "param/out.weight", "param/out.bias",
                  "ema/hidden.weight", "ema/hidden.bias", "ema/out.weight", "ema/out.bias",
                  "adam_m/hidden.weight", "adam_m/hidden.bias", "adam_m/out.weight",
                  "adam_m/out.bias", "adam_v/hidden.weight", "adam_v/hidden.bias",
                  "adam_v/out.weight", "adam_v/out.bias", "buffer/output_scale"));
  EXPECT_EQ(file.metadata.at("format"), "mmdit-training-state/1");
  EXPECT_EQ(file.metadata.at("step"), "2");
  EXPECT_EQ(file.metadata.at("rng"),
            str_cat(R"({"counter":)", run.rng.counter(), R"(,"seed":101})"));
  EXPECT_EQ(test::max_abs_diff(file.tensors.at("adam_v/out.bias"),
                               run.optimizer.second_moments().at("out.bias")),
            0.0);
}

// The model alone: for inference, the EMA's weights (or the parameters) and the buffers.
TEST(TrainingState, LoadWeightsReadsTheEmaOrTheParameters) {
  test::TempDir dir;
  LoopState run(1);
  run.train(3);
  const std::string path = dir.file("run.safetensors");
  run.state().save(path);
  for (const bool use_ema : {true, false}) {
    Rng init(9);
    Regressor model(init);
    raw::copy_into(model.output_scale, zeros({2}));
    load_weights(path, model, use_ema);
    expect_identical(model.named_parameters(),
                     use_ema ? run.ema.params() : run.model.named_parameters(),
                     use_ema ? "EMA" : "parameters");
    expect_identical(model.named_buffers(), run.model.named_buffers(), "buffers");
  }
  // Saved without an EMA, the file has none to give.
  const std::string plain = dir.file("plain.safetensors");
  TrainingState{.model = run.model}.save(plain);
  Rng init(9);
  Regressor model(init);
  EXPECT_EQ(test::error_of([&] { load_weights(plain, model); }),
            plain + ": holds no EMA ('ema/*' tensors); load its parameters (use_ema false)");
  load_weights(plain, model, /*use_ema=*/false);
  expect_identical(model.named_parameters(), run.model.named_parameters(), "parameters");
}

// A load that fails part-way (here at the optimiser, after the model and the EMA have been read)
// leaves every part as it was.
TEST(TrainingState, AFailedLoadChangesNothing) {
  test::TempDir dir;
  LoopState saved(1);
  saved.train(4);
  const std::string good = dir.file("good.safetensors");
  saved.state().save(good);
  SafetensorsFile file = load_safetensors(good);
  NamedTensors tensors;
  for (const auto& [name, t] : file.tensors)
    if (name != "adam_v/out.bias") tensors.insert(name, t);
  const std::string bad = dir.file("bad.safetensors");
  save_safetensors(bad, tensors, file.metadata);

  LoopState target(2);
  target.train(1);
  NamedTensors params_before, ema_before, m_before, v_before;
  for (const auto& [name, t] : target.model.named_parameters())
    params_before.insert(name, raw::clone(t));
  for (const auto& [name, t] : target.ema.params()) ema_before.insert(name, raw::clone(t));
  for (const auto& [name, t] : target.optimizer.first_moments())
    m_before.insert(name, raw::clone(t));
  for (const auto& [name, t] : target.optimizer.second_moments())
    v_before.insert(name, raw::clone(t));
  const uint64_t counter_before = target.rng.counter();

  EXPECT_EQ(test::error_of([&] { target.state().load(bad); }),
            bad +
                ": tensors 'adam_m/*', 'adam_v/*': AdamW::set_state (second moments): no tensor "
                "for parameter 'out.bias'");
  expect_identical(target.model.named_parameters(), params_before, "parameters");
  expect_identical(target.ema.params(), ema_before, "EMA");
  expect_identical(target.optimizer.first_moments(), m_before, "m");
  expect_identical(target.optimizer.second_moments(), v_before, "v");
  EXPECT_EQ(target.optimizer.step(), 1);
  EXPECT_EQ(target.rng.counter(), counter_before);
  EXPECT_EQ(target.rng.seed(), 102u);
}

TEST(TrainingState, RefusesWhatItCannotRestore) {
  test::TempDir dir;
  LoopState run(1);
  run.train(1);
  const std::string model_only = dir.file("model_only.safetensors");
  TrainingState{.model = run.model}.save(model_only);
  LoopState target(2);
  EXPECT_EQ(test::error_of([&] { target.state().load(model_only); }),
            model_only + ": holds no EMA ('ema/*' tensors): it was saved without one");
  EXPECT_EQ(
      test::error_of([&] {
        TrainingState{.model = target.model, .optimizer = &target.optimizer}.load(model_only);
      }),
      model_only + ": holds no optimiser state ('adam_m/*' tensors): it was saved without one");
  EXPECT_EQ(
      test::error_of(
          [&] { TrainingState{.model = target.model, .rng = &target.rng}.load(model_only); }),
      model_only + ": holds no random state ('rng' in its metadata): it was saved without one");

  // Another model's file.
  Rng init(0);
  nn::Linear other(3, 8, true, init);
  const std::string other_path = dir.file("other.safetensors");
  TrainingState{.model = other}.save(other_path);
  EXPECT_THAT(test::error_of([&] { TrainingState{.model = target.model}.load(other_path); }),
              HasSubstr(other_path + ": tensors 'param/*', 'buffer/*': load: missing parameter "
                                     "'hidden.weight'"));

  // Safetensors files of other kinds.
  const std::string plain = dir.file("plain.safetensors");
  save_safetensors(plain, run.model.named_parameters());
  EXPECT_EQ(test::error_of([&] { TrainingState{.model = target.model}.load(plain); }),
            plain +
                ": not a training state (no 'format' in its metadata; TrainingState::save and "
                "mmdit train write one)");
  save_safetensors(plain, run.model.named_parameters(), {{"format", "pt"}});
  EXPECT_EQ(test::error_of([&] { load_weights(plain, target.model); }),
            plain + ": format 'pt' is neither mmdit-training-state/1 nor mmdit-checkpoint/1");

  // The format's own metadata keys are not the caller's to set.
  const std::string path = dir.file("run.safetensors");
  EXPECT_EQ(test::error_of([&] {
              run.state().save(path, {{"step", "7"}});
            }),
            path +
                ": not saved: the metadata key 'step' is the format's own; give yours another "
                "name");
  EXPECT_FALSE(std::filesystem::exists(path));
}

TEST(TrainingState, ADivergedStateDoesNotReplaceTheLastGoodFile) {
  test::TempDir dir;
  LoopState run(1);
  run.train(2);
  const std::string path = dir.file("run.safetensors");
  run.state().save(path);
  const std::string before = read_file(path);
  Tensor ema_bias = run.ema.params().at("out.bias");  // the EMA's own storage
  ema_bias.data<float>()[1] = NAN;
  EXPECT_EQ(test::error_of([&] { run.state().save(path); }),
            path +
                ": not saved (the previous file, if any, is kept): tensor 'ema/out.bias' holds "
                "nan at (1,)");
  EXPECT_EQ(read_file(path), before);
  EXPECT_EQ(test::error_of([&] { run.state().check_saveable("here"); }),
            "here: tensor 'ema/out.bias' holds nan at (1,)");

  // A file damaged after it was written is refused when read, whichever part holds the number.
  SafetensorsFile file = load_safetensors(path);
  Tensor m = raw::clone(file.tensors.at("adam_m/hidden.weight"));
  m.data<float>()[4] = INFINITY;
  file.tensors.at("adam_m/hidden.weight") = m;
  save_safetensors(path, file.tensors, file.metadata);
  LoopState target(2);
  EXPECT_EQ(test::error_of([&] { TrainingState{.model = target.model}.load(path); }),
            path + ": tensor 'adam_m/hidden.weight' holds inf at (1,1)");
}

// A model of buffers alone still has a step and a random state to restore, and its AdamW and
// EMA, of no parameters, save no tensors.
TEST(TrainingState, AModelWithoutParametersKeepsItsStepAndRandomState) {
  class Constants : public nn::Module {
   public:
    Constants() { table = register_buffer("table", from_vector({1.f, 2.f}, {2})); }
    Tensor table;
  };
  test::TempDir dir;
  Constants saved;
  AdamW optimizer(saved.named_parameters(), {});
  optimizer.update(saved.named_parameters(), NamedTensors());
  EMA ema(saved.named_parameters(), 0.9);
  Rng rng(4);
  rng.normal({3});
  const std::string path = dir.file("constants.safetensors");
  TrainingState{.model = saved, .optimizer = &optimizer, .ema = &ema, .rng = &rng}.save(path);

  Constants loaded;
  raw::copy_into(loaded.table, zeros({2}));
  AdamW loaded_optimizer(loaded.named_parameters(), {});
  EMA loaded_ema(loaded.named_parameters(), 0.9);
  Rng loaded_rng(0);
  TrainingState{
      .model = loaded, .optimizer = &loaded_optimizer, .ema = &loaded_ema, .rng = &loaded_rng}
      .load(path);
  EXPECT_EQ(loaded_optimizer.step(), 1);
  EXPECT_EQ(loaded_rng.seed(), 4u);
  EXPECT_EQ(loaded_rng.counter(), 1u);
  EXPECT_EQ(loaded.table.to_vector<float>(), (std::vector<float>{1.f, 2.f}));

  const std::string no_optimiser = dir.file("no_optimiser.safetensors");
  TrainingState{.model = saved}.save(no_optimiser);
  EXPECT_EQ(test::error_of([&] {
              TrainingState{.model = loaded, .optimizer = &loaded_optimizer}.load(no_optimiser);
            }),
            no_optimiser +
                ": holds no optimiser state (no 'step' in its metadata): it was saved without "
                "one");
}

// A loop whose moments went NaN reloads its last good file; when that file is damaged, the
// message names the file's fault, not the NaN that undoing the load would have found.
TEST(TrainingState, ALoadIntoADivergedLoopNamesTheFilesFault) {
  test::TempDir dir;
  LoopState saved(1);
  saved.train(2);
  const std::string path = dir.file("run.safetensors");
  saved.state().save(path);
  SafetensorsFile file = load_safetensors(path);
  file.tensors.at("ema/out.bias") = zeros({5});
  save_safetensors(path, file.tensors, file.metadata);

  LoopState diverged(2);
  diverged.train(1);
  Tensor m = diverged.optimizer.first_moments().at("out.weight");  // the optimiser's own storage
  m.data<float>()[0] = NAN;
  EXPECT_EQ(
      test::error_of([&] { diverged.state().load(path); }),
      path + ": tensors 'ema/*': EMA::set: 'out.bias' has shape (5,), the parameter has (2,)");
}

// A float64 file read into a float32 loop: values past float32's range are refused, naming the
// tensor, not stored as infinity (which the next save would refuse, stranding the run); moments
// of two dtypes take their parameter's, so the next update runs.
TEST(TrainingState, ValuesAreConvertedToTheLoopsDtypeOrRefused) {
  test::TempDir dir;
  LoopState saved(1);
  saved.train(2);
  const std::string good = dir.file("good.safetensors");
  saved.state().save(good);
  const SafetensorsFile file = load_safetensors(good);
  const auto variant = [&](const std::string& name, const std::string& changed, double value) {
    NamedTensors tensors;
    for (const auto& [n, t] : file.tensors)
      tensors.insert(n, n == changed ? raw::add_scalar(raw::to_dtype(t, DType::f64), value) : t);
    const std::string path = dir.file(name);
    save_safetensors(path, tensors, file.metadata);
    return path;
  };
  for (const auto& [tensor, prefix, who] :
       {std::tuple{"ema/out.bias", "ema/*", "EMA::set: 'out.bias'"},
        std::tuple{"adam_m/out.bias", "adam_m/*', 'adam_v/*",
                   "AdamW::set_state: first moment 'out.bias'"},
        std::tuple{"adam_v/out.bias", "adam_m/*', 'adam_v/*",
                   "AdamW::set_state: second moment 'out.bias'"}}) {
    const std::string huge = variant("huge.safetensors", tensor, 1e300);
    LoopState target(2);
    const std::vector<float> before = target.model.named_parameters()[0].second.to_vector<float>();
    const std::string message = test::error_of([&] { target.state().load(huge); });
    EXPECT_THAT(message, HasSubstr(str_cat(huge, ": tensors '", prefix, "': ", who, " holds ")));
    EXPECT_THAT(message, HasSubstr(" at (0,), past float32's range"));
    EXPECT_EQ(target.model.named_parameters()[0].second.to_vector<float>(), before) << tensor;
  }
  const std::string mixed = variant("mixed.safetensors", "adam_v/out.bias", 0.0);
  LoopState target(2);
  target.state().load(mixed);
  EXPECT_EQ(target.optimizer.second_moments().at("out.bias").dtype(), DType::f32);
  target.train(1);
  EXPECT_EQ(target.optimizer.step(), 3);
}

// A save removes the temporary files that saves to the same path killed midway left behind.
TEST(TrainingState, SavingRemovesWhatKilledSavesLeft) {
  test::TempDir dir;
  const std::string path = dir.file("run.safetensors");
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  const std::string stale = "run.safetensors.tmp." + std::to_string(child) + ".0";
  std::ofstream(dir.file(stale)) << "partial";
  LoopState run(1);
  run.state().save(path);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"run.safetensors"});
}

}  // namespace
}  // namespace mmdit
