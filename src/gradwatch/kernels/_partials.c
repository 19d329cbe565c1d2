/* Fused per-tensor gradient partials for gradwatch (CPU, plain C, loaded with ctypes).
 *
 * Output row per tensor (see gradwatch/kernels/contract.py): GW_N_PARTIALS float64 columns,
 * sumsq, sumabs, maxabs(non-NaN), n_nan, n_inf, n_zero at the indices GW_SUMSQ ... GW_ZERO.
 * Those indices and the dtype codes GW_F32 ... are not restated here: cpu_native.py passes
 * them from the contract as -D flags (contract.c_defines), which also key the build cache.
 *
 * Every element is read from memory once.  Sums are accumulated in float64 in LANES independent
 * lanes so that the compiler vectorises without -ffast-math (which would break NaN/inf
 * semantics).  NaN/inf are not tested per element: a block whose float64 sum of squares is
 * finite holds no NaN and no inf (NaN -> NaN, +-inf -> +inf, squares are never negative), so
 * only a block with a non-finite sum is rescanned to count NaN/inf exactly.  fp64 squares can
 * overflow for finite values; such a block is rescanned too and counted exactly (slow path).
 *
 * fp16/bf16 are widened block-wise into an L1-resident float buffer (hardware conversion where
 * available) and then reduced by the same float code as fp32: the widening loops vectorise
 * well, whereas mixing 16-bit loads into the reduction loop made gcc fall back to narrow
 * vectors or scalar conversions.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && (defined(__F16C__) || defined(__AVX512F__))
#include <immintrin.h>
#endif

#define GW_ABI_VERSION 1

#if !defined(GW_SUMSQ) || !defined(GW_SUMABS) || !defined(GW_MAXABS) || !defined(GW_NAN) || \
    !defined(GW_INF) || !defined(GW_ZERO) || !defined(GW_N_PARTIALS)
#error "build with the contract's column defines (gradwatch.kernels.contract.c_defines)"
#endif
#if !defined(GW_F32) || !defined(GW_F16) || !defined(GW_BF16) || !defined(GW_F64) || \
    !defined(GW_N_DTYPES)
#error "build with the contract's dtype codes (gradwatch.kernels.contract.c_defines)"
#endif

/* 16 float64 lanes per sum = 2 AVX-512 / 4 AVX2 / 8 NEON registers: enough independent
 * dependency chains to hide add/FMA latency. */
#define LANES 16
/* Elements per finiteness check and per fp16/bf16 staging buffer (8 KiB of floats, in L1). */
#define BLOCK 2048
/* Software prefetch distance: without it a single thread reached only ~half of the memory
 * bandwidth of torch.sum on large tensors (measured); 4 KiB ahead recovers it. */
#define PREFETCH_BYTES 4096
/* Thread split points are rounded down to this many elements (cache-line aligned chunks). */
#define SPLIT_ALIGN 64

typedef struct {
    double sumsq, sumabs, maxabs;
    uint64_t nan, inf, zero;
} gw_stats;

static void stats_merge(gw_stats *a, const gw_stats *b) {
    a->sumsq += b->sumsq;
    a->sumabs += b->sumabs;
    if (b->maxabs > a->maxabs) a->maxabs = b->maxabs;
    a->nan += b->nan;
    a->inf += b->inf;
    a->zero += b->zero;
}

static void stats_store(double *row, const gw_stats *s) {
    row[GW_SUMSQ] = s->sumsq;
    row[GW_SUMABS] = s->sumabs;
    row[GW_MAXABS] = s->maxabs;
    row[GW_NAN] = (double)s->nan; /* exact below 2**53 elements */
    row[GW_INF] = (double)s->inf;
    row[GW_ZERO] = (double)s->zero;
}

/* ---- 16-bit inputs: widen into a float buffer, then reduce as fp32 -------------------------- */

/* Portable, branch-free (vectorisable) IEEE half -> float.  Exact for normals, subnormals, +-0,
 * +-inf and NaN: the 15 magnitude bits shifted into float position and multiplied by 2**112
 * rebias the exponent (and normalise subnormals) exactly; inf/NaN get the all-ones exponent. */
