/*
 * kernels.c - the portable half of kernels.h: int8 quantization, the scalar kernel set, and
 * the run-time choice of a set (the SIMD sets are in kernels_avx2.c and kernels_avx512.c).
 *
 * Float sums: each dot product keeps 8 partial sums (lane k takes the terms j = k mod 8),
 * reduces them in one fixed order (hsum8), then adds the n mod 8 leftover terms in order.
 * The avx2 set uses the same lane structure (it also lets the compiler vectorize this one on
 * any target without reassociating anything), so the two differ only by FMA rounding.
 */
#include "kernels.h"

#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__x86_64__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* ======================================================================== quantization */

void ac_quantize_q8(int8_t *q, float *s, const float *x, int n, int gs) {
    for (int g = 0; g < n / gs; g++) {
        const float *xg = x + (size_t)g * gs;
        int8_t *qg = q + (size_t)g * gs;
        float amax = 0.0f;
        for (int j = 0; j < gs; j++) {
            float a = fabsf(xg[j]);
            if (a > amax) amax = a;
        }
        float scale = amax / 127.0f;
        s[g] = scale;
        for (int j = 0; j < gs; j++) {
            float v = scale > 0.0f ? xg[j] / scale : 0.0f;
            /* |v| <= 127 up to rounding; the clamp also keeps a NaN input defined (-> 0) */
            v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
            qg[j] = v == v ? (int8_t)nearbyintf(v) : 0;
        }
    }
}

void ac_dequantize_q8(float *x, const int8_t *q, const float *s, int n, int gs) {
    for (int g = 0; g < n / gs; g++) /* a loop per group, which the compiler vectorizes */
        for (int j = g * gs; j < (g + 1) * gs; j++) x[j] = (float)q[j] * s[g];
}

/* ======================================================================== scalar set */

