/* Top-k log-probabilities, logsumexp and the log of the tail mass of rows of logits, in two passes over each row.
 *
 * kdforge's teacher cache needs, per token, the k largest logits with their ids, log(sum(exp(logits/T))) and the
 * log of the probability mass outside the top k. In eager torch that is a top-k search plus five or six full passes
 * over the [rows, V] logits; this kernel reads each row twice:
 *   pass 1: blocks of 16 logits; a block whose maximum beats the current k-th best is scanned into a min-buf of
 *           size k (for V >> k most blocks are skipped after the first few thousand logits). Gives the row maximum.
 *   pass 2: sum of 2^((x - max)·c), c = log2(e)/T, over all logits and over those below the k-th best (the tail,
 *           summed directly: no 1 - p cancellation), with a vectorisable exp2 (degree-6 polynomial on [-1/2, 1/2],
 *           relative error < 2e-7; inputs below 2^-126 give 0).
 * A row whose tail sum is below 2^-90 in pass 2 (its terms may have underflowed) gets a third pass shifted by the
 * tail's own maximum, so the stored log tail mass stays exact.
 *
 * Built and loaded by kdforge/teachers/native.py (ctypes; compiled once per machine with -O3 -march=native).
 * Non-finite logits are not handled here: the caller checks the outputs and recomputes such rows in torch.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 16

static inline float exp2_poly(float y) {
    /* 2^y for y <= 0; 0 below -126. */
    float n = rintf(y);
    float f = y - n;
    float p = 1.5403530393381606e-4f;   /* (ln 2)^6 / 6! ... Taylor coefficients of 2^f */
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910071e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.0f;
    int32_t e = (int32_t)n + 127;
    e = e < 1 ? 1 : e;
    int32_t bits = e << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y < -126.0f ? 0.0f : p * scale;
}

typedef struct { float v; int64_t i; } entry;

/* rank order: larger value first; among equal values the smaller id first */
static inline int before(entry a, entry b) { return a.v > b.v || (a.v == b.v && a.i < b.i); }

/* Reorder h[0..n) so that h[0..k) are its k first entries in rank order (in no particular order among themselves). */
static void select_top(entry *h, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        entry pivot = h[lo + (hi - lo) / 2];
        int64_t a = lo, b = hi;
        while (a <= b) {
            while (before(h[a], pivot)) ++a;
            while (before(pivot, h[b])) --b;
            if (a <= b) { entry t = h[a]; h[a] = h[b]; h[b] = t; ++a; --b; }
        }
        if (k - 1 <= b) hi = b;
        else if (k - 1 >= a) lo = a;
        else return;
    }
}

static int by_rank(const void *pa, const void *pb) {
    const entry *a = pa, *b = pb;
    return before(*a, *b) ? -1 : before(*b, *a);
}

/* Keep the k first of buf[0..n) in buf[0..k); returns the k-th value (the bar a later logit must beat). */
static float compact(entry *buf, int64_t n, int64_t k) {
    select_top(buf, n, k);
    float kth = buf[0].v;
    for (int64_t t = 1; t < k; ++t) kth = buf[t].v < kth ? buf[t].v : kth;
    return kth;
}

/* x: rows x vocab float32 (row stride `stride`); outputs: log_p [rows, k] (rank order), ids [rows, k], lse [rows],
 * log_rest [rows]; scratch: `buf` of 4k entries, `group_max` of vocab / 16 floats. temperature > 0, 1 <= k <= vocab. */
