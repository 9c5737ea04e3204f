#include "tensor/parallel.h"

#include <cblas.h>
#include <omp.h>
#ifdef __linux__
#include <sched.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace mmdit {
namespace {

bool openblas_shares_openmp() {
  return openblas_get_parallel() == 2;
}

// Nested parallel regions (a multi-threaded gemm inside one of our loops) would create and
// destroy threads on each call and oversubscribe the cores; one level of parallelism it is.
// OpenBLAS's pthreads build (Debian's preferred alternative when both builds are installed, which
// a program linked outside our build tree may load) keeps a pool of its own, one thread per core
// by default, that would run beside ours: it stays on one thread.
// A larger OMP_NUM_THREADS is lowered here, before any region starts.
const bool single_level = [] {
  omp_set_max_active_levels(1);
  if (!openblas_shares_openmp()) openblas_set_num_threads(1);
  if (omp_get_max_threads() > max_threads()) omp_set_num_threads(max_threads());
  return true;
}();

// Every region we open names this count. OpenMP's own (omp_set_num_threads) belongs to the thread
// that set it, and every other thread starts from OMP_NUM_THREADS, however large. Made on first
// use, so that a static initializer elsewhere that asks for it finds it made.
std::atomic<int>& process_threads() {
  static std::atomic<int> count{std::clamp(omp_get_max_threads(), 1, max_threads())};
  return count;
}

}  // namespace

int max_threads() {
  static const int limit = [] {
    const char* config = openblas_get_config();
    const char* field = config ? std::strstr(config, "MAX_THREADS=") : nullptr;
    const int built = field ? std::atoi(field + std::strlen("MAX_THREADS=")) : 0;
    return built > 0 ? built : 64;
  }();
  return limit;
}

std::atomic<int64_t>& detail::thread_matmul_flops() {
  thread_local std::atomic<int64_t> flops{0};
  return flops;
}

int num_threads() {
  return process_threads().load(std::memory_order_relaxed);
}

void set_num_threads(int n) {
  n = std::clamp(n, 1, max_threads());
  process_threads().store(n, std::memory_order_relaxed);
  // This thread's OpenMP setting too; other threads' follow in raw::gemm (tensor/matmul.cc).
  omp_set_num_threads(n);
  openblas_set_num_threads(openblas_shares_openmp() ? n : 1);
}

namespace detail {

class Team;
namespace {
thread_local Team* leading = nullptr;
}  // namespace

// One run_as_team region. The leader writes a job while every worker is idle and publishes it by
// counting `posted_` up; each worker runs its share and counts `busy_` down.
class Team {
 public:
  void start(int threads) {
    threads_ = threads;
    leader_flops_ = &thread_matmul_flops();
  }
  // Every loop ends with the workers idle, so the next job can be written.
  void loop(int64_t n, void (*run_items)(void*, int64_t, int64_t, int64_t*), void* fn) {
    kind_ = Kind::loop;
    n_ = n;
    run_items_ = run_items;
    fn_ = fn;
    post();
    {
      // A loop or product inside one of the leader's items runs on its thread alone, as on a
      // worker: posted, it would overwrite the job the workers are still reading.
      const LeaderInItem in_item;
      run_share(0);
    }
    wait_until_idle();
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

  void stop() {
    kind_ = Kind::stop;
    post();
    wait_until_idle();
  }

  void serve(int worker) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t now;
      for (int64_t spins = 0; (now = posted_.load(std::memory_order_acquire)) == seen; ++spins)
        pause(spins);
      seen = now;
      if (kind_ == Kind::stop) {
        busy_.fetch_sub(1, std::memory_order_release);
        return;
      }
      std::atomic<int64_t>& own = thread_matmul_flops();
      const int64_t before = own.load(std::memory_order_relaxed);
      run_share(worker);
      leader_flops_->fetch_add(own.load(std::memory_order_relaxed) - before,
                               std::memory_order_relaxed);
      busy_.fetch_sub(1, std::memory_order_release);
    }
  }

 private:
  enum class Kind { loop, stop };

  struct LeaderInItem {
    Team* const team = std::exchange(leading, nullptr);
    ~LeaderInItem() { leading = team; }
  };