/* The fixed reduction order of 8 partial sums, shared with hsum_avx2. */
static float hsum8(const float l[8]) {
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

static float dot_scalar(const float *a, const float *b, int n) {
    float lane[8] = {0};
    int j = 0;
    for (; j + 8 <= n; j += 8)
        for (int k = 0; k < 8; k++) lane[k] += a[j + k] * b[j + k];
    float sum = hsum8(lane);
    for (; j < n; j++) sum += a[j] * b[j];
    return sum;
}

static void weighted_sum_scalar(float *out, int ldo, const float *a, int lda, const float *V, int ldv, int T, int R,
                                int n) {
    for (int r = 0; r < R; r++) {
        float *o = out + (size_t)r * ldo;
        const float *ar = a + (size_t)r * lda;
        memset(o, 0, (size_t)n * sizeof(float));
        for (int t = 0; t < T + r; t++)
            for (int j = 0; j < n; j++) o[j] += ar[t] * V[(size_t)t * ldv + j];
    }
}

static void gemm_f32_scalar(float *out, int ldo, const float *W, int ldw, const float *X, int ldx,
                            int T, int n, int r0, int r1) {
    for (int i = r0; i < r1; i++)
        for (int t = 0; t < T; t++)
            out[(size_t)t * ldo + i] = dot_scalar(W + (size_t)i * ldw, X + (size_t)t * ldx, n);
}

void ac_gemm_q8_scalar(float *out, int ldo, const int8_t *Wq, const float *Ws, const int8_t *Xq,
                       const float *Xs, int T, int n, int gs, int r0, int r1) {
    int ng = n / gs;
    for (int i = r0; i < r1; i++) {
        const int8_t *w = Wq + (size_t)i * n;
        const float *ws = Ws + (size_t)i * ng;
        for (int t = 0; t < T; t++) {
            const int8_t *x = Xq + (size_t)t * n;
            const float *xs = Xs + (size_t)t * ng;
            float sum = 0.0f;
            for (int g = 0; g < ng; g++) {
                int32_t isum = 0;
                for (int j = g * gs; j < (g + 1) * gs; j++) isum += (int32_t)w[j] * (int32_t)x[j];
                sum += (float)isum * (ws[g] * xs[g]);
            }
            out[(size_t)t * ldo + i] = sum;
        }
    }
}

static void swiglu_scalar(float *h, const float *g, int n) {
    for (int i = 0; i < n; i++) {
        float v = h[i];
        v = v * (1.0f / (1.0f + expf(-v)));
        h[i] = v * g[i];
    }
}

float ac_softmax_scalar(float *x, int n) {
    float max = x[0];
    for (int i = 1; i < n; i++)
        if (x[i] > max) max = x[i];
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    for (int i = 0; i < n; i++) x[i] /= sum;
    return sum;
}

const ac_kernels ac_kernels_scalar = {"scalar", gemm_f32_scalar, ac_gemm_q8_scalar, weighted_sum_scalar,
                                      ac_quantize_q8, swiglu_scalar, ac_softmax_scalar, NULL, NULL};

/* ======================================================================== dispatch */

/* The CPU features the sets need (x86-64), as read by cpu_features(). */
enum {
    CPU_AVX2 = 1 << 0, /* with FMA */
    CPU_AVXVNNI = 1 << 1,
    CPU_AVX512 = 1 << 2, /* F, BW and VL, with the OS saving the zmm and mask registers */
    CPU_AVX512VNNI = 1 << 3,
    CPU_AMXINT8 = 1 << 4, /* AMX-TILE and AMX-INT8, with the OS saving tile state for this process */
};

typedef struct {
    const char *name;
    const ac_kernels *set; /* NULL where this build has no such set (not x86-64) */
    unsigned needs;        /* CPU_* bits */
    const char *needs_text;
} kernel_choice;

/* Every set, best first: the automatic choice is the first one the CPU has.  Measured on a
 * 2-core Xeon with AVX-512 VNNI (bench/ab.c -c, the persona, one thread): avx512-vnni over
 * avx2 1.35-1.44x prefill and 1.35-1.41x batched decode in float32, 1.6x both in int8, decode
 * 1.0-1.12x (float32) and 1.06-1.18x (int8); on a 2-core AMD EPYC Zen 5, with avx512-vnni's
 * packed int8 weights: prefill 1.63x / 2.67x (float32 / int8), batched decode 1.60x / 1.82x,
 * decode 0.94-1.05x / 1.83x; on a 2-core AMD EPYC Zen 4 (AVX-512 in 256-bit halves): prefill
 * 1.57x / 2.68x, batched decode 1.10x / 1.61x, decode 1.06x / 1.80x. */
static const kernel_choice choices[] = {
#if defined(__x86_64__)
    {"avx512-amx", &ac_kernels_avx512_amx, CPU_AVX2 | CPU_AVX512 | CPU_AVX512VNNI | CPU_AMXINT8,
     "AVX-512F/BW/VL, AVX-512 VNNI and AMX-INT8"},
    {"avx512-vnni", &ac_kernels_avx512_vnni, CPU_AVX2 | CPU_AVX512 | CPU_AVX512VNNI, "AVX-512F/BW/VL and AVX-512 VNNI"},
    {"avx512", &ac_kernels_avx512, CPU_AVX2 | CPU_AVX512, "AVX-512F/BW/VL"},
    {"avx2-vnni", &ac_kernels_avx2_vnni, CPU_AVX2 | CPU_AVXVNNI, "AVX2, FMA and AVX-VNNI"},
    {"avx2", &ac_kernels_avx2, CPU_AVX2, "AVX2 and FMA"},
#else
    {"avx512-amx", NULL, 0, "an x86-64 CPU"},
    {"avx512-vnni", NULL, 0, "an x86-64 CPU"},
    {"avx512", NULL, 0, "an x86-64 CPU"},
    {"avx2-vnni", NULL, 0, "an x86-64 CPU"},
    {"avx2", NULL, 0, "an x86-64 CPU"},
#endif
    {"scalar", &ac_kernels_scalar, 0, "nothing"},
};
#define N_CHOICES (int)(sizeof choices / sizeof choices[0])

#if defined(__x86_64__)
/* The extended control register XCR0: which register states the OS saves on a switch. */
static unsigned long long xgetbv0(void) {
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}

/* Linux lets a process use the AMX tile data only once it asks (arch_prctl ARCH_REQ_XCOMP_PERM
 * for XFEATURE_XTILEDATA, Linux 5.16 and later); the permission is the whole process's.  Other
 * systems: no AMX set. */
#if defined(__linux__)
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
static int amx_permitted(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }
#else
static int amx_permitted(void) { return 0; }
#endif

/* CPUID feature bits, each counted only when the OS also saves the registers it uses. */
static unsigned cpu_features(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE) || !(c & bit_AVX)) return 0;
    int fma = (c & bit_FMA) != 0;
    unsigned long long xcr0 = xgetbv0();
    if ((xcr0 & 0x6) != 0x6 || __get_cpuid_max(0, NULL) < 7) return 0; /* xmm, ymm state */
    int zmm = (xcr0 & 0xE0) == 0xE0;                                   /* opmask, zmm 0-15 high, zmm 16-31 */
    __cpuid_count(7, 0, a, b, c, d);
    unsigned max_subleaf = a, f = 0;
    if ((b & bit_AVX2) && fma) f |= CPU_AVX2;
    if (zmm && (b & bit_AVX512F) && (b & bit_AVX512BW) && (b & bit_AVX512VL)) f |= CPU_AVX512;
    if (zmm && (c & bit_AVX512VNNI)) f |= CPU_AVX512VNNI;
    int tiles = (xcr0 & 0x60000) == 0x60000; /* XTILECFG, XTILEDATA */
    if (tiles && (d & (1u << 24)) && (d & (1u << 25)) && amx_permitted()) f |= CPU_AMXINT8; /* AMX-TILE, AMX-INT8 */
    if (max_subleaf >= 1) {
        __cpuid_count(7, 1, a, b, c, d);
        if (a & (1u << 4)) f |= CPU_AVXVNNI; /* CPUID.(7,1):EAX bit 4 */
    }
    return f;
}
#else
static unsigned cpu_features(void) { return 0; }
#endif

