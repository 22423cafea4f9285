/* The bare C loop of pair-load: two TUN descriptors (virtio header on, the
 * kernel's offloads on, as tunkit's "tunkit" setup makes them), one thread
 * each way doing read() and write() of whole super-packets, header and all.
 * Nothing is parsed, split or counted: the ceiling of any user-space loop
 * between two TUN devices. Run by benchmarks/c_loop.py, which passes the two
 * descriptors as arguments and waits for "ready".
 *
 *     gcc -O2 -pthread -o c_loop benchmarks/c_loop.c && ./c_loop FD_A FD_B
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* A virtio-net header (10 bytes) and a super-packet of up to 64 KB. */
#define BUF_SIZE (65536 + 64)

struct direction {
    int src;
    int dst;
};

static void *forward(void *arg) {
    const struct direction *d = arg;
    static _Thread_local unsigned char buf[BUF_SIZE];
    for (;;) {
        ssize_t n = read(d->src, buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("read");
            exit(1);
        }
        /* A refused packet is dropped, as the naive loop drops it. */
        (void)!write(d->dst, buf, (size_t)n);
    }
    return NULL;
}

static int blocking(int fd) {
    int flags = fcntl(fd, F_GETFL);
    return flags < 0 ? -1 : fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s FD_A FD_B\n", argv[0]);
        return 2;
    }
    int a = atoi(argv[1]), b = atoi(argv[2]);
    if (blocking(a) < 0 || blocking(b) < 0) {
        perror("fcntl");
        return 1;
    }
    static struct direction a2b, b2a;
    a2b.src = a;
    a2b.dst = b;
    b2a.src = b;
    b2a.dst = a;
    pthread_t thread;
    if (pthread_create(&thread, NULL, forward, &b2a) != 0) {
        fprintf(stderr, "pthread_create failed\n");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    forward(&a2b);
    return 0;
}
