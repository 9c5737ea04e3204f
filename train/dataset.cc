#include "train/dataset.h"

#include <hdf5.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
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

std::string quoted_list(const std::vector<std::string>& names) {
  if (names.empty()) return "none";
  std::string s;
  for (const std::string& n : names) {
    if (!s.empty()) s += ", ";
    s += "'" + n + "'";
  }
  return s;
}

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

Tensor tensor_from(const std::vector<float>& values, int64_t rows, int64_t cols) {
  return from_vector<float>(values, {rows, cols});
}

// ---- HDF5 ----

// Owns one HDF5 identifier and closes it with the matching H5?close.
class H5Handle {
 public:
  H5Handle() = default;
  H5Handle(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  H5Handle(H5Handle&& o) noexcept : id_(o.id_), close_(o.close_) { o.id_ = -1; }
  H5Handle& operator=(H5Handle&& o) noexcept {
    std::swap(id_, o.id_);
    std::swap(close_, o.close_);
    return *this;
  }
  H5Handle(const H5Handle&) = delete;
  H5Handle& operator=(const H5Handle&) = delete;
  ~H5Handle() {
    if (id_ >= 0 && close_) close_(id_);
  }
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }

 private:
  hid_t id_ = -1;
  herr_t (*close_)(hid_t) = nullptr;
};

bool link_exists(hid_t loc, const std::string& name) {
  return H5Lexists(loc, name.c_str(), H5P_DEFAULT) > 0;
}

std::vector<std::string> link_names(hid_t group) {
  std::vector<std::string> names;
  H5G_info_t info;
  if (H5Gget_info(group, &info) < 0) return names;
  for (hsize_t i = 0; i < info.nlinks; ++i) {
    const ssize_t len =
        H5Lget_name_by_idx(group, ".", H5_INDEX_NAME, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT);
    if (len < 0) continue;
    std::string name(static_cast<size_t>(len) + 1, '\0');
    if (H5Lget_name_by_idx(group, ".", H5_INDEX_NAME, H5_ITER_INC, i, name.data(), name.size(),
                           H5P_DEFAULT) < 0)
      continue;
    name.resize(static_cast<size_t>(len));
    names.push_back(std::move(name));
  }
  return names;
}

// libhdf5 (1.10 in Debian 12) trusts some addresses in a file: one flipped address in a 10 KB
// robomimic file makes it read through a wild pointer (SIGSEGV in H5F__accum_read, found by
// tools/fuzz/fuzz_hdf5_dataset). Nothing is recoverable in the process after that, but instead
// of a bare "Segmentation fault" the program says which file did it. While an object of this
// class lives, a fault writes that message and hands the signal back to the handler it
// replaced (the default, or a sanitizer's), which then ends the process. Files are read one at a
// time (hdf5_mutex), so the static state the handler reads belongs to one reader.
class FileFaultMessage {
 public:
  explicit FileFaultMessage(const std::string& path) {
    const std::string text =
        str_cat("mmdit: the HDF5 library crashed reading ", path, ": the file is malformed\n");
    length_ = std::min(text.size(), sizeof message_);
    std::memcpy(message_, text.data(), length_);
    struct sigaction action {};
    action.sa_handler = &FileFaultMessage::on_fault;
    sigemptyset(&action.sa_mask);
    for (size_t i = 0; i < kSignals.size(); ++i) sigaction(kSignals[i], &action, &replaced_[i]);
  }
  ~FileFaultMessage() {
    for (size_t i = 0; i < kSignals.size(); ++i) sigaction(kSignals[i], &replaced_[i], nullptr);
  }
  FileFaultMessage(const FileFaultMessage&) = delete;
  FileFaultMessage& operator=(const FileFaultMessage&) = delete;

 private:
  static constexpr std::array<int, 3> kSignals = {SIGSEGV, SIGBUS, SIGFPE};

  // Returning re-runs the faulting instruction, which now goes to the replaced handler.
  static void on_fault(int signal) {
    [[maybe_unused]] const ssize_t written = ::write(STDERR_FILENO, message_, length_);
    for (size_t i = 0; i < kSignals.size(); ++i)
      if (kSignals[i] == signal) sigaction(signal, &replaced_[i], nullptr);
  }

  static inline char message_[4096];
  static inline size_t length_ = 0;
  static inline struct sigaction replaced_[kSignals.size()] = {};
};

