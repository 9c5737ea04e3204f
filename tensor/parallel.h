// One threading model for the whole program: OpenMP, the same runtime OpenBLAS's OpenMP build
// uses, so our kernels and gemm share one pool of threads and never oversubscribe the cores.
#pragma once

#include <atomic>
#include <cstdint>
#include <exception>
#include <type_traits>

namespace mmdit {

// Threads our kernels and OpenBLAS use, in every thread of the process: OMP_NUM_THREADS (or the
// cores) by default. Not OpenMP's own setting, which is per thread: a count set in main would not
// reach a controller's own std::thread, which would open teams of the default size.
int num_threads();
// For the whole process, from now on; clamped to [1, max_threads()].
void set_num_threads(int n);
// The most threads a process runs: the MAX_THREADS OpenBLAS was built with (64 in Debian's
// build), since its OpenMP build runs no more and shares our pool. A larger OMP_NUM_THREADS is
// lowered to it when the program starts (libgomp crashed when asked for 100000).
int max_threads();

// How the OpenBLAS loaded in this process runs its threads: "OpenMP" (libopenblas0-openmp, the
// build this project installs), "pthreads" or "sequential". Only an OpenMP build shares our
// pool; any other runs on one thread, and products are split across threads by matmul alone.
const char* openblas_threading();

// Calls start (an exec or popen) with the calling thread allowed on every CPU of the OpenMP
// places too, then restores its affinity. Under OMP_PROC_BIND (or OMP_PLACES) the runtime binds
// the initial thread to the first place before main, and a program started from it inherits that
// binding: it would see one CPU and run all its threads there (mmdit bench re-executing itself
// measured policy-act 17x slower). Unless OMP_PLACES names them, the places are the CPUs the
// process was started on.
void start_program_unbound(void (*start)(void* context), void* context);
template <class Fn>
void start_program_unbound(Fn&& start) {
  start_program_unbound(
      [](void* context) { (*static_cast<std::remove_reference_t<Fn>*>(context))(); },
      static_cast<void*>(&start));
}

// A loop is split only when each of two threads gets at least this many element-operations;
// less runs on the calling thread. A fork and join costs
// 3-5 us on these VMs (measured with an empty region); at 32768 the sampler at batch 1 opened
// 113 regions per Euler step, many for a few microseconds of work, and was ~0.5 ms slower.
inline constexpr int64_t kParallelGrain = 131072;

namespace detail {
// The calling thread's count behind raw::matmul_flops(). Per thread, so that a profiling tape
// counts no other thread's products; atomic, as the workers of a parallel_for add theirs to the
// count of the thread that started it.
std::atomic<int64_t>& thread_matmul_flops();

class Team;
// The team the calling thread leads (run_as_team), or null; null too while the leader runs
// items of one of the team's loops.
Team* led_team();
// Whether the calling thread runs inside an OpenMP region (our own or anyone's).
bool in_parallel_region();
// Runs run_items(fn, begin, end, &current) over [0, n), split across the team, the caller taking
// part; run_items keeps `current` at the item it runs, so that a share goes on after one throws.
void team_for(Team& team, int64_t n,
              void (*run_items)(void* fn, int64_t begin, int64_t end, int64_t* current), void* fn);
}  // namespace detail

// Runs fn on the calling thread while the other threads of the process wait in one OpenMP region
// for the parallel_for loops (and matmul splits) fn makes, instead of each loop opening a region
// of its own: a region's fork and join costs 3-5 us on these VMs, and a sampler call at batch 1
// runs 560 loops, most of a few tens of microseconds. Between loops the waiting threads spin, as
// OpenMP's own do. On one thread, inside a region or inside another team, it is fn() alone.
// Exceptions from fn, or from a loop on any thread, come out of it.
void run_as_team(void (*fn)(void* context), void* context);
template <class Fn>
void run_as_team(Fn&& fn) {
  run_as_team([](void* context) { (*static_cast<std::remove_reference_t<Fn>*>(context))(); },
              static_cast<void*>(&fn));
}

// Calls fn(i) for i in [0, n), split across threads when n * cost_per_item is large enough.
// Small loops, and every loop on one thread, never enter an OpenMP construct: even a one-thread
// team makes a nested level (a gemm called inside it would start a nested team of fresh threads
// on every call), and libgomp ends each region with a futex system call (~2 us on these VMs).
template <class Fn>
void parallel_for(int64_t n, int64_t cost_per_item, Fn&& fn) {
  const int threads = num_threads();
  int64_t cost = 0;
  const bool large = __builtin_mul_overflow(n, cost_per_item, &cost) || cost >= 2 * kParallelGrain;
  if (n <= 1 || !large || threads == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  if (detail::Team* team = detail::led_team()) {
    detail::team_for(
        *team, n,
        [](void* f, int64_t begin, int64_t end, int64_t* current) {
          for (*current = begin; *current < end; ++*current)
            (*static_cast<std::remove_reference_t<Fn>*>(f))(*current);
        },
        const_cast<void*>(static_cast<const void*>(&fn)));
    return;
  }
  // A team's worker, its leader inside a loop's item, or a thread inside someone else's region:
  // a nested region would run on this thread alone anyway (one active level), after costing a
  // fork and join.
  if (detail::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  // An exception may not leave an OpenMP region (the program would terminate): the first one
  // thrown is kept and rethrown after it.
  std::exception_ptr error;
  std::atomic<int64_t>& caller_flops = detail::thread_matmul_flops();
#pragma omp parallel num_threads(threads)
  {
    std::atomic<int64_t>& own_flops = detail::thread_matmul_flops();
    const int64_t flops_before = own_flops.load(std::memory_order_relaxed);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      try {
        fn(i);
      } catch (...) {
#pragma omp critical(mmdit_parallel_for_error)
        if (!error) error = std::current_exception();
      }
    }
    if (&own_flops != &caller_flops)
      caller_flops.fetch_add(own_flops.load(std::memory_order_relaxed) - flops_before,
                             std::memory_order_relaxed);
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace mmdit
