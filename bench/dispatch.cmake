# The dispatcher's benchmark peers: plain recvmmsg/sendmmsg programs doing the same
# DNS work with nothing else (the floor), driven by bench/dispatch/run_bench.sh.
add_executable(bench_dispatch_floor_responder ${CMAKE_CURRENT_SOURCE_DIR}/dispatch/floor_responder.cpp)
target_link_libraries(bench_dispatch_floor_responder PRIVATE uipc_dns_zone uipc_build_flags)
add_executable(bench_dispatch_floor_query ${CMAKE_CURRENT_SOURCE_DIR}/dispatch/floor_query.cpp)
target_link_libraries(bench_dispatch_floor_query PRIVATE uipc_dns_zone uipc_build_flags)
