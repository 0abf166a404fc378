/* Batch-1 products that read only the weights a sparse vector needs, for llmfast's sparse runtime.
 *
 * With W^T stored row-major (wt[j, :] is column j of W), y = W v for a sparse v is the sum of the rows of W^T for
 * the kept entries, each scaled by its entry: contiguous reads of exactly the bytes needed. `threshold_gemv`
 * keeps the entries with |v| > t (TEAL's thresholds) and does it in one call; `gather_gemv` takes the kept
 * indices and values (CATS, ReLU, Deja Vu). `gather_dot` is the other side: the kept rows of W itself dotted with a
 * dense x (Deja Vu's gate and up rows, ReLU's up rows), each kept row one contiguous read. The kept rows are split
 * over the threads of torch's OpenMP pool (the library is loaded after torch, so it binds to torch's libgomp: one
 * pool, no oversubscription), because one core cannot draw the memory bandwidth two can. Each thread takes its
 * rows four at a time (four streams in flight, its partial sums read and written once per four rows) and
 * prefetches the first bytes of the next four (the hardware prefetcher follows a row once it has started; whole
 * rows prefetched cost more instructions than they saved: 14.4 against 10.6 ms of kernel a token on an Intel Xeon);
 * gather_dot takes its kept blocks the same way.
 * Results equal the dense product of the zeroed vector up to float32 summation order (each thread adds its kept
 * rows in index order, four at a time, then the threads' sums are added).
 *
 * Every function exists twice: for float32 weights and vectors, and (suffix _bf16) for bfloat16 ones, read as
 * bfloat16 (half the bytes) and widened to float32 exactly (a bfloat16 is the top half of a float32), products and
 * sums in float32, results in float32. This file includes itself once per type (T, LOAD, NAME below).
 *
 * Compiled at first use with the machine's C compiler (-march=native -fopenmp) by llmfast/native.py.
 */
#ifndef GATHER_GEMV_BODY
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PREFETCH_AHEAD 4 /* rows: the kept rows are not adjacent, so the hardware prefetcher starts each anew */
#define PREFETCH_HEAD 512 /* bytes of each such row prefetched: enough to start the stream */

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* The file includes itself by the path it was compiled from (llmfast/native.py gives the absolute one; a path
 * holding a quote or a backslash would not compile, and the runtime would keep its torch path). */
#define GATHER_GEMV_BODY
#define T float
#define WIDENED 0 /* T is float: values pass through as they are */
#define LOAD(p, i) ((p)[i])
#define NAME(f) f
#include __FILE__
#undef T
#undef WIDENED
#undef LOAD
#undef NAME
#define T uint16_t
#define WIDENED 1
#define LOAD(p, i) bf16_to_float((p)[i])
#define NAME(f) f##_bf16
#include __FILE__
#else

/* The first PREFETCH_HEAD bytes of the four rows after the four at k (rows of `len` values of `w`, the kept ones
 * named by idx, none at or past `end`): the hardware prefetcher then follows each row once it has started. */
static inline void NAME(prefetch_next)(const int64_t *idx, int64_t k, int64_t end, const T *w, int64_t len) {
    for (int64_t r = k + PREFETCH_AHEAD; r < k + PREFETCH_AHEAD + 4 && r < end; r++) {
        const char *next = (const char *)(w + idx[r] * len);
        for (int64_t byte = 0; byte < PREFETCH_HEAD && byte < len * (int64_t)sizeof(T); byte += 64)
            __builtin_prefetch(next + byte, 0, 3);
    }
}

/* y[0:out] = sum_k vals[k] * wt[idx[k], 0:out]. The kept rows are split over `threads` threads (whole rows are
 * the longest contiguous reads), each summing into its own part of `parts`, then the parts are added column-wise.
 * Returns 0, or -1 when out of memory. */