// What HDF5's error stack says about the last failed call, innermost cause last ("unable to
// lock file, errno = 11, ..."): its automatic printing is off, so messages carry it instead.
std::string hdf5_cause() {
  std::string cause;
  H5Ewalk2(
      H5E_DEFAULT, H5E_WALK_DOWNWARD,
      [](unsigned, const H5E_error2_t* e, void* out) -> herr_t {
        if (e->desc && *e->desc) *static_cast<std::string*>(out) = e->desc;
        return 0;
      },
      &cause);
  return cause.empty() ? std::string() : " (HDF5: " + cause + ")";
}

// Opens `name` in `loc` as a group; `label` is its path for messages.
H5Handle open_group(hid_t loc, const std::string& name, const std::string& what,
                    const std::string& label) {
  const hid_t obj = H5Oopen(loc, name.c_str(), H5P_DEFAULT);
  if (obj < 0) fail(what, ": cannot open '", label, "'");
  H5Handle handle(obj, H5Oclose);
  if (H5Iget_type(obj) != H5I_GROUP) fail(what, ": '", label, "' is not a group");
  return handle;
}

struct Matrix {
  std::vector<float> values;  // row-major (rows, cols)
  int64_t rows = 0, cols = 0;
};

// Reads the floating-point dataset `name` in `loc`, of shape (T, d) or (T,), as float32.
Matrix read_matrix(hid_t loc, const std::string& name, const std::string& what,
                   const std::string& label) {
  const hid_t obj = H5Oopen(loc, name.c_str(), H5P_DEFAULT);
  if (obj < 0) fail(what, ": cannot open '", label, "'");
  H5Handle object(obj, H5Oclose);
  if (H5Iget_type(obj) != H5I_DATASET) fail(what, ": '", label, "' is not a dataset");
  H5Handle dataset(H5Dopen2(loc, name.c_str(), H5P_DEFAULT), H5Dclose);
  if (!dataset.valid()) fail(what, ": cannot open dataset '", label, "'");
  H5Handle space(H5Dget_space(dataset.get()), H5Sclose);
  if (!space.valid()) fail(what, ": cannot read the shape of '", label, "'");
  const int rank = H5Sget_simple_extent_ndims(space.get());
  if (rank < 0) fail(what, ": cannot read the shape of '", label, "'");
  if (rank != 1 && rank != 2)
    fail(what, ": '", label, "' has rank ", rank, "; expected (T, d) or (T,)",
         rank > 2 ? " (image observations are not supported)" : "");
  hsize_t dims[2] = {0, 1};
  if (H5Sget_simple_extent_dims(space.get(), dims, nullptr) < 0)
    fail(what, ": cannot read the shape of '", label, "'");
  H5Handle type(H5Dget_type(dataset.get()), H5Tclose);
  if (!type.valid()) fail(what, ": cannot read the type of '", label, "'");
  if (H5Tget_class(type.get()) != H5T_FLOAT)
    fail(what, ": '", label, "' is not floating point; expected float32 or float64");

  // HDF5 reads storage that was never written as the fill value (zeros), so a file an
  // interrupted writer left would load as demonstrations of zeros; and a corrupt header can
  // declare any extent, which would be allocated before the read fails. What is stored must
  // cover what is declared.
  if (dims[0] > 0 && dims[1] > 0) {
    H5D_space_status_t status;
    if (H5Dget_space_status(dataset.get(), &status) < 0)
      fail(what, ": cannot read the storage of '", label, "'");
    if (status == H5D_SPACE_STATUS_NOT_ALLOCATED)
      fail(what, ": '", label, "' holds no stored data (never written; is the file complete?)");
    H5Handle plist(H5Dget_create_plist(dataset.get()), H5Pclose);
    if (!plist.valid()) fail(what, ": cannot read the storage of '", label, "'");
    // For a chunked dataset libhdf5 1.10 reports "part allocated" whenever the bytes stored are
    // not rows x cols x element: always when compressed, and when the last chunk sticks out past
    // the extent. The chunks written are counted instead.
    if (H5Pget_layout(plist.get()) == H5D_CHUNKED) {
      hsize_t chunk[2] = {1, 1};
      hsize_t written = 0;
      if (H5Pget_chunk(plist.get(), rank, chunk) != rank || chunk[0] == 0 ||
          (rank == 2 && chunk[1] == 0) ||
          H5Dget_num_chunks(dataset.get(), space.get(), &written) < 0)
        fail(what, ": cannot read the chunks of '", label, "'");
      const hsize_t needed = (dims[0] + chunk[0] - 1) / chunk[0] *
                             (rank == 2 ? (dims[1] + chunk[1] - 1) / chunk[1] : 1);
      if (written < needed)
        fail(what, ": '", label, "' is only partly stored (", written, " of its ", needed,
             " chunks were written; is the file complete?)");
    } else if (status == H5D_SPACE_STATUS_PART_ALLOCATED) {
      fail(what, ": '", label, "' is only partly stored (is the file complete?)");
    }
    const size_t element = H5Tget_size(type.get());
    const double declared =
        static_cast<double>(dims[0]) * static_cast<double>(dims[1]) * static_cast<double>(element);
    const hsize_t stored = H5Dget_storage_size(dataset.get());
    const bool filtered = H5Pget_nfilters(plist.get()) > 0;
    // Compression (deflate at most about 1000:1) may store less than it declares.
    const double bound =
        filtered ? 2048.0 * static_cast<double>(stored) + (1 << 20) : static_cast<double>(stored);
    if (declared > bound)
      fail(what, ": '", label, "' declares shape (", dims[0], ", ", dims[1], ") of ", element,
           "-byte numbers but stores ", stored, " bytes", filtered ? " compressed" : "",
           " (corrupt?)");
  }
  Matrix m;
  // A chunked dataset may declare any extent without storing it; refuse absurd ones up front.
  constexpr hsize_t kMaxElements = hsize_t{1} << 34;
  if (dims[0] > kMaxElements || dims[1] > kMaxElements ||
      (dims[1] != 0 && dims[0] > kMaxElements / dims[1]))
    fail(what, ": '", label, "' of shape (", dims[0], ", ", dims[1], ") is too large to load");
  m.rows = static_cast<int64_t>(dims[0]);
  m.cols = static_cast<int64_t>(dims[1]);
  try {
    m.values.resize(static_cast<size_t>(dims[0] * dims[1]));
  } catch (const std::bad_alloc&) {
    fail(what, ": '", label, "' of shape (", dims[0], ", ", dims[1], ") does not fit in memory");
  }
  if (!m.values.empty() &&
      H5Dread(dataset.get(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, m.values.data()) < 0)
    fail(what, ": cannot read '", label, "'", hdf5_cause());
  for (size_t i = 0; i < m.values.size(); ++i)
    if (!std::isfinite(m.values[i]))
      fail(what, ": '", label, "'[", i / static_cast<size_t>(std::max<int64_t>(m.cols, 1)), ", ",
           i % static_cast<size_t>(std::max<int64_t>(m.cols, 1)), "] is ", m.values[i],
           " (as float32); demonstrations must be finite");
  return m;
}

// The numeric suffix of "demo_<digits>", or -1.
int64_t demo_number(const std::string& name) {
  constexpr std::string_view kPrefix = "demo_";
  if (name.size() <= kPrefix.size() || name.compare(0, kPrefix.size(), kPrefix) != 0) return -1;
  int64_t n = 0;
  for (size_t i = kPrefix.size(); i < name.size(); ++i) {
    const char c = name[i];
    if (c < '0' || c > '9') return -1;
    if (n > (std::numeric_limits<int64_t>::max() - (c - '0')) / 10) return -1;
    n = n * 10 + (c - '0');
  }
  return n;
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
  ep.states = tensor_from(finite_rows_f32(state, what, kStateKey), n, state.size(1));
  ep.actions = tensor_from(finite_rows_f32(action, what, kActionKey), n, action.size(1));
  return ep;
}

Episodes load_lerobot_npz(const std::string& path) {
  return load_lerobot_arrays(load_npz(path), path);
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

// ---- robomimic ----

Episodes load_robomimic_hdf5(const std::string& path, const std::vector<std::string>& obs_keys) {
  MMDIT_CHECK(!obs_keys.empty(), path, ": no observation keys given");
  {
    std::set<std::string> unique;
    for (const std::string& key : obs_keys) {
      MMDIT_CHECK(!key.empty() && key.find('/') == std::string::npos && key != "." && key != "..",
                  path, ": bad observation key '", key, "'");
      MMDIT_CHECK(unique.insert(key).second, path, ": observation key '", key, "' is given twice");
    }
  }
  // Readers on several threads take turns, so that each FileFaultMessage puts back the handler
  // that was there before any of them (Debian's libhdf5 takes a global lock of its own anyway).
  static std::mutex hdf5_mutex;
  const std::lock_guard<std::mutex> one_reader(hdf5_mutex);
  // HDF5 prints its own error stack to stderr by default; our messages say what went wrong.
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) fail(path, ": cannot open: ", std::strerror(errno));
  if (!S_ISREG(st.st_mode)) fail(path, ": not a regular file");
  const FileFaultMessage fault_message(path);
  if (H5Fis_hdf5(path.c_str()) <= 0) fail(path, ": not an HDF5 file");
  H5Handle file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  if (!file.valid()) fail(path, ": cannot open the HDF5 file", hdf5_cause());

  if (!link_exists(file.get(), "data"))
    fail(path, ": no 'data' group (top-level members: ", quoted_list(link_names(file.get())), ")");
  const H5Handle data = open_group(file.get(), "data", path, "data");
  std::vector<std::pair<int64_t, std::string>> demos;
  for (const std::string& name : link_names(data.get()))
    if (const int64_t i = demo_number(name); i >= 0) demos.emplace_back(i, name);
  if (demos.empty())
    fail(path, ": no demo_<i> groups in 'data' (members: ", quoted_list(link_names(data.get())),
         ")");
  std::sort(demos.begin(), demos.end());

  std::vector<float> states, actions;
  std::vector<int64_t> starts = {0};
  std::vector<int64_t> key_dims(obs_keys.size(), -1);
  int64_t act_dim = -1;
  std::string first_demo;
  for (const auto& [number, name] : demos) {
    const std::string demo_path = "data/" + name;
    const H5Handle demo = open_group(data.get(), name, path, demo_path);
    if (!link_exists(demo.get(), "actions"))
      fail(path, ": demo '", name,
           "' has no 'actions' dataset (members: ", quoted_list(link_names(demo.get())), ")");
    const Matrix act = read_matrix(demo.get(), "actions", path, demo_path + "/actions");
    if (act.rows < 1)
      fail(path, ": demo '", name, "' has no frames ('", demo_path, "/actions' has shape (0, ",
           act.cols, "))");
    if (act_dim < 0) act_dim = act.cols, first_demo = name;
    if (act.cols != act_dim)
      fail(path, ": demo '", name, "': actions have ", act.cols, " dimensions but demo '",
           first_demo, "' has ", act_dim);
    if (!link_exists(demo.get(), "obs"))
      fail(path, ": demo '", name,
           "' has no 'obs' group (members: ", quoted_list(link_names(demo.get())), ")");
    const H5Handle obs = open_group(demo.get(), "obs", path, demo_path + "/obs");
    std::vector<Matrix> parts;
    for (size_t k = 0; k < obs_keys.size(); ++k) {
      const std::string& key = obs_keys[k];
      if (!link_exists(obs.get(), key))
        fail(path, ": demo '", name, "' has no observation key '", key,
             "' (obs keys present: ", quoted_list(link_names(obs.get())), ")");
      const std::string label = demo_path + "/obs/" + key;
      Matrix m = read_matrix(obs.get(), key, path, label);
      if (m.rows != act.rows)
        fail(path, ": demo '", name, "': '", label, "' has ", m.rows, " frames but actions have ",
             act.rows);
      if (key_dims[k] < 0) key_dims[k] = m.cols;
      if (m.cols != key_dims[k])
        fail(path, ": demo '", name, "': observation '", key, "' has ", m.cols,
             " dimensions but demo '", demos.front().second, "' has ", key_dims[k]);
      parts.push_back(std::move(m));
    }
    for (int64_t t = 0; t < act.rows; ++t)
      for (const Matrix& m : parts)
        states.insert(states.end(), m.values.begin() + t * m.cols,
                      m.values.begin() + (t + 1) * m.cols);
    actions.insert(actions.end(), act.values.begin(), act.values.end());
    starts.push_back(starts.back() + act.rows);
  }
  int64_t state_dim = 0;
  for (int64_t d : key_dims) state_dim += d;
  if (state_dim < 1) fail(path, ": the observations ", quoted_list(obs_keys), " have no features");
  if (act_dim < 1) fail(path, ": the actions have no dimensions");
  Episodes ep;
  const int64_t n = starts.back();
  ep.states = tensor_from(states, n, state_dim);
  ep.actions = tensor_from(actions, n, act_dim);
  ep.episode_starts = std::move(starts);
  return ep;
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
