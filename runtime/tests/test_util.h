/* test_util.h — what the C tests share: CHECK, which reports a failed condition with its
 * place and goes on (so one run shows every failure), and the count it keeps. Each test
 * file includes it once; main ends with `return test_done("test_x");`. */
#ifndef LUAMP_TEST_UTIL_H
#define LUAMP_TEST_UTIL_H

#include <stdio.h>

static int failures;

#define CHECK(cond, ...) do { if (!(cond)) { failures++; fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
  fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); } } while (0)

/* main's result: 1 if a CHECK failed, else 0 after saying "<name>: ok". */
static inline int test_done(const char *name) {
  if (failures) return 1;
  printf("%s: ok\n", name);
  return 0;
}

#endif
