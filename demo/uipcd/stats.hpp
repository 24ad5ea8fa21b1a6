// uipcd's figures: latency histograms and the rows `uipcctl stats` and the
// metrics endpoint show.
#pragma once

#include <array>
#include <atomic>
#include <bit>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace uipcd {

/// Latencies in log-linear buckets (8 per power of two: within 12.5 % of the
/// true value), recorded from any thread without a lock.
class histogram {
 public:
  void record(std::chrono::nanoseconds d) noexcept {
    const auto ns = static_cast<std::uint64_t>(d.count() < 0 ? 0 : d.count());
    counts_[index(ns)].fetch_add(1, std::memory_order_relaxed);
    total_.fetch_add(1, std::memory_order_relaxed);
  }
  std::uint64_t count() const noexcept { return total_.load(std::memory_order_relaxed); }
  /// The smallest bucket edge (ns) at or below which a fraction `q` of the
  /// samples lie; 0 with no samples.
  std::uint64_t percentile(double q) const noexcept {
    const std::uint64_t n = count();
    if (n == 0) return 0;
    const auto want = static_cast<std::uint64_t>(q * static_cast<double>(n) + 0.5);
    std::uint64_t seen = 0;
    for (std::size_t i = 0; i < buckets; ++i) {
      seen += counts_[i].load(std::memory_order_relaxed);
      if (seen >= want && seen > 0) return upper_edge(i);
    }
    return upper_edge(buckets - 1);
  }

 private:
  static constexpr std::size_t sub = 8;
  static constexpr std::size_t buckets = 64 * sub;
  static std::size_t index(std::uint64_t v) noexcept {
    if (v < sub) return static_cast<std::size_t>(v);
    const unsigned e = static_cast<unsigned>(std::bit_width(v)) - 1;  // v in [2^e, 2^(e+1)), e >= 3
    return (e - 2) * sub + static_cast<std::size_t>((v >> (e - 3)) & (sub - 1));
  }
  static std::uint64_t upper_edge(std::size_t i) noexcept {
    if (i < sub) return i;
    const std::size_t e = i / sub + 2;
    const std::uint64_t step = std::uint64_t{1} << (e - 3);
    return (std::uint64_t{1} << e) + (i % sub + 1) * step - 1;
  }
  std::array<std::atomic<std::uint64_t>, buckets> counts_{};
  std::atomic<std::uint64_t> total_{0};
};

/// One figure: `module` and `name` say what it is, `label` tells apart rows
/// of one name (a caps point, a quantile). Counters only grow; gauges are the
/// present value. Names ending in "_ns" are durations.
struct figure {
  std::string module;
  std::string name;
  std::string label;
  std::uint64_t value = 0;
  bool counter = true;
};

/// The rows as the control protocol carries them: "MODULE\tNAME\tLABEL\tKIND\tVALUE",
/// KIND "counter" or "gauge", LABEL "-" when there is none.
inline std::string stats_table(const std::vector<figure>& rows) {
  std::string out = "MODULE\tNAME\tLABEL\tKIND\tVALUE\n";
  for (const auto& r : rows)
    out += r.module + '\t' + r.name + '\t' + (r.label.empty() ? "-" : r.label) + '\t' +
           (r.counter ? "counter" : "gauge") + '\t' + std::to_string(r.value) + '\n';
  return out;
}

}  // namespace uipcd
