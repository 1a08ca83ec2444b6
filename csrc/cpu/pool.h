// pool.h -- the CPU backend's persistent worker pool.
//
// Starting std::threads on every call cost ~50 us on the 2-core dev VM, so small tensors ran on
// one thread. The pool keeps (nthreads - 1) workers parked on a condition variable; a call wakes
// them, everyone (the caller included) pulls task indices from an atomic counter, and the caller
// waits for the last task. One job runs at a time: a second Python thread that finds the pool
// busy runs its tasks inline on its own thread, with the same task split, so results never depend
// on who ran which task.
#pragma once
#include <stdint.h>

#include <functional>

namespace cdk_cpu {

// Run task(t) for t in [0, ntasks) on at most `nthreads` threads (the caller and nthreads - 1
// workers). Tasks may run on any of them, in any order; returns when all have finished.
// More tasks than threads lets the caller take over the share of a helper that the OS has not
// scheduled yet (a loaded machine). task must not throw.
void pool_run(int ntasks, int nthreads, const std::function<void(int)>& task);

// Workers currently started (tests / diagnostics).
int pool_size();

}  // namespace cdk_cpu
