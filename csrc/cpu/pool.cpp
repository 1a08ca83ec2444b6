// pool.cpp -- see pool.h.
#include "cpu/pool.h"

#include <dlfcn.h>
#if defined(__linux__)
#include <link.h>  // dl_iterate_phdr
#endif
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CDK_PAUSE() _mm_pause()
#else
#define CDK_PAUSE() ((void)0)
#endif

namespace cdk_cpu {
namespace {

struct Pool {
  std::mutex busy;  // held by the thread whose job the workers are running
  std::mutex m;
  std::condition_variable wake, done;
  int nworkers = 0;
  // The current job, written under m together with `generation`; a worker snapshots all three
  // under m, so it never pairs one job's task with another job's size.
  uint64_t generation = 0;
  const std::function<void(int)>* task = nullptr;
  int ntasks = 0;
  int helpers = 0;  // workers with id < helpers take part in the current job
  // (generation low 32 bits) << 32 | next task index. Claiming by CAS on this word means a
  // worker that woke late for an old job can never claim a task of the next one.
  std::atomic<uint64_t> claim{0};
  std::atomic<int> remaining{0};  // tasks of the current job not finished yet
  std::atomic<uint64_t> published{0};  // `generation`, for workers spinning without m
  int sleepers = 0;                    // workers parked on `wake` (under m)

  void drain(uint32_t gen, const std::function<void(int)>* fn, int n) {
    for (;;) {
      uint64_t v = claim.load(std::memory_order_acquire);
      int t;
      for (;;) {
        if ((uint32_t)(v >> 32) != gen) return;
        t = (int)(uint32_t)v;
        if (t >= n) return;
        if (claim.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) break;
      }
      (*fn)(t);
      if (remaining.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> g(m);
        done.notify_all();
      }
    }
  }

  // After a job, a worker spins for kSpin before it parks on the condition variable: back-to-back
  // small ops (a network's layers, the benchmark's loops) then find it awake, as OpenMP's
  // spinning workers are for eager PyTorch. Waking a parked worker costs a futex call and 5-50 us
  // of scheduling, which made two threads slower than one below ~100 us of work.
  static constexpr std::chrono::microseconds kSpin{200};

  template <class Done>
  static bool spin_until(Done&& done, std::chrono::microseconds limit) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 1;; ++i) {
      if (done()) return true;
      CDK_PAUSE();
      if ((i & 63) == 0 && std::chrono::steady_clock::now() - t0 > limit) return done();
    }
  }

  void worker(int id) {
    uint64_t seen = 0;
    for (;;) {
      spin_until([&] { return published.load(std::memory_order_acquire) != seen; }, kSpin);
      const std::function<void(int)>* fn;
      int n;
      bool mine;
      {
        std::unique_lock<std::mutex> lk(m);
        if (generation == seen) {
          ++sleepers;
          wake.wait(lk, [&] { return generation != seen; });
          --sleepers;
        }
        seen = generation;
        fn = task;
        n = ntasks;
        mine = id < helpers;
      }
      if (mine) drain((uint32_t)seen, fn, n);
    }
  }

  // Workers are detached and the Pool is never destroyed: parked threads must not outlive a
  // destroyed mutex at interpreter exit.
  void grow(int want) {
    while (nworkers < want) {
      try {
        std::thread(&Pool::worker, this, nworkers).detach();
      } catch (...) {
        return;  // could not start a thread: fewer helpers, the caller does the rest
      }
      ++nworkers;
    }
  }

  void run(int n, int nthreads, const std::function<void(int)>& fn) {
    grow(nthreads - 1);
    uint32_t gen;
    bool parked;
    {
      std::lock_guard<std::mutex> g(m);
      task = &fn;
      ntasks = n;
      helpers = nthreads - 1;
      gen = (uint32_t)++generation;
      remaining.store(n, std::memory_order_relaxed);
      claim.store((uint64_t)gen << 32, std::memory_order_release);
      published.store(generation, std::memory_order_release);
      parked = sleepers > 0;
    }
    if (parked) wake.notify_all();  // spinning workers see `published` without a syscall
    drain(gen, &fn, n);
    // Spin while the helpers finish (small jobs end about when the caller's share does), then
    // sleep: on an oversubscribed machine spinning longer would steal the helpers' core.
    auto finished = [&] { return remaining.load(std::memory_order_acquire) == 0; };
    if (!spin_until(finished, std::chrono::microseconds{50})) {
      std::unique_lock<std::mutex> lk(m);
      done.wait(lk, finished);
    }
  }
};

// A forked child (DataLoader workers) inherits the Pool object but not its threads: it gets a
// fresh Pool (the parent's copy is abandoned, its mutexes may be held by threads that do not
// exist here).
std::atomic<Pool*> g_pool{nullptr};
std::atomic<pid_t> g_pid{0};
std::mutex g_create;

