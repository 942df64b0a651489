/*
 * The row loops of the fused SGD-G / Adam-G steps, stamped out per element type and ISA.
 *
 * _crows.c includes this file once per (T, FN, TARGET): T = float or double, FN(x) names
 * the copy (e.g. x##_f32_avx2) and TARGET is empty or a target attribute (the AVX2 + FMA
 * copies are picked at import when the CPU has them). The per-row scalar coefficients are
 * computed in double by the shared helpers of _crows.c.
 *
 * Every row (one point of G(1,n)) needs two sweeps: its dot products (pass 1), then the
 * writes of the new point and momentum (pass 2, linear combinations of y, mom and g).
 * FN(step_rows) runs them over chunks of consecutive rows of at most CHUNK_ELEMS elements
 * (see below): pass 1 streams the chunk's y, g and mom in from memory, pass 2 reads them
 * back from the core's L2 cache and writes them, so memory sees one read and one write of
 * each array. `mom` may be NULL (SGD-G without momentum). The dot products are summed in
 * double: float64 rows directly, float32 rows in float over blocks of DOT_BLOCK elements
 * (see DOT_END below).
 *
 * FN(check_rows) and FN(sum_squares) are the read-only passes of the step guard
 * (rbn_geoopt/optim/_guard.py): one sweep over the points and gradients of a G(1,n)
 * tensor for the first row that cannot be stepped, one sweep over any other gradient for
 * its squared norm and its finiteness.
 */

/* x[lo, hi): *ss += sum x^2, *nf += sum x * 0 (0 unless some x is NaN/Inf, whose
 * product with 0 is NaN). Four independent partial sums per vector lane in the element
 * type (one chain of dependent additions would make the sweep latency-bound), added in
 * double at the end: a float32 block sum overflows to inf only above 3.4e38. */
static TARGET void FN(sum_squares)(const T *restrict x, int64_t lo, int64_t hi, double *ss,
                                   double *nf)
{
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0, z0 = 0, z1 = 0, z2 = 0, z3 = 0;
    const int64_t quarter = (hi - lo) / 4;
    const T *restrict a = x + lo, *restrict b = a + quarter, *restrict c = b + quarter,
                      *restrict d = c + quarter;
#pragma omp simd reduction(+ : s0, s1, s2, s3, z0, z1, z2, z3)
    for (int64_t j = 0; j < quarter; ++j) {
        s0 += a[j] * a[j], s1 += b[j] * b[j], s2 += c[j] * c[j], s3 += d[j] * d[j];
        z0 += a[j] * 0, z1 += b[j] * 0, z2 += c[j] * 0, z3 += d[j] * 0;
    }
    double total = (double)s0 + s1 + s2 + s3, zero = (double)z0 + z1 + z2 + z3;
    for (int64_t j = lo + 4 * quarter; j < hi; ++j) {
        const double v = x[j];
        total += v * v, zero += v * 0.0;
    }
    *ss += total, *nf += zero;
}

/* The dot products of pass 1 are accumulated in ACC over blocks of at most DOT_BLOCK
 * elements and each block's sums are added in double (both set by _crows.c per T). float:
 * float partial sums (one per SIMD lane) over blocks of 256 elements, so that each adds
 * at most 256 / lanes products (relative error ~1e-7, like torch's float32 dot products)
 * while the row's total is a double sum however long the row. Converting every element
 * to double, as before, halved the SIMD width and made the float32 kernel compute-bound
 * (L2-resident rows of 4608: 0.49 -> 0.29 ns per element, AVX2, docs/design.md "The
 * fused kernels"). double: one block of the whole row. */
#define DOT_END(lo, n) ((n) - (lo) > DOT_BLOCK ? (lo) + DOT_BLOCK : (n))