static inline float f16_to_f32_portable(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t mag = h & 0x7fffu;
    uint32_t u = mag << 13;
    float f;
    memcpy(&f, &u, sizeof f);
    f *= 0x1p112f;
    uint32_t r;
    memcpy(&r, &f, sizeof r);
    if (mag >= 0x7c00u) r = u | 0x7f800000u;
    r |= sign;
    memcpy(&f, &r, sizeof f);
    return f;
}

#if defined(GW_PORTABLE_FP16)
#define GW_FP16_PATH 0
#elif defined(__x86_64__) && defined(__AVX512F__)
#define GW_FP16_PATH 2 /* vcvtph2ps zmm */
#elif defined(__x86_64__) && defined(__F16C__)
#define GW_FP16_PATH 1 /* vcvtph2ps ymm */
#elif defined(__aarch64__)
#define GW_FP16_PATH 3 /* __fp16 -> float, fcvtl */
#else
#define GW_FP16_PATH 0
#endif

static void widen_f16(const uint16_t *restrict src, float *restrict dst, int64_t n) {
    int64_t i = 0;
#if GW_FP16_PATH == 2
    for (; i + 32 <= n; i += 32) {
        __builtin_prefetch((const char *)(src + i) + PREFETCH_BYTES);
        for (int j = 0; j < 32; j += 16) {
            __m256i h = _mm256_loadu_si256((const __m256i *)(src + i + j));
            _mm512_storeu_ps(dst + i + j, _mm512_cvtph_ps(h));
        }
    }
#elif GW_FP16_PATH == 1
    for (; i + 32 <= n; i += 32) {
        __builtin_prefetch((const char *)(src + i) + PREFETCH_BYTES);
        for (int j = 0; j < 32; j += 8) {
            __m128i h = _mm_loadu_si128((const __m128i *)(src + i + j));
            _mm256_storeu_ps(dst + i + j, _mm256_cvtph_ps(h));
        }
    }
#elif GW_FP16_PATH == 3
    const __fp16 *h = (const __fp16 *)src;
    for (; i < n; i++) dst[i] = (float)h[i];
#else
    for (; i + 32 <= n; i += 32) {
        __builtin_prefetch((const char *)(src + i) + PREFETCH_BYTES);
        for (int j = 0; j < 32; j++) dst[i + j] = f16_to_f32_portable(src[i + j]);
    }
#endif
    for (; i < n; i++) dst[i] = f16_to_f32_portable(src[i]);
}

static void widen_bf16(const uint16_t *restrict src, float *restrict dst, int64_t n) {
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __builtin_prefetch((const char *)(src + i) + PREFETCH_BYTES);
        for (int j = 0; j < 32; j++) { /* bf16 is the top half of a float */
            uint32_t u = (uint32_t)src[i + j] << 16;
            memcpy(dst + i + j, &u, sizeof u);
        }
    }
    for (; i < n; i++) {
        uint32_t u = (uint32_t)src[i] << 16;
        memcpy(dst + i, &u, sizeof u);
    }
}

/* ---- the reduction ---------------------------------------------------------------------------
 * ST: storage type; VT: value type (float, or double for fp64); WIDEN: 0 to read ST == VT in
 * place, else a function widening ST into a VT block buffer.  All accumulators are local arrays
 * of one function (when they lived in a struct behind a pointer gcc spilled them to the stack
 * every iteration).  The abs-max uses `a > m ? a : m`, which skips NaN (the comparison is false)
 * and is one max instruction on x86 (maxps returns the second operand on unordered). */
