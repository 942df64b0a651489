/*
 * rbn_geoopt.optim._fused._crows: fused per-row SGD-G and Adam-G steps on G(1,n), in place,
 * and the read-only sweep of the optimizers' step guard.
 *
 * Plain C99 + OpenMP, no torch headers: Python passes raw addresses (tensor.data_ptr())
 * of C-contiguous (rows, n) float32/float64 buffers, the scalars and a thread count. The
 * caller (rbn_geoopt/optim/_fused/__init__.py) has validated everything; nothing is checked
 * twice here. The reference for the mathematics is torch_twin.py beside this file (same
 * formulas, same names); docs/design.md, "The optimizers SGD-G and Adam-G", derives them.
 *
 * Per row, with yy = <y,y>, yg = <y,g>, gg = <g,g>, my = <m,y>, r = sqrt(yy):
 *   |h|_y^2 = yy gg - yg^2 (h = yy g - yg y),  c = min(1, nu / |h|_y)
 *   the momentum is first made horizontal: m_h = m - (my / yy) y
 *   SGD-G:  d = gamma tau_h - lr c h,  t = |d| / r
 *           y <- y cos(t) + d sinc(t),  tau <- d cos(t) - y t sin(t)
 *   Adam-G: m' = b1 m_h + (1-b1) c h,  v <- b2 v + (1-b2) c^2 |h|_y^2,
 *           d = a m' with a = -step_size / sqrt(v + eps),  t = |d| / r
 *           y <- y cos(t) + d sinc(t),  m <- m' cos(t) - y a |m'|^2 sinc(t) / r^2
 * The new point keeps the norm r of the old one (and the momentum is its lift there),
 * except that a row whose <y,y> is 1 to within `snap` is written at norm exactly 1, so
 * that rounding does not accumulate on unit rows. Every |.|^2 above is expanded into the
 * six dot products of pass 1; the new y and the new momentum are linear combinations
 * k[0] y + k[1] mom + k[2] g and k[3] y + k[4] mom + k[5] g.
 *
 * Layout: the scalar helpers (double precision) are below; the row loops live in
 * _rows_impl.h, stamped out for float/double and for baseline/AVX2+FMA code (chosen at
 * import, see isa()); step_jobs() and check_jobs() hand the blocks of rows of one or
 * several tensors to OpenMP threads. Built by setup.py as an optional extension; the
 * package falls back to torch_twin.py when it is missing.
 */
#define PY_SSIZE_T_CLEAN
#define Py_LIMITED_API 0x030A0000
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

/* dtype codes shared with dispatch.py */
enum { DTYPE_F32 = 0, DTYPE_F64 = 1 };

/* The six per-row dot products; "m" is the momentum (tau for SGD-G, m for Adam-G). */
struct dots {
    double yy, yg, gg, mm, my, mg;
};

/* hyper-parameters of one call (adam = 0: SGD-G, uses lr and gamma; adam = 1: Adam-G,
 * uses step_size, beta1, beta2, eps); nu = inf: no clipping; snap: the tolerance on
 * |<y,y> - 1| under which a row is written back at norm 1 (set per dtype) */
struct step_args {
    int adam;
    double lr, gamma, step_size, beta1, beta2, eps, nu, snap;
};

/* sin(t)/t, 1 at t = 0: the series 1 - t^2/6 (1 - t^2/20) below 1e-2, as
 * rbn_geoopt.manifold.sinc (its error, below t^6/5040, is under double rounding there). */
static double sinc(double t)
{
    const double t2 = t * t;
    return t < 1e-2 ? 1.0 - t2 / 6.0 * (1.0 - t2 / 20.0) : sin(t) / t;
}

/* |h|_y^2 = max(yy gg - yg^2, 0) and the clipping factor c = min(1, nu / |h|_y). */
static void clip_factor(const struct dots *s, double nu, double *hn2, double *c)
{
    const double q = s->yy * s->gg - s->yg * s->yg;
    *hn2 = q > 0 ? q : 0.0;
    const double hn = sqrt(*hn2);
    *c = hn > nu ? nu / hn : 1.0;
}