static int available(const kernel_choice *k, unsigned have) { return k->set && (k->needs & have) == k->needs; }

static unsigned g_features;
static pthread_once_t g_features_once = PTHREAD_ONCE_INIT;

static void read_features(void) { g_features = cpu_features(); }

/* The choice named name, or NULL. */
static const kernel_choice *choice_named(const char *name) {
    for (int i = 0; i < N_CHOICES; i++)
        if (strcmp(name, choices[i].name) == 0) return &choices[i];
    return NULL;
}

const ac_kernels *ac_kernels_named(const char *name) {
    pthread_once(&g_features_once, read_features);
    const kernel_choice *k = choice_named(name);
    return k && available(k, g_features) ? k->set : NULL;
}

static const ac_kernels *g_kernels = &ac_kernels_scalar;
static pthread_once_t g_kernels_once = PTHREAD_ONCE_INIT;

/* The first set the CPU has; then AC_KERNEL, when set, names the one to use instead.  A name
 * this CPU cannot run, or no set's name, is not fatal (an environment variable is no API):
 * the automatic choice stays, and one line on stderr says so and why. */
static void choose_kernels(void) {
    pthread_once(&g_features_once, read_features);
    int best = 0;
    while (!available(&choices[best], g_features)) best++; /* scalar is always available */
    g_kernels = choices[best].set;
    const char *forced = getenv("AC_KERNEL");
    if (!forced || !*forced) return;
    const kernel_choice *k = choice_named(forced);
    if (k && available(k, g_features)) {
        g_kernels = k->set;
    } else if (k) {
        fprintf(stderr, "arianna_c: AC_KERNEL=%s needs %s, which this CPU lacks; using %s\n", forced, k->needs_text,
                g_kernels->name);
    } else {
        fprintf(stderr, "arianna_c: AC_KERNEL=%s is not a kernel set (", forced);
        for (int i = 0; i < N_CHOICES; i++) fprintf(stderr, "%s%s", i ? ", " : "", choices[i].name);
        fprintf(stderr, "); using %s\n", g_kernels->name);
    }
}

const ac_kernels *ac_kernels_get(void) {
    pthread_once(&g_kernels_once, choose_kernels);
    return g_kernels;
}