#define DEFINE_KERNEL(NAME, ST, VT, FABS, WIDEN)                                              \
    static void NAME(const ST *src, int64_t n, gw_stats *out) {                               \
        double sq[LANES], ab[LANES];                                                          \
        uint64_t zc[LANES];                                                                   \
        VT mx[LANES];                                                                         \
        for (int j = 0; j < LANES; j++) {                                                     \
            sq[j] = 0;                                                                        \
            ab[j] = 0;                                                                        \
            zc[j] = 0;                                                                        \
            mx[j] = 0;                                                                        \
        }                                                                                     \
        uint64_t nan = 0, inf = 0;                                                            \
        VT buf[WIDEN ? BLOCK : 1] __attribute__((aligned(64)));                               \
        for (int64_t base = 0; base < n; base += BLOCK) {                                     \
            const int64_t len = (n - base > BLOCK) ? BLOCK : n - base;                        \
            const VT *restrict x;                                                             \
            if (WIDEN) {                                                                      \
                WIDEN##_fn(src + base, buf, len);                                             \
                x = buf;                                                                      \
            } else {                                                                          \
                x = (const VT *)(src + base);                                                 \
            }                                                                                 \
            const int64_t nvec = len - len % LANES;                                           \
            double bsq[LANES], bab[LANES];                                                    \
            uint32_t bz[LANES];                                                               \
            for (int j = 0; j < LANES; j++) {                                                 \
                bsq[j] = 0;                                                                   \
                bab[j] = 0;                                                                   \
                bz[j] = 0;                                                                    \
            }                                                                                 \
            for (int64_t i = 0; i < nvec; i += LANES) {                                       \
                if (!WIDEN) {                                                                 \
                    for (int k = 0; k < (int)(LANES * sizeof(VT)); k += 64)                   \
                        __builtin_prefetch((const char *)(x + i) + PREFETCH_BYTES + k);       \
                }                                                                             \
                for (int j = 0; j < LANES; j++) {                                             \
                    VT a = FABS(x[i + j]);                                                    \
                    double d = (double)a;                                                     \
                    bsq[j] += d * d;                                                          \
                    bab[j] += d;                                                              \
                    mx[j] = a > mx[j] ? a : mx[j];                                            \
                    bz[j] += (a == 0) ? 1u : 0u;                                              \
                }                                                                             \
            }                                                                                 \
            for (int64_t i = nvec; i < len; i++) { /* < LANES leftovers, at the very end */   \
                VT a = FABS(x[i]);                                                            \
                double d = (double)a;                                                         \
                bsq[0] += d * d;                                                              \
                bab[0] += d;                                                                  \
                mx[0] = a > mx[0] ? a : mx[0];                                                \
                bz[0] += (a == 0) ? 1u : 0u;                                                  \
            }                                                                                 \
            double chk = 0;                                                                   \
            for (int j = 0; j < LANES; j++) chk += bsq[j];                                    \
            if (!isfinite(chk)) { /* rare: count NaN/inf of this block exactly */             \
                uint64_t cn = 0, ci = 0;                                                      \
                for (int64_t i = 0; i < len; i++) {                                           \
                    cn += isnan(x[i]) ? 1u : 0u;                                              \
                    ci += isinf(x[i]) ? 1u : 0u;                                              \
                }                                                                             \
                nan += cn;                                                                    \
                inf += ci;                                                                    \
            }                                                                                 \
            for (int j = 0; j < LANES; j++) {                                                 \
                sq[j] += bsq[j];                                                              \
                ab[j] += bab[j];                                                              \
                zc[j] += bz[j];                                                               \
            }                                                                                 \
        }                                                                                     \
        /* pairwise lane combine: deterministic, a little more accurate than sequential */    \
        for (int w = LANES / 2; w > 0; w /= 2) {                                              \
            for (int j = 0; j < w; j++) {                                                     \
                sq[j] += sq[j + w];                                                           \
                ab[j] += ab[j + w];                                                           \
            }                                                                                 \
        }                                                                                     \
        VT m = 0;                                                                             \
        uint64_t z = 0;                                                                       \
        for (int j = 0; j < LANES; j++) {                                                     \
            m = mx[j] > m ? mx[j] : m;                                                        \
            z += zc[j];                                                                       \
        }                                                                                     \
        out->sumsq = sq[0];                                                                   \
        out->sumabs = ab[0];                                                                  \
        out->maxabs = (double)m;                                                              \
        out->nan = nan;                                                                       \
        out->inf = inf;                                                                       \
        out->zero = z;                                                                        \
    }

#define NOWIDEN 0
#define NOWIDEN_fn(s, d, n) ((void)0)
#define WF16 1
#define WF16_fn widen_f16
#define WBF16 1
#define WBF16_fn widen_bf16
DEFINE_KERNEL(reduce_f32, float, float, fabsf, NOWIDEN)
DEFINE_KERNEL(reduce_f64, double, double, fabs, NOWIDEN)
DEFINE_KERNEL(reduce_f16, uint16_t, float, fabsf, WF16)
DEFINE_KERNEL(reduce_bf16, uint16_t, float, fabsf, WBF16)