/* Coefficients of one step along d = a mom', where mom' = P y + Q mom + R g has squared
 * norm mm2 (SGD-G: mom' = d and a = 1): the new point expmap(y, d), written at the norm
 * of y (or at 1 when <y,y> is 1 to within snap and the point moves), and mom'
 * transported exactly along d,
 * as its lift at the new point; since mom' is parallel to d its transport needs only
 * |mom'|^2. */
static void step_coefficients(double yy, double a, double P, double Q, double R, double mm2,
                              double snap, double k[6])
{
    /* t^2 = |d|^2 / yy = a^2 |mom'|^2 / yy */
    const double t = sqrt(a * a * mm2 / yy);
    const double co = cos(t), si = sinc(t);
    /* a zero step (t = 0) leaves the point bit-identical: no renormalisation then */
    const double s = t > 0 && fabs(yy - 1.0) <= snap ? 1.0 / sqrt(yy) : 1.0;
    /* y <- y cos(t) + a mom' sinc(t) */
    k[0] = (co + a * P * si) * s;
    k[1] = a * Q * si * s;
    k[2] = a * R * si * s;
    /* mom <- mom' cos(t) - y a |mom'|^2 sinc(t) / yy */
    k[3] = (P * co - a * mm2 * si / yy) * s;
    k[4] = Q * co * s;
    k[5] = R * co * s;
}

/* |m_h|^2 = mm - my^2 / yy for the horizontal part m_h = m - (my / yy) y (clamped at 0) */
static double horizontal_norm2(const struct dots *s)
{
    const double q = s->mm - s->my * (s->my / s->yy);
    return q > 0 ? q : 0.0;
}

static void sgdg_coefficients(const struct dots *s, const struct step_args *args, double k[6])
{
    double hn2, c;
    clip_factor(s, args->nu, &hn2, &c);
    const double lc = args->lr * c, gamma = args->gamma;
    /* d = gamma tau_h - lc h = (lc yg - gamma my / yy) y + gamma tau + (-lc yy) g */
    const double th = s->yy * s->mg - s->yg * s->my; /* <tau, h> = <tau_h, h> */
    double dd = gamma * gamma * horizontal_norm2(s) + lc * lc * s->yy * hn2 - 2.0 * gamma * lc * th;
    if (!(dd > 0)) dd = 0.0;
    const double P = lc * s->yg - gamma * (s->my / s->yy);
    step_coefficients(s->yy, 1.0, P, gamma, -lc * s->yy, dd, args->snap, k);
}

static void adamg_coefficients(const struct dots *s, double hn2, double c, double v,
                               const struct step_args *args, double k[6])
{
    /* m' = b1 m_h + (1 - b1) c h = P y + b1 m + R g */
    const double beta1 = args->beta1, w = (1.0 - beta1) * c;
    const double mh = s->yy * s->mg - s->yg * s->my; /* <m, h> = <m_h, h> */
    double mm2 = beta1 * beta1 * horizontal_norm2(s) + w * w * s->yy * hn2 + 2.0 * beta1 * w * mh;
    if (!(mm2 > 0)) mm2 = 0.0;
    /* d = a m'; when m' = 0 the step is 0 whatever a is (avoids 0 * inf at v + eps = 0) */
    const double a = mm2 > 0 ? -args->step_size / sqrt(v + args->eps) : 0.0;
    const double P = -w * s->yg - beta1 * (s->my / s->yy);
    step_coefficients(s->yy, a, P, beta1, w * s->yy, mm2, args->snap, k);
}

/* ------------------------------------------------------------------ row kernels */
/* T: the element type; ACC, DOT_BLOCK: how pass 1 accumulates its dot products
 * (_rows_impl.h): float32 rows in float over blocks of 256 elements, each block's sums
 * added in double; float64 rows in double over the whole row (as before) */