static int NAME(gather_rows)(const int64_t *idx, const float *vals, int64_t kept, const T *wt, int64_t out,
                             float *y, int64_t threads) {
    if (threads < 1) threads = 1;
    if (threads > kept) threads = kept > 0 ? kept : 1;
    float *parts = threads > 1 ? (float *)malloc(sizeof(float) * (size_t)(out * threads)) : y;
    if (!parts) return -1;
#pragma omp parallel num_threads((int)threads) if (threads > 1)
    {
        int64_t n = omp_get_num_threads(), id = omp_get_thread_num();
        int64_t per = (kept + n - 1) / n, a = id * per < kept ? id * per : kept, b = a + per < kept ? a + per : kept;
        /* OpenMP may give fewer threads than asked (nested regions, OMP_THREAD_LIMIT): one sums straight into y */
        float *restrict part = n == 1 ? y : parts + id * out;
        for (int64_t o = 0; o < out; o++) part[o] = 0.0f;
        int64_t k = a;
        /* Four rows a pass: four streams of the weights in flight, and the partial sums read and written once for
         * four rows instead of once for each (they were half the memory operations). */
        for (; k + 4 <= b; k += 4) {
            NAME(prefetch_next)(idx, k, b, wt, out);
            const T *restrict w0 = wt + idx[k] * out, *restrict w1 = wt + idx[k + 1] * out,
                    *restrict w2 = wt + idx[k + 2] * out, *restrict w3 = wt + idx[k + 3] * out;
            const float v0 = vals[k], v1 = vals[k + 1], v2 = vals[k + 2], v3 = vals[k + 3];
            for (int64_t o = 0; o < out; o++)
                part[o] += v0 * LOAD(w0, o) + v1 * LOAD(w1, o) + v2 * LOAD(w2, o) + v3 * LOAD(w3, o);
        }
        for (; k < b; k++) {
            const T *restrict w = wt + idx[k] * out;
            const float v = vals[k];
            for (int64_t o = 0; o < out; o++) part[o] += v * LOAD(w, o);
        }
        if (n > 1) {
#pragma omp barrier
            int64_t cols = ((out + n - 1) / n + 15) / 16 * 16;
            int64_t c0 = id * cols < out ? id * cols : out, c1 = c0 + cols < out ? c0 + cols : out;
            for (int64_t o = c0; o < c1; o++) {
                float sum = parts[o];
                for (int64_t t = 1; t < n; t++) sum += parts[t * out + o];
                y[o] = sum;
            }
        }
    }
    if (parts != y) free(parts);
    return 0;
}

/* y = sum over j with |x[j]| > t of x[j] * wt[j, :]. Returns the kept count; when it is above `max_kept`, computes
 * nothing and returns -(kept + 1) (the caller runs its dense product). -1 - in - 1 when out of memory. */
int64_t NAME(threshold_gemv)(const T *x, int64_t in, float t, const T *wt, int64_t out, float *y, int64_t max_kept,
                             int64_t threads) {
    int64_t *idx = (int64_t *)malloc(sizeof(int64_t) * (size_t)(in > 0 ? in : 1));
    float *vals = (float *)malloc(sizeof(float) * (size_t)(in > 0 ? in : 1));
    if (!idx || !vals) {
        free(idx);
        free(vals);
        return -in - 2;
    }
    int64_t kept = 0;
    for (int64_t j = 0; j < in; j++) {
        const float xj = LOAD(x, j);
        if (fabsf(xj) > t) {
            idx[kept] = j;
            vals[kept++] = xj;
        }
    }
    if (kept > max_kept) {
        free(idx);
        free(vals);
        return -kept - 1;
    }
    int failed = NAME(gather_rows)(idx, vals, kept, wt, out, y, threads);
    free(idx);
    free(vals);
    return failed ? -in - 2 : kept;
}

/* y = sum_k vals[k] * wt[idx[k], :]. Returns 0, or -1 when out of memory. */
int NAME(gather_gemv)(const int64_t *idx, const T *vals, int64_t kept, const T *wt, int64_t out, float *y,
                      int64_t threads) {
#if WIDENED
    float *wide = (float *)malloc(sizeof(float) * (size_t)(kept > 0 ? kept : 1));
    if (!wide) return -1;
    for (int64_t k = 0; k < kept; k++) wide[k] = LOAD(vals, k);
    int failed = NAME(gather_rows)(idx, wide, kept, wt, out, y, threads);
    free(wide);
    return failed;
#else
    return NAME(gather_rows)(idx, vals, kept, wt, out, y, threads);
#endif
}

