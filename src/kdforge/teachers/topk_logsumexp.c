/* Streaming top-k log-probabilities, logsumexp and tail mass of rows of logits, a tile of columns at a time.
 *
 * kdforge's teacher cache needs, per token, the k largest logits with their ids, log(sum(exp(logits/T))) and the
 * log of the probability mass outside the top k. In eager torch that is a top-k search plus five or six passes over
 * the [rows, V] logits, after the lm head has written all of them to memory. Here the caller makes the logits a tile
 * of columns at a time (small enough to stay in the CPU's cache) and each tile is reduced into a per-row state:
 *
 *   - candidates: a tile's logits that may be in the top k. Its first 16·w logits (w = width / 16) form w strided
 *     groups {i, i + w, ..., i + 15w}; dealt into k sets, the smallest set maximum is a bar that at least k of the
 *     tile's logits reach, so a logit below it is not in the row's top k; nor is one below the k-th best kept so far.
 *     The rest go to a buffer of 4k entries per row; when it is full the k best are kept (the others move to the
 *     tail) and the row's bar rises to the k-th of them.
 *   - sums of 2^((x - max)·c), c = log2(e)/T, over all logits and over the tail (logits that are not candidates,
 *     and candidates dropped from the buffer), with a running maximum (sums rescaled when it rises). The tail is
 *     summed directly: no 1 - p cancellation. exp2 is a degree-6 polynomial on [-1/2, 1/2] (relative error < 2e-7;
 *     inputs below 2^-126 give 0) that the compiler vectorises.
 *
 * kdforge_topk_finish then keeps the k best candidates (rank order: larger logit first, then smaller id), moves the
 * others to the tail, and writes the outputs. A row whose tail sum is below 2^-90 of its total (its terms may have
 * underflowed) gets log_rest = NaN: the caller recomputes that row. Non-finite logits are not handled here either:
 * the caller checks the outputs and recomputes such rows in torch.
 *
 * Built and loaded by kdforge/teachers/native.py (ctypes; compiled once per machine with -O3 -march=native).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 16

typedef struct { float v; int64_t i; } entry;

static inline float exp2_poly(float y) {
    /* 2^y for y <= 0 (Taylor coefficients (ln 2)^n / n! on y - rint(y)); 0 below -126 */
    float n = rintf(y);
    float f = y - n;
    float p = 1.5403530393381606e-4f;
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

/* rank order: larger value first; among equal values the smaller id first */
static inline int before(entry a, entry b) { return a.v > b.v || (a.v == b.v && a.i < b.i); }

/* Reorder h[0..n) so that h[0..k) hold its k first entries in rank order (in no particular order). */
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

/* Keep the k first of buf[0..n) in buf[0..k); the others' 2^((v - mx) c) go to *tail. Returns the k-th value. */
static float compact(entry *buf, int64_t n, int64_t k, float mx, float c, double *tail) {
    select_top(buf, n, k);
    for (int64_t t = k; t < n; ++t) *tail += exp2_poly((buf[t].v - mx) * c);
    float kth = buf[0].v;
    for (int64_t t = 1; t < k; ++t) kth = buf[t].v < kth ? buf[t].v : kth;
    return kth;
}

/* Reduce a tile x [rows, width] (row stride `stride`; its columns are the row's columns col0 .. col0 + width) into
 * the rows' state: mx, total, tail [rows]; bar [rows] (a logit must beat it; -inf at the start); count [rows]
 * (entries in the row's buffer); buf [rows, 4k]. `group_max`: scratch of width / 16 floats. */
