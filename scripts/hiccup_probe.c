/* How long this CPU is taken away from a running or a waking thread: the host's hiccups.
 *
 * usage: hiccup_probe spin|sleep SECONDS
 *   spin:  reads CLOCK_MONOTONIC in a tight loop; a gap between two reads is time the thread
 *          did not run (the kernel's interrupts, or the hypervisor running another guest).
 *   sleep: sleeps 100 us at a time; the lateness of each wake-up is what a server waiting in
 *          epoll_wait pays before it runs again.
 * Prints, for gaps (spin) or lateness (sleep): count, p50, p99, p99.9, max in microseconds, and
 * the total time lost to gaps of 1 ms and more, as a share of the run.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    long long x = *(const long long *)a, y = *(const long long *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 3 || (strcmp(argv[1], "spin") && strcmp(argv[1], "sleep"))) {
        fprintf(stderr, "usage: hiccup_probe spin|sleep SECONDS\n");
        return 2;
    }
    int spin = !strcmp(argv[1], "spin");
    double secs = atof(argv[2]);
    if (secs <= 0 || secs > 600) {
        fprintf(stderr, "hiccup_probe: SECONDS must be in (0, 600]\n");
        return 2;
    }
    size_t cap = 1 << 22, n = 0;
    long long *samples = malloc(cap * sizeof *samples);
    if (!samples) {
        perror("malloc");
        return 1;
    }
    long long start = now_ns(), end = start + (long long)(secs * 1e9), lost = 0;
    long long prev = start;
    while (prev < end) {
        long long sample;
        if (spin) {
            long long t = now_ns();
            sample = t - prev;
            prev = t;
            /* Only gaps above 2 us are kept: the loop itself takes tens of ns. */
            if (sample < 2000)
                continue;
        } else {
            struct timespec want = {0, 100000};
            long long before = now_ns();
            nanosleep(&want, NULL);
            prev = now_ns();
            sample = prev - before - 100000;
        }
        if (sample >= 1000000)
            lost += sample;
        if (n < cap)
            samples[n++] = sample;
    }
    qsort(samples, n, sizeof *samples, cmp);
    double run = (double)(prev - start);
#define AT(q) (n ? samples[(size_t)((q) * (n - 1))] / 1000.0 : 0.0)
    printf("%s: %zu %s, p50 %.1f us, p99 %.1f us, p99.9 %.1f us, max %.1f us; "
           "gaps of 1 ms or more: %.2f%% of the run\n",
           argv[1], n, spin ? "gaps over 2 us" : "wake-ups", AT(0.5), AT(0.99), AT(0.999),
           n ? samples[n - 1] / 1000.0 : 0.0, 100.0 * lost / run);
    return 0;
}
