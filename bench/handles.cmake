# bench_handles starts its own handle daemon: it needs uipc-handled built and
# its path, and the protobuf-free facade only.
if(TARGET bench_handles)
  add_dependencies(bench_handles uipc-handled)
  target_compile_definitions(bench_handles PRIVATE UIPC_BENCH_HANDLED_PATH="$<TARGET_FILE:uipc-handled>")
  target_link_libraries(bench_handles PRIVATE rt)
endif()
