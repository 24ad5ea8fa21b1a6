# bench_plugin: calls through the host (plugin_bench.cpp) and to an isolated
# plug-in against the caps call it rides on (plugin_isolated.cpp).
if(TARGET bench_plugin)
  target_sources(bench_plugin PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/plugin_isolated.cpp)
  target_link_libraries(bench_plugin PRIVATE uipc::caps)
  add_dependencies(bench_plugin uipc-plugin-runner hello)
  target_compile_definitions(bench_plugin PRIVATE UIPC_BENCH_RUNNER_PATH="$<TARGET_FILE:uipc-plugin-runner>"
                                                  UIPC_BENCH_PLUGIN_DIR="${UIPC_PLUGIN_DIR}")
endif()
