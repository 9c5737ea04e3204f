#include "train/dataset.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <set>

#include "tensor/file_io.h"
#include "tensor/ops.h"
#include "tensor/random.h"
#include "train/npy.h"

namespace mmdit {
namespace {

constexpr const char* kStateKey = "observation.state";
constexpr const char* kActionKey = "action";
constexpr const char* kEpisodeKey = "episode_index";

// The values of a floating-point (N, d) tensor as contiguous float32, rejecting non-finite ones
// (a NaN in a demonstration silently poisons the normalization statistics and every loss).
std::vector<float> finite_rows_f32(const Tensor& t, const std::string& what,
                                   const std::string& key) {
  const Tensor c = raw::contiguous(raw::to_dtype(t, DType::f32));
  const float* p = c.data<float>();
  const int64_t n = c.numel(), cols = c.size(1);
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(p[i]))
      fail(what, ": ", key, "[", i / cols, ", ", i % cols, "] is ", p[i],
           " as float32 (non-finite, or outside float32's range); demonstrations must be finite");
  return std::vector<float>(p, p + n);
}

// splitmix64's finalizer: decorrelates nearby (seed, epoch) pairs.
uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

}  // namespace

// ---- Episodes ----

int64_t Episodes::num_episodes() const {
  return episode_starts.empty() ? 0 : static_cast<int64_t>(episode_starts.size()) - 1;
}
int64_t Episodes::num_frames() const {
  return states.defined() ? states.size(0) : 0;
}
int64_t Episodes::state_dim() const {
  return states.defined() ? states.size(1) : 0;
}
int64_t Episodes::act_dim() const {
  return actions.defined() ? actions.size(1) : 0;
}
int64_t Episodes::episode_length(int64_t e) const {
  MMDIT_CHECK(e >= 0 && e < num_episodes(), "Episodes::episode_length: episode ", e,
              " out of range [0, ", num_episodes(), ")");
  return episode_starts[e + 1] - episode_starts[e];
}

std::string data_fingerprint(const Episodes& episodes) {
  uint64_t hash = 0xcbf29ce484222325ull;
  const auto mix = [&](const void* data, size_t bytes) {
    const auto* b = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < bytes; ++i) hash = (hash ^ b[i]) * 0x100000001b3ull;
  };
  for (const Tensor& t : {episodes.states, episodes.actions}) {
    const Tensor values = raw::contiguous(raw::to_dtype(t, DType::f32));
    const int64_t dims[2] = {values.size(0), values.size(1)};
    mix(dims, sizeof dims);
    mix(values.data<float>(), static_cast<size_t>(values.numel()) * sizeof(float));
  }
  mix(episodes.episode_starts.data(), episodes.episode_starts.size() * sizeof(int64_t));
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(hash));
  return hex;
}

void validate_episodes(const Episodes& ep, const std::string& what) {
  auto check_matrix = [&](const Tensor& t, const char* name) {
    MMDIT_CHECK(t.defined(), what, ": ", name, " is undefined");
    MMDIT_CHECK(t.dim() == 2, what, ": ", name, " must be (N, dim), got shape ",
                shape_str(t.shape()));
    MMDIT_CHECK(is_floating(t.dtype()), what, ": ", name, " must be floating point, got ",
                dtype_name(t.dtype()));
    MMDIT_CHECK(t.size(1) >= 1, what, ": ", name, " has no features (shape ", shape_str(t.shape()),
                ")");
    finite_rows_f32(t, what, name);
  };
  check_matrix(ep.states, "states");
  check_matrix(ep.actions, "actions");
  const int64_t n = ep.states.size(0);
  MMDIT_CHECK(n >= 1, what, ": the dataset is empty (no frames)");
  MMDIT_CHECK(ep.actions.size(0) == n, what, ": states have ", n, " frames but actions have ",
              ep.actions.size(0));
  const auto& s = ep.episode_starts;
  MMDIT_CHECK(s.size() >= 2, what, ": episode_starts must hold E+1 >= 2 offsets, got ", s.size());
  MMDIT_CHECK(s.front() == 0, what, ": episode_starts must begin at 0, got ", s.front());
  MMDIT_CHECK(s.back() == n, what, ": episode_starts must end at N = ", n, ", got ", s.back());
  for (size_t e = 0; e + 1 < s.size(); ++e)
    MMDIT_CHECK(s[e + 1] > s[e], what, ": episode ", e, " is empty or reversed ([", s[e], ", ",
                s[e + 1], ")); every episode needs at least 1 frame");
}