static int elem_size(int8_t dt) { return dt == GW_F64 ? 8 : dt == GW_F32 ? 4 : 2; }

/* Reduce elements [begin, end) of one tensor. */
static void reduce_range(uint64_t ptr, int8_t dt, int64_t begin, int64_t end, gw_stats *s) {
    const int64_t n = end - begin;
    if (n <= 0) {
        memset(s, 0, sizeof *s);
        return;
    }
    const char *p = (const char *)(uintptr_t)ptr + begin * elem_size(dt);
    switch (dt) {
        case GW_F32: reduce_f32((const float *)p, n, s); break;
        case GW_F16: reduce_f16((const uint16_t *)p, n, s); break;
        case GW_BF16: reduce_bf16((const uint16_t *)p, n, s); break;
        default: reduce_f64((const double *)p, n, s); break;
    }
}

/* ---- threading ------------------------------------------------------------------------------
 * One thread's share is a contiguous range of the concatenated element space, from tensor t0
 * offset o0 (inclusive) to tensor t1 offset o1 (exclusive).  Tensors it covers whole are written
 * straight to `out` (no other thread touches them); the at most two tensors it covers only in
 * part go to `part` and are merged by the caller after the join.  Threads are created per call,
 * only above a size threshold (a create + join measured 30-40 us in a VM): no persistent pool,
 * so nothing to go wrong across fork() or at exit.
 *
 * Built with -fopenmp -DGW_OPENMP (only when torch's own libgomp.so.1 is loaded, see
 * cpu_native.py) the shares run on an OpenMP team instead: the same thread pool as torch's
 * intra-op threads.  Right after backward those threads still spin-wait for work (libgomp's
 * default), so a pthread of ours would share a core with a spinning one: measured on 2 vCPUs in a
 * training step, the pthread split took 1.6-2x the time of torch.sum over the same gradients,
 * the OpenMP one ~1x (the spinning thread takes the work at once). */
typedef struct gw_work {
    struct gw_work *all; /* work[0 .. nt) */
    int64_t nt;
    const uint64_t *ptrs;
    const int64_t *counts;
    const int8_t *dtypes;
    double *out;
    int64_t t0, o0, t1, o1;
    int n_part;
    int64_t part_idx[2];
    gw_stats part[2];
} gw_work;

static void run_work(gw_work *w) {
    w->n_part = 0;
    const int64_t last = w->o1 > 0 ? w->t1 : w->t1 - 1;
    for (int64_t t = w->t0; t <= last; t++) {
        const int64_t b = (t == w->t0) ? w->o0 : 0;
        const int64_t e = (t == w->t1) ? w->o1 : w->counts[t];
        gw_stats s;
        reduce_range(w->ptrs[t], w->dtypes[t], b, e, &s);
        if (b == 0 && e == w->counts[t]) {
            stats_store(w->out + GW_N_PARTIALS * t, &s);
        } else {
            w->part_idx[w->n_part] = t;
            w->part[w->n_part] = s;
            w->n_part++;
        }
    }
}

/* Threads start in a binary tree (thread k starts 2k+1 and 2k+2) so that with many cores the
 * last one starts after ~log2(nt) thread creations instead of nt - 1 sequential ones. */
static void *run_tree(void *arg) {
    gw_work *w = (gw_work *)arg;
    const int64_t k = w - w->all;
    pthread_t tid[2];
    int started[2] = {0, 0};
    for (int c = 0; c < 2; c++) {
        const int64_t child = 2 * k + 1 + c;
        if (child < w->nt)
            started[c] = pthread_create(&tid[c], NULL, run_tree, &w->all[child]) == 0;
    }
    run_work(w);
    for (int c = 0; c < 2; c++) {
        const int64_t child = 2 * k + 1 + c;
        if (started[c])
            pthread_join(tid[c], NULL);
        else if (child < w->nt)
            run_tree(&w->all[child]); /* could not start a thread: do that subtree here */
    }
    return NULL;
}

#define GW_MAX_THREADS 128 /* work[] lives on the caller's stack */