#define TARGET
#define T float
#define ACC float
#define DOT_BLOCK 256
#define FN(name) name##_f32_base
#include "_rows_impl.h"
#undef T
#undef ACC
#undef DOT_BLOCK
#undef FN
#define T double
#define ACC double
#define DOT_BLOCK INT64_MAX
#define FN(name) name##_f64_base
#include "_rows_impl.h"
#undef T
#undef ACC
#undef DOT_BLOCK
#undef FN
#undef TARGET

/* x86 with GCC or clang: AVX2 + FMA copies, used when the CPU has them */
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_AVX2_COPIES 1
#define TARGET __attribute__((target("avx2,fma")))
#define T float
#define ACC float
#define DOT_BLOCK 256
#define FN(name) name##_f32_avx2
#include "_rows_impl.h"
#undef T
#undef ACC
#undef DOT_BLOCK
#undef FN
#define T double
#define ACC double
#define DOT_BLOCK INT64_MAX
#define FN(name) name##_f64_avx2
#include "_rows_impl.h"
#undef T
#undef ACC
#undef DOT_BLOCK
#undef FN
#undef TARGET
#else
#define HAVE_AVX2_COPIES 0
#endif

typedef int64_t (*step_rows_f32_fn)(float *, const float *, float *, float *, int64_t,
                                   int64_t, int64_t, const struct step_args *);
typedef int64_t (*step_rows_f64_fn)(double *, const double *, double *, double *, int64_t,
                                   int64_t, int64_t, const struct step_args *);
typedef void (*sum_squares_f32_fn)(const float *, int64_t, int64_t, double *, double *);
typedef void (*sum_squares_f64_fn)(const double *, int64_t, int64_t, double *, double *);
typedef void (*check_rows_f32_fn)(const float *, const float *, int64_t, int64_t, int64_t,
                                  double, double, double, int64_t *, int64_t *);
typedef void (*check_rows_f64_fn)(const double *, const double *, int64_t, int64_t, int64_t,
                                  double, double, double, int64_t *, int64_t *);

/* the row kernels in use: set by select_isa() (at import: the best the CPU supports) */
static struct {
    const char *name;
    step_rows_f32_fn f32;
    step_rows_f64_fn f64;
    sum_squares_f32_fn ss32;
    sum_squares_f64_fn ss64;
    check_rows_f32_fn cr32;
    check_rows_f64_fn cr64;
} isa = {"baseline",           step_rows_f32_base, step_rows_f64_base, sum_squares_f32_base,
         sum_squares_f64_base, check_rows_f32_base, check_rows_f64_base};