// ---- LeRobot ----

Episodes load_lerobot_arrays(const NamedTensors& arrays, const std::string& what) {
  for (const char* key : {kStateKey, kActionKey, kEpisodeKey}) {
    if (arrays.contains(key)) continue;
    std::vector<std::string> present;
    for (const auto& [name, t] : arrays) present.push_back(name);
    fail(what, ": missing key '", key, "' (keys present: ", quoted_list(present), ")");
  }
  const Tensor& state = arrays.at(kStateKey);
  const Tensor& action = arrays.at(kActionKey);
  const Tensor& episode = arrays.at(kEpisodeKey);
  for (const auto& [key, t] : {std::pair{kStateKey, state}, std::pair{kActionKey, action}}) {
    MMDIT_CHECK(t.dim() == 2, what, ": '", key, "' must be (N, dim), got shape ",
                shape_str(t.shape()));
    MMDIT_CHECK(is_floating(t.dtype()), what, ": '", key, "' must be numeric, got ",
                dtype_name(t.dtype()));
    MMDIT_CHECK(t.size(1) >= 1, what, ": '", key, "' has no features (shape ", shape_str(t.shape()),
                ")");
  }
  MMDIT_CHECK(episode.dim() == 1, what, ": '", kEpisodeKey, "' must be (N,), got shape ",
              shape_str(episode.shape()));
  MMDIT_CHECK(is_floating(episode.dtype()), what, ": '", kEpisodeKey, "' must be numeric, got ",
              dtype_name(episode.dtype()));
  const int64_t n = state.size(0);
  MMDIT_CHECK(action.size(0) == n && episode.size(0) == n, what,
              ": arrays disagree on the number of frames: '", kStateKey, "' has ", n, ", '",
              kActionKey, "' has ", action.size(0), ", '", kEpisodeKey, "' has ", episode.size(0));
  MMDIT_CHECK(n >= 1, what, ": the dataset is empty (no frames)");

  Episodes ep;
  const std::vector<double> index = episode.to_vector<double>();
  std::set<double> seen;
  for (int64_t t = 0; t < n; ++t) {
    const double v = index[t];
    if (!std::isfinite(v) || v != std::floor(v))
      fail(what, ": '", kEpisodeKey, "'[", t, "] = ", v, " is not an integer");
    if (t > 0 && v == index[t - 1]) continue;
    if (!seen.insert(v).second)
      fail(what, ": '", kEpisodeKey, "' value ", v, " reappears at frame ", t,
           " after other episodes; each episode must be one contiguous run of frames");
    ep.episode_starts.push_back(t);
  }
  ep.episode_starts.push_back(n);
  ep.states = from_vector<float>(finite_rows_f32(state, what, kStateKey), {n, state.size(1)});
  ep.actions = from_vector<float>(finite_rows_f32(action, what, kActionKey), {n, action.size(1)});
  return ep;
}

Episodes load_lerobot_npz(const std::string& path) {
  return load_lerobot_arrays(load_npz(path, {kStateKey, kActionKey, kEpisodeKey}), path);
}

void save_lerobot_npz(const std::string& path, const Episodes& episodes) {
  validate_episodes(episodes, path);
  std::vector<int64_t> index(static_cast<size_t>(episodes.num_frames()));
  for (int64_t e = 0; e < episodes.num_episodes(); ++e)
    std::fill(index.begin() + episodes.episode_starts[e],
              index.begin() + episodes.episode_starts[e + 1], e);
  std::vector<std::pair<std::string, std::string>> members;
  members.emplace_back(kStateKey, serialize_npy(raw::to_dtype(episodes.states, DType::f32)));
  members.emplace_back(kActionKey, serialize_npy(raw::to_dtype(episodes.actions, DType::f32)));
  members.emplace_back(kEpisodeKey,
                       serialize_npy_int64(index, {static_cast<int64_t>(index.size())}));
  save_npz_members(path, members);
}