void kdforge_topk_logsumexp(const float *x, int64_t rows, int64_t vocab, int64_t stride, int64_t k,
                            float temperature, float *log_p, int64_t *ids, float *lse, float *log_rest,
                            entry *buf, float *group_max) {
    const float c = (float)(1.4426950408889634 / temperature);
    for (int64_t row = 0; row < rows; ++row) {
        const float *xr = x + row * stride;
        /* pass 1: top k. The row's first 16·w logits (w = vocab / 16) form w strided groups {i, i + w, ...,
         * i + 15w}; their maxima come from vertical maxima over 16 rows of w (vectorised). Dealt into k sets
         * {g, g + k, ...}, the smallest set maximum is a bar that at least k logits reach (one per set), so every
         * top-k logit is >= bar. Only the groups whose maximum reaches the bar, and the last vocab - 16w logits,
         * are then scanned; logits >= bar go to buf (4k entries; when it is full the k best are kept and the bar
         * rises to the k-th of them, which later logits must beat). */
        const int64_t w = vocab / BLOCK;
        for (int64_t i = 0; i < w; ++i) group_max[i] = xr[i];
        for (int64_t r = 1; r < BLOCK; ++r) {
            const float *xs = xr + r * w;
#pragma omp simd
            for (int64_t i = 0; i < w; ++i) group_max[i] = xs[i] > group_max[i] ? xs[i] : group_max[i];
        }
        float bar = -INFINITY;  /* fewer groups than k: every logit is a candidate */
        if (w >= k) {
            float set_max[k];
            for (int64_t g = 0; g < k; ++g) set_max[g] = group_max[g];
            for (int64_t g0 = k; g0 + k <= w; g0 += k) {
#pragma omp simd
                for (int64_t g = 0; g < k; ++g) set_max[g] = group_max[g0 + g] > set_max[g] ? group_max[g0 + g] : set_max[g];
            }
            bar = INFINITY;
            for (int64_t g = 0; g < k; ++g) bar = set_max[g] < bar ? set_max[g] : bar;
        }
        int64_t n = 0;
        int strict = 0;  /* after a compaction a logit must beat the bar */
#define CONSIDER(col)                                                          \
        do {                                                                   \
            const float v = xr[col];                                           \
            if (strict ? v > bar : v >= bar) {                                 \
                buf[n].v = v;                                                  \
                buf[n].i = (col);                                              \
                if (++n == 4 * k) { bar = compact(buf, n, k); n = k; strict = 1; } \
            }                                                                  \
        } while (0)
        for (int64_t i = 0; i < w; ++i) {
            if (strict ? !(group_max[i] > bar) : !(group_max[i] >= bar)) continue;
            for (int64_t r = 0; r < BLOCK; ++r) CONSIDER(r * w + i);
        }
        for (int64_t j = BLOCK * w; j < vocab; ++j) CONSIDER(j);
#undef CONSIDER
        const float kth = compact(buf, n, k);
        int64_t kth_in_top = 0;  /* logits equal to the k-th best that are in the top k */
        for (int64_t t = 0; t < k; ++t) kth_in_top += buf[t].v == kth;
        qsort(buf, (size_t)k, sizeof(entry), by_rank);
        const float mx = buf[0].v;

        /* pass 2: sums of 2^((x - mx) c), all and below the k-th best; ties with the k-th */
        double total = 0.0, tail = 0.0;
        int64_t kth_count = 0;
        for (int64_t b0 = 0; b0 < vocab; b0 += 1024) {
            const int64_t b1 = b0 + 1024 < vocab ? b0 + 1024 : vocab;
            float s_all = 0.0f, s_tail = 0.0f;
            int32_t n_eq = 0;
#pragma omp simd reduction(+ : s_all, s_tail, n_eq)
            for (int64_t t = b0; t < b1; ++t) {
                const float v = xr[t];
                const float e = exp2_poly((v - mx) * c);
                s_all += e;
                s_tail += v < kth ? e : 0.0f;
                n_eq += v == kth;
            }
            total += s_all;
            tail += s_tail;
            kth_count += n_eq;
        }
        const int64_t kth_outside = kth_count - kth_in_top;
        tail += (double)kth_outside * exp2_poly((kth - mx) * c);
        double log_tail = tail > 0.0 ? log(tail) : -INFINITY;
        if (tail < 0x1p-90) {
            /* pass 3: the tail's terms may have underflowed against the maximum; sum them against their own */
            float tail_max = -INFINITY;
            for (int64_t t = 0; t < vocab; ++t) tail_max = xr[t] < kth && xr[t] > tail_max ? xr[t] : tail_max;
            if (kth_outside > 0) tail_max = kth;
            if (tail_max > -INFINITY) {
                double s = (double)kth_outside * exp2_poly((kth - tail_max) * c);
                for (int64_t b0 = 0; b0 < vocab; b0 += 1024) {
                    const int64_t b1 = b0 + 1024 < vocab ? b0 + 1024 : vocab;
                    float s_blk = 0.0f;
#pragma omp simd reduction(+ : s_blk)
                    for (int64_t t = b0; t < b1; ++t)
                        s_blk += xr[t] < kth ? exp2_poly((xr[t] - tail_max) * c) : 0.0f;
                    s += s_blk;
                }
                log_tail = log(s) + (double)(tail_max - mx) * (double)c * 0.6931471805599453;
            }
        }
        const double log_total = log(total);
        const double row_lse = (double)mx / temperature + log_total;
        lse[row] = (float)row_lse;
        log_rest[row] = (float)(log_tail - log_total);
        for (int64_t t = 0; t < k; ++t) {
            log_p[row * k + t] = (float)((double)buf[t].v / temperature - row_lse);
            ids[row * k + t] = buf[t].i;
        }
    }
}