static int cpu_has_avx2(void)
{
#if HAVE_AVX2_COPIES
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* 0 on success, -1 when the ISA is unknown or not supported here */
static int select_isa(const char *name)
{
    if (strcmp(name, "baseline") == 0) {
        isa.name = "baseline", isa.f32 = step_rows_f32_base, isa.f64 = step_rows_f64_base;
        isa.ss32 = sum_squares_f32_base, isa.ss64 = sum_squares_f64_base;
        isa.cr32 = check_rows_f32_base, isa.cr64 = check_rows_f64_base;
        return 0;
    }
#if HAVE_AVX2_COPIES
    if (strcmp(name, "avx2") == 0 && cpu_has_avx2()) {
        isa.name = "avx2", isa.f32 = step_rows_f32_avx2, isa.f64 = step_rows_f64_avx2;
        isa.ss32 = sum_squares_f32_avx2, isa.ss64 = sum_squares_f64_avx2;
        isa.cr32 = check_rows_f32_avx2, isa.cr64 = check_rows_f64_avx2;
        return 0;
    }
#endif
    return -1;
}

/* Rows per block: blocks of about 2^15 elements (a few hundred KiB of y, g, mom) are
 * handed out dynamically, so that a thread that the OS pauses (a busy machine) delays
 * one block, not half of the tensor. Inside a block, step_rows runs its chunks. */
#define BLOCK_ELEMS ((int64_t)1 << 15)

/* One tensor to step: `rows` contiguous rows of length n; mom may be NULL (SGD-G without
 * momentum), v is NULL for SGD-G. block/first_block are filled in by step_jobs. */
struct job {
    void *y;
    const void *g;
    void *mom, *v;
    int64_t rows, n, block, first_block;
    struct step_args args;
    double lo2, hi2, glim2; /* check_jobs only: the guard's limits */
};

/* the job that owns global block b: the last one whose first_block <= b */
static int64_t job_of_block(const struct job *jobs, int64_t njobs, int64_t b)
{
    int64_t lo = 0, hi = njobs - 1;
    while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (jobs[mid].first_block <= b)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

/* Step every row of every job, in one parallel loop over the blocks of all of them (the
 * multi-tensor path: one OpenMP region per optimizer step). bad[j] receives the smallest
 * row of job j whose <y,y> is zero or not finite or whose gradient is not finite (left
 * untouched), or -1. */
/* Cut every job into blocks of whole rows; returns the total number of blocks. */
static int64_t plan_blocks(struct job *jobs, int64_t njobs)
{
    int64_t nblocks = 0;
    for (int64_t j = 0; j < njobs; ++j) {
        struct job *t = &jobs[j];
        t->block = t->n >= BLOCK_ELEMS ? 1 : BLOCK_ELEMS / t->n;
        t->first_block = nblocks;
        nblocks += (t->rows + t->block - 1) / t->block;
    }
    return nblocks;
}

static void step_jobs(int dtype, struct job *jobs, int64_t njobs, int nthreads, int64_t *bad)
{
    const int64_t nblocks = plan_blocks(jobs, njobs);
    for (int64_t j = 0; j < njobs; ++j) bad[j] = INT64_MAX;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1)
    for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t j = job_of_block(jobs, njobs, b);
        const struct job *t = &jobs[j];
        const int64_t lo = (b - t->first_block) * t->block;
        const int64_t hi = lo + t->block < t->rows ? lo + t->block : t->rows;
        const int64_t first =
            dtype == DTYPE_F32
                ? isa.f32((float *)t->y, (const float *)t->g, (float *)t->mom, (float *)t->v,
                          lo, hi, t->n, &t->args)
                : isa.f64((double *)t->y, (const double *)t->g, (double *)t->mom,
                          (double *)t->v, lo, hi, t->n, &t->args);
        if (first != INT64_MAX) {
#pragma omp critical(crows_bad)
            if (first < bad[j]) bad[j] = first;
        }
    }
    for (int64_t j = 0; j < njobs; ++j)
        if (bad[j] == INT64_MAX) bad[j] = -1;
}

/* The guard's sweep over every row of every job (y and g only): per job, the first row
 * with a bad point and the first with a bad gradient (see check_rows), -1 for none. */
static void check_jobs(int dtype, struct job *jobs, int64_t njobs, int nthreads,
                       int64_t *bad_point, int64_t *bad_grad)
{
    const int64_t nblocks = plan_blocks(jobs, njobs);
    for (int64_t j = 0; j < njobs; ++j) bad_point[j] = bad_grad[j] = INT64_MAX;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1)
    for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t j = job_of_block(jobs, njobs, b);
        const struct job *t = &jobs[j];
        const int64_t lo = (b - t->first_block) * t->block;
        const int64_t hi = lo + t->block < t->rows ? lo + t->block : t->rows;
        int64_t point = INT64_MAX, grad = INT64_MAX;
        if (dtype == DTYPE_F32)
            isa.cr32((const float *)t->y, (const float *)t->g, lo, hi, t->n, t->lo2, t->hi2,
                     t->glim2, &point, &grad);
        else
            isa.cr64((const double *)t->y, (const double *)t->g, lo, hi, t->n, t->lo2,
                     t->hi2, t->glim2, &point, &grad);
        if (point != INT64_MAX || grad != INT64_MAX) {
#pragma omp critical(crows_bad)
            {
                if (point < bad_point[j]) bad_point[j] = point;
                if (grad < bad_grad[j]) bad_grad[j] = grad;
            }
        }
    }
    for (int64_t j = 0; j < njobs; ++j) {
        if (bad_point[j] == INT64_MAX) bad_point[j] = -1;
        if (bad_grad[j] == INT64_MAX) bad_grad[j] = -1;
    }
}

