// Allocation fault injection for the dispatch tests (global operator new is
// replaced in alloc_fault.cpp; it behaves normally unless armed).
#pragma once

namespace uipc::test {
/// While > 0 on this thread, each allocation counts it down; the one that
/// brings it to 0 throws std::bad_alloc.
int& alloc_fail_countdown() noexcept;
}  // namespace uipc::test
