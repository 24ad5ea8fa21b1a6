// Replaces global operator new/delete for the dispatch tests, to inject
// bad_alloc at a chosen allocation (see alloc_fault.hpp). Kept in its own file:
// inlined next to the callers, GCC reports malloc/free pairs as mismatched.
#include "alloc_fault.hpp"

#include <cstdlib>
#include <new>

namespace {
thread_local int countdown = 0;
}  // namespace

int& uipc::test::alloc_fail_countdown() noexcept { return countdown; }

void* operator new(std::size_t size) {
  if (countdown > 0 && --countdown == 0) throw std::bad_alloc();
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) { return ::operator new(size); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t /*size*/) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t /*size*/) noexcept { std::free(p); }
// The nothrow forms too: otherwise a sanitizer's own nothrow new would pair
// with the free() above.
void* operator new(std::size_t size, const std::nothrow_t& /*tag*/) noexcept {
  return std::malloc(size == 0 ? 1 : size);
}
void* operator new[](std::size_t size, const std::nothrow_t& /*tag*/) noexcept {
  return std::malloc(size == 0 ? 1 : size);
}
void operator delete(void* p, const std::nothrow_t& /*tag*/) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t& /*tag*/) noexcept { std::free(p); }
