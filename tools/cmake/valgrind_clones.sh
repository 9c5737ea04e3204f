#!/bin/bash
# ctest simd_clones.*: runs a test program under valgrind, whose CPU has no AVX-512, so that the
# program's AVX2 clones run. Usage: valgrind_clones.sh VALGRIND PROGRAM [ARGS...]
# Exits 77 (ctest: skipped) when valgrind cannot start the program at all because a system
# library's start-up code uses an instruction valgrind does not know on this CPU: Debian 12's
# valgrind 3.19 on AMD Zen 5 stops at rdtscp in libhwy's TimerResolution, before main. An illegal
# instruction anywhere else, our own code's included, fails the test.
set -uo pipefail
valgrind=$1 program=$2
shift 2
if ! probe=$("$valgrind" --tool=none -q "$program" --gtest_list_tests 2>&1 >/dev/null); then
  frame=$(grep -A1 'Illegal opcode' <<<"$probe" | grep -m1 ' at 0x')
  if [[ -n $frame && $frame =~ \(in\ /(usr/)?lib/ ]]; then
    echo "skipped: $("$valgrind" --version) cannot start $(basename "$program") on this CPU:"
    echo "$frame"
    exit 77
  fi
  echo "$probe"
  exit 1
fi
exec "$valgrind" --tool=none -q "$program" "$@"
