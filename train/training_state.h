// The state of a training loop written in user code, in one safetensors file: what the
// checkpoints of `mmdit train` hold, for any nn::Module. In PyTorch this is the state_dict of the
// model and of its optimiser saved side by side; in the reference, the Equinox model and optax
// state serialised together.
//
//   TrainingState state{.model = mlp, .optimizer = &adamw, .ema = &ema, .rng = &rng};
//   state.save("run.safetensors", {{"epoch", "3"}});
//   ...                                  // later, in another process, the same objects built anew:
//   state.load("run.safetensors");      // the run continues as if it had never stopped
//
// The file's tensors: the parameters ("param/<name>"), the buffers ("buffer/<name>"), AdamW's
// first and second moments ("adam_m/<name>", "adam_v/<name>") and the EMA ("ema/<name>"). Its
// metadata: "format" (mmdit-training-state/1), AdamW's "step", the generator's "rng"
// ({"seed", "counter"}), and the caller's own keys. A checkpoint of `mmdit train` names its
// tensors, step and random state the same way, so load() reads one too: a BCPolicy trained by
// the CLI continues in user code.
#pragma once

#include <map>
#include <string>

#include "nn/module.h"
#include "tensor/safetensors.h"
#include "train/optim.h"

namespace mmdit {

struct TrainingState {
  nn::Module& model;           // its parameters and buffers, always
  AdamW* optimizer = nullptr;  // each of these, when given, is saved and restored too
  EMA* ema = nullptr;
  Rng* rng = nullptr;

  // The tensors as the file names them.
  NamedTensors tensors() const;
  // Writes atomically (a temporary file, then a rename), then removes the temporary files that
  // saves to `path` killed midway left behind. Refuses, naming the tensor and leaving
  // the previous file as it was, a state holding a number that is not finite (a diverged run
  // must not replace its last good state); and metadata keys the format uses itself.
  void save(const std::string& path, const std::map<std::string, std::string>& metadata = {}) const;
  // Restores every part given and returns the file's other metadata (the caller's own keys).
  // Values take the dtype of what they are read into. A part given that the file does not hold,
  // a tensor missing, unknown or of another shape, a number that is not finite or that would not
  // be in that dtype (a float64 past float32's range): an error naming the file and the tensor,
  // with nothing changed.
  // Parts the file holds and the state does not name (an EMA, say) are left unread.
  std::map<std::string, std::string> load(const std::string& path);
  // load() of a file already read; `path` starts the messages. For formats built on this one
  // (Trainer::resume, which reads the rest of its checkpoint's metadata itself).
  void restore(const SafetensorsFile& file, const std::string& path);
  // Throws what save() would refuse, without writing; `what` starts the message.
  void check_saveable(const std::string& what) const;
};

// The weights of a model saved by TrainingState::save or `mmdit train`, for inference: the EMA's
// (use_ema, the default, as the reference agent acts) or the parameters, and the buffers. Errors
// name the file and the tensor; the model is unchanged when loading fails.
void load_weights(const std::string& path, nn::Module& model, bool use_ema = true);

// Pieces of the format that the checkpoints of `mmdit train` (checkpoint.cc) share. Errors start
// with `path`.
inline constexpr const char* kTrainingStateFormat = "mmdit-training-state/1";
inline constexpr const char* kCheckpointFormat = "mmdit-checkpoint/1";  // mmdit train's
// The metadata's "rng", from a generator and back into one.
std::string rng_state_json(const Rng& rng);
void set_rng_state(Rng& rng, const std::string& json, const std::string& path);
// The tensors whose names start with `prefix` ("ema/"), named without it.
NamedTensors with_prefix(const NamedTensors& tensors, const std::string& prefix);
// The metadata's "step": a whole number >= 0.
int64_t read_step(const std::map<std::string, std::string>& metadata, const std::string& path);
// Throws "<path>: <when> '<name>' holds nan at (i,j)" for the first number that is not finite.
void check_finite(const NamedTensors& tensors, const std::string& path, const char* when);

}  // namespace mmdit