void kdforge_topk_update(const float *x, int64_t rows, int64_t width, int64_t stride, int64_t col0, int64_t k,
                         float temperature, float *mx, double *total, double *tail, float *bar, int64_t *count,
                         entry *buf, float *group_max) {
    const float c = (float)(1.4426950408889634 / temperature);
    const int64_t w = width / GROUP;
    for (int64_t row = 0; row < rows; ++row) {
        const float *xr = x + row * stride;
        entry *rb = buf + row * 4 * k;
        /* the tile's group maxima, its bar and its maximum */
        float tile_max = -INFINITY;
        for (int64_t i = 0; i < w; ++i) group_max[i] = xr[i];
        for (int64_t r = 1; r < GROUP; ++r) {
            const float *xs = xr + r * w;
#pragma omp simd
            for (int64_t i = 0; i < w; ++i) group_max[i] = xs[i] > group_max[i] ? xs[i] : group_max[i];
        }
        float tile_bar = -INFINITY;  /* fewer groups than k: every logit of the tile may be in the top k */
        if (w >= k) {
            float set_max[k];
            for (int64_t g = 0; g < k; ++g) set_max[g] = group_max[g];
            for (int64_t g0 = k; g0 + k <= w; g0 += k) {
#pragma omp simd
                for (int64_t g = 0; g < k; ++g)
                    set_max[g] = group_max[g0 + g] > set_max[g] ? group_max[g0 + g] : set_max[g];
            }
            tile_bar = INFINITY;
            for (int64_t g = 0; g < k; ++g) tile_bar = set_max[g] < tile_bar ? set_max[g] : tile_bar;
        }
#pragma omp simd reduction(max : tile_max)
        for (int64_t i = 0; i < w; ++i) tile_max = group_max[i] > tile_max ? group_max[i] : tile_max;
        for (int64_t j = GROUP * w; j < width; ++j) tile_max = xr[j] > tile_max ? xr[j] : tile_max;

        /* the running maximum; sums so far rescaled to it */
        float m = mx[row];
        if (tile_max > m) {
            if (m > -INFINITY) {
                const double r = exp2((double)(m - tile_max) * c);
                total[row] *= r;
                tail[row] *= r;
            }
            m = mx[row] = tile_max;
        }
        /* a candidate reaches the tile's bar and beats the row's (which applies once k are kept): one threshold,
         * fixed for this tile */
        float thr = tile_bar;
        if (count[row] >= k) {
            const float beat = nextafterf(bar[row], INFINITY);
            thr = beat > thr ? beat : thr;
        }

        float s_all = 0.0f, s_tail = 0.0f;
        double t_all = 0.0, t_tail = 0.0;
        for (int64_t b0 = 0; b0 < width; b0 += 1024) {
            const int64_t b1 = b0 + 1024 < width ? b0 + 1024 : width;
            s_all = 0.0f, s_tail = 0.0f;
#pragma omp simd reduction(+ : s_all, s_tail)
            for (int64_t t = b0; t < b1; ++t) {
                const float v = xr[t];
                const float e = exp2_poly((v - m) * c);
                s_all += e;
                s_tail += v >= thr ? 0.0f : e;
            }
            t_all += s_all;
            t_tail += s_tail;
        }
        /* the candidates: in the groups whose maximum passes, and the last width - 16w logits */
        int64_t n = count[row];
        float row_bar = bar[row];
#define CONSIDER(col)                                                                    \
        do {                                                                             \
            const float v = xr[col];                                                     \
            if (v >= thr) {                                                               \
                rb[n].v = v;                                                             \
                rb[n].i = col0 + (col);                                                  \
                if (++n == 4 * k) { row_bar = compact(rb, n, k, m, c, &t_tail); n = k; } \
            }                                                                            \
        } while (0)
        for (int64_t i = 0; i < w; ++i) {
            if (!(group_max[i] >= thr)) continue;
            for (int64_t r = 0; r < GROUP; ++r) CONSIDER(r * w + i);
        }
        for (int64_t j = GROUP * w; j < width; ++j) CONSIDER(j);
#undef CONSIDER
        if (n > k && row_bar == -INFINITY) { row_bar = compact(rb, n, k, m, c, &t_tail); n = k; }  /* raise the bar */
        count[row] = n;
        bar[row] = row_bar;
        total[row] += t_all;
        tail[row] += t_tail;
    }
}

/* The outputs from the rows' state (see kdforge_topk_update): log_p [rows, k] (rank order), ids [rows, k], lse
 * [rows], log_rest [rows] (NaN where the tail may have underflowed). Requires count >= k for every row. */
void kdforge_topk_finish(int64_t rows, int64_t k, float temperature, const float *mx, const double *total,
                         const double *tail, const int64_t *count, entry *buf, float *log_p, int64_t *ids,
                         float *lse, float *log_rest) {
    const float c = (float)(1.4426950408889634 / temperature);
    for (int64_t row = 0; row < rows; ++row) {
        entry *rb = buf + row * 4 * k;
        double row_tail = tail[row];
        compact(rb, count[row], k, mx[row], c, &row_tail);
        qsort(rb, (size_t)k, sizeof(entry), by_rank);
        const double log_total = log(total[row]);
        const double row_lse = (double)mx[row] / temperature + log_total;
        lse[row] = (float)row_lse;
        log_rest[row] = row_tail < 0x1p-90 * total[row] ? NAN : (float)(log(row_tail) - log_total);
        for (int64_t t = 0; t < k; ++t) {
            log_p[row * k + t] = (float)((double)rb[t].v / temperature - row_lse);
            ids[row * k + t] = rb[t].i;
        }
    }
}
