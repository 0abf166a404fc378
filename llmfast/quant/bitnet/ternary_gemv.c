/* Ternary (BitNet b1.58) linear layer for a CPU, for the few rows of a decode step.
 *
 * y[r, o] = (sum_j codes[r, j] * w[o, j]) / (weight_scale * scale[r]), where codes are the per-row absmax int8
 * codes of x: scale = 127 * (1 / max(absmax, 1e-5)), codes = clamp(rint(x * scale), -128, 127). The float
 * operations are the ones torch performs in `TernaryLinear.forward`, in the same order and rounding (the file is
 * compiled without fast-math or FMA contraction), and the integer sums are exact, so the outputs are
 * bit-identical to the torch path. One fused call replaces the dozen torch operations around a GEMM, which cost
 * more than the GEMM itself at small shapes. bfloat16 rows (`ternary_linear_bf16`) are quantized as torch does on
 * bfloat16 tensors, each operation rounded to bfloat16; their integer sums stay exact (where a bfloat16 matmul
 * rounds them) and the output is rounded once, as the Triton kernel does on a GPU.
 *
 * Weights are stored at 2 bits (w + 1 in {0, 1, 2}), a sixteenth of float32's bytes, so a model's layers stay in
 * cache. `ternary_pack` lays them out once in blocks of 64 output rows x 4 inputs = 64 bytes: byte 4 * k + i
 * holds, in bits 2t..2t+1, the weight of row 16 * t + k and input i. x86's byte dot product (unsigned x signed
 * bytes, 4 products added into each 32-bit lane) then takes the unsigned w + 1 of 16 rows against 4 broadcast
 * signed codes with no horizontal sums; sum((w + 1) * c) = dot(w, c) + sum(c), and sum(c) is known per row of x.
 * Compiled at first use with the machine's C compiler (-march=native) by llmfast/native.py; three code paths:
 * AVX512-VNNI, AVX2, and plain C for any other CPU.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512VNNI__)
#include <immintrin.h>
#endif

#define ACT_MAX 127.0f
#define SCALE_FLOOR 1e-5f
#define BLOCK_ROWS 64  /* output rows per block: 4 sub-blocks of 16, one per 2-bit field */
#define GROUP 4        /* inputs per 32-bit lane of the byte dot product */
#define CHUNK 64       /* bytes per (block, group) */
#define MAX_THREADS 64

static int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

/* Which of the three code paths this build took. */
const char *ternary_path(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return "avx512-vnni";
#elif defined(__AVX2__)
    return "avx2";
#else
    return "c";
#endif
}

/* Bytes of the packed layout of an out x in matrix. */
int64_t ternary_packed_bytes(int64_t out, int64_t in) { return round_up(out, BLOCK_ROWS) * round_up(in, GROUP) / 4; }

/* w (out x in, row-major, values -1/0/1) -> packed[block][group][64 bytes]; padding rows and inputs hold w = 0. */
void ternary_pack(const int8_t *w, int64_t out, int64_t in, uint8_t *packed) {
    int64_t groups = round_up(in, GROUP) / GROUP, blocks = round_up(out, BLOCK_ROWS) / BLOCK_ROWS;
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t g = 0; g < groups; g++) {
            uint8_t *chunk = packed + (b * groups + g) * CHUNK;
            for (int k = 0; k < 16; k++)
                for (int i = 0; i < GROUP; i++) {
                    uint8_t byte = 0;
                    for (int t = 0; t < 4; t++) {
                        int64_t o = b * BLOCK_ROWS + 16 * t + k, j = g * GROUP + i;
                        int v = (o < out && j < in) ? w[o * in + j] : 0;
                        byte |= (uint8_t)((v + 1) << (2 * t));
                    }
                    chunk[GROUP * k + i] = byte;
                }
        }
}

/* bfloat16 <-> float32 as torch converts them: widening is exact; narrowing rounds to nearest even, a NaN stays a
 * (quiet) NaN. */
static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

/* x[j] of a float32 (bf16 = 0) or bfloat16 (bf16 = 1) row, as a float; and `f` rounded to the row's dtype, as torch
 * rounds each operation on tensors of that dtype (nothing to do for float32). */
static inline float load_x(const void *x, int64_t j, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)x)[j]) : ((const float *)x)[j];
}

static inline float in_dtype(float f, int bf16) { return bf16 ? round_bf16(f) : f; }

/* Codes of one row of x, zero-padded to `padded`; returns the scale and the sum of the codes. A row holding a NaN
 * or an infinity gives scale NaN and so an all-NaN output row, as torch's path does (its codes are NaN there).
 * A bfloat16 row's operations (the floor's clamp, the reciprocal, the product by 127, x * scale) are each rounded
 * to bfloat16, as torch computes them on bfloat16 tensors. */
