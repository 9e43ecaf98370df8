/* Load a file written by `pbcodec compress` and multiply by one of its
 * compressed matrices with the C API (include/pbcodec.h).
 *
 *   pbcodec_matvec FILE [TENSOR [BATCH]]
 *
 * Lists the file's tensors, then runs matvec on TENSOR (default: the first
 * compressed one) for BATCH (default 2) input vectors
 *   x[b][j] = ((7 j + 3 b) mod 17 - 8) / 8
 * and prints every output as "y b i value" (%.9g: exact for float32), so a
 * test can compare it with Python's PBTensor.matvec. Exit status 0 on
 * success, 2 when the library reports an error (message on stderr).
 *
 * Build (from the repository root, after `cargo build --release` in capi/):
 *   cc -O2 -Icapi/include examples/c/pbcodec_matvec.c \
 *      -Lcapi/target/release -lpbcodec_c -o pbcodec_matvec
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pbcodec.h"

static int fail(const char *what, PbcodecStatus st) {
    fprintf(stderr, "pbcodec_matvec: %s failed (status %d): %s\n", what, (int)st, pbcodec_last_error());
    return 2;
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 4) {
        fprintf(stderr, "usage: %s FILE [TENSOR [BATCH]]\n", argv[0]);
        return 1;
    }
    if (pbcodec_abi_version() != PBCODEC_ABI_VERSION) {
        fprintf(stderr, "pbcodec_matvec: library ABI %u, header ABI %u\n", pbcodec_abi_version(), PBCODEC_ABI_VERSION);
        return 1;
    }
    size_t batch = argc > 3 ? (size_t)strtoul(argv[3], NULL, 10) : 2;

    PbcodecFile *file = NULL;
    PbcodecStatus st = pbcodec_file_open(argv[1], &file);
    if (st != PBCODEC_STATUS_OK) return fail("pbcodec_file_open", st);

    const char *chosen = argc > 2 ? argv[2] : NULL;
    size_t count = pbcodec_file_num_tensors(file);
    printf("file %s: %zu tensors\n", argv[1], count);
    for (size_t i = 0; i < count; i++) {
        const char *name;
        int32_t compressed;
        st = pbcodec_file_tensor_name(file, i, &name, &compressed);
        if (st != PBCODEC_STATUS_OK) { pbcodec_file_close(file); return fail("pbcodec_file_tensor_name", st); }
        if (compressed) {
            PbcodecTensor *t = NULL;
            PbcodecInfo info;
            st = pbcodec_file_get_tensor(file, name, &t);
            if (st == PBCODEC_STATUS_OK) st = pbcodec_tensor_info(t, &info);
            pbcodec_tensor_free(t);
            if (st != PBCODEC_STATUS_OK) { pbcodec_file_close(file); return fail("pbcodec_tensor_info", st); }
            printf("  %-40s pbcodec %" PRIu64 "x%" PRIu64 " s%u c%u g%" PRIu64 " f%u salient %" PRIu64
                   " %.3f bits/weight\n",
                   name, info.m, info.n, info.salient_bits, info.count_bits, info.group_size, info.scale_bits,
                   info.num_salient, info.bits_per_weight);
            if (!chosen) chosen = name;
        } else {
            PbcodecRawTensor raw;
            st = pbcodec_file_get_raw(file, name, &raw);
            if (st != PBCODEC_STATUS_OK) { pbcodec_file_close(file); return fail("pbcodec_file_get_raw", st); }
            printf("  %-40s %-7s", name, raw.dtype);
            for (size_t d = 0; d < raw.ndim; d++) printf("%s%" PRIu64, d ? "x" : " ", raw.shape[d]);
            printf(" (%zu bytes)\n", raw.nbytes);
        }
    }
    if (!chosen) {
        fprintf(stderr, "pbcodec_matvec: the file has no compressed tensor\n");
        pbcodec_file_close(file);
        return 1;
    }

    PbcodecTensor *t = NULL;
    char label[256];
    snprintf(label, sizeof label, "%s", chosen); /* names belong to the file */
    st = pbcodec_file_get_tensor(file, chosen, &t);
    /* The tensor keeps the mapping alive: the file can be closed now. */
    pbcodec_file_close(file);
    if (st != PBCODEC_STATUS_OK) return fail("pbcodec_file_get_tensor", st);
    PbcodecInfo info;
    st = pbcodec_tensor_info(t, &info);
    if (st != PBCODEC_STATUS_OK) { pbcodec_tensor_free(t); return fail("pbcodec_tensor_info", st); }

    size_t m = (size_t)info.m, n = (size_t)info.n;
    float *x = malloc(sizeof(float) * (batch * n + 1));
    float *y = malloc(sizeof(float) * (batch * m + 1));
    if (!x || !y) { fprintf(stderr, "out of memory\n"); return 1; }
    for (size_t b = 0; b < batch; b++)
        for (size_t j = 0; j < n; j++) x[b * n + j] = (float)((long)((7 * j + 3 * b) % 17) - 8) / 8.0f;

    st = pbcodec_tensor_matvec(t, PBCODEC_ACTIVATION_FLOAT32, x, batch * n, y, batch * m);
    if (st != PBCODEC_STATUS_OK) { free(x); free(y); pbcodec_tensor_free(t); return fail("pbcodec_tensor_matvec", st); }
    printf("matvec %s: batch %zu, %zu threads\n", label, batch, pbcodec_get_num_threads());
    for (size_t b = 0; b < batch; b++)
        for (size_t i = 0; i < m; i++) printf("y %zu %zu %.9g\n", b, i, (double)y[b * m + i]);

    /* int8 activations (exact integer kernels; needs whole-row groups or groups of a multiple of 64). */
    st = pbcodec_tensor_matvec(t, PBCODEC_ACTIVATION_INT8, x, batch * n, y, batch * m);
    printf("int8 mode: status %d (%s)\n", (int)st, st == PBCODEC_STATUS_OK ? "ok" : pbcodec_last_error());
    if (st == PBCODEC_STATUS_OK)
        for (size_t b = 0; b < batch; b++)
            for (size_t i = 0; i < m; i++) printf("q %zu %zu %.9g\n", b, i, (double)y[b * m + i]);

    free(x);
    free(y);
    pbcodec_tensor_free(t);
    return 0;
}
