// Where a benchmark's two parties run, chosen with UIPC_BENCH_PLACEMENT:
//   unset  the scheduler places them (on this VM, most often on two CPUs)
//   same   both on CPU 0: every hand-off is a context switch
//   split  this side on CPU 0, the peer (thread or process) on CPU 1: every
//          hand-off is a cross-CPU wake-up
// A wait policy tuned for one placement can lose in another; the goals hold
// only if they hold in all three (scripts/bench --placements runs them).
#pragma once

#include <sched.h>

#include <cstdlib>
#include <cstring>

namespace uipc::bench {

enum class placement { free, split, same };

inline placement chosen_placement() {
  const char* p = std::getenv("UIPC_BENCH_PLACEMENT");
  if (p == nullptr) return placement::free;
  if (std::strcmp(p, "split") == 0) return placement::split;
  if (std::strcmp(p, "same") == 0) return placement::same;
  return placement::free;
}

/// Pins the calling thread (and what it starts later) to `cpu`.
inline void pin_to(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  ::sched_setaffinity(0, sizeof set, &set);
}

/// The benchmark's own side: CPU 0 unless the scheduler chooses.
inline void place_self() {
  if (chosen_placement() != placement::free) pin_to(0);
}

/// A peer thread or process, first thing: CPU 1 when split, CPU 0 when same.
inline void place_peer() {
  switch (chosen_placement()) {
    case placement::split:
      pin_to(1);
      break;
    case placement::same:
      pin_to(0);
      break;
    case placement::free:
      break;
  }
}

}  // namespace uipc::bench
