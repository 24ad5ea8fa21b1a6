# bench_core also measures the private frame codec, so it sees core's src/.
target_include_directories(bench_core PRIVATE ${PROJECT_SOURCE_DIR}/core/src)
target_link_libraries(bench_core PRIVATE uipc::proto)
