/* replay_main.c - run a fuzz harness without libFuzzer: over saved inputs, then random ones.
 *
 * Usage: replay_X [-r N] [-n NAME] DIR_OR_FILE...
 * Every file given (or found in a directory given) goes through LLVMFuzzerTestOneInput once: the
 * corpus in tests/c/corpus/ holds the seeds and every input that ever crashed a harness, so the
 * normal C test run (plain, ASan/UBSan, TSan, MSan builds) replays them as regression tests.  Then
 * N inputs made by mutating those files at random (a fixed seed: the same inputs every run) give
 * a little fuzzing to builds that cannot link libFuzzer.  Prints one PASS line for the runner;
 * a failing input aborts the process with the harness's message (a random one is saved to
 * $REPLAY_CRASH_FILE, default ./crash-replay-input, to be added to the corpus).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct input {
    uint8_t *p;
    size_t n;
};

static struct input *inputs;
static size_t ninputs, cap;
static const char *current = "(none)";
static const uint8_t *cur_data;
static const char *crash_file = "crash-replay-input";
static size_t cur_size;

/* On a crash, say which input it was and save a random one for reproduction. */
static void on_crash(int sig)
{
    static const char msg[] = "\nreplay: the input that failed: ";
    if (write(2, msg, sizeof(msg) - 1) < 0 || write(2, current, strlen(current)) < 0 || write(2, "\n", 1) < 0)
        _exit(3);
    if (!strcmp(current, "(random)") && cur_data) {
        int fd = open(crash_file, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) {
            if (write(fd, cur_data, cur_size) < 0) {}
            close(fd);
            static const char saved[] = "replay: the random input is saved as ";
            if (write(2, saved, sizeof(saved) - 1) < 0 || write(2, crash_file, strlen(crash_file)) < 0 ||
                write(2, "\n", 1) < 0) {}
        }
    }
    signal(sig, SIG_DFL);
    raise(sig);
}

static void run_one(const uint8_t *p, size_t n)
{
    cur_data = p;
    cur_size = n;
    LLVMFuzzerTestOneInput(p, n);
}

static void add_input(const char *name, uint8_t *p, size_t n)
{
    if (ninputs == cap) {
        cap = cap ? 2 * cap : 64;
        inputs = realloc(inputs, cap * sizeof(*inputs));
    }
    inputs[ninputs++] = (struct input){p, n};
    current = name;
    run_one(p, n);
}

/* A pack (corpus/<harness>.pack) is many inputs in one file: records of a little-endian u32
 * length and that many bytes.  `make corpus-pack` writes it from a minimised fuzzing corpus. */
static uint8_t *read_all(const char *path, size_t *n);

static void add_pack(const char *path, const char *unpack_dir)
{
    size_t n, off = 0, k = 0;
    uint8_t *all = read_all(path, &n);
    while (off + 4 <= n) {
        uint32_t len = (uint32_t)all[off] | (uint32_t)all[off + 1] << 8 | (uint32_t)all[off + 2] << 16 |
                       (uint32_t)all[off + 3] << 24;
        off += 4;
        if (len > n - off) {
            fprintf(stderr, "replay: %s is truncated\n", path);
            exit(2);
        }
        if (unpack_dir) {
            char out[4096];
            snprintf(out, sizeof(out), "%s/pack-%05zu", unpack_dir, k);
            FILE *f = fopen(out, "wb");
            if (!f || fwrite(all + off, 1, len, f) != len || fclose(f) != 0) {
                fprintf(stderr, "replay: cannot write %s\n", out);
                exit(2);
            }
        } else {
            uint8_t *p = malloc(len ? len : 1);
            memcpy(p, all + off, len);
            add_input(path, p, len);
        }
        off += len;
        k++;
    }
    free(all);
    if (unpack_dir)
        printf("unpacked %zu inputs from %s into %s\n", k, path, unpack_dir);
}