Pool* pool() {
  const pid_t me = getpid();
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p && g_pid.load(std::memory_order_acquire) == me) return p;
  std::lock_guard<std::mutex> g(g_create);
  p = g_pool.load(std::memory_order_acquire);
  if (!p || g_pid.load(std::memory_order_acquire) != me) {
    p = new Pool();
    g_pool.store(p, std::memory_order_release);
    g_pid.store(me, std::memory_order_release);
  }
  return p;
}

// -- the OpenMP runtime torch loaded ---------------------------------------------------------
// GOMP_parallel(fn, data, num_threads, flags) is the entry point GCC emits for `#pragma omp
// parallel`; libgomp, libiomp5 and libomp all export it. Only an already-loaded runtime is used
// (RTLD_NOLOAD): loading a second one would start a second set of threads.
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);

struct OmpRuntime {
  GompParallel parallel = nullptr;
  std::string path;
};

#if defined(__linux__)
int find_omp(struct dl_phdr_info* info, size_t, void* data) {
  const char* name = info->dlpi_name;
  if (!name || !*name) return 0;
  const char* slash = strrchr(name, '/');
  const char* base = slash ? slash + 1 : name;
  if (strncmp(base, "libgomp", 7) != 0 && strncmp(base, "libiomp5", 8) != 0 &&
      strncmp(base, "libomp", 6) != 0)
    return 0;
  void* h = dlopen(name, RTLD_LAZY | RTLD_NOLOAD);
  if (!h) return 0;
  void* f = dlsym(h, "GOMP_parallel");
  if (!f) {
    dlclose(h);
    return 0;
  }
  auto* rt = static_cast<OmpRuntime*>(data);
  rt->parallel = reinterpret_cast<GompParallel>(f);
  rt->path = name;
  return 1;  // the handle stays open: the runtime is never unloaded under us
}
#endif

enum Mode : int { kAuto = 0, kOpenMP = 1, kPool = 2 };

// "auto" | "openmp" | "pool" -> mode; false for anything else.
bool parse_mode(const char* s, int* mode) {
  if (strcmp(s, "auto") == 0) *mode = kAuto;
  else if (strcmp(s, "openmp") == 0) *mode = kOpenMP;
  else if (strcmp(s, "pool") == 0) *mode = kPool;
  else return false;
  return true;
}

struct Threading {
  std::once_flag searched;
  OmpRuntime rt;
  pid_t owner = 0;  // the process that found rt (a forked child must not use it)
  std::atomic<int> mode{kAuto};

  Threading() {
    // (an unknown value stays auto here; the Python backend reports it as unavailable)
    int m = kAuto;
    const char* env = getenv("CDK_CPU_THREADS");
    if (env && parse_mode(env, &m)) mode = m;
  }

  // The runtime to use now, or nullptr for the pool. Searched once, on first use (torch is
  // imported before any op runs, so its runtime is loaded by then); no lock afterwards.
  GompParallel runtime() {
    if (mode.load(std::memory_order_relaxed) == kPool) return nullptr;
    std::call_once(searched, [this] {
#if defined(__linux__)
      dl_iterate_phdr(find_omp, &rt);
#endif  // (elsewhere: the pool)
      owner = getpid();
    });
    return owner == getpid() ? rt.parallel : nullptr;
  }
};

Threading& threading() {
  static Threading t;
  return t;
}

struct OmpJob {
  const std::function<void(int)>* task;
  int ntasks;
  std::atomic<int> next{0};
};

void omp_body(void* p) {
  auto* job = static_cast<OmpJob*>(p);
  for (;;) {
    const int t = job->next.fetch_add(1, std::memory_order_relaxed);
    if (t >= job->ntasks) return;
    (*job->task)(t);
  }
}

}  // namespace

std::string cpu_threading() {
  Threading& th = threading();
  const GompParallel rt = th.runtime();
  return rt ? "openmp (" + th.rt.path + ")" : "pool";
}

bool set_cpu_threading(const std::string& mode) {
  int m;
  if (!parse_mode(mode.c_str(), &m)) return false;
  threading().mode = m;
  return true;
}

void pool_run(int ntasks, int nthreads, const std::function<void(int)>& task) {
  if (ntasks <= 0) return;
  if (ntasks == 1 || nthreads <= 1) {
    for (int t = 0; t < ntasks; ++t) task(t);
    return;
  }
  if (const GompParallel gomp_parallel = threading().runtime()) {
    // the caller and (nthreads - 1) threads of the runtime's team pull tasks; GOMP_parallel
    // returns after its closing barrier, when every task has finished
    OmpJob job;
    job.task = &task;
    job.ntasks = ntasks;
    gomp_parallel(omp_body, &job, (unsigned)(nthreads < ntasks ? nthreads : ntasks), 0u);
    return;
  }
  Pool* p = pool();
  std::unique_lock<std::mutex> own(p->busy, std::try_to_lock);
  if (!own.owns_lock()) {
    // Another thread's job is running: do ours here rather than queue behind it.
    for (int t = 0; t < ntasks; ++t) task(t);
    return;
  }
  p->run(ntasks, nthreads < ntasks ? nthreads : ntasks, task);
}

int pool_size() { return pool()->nworkers; }

}  // namespace cdk_cpu