  // Spinning with the pause instruction, as OpenMP's waiting threads do; after a while a thread
  // also yields, so that a process sharing the cores (two test programs on two cores) runs.
  static void pause(int64_t spins) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
    if (spins > (1 << 14)) std::this_thread::yield();
  }

  void post() {
    busy_.store(threads_ - 1, std::memory_order_relaxed);
    posted_.fetch_add(1, std::memory_order_release);
  }

  void wait_until_idle() {
    for (int64_t spins = 0; busy_.load(std::memory_order_acquire) != 0; ++spins) pause(spins);
  }

  // Contiguous shares, as OpenMP's static schedule makes them. An item that throws does not
  // stop the share: as in parallel_for's own region, every other item runs.
  void run_share(int thread) {
    const int64_t end = n_ * (thread + 1) / threads_;
    for (int64_t begin = n_ * thread / threads_; begin < end;) {
      int64_t next = begin;
      try {
        run_items_(fn_, begin, end, &next);
        return;
      } catch (...) {
        keep_error();
      }
      begin = next + 1;
    }
  }

  void keep_error() {
    const std::lock_guard lock(error_mutex_);
    if (!error_) error_ = std::current_exception();
  }

  int threads_ = 1;
  std::atomic<int64_t>* leader_flops_ = nullptr;
  Kind kind_ = Kind::loop;
  int64_t n_ = 0;
  void (*run_items_)(void*, int64_t, int64_t, int64_t*) = nullptr;
  void* fn_ = nullptr;
  std::mutex error_mutex_;
  std::exception_ptr error_;
  // Each on its own cache line: the workers poll the first while the leader waits on the second.
  alignas(64) std::atomic<uint64_t> posted_{0};
  alignas(64) std::atomic<int> busy_{0};
};

Team* led_team() {
  return leading;
}

bool in_parallel_region() {
  return omp_in_parallel() != 0;
}

void team_for(Team& team, int64_t n, void (*run_items)(void*, int64_t, int64_t, int64_t*),
              void* fn) {
  team.loop(n, run_items, fn);
}

}  // namespace detail

void run_as_team(void (*fn)(void* context), void* context) {
  const int threads = num_threads();
  if (threads == 1 || detail::leading != nullptr || detail::in_parallel_region()) {
    fn(context);
    return;
  }
  detail::Team team;
  std::exception_ptr error;
#pragma omp parallel num_threads(threads)
  {
    if (omp_get_thread_num() == 0) {
      // The workers read the team's size only after the first job is posted.
      team.start(omp_get_num_threads());
      detail::leading = &team;
      try {
        fn(context);
      } catch (...) {
        error = std::current_exception();
      }
      detail::leading = nullptr;
      team.stop();
    } else {
      team.serve(omp_get_thread_num());
    }
  }
  if (error) std::rethrow_exception(error);
}

void start_program_unbound(void (*start)(void* context), void* context) {
#ifdef __linux__
  cpu_set_t widened, saved;
  if (omp_get_num_places() == 0 || sched_getaffinity(0, sizeof saved, &saved) != 0) {
    start(context);  // no places (neither OMP_PROC_BIND nor OMP_PLACES): nothing was bound
    return;
  }
  widened = saved;
  for (int p = 0; p < omp_get_num_places(); ++p) {
    std::vector<int> ids(static_cast<size_t>(omp_get_place_num_procs(p)));
    omp_get_place_proc_ids(p, ids.data());
    for (const int id : ids)
      if (id >= 0 && id < CPU_SETSIZE) CPU_SET(id, &widened);
  }
  struct Restore {
    const cpu_set_t& saved;
    const bool widened;
    ~Restore() {
      if (widened) sched_setaffinity(0, sizeof saved, &saved);
    }
  } restore{saved, sched_setaffinity(0, sizeof widened, &widened) == 0};
  start(context);
#else
  start(context);
#endif
}

const char* openblas_threading() {
  switch (openblas_get_parallel()) {
    case 0:
      return "sequential";
    case 1:
      return "pthreads";
    default:
      return "OpenMP";
  }
}

}  // namespace mmdit
