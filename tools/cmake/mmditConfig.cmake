# find_package(mmdit): the installed libraries as mmdit::train, mmdit::models, mmdit::nn,
# mmdit::autodiff and mmdit::tensor. Their dependencies are found again here, the same Debian
# packages the build used (README, "Two commands"). FindHDF5 compiles a C test program, so the
# calling project enables C: project(my_robot C CXX).
include(CMakeFindDependencyMacro)
find_dependency(OpenMP)
find_dependency(OpenBLAS CONFIG)
# oneDNN is linked by its path (mmdit_tensor is static); found here so that a machine without it
# gets this message rather than a link error.
find_library(MMDIT_DNNL_LIBRARY NAMES dnnl)
if(NOT MMDIT_DNNL_LIBRARY)
  set(mmdit_FOUND FALSE)
  set(mmdit_NOT_FOUND_MESSAGE "mmdit needs oneDNN: apt-get install libdnnl-dev")
  return()
endif()
find_dependency(hwy CONFIG)
find_dependency(nlohmann_json CONFIG)
find_dependency(HDF5 COMPONENTS C)
find_dependency(PkgConfig)
pkg_check_modules(LIBZIP REQUIRED IMPORTED_TARGET libzip)
include("${CMAKE_CURRENT_LIST_DIR}/mmditTargets.cmake")