/* The dot product of n floats in 16 lanes (the compiler vectorizes them), the lanes then added pairwise in a fixed
 * order: the same bits whatever the thread that computes it. */
static float NAME(dot16)(const T *restrict a, const T *restrict b, int64_t n) {
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) acc[l] += LOAD(a, i + l) * LOAD(b, i + l);
    float tail = 0.0f;
    for (; i < n; i++) tail += LOAD(a, i) * LOAD(b, i);
    for (int s = 8; s > 0; s >>= 1)
        for (int l = 0; l < s; l++) acc[l] += acc[l + s];
    return acc[0] + tail;
}

/* out[q] = a_q . b for four vectors a_q at once, each summed exactly as dot16 sums it (same lanes, same order: the
 * same bits): four streams of weights in flight, b's lanes loaded once for the four. */
static void NAME(dot16x4)(const T *restrict a0, const T *restrict a1, const T *restrict a2, const T *restrict a3,
                          const T *restrict b, int64_t n, float *out) {
    float acc[4][16] = {{0}};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) {
            const float bl = LOAD(b, i + l);
            acc[0][l] += LOAD(a0, i + l) * bl;
            acc[1][l] += LOAD(a1, i + l) * bl;
            acc[2][l] += LOAD(a2, i + l) * bl;
            acc[3][l] += LOAD(a3, i + l) * bl;
        }
    const T *a[4] = {a0, a1, a2, a3};
    for (int q = 0; q < 4; q++) {
        float tail = 0.0f;
        for (int64_t j = i; j < n; j++) tail += LOAD(a[q], j) * LOAD(b, j);
        for (int s = 8; s > 0; s >>= 1)
            for (int l = 0; l < s; l++) acc[q][l] += acc[q][l + s];
        out[q] = acc[q][0] + tail;
    }
}

/* y[k * width + r] = w[idx[k], r, :] . x for r < width, with w laid out (rows, width, in): the kept rows of `width`
 * interleaved matrices (Deja Vu's gate and up, width 2; ReLU's up, width 1), each kept index one contiguous block
 * of width * in values. The kept indices are split over `threads` threads, each writing its own outputs (nothing
 * to add up between threads), four blocks at a time with the heads of the next four prefetched, as gather_rows
 * reads its rows (whole blocks prefetched two ahead, one at a time: 4.2 against 3.1 ms for the 30 layers of the
 * built-in model's gate|up at 30% kept, caches flushed, on an Intel Xeon). */
void NAME(gather_dot)(const int64_t *idx, int64_t kept, const T *w, int64_t width, int64_t in, const T *x,
                      float *y, int64_t threads) {
    if (threads < 1) threads = 1;
    if (threads > kept) threads = kept > 0 ? kept : 1;
    const int64_t block = width * in;
#pragma omp parallel num_threads((int)threads) if (threads > 1)
    {
        int64_t n = omp_get_num_threads(), id = omp_get_thread_num();
        int64_t per = (kept + n - 1) / n, a = id * per < kept ? id * per : kept, b = a + per < kept ? a + per : kept;
        int64_t k = a;
        for (; k + 4 <= b; k += 4) {
            NAME(prefetch_next)(idx, k, b, w, block);
            for (int64_t r = 0; r < width; r++) {
                float out[4];
                NAME(dot16x4)(w + idx[k] * block + r * in, w + idx[k + 1] * block + r * in,
                              w + idx[k + 2] * block + r * in, w + idx[k + 3] * block + r * in, x, in, out);
                for (int q = 0; q < 4; q++) y[(k + q) * width + r] = out[q];
            }
        }
        for (; k < b; k++) {
            const T *restrict rows = w + idx[k] * block;
            for (int64_t r = 0; r < width; r++) y[k * width + r] = NAME(dot16)(rows + r * in, x, in);
        }
    }
}
#endif /* GATHER_GEMV_BODY */
