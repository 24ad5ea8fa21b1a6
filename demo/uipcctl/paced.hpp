// A load loop's pacing and its latency figures, shared by `caps call --count`
// and `handles churn`: flat out, or at a fixed offered rate (each operation
// starts at its slot, began + i / rate, so that a slow one does not lower the
// rate offered after it), with every operation's latency kept for percentiles.
// At a fixed rate a latency counts from the slot, not from the moment the
// operation could start: one that waited behind a slow one waited for real,
// as a client arriving at that rate would (no coordinated omission).
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

namespace uipcctl {

class paced_loop {
 public:
  using clock = std::chrono::steady_clock;

  /// rate: operations per second; 0 runs flat out.
  explicit paced_loop(double rate) : rate_(rate) {}

  /// Waits for operation i's slot; returns the time its latency counts from:
  /// the slot at a fixed rate (already past when the loop runs late), now
  /// when flat out.
  clock::time_point start(unsigned long long i) {
    if (rate_ <= 0) return clock::now();
    const auto slot = began_ + std::chrono::duration_cast<clock::duration>(
                                   std::chrono::duration<double>(static_cast<double>(i) / rate_));
    std::this_thread::sleep_until(slot);
    return slot;
  }

  /// When the loop began: slot 0.
  clock::time_point began() const { return began_; }

  /// Operation started at `started` ended now.
  void done(clock::time_point started) {
    latencies_.push_back(std::chrono::duration<double, std::micro>(clock::now() - started).count());
  }

  /// "<unit> N seconds S <unit>_per_second R mean_us M p50_us P p99_us Q",
  /// one line on stdout.
  void report(const char* unit) {
    const double seconds = std::chrono::duration<double>(clock::now() - began_).count();
    const auto n = latencies_.size();
    double sum = 0;
    for (double l : latencies_) sum += l;
    std::printf("%s %zu seconds %.3f %s_per_second %.0f mean_us %.2f p50_us %.2f p99_us %.2f\n",
                unit, n, seconds, unit, static_cast<double>(n) / seconds,
                n ? sum / static_cast<double>(n) : 0.0, percentile(0.50), percentile(0.99));
  }

 private:
  // The nearest-rank percentile: the smallest latency that at least a
  // fraction q of the operations did not exceed.
  double percentile(double q) {
    if (latencies_.empty()) return 0;
    const auto n = latencies_.size();
    const auto rank = static_cast<std::size_t>(std::ceil(q * static_cast<double>(n)));
    const auto at = std::clamp<std::size_t>(rank, 1, n) - 1;
    std::nth_element(latencies_.begin(), latencies_.begin() + static_cast<long>(at),
                     latencies_.end());
    return latencies_[at];
  }

  double rate_;
  clock::time_point began_ = clock::now();
  std::vector<double> latencies_;
};

}  // namespace uipcctl
