# uipc_add_module(NAME <name> SOURCES ... [PUBLIC_DEPS ...] [PRIVATE_DEPS ...])
# Makes target uipc_<name> with alias uipc::<name>, public headers in
# <folder>/include, and installs both into the uipc-targets export set.
function(uipc_add_module)
  cmake_parse_arguments(ARG "" "NAME" "SOURCES;PUBLIC_DEPS;PRIVATE_DEPS" ${ARGN})
  set(target uipc_${ARG_NAME})
  add_library(${target} ${ARG_SOURCES})
  add_library(uipc::${ARG_NAME} ALIAS ${target})
  set_target_properties(${target} PROPERTIES EXPORT_NAME ${ARG_NAME} OUTPUT_NAME uipc_${ARG_NAME})
  target_compile_features(${target} PUBLIC cxx_std_20)
  if(EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/include)
    target_include_directories(${target} PUBLIC
      $<BUILD_INTERFACE:${CMAKE_CURRENT_SOURCE_DIR}/include>
      $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
    install(DIRECTORY include/ DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
  endif()
  target_include_directories(${target} PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/src)
  target_link_libraries(${target} PUBLIC ${ARG_PUBLIC_DEPS} PRIVATE ${ARG_PRIVATE_DEPS}
                        $<BUILD_INTERFACE:uipc_build_flags>)
  uipc_library_version(${target})
  install(TARGETS ${target} EXPORT uipc-targets
          ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
          LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
  uipc_pkg_config(${ARG_NAME} PUBLIC_DEPS ${ARG_PUBLIC_DEPS} PRIVATE_DEPS ${ARG_PRIVATE_DEPS})
endfunction()

# uipc_library_version(<target>): the version and soname of a shared build.
# 0.x: every minor release may change the ABI (the CMake package says
# SameMinorVersion), so the soname carries both: libuipc_core.so.0.1.
function(uipc_library_version target)
  set_target_properties(${target} PROPERTIES
    VERSION ${PROJECT_VERSION}
    SOVERSION ${PROJECT_VERSION_MAJOR}.${PROJECT_VERSION_MINOR}
    # No <target>_EXPORTS define: a shared build compiles exactly as a static
    # one does, so the two share the compiler cache.
    DEFINE_SYMBOL "")
endfunction()

# uipc_pkg_config(<name> [PUBLIC_DEPS ...] [PRIVATE_DEPS ...]): writes and
# installs uipc-<name>.pc for the library uipc_<name>. uipc::<module> becomes
# Requires uipc-<module>, protobuf Requires protobuf, Threads -pthread, a plain
# name -l<name>; header-only dependencies (Boost) add nothing. A static
# library's own dependencies are public (its users link them); a shared one's
# are .private.
function(uipc_pkg_config name)
  cmake_parse_arguments(ARG "" "" "PUBLIC_DEPS;PRIVATE_DEPS" ${ARGN})
  foreach(kind PUBLIC PRIVATE)
    set(field "")
    if(kind STREQUAL "PRIVATE" AND BUILD_SHARED_LIBS)
      set(field "_private")
    endif()
    foreach(dep ${ARG_${kind}_DEPS})
      if(dep MATCHES "^uipc::(.+)$")
        list(APPEND requires${field} "uipc-${CMAKE_MATCH_1}")
      elseif(dep STREQUAL "protobuf::libprotobuf")
        list(APPEND requires${field} "protobuf")
      elseif(dep STREQUAL "Threads::Threads")
        list(APPEND libs${field} "-pthread")
      elseif(dep MATCHES "^[a-z]+$")
        list(APPEND libs${field} "-l${dep}")
      endif()
    endforeach()
  endforeach()
  set(UIPC_PC_NAME ${name})
  # Relative directories follow the prefix (pkg-config --define-variable=prefix=...).
  foreach(dir LIBDIR INCLUDEDIR)
    if(IS_ABSOLUTE "${CMAKE_INSTALL_${dir}}")
      set(UIPC_PC_${dir} "${CMAKE_INSTALL_${dir}}")
    else()
      set(UIPC_PC_${dir} "\${prefix}/${CMAKE_INSTALL_${dir}}")
    endif()
  endforeach()
  foreach(v requires requires_private libs libs_private)
    list(JOIN ${v} " " UIPC_PC_${v})
  endforeach()
  configure_file(${PROJECT_SOURCE_DIR}/cmake/uipc.pc.in ${PROJECT_BINARY_DIR}/pkgconfig/uipc-${name}.pc @ONLY)
  install(FILES ${PROJECT_BINARY_DIR}/pkgconfig/uipc-${name}.pc
          DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
endfunction()

# uipc_add_program(NAME <name> SOURCES ... DEPS ...): an installed executable
# with its man page, man/<name>.1 (tests/integration checks that every
# program listed in the global property UIPC_PROGRAMS has one matching its --help).
function(uipc_add_program)
  cmake_parse_arguments(ARG "" "NAME" "SOURCES;DEPS" ${ARGN})
  add_executable(${ARG_NAME} ${ARG_SOURCES})
  target_link_libraries(${ARG_NAME} PRIVATE ${ARG_DEPS} uipc_build_flags)
  install(TARGETS ${ARG_NAME} RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
  set_property(GLOBAL APPEND PROPERTY UIPC_PROGRAMS ${ARG_NAME})
  if(EXISTS ${PROJECT_SOURCE_DIR}/man/${ARG_NAME}.1)
    install(FILES ${PROJECT_SOURCE_DIR}/man/${ARG_NAME}.1 DESTINATION ${CMAKE_INSTALL_MANDIR}/man1)
  endif()
endfunction()

# uipc_install_user_units(<unit>...): systemd user units from packaging/systemd
# (a <unit>.in is configured first: @CMAKE_INSTALL_FULL_BINDIR@ and the like),
# installed in <prefix>/lib/systemd/user.
function(uipc_install_user_units)
  foreach(unit ${ARGN})
    set(source ${PROJECT_SOURCE_DIR}/packaging/systemd/${unit})
    if(EXISTS ${source}.in)
      configure_file(${source}.in ${PROJECT_BINARY_DIR}/systemd/${unit} @ONLY)
      set(source ${PROJECT_BINARY_DIR}/systemd/${unit})
    endif()
    install(FILES ${source} DESTINATION lib/systemd/user)  # relative: follows --prefix
  endforeach()
endfunction()