static uint8_t *read_all(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "replay: cannot open %s: %s\n", path, strerror(errno));
        exit(2);
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *p = malloc(n > 0 ? (size_t)n : 1);
    if (!p || (n > 0 && fread(p, 1, (size_t)n, f) != (size_t)n)) {
        fprintf(stderr, "replay: cannot read %s\n", path);
        exit(2);
    }
    fclose(f);
    *size = (size_t)n;
    return p;
}

static void add_file(const char *path)
{
    size_t n;
    uint8_t *p = read_all(path, &n);
    add_input(path, p, n);
}

static int by_name(const struct dirent **a, const struct dirent **b) { return strcmp((*a)->d_name, (*b)->d_name); }

static void add_path(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        fprintf(stderr, "replay: %s: %s\n", path, strerror(errno));
        exit(2);
    }
    if (!S_ISDIR(st.st_mode)) {
        size_t len = strlen(path);
        if (len > 5 && !strcmp(path + len - 5, ".pack"))
            add_pack(path, NULL);
        else
            add_file(path);
        return;
    }
    struct dirent **ents;
    int n = scandir(path, &ents, NULL, by_name);
    for (int i = 0; i < n; i++) {
        if (ents[i]->d_name[0] != '.') {
            char full[4096];
            snprintf(full, sizeof(full), "%s/%s", path, ents[i]->d_name);
            add_file(full);
        }
        free(ents[i]);
    }
    free(ents);
}

static uint64_t rng_state = 0x243f6a8885a308d3ull;
static uint64_t rnd(void)
{
    uint64_t x = (rng_state += 0x9e3779b97f4a7c15ull);
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

int main(int argc, char **argv)
{
    long random_runs = 0;
    const char *name = "replay";
    int i = 1;
    if (argc == 4 && !strcmp(argv[1], "--unpack")) { /* replay_X --unpack PACK DIR */
        add_pack(argv[2], argv[3]);
        return 0;
    }
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (!strcmp(argv[i], "-r") && i + 1 < argc)
            random_runs = atol(argv[++i]);
        else if (!strcmp(argv[i], "-n") && i + 1 < argc)
            name = argv[++i];
    }
    if (getenv("REPLAY_CRASH_FILE"))
        crash_file = getenv("REPLAY_CRASH_FILE");
    signal(SIGABRT, on_crash);
    signal(SIGSEGV, on_crash);
    signal(SIGBUS, on_crash);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (; i < argc; i++)
        add_path(argv[i]);
    size_t saved = ninputs;
    uint8_t *buf = malloc(1 << 16);
    for (long r = 0; r < random_runs; r++) {
        size_t n = 0;
        if (ninputs && rnd() % 8) {
            const struct input *in = &inputs[rnd() % ninputs];
            n = in->n < (1 << 16) ? in->n : (1 << 16);
            memcpy(buf, in->p, n);
        } else {
            n = rnd() % 512;
            for (size_t j = 0; j < n; j++)
                buf[j] = (uint8_t)rnd();
        }
        unsigned edits = 1 + (unsigned)(rnd() % 8);
        for (unsigned e = 0; e < edits && n; e++) {
            size_t at = rnd() % n;
            switch (rnd() % 4) {
            case 0: buf[at] = (uint8_t)rnd(); break;
            case 1: buf[at] ^= (uint8_t)(1u << (rnd() % 8)); break;
            case 2: buf[at] += (uint8_t)(rnd() % 5) - 2; break;
            default:
                if (n < (1 << 16) - 8) { /* insert a few random bytes */
                    size_t k = 1 + rnd() % 8;
                    memmove(buf + at + k, buf + at, n - at);
                    for (size_t j = 0; j < k; j++)
                        buf[at + j] = (uint8_t)rnd();
                    n += k;
                }
            }
        }
        current = "(random)";
        run_one(buf, n);
    }
    free(buf);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("PASS %s (%zu saved inputs, %ld random inputs, %.2f s)\n", name, saved, random_runs,
           (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9);
    return 0;
}
