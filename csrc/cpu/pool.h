// pool.h -- threading of the CPU backend: torch's OpenMP threads, or a persistent pool of ours.
//
// pool_run() hands a job's tasks to the OpenMP runtime torch loaded when there is one (see
// cpu_threading() below), else to a persistent pool: (nthreads - 1) workers that spin briefly
// after a job and then park on a condition variable; a call wakes the parked ones, everyone
// (the caller included) pulls task indices from an atomic counter, and the caller waits for the
// last task. One pool job runs at a time: a second Python thread that finds the pool busy runs
// its tasks inline on its own thread. Either way the task split depends only on the job, so
// results never depend on who ran which task.
#pragma once
#include <stdint.h>

#include <functional>
#include <string>

namespace cdk_cpu {

// Run task(t) for t in [0, ntasks) on at most `nthreads` threads (the caller and nthreads - 1
// workers). Tasks may run on any of them, in any order; returns when all have finished.
// More tasks than threads lets the caller take over the share of a helper that the OS has not
// scheduled yet (a loaded machine). task must not throw.
void pool_run(int ntasks, int nthreads, const std::function<void(int)>& task);

// Workers currently started (tests / diagnostics).
int pool_size();

// Who runs the helpers' share of a parallel job:
//   "openmp": the OpenMP runtime torch already loaded (libgomp, libiomp5 or libomp, found among
//     the loaded libraries and called through its GOMP_parallel entry point), so our kernels
//     run on the same threads as torch's own CPU ops. Eager PyTorch leaves those threads
//     spinning between ops; a second pool of ours then fought them for the same cores (in a
//     training step a 65K-element cd_step took 190 us instead of 47).
//   "pool": the persistent pool above (no OpenMP runtime loaded, or a forked child, whose
//     inherited OpenMP state is unusable).
// CDK_CPU_THREADS=auto (default) | openmp | pool picks; openmp falls back to pool when no runtime
// is loaded. cpu_threading() names the current choice (with the runtime's path).
std::string cpu_threading();
bool set_cpu_threading(const std::string& mode);  // "auto" | "openmp" | "pool"; false: unknown

}  // namespace cdk_cpu