static float quantize_row(const void *x, int bf16, int8_t *c, int64_t n, int64_t padded, int32_t *sum) {
    float amax = 0.0f;
    int finite = 1;
    for (int64_t j = 0; j < n; j++) {
        float a = fabsf(load_x(x, j, bf16));
        finite &= a <= 3.40282347e38f; /* false for NaN and infinity */
        amax = a > amax ? a : amax;
    }
    if (!finite) {
        memset(c, 0, (size_t)padded);
        *sum = 0;
        return NAN;
    }
    float floor = in_dtype(SCALE_FLOOR, bf16);
    if (amax < floor) amax = floor;
    /* torch: ACT_MAX / t is t.reciprocal() * ACT_MAX */
    float scale = in_dtype(in_dtype(1.0f / amax, bf16) * ACT_MAX, bf16);
    int32_t s = 0;
    for (int64_t j = 0; j < n; j++) {
        float q = rintf(in_dtype(load_x(x, j, bf16) * scale, bf16));
        q = q < -128.0f ? -128.0f : (q > 127.0f ? 127.0f : q);
        c[j] = (int8_t)q;
        s += c[j];
    }
    for (int64_t j = n; j < padded; j++) c[j] = 0;
    *sum = s;
    return scale;
}

/* sums[r] = sum_j (w[row r of the block] + 1) * c[j], for the 64 rows of one block. */
static void block_sums(const int8_t *c, const uint8_t *chunk, int64_t groups, int32_t *sums) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    /* Field t is masked in place, not shifted down: it multiplies as (w + 1) * 4^t (at most 128, still a byte),
     * and the exact sum is divided by 4^t at the end. 512-bit shifts and dot products share one port, so the
     * three shifts saved are three of seven cycles. |sum| <= in * 128 * 128 < 2^31 for in < 131072
     * (cpu_kernel.MAX_INPUTS). */
    const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0c), m2 = _mm512_set1_epi8(0x30),
                  m3 = _mm512_set1_epi8((char)0xc0);
    /* Two groups per step into two sets of accumulators: one set alone waits on the dot product's latency. */
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2, chunk += 2 * CHUNK) {
        int32_t four[2];
        memcpy(four, c + g * GROUP, 8);
        __m512i x = _mm512_set1_epi32(four[0]), y = _mm512_set1_epi32(four[1]);
        __m512i v = _mm512_loadu_si512(chunk), u = _mm512_loadu_si512(chunk + CHUNK);
        a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(v, m0), x);
        a1 = _mm512_dpbusd_epi32(a1, _mm512_and_si512(v, m1), x);
        a2 = _mm512_dpbusd_epi32(a2, _mm512_and_si512(v, m2), x);
        a3 = _mm512_dpbusd_epi32(a3, _mm512_and_si512(v, m3), x);
        b0 = _mm512_dpbusd_epi32(b0, _mm512_and_si512(u, m0), y);
        b1 = _mm512_dpbusd_epi32(b1, _mm512_and_si512(u, m1), y);
        b2 = _mm512_dpbusd_epi32(b2, _mm512_and_si512(u, m2), y);
        b3 = _mm512_dpbusd_epi32(b3, _mm512_and_si512(u, m3), y);
    }
    if (g < groups) {
        int32_t four;
        memcpy(&four, c + g * GROUP, 4);
        __m512i x = _mm512_set1_epi32(four);
        __m512i v = _mm512_loadu_si512(chunk);
        a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(v, m0), x);
        a1 = _mm512_dpbusd_epi32(a1, _mm512_and_si512(v, m1), x);
        a2 = _mm512_dpbusd_epi32(a2, _mm512_and_si512(v, m2), x);
        a3 = _mm512_dpbusd_epi32(a3, _mm512_and_si512(v, m3), x);
    }
    a0 = _mm512_add_epi32(a0, b0);
    a1 = _mm512_add_epi32(a1, b1);
    a2 = _mm512_add_epi32(a2, b2);
    a3 = _mm512_add_epi32(a3, b3);
    _mm512_storeu_si512(sums, a0);
    _mm512_storeu_si512(sums + 16, _mm512_srai_epi32(a1, 2));
    _mm512_storeu_si512(sums + 32, _mm512_srai_epi32(a2, 4));
    _mm512_storeu_si512(sums + 48, _mm512_srai_epi32(a3, 6));
#elif defined(__AVX2__)
    /* maddubs adds two (w + 1) * c products into int16 (at most 2 * 2 * 128: no saturation), madd adds the two
     * pairs of a row's 4 inputs into int32. The 64 bytes are two halves of 8 rows per 2-bit field. */
    const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i acc[8];
    for (int k = 0; k < 8; k++) acc[k] = _mm256_setzero_si256();
    for (int64_t g = 0; g < groups; g++, chunk += CHUNK) {
        int32_t four;
        memcpy(&four, c + g * GROUP, 4);
        __m256i x = _mm256_set1_epi32(four);
        for (int h = 0; h < 2; h++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(chunk + 32 * h));
            for (int t = 0; t < 4; t++) {
                __m256i w = _mm256_and_si256(_mm256_srli_epi16(v, 2 * t), mask);
                acc[2 * t + h] = _mm256_add_epi32(acc[2 * t + h], _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones));
            }
        }
    }
    for (int k = 0; k < 8; k++) _mm256_storeu_si256((__m256i *)(sums + 8 * k), acc[k]);
