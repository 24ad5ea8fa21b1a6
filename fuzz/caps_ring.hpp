// How the caps targets lay a hostile peer's ring out from the input: entries
// of 32 bytes as given, then an optional u32 saying how many of them (from the
// first) carry the sequence the reader expects in their first word; the rest
// keep the bytes given, so the reader also meets entries out of sequence.
// Without the count, every entry is in sequence.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "channel.hpp"

namespace uipc::fuzz {

inline void write_hostile_ring(caps::detail::ring_shared& ring, const std::uint8_t* data,
                               std::size_t size) {
  namespace detail = caps::detail;
  const std::size_t n = std::min<std::size_t>(size / sizeof(detail::entry), detail::ring_entries);
  std::memcpy(ring.entries, data, n * sizeof(detail::entry));
  std::uint32_t in_sequence = static_cast<std::uint32_t>(n);
  const std::size_t rest = size - n * sizeof(detail::entry);
  if (rest >= sizeof in_sequence)
    std::memcpy(&in_sequence, data + n * sizeof(detail::entry), sizeof in_sequence);
  for (std::uint32_t i = 0; i < std::min<std::size_t>(in_sequence, n); ++i) {
    auto& kind = ring.entries[i].kind;
    kind = detail::stamped_kind(i, kind);
  }
}

}  // namespace uipc::fuzz
