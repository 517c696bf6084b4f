/* Head fusion and input check in one read of the input (attnlab.explain.rollout).
 *
 * head_sum(x, out, row_sums, n_heads, n, lo, hi, check_negative[, avx2]) -> bool
 *
 *   x    float32 or float64 buffer, C-contiguous [M, H, n, n]   (attention, row = query)
 *   out  buffer of the same type, C-contiguous [M, n, n], written: out[m] = sum_h x[m, h]
 *   row_sums  buffer of the same type [M, n] (or None), written: the rows' sums of out
 *   lo, hi  int64 buffers [M] (or None): a sample's real tokens [lo[m], hi[m]). Only
 *        entries whose row and column both lie there are checked and summed; out is 0
 *        (and so are the rows' sums) wherever the row or the column is padded: padded
 *        entries may hold anything and are never read
 *   avx2  False: the 16-byte loop even where the AVX2 one runs (default: AVX2 when the CPU
 *        has it, module constant AVX2)
 *   returns True when every checked entry is finite and, with check_negative, has a
 *        clear sign bit (>= 0 and not -0.0).
 *
 * torch sums the heads in one pass and needs a second pass (a reduction) to check the
 * values; at ViT sizes that second read of the input costs 15 % of rollout's minimal
 * work and half of space-time rollout's. Here each entry is checked as it is loaded for
 * the sum. The sum runs over the heads in order (h = 0, 1, ...). The GIL is released:
 * callers split M across threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Per sample m and query row i: out[m, i] = sum_h x[m, h, i], one vector of BYTES bytes of
 * columns at a time summed over the heads in a register and stored once (as torch's
 * reduction over a middle dimension does; adding each head's row into the output row in
 * memory instead took twice as long), each entry checked as it is loaded for the sum.
 * GCC/Clang vector types (vector_size(16)) are SSE2/NEON registers on any target; TARGET
 * compiles a copy for an instruction set (32-byte vectors: AVX2, below). The check reads
 * the entries' bits: an all-ones exponent is NaN or +-Inf, a set sign bit a negative
 * entry -- or -0.0, which is not negative: the caller's detailed check, which runs
 * whenever this one fails, then finds nothing wrong. With lo/hi only entries whose row
 * and column lie in [a, b) are checked: a padded row is written as zeros without being
 * read, a real row is summed whole, then its padded columns are zeroed and its sum taken
 * over the real ones. */
