# bench_plugin: calls through the host (plugin_bench.cpp) and to an isolated
# plug-in against the caps call it rides on (plugin_isolated.cpp); a request's
# memory through the pool against the floor, APR, malloc and mimalloc (plugin_pools.cpp).
if(TARGET bench_plugin)
  target_sources(bench_plugin PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/plugin_isolated.cpp
                                      ${CMAKE_CURRENT_SOURCE_DIR}/plugin_pools.cpp)
  target_link_libraries(bench_plugin PRIVATE uipc::caps)
  add_dependencies(bench_plugin uipc-plugin-runner hello)
  target_compile_definitions(bench_plugin PRIVATE UIPC_BENCH_RUNNER_PATH="$<TARGET_FILE:uipc-plugin-runner>"
                                                  UIPC_BENCH_PLUGIN_DIR="${UIPC_PLUGIN_DIR}")
  # The pools' peers, each measured when its Debian package is there (scripts/setup
  # installs libapr1-dev and libmimalloc-dev).
  find_package(PkgConfig QUIET)
  if(PkgConfig_FOUND)
    pkg_check_modules(UIPC_BENCH_APR QUIET IMPORTED_TARGET apr-1)
  endif()
  if(UIPC_BENCH_APR_FOUND)
    target_link_libraries(bench_plugin PRIVATE PkgConfig::UIPC_BENCH_APR)
    target_compile_definitions(bench_plugin PRIVATE UIPC_BENCH_APR=1)
  else()
    message(STATUS "bench_plugin: APR not found (libapr1-dev), BM_AprPoolRequest skipped")
  endif()
  find_package(mimalloc QUIET CONFIG)
  if(mimalloc_FOUND)
    target_link_libraries(bench_plugin PRIVATE mimalloc)
    target_compile_definitions(bench_plugin PRIVATE UIPC_BENCH_MIMALLOC=1)
  else()
    message(STATUS "bench_plugin: mimalloc not found (libmimalloc-dev), BM_MimallocRequest skipped")
  endif()
endif()