/* <y,y>, <y,g>, <g,g> and, when mom is not NULL, <m,m>, <m,y>, <m,g> of one row */
static TARGET struct dots FN(row_dots)(const T *restrict y, const T *restrict g,
                                       const T *restrict mom, int64_t n)
{
    double yy = 0, yg = 0, gg = 0, mm = 0, my = 0, mg = 0;
    for (int64_t lo = 0; lo < n; lo = DOT_END(lo, n)) {
        const int64_t hi = DOT_END(lo, n);
        ACC byy = 0, byg = 0, bgg = 0, bmm = 0, bmy = 0, bmg = 0;
        if (mom) {
#pragma omp simd reduction(+ : byy, byg, bgg, bmm, bmy, bmg)
            for (int64_t j = lo; j < hi; ++j) {
                const ACC a = y[j], b = g[j], c = mom[j];
                byy += a * a, byg += a * b, bgg += b * b;
                bmm += c * c, bmy += c * a, bmg += c * b;
            }
        } else {
#pragma omp simd reduction(+ : byy, byg, bgg)
            for (int64_t j = lo; j < hi; ++j) {
                const ACC a = y[j], b = g[j];
                byy += a * a, byg += a * b, bgg += b * b;
            }
        }
        yy += byy, yg += byg, gg += bgg, mm += bmm, my += bmy, mg += bmg;
    }
    const struct dots s = {yy, yg, gg, mm, my, mg};
    return s;
}

/* y <- k0 y + k1 mom + k2 g, mom <- k3 y + k4 mom + k5 g on one row */
static TARGET void FN(row_write)(T *restrict y, const T *restrict g, T *restrict mom,
                                 int64_t n, const double k[6])
{
    const T k0 = (T)k[0], k1 = (T)k[1], k2 = (T)k[2], k3 = (T)k[3], k4 = (T)k[4],
            k5 = (T)k[5];
    if (mom) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
            const T a = y[j], b = g[j], c = mom[j];
            y[j] = k0 * a + k1 * c + k2 * b;
            mom[j] = k3 * a + k4 * c + k5 * b;
        }
    } else {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) y[j] = k0 * y[j] + k2 * g[j];
    }
}

/* Per-row coefficients; Adam-G also updates its second moment *v (stored in T, and the
 * stored value is the one the step uses, as after a resume from a checkpoint). */
static void FN(row_coefficients)(const struct dots *s, const struct step_args *args, T *v,
                                 double k[6])
{
    if (!args->adam) {
        sgdg_coefficients(s, args, k);
        return;
    }
    double hn2, c;
    clip_factor(s, args->nu, &hn2, &c);
    const T v_new = (T)(args->beta2 * (double)*v + (1.0 - args->beta2) * c * c * hn2);
    *v = v_new;
    adamg_coefficients(s, hn2, c, (double)v_new, args, k);
}

/* Rows per chunk of FN(step_rows): its y, g and mom (3 x 64 KiB in float32) stay in the
 * L2 cache between the two passes; a row longer than CHUNK_ELEMS is a chunk of its own. A
 * chunk's dot products wait in a local array, hence at most CHUNK_ROWS rows (n = 1).
 * Against software-pipelining the passes row by row (pass 2 of row i in the sweep that
 * runs pass 1 of row i + 1), the kernel on ResNet-18's conv weights took 0.75x (one
 * thread) and 0.88x (two threads) the time: docs/design.md "Where the step's time goes". */
#ifndef CHUNK_ELEMS
#define CHUNK_ELEMS 16384
#define CHUNK_ROWS 256
#endif

/* Step rows [lo, hi) in place; returns the first row in it whose <y,y> is zero or not
 * finite or whose gradient is not finite (such rows are left untouched), or INT64_MAX.
 * v: one element per row (Adam-G) or NULL. */
static TARGET int64_t FN(step_rows)(T *y, const T *g, T *mom, T *v, int64_t lo, int64_t hi,
                                    int64_t n, const struct step_args *args)
{
    int64_t bad = INT64_MAX;
    struct dots d[CHUNK_ROWS];
    const int64_t fit = CHUNK_ELEMS / n;
    const int64_t chunk = fit < 1 ? 1 : fit > CHUNK_ROWS ? CHUNK_ROWS : fit;
#define ROW(p, i) ((p) ? (p) + (i) * n : NULL)
    for (int64_t first = lo; first < hi; first += chunk) {
        const int64_t end = first + chunk < hi ? first + chunk : hi;
        for (int64_t i = first; i < end; ++i)
            d[i - first] = FN(row_dots)(ROW(y, i), ROW(g, i), ROW(mom, i), n);
        for (int64_t i = first; i < end; ++i) {
            const struct dots *s = &d[i - first];
            if (!(s->yy > 0) || !isfinite(s->yy) || !isfinite(s->yg) || !isfinite(s->gg)) {
                if (i < bad) bad = i;
                continue;
            }
            double k[6];
            FN(row_coefficients)(s, args, v ? v + i : NULL, k);
            FN(row_write)(ROW(y, i), ROW(g, i), ROW(mom, i), n, k);
        }
    }
#undef ROW
    return bad;
}