int gw_abi_version(void) { return GW_ABI_VERSION; }

/* 1 when the shares run on an OpenMP team (torch's pool), 0 with per-call pthreads. */
#ifdef GW_OPENMP
int gw_openmp(void) { return 1; }
#else
int gw_openmp(void) { return 0; }
#endif

/* Which fp16 conversion the build uses (0 portable, 1 F16C, 2 AVX-512, 3 AArch64). */
int gw_fp16_path(void) { return GW_FP16_PATH; }

/* Test hook: the portable fp16 converter on n values (the kernel may use a hardware one). */
void gw_f16_to_f32_portable(const uint16_t *src, float *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = f16_to_f32_portable(src[i]);
}

/* Partials of n tensors into out[n * GW_N_PARTIALS].  ptrs: address of each tensor's first
 * element; counts: element counts; dtypes: GW_* codes.  The work is split over up to `nthreads` threads (the
 * caller being one of them), keeping at least `min_per_thread` elements per thread.  Returns the
 * number of threads used, or -1 on a bad dtype code (nothing written). */
int gw_partials(int64_t n, const uint64_t *ptrs, const int64_t *counts, const int8_t *dtypes,
                double *out, int nthreads, int64_t min_per_thread) {
    int64_t total = 0;
    for (int64_t t = 0; t < n; t++) {
        if (dtypes[t] < 0 || dtypes[t] >= GW_N_DTYPES) return -1;
        total += counts[t];
    }
    if (min_per_thread < 1) min_per_thread = 1;
    int64_t nt = nthreads;
    if (nt > GW_MAX_THREADS) nt = GW_MAX_THREADS;
    if (nt > total / min_per_thread) nt = total / min_per_thread;
    if (nt <= 1) {
        for (int64_t t = 0; t < n; t++) {
            gw_stats s;
            reduce_range(ptrs[t], dtypes[t], 0, counts[t], &s);
            stats_store(out + GW_N_PARTIALS * t, &s);
        }
        return 1;
    }

    gw_work work[GW_MAX_THREADS];
    /* Boundaries k * total / nt of the concatenated element space as (tensor, offset), the
     * offset rounded down to SPLIT_ALIGN; the last boundary is (n, 0). */
    int64_t bt[GW_MAX_THREADS + 1], bo[GW_MAX_THREADS + 1];
    bt[0] = 0;
    bo[0] = 0;
    int64_t t = 0, cum = 0; /* cum: number of elements before tensor t */
    for (int64_t k = 1; k < nt; k++) {
        const int64_t g = (total / nt) * k + (total % nt) * k / nt; /* no overflow */
        while (t < n && cum + counts[t] <= g) cum += counts[t++];
        int64_t off = g - cum;
        off -= off % SPLIT_ALIGN;
        bt[k] = t;
        bo[k] = off;
    }
    bt[nt] = n;
    bo[nt] = 0;
    for (int64_t k = 0; k < nt; k++) {
        gw_work *w = &work[k];
        w->all = work;
        w->nt = nt;
        w->ptrs = ptrs;
        w->counts = counts;
        w->dtypes = dtypes;
        w->out = out;
        w->t0 = bt[k];
        w->o0 = bo[k];
        w->t1 = bt[k + 1];
        w->o1 = bo[k + 1];
    }

#ifdef GW_OPENMP
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int64_t k = 0; k < nt; k++) run_work(&work[k]);
#else
    run_tree(&work[0]);
#endif

    /* Merge the partly covered tensors; their pieces come in increasing tensor order. */
    int64_t cur = -1;
    gw_stats acc;
    memset(&acc, 0, sizeof acc);
    for (int64_t k = 0; k < nt; k++) {
        for (int i = 0; i < work[k].n_part; i++) {
            const int64_t idx = work[k].part_idx[i];
            if (idx != cur) {
                if (cur >= 0) stats_store(out + GW_N_PARTIALS * cur, &acc);
                cur = idx;
                acc = work[k].part[i];
            } else {
                stats_merge(&acc, &work[k].part[i]);
            }
        }
    }
    if (cur >= 0) stats_store(out + GW_N_PARTIALS * cur, &acc);
    return (int)nt;
}
