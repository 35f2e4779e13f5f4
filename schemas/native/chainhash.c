/* kvrelay.schemas._chainhash: the block-hash chain of schemas/hashing.py in C.
 *
 *   h_{-1} = root;  h_i = XXH64(block i as little-endian uint32 token ids, seed = h_{i-1})
 *
 * XXH64 is written here from its public specification (xxhash.com, "xxHash fast digest
 * algorithm", XXH64); tests/schemas/test_hashing.py checks it against an independent
 * Python transcription of the specification on many lengths and seeds, and every hashing test runs on
 * both this chain and the pure-Python one.
 *
 * Python API (validation of block_size/root is done by the caller, schemas/hashing.py):
 *   chain_seq(tokens: list | tuple, block_size, seed, start_block) -> list[int]
 *       hashes of full blocks start_block.. of the token ids; TypeError / OverflowError for a
 *       token that is not an int in [0, 2**32)
 *   chain_bytes(data: bytes-like, step, seed) -> list[int]
 *       hashes of each full `step`-byte block of data
 *   xxh64(data: bytes-like, seed) -> int
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define P1 0x9E3779B185EBCA87ULL
#define P2 0xC2B2AE3D27D4EB4FULL
#define P3 0x165667B19E3779F9ULL
#define P4 0x85EBCA77C2B2AE63ULL
#define P5 0x27D4EB2F165667C5ULL

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t rd64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline uint32_t rd32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline uint64_t xround(uint64_t acc, uint64_t lane) {
    acc += lane * P2;
    acc = rotl64(acc, 31);
    return acc * P1;
}

static inline uint64_t xmerge(uint64_t acc, uint64_t v) {
    acc ^= xround(0, v);
    return acc * P1 + P4;
}

static uint64_t xxh64(const uint8_t *p, size_t len, uint64_t seed) {
    const uint8_t *end = p + len;
    uint64_t h;
    if (len >= 32) {
        uint64_t v1 = seed + P1 + P2, v2 = seed + P2, v3 = seed, v4 = seed - P1;
        const uint8_t *limit = end - 32;
        do {  /* 32-byte stripes, four lanes */
            v1 = xround(v1, rd64(p));
            v2 = xround(v2, rd64(p + 8));
            v3 = xround(v3, rd64(p + 16));
            v4 = xround(v4, rd64(p + 24));
            p += 32;
        } while (p <= limit);
        h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
        h = xmerge(h, v1);
        h = xmerge(h, v2);
        h = xmerge(h, v3);
        h = xmerge(h, v4);
    } else {
        h = seed + P5;
    }
    h += (uint64_t)len;
    for (; p + 8 <= end; p += 8) {
        h ^= xround(0, rd64(p));
        h = rotl64(h, 27) * P1 + P4;
    }
    if (p + 4 <= end) {
        h ^= (uint64_t)rd32(p) * P1;
        h = rotl64(h, 23) * P2 + P3;
        p += 4;
    }
    for (; p < end; p++) {
        h ^= (uint64_t)(*p) * P5;
        h = rotl64(h, 11) * P1;
    }
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    return h;
}

/* One token id -> uint32 (little-endian bytes at out). -1 with an exception set when bad. */
static inline int put_token(PyObject *item, uint8_t *out) {
    unsigned long v;
    if (!PyLong_CheckExact(item) && !PyLong_Check(item)) {
        PyErr_Format(PyExc_TypeError, "token ids must be ints, got %.80s", Py_TYPE(item)->tp_name);
        return -1;
    }
#if PY_VERSION_HEX >= 0x030C0000
    if (PyLong_CheckExact(item) && PyUnstable_Long_IsCompact((PyLongObject *)item)) {
        Py_ssize_t c = PyUnstable_Long_CompactValue((PyLongObject *)item);
        if (c < 0) {
            PyErr_SetString(PyExc_OverflowError, "token ids must not be negative");
            return -1;
        }
        v = (unsigned long)c;
    } else
#else
    if (PyLong_CheckExact(item) && Py_SIZE(item) == 1) /* one 30-bit digit: the common case */
        v = ((PyLongObject *)item)->ob_digit[0];
    else
#endif
    {
        v = PyLong_AsUnsignedLong(item);
        if (v == (unsigned long)-1 && PyErr_Occurred())
            return -1;
    }
    if (v > 0xFFFFFFFFUL) {
        PyErr_Format(PyExc_OverflowError, "token id %lu is over 2**32 - 1", v);
        return -1;
    }
    out[0] = (uint8_t)v;
    out[1] = (uint8_t)(v >> 8);
    out[2] = (uint8_t)(v >> 16);
    out[3] = (uint8_t)(v >> 24);
    return 0;
}