/* <y,y> and <g,g> of two rows (y, g) and (y2, g2) of length n in one sweep: four streams
 * from memory at once (ResNet-18's conv weights, two threads: 2-13 % faster than one
 * row's two streams at a time, three interleaved runs), 16 independent partial sums each (two AVX2
 * vectors of float) in the element type -- the guard's sums need range, not digits, and
 * a single chain of dependent additions would make the sweep latency-bound -- added in
 * double at the end. A float32 sum is inf above 3.4e38 and may underflow below 1e-38:
 * both lie outside the ranges that check_rows accepts, so such rows are refused anyway. */
#define GUARD_LANES 16
static TARGET void FN(pair_norms2)(const T *restrict y, const T *restrict g,
                                   const T *restrict y2, const T *restrict g2, int64_t n,
                                   double out[4])
{
    T sy[GUARD_LANES] = {0}, sg[GUARD_LANES] = {0}, sy2[GUARD_LANES] = {0},
      sg2[GUARD_LANES] = {0};
    int64_t j = 0;
    for (; j + GUARD_LANES <= n; j += GUARD_LANES) {
#pragma omp simd
        for (int k = 0; k < GUARD_LANES; ++k) {
            sy[k] += y[j + k] * y[j + k], sg[k] += g[j + k] * g[j + k];
            sy2[k] += y2[j + k] * y2[j + k], sg2[k] += g2[j + k] * g2[j + k];
        }
    }
    double ty = 0, tg = 0, ty2 = 0, tg2 = 0;
    for (int k = 0; k < GUARD_LANES; ++k) ty += sy[k], tg += sg[k], ty2 += sy2[k], tg2 += sg2[k];
    for (; j < n; ++j) {
        const double a = y[j], b = g[j], c = y2[j], d = g2[j];
        ty += a * a, tg += b * b, ty2 += c * c, tg2 += d * d;
    }
    out[0] = ty, out[1] = tg, out[2] = ty2, out[3] = tg2;
}
#undef GUARD_LANES

/* the guard's verdict on row i from its <y,y> and <g,g> (see check_rows) */
static void FN(judge_row)(int64_t i, double yy, double gg, double lo2, double hi2,
                          double glim2, int64_t *bad_point, int64_t *bad_grad)
{
    if (!(yy >= lo2 && yy <= hi2) && i < *bad_point) *bad_point = i;
    if (!(gg <= hi2 && gg * yy * yy <= glim2) && i < *bad_grad) *bad_grad = i;
}

/* The guard's verdict on rows [lo, hi): the first row whose <y,y> is not in [lo2, hi2]
 * (zero, non-finite, or out of the supported range) goes to *bad_point, the first whose
 * <g,g> is not <= hi2 or <g,g> <y,y>^2 not <= glim2 (a non-finite gradient, or one whose
 * step would overflow) to *bad_grad (both start at INT64_MAX and are only lowered). Row
 * i is swept together with row i + half; an odd last row as its two halves. */
static TARGET void FN(check_rows)(const T *y, const T *g, int64_t lo, int64_t hi, int64_t n,
                                  double lo2, double hi2, double glim2, int64_t *bad_point,
                                  int64_t *bad_grad)
{
    const int64_t half = (hi - lo) / 2;
    double q[4];
    for (int64_t i = lo; i < lo + half; ++i) {
        const int64_t i2 = i + half;
        FN(pair_norms2)(y + i * n, g + i * n, y + i2 * n, g + i2 * n, n, q);
        FN(judge_row)(i, q[0], q[1], lo2, hi2, glim2, bad_point, bad_grad);
        FN(judge_row)(i2, q[2], q[3], lo2, hi2, glim2, bad_point, bad_grad);
    }
    if ((hi - lo) % 2) {
        const int64_t i = hi - 1, h = n / 2;
        const T *yi = y + i * n, *gi = g + i * n;
        FN(pair_norms2)(yi, gi, yi + h, gi + h, h, q);
        double yy = q[0] + q[2], gg = q[1] + q[3];
        if (n % 2) {
            const double a = yi[n - 1], b = gi[n - 1];
            yy += a * a, gg += b * b;
        }
        FN(judge_row)(i, yy, gg, lo2, hi2, glim2, bad_point, bad_grad);
    }
}
#undef DOT_END