#define DEFINE_HEAD_SUM(NAME, T, U, EXP, SIGN, BYTES, TARGET)                            \
    typedef T NAME##_v __attribute__((vector_size(BYTES)));                              \
    typedef U NAME##_u __attribute__((vector_size(BYTES)));                              \
    enum { NAME##_W = BYTES / sizeof(T) };                                               \
    static inline void NAME##_flag(const T *p, U *special, U *signs)                     \
    {                                                                                    \
        U bits;                                                                          \
        memcpy(&bits, p, sizeof bits);                                                   \
        *special |= (U)0 - (U)((bits & EXP) == EXP);                                     \
        *signs |= bits;                                                                  \
    }                                                                                    \
    TARGET static int NAME(const T *x, T *out, T *row_sums, Py_ssize_t m_count, Py_ssize_t heads, \
                    Py_ssize_t n, const int64_t *lo, const int64_t *hi, int check_negative) \
    {                                                                                    \
        U special = 0, signs = 0;                                                        \
        NAME##_u vspecial = {0}, vsigns = {0};                                           \
        const NAME##_u exp_mask = (NAME##_u){0} + EXP;                                   \
        const Py_ssize_t nn = n * n, w = NAME##_W;                                       \
        for (Py_ssize_t m = 0; m < m_count; m++) {                                       \
            const T *xm = x + m * heads * nn;                                            \
            Py_ssize_t a = lo ? (Py_ssize_t)lo[m] : 0, b = hi ? (Py_ssize_t)hi[m] : n;   \
            if (a < 0) a = 0;                                                            \
            if (b > n) b = n;                                                            \
            for (Py_ssize_t i = 0; i < n; i++) {                                         \
                const T *xi = xm + i * n;                                                \
                T *dst = out + m * nn + i * n;                                           \
                const int row_checked = i >= a && i < b;                                 \
                NAME##_v row_total = {0};                                                \
                T tail_total = 0;                                                        \
                Py_ssize_t j = 0;                                                        \
                if (!row_checked && (lo || hi)) {     /* a padded query: a zero row */   \
                    memset(dst, 0, (size_t)n * sizeof(T));                               \
                    if (row_sums)                                                        \
                        row_sums[m * n + i] = 0;                                         \
                    continue;                                                            \
                }                                                                        \
                for (; j + w <= n; j += w) {                                             \
                    NAME##_v acc, v;                                                     \
                    memcpy(&acc, xi + j, sizeof acc);                                    \
                    if (row_checked && j >= a && j + w <= b) {                           \
                        NAME##_u bits = (NAME##_u)acc;                                   \
                        vspecial |= (NAME##_u)((bits & exp_mask) == exp_mask);           \
                        vsigns |= bits;                                                  \
                        for (Py_ssize_t h = 1; h < heads; h++) {                         \
                            memcpy(&v, xi + h * nn + j, sizeof v);                       \
                            acc += v;                                                    \
                            bits = (NAME##_u)v;                                          \
                            vspecial |= (NAME##_u)((bits & exp_mask) == exp_mask);       \
                            vsigns |= bits;                                              \
                        }                                                                \
                    } else {                                                             \
                        for (Py_ssize_t h = 1; h < heads; h++) {                         \
                            memcpy(&v, xi + h * nn + j, sizeof v);                       \
                            acc += v;                                                    \
                        }                                                                \
                        if (row_checked)                                                 \
                            for (Py_ssize_t h = 0; h < heads; h++)                       \
                                for (Py_ssize_t c = j > a ? j : a; c < j + w && c < b; c++) \
                                    NAME##_flag(xi + h * nn + c, &special, &signs);      \
                    }                                                                    \
                    memcpy(dst + j, &acc, sizeof acc);                                   \
                    row_total += acc;                                                    \
                }                                                                        \
                for (; j < n; j++) {                                                     \
                    T sum = 0;                                                           \
                    const int checked = row_checked && j >= a && j < b;                  \
                    for (Py_ssize_t h = 0; h < heads; h++) {                             \
                        sum += xi[h * nn + j];                                           \
                        if (checked)                                                     \
                            NAME##_flag(xi + h * nn + j, &special, &signs);              \
                    }                                                                    \
                    dst[j] = sum;                                                        \
                    tail_total += sum;                                                   \
                }                                                                        \
                if (lo || hi) {                       /* padded keys: zero columns */    \
                    if (a > 0)                                                           \
                        memset(dst, 0, (size_t)a * sizeof(T));                           \
                    if (b < n)                                                           \
                        memset(dst + b, 0, (size_t)(n - b) * sizeof(T));                 \
                    if (row_sums) {                                                      \
                        T total = 0;                                                     \
                        for (Py_ssize_t c = a; c < b; c++)                               \
                            total += dst[c];                                             \
                        row_sums[m * n + i] = total;                                     \
                    }                                                                    \
                } else if (row_sums) {                                                   \
                    for (int t = 0; t < NAME##_W; t++)                                   \
                        tail_total += row_total[t];                                      \
                    row_sums[m * n + i] = tail_total;                                    \
                }                                                                        \
            }                                                                            \
        }                                                                                \
        for (int t = 0; t < NAME##_W; t++) {                                             \
            special |= vspecial[t];                                                      \
            signs |= vsigns[t];                                                          \
        }                                                                                \
        return !special && !(check_negative && (signs & SIGN));                          \
    }

DEFINE_HEAD_SUM(head_sum_f32, float, uint32_t, 0x7f800000u, 0x80000000u, 16, )
DEFINE_HEAD_SUM(head_sum_f64, double, uint64_t, 0x7ff0000000000000ull, 0x8000000000000000ull, 16, )

/* On x86-64 CPUs with AVX2 the same code on 32-byte vectors, compiled for AVX2 and chosen at
 * run time: 27 % less time for TimeSformer-B's space attention (12 heads x 197 x 197); the
 * sums of out are the same (each entry's heads are added in the same order), the rows' sums
 * are added up in another order (they may differ in the last bit). */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_AVX2_CLONE 1
DEFINE_HEAD_SUM(head_sum_f32_avx2, float, uint32_t, 0x7f800000u, 0x80000000u, 32, __attribute__((target("avx2"))))
DEFINE_HEAD_SUM(head_sum_f64_avx2, double, uint64_t, 0x7ff0000000000000ull, 0x8000000000000000ull, 32,
                __attribute__((target("avx2"))))
#endif

static int get_buffer(PyObject *obj, Py_buffer *view, const char *name, int writable)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0) {
        PyErr_Format(PyExc_ValueError, "head_sum: %s must be a C-contiguous%s buffer", name,
                     writable ? " writable" : "");
        return -1;
    }
    return 0;
}

static int int64_entries(const Py_buffer *view, Py_ssize_t count)
{
    return (strcmp(view->format, "q") == 0 || strcmp(view->format, "l") == 0) && view->itemsize == 8 &&
           view->len == count * 8;
}

static int avx2 = 0;                   /* the CPU runs AVX2 (PyInit__fused) */

static PyObject *head_sum(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *x_obj, *out_obj, *sums_obj, *lo_obj, *hi_obj;
    Py_ssize_t heads, n;
    int check_negative, use_avx2 = avx2;
    if (!PyArg_ParseTuple(args, "OOOnnOOp|p", &x_obj, &out_obj, &sums_obj, &heads, &n, &lo_obj, &hi_obj,
                          &check_negative, &use_avx2))
        return NULL;
    Py_buffer x, out, sums = {0}, lo = {0}, hi = {0};
    int have_sums = sums_obj != Py_None, have_lo = lo_obj != Py_None, have_hi = hi_obj != Py_None, ok = 0;
    if (get_buffer(x_obj, &x, "x", 0) < 0)
        return NULL;
    if (get_buffer(out_obj, &out, "out", 1) < 0) {
        PyBuffer_Release(&x);
        return NULL;
    }
    PyObject *result = NULL;
    if ((have_sums && get_buffer(sums_obj, &sums, "row_sums", 1) < 0) ||
        (have_lo && get_buffer(lo_obj, &lo, "lo", 0) < 0) || (have_hi && get_buffer(hi_obj, &hi, "hi", 0) < 0))
        goto done;
    int is_f32 = strcmp(x.format, "f") == 0, is_f64 = strcmp(x.format, "d") == 0;
    Py_ssize_t item = is_f32 ? 4 : 8;
    if ((!is_f32 && !is_f64) || strcmp(x.format, out.format) != 0) {
        PyErr_Format(PyExc_ValueError, "head_sum: x and out must both be float32 or both float64; got %s and %s",
                     x.format, out.format);
        goto done;
    }
    if (heads < 1 || n < 1 || x.len % (heads * n * n * item) != 0) {
        PyErr_Format(PyExc_ValueError, "head_sum: %zd bytes of x are not [M, %zd, %zd, %zd]", x.len, heads, n, n);
        goto done;
    }
    Py_ssize_t m_count = x.len / (heads * n * n * item);
    if (out.len != m_count * n * n * item) {
        PyErr_Format(PyExc_ValueError, "head_sum: out has %zd bytes; [%zd, %zd, %zd] needs %zd", out.len,
                     m_count, n, n, m_count * n * n * item);
        goto done;
    }
    if (have_sums && (strcmp(sums.format, x.format) != 0 || sums.len != m_count * n * item)) {
        PyErr_Format(PyExc_ValueError, "head_sum: row_sums must be [%zd, %zd] of x's type (%zd bytes); got %zd bytes "
                     "of format %s", m_count, n, m_count * n * item, sums.len, sums.format);
        goto done;
    }
    if ((have_lo && !int64_entries(&lo, m_count)) || (have_hi && !int64_entries(&hi, m_count))) {
        PyErr_Format(PyExc_ValueError, "head_sum: lo and hi must be int64 buffers of %zd entries", m_count);
        goto done;
    }
    const int64_t *lo_p = have_lo ? (const int64_t *)lo.buf : NULL, *hi_p = have_hi ? (const int64_t *)hi.buf : NULL;
    int (*sum_f32)(const float *, float *, float *, Py_ssize_t, Py_ssize_t, Py_ssize_t, const int64_t *,
                   const int64_t *, int) = head_sum_f32;
    int (*sum_f64)(const double *, double *, double *, Py_ssize_t, Py_ssize_t, Py_ssize_t, const int64_t *,
                   const int64_t *, int) = head_sum_f64;
#ifdef HAVE_AVX2_CLONE
    if (use_avx2 && avx2) {
        sum_f32 = head_sum_f32_avx2;
        sum_f64 = head_sum_f64_avx2;
    }
#endif
    Py_BEGIN_ALLOW_THREADS
    if (is_f32)
        ok = sum_f32((const float *)x.buf, (float *)out.buf, have_sums ? (float *)sums.buf : NULL, m_count,
                     heads, n, lo_p, hi_p, check_negative);
    else
        ok = sum_f64((const double *)x.buf, (double *)out.buf, have_sums ? (double *)sums.buf : NULL, m_count,
                     heads, n, lo_p, hi_p, check_negative);
    Py_END_ALLOW_THREADS
    result = PyBool_FromLong(ok);
done:
    if (have_sums && sums.obj) PyBuffer_Release(&sums);
    if (have_lo && lo.obj) PyBuffer_Release(&lo);
    if (have_hi && hi.obj) PyBuffer_Release(&hi);
    PyBuffer_Release(&out);
    PyBuffer_Release(&x);
    return result;
}

static PyMethodDef methods[] = {
    {"head_sum", head_sum, METH_VARARGS,
     "head_sum(x, out, row_sums, heads, n, lo, hi, check_negative[, avx2]) -> bool: out[m] = sum_h x[m, h] "
     "(and, unless row_sums is None, its rows' sums) and whether every checked entry of x is finite (and >= 0 "
     "with check_negative); avx2=False: the 16-byte code even on an AVX2 CPU (default: AVX2 when the CPU has "
     "it); see _fused.c."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", NULL, -1, methods, NULL, NULL, NULL, NULL};

/* What the kernel does, as a number: rollout.py uses the kernel only when it is the one its
 * code expects (an editable install keeps the .so of its last pip install -e . after a pull
 * that changed this file). 2: padded rows and columns written as zeros. */
#define KERNEL_VERSION 2

PyMODINIT_FUNC PyInit__fused(void)
{
#ifdef HAVE_AVX2_CLONE
    __builtin_cpu_init();
    avx2 = __builtin_cpu_supports("avx2") != 0;
#endif
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "VERSION", KERNEL_VERSION) < 0
              || PyModule_AddIntConstant(m, "AVX2", avx2) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