/* Sum of squares of numel elements and whether they are all finite. */
static double sum_squares(int dtype, const void *x, int64_t numel, int nthreads, int *finite)
{
    const int64_t nblocks = (numel + BLOCK_ELEMS - 1) / BLOCK_ELEMS;
    double ss = 0, nf = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1) \
    reduction(+ : ss, nf)
    for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t lo = b * BLOCK_ELEMS, hi = lo + BLOCK_ELEMS < numel ? lo + BLOCK_ELEMS : numel;
        if (dtype == DTYPE_F32)
            isa.ss32((const float *)x, lo, hi, &ss, &nf);
        else
            isa.ss64((const double *)x, lo, hi, &ss, &nf);
    }
    *finite = nf == 0;
    return ss;
}

static int check_common(int dtype, int nthreads)
{
    if (dtype != DTYPE_F32 && dtype != DTYPE_F64) {
        PyErr_Format(PyExc_ValueError, "_crows: unknown dtype code %d", dtype);
        return -1;
    }
    if (nthreads < 1) {
        PyErr_Format(PyExc_ValueError, "_crows: nthreads must be >= 1, got %d", nthreads);
        return -1;
    }
    return 0;
}

/* Parse a sequence of per-tensor tuples into jobs (adam: 7-tuples, else 5-tuples); NULL
 * with a Python exception on bad input. The caller frees the array. */
static struct job *parse_jobs(PyObject *seq, int adam, struct step_args common, int64_t *njobs)
{
    const Py_ssize_t count = PySequence_Size(seq);
    if (count < 0) return NULL;
    struct job *jobs = PyMem_Calloc(count > 0 ? (size_t)count : 1, sizeof(struct job));
    if (!jobs) return (struct job *)PyErr_NoMemory();
    for (Py_ssize_t j = 0; j < count; ++j) {
        PyObject *item = PySequence_GetItem(seq, j);
        if (!item) goto fail;
        unsigned long long y = 0, g = 0, mom = 0, v = 0;
        long long rows = 0, n = 0;
        double step_size = 0;
        int ok = adam ? PyArg_ParseTuple(item, "KKKKLLd", &y, &g, &mom, &v, &rows, &n,
                                         &step_size)
                      : PyArg_ParseTuple(item, "KKKLL", &y, &g, &mom, &rows, &n);
        Py_DECREF(item);
        if (!ok) goto fail;
        if (rows < 0 || n < 1 || (rows > 0 && (!y || !g || (adam && (!mom || !v))))) {
            PyErr_Format(PyExc_ValueError, "_crows: bad tensor %zd (rows %lld, n %lld)", j,
                         rows, n);
            goto fail;
        }
        struct job *t = &jobs[j];
        t->y = (void *)(uintptr_t)y, t->g = (const void *)(uintptr_t)g;
        t->mom = (void *)(uintptr_t)mom, t->v = adam ? (void *)(uintptr_t)v : NULL;
        t->rows = rows, t->n = n, t->args = common;
        t->args.step_size = step_size;
    }
    *njobs = count;
    return jobs;
fail:
    PyMem_Free(jobs);
    return NULL;
}

