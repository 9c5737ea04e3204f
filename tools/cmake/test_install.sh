#!/bin/bash
# ctest install.find_package: installs this build into a temporary prefix, then configures,
# builds and runs a project outside the tree that finds it with find_package(mmdit) and links
# mmdit::train, as README "Deploying a checkpoint in C++" tells a user to: from a shared library,
# as a controller plugin (ros2_control, pluginlib) is, which the executable loads.
# Usage: test_install.sh BUILD_DIR C_COMPILER CXX_COMPILER
set -euo pipefail
build_dir=$1 c_compiler=$2 cxx_compiler=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cmake --install "$build_dir" --prefix "$work/prefix" > "$work/install.log"
mkdir "$work/app"
cat > "$work/app/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.22)
project(my_robot C CXX)
set(CMAKE_CXX_STANDARD 20)
find_package(mmdit REQUIRED)
add_library(my_controller SHARED controller.cc)
target_link_libraries(my_controller PRIVATE mmdit::train)
add_executable(my_robot main.cc)
target_link_libraries(my_robot PRIVATE my_controller)
CMAKE
cat > "$work/app/main.cc" <<'CPP'
void run_controller();
int main() { run_controller(); }
CPP
cat > "$work/app/controller.cc" <<'CPP'
#include <cstdio>

#include "train/policy.h"

void run_controller() {
  mmdit::PolicyConfig c;
  c.hidden_size = 16, c.depth = 1, c.dim_cond = 16, c.timestep_embed_dim = 8;
  c.dim_head = 8, c.heads = 2, c.ff_mult = 2, c.horizon = 4;
  mmdit::Rng rng(0);
  const mmdit::BCPolicy policy(c, rng);
  const mmdit::EulerSampler sampler(policy, 3);
  const mmdit::Tensor a = sampler(rng.normal({1, 2, 4}), rng.normal({1, 4, 2}));
  std::printf("installed mmdit: %lld parameters, actions %s\n",
              static_cast<long long>(policy.num_parameters()),
              mmdit::shape_str(a.shape()).c_str());
}
CPP
cmake -S "$work/app" -B "$work/app/build" -DCMAKE_PREFIX_PATH="$work/prefix" \
  -DCMAKE_C_COMPILER="$c_compiler" -DCMAKE_CXX_COMPILER="$cxx_compiler" -DCMAKE_BUILD_TYPE=Release > "$work/configure.log" || { cat "$work/configure.log"; exit 1; }
cmake --build "$work/app/build" > "$work/build.log" || { cat "$work/build.log"; exit 1; }
"$work/app/build/my_robot"