static PyObject *chain_seq(PyObject *self, PyObject *args) {
    PyObject *obj, *seq, *out = NULL;
    Py_ssize_t bs, start, n, nblocks;
    unsigned long long seed;
    uint8_t *buf = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "OnKn:chain_seq", &obj, &bs, &seed, &start))
        return NULL;
    if (bs < 1 || start < 0) {
        PyErr_SetString(PyExc_ValueError, "block_size >= 1 and start_block >= 0 are required");
        return NULL;
    }
    seq = PySequence_Fast(obj, "token ids must be a list or a tuple");
    if (seq == NULL)
        return NULL;
    n = PySequence_Fast_GET_SIZE(seq);
    nblocks = n / bs;
    if (start > nblocks)
        start = nblocks;
    out = PyList_New(nblocks - start);
    buf = PyMem_Malloc((size_t)bs * 4);
    if (out == NULL || buf == NULL)
        goto fail;
    {
        PyObject **items = PySequence_Fast_ITEMS(seq);
        uint64_t h = seed;
        for (Py_ssize_t b = start; b < nblocks; b++) {
            PyObject **blk = items + b * bs;
            for (Py_ssize_t j = 0; j < bs; j++)
                if (put_token(blk[j], buf + 4 * j) < 0)
                    goto fail;
            h = xxh64(buf, (size_t)bs * 4, h);
            PyObject *v = PyLong_FromUnsignedLongLong(h);
            if (v == NULL)
                goto fail;
            PyList_SET_ITEM(out, b - start, v);
        }
    }
    PyMem_Free(buf);
    Py_DECREF(seq);
    return out;
fail:
    if (buf == NULL && !PyErr_Occurred())
        PyErr_NoMemory();
    PyMem_Free(buf);
    Py_XDECREF(out);
    Py_DECREF(seq);
    return NULL;
}

static PyObject *chain_bytes(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t step;
    unsigned long long seed;
    PyObject *out;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nK:chain_bytes", &view, &step, &seed))
        return NULL;
    if (step < 1) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "step >= 1 is required");
        return NULL;
    }
    Py_ssize_t nblocks = view.len / step;
    out = PyList_New(nblocks);
    if (out != NULL) {
        const uint8_t *p = view.buf;
        uint64_t h = seed;
        for (Py_ssize_t b = 0; b < nblocks; b++) {
            h = xxh64(p + b * step, (size_t)step, h);
            PyObject *v = PyLong_FromUnsignedLongLong(h);
            if (v == NULL) {
                Py_CLEAR(out);
                break;
            }
            PyList_SET_ITEM(out, b, v);
        }
    }
    PyBuffer_Release(&view);
    return out;
}

static PyObject *py_xxh64(PyObject *self, PyObject *args) {
    Py_buffer view;
    unsigned long long seed = 0;
    uint64_t h;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*|K:xxh64", &view, &seed))
        return NULL;
    h = xxh64(view.buf, (size_t)view.len, seed);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(h);
}

static PyMethodDef methods[] = {
    {"chain_seq", chain_seq, METH_VARARGS, "Chained XXH64 of full blocks of token ids (list/tuple)."},
    {"chain_bytes", chain_bytes, METH_VARARGS, "Chained XXH64 of full step-byte blocks of a buffer."},
    {"xxh64", py_xxh64, METH_VARARGS, "XXH64 of a buffer."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_chainhash", "Chained XXH64 block hashes (see schemas/hashing.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__chainhash(void) { return PyModule_Create(&module); }