#else
    for (int r = 0; r < BLOCK_ROWS; r++) sums[r] = 0;
    for (int64_t g = 0; g < groups; g++, chunk += CHUNK)
        for (int k = 0; k < 16; k++)
            for (int i = 0; i < GROUP; i++)
                for (int t = 0; t < 4; t++)
                    sums[16 * t + k] += (int32_t)((chunk[GROUP * k + i] >> (2 * t)) & 3) * c[g * GROUP + i];
#endif
}

typedef struct {
    const int8_t *codes;     /* rows x padded inputs */
    const float *scale;      /* rows */
    const int32_t *code_sum; /* rows */
    const uint8_t *packed;
    float weight_scale;
    int64_t rows, groups, out, block_begin, block_end;
    void *y;  /* rows x out, float32 or (bf16) bfloat16 */
    int bf16; /* bfloat16: the scales' product rounded to bfloat16 (torch's product of two bfloat16 tensors),
               * the exact sum divided in float32, the result rounded once: the Triton kernel's arithmetic */
} job_t;

static void *run(void *arg) {
    const job_t *t = (const job_t *)arg;
    int32_t sums[BLOCK_ROWS];
    for (int64_t r = 0; r < t->rows; r++) {
        const int8_t *c = t->codes + r * t->groups * GROUP;
        float denom = t->weight_scale * t->scale[r];
        denom = in_dtype(denom, t->bf16);
        for (int64_t b = t->block_begin; b < t->block_end; b++) {
            block_sums(c, t->packed + b * t->groups * CHUNK, t->groups, sums);
            int64_t first = b * BLOCK_ROWS, last = first + BLOCK_ROWS < t->out ? first + BLOCK_ROWS : t->out;
            if (t->bf16) {
                uint16_t *y = (uint16_t *)t->y + r * t->out;
                for (int64_t o = first; o < last; o++)
                    y[o] = float_to_bf16((float)(sums[o - first] - t->code_sum[r]) / denom);
            } else {
                float *y = (float *)t->y + r * t->out;
                for (int64_t o = first; o < last; o++) y[o] = (float)(sums[o - first] - t->code_sum[r]) / denom;
            }
        }
    }
    return 0;
}

static int linear(const void *x, int bf16, int64_t rows, int64_t in, const uint8_t *packed, int64_t out,
                  float weight_scale, void *y, int64_t threads) {
    int64_t padded = round_up(in, GROUP), blocks = round_up(out, BLOCK_ROWS) / BLOCK_ROWS;
    if (rows <= 0 || out <= 0) return 0;
    /* codes, then per row: scale (float) and sum of codes (int32); padded divides by 4, so both are aligned */
    int8_t *codes = (int8_t *)aligned_alloc(64, (size_t)round_up(rows * (padded + 8), 64));
    if (!codes) return -1;
    float *scale = (float *)(codes + rows * padded);
    int32_t *code_sum = (int32_t *)(scale + rows);
    for (int64_t r = 0; r < rows; r++)
        scale[r] = quantize_row((const char *)x + r * in * (bf16 ? 2 : 4), bf16, codes + r * padded, in, padded,
                                &code_sum[r]);
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > blocks) threads = blocks;
    job_t jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int64_t per = (blocks + threads - 1) / threads;
    for (int64_t k = 0; k < threads; k++) {
        int64_t begin = k * per < blocks ? k * per : blocks, end = begin + per < blocks ? begin + per : blocks;
        job_t j = {codes, scale, code_sum, packed, weight_scale, rows, padded / GROUP, out, begin, end, y, bf16};
        jobs[k] = j;
    }
    int64_t started = 1;
    for (int64_t k = 1; k < threads; k++, started++)
        if (pthread_create(&ids[k], 0, run, &jobs[k]) != 0) break;
    run(&jobs[0]);
    for (int64_t k = started; k < threads; k++) run(&jobs[k]); /* threads that could not start: do their share */
    for (int64_t k = 1; k < started; k++) pthread_join(ids[k], 0);
    free(codes);
    return 0;
}

/* x: rows x in float32; packed: `ternary_pack` of the out x in weights; y: rows x out float32. Splits the
 * output blocks over `threads` threads (the caller decides when that pays). Returns 0, or -1 when out of memory. */
int ternary_linear(const float *x, int64_t rows, int64_t in, const uint8_t *packed, int64_t out, float weight_scale,
                   float *y, int64_t threads) {
    return linear(x, 0, rows, in, packed, out, weight_scale, y, threads);
}

/* The same for bfloat16 x and y (raw 16-bit words); `weight_scale` is the layer's bfloat16 scale, widened. */
int ternary_linear_bf16(const uint16_t *x, int64_t rows, int64_t in, const uint8_t *packed, int64_t out,
                        float weight_scale, uint16_t *y, int64_t threads) {
    return linear(x, 1, rows, in, packed, out, weight_scale, y, threads);
}
