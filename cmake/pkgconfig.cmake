# Runs during `cmake --install`: writes luamp.pc for the prefix being installed to
# (CMAKE_INSTALL_PREFIX here is the install-time prefix, --prefix included). The
# LUAMP_PC_* variables are set by the install(CODE) rule just before, in CMakeLists.txt.
set(LUAMP_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
foreach(kind LIBDIR INCLUDEDIR)
  if(NOT IS_ABSOLUTE "${LUAMP_PC_${kind}}")
    set(LUAMP_PC_${kind} "\${prefix}/${LUAMP_PC_${kind}}")
  endif()
endforeach()
configure_file("${LUAMP_PC_IN}" "${LUAMP_PC_OUT}" @ONLY)
