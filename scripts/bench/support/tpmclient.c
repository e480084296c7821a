/* Benchmark client: the same write/read loop against a TPM device node or a TCP TPM
 * (swtpm's data port), so the two figures differ only by what serves them.
 *   tpmclient dev  PATH      ITER HEXCMD
 *   tpmclient tcp  HOST:PORT ITER HEXCMD
 * Runs ITER/10 unmeasured warm-up commands first, then prints "median p99 cpu switches"
 * of the ITER measured ones: latency in µs, CPU µs per command, context switches per command. */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
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
static int read_full(int fd, uint8_t *b, size_t n) {
  size_t off = 0;
  while (off < n) {
    ssize_t r = read(fd, b + off, n - off);
    if (r <= 0) return -1;
    off += r;
  }
  return 0;
}

/* One command: write it, read the whole response; 0 on success. */
static int transact(int fd, int tcp, const uint8_t *cmd, size_t len, uint8_t *rsp, size_t cap) {
  if (write(fd, cmd, len) != (ssize_t)len) { perror("write"); return -1; }
  if (tcp) {
    if (read_full(fd, rsp, 10)) { perror("read"); return -1; }
    uint32_t n = (rsp[2] << 24) | (rsp[3] << 16) | (rsp[4] << 8) | rsp[5];
    if (n < 10 || n > cap || read_full(fd, rsp + 10, n - 10)) { fprintf(stderr, "bad response\n"); return -1; }
  } else if (read(fd, rsp, cap) < 10) { perror("read"); return -1; }
  if (rsp[6] | rsp[7] | rsp[8] | rsp[9]) { fprintf(stderr, "TPM error %02x%02x%02x%02x\n", rsp[6], rsp[7], rsp[8], rsp[9]); return -1; }
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 5) { fprintf(stderr, "usage: tpmclient dev|tcp TARGET ITER HEXCMD\n"); return 2; }
  int iter = atoi(argv[3]);
  uint8_t cmd[4096], rsp[4096];
  size_t len = strlen(argv[4]) / 2;
  for (size_t i = 0; i < len; i++) sscanf(argv[4] + 2 * i, "%2hhx", &cmd[i]);
  int tcp = strcmp(argv[1], "tcp") == 0, fd;
  if (tcp) {
    char host[64]; int port;
    if (sscanf(argv[2], "%63[^:]:%d", host, &port) != 2) return 2;
    fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    inet_pton(AF_INET, host, &a.sin_addr);
    if (connect(fd, (struct sockaddr *)&a, sizeof a)) { perror("connect"); return 1; }
    int one = 1; setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  } else {
    fd = open(argv[2], O_RDWR);
    if (fd < 0) { perror("open"); return 1; }
  }
  double *s = malloc(sizeof(double) * iter);
  /* Warm-up, not measured: iter/10 commands (server JIT and caches, page faults). */
  for (int i = 0; i < iter / 10; i++)
    if (transact(fd, tcp, cmd, len, rsp, sizeof rsp)) return 1;
  struct rusage r0, r1;
  getrusage(RUSAGE_SELF, &r0);
  for (int i = 0; i < iter; i++) {
    double t0 = now_us();
    if (transact(fd, tcp, cmd, len, rsp, sizeof rsp)) return 1;
    s[i] = now_us() - t0;
  }
  getrusage(RUSAGE_SELF, &r1);
  double cpu = (r1.ru_utime.tv_sec - r0.ru_utime.tv_sec + r1.ru_stime.tv_sec - r0.ru_stime.tv_sec) * 1e6 +
               (r1.ru_utime.tv_usec - r0.ru_utime.tv_usec + r1.ru_stime.tv_usec - r0.ru_stime.tv_usec);
  qsort(s, iter, sizeof(double), cmp);
  double sw = (double)(r1.ru_nvcsw - r0.ru_nvcsw + r1.ru_nivcsw - r0.ru_nivcsw);
  printf("%.2f %.2f %.2f %.2f\n", s[iter / 2], s[(int)(iter * 0.99)], cpu / iter, sw / iter);
  close(fd);
  return 0;
}
