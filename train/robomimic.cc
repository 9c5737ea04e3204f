// robomimic-style HDF5 demonstrations: load_robomimic_hdf5, declared in train/dataset.h. Files are
// untrusted: the reader checks what libhdf5 would trust (declared extents, storage never written)
// and names the file, demo and key of every problem.
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
#include <set>

#include "train/dataset.h"

namespace mmdit {
namespace {

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

// What HDF5's error stack says about the last failed call: its innermost cause ("unable to lock
// file, errno = 11, ..."), its automatic printing being off. The plugin loader's entries are left
// out: after "required filter 'lzf' is not registered" it adds where it looked for one.
std::string hdf5_cause() {
  std::string cause;
  H5Ewalk2(
      H5E_DEFAULT, H5E_WALK_DOWNWARD,
      [](unsigned, const H5E_error2_t* e, void* out) -> herr_t {
        const bool plugin_search =
            e->func_name && std::string_view(e->func_name).starts_with("H5PL");
        if (e->desc && *e->desc && !plugin_search) *static_cast<std::string*>(out) = e->desc;
        return 0;
      },
      &cause);
  return cause.empty() ? std::string() : " (HDF5: " + cause + ")";
}

// The message for a member that H5Oopen could not open: a link to elsewhere says where it leads.
[[noreturn]] void fail_to_open(hid_t loc, const std::string& name, const std::string& what,
                               const std::string& label) {
  const std::string cause = hdf5_cause();
  H5L_info_t info;
  std::string target;
  if (H5Lget_info(loc, name.c_str(), &info, H5P_DEFAULT) >= 0 && info.type != H5L_TYPE_HARD &&
      info.u.val_size > 0 && info.u.val_size < (1 << 20)) {
    std::vector<char> value(info.u.val_size);
    if (H5Lget_val(loc, name.c_str(), value.data(), value.size(), H5P_DEFAULT) >= 0) {
      const char *file = nullptr, *object = nullptr;
      if (info.type == H5L_TYPE_SOFT)
        target = str_cat(", a soft link to '",
                         std::string(value.data(), strnlen(value.data(), value.size())), "'");
      else if (info.type == H5L_TYPE_EXTERNAL &&
               H5Lunpack_elink_val(value.data(), value.size(), nullptr, &file, &object) >= 0 &&
               file && object)
        target = str_cat(", an external link to '", object, "' in '", file, "'");
    }
  }
  fail(what, ": cannot open '", label, "'", target, cause);
}

// Opens `name` in `loc`, which must be a `kind` (`type`); `label` is its path for messages.
H5Handle open_object(hid_t loc, const std::string& name, const std::string& what,
                     const std::string& label, H5I_type_t type, const char* kind) {
  const hid_t obj = H5Oopen(loc, name.c_str(), H5P_DEFAULT);
  if (obj < 0) fail_to_open(loc, name, what, label);
  H5Handle handle(obj, H5Oclose);
  if (H5Iget_type(obj) != type) fail(what, ": '", label, "' is not a ", kind);
  return handle;
}

H5Handle open_group(hid_t loc, const std::string& name, const std::string& what,
                    const std::string& label) {
  return open_object(loc, name, what, label, H5I_GROUP, "group");
}

struct Matrix {
  std::vector<float> values;  // row-major (rows, cols)
  int64_t rows = 0, cols = 0;
};

// Reads the floating-point dataset `name` in `loc`, of shape (T, d) or (T,), as float32.
Matrix read_matrix(hid_t loc, const std::string& name, const std::string& what,
                   const std::string& label) {
  const H5Handle object = open_object(loc, name, what, label, H5I_DATASET, "dataset");
  H5Handle dataset(H5Dopen2(loc, name.c_str(), H5P_DEFAULT), H5Dclose);
  if (!dataset.valid()) fail(what, ": cannot open dataset '", label, "'", hdf5_cause());
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
  // Integers are read as float32 too, as the LeRobot loader reads them (a gripper's open/closed).
  const H5T_class_t type_class = H5Tget_class(type.get());
  if (type_class != H5T_FLOAT && type_class != H5T_INTEGER)
    fail(what, ": '", label, "' is not numeric; expected floating-point or integer numbers");

  // HDF5 reads storage that was never written as the fill value (zeros), so a file an
  // interrupted writer left would load as demonstrations of zeros; and a corrupt header can
  // declare any extent, which would be allocated before the read fails. What is stored must
  // cover what is declared.
  if (dims[0] > 0 && dims[1] > 0) {
    H5Handle plist(H5Dget_create_plist(dataset.get()), H5Pclose);
    if (!plist.valid()) fail(what, ": cannot read the storage of '", label, "'");
    // A virtual dataset stores nothing itself, and reads what its source files do not hold as
    // the fill value: with a source missing, zeros.
    if (H5Pget_layout(plist.get()) == H5D_VIRTUAL)
      fail(what, ": '", label,
           "' is a virtual dataset (its data is in other files), which is not supported; store "
           "the data in the file itself");
    H5D_space_status_t status;
    if (H5Dget_space_status(dataset.get(), &status) < 0)
      fail(what, ": cannot read the storage of '", label, "'");
    if (status == H5D_SPACE_STATUS_NOT_ALLOCATED)
      fail(what, ": '", label, "' holds no stored data (never written; is the file complete?)");
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

// The number of a group named "demo_<digits>", or -1 for any other name.
int64_t demo_number(const std::string& name, const std::string& what) {
  constexpr std::string_view kPrefix = "demo_";
  if (name.size() <= kPrefix.size() || !name.starts_with(kPrefix)) return -1;
  int64_t n = 0;
  for (size_t i = kPrefix.size(); i < name.size(); ++i) {
    const char c = name[i];
    if (c < '0' || c > '9') return -1;
    if (n > (std::numeric_limits<int64_t>::max() - (c - '0')) / 10)
      fail(what, ": demo '", name, "' has a number too large to order the demos by");
    n = n * 10 + (c - '0');
  }
  return n;
}

}  // namespace

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
    if (const int64_t i = demo_number(name, path); i >= 0) demos.emplace_back(i, name);
  if (demos.empty())
    fail(path, ": no demo_<i> groups in 'data' (members: ", quoted_list(link_names(data.get())),
         ")");
  std::sort(demos.begin(), demos.end());
  for (size_t i = 1; i < demos.size(); ++i)
    if (demos[i].first == demos[i - 1].first)
      fail(path, ": demos '", demos[i - 1].second, "' and '", demos[i].second,
           "' have the same number, so their order is not known");

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
  ep.states = from_vector<float>(states, {n, state_dim});
  ep.actions = from_vector<float>(actions, {n, act_dim});
  ep.episode_starts = std::move(starts);
  return ep;
}

}  // namespace mmdit