/* step the parsed jobs; returns the list of first bad rows (-1: none), one per tensor */
static PyObject *run_jobs(struct job *jobs, int64_t njobs, int dtype, int nthreads)
{
    int64_t *bad = PyMem_Calloc(njobs > 0 ? (size_t)njobs : 1, sizeof(int64_t));
    if (!bad) {
        PyMem_Free(jobs);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    step_jobs(dtype, jobs, njobs, nthreads, bad);
    Py_END_ALLOW_THREADS
    PyObject *out = PyList_New(njobs);
    for (int64_t j = 0; out && j < njobs; ++j) {
        PyObject *value = PyLong_FromLongLong((long long)bad[j]);
        if (!value) {
            Py_CLEAR(out);
            break;
        }
        PyList_SetItem(out, j, value);
    }
    PyMem_Free(bad);
    PyMem_Free(jobs);
    return out;
}

PyDoc_STRVAR(sgdg_many_doc,
             "sgdg_many(tensors, dtype, lr, momentum, nu, snap, nthreads) -> list[int]\n\n"
             "One SGD-G step of several tensors of one dtype (0 = float32, 1 = float64), in\n"
             "place, in one parallel loop over their rows. tensors: a sequence of\n"
             "(y, g, tau, rows, n), y, g, tau the addresses of C-contiguous (rows, n)\n"
             "buffers (tau = 0: no momentum buffer); nu = inf: no clipping; snap: rows with\n"
             "|<y,y> - 1| <= snap are written at norm 1, others keep their norm. Returns, per\n"
             "tensor, the first row with <y,y> zero or not finite or a non-finite gradient\n"
             "(left untouched), or -1.");

static PyObject *py_sgdg_many(PyObject *self, PyObject *args)
{
    PyObject *seq;
    int dtype, nthreads;
    double lr, gamma, nu, snap;
    (void)self;
    if (!PyArg_ParseTuple(args, "Oiddddi", &seq, &dtype, &lr, &gamma, &nu, &snap, &nthreads))
        return NULL;
    if (check_common(dtype, nthreads)) return NULL;
    const struct step_args common = {0, lr, gamma, 0, 0, 0, 0, nu, snap};
    int64_t njobs = 0;
    struct job *jobs = parse_jobs(seq, 0, common, &njobs);
    return jobs ? run_jobs(jobs, njobs, dtype, nthreads) : NULL;
}

PyDoc_STRVAR(adamg_many_doc,
             "adamg_many(tensors, dtype, beta1, beta2, eps, nu, snap, nthreads) -> list[int]\n\n"
             "One Adam-G step of several tensors of one dtype, in place, in one parallel loop\n"
             "over their rows. tensors: a sequence of (y, g, m, v, rows, n, step_size), v\n"
             "one second moment per row, step_size = lr sqrt(1 - beta2^k) / (1 - beta1^k).\n"
             "Returns, per tensor, the first bad row (as sgdg_many), or -1.");

static PyObject *py_adamg_many(PyObject *self, PyObject *args)
{
    PyObject *seq;
    int dtype, nthreads;
    double beta1, beta2, eps, nu, snap;
    (void)self;
    if (!PyArg_ParseTuple(args, "Oidddddi", &seq, &dtype, &beta1, &beta2, &eps, &nu, &snap,
                          &nthreads))
        return NULL;
    if (check_common(dtype, nthreads)) return NULL;
    const struct step_args common = {1, 0, 0, 0, beta1, beta2, eps, nu, snap};
    int64_t njobs = 0;
    struct job *jobs = parse_jobs(seq, 1, common, &njobs);
    return jobs ? run_jobs(jobs, njobs, dtype, nthreads) : NULL;
}

PyDoc_STRVAR(check_rows_doc,
             "check_rows(tensors, dtype, nthreads) -> list[tuple[int, int]]\n\n"
             "The step guard's sweep over G(1,n) tensors of one dtype. tensors: a sequence of\n"
             "(y, g, rows, n, lo2, hi2, glim2), y and g the addresses of C-contiguous (rows, n)\n"
             "buffers. Returns, per tensor, (first row whose <y,y> is not in [lo2, hi2], first\n"
             "row whose <g,g> <y,y>^2 is not <= glim2), -1 for none.");

static PyObject *py_check_rows(PyObject *self, PyObject *args)
{
    PyObject *seq;
    int dtype, nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "Oii", &seq, &dtype, &nthreads)) return NULL;
    if (check_common(dtype, nthreads)) return NULL;
    const Py_ssize_t count = PySequence_Size(seq);
    if (count < 0) return NULL;
    const size_t size = count > 0 ? (size_t)count : 1;
    struct job *jobs = PyMem_Calloc(size, sizeof(struct job));
    int64_t *bad = PyMem_Calloc(2 * size, sizeof(int64_t));
    PyObject *out = NULL;
    if (!jobs || !bad) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t j = 0; j < count; ++j) {
        PyObject *item = PySequence_GetItem(seq, j);
        if (!item) goto done;
        unsigned long long y = 0, g = 0;
        long long rows = 0, n = 0;
        struct job *t = &jobs[j];
        const int ok = PyArg_ParseTuple(item, "KKLLddd", &y, &g, &rows, &n, &t->lo2, &t->hi2,
                                        &t->glim2);
        Py_DECREF(item);
        if (!ok) goto done;
        if (rows < 0 || n < 1 || (rows > 0 && (!y || !g))) {
            PyErr_Format(PyExc_ValueError, "_crows: bad tensor %zd (rows %lld, n %lld)", j,
                         rows, n);
            goto done;
        }
        t->y = (void *)(uintptr_t)y, t->g = (const void *)(uintptr_t)g;
        t->rows = rows, t->n = n;
    }
    Py_BEGIN_ALLOW_THREADS
    check_jobs(dtype, jobs, count, nthreads, bad, bad + size);
    Py_END_ALLOW_THREADS
    out = PyList_New(count);
    for (Py_ssize_t j = 0; out && j < count; ++j) {
        PyObject *pair = Py_BuildValue("(LL)", (long long)bad[j], (long long)bad[size + j]);
        if (!pair) {
            Py_CLEAR(out);
            break;
        }
        PyList_SetItem(out, j, pair);
    }
