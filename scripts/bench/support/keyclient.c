/* Benchmark client for commands that use a loaded key: like tpmclient.c's dev mode, but it
 * first sends SETUP (a CreatePrimary), takes the handle its response returns, puts it in
 * LOOP's first handle (bytes 10..13) and loops LOOP; at the end it flushes the key.
 *   keyclient PATH ITER SETUPHEX LOOPHEX
 * Prints "median p99 cpu switches" as tpmclient does (µs, µs, CPU µs and context switches
 * per command, over ITER measured commands after ITER/10 warm-up ones). */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}
static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}
static size_t unhex(const char *s, uint8_t *out, size_t cap) {
  size_t n = strlen(s) / 2;
  if (n > cap) n = cap;
  for (size_t i = 0; i < n; i++) sscanf(s + 2 * i, "%2hhx", &out[i]);
  return n;
}
static int transact(int fd, const uint8_t *cmd, size_t len, uint8_t *rsp, size_t cap) {
  if (write(fd, cmd, len) != (ssize_t)len) { perror("write"); return -1; }
  if (read(fd, rsp, cap) < 10) { perror("read"); return -1; }
  if (rsp[6] | rsp[7] | rsp[8] | rsp[9]) { fprintf(stderr, "TPM error %02x%02x%02x%02x\n", rsp[6], rsp[7], rsp[8], rsp[9]); return -1; }
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 5) { fprintf(stderr, "usage: keyclient PATH ITER SETUPHEX LOOPHEX\n"); return 2; }
  int iter = atoi(argv[2]);
  uint8_t setup[4096], cmd[4096], rsp[4096];
  size_t slen = unhex(argv[3], setup, sizeof setup), len = unhex(argv[4], cmd, sizeof cmd);
  int fd = open(argv[1], O_RDWR);
  if (fd < 0) { perror("open"); return 1; }
  if (transact(fd, setup, slen, rsp, sizeof rsp)) return 1;
  memcpy(cmd + 10, rsp + 10, 4); /* the key's handle, as this node numbers it */
  double *s = malloc(sizeof(double) * iter);
  for (int i = 0; i < iter / 10; i++)
    if (transact(fd, cmd, len, rsp, sizeof rsp)) return 1;
  struct rusage r0, r1;
  getrusage(RUSAGE_SELF, &r0);
  for (int i = 0; i < iter; i++) {
    double t0 = now_us();
    if (transact(fd, cmd, len, rsp, sizeof rsp)) return 1;
    s[i] = now_us() - t0;
  }
  getrusage(RUSAGE_SELF, &r1);
  /* FlushContext(handle): tpm0 has no resource manager to do it on close */
  uint8_t flush[14] = { 0x80, 0x01, 0, 0, 0, 14, 0, 0, 0x01, 0x65 };
  memcpy(flush + 10, cmd + 10, 4);
  if (transact(fd, flush, sizeof flush, rsp, sizeof rsp)) return 1;
  double cpu = (r1.ru_utime.tv_sec - r0.ru_utime.tv_sec + r1.ru_stime.tv_sec - r0.ru_stime.tv_sec) * 1e6 +
               (r1.ru_utime.tv_usec - r0.ru_utime.tv_usec + r1.ru_stime.tv_usec - r0.ru_stime.tv_usec);
  qsort(s, iter, sizeof(double), cmp);
  double sw = (double)(r1.ru_nvcsw - r0.ru_nvcsw + r1.ru_nivcsw - r0.ru_nivcsw);
  printf("%.2f %.2f %.2f %.2f\n", s[iter / 2], s[(int)(iter * 0.99)], cpu / iter, sw / iter);
  close(fd);
  return 0;
}
