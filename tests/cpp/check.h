// The native tests' harness (no framework): check() counts, report() prints "N passed, N failed" and gives
// main its exit status.
#pragma once

#include <stdio.h>

#include <string>

inline int passed = 0, failed = 0;

inline void check(bool ok, const std::string& what) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    fprintf(stderr, "FAILED: %s\n", what.c_str());
  }
}

inline int report() {
  printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
