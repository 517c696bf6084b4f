/* Count and expected of VocabAttention's non-causal pairs, from each sequence's token
 * histogram (attnlab.aggregate).
 *
 * histogram_pairs(ce, tokens, side, upper) -> None
 *
 *   ce      float64 buffer, C-contiguous [side * side, 2], added to (a complex128 table
 *           count + i*expected viewed as pairs of float64: torch.view_as_real)
 *   tokens  int64 buffer, C-contiguous [B, N]: each row sorted ascending, ids in
 *           [0, side - 1]; side - 1 is the sink (masked positions), so a row's valid ids
 *           come first and its sink entries last
 *   upper   only the cells query id <= key id (the contributions are symmetric; the
 *           caller folds the table: ce += sym + sym^T - diag(sym))
 *
 * Without causality every valid query of sequence b has the same n_b valid keys, so the
 * sequence adds h_b[q] * h_b[k] to count[q, k] and h_b[q] * h_b[k] / n_b to expected[q, k]
 * for the distinct valid ids q, k of its histogram h_b: O(distinct ids^2) cells instead of
 * its N^2 position pairs. Each product is formed as torch forms it (float64 count, times
 * 1 / n_b); the sink row and column are never written.
 *
 * torch builds the same pairs with a dozen passes over them (gathers of ids and counts,
 * products, a complex tensor) and then scatters them: 3.4 ms for a batch of 32 x 128
 * uniform tokens of a 1,000-id vocabulary; this loop 1.3 ms (most of it the table's cache
 * misses). Rows are checked as they are read (sorted, in range): a bad row raises
 * ValueError; rows before it have been added. The GIL is released.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Adds the rows' pairs; returns -1 - (the first bad row) if a row is not sorted or holds an
 * id outside [0, side - 1]. ids and mult: scratch of n entries. */
static Py_ssize_t add_rows(double *ce, Py_ssize_t side, const int64_t *tokens, Py_ssize_t rows, Py_ssize_t n,
                           int upper, int64_t *ids, double *mult)
{
    const int64_t sink = (int64_t)side - 1;
    for (Py_ssize_t b = 0; b < rows; b++) {
        const int64_t *row = tokens + b * n;
        Py_ssize_t u = 0, valid = 0;
        for (Py_ssize_t p = 0; p < n; p++) {
            const int64_t t = row[p];
            if (t < 0 || t > sink || (p > 0 && t < row[p - 1]))
                return -1 - b;
            if (t == sink) {                 /* sorted: the rest is sink too (checked) */
                for (Py_ssize_t r = p + 1; r < n; r++)
                    if (row[r] != sink)
                        return -1 - b;
                break;
            }
            valid++;
            if (u > 0 && ids[u - 1] == t) {
                mult[u - 1] += 1.0;
            } else {
                ids[u] = t;
                mult[u] = 1.0;
                u++;
            }
        }
        const double inv = 1.0 / (double)(valid > 0 ? valid : 1);
        for (Py_ssize_t i = 0; i < u; i++) {
            double *query_row = ce + 2 * (Py_ssize_t)ids[i] * side;
            const double mi = mult[i];
            for (Py_ssize_t j = upper ? i : 0; j < u; j++) {
                const double count = mi * mult[j];
                double *cell = query_row + 2 * (Py_ssize_t)ids[j];
                cell[0] += count;
                cell[1] += count * inv;
            }
        }
    }
    return 0;
}

static PyObject *histogram_pairs(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *ce_obj, *tok_obj;
    Py_ssize_t side;
    int upper;
    if (!PyArg_ParseTuple(args, "OOnp", &ce_obj, &tok_obj, &side, &upper))
        return NULL;
    Py_buffer ce, tok;
    if (PyObject_GetBuffer(ce_obj, &ce, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
        PyErr_SetString(PyExc_ValueError, "histogram_pairs: ce must be a C-contiguous writable buffer");
        return NULL;
    }
    if (PyObject_GetBuffer(tok_obj, &tok, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&ce);
        PyErr_SetString(PyExc_ValueError, "histogram_pairs: tokens must be a C-contiguous buffer");
        return NULL;
    }
    PyObject *result = NULL;
    int64_t *ids = NULL;
    double *mult = NULL;
    if (side < 1 || side > ((Py_ssize_t)1 << 24) || strcmp(ce.format, "d") != 0 || ce.len != side * side * 16) {
        PyErr_Format(PyExc_ValueError, "histogram_pairs: ce must be float64 [side^2, 2] = %zd bytes for side %zd; "
                     "got %zd bytes of format %s", side * side * 16, side, ce.len, ce.format);
        goto done;
    }
    if ((strcmp(tok.format, "q") != 0 && strcmp(tok.format, "l") != 0) || tok.itemsize != 8 || tok.ndim != 2) {
        PyErr_Format(PyExc_ValueError, "histogram_pairs: tokens must be int64 [B, N]; got format %s, %d dimensions",
                     tok.format, tok.ndim);
        goto done;
    }
    Py_ssize_t rows = tok.shape[0], n = tok.shape[1];
    ids = malloc((size_t)(n + 1) * sizeof *ids);
    mult = malloc((size_t)(n + 1) * sizeof *mult);
    if (!ids || !mult) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = add_rows((double *)ce.buf, side, (const int64_t *)tok.buf, rows, n, upper, ids, mult);
    Py_END_ALLOW_THREADS
    if (bad < 0) {
        PyErr_Format(PyExc_ValueError, "histogram_pairs: tokens row %zd is not sorted ascending with ids in "
                     "[0, %zd] (the sink %zd last)", -1 - bad, side - 1, side - 1);
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    free(ids);
    free(mult);
    PyBuffer_Release(&tok);
    PyBuffer_Release(&ce);
    return result;
}

static PyMethodDef methods[] = {
    {"histogram_pairs", histogram_pairs, METH_VARARGS,
     "histogram_pairs(ce, tokens, side, upper) -> None: add each sorted row's histogram pairs "
     "(count h_q*h_k, expected h_q*h_k/n_valid) into the float64 [side^2, 2] table ce; see _vocab.c."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_vocab", NULL, -1, methods, NULL, NULL, NULL, NULL};

/* What the kernel does, as a number: aggregate.py uses it only when it is the one its code
 * expects (an editable install keeps the .so of its last pip install -e .). */
#define KERNEL_VERSION 1

PyMODINIT_FUNC PyInit__vocab(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "VERSION", KERNEL_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