Episodes load_episodes(const std::string& path, const std::vector<std::string>& obs_keys) {
  const std::string ext = lowercase_extension(path);
  if (ext == ".npz") return load_lerobot_npz(path);
  if (ext == ".hdf5" || ext == ".h5") return load_robomimic_hdf5(path, obs_keys);
  fail(path, ": unknown dataset format '", ext.empty() ? "(no extension)" : ext,
       "' (expected .npz for LeRobot-style arrays, .hdf5 or .h5 for robomimic)");
}

// ---- statistics ----

NormStats compute_stats(const Tensor& data) {
  MMDIT_CHECK(data.defined(), "compute_stats: undefined tensor");
  MMDIT_CHECK(data.dim() == 2, "compute_stats: data must be (N, dim), got shape ",
              shape_str(data.shape()));
  MMDIT_CHECK(is_floating(data.dtype()), "compute_stats: data must be floating point, got ",
              dtype_name(data.dtype()));
  const int64_t n = data.size(0), dim = data.size(1);
  MMDIT_CHECK(n >= 1, "compute_stats: no rows");
  const Tensor c = raw::contiguous(raw::to_dtype(data, DType::f64));
  const double* p = c.data<double>();
  std::vector<double> lo(dim, std::numeric_limits<double>::infinity());
  std::vector<double> hi(dim, -std::numeric_limits<double>::infinity());
  std::vector<double> sum(dim, 0.0), sq(dim, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < dim; ++j) {
      const double v = p[i * dim + j];
      lo[j] = std::min(lo[j], v);
      hi[j] = std::max(hi[j], v);
      sum[j] += v;
    }
  std::vector<double> mean(dim), std(dim);
  for (int64_t j = 0; j < dim; ++j) mean[j] = sum[j] / static_cast<double>(n);
  // Two passes: the one-pass sum-of-squares formula cancels catastrophically when |mean| >> std.
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < dim; ++j) {
      const double d = p[i * dim + j] - mean[j];
      sq[j] += d * d;
    }
  for (int64_t j = 0; j < dim; ++j) std[j] = std::sqrt(sq[j] / static_cast<double>(n));
  auto f32 = [&](const std::vector<double>& v) { return from_vector(v, {dim}, DType::f32); };
  return {f32(lo), f32(hi), f32(mean), f32(std)};
}

// ---- WindowSampler ----

WindowSampler::WindowSampler(const Episodes& episodes, int64_t n_obs_steps, int64_t horizon,
                             uint64_t seed)
    : n_obs_(n_obs_steps), horizon_(horizon), seed_(seed) {
  MMDIT_CHECK(n_obs_steps >= 1 && n_obs_steps <= kMaxWindow,
              "WindowSampler: n_obs_steps must be in [1, ", kMaxWindow, "], got ", n_obs_steps);
  MMDIT_CHECK(horizon >= 1 && horizon <= kMaxWindow, "WindowSampler: horizon must be in [1, ",
              kMaxWindow, "], got ", horizon);
  validate_episodes(episodes, "WindowSampler");
  num_frames_ = episodes.num_frames();
  num_episodes_ = episodes.num_episodes();
  state_dim_ = episodes.state_dim();
  act_dim_ = episodes.act_dim();
  states_ = raw::contiguous(raw::to_dtype(episodes.states, DType::f32)).to_vector<float>();
  actions_ = raw::contiguous(raw::to_dtype(episodes.actions, DType::f32)).to_vector<float>();
  frame_begin_.resize(static_cast<size_t>(num_frames_));
  frame_end_.resize(static_cast<size_t>(num_frames_));
  for (int64_t e = 0; e < episodes.num_episodes(); ++e)
    for (int64_t t = episodes.episode_starts[e]; t < episodes.episode_starts[e + 1]; ++t) {
      frame_begin_[t] = episodes.episode_starts[e];
      frame_end_[t] = episodes.episode_starts[e + 1];
    }
}

