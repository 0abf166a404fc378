/* Element-wise merges of full models in one pass over the stored bytes: linear, task arithmetic, and DARE (with or
 * without TIES's sign election), for float32 and bfloat16 tensors.
 *
 * The numpy path (llmfast/merge/methods) makes ~10 passes per 64K-entry block: widen each input, subtract the base,
 * weight, add, divide, round back to bfloat16. Here each entry is read once, computed in registers and written
 * once. The float operations are numpy's (and mergekit's), one by one in the same order, and the file is compiled
 * without fast-math or FMA contraction, so the output has the same bits as the numpy path; what the numpy path
 * decides per block (task vectors that are zero there are skipped, which changes signed zeros) is decided per
 * block here too. DARE's drop replays numpy's PCG64 stream (the caller passes the seeded state), so the same
 * entries are dropped.
 *
 * Compiled at first use with the machine's C compiler by llmfast/native.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_INPUTS 16
#define BLOCK 65536 /* entries: llmfast.merge.steps.BLOCK, the numpy path's unit of skipping zero task vectors */

enum { LINEAR = 0, TASK = 1 };

typedef struct {
    int64_t n;                        /* entries of the tensor */
    int32_t mode;                     /* LINEAR or TASK */
    int32_t inputs;                   /* how many inputs */
    int32_t out_bf16;                 /* output stored as bfloat16 bits (else float32) */
    int32_t base_bf16;                /* TASK: base stored as bfloat16 */
    const void *base;                 /* TASK: the base tensor */
    const void *in[MAX_INPUTS];       /* the inputs as stored */
    int32_t in_bf16[MAX_INPUTS];      /* each input stored as bfloat16 (else float32) */
    float weight[MAX_INPUTS];         /* float32(weight) */
    int32_t weigh[MAX_INPUTS];        /* TASK: weight != 1 (numpy skips multiplying by 1) */
    const uint8_t *keep[MAX_INPUTS];  /* TASK with DARE: one bit per entry (from dare_mask), or NULL: no drop */
    float scale[MAX_INPUTS];          /* TASK with DARE: rescale factor */
    int32_t rescale[MAX_INPUTS];      /* TASK with DARE: apply `scale` */
    int32_t whole_skip[MAX_INPUTS];   /* TASK: input skipped for the whole tensor (a zero task vector) */
    int32_t block_skip;               /* TASK: also skip inputs whose task vector is zero in a block (numpy's blocks) */
    int32_t consensus;                /* TASK: TIES's sign election by total mass */
    int32_t normalize;                /* divide by `total` (TASK with consensus: by the agreeing weights) */
    float total;                      /* float32(sum of every input's weight), 1 where it is ~0 for TASK */
    float lambda;                     /* TASK: float32(lambda) */
    int32_t apply_lambda;             /* TASK: lambda != 1 */
    void *out;
} merge_job;

#define CH 256 /* entries per chunk: every pass over a chunk stays in L1 and vectorizes */