done:
    PyMem_Free(jobs);
    PyMem_Free(bad);
    return out;
}

PyDoc_STRVAR(sum_squares_doc,
             "sum_squares(x, numel, dtype, nthreads) -> (float, bool)\n\n"
             "The sum of squares of `numel` contiguous elements at address x (partial sums\n"
             "in the element type, inf when one overflows) and whether every element is\n"
             "finite.");

static PyObject *py_sum_squares(PyObject *self, PyObject *args)
{
    unsigned long long x;
    long long numel;
    int dtype, nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "KLii", &x, &numel, &dtype, &nthreads)) return NULL;
    if (check_common(dtype, nthreads)) return NULL;
    if (numel < 0 || (numel > 0 && !x)) {
        PyErr_Format(PyExc_ValueError, "_crows.sum_squares: bad buffer (numel %lld)", numel);
        return NULL;
    }
    int finite = 1;
    double ss = 0;
    Py_BEGIN_ALLOW_THREADS
    ss = sum_squares(dtype, (const void *)(uintptr_t)x, numel, nthreads, &finite);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(dO)", ss, finite ? Py_True : Py_False);
}

PyDoc_STRVAR(isa_doc,
             "isa(name=None) -> str\n\n"
             "The instruction set of the row kernels in use: 'avx2' (AVX2 + FMA, chosen at\n"
             "import when the CPU has it) or 'baseline'. With a name, switch to it first\n"
             "(ValueError when this build or CPU lacks it); used by the tests.");

static PyObject *py_isa(PyObject *self, PyObject *args)
{
    const char *name = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "|z", &name)) return NULL;
    if (name && select_isa(name) != 0) {
        PyErr_Format(PyExc_ValueError, "_crows.isa: %s is not available here", name);
        return NULL;
    }
    return PyUnicode_FromString(isa.name);
}

static PyMethodDef methods[] = {
    {"sgdg_many", py_sgdg_many, METH_VARARGS, sgdg_many_doc},
    {"adamg_many", py_adamg_many, METH_VARARGS, adamg_many_doc},
    {"check_rows", py_check_rows, METH_VARARGS, check_rows_doc},
    {"sum_squares", py_sum_squares, METH_VARARGS, sum_squares_doc},
    {"isa", py_isa, METH_VARARGS, isa_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_crows",
    "Fused per-row SGD-G / Adam-G steps on G(1,n) (C99 + OpenMP).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__crows(void)
{
    select_isa(cpu_has_avx2() ? "avx2" : "baseline");
    return PyModule_Create(&module);
}
