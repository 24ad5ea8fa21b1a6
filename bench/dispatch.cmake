# The dispatcher's benchmark peers: plain recvmmsg/sendmmsg programs doing the same
# DNS work with nothing else (the floor), driven by bench/dispatch/run_bench.sh.
add_executable(bench_dispatch_floor_responder ${CMAKE_CURRENT_SOURCE_DIR}/dispatch/floor_responder.cpp)
target_link_libraries(bench_dispatch_floor_responder PRIVATE uipc_dns_zone uipc_build_flags)
add_executable(bench_dispatch_floor_query ${CMAKE_CURRENT_SOURCE_DIR}/dispatch/floor_query.cpp)
target_link_libraries(bench_dispatch_floor_query PRIVATE uipc_dns_zone uipc_build_flags)
# The forger of the forgery benchmark (bench/dispatch/run_ports.sh): spoofed
# replies through a raw socket, loopback only.
add_executable(bench_dispatch_forger ${CMAKE_CURRENT_SOURCE_DIR}/dispatch/forger.cpp)
target_link_libraries(bench_dispatch_forger PRIVATE uipc_dns_zone uipc_build_flags)