static inline float widen1(const void *p, int bf16, int64_t i) {
    if (bf16) {
        uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    return ((const float *)p)[i];
}

/* dst[0:len] = entries [at, at + len) of a float32 or bfloat16 tensor, as float32 (exact). */
static void load(float *restrict dst, const void *src, int bf16, int64_t at, int len) {
    if (bf16) {
        const uint16_t *restrict s = (const uint16_t *)src + at;
        uint32_t *restrict d = (uint32_t *)dst;
        for (int k = 0; k < len; k++) d[k] = (uint32_t)s[k] << 16;
    } else {
        memcpy(dst, (const float *)src + at, sizeof(float) * (size_t)len);
    }
}

/* Entries [at, at + len) of the output from v: float32, or bfloat16 rounded to nearest even with NaN -> 0x7FC0
 * (llmfast.merge.io.float32_to_bf16_bits). */
static void put(void *out, int bf16, int64_t at, const float *restrict v, int len) {
    if (bf16) {
        uint16_t *restrict o = (uint16_t *)out + at;
        const uint32_t *restrict b = (const uint32_t *)v;
        for (int k = 0; k < len; k++) {
            uint16_t r = (uint16_t)((b[k] + 0x7FFFu + ((b[k] >> 16) & 1u)) >> 16);
            o[k] = v[k] != v[k] ? (uint16_t)0x7FC0 : r;
        }
    } else {
        memcpy((float *)out + at, v, sizeof(float) * (size_t)len);
    }
}

/* sum_i x_i * w_i in input order, then / total: numpy's multiply, add, divide. */
static void merge_linear(const merge_job *j) {
    float acc[CH], x[CH];
    for (int64_t at = 0; at < j->n; at += CH) {
        int len = j->n - at < CH ? (int)(j->n - at) : CH;
        load(acc, j->in[0], j->in_bf16[0], at, len);
        for (int k = 0; k < len; k++) acc[k] = acc[k] * j->weight[0];
        for (int i = 1; i < j->inputs; i++) {
            load(x, j->in[i], j->in_bf16[i], at, len);
            for (int k = 0; k < len; k++) acc[k] = acc[k] + x[k] * j->weight[i];
        }
        if (j->normalize)
            for (int k = 0; k < len; k++) acc[k] = acc[k] / j->total;
        put(j->out, j->out_bf16, at, acc, len);
    }
}

/* Input i's task vector on a chunk after the drop, the rescale and the weight, in numpy's order of operations. */
static void task_chunk(const merge_job *j, int i, int64_t at, int len, const float *restrict base, float *restrict d) {
    load(d, j->in[i], j->in_bf16[i], at, len);
    for (int k = 0; k < len; k++) d[k] = d[k] - base[k];
    if (j->keep[i]) {
        const uint8_t *restrict bits = j->keep[i] + (at >> 3); /* chunks start at multiples of 8 entries */
        for (int k = 0; k < len; k++) d[k] = d[k] * (float)((bits[k >> 3] >> (k & 7)) & 1);
    }
    if (j->rescale[i])
        for (int k = 0; k < len; k++) d[k] = d[k] * j->scale[i];
    if (j->weigh[i])
        for (int k = 0; k < len; k++) d[k] = d[k] * j->weight[i];
}

static void merge_task_range(const merge_job *j, int64_t a, int64_t b, const int *use, int used) {
    float base[CH], mixed[CH], d[MAX_INPUTS][CH];
    for (int64_t at = a; at < b; at += CH) {
        int len = b - at < CH ? (int)(b - at) : CH;
        load(base, j->base, j->base_bf16, at, len);
        if (used == 0) { /* every task vector zero: the base as it is */
            put(j->out, j->out_bf16, at, base, len);
            continue;
        }
        for (int u = 0; u < used; u++) task_chunk(j, use[u], at, len, base, d[u]);
        if (!j->consensus) {
            memcpy(mixed, d[0], sizeof(float) * (size_t)len);
            for (int u = 1; u < used; u++)
                for (int k = 0; k < len; k++) mixed[k] = mixed[k] + d[u][k];
            if (j->normalize)
                for (int k = 0; k < len; k++) mixed[k] = mixed[k] / j->total;
        } else {
            /* TIES's election by total mass; agreement as 0/1 floats, not branches (random signs mispredict). */
            float majority[CH], mass[CH];
            if (used > 1)
                for (int k = 0; k < len; k++) majority[k] = d[0][k] + d[1][k];
            else
                memcpy(majority, d[0], sizeof(float) * (size_t)len);
            for (int u = 2; u < used; u++)
                for (int k = 0; k < len; k++) majority[k] = majority[k] + d[u][k];
            for (int k = 0; k < len; k++) {
                majority[k] = majority[k] >= 0.0f ? 1.0f : -1.0f;
                mixed[k] = 0.0f;
                mass[k] = 0.0f;
            }
            for (int u = 0; u < used; u++) {
                const float w = j->weigh[use[u]] ? j->weight[use[u]] : 1.0f; /* agree * 1 is agree: same bits */
                const float *restrict du = d[u];
                for (int k = 0; k < len; k++) {
                    float agree = (float)(du[k] * majority[k] > 0.0f); /* a zero never agrees */
                    mixed[k] = mixed[k] + du[k] * agree;
                    mass[k] = mass[k] + agree * w;
                }
            }
            if (j->normalize)
                for (int k = 0; k < len; k++) mixed[k] = mixed[k] / (mass[k] == 0.0f ? 1.0f : mass[k]);
        }
        if (j->apply_lambda)
            for (int k = 0; k < len; k++) mixed[k] = mixed[k] * j->lambda;
        for (int k = 0; k < len; k++) mixed[k] = mixed[k] + base[k];
        put(j->out, j->out_bf16, at, mixed, len);
    }
}

/* Whether input - base is nonzero anywhere in entries [a, b) (stops at the first such entry). */
static int nonzero_delta(const void *base, int base_bf16, const void *input, int in_bf16, int64_t a, int64_t b) {
    for (int64_t e = a; e < b; e++)
        if (widen1(input, in_bf16, e) - widen1(base, base_bf16, e) != 0.0f) return 1;
    return 0;
}

static void merge_task(const merge_job *j) {
    int64_t step = j->block_skip ? BLOCK : (j->n > 0 ? j->n : 1);
    for (int64_t a = 0; a < j->n; a += step) {
        int64_t b = a + step < j->n ? a + step : j->n;
        int use[MAX_INPUTS], used = 0;
        for (int i = 0; i < j->inputs; i++)
            if (!j->whole_skip[i] &&
                !(j->block_skip && !nonzero_delta(j->base, j->base_bf16, j->in[i], j->in_bf16[i], a, b)))
                use[used++] = i;
        merge_task_range(j, a, b, use, used);
    }
}

/* Merges one tensor. Returns 0, or -1 for a job it does not take. */
int merge_elementwise(const merge_job *j) {
    if (j->inputs < 1 || j->inputs > MAX_INPUTS) return -1;
    if (j->mode == LINEAR)
        merge_linear(j);
    else if (j->mode == TASK)
        merge_task(j);
    else
        return -1;
    return 0;
}

int64_t merge_job_size(void) { return (int64_t)sizeof(merge_job); }

/* numpy's PCG64 (XSL-RR 128/64): step, then output from the new state. */
typedef struct {
    __uint128_t state, inc;
} pcg64;

static inline uint64_t pcg64_next(pcg64 *r) {
    const __uint128_t mult = ((__uint128_t)0x2360ED051FC65DA4ULL << 64) | 0x4385DF649FCCF645ULL;
    r->state = r->state * mult + r->inc;
    uint64_t x = (uint64_t)(r->state >> 64) ^ (uint64_t)r->state;
    unsigned rot = (unsigned)(r->state >> 122);
    return (x >> rot) | (x << ((64 - rot) & 63));
}

/* DARE's drop of one input: entry e is kept when the e-th 32-bit half of numpy's PCG64 raw stream (low half first)
 * is below `below` (llmfast.merge.methods.sparsify.drop_at_random). Writes the keep bits (n / 8 bytes, rounded up)
 * and, of the task vector input - base: its nonzero count, its kept nonzero count, and its L1 norms before and
 * after the drop (float64 sums). state = {state high, state low, inc high, inc low}. */
void dare_mask(const void *base, int32_t base_bf16, const void *input, int32_t in_bf16, int64_t n,
               const uint64_t *state, uint32_t below, uint8_t *keep, int64_t *nonzero, int64_t *kept, double *before,
               double *after) {
    pcg64 r = {((__uint128_t)state[0] << 64) | state[1], ((__uint128_t)state[2] << 64) | state[3]};
    int64_t nz = 0, kp = 0;
    /* Four partial sums per norm, entry k of a chunk into sum k % 4: a fixed order, and four add chains instead
     * of one (the float64 adder's latency bound the loop). */
    double l1[4] = {0, 0, 0, 0}, l1_kept[4] = {0, 0, 0, 0};
    uint32_t draws[CH];
    float d[CH], b[CH], dk[CH];
    for (int64_t at = 0; at < n; at += CH) {
        int len = n - at < CH ? (int)(n - at) : CH;
        for (int k = 0; k < len; k += 2) { /* one 64-bit output gives two entries, low half first */
            uint64_t raw = pcg64_next(&r);
            draws[k] = (uint32_t)raw;
            draws[k + 1] = (uint32_t)(raw >> 32);
        }
        load(d, input, in_bf16, at, len);
        load(b, base, base_bf16, at, len);
        for (int k = 0; k < len; k++) {
            d[k] = d[k] - b[k];
            dk[k] = d[k] * (float)(draws[k] < below); /* NaN * 0 is NaN: a dropped NaN still counts, as in numpy */
            nz += d[k] != 0.0f; /* NaN != 0: counted, as numpy's count_nonzero does */
            kp += dk[k] != 0.0f;
        }
        for (int k = len; k < ((len + 7) & ~7); k++) d[k] = dk[k] = 0.0f, draws[k] = below;
        for (int k = 0; k < len; k += 8) {
            unsigned byte = 0;
            for (int t = 0; t < 8; t++) byte |= (unsigned)(draws[k + t] < below) << t;
            keep[(at + k) >> 3] = (uint8_t)byte;
        }
        for (int k = 0; k < len; k += 4)
            for (int t = 0; t < 4; t++) {
                l1[t] += fabs((double)d[k + t]);
                l1_kept[t] += fabs((double)dk[k + t]);
            }
    }
    *nonzero = nz;
    *kept = kp;
    *before = (l1[0] + l1[1]) + (l1[2] + l1[3]);
    *after = (l1_kept[0] + l1_kept[1]) + (l1_kept[2] + l1_kept[3]);
}

/* Whether input - base is nonzero anywhere: a DARE input whose task vector is zero is skipped before any draw. */
int any_nonzero_delta(const void *base, int32_t base_bf16, const void *input, int32_t in_bf16, int64_t n) {
    return nonzero_delta(base, base_bf16, input, in_bf16, 0, n);
}
