/* The C prefix index: match (binary search and linear walk, as router/index_match.py). */
#include "holders.h"

/* ---------------------------------------------------------------- Python methods: match */
/* Scratch words: zero, active, tmp (W each). */
static int ensure_scratch(Table *t) {
    size_t W = t->W, need = 3 * W;
    if (t->scratch_words >= need)
        return 0;
    uint64_t *s = PyMem_Realloc(t->scratch, need * 8);
    if (s == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memset(s, 0, need * 8);
    t->scratch = s;
    t->scratch_words = need;
    return 0;
}

/* The mask of one hash (an all-zero mask when not indexed); NULL with an exception when bad. */
static inline const uint64_t *mask_of(Table *t, PyObject *item) {
    uint64_t h = PyLong_AsUnsignedLongLong(item);
    if (h == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    uint32_t id = map_get(&t->table, h);
    return id ? MASK(t, id) : t->scratch;
}

static int append_record(PyObject *out, const uint64_t *m, uint32_t W, Py_ssize_t depth) {
    PyObject *mask = mask_to_long(m, W), *d = PyLong_FromSsize_t(depth);
    PyObject *rec = (mask && d) ? PyTuple_Pack(2, mask, d) : NULL;
    Py_XDECREF(mask);
    Py_XDECREF(d);
    if (rec == NULL)
        return -1;
    int rc = PyList_Append(out, rec);
    Py_DECREF(rec);
    return rc;
}

/* The linear reference walk from `active` (index_match.walk). */
static PyObject *walk(Table *t, PyObject **items, Py_ssize_t n, uint64_t *a) {
    uint32_t W = t->W;
    uint64_t *held = t->scratch + 2 * W;
    Py_ssize_t depth = 0;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint64_t *m = mask_of(t, items[i]);
        int same = 1;
        if (m == NULL)
            goto fail;
        for (uint32_t w = 0; w < W; w++) {
            held[w] = m[w] & a[w];
            same &= held[w] == a[w];
        }
        if (!same) {
            if (depth) {
                for (uint32_t w = 0; w < W; w++)
                    a[w] &= ~held[w];
                if (append_record(out, a, W, depth) < 0)
                    goto fail;
            }
            memcpy(a, held, (size_t)W * 8);
            if (is_zero(a, W))
                break;
        }
        depth++;
    }
    if (!is_zero(a, W) && depth && append_record(out, a, W, depth) < 0)
        goto fail;
    if (PyList_Reverse(out) < 0)
        goto fail;
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* resolve's stack of (lo, hi, mask) entries: room for one more, grown by doubling (a query
 * rarely needs more than a few; at most min(blocks, workers) in the worst case). */
static uint64_t *rstack_entry(Table *t, size_t sp, size_t ent) {
    if ((sp + 1) * ent > t->rstack_words) {
        size_t words = t->rstack_words ? t->rstack_words * 2 : 16 * ent;
        while (words < (sp + 1) * ent)
            words *= 2;
        uint64_t *s = PyMem_Realloc(t->rstack, words * 8);
        if (s == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        t->rstack = s;
        t->rstack_words = words;
    }
    return t->rstack + sp * ent;
}

/* Binary-search resolution (index_match.resolve), given a = first & usable, non-zero. */
static PyObject *resolve(Table *t, PyObject **items, Py_ssize_t n, uint64_t *a) {
    uint32_t W = t->W;
    uint64_t *deeper = t->scratch + 2 * W;
    size_t sp = 0, ent = W + 2;
    Py_ssize_t lo = 1, hi = n;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (;;) {
        while (lo < hi) {
            Py_ssize_t mid = (lo + hi + 1) >> 1;
            const uint64_t *m = mask_of(t, items[mid - 1]);
            int any = 0, same = 1;
            if (m == NULL)
                goto fail;
            for (uint32_t w = 0; w < W; w++) {
                deeper[w] = m[w] & a[w];
                any |= deeper[w] != 0;
                same &= deeper[w] == a[w];
            }
            if (!any) {
                hi = mid - 1;
                continue;
            }
            if (!same) {  /* the workers that stop below mid: resolved later, shallower */
                uint64_t *e = rstack_entry(t, sp++, ent);
                if (e == NULL)
                    goto fail;
                e[0] = (uint64_t)lo, e[1] = (uint64_t)(mid - 1);
                for (uint32_t w = 0; w < W; w++)
                    e[2 + w] = a[w] ^ deeper[w];
                memcpy(a, deeper, (size_t)W * 8);
            }
            lo = mid;
        }
        if (append_record(out, a, W, lo) < 0)
            goto fail;
        if (!sp)
            return out;
        uint64_t *e = t->rstack + --sp * ent;
        lo = (Py_ssize_t)e[0], hi = (Py_ssize_t)e[1];
        memcpy(a, e + 2, (size_t)W * 8);
    }
fail:
    Py_DECREF(out);
    return NULL;
}

static PyObject *match_impl(Table *t, PyObject *arg, int linear) {
    if (!ready(t))
        return NULL;
    PyObject *seq = PySequence_Fast(arg, "hashes must be a list or a tuple"), *out;
    if (seq == NULL || ensure_scratch(t) < 0) {
        Py_XDECREF(seq);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    uint32_t W = t->W;
    uint64_t *a = t->scratch + W;
    if (n == 0) {
        Py_DECREF(seq);
        return PyList_New(0);
    }
    if (linear) {
        memcpy(a, t->usable, (size_t)W * 8);
        out = walk(t, items, n, a);
        Py_DECREF(seq);
        return out;
    }
    const uint64_t *m = mask_of(t, items[0]);
    int any = 0, unlinked = 0;
    if (m == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    for (uint32_t w = 0; w < W; w++) {
        a[w] = m[w] & t->usable[w];
        any |= a[w] != 0;
        unlinked |= (a[w] & t->unlinked[w]) != 0;
    }
    if (!any)
        out = PyList_New(0);
    else if (unlinked) {  /* snapshot entries are not prefix-closed: walk */
        memcpy(a, t->usable, (size_t)W * 8);
        out = walk(t, items, n, a);
    } else
        out = resolve(t, items, n, a);
    Py_DECREF(seq);
    return out;
}

PyObject *T_match(Table *t, PyObject *arg) { return match_impl(t, arg, 0); }

PyObject *T_match_linear(Table *t, PyObject *arg) { return match_impl(t, arg, 1); }

PyObject *T_touch(Table *t, PyObject *args) {
    PyObject *obj, *seq;
    Py_ssize_t depth;
    if (!ready(t) || !PyArg_ParseTuple(args, "On:touch", &obj, &depth))
        return NULL;
    if ((seq = PySequence_Fast(obj, "hashes must be a list or a tuple")) == NULL)
        return NULL;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    if (depth > PySequence_Fast_GET_SIZE(seq))
        depth = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = depth - 1; i >= 0; i--) {  /* root last: the most recent */
        uint64_t h = PyLong_AsUnsignedLongLong(items[i]);
        if (h == (uint64_t)-1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
        uint32_t id = map_get(&t->table, h);
        if (id)
            lru_touch(t, id);
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