Batch WindowSampler::get(const std::vector<int64_t>& sample_indices) const {
  const auto b = static_cast<int64_t>(sample_indices.size());
  Batch batch;
  batch.state = empty({b, n_obs_, state_dim_}, DType::f32);
  batch.action = empty({b, horizon_, act_dim_}, DType::f32);
  batch.action_is_pad = empty({b, horizon_}, DType::boolean);
  float* state = batch.state.data<float>();
  float* action = batch.action.data<float>();
  bool* pad = batch.action_is_pad.data<bool>();
  for (int64_t i = 0; i < b; ++i) {
    const int64_t t = sample_indices[i];
    MMDIT_CHECK(t >= 0 && t < num_frames_, "WindowSampler::get: sample index ", t,
                " out of range [0, ", num_frames_, ")");
    const int64_t begin = frame_begin_[t], last = frame_end_[t] - 1;
    const int64_t first = t - n_obs_ + 1;  // both windows start here
    for (int64_t k = 0; k < n_obs_; ++k) {
      const int64_t j = std::clamp(first + k, begin, last);
      std::copy_n(states_.data() + j * state_dim_, state_dim_,
                  state + (i * n_obs_ + k) * state_dim_);
    }
    for (int64_t k = 0; k < horizon_; ++k) {
      const int64_t j = first + k;
      pad[i * horizon_ + k] = j < begin || j > last;
      std::copy_n(actions_.data() + std::clamp(j, begin, last) * act_dim_, act_dim_,
                  action + (i * horizon_ + k) * act_dim_);
    }
  }
  return batch;
}

std::vector<int64_t> WindowSampler::permutation(int64_t epoch) const {
  MMDIT_CHECK(epoch >= 0, "WindowSampler::permutation: negative epoch ", epoch);
  std::vector<int64_t> perm(static_cast<size_t>(num_frames_));
  std::iota(perm.begin(), perm.end(), int64_t{0});
  Rng rng(mix64(seed_ ^ mix64(static_cast<uint64_t>(epoch) ^ 0x5A3C9E1D2B4F6A87ull)));
  for (size_t i = perm.size(); i-- > 1;) {
    // Lemire's multiply-shift maps 64 random bits onto [0, i]; its bias is below 2^-40 here.
    const auto j =
        static_cast<size_t>((static_cast<unsigned __int128>(rng.next_u64()) * (i + 1)) >> 64);
    std::swap(perm[i], perm[j]);
  }
  return perm;
}

const std::vector<int64_t>& WindowSampler::cached_permutation(int64_t epoch) {
  if (cached_epoch_ != epoch) {
    cached_perm_ = permutation(epoch);
    cached_epoch_ = epoch;
  }
  return cached_perm_;
}

std::vector<int64_t> WindowSampler::next_indices(int64_t batch_size) {
  MMDIT_CHECK(batch_size >= 1 && batch_size <= kMaxBatchSize,
              "WindowSampler::next: batch_size must be in [1, ", kMaxBatchSize, "], got ",
              batch_size);
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(batch_size));
  if (batch_size <= num_frames_) {
    if (offset_ + batch_size > num_frames_) ++epoch_, offset_ = 0;
    const std::vector<int64_t>& perm = cached_permutation(epoch_);
    out.assign(perm.begin() + offset_, perm.begin() + offset_ + batch_size);
    offset_ += batch_size;
    return out;
  }
  if (offset_ > 0) ++epoch_, offset_ = 0;
  while (static_cast<int64_t>(out.size()) < batch_size) {
    const std::vector<int64_t>& perm = cached_permutation(epoch_++);
    const int64_t take = std::min<int64_t>(num_frames_, batch_size - out.size());
    out.insert(out.end(), perm.begin(), perm.begin() + take);
  }
  return out;
}

Batch WindowSampler::next(int64_t batch_size) {
  return get(next_indices(batch_size));
}

void WindowSampler::set_position(int64_t epoch, int64_t offset) {
  MMDIT_CHECK(epoch >= 0, "WindowSampler::set_position: negative epoch ", epoch);
  MMDIT_CHECK(offset >= 0 && offset <= num_frames_, "WindowSampler::set_position: offset ", offset,
              " out of range [0, ", num_frames_, "]");
  epoch_ = epoch;
  offset_ = offset;
}

}  // namespace mmdit
