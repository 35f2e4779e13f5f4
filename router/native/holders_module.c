/* kvrelay.router._holders: the HolderTable type (the design: holders_table.c). */
#include "holders.h"

/* A registered slot from a Python int; -1 with an exception for anything else. */
static int get_slot(Table *t, PyObject *o, unsigned int *slot) {
    unsigned long v = PyLong_AsUnsignedLong(o);
    if (v == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    if (v >= t->nslots) {
        PyErr_Format(PyExc_ValueError, "slot %lu is not registered (add_slot first)", v);
        return -1;
    }
    *slot = (unsigned int)v;
    return 0;
}

static Py_ssize_t packed_len(Py_buffer *b) {
    if (b->len % 8) {
        PyErr_Format(PyExc_ValueError, "packed hashes must be a multiple of 8 bytes, got %zd", b->len);
        return -1;
    }
    return b->len / 8;
}

/* ---------------------------------------------------------------- Python methods: changes */
/* Link each hash to the one before it (the first to p) unless it is linked already, or the link
 * would close a cycle (a hostile or broken worker's chains: counted in refused_links). */
static void link_chain(Table *t, uint32_t p, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t c = t->stack[i], up = i ? t->stack[i - 1] : p;
        if (!up || up == c || t->nodes[c].parent)
            continue;
        if (t->nodes[c].child && is_ancestor(t, c, up)) {
            t->refused_links++;
            continue;
        }
        link_child(t, up, c);
    }
}

/* The chain in b stored by slot under parent (None: from the root): n, or 0 for a chain with a
 * repeated hash (bad_chains) or under a parent slot does not hold (orphan_blocks); -1: error.
 * The parent is made the most recent first, so making room never evicts it. */
static Py_ssize_t do_store(Table *t, unsigned int slot, Py_buffer *b, Py_ssize_t n, PyObject *parent) {
    uint32_t p = NIL;
    uint64_t ph = 0;
    if (parent != Py_None) {
        ph = PyLong_AsUnsignedLongLong(parent);
        if (ph == (uint64_t)-1 && PyErr_Occurred())
            return -1;
    }
    int rep = has_repeat(t, b, n, parent != Py_None, ph);
    if (rep < 0)
        return -1;
    if (rep) {
        t->bad_chains++;
        return 0;
    }
    if (parent != Py_None) {
        p = map_get(&t->table, ph);
        if (!p || !has_bit(MASK(t, p), slot)) {
            t->orphan_blocks += (uint64_t)n;
            return 0;
        }
        lru_touch(t, p);
    }
    make_room(t, (uint64_t)n, p);  /* never evicts p: the ids below stay valid */
    if (set_refs(t, slot, b, n) < 0)
        return -1;
    link_chain(t, p, n);
    return n;
}

/* Snapshot entries (no chain, no links): n or -1. */
static Py_ssize_t do_store_unlinked(Table *t, unsigned int slot, Py_buffer *b, Py_ssize_t n, PyObject *unused) {
    make_room(t, (uint64_t)n, NIL);
    if (n) {
        t->unlinked[slot >> 6] |= 1ULL << (slot & 63);
        if (set_refs(t, slot, b, n) < 0)
            return -1;
    }
    return n;
}

/* One reference of each hash in b dropped by slot (the last one cascades): n or -1. */
static Py_ssize_t do_remove(Table *t, unsigned int slot, Py_buffer *b, Py_ssize_t n, PyObject *unused) {
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t id = map_get(&t->table, hash_at(b, i));
        if (!id || !has_bit(MASK(t, id), slot)) {
            t->unknown_removes++;  /* evicted by the cap, never seen, or cascaded */
            continue;
        }
        uint32_t r = t->nodes[id].nextra ? map_get(&t->extra, xkey(id, slot)) : 0;
        if (r > 1) {
            t->extra.cells[map_slot(&t->extra, xkey(id, slot))].val = r - 1;
        } else if (r == 1) {
            map_del(&t->extra, xkey(id, slot));
            t->nodes[id].nextra--;
        } else if (cascade(t, id, slot) < 0) {
            return -1;
        }
    }
    return n;
}

typedef Py_ssize_t (*PackedOp)(Table *, unsigned int, Py_buffer *, Py_ssize_t, PyObject *);

/* Parse (slot, packed hashes[, extra]), check them, run op, release the buffer. */
static PyObject *packed_call(Table *t, PyObject *args, const char *fmt, PackedOp op) {
    unsigned int slot;
    Py_buffer b;
    PyObject *slot_obj, *extra = NULL;
    Py_ssize_t n, r = -1;
    if (!ready(t) || !PyArg_ParseTuple(args, fmt, &slot_obj, &b, &extra))
        return NULL;
    if (get_slot(t, slot_obj, &slot) == 0 && (n = packed_len(&b)) >= 0)
        r = op(t, slot, &b, n, extra);
    PyBuffer_Release(&b);
    return r < 0 ? NULL : PyLong_FromSsize_t(r);
}

static PyObject *T_store(Table *t, PyObject *args) { return packed_call(t, args, "Oy*O:store", do_store); }

static PyObject *T_store_unlinked(Table *t, PyObject *args) {
    return packed_call(t, args, "Oy*:store_unlinked", do_store_unlinked);
}

static PyObject *T_remove(Table *t, PyObject *args) { return packed_call(t, args, "Oy*:remove", do_remove); }

static PyObject *T_sweep(Table *t, PyObject *arg) {
    unsigned int slot;
    if (!ready(t) || get_slot(t, arg, &slot) < 0)
        return NULL;
    size_t sp = 0;  /* the slot's extra references first: collect their nodes, then drop */
    for (uint64_t i = 0; i <= t->extra.mask; i++) {
        Cell *c = &t->extra.cells[i];
        if (c->val && (c->key & 0xFFFF) == slot && push(t, &sp, (uint32_t)(c->key >> 16)) < 0)
            return NULL;
    }
    while (sp)
        drop_extra(t, t->stack[--sp], (uint32_t)slot);
    uint64_t bit = 1ULL << (slot & 63);
    size_t w = slot >> 6;
    for (uint32_t n = 1; n <= t->top; n++) {
        if (t->nodes[n].alive && (MASK(t, n)[w] & bit)) {
            MASK(t, n)[w] &= ~bit;
            if (is_zero(MASK(t, n), t->W))
                node_delete(t, n);
        }
    }
    t->held[slot] = 0;
    t->unlinked[w] &= ~bit;
    Py_RETURN_NONE;
}

static PyObject *T_evict(Table *t, PyObject *arg) {
    if (!ready(t))
        return NULL;
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n > 0)
        evict(t, (uint64_t)n, NIL);
    Py_RETURN_NONE;
}

static PyObject *T_add_slot(Table *t, PyObject *arg) {
    if (!ready(t))
        return NULL;
    unsigned long slot = PyLong_AsUnsignedLong(arg);
    if (slot == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (slot >= MAX_SLOTS)
        return PyErr_Format(PyExc_ValueError, "slot %lu is over the limit of %d", slot, MAX_SLOTS - 1);
    if (ensure_width(t, (uint32_t)slot) < 0)
        return NULL;
    if (slot >= t->nslots) {
        uint64_t *h = PyMem_Realloc(t->held, (slot + 1) * 8);
        if (h == NULL)
            return PyErr_NoMemory();
        memset(h + t->nslots, 0, (slot + 1 - t->nslots) * 8);
        t->held = h;
        t->nslots = (uint32_t)slot + 1;
    }
    t->held[slot] = 0;
    Py_RETURN_NONE;
}

static PyObject *T_set_usable(Table *t, PyObject *arg) {
    if (!ready(t) || long_to_mask(arg, t->usable, t->W) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- Python methods: state */
static PyObject *T_get(Table *t, PyObject *arg) {
    if (!ready(t))
        return NULL;
    uint64_t h = PyLong_AsUnsignedLongLong(arg);
    if (h == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    uint32_t id = map_get(&t->table, h);
    return id ? mask_to_long(MASK(t, id), t->W) : PyLong_FromLong(0);
}

static PyObject *T_held(Table *t, PyObject *arg) {
    if (!ready(t))
        return NULL;
    unsigned long slot = PyLong_AsUnsignedLong(arg);
    if (slot == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    return PyLong_FromUnsignedLongLong(slot < t->nslots ? t->held[slot] : 0);
}

static PyObject *T_slot_hashes(Table *t, PyObject *arg) {
    unsigned int slot;
    if (!ready(t) || get_slot(t, arg, &slot) < 0)
        return NULL;
    PyObject *out = PyList_New(0);
    for (uint32_t n = t->lru_head; out && n; n = t->nodes[n].next) {
        if (has_bit(MASK(t, n), (uint32_t)slot)) {
            PyObject *v = PyLong_FromUnsignedLongLong(t->nodes[n].key);
            if (v == NULL || PyList_Append(out, v) < 0)
                Py_CLEAR(out);
            Py_XDECREF(v);
        }
    }
    for (uint64_t i = 0; out && i <= t->extra.mask; i++) {
        Cell *c = &t->extra.cells[i];
        if (!c->val || (c->key & 0xFFFF) != slot)
            continue;
        PyObject *v = PyLong_FromUnsignedLongLong(t->nodes[c->key >> 16].key);
        for (uint32_t r = 0; v && out && r < c->val; r++)
            if (PyList_Append(out, v) < 0)
                Py_CLEAR(out);
        if (v == NULL)
            Py_CLEAR(out);
        Py_XDECREF(v);
    }
    return out;
}

static PyObject *T_counts(Table *t, PyObject *unused) {
    return Py_BuildValue("{sKsKsKsKsKsK}", "orphan_blocks", t->orphan_blocks, "evictions", t->evictions,
                         "unknown_removes", t->unknown_removes, "cascaded_blocks", t->cascaded_blocks,
                         "bad_chains", t->bad_chains, "refused_links", t->refused_links);
}

static PyObject *T_nbytes(Table *t, PyObject *unused) {
    size_t b = (t->table.mask + 1 + t->extra.mask + 1) * sizeof(Cell);
    b += (size_t)t->cap_nodes * (sizeof(Node) + 8 * t->W) + (size_t)t->nslots * 8;
    b += (t->scratch_words + t->rstack_words) * 8 + t->stack_cap * 4 + t->set_cap * 12;
    return PyLong_FromSize_t(b);
}

static PyObject *T_unlinked(Table *t, void *closure) {
    return ready(t) ? mask_to_long(t->unlinked, t->W) : NULL;
}

static Py_ssize_t T_len(Table *t) { return ready(t) ? (Py_ssize_t)t->count : -1; }

#define CHECK(cond, ...)                                  \
    do {                                                  \
        if (!(cond)) {                                    \
            PyErr_Format(PyExc_AssertionError, __VA_ARGS__); \
            return NULL;                                  \
        }                                                 \
    } while (0)

/* Every invariant, O(everything): for tests. */
static PyObject *T_check(Table *t, PyObject *unused) {
    if (!ready(t))
        return NULL;
    uint64_t alive = 0, lru = 0;
    for (uint32_t n = 1; n <= t->top; n++) {
        Node *x = &t->nodes[n];
        if (!x->alive)
            continue;
        alive++;
        CHECK(map_get(&t->table, x->key) == n, "node %u is not in the table", n);
        CHECK(!is_zero(MASK(t, n), t->W), "node %u has no holder", n);
        if (x->parent) {
            uint32_t c = t->nodes[x->parent].child;
            while (c && c != n)
                c = t->nodes[c].snext;
            CHECK(t->nodes[x->parent].alive && c == n, "node %u is not among its parent's children", n);
        }
        for (uint32_t c = x->child; c; c = t->nodes[c].snext)
            CHECK(t->nodes[c].alive && t->nodes[c].parent == n, "child %u of %u is stale", c, n);
    }
    CHECK(alive == t->count && t->table.count == t->count, "count %llu, alive %llu, table %llu",
          (unsigned long long)t->count, (unsigned long long)alive, (unsigned long long)t->table.count);
    for (uint32_t n = t->lru_head, prev = NIL; n; prev = n, n = t->nodes[n].next, lru++)
        CHECK(t->nodes[n].alive && t->nodes[n].prev == prev && lru < alive, "LRU list broken at %u", n);
    CHECK(lru == alive, "LRU list holds %llu of %llu nodes", (unsigned long long)lru, (unsigned long long)alive);
    for (uint32_t s = 0; s < t->nslots; s++) {
        uint64_t k = 0;
        for (uint32_t n = 1; n <= t->top; n++)
            k += t->nodes[n].alive && has_bit(MASK(t, n), s);
        CHECK(k == t->held[s], "slot %u holds %llu, counted %llu", s, (unsigned long long)k,
              (unsigned long long)t->held[s]);
    }
    for (uint64_t i = 0; i <= t->extra.mask; i++) {
        Cell *c = &t->extra.cells[i];
        if (!c->val)
            continue;
        uint32_t n = (uint32_t)(c->key >> 16), s = (uint32_t)(c->key & 0xFFFF);
        CHECK(n <= t->top && t->nodes[n].alive && has_bit(MASK(t, n), s) && t->nodes[n].nextra,
              "stale extra reference (node %u, slot %u)", n, s);
    }
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- type */
static int T_init(Table *t, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"max_blocks", "seed", NULL};
    PyObject *mb_obj, *seed_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO:HolderTable", kwlist, &mb_obj, &seed_obj))
        return -1;
    unsigned long long max_blocks = PyLong_AsUnsignedLongLong(mb_obj);
    if (max_blocks == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    unsigned long long seed = PyLong_AsUnsignedLongLong(seed_obj);  /* a seed of 2**64 - 1 is fine */
    if (seed == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (max_blocks < 1 || max_blocks > (1ULL << 31)) {
        PyErr_SetString(PyExc_ValueError, "max_blocks must be in [1, 2**31]");
        return -1;
    }
    if (t->nodes != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "HolderTable is already initialised");
        return -1;
    }
    PyMem_Free(t->usable);  /* what an __init__ that failed half-way left */
    PyMem_Free(t->unlinked);
    PyMem_Free(t->table.cells);
    PyMem_Free(t->extra.cells);
    t->usable = t->unlinked = NULL;
    t->table.cells = t->extra.cells = NULL;
    t->max_blocks = max_blocks;
    t->evict_chunk = max_blocks / 64 ? max_blocks / 64 : 1;
    t->W = 1;
    t->usable = PyMem_Calloc(1, 8);
    t->unlinked = PyMem_Calloc(1, 8);
    if (t->usable == NULL || t->unlinked == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (map_init(&t->table, 1024, seed) < 0 || map_init(&t->extra, 64, seed ^ 0x9E3779B97F4A7C15ULL) < 0)
        return -1;
    return grow_nodes(t);
}

static void T_dealloc(Table *t) {
    PyMem_Free(t->table.cells);
    PyMem_Free(t->extra.cells);
    PyMem_Free(t->nodes);
    PyMem_Free(t->masks);
    PyMem_Free(t->usable);
    PyMem_Free(t->unlinked);
    PyMem_Free(t->held);
    PyMem_Free(t->scratch);
    PyMem_Free(t->rstack);
    PyMem_Free(t->set_keys);
    PyMem_Free(t->set_gen);
    PyMem_Free(t->stack);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyMethodDef T_methods[] = {
    {"add_slot", (PyCFunction)T_add_slot, METH_O, "Register a worker slot (its held count starts at 0)."},
    {"set_usable", (PyCFunction)T_set_usable, METH_O, "The slots match may report (an int bitmask)."},
    {"store", (PyCFunction)T_store, METH_VARARGS, "store(slot, packed, parent) -> blocks stored"},
    {"store_unlinked", (PyCFunction)T_store_unlinked, METH_VARARGS, "store_unlinked(slot, packed)"},
    {"remove", (PyCFunction)T_remove, METH_VARARGS, "remove(slot, packed) -> hashes given"},
    {"sweep", (PyCFunction)T_sweep, METH_O, "Drop every entry of one slot."},
    {"evict", (PyCFunction)T_evict, METH_O, "Evict the n least recently used leaves."},
    {"match", (PyCFunction)T_match, METH_O, "[(mask, depth)] deepest first."},
    {"match_linear", (PyCFunction)T_match_linear, METH_O, "match by the linear walk."},
    {"touch", (PyCFunction)T_touch, METH_VARARGS, "touch(hashes, depth): most recent, root last."},
    {"get", (PyCFunction)T_get, METH_O, "The holders mask of one hash (0: not indexed)."},
    {"held", (PyCFunction)T_held, METH_O, "Distinct hashes a slot holds."},
    {"slot_hashes", (PyCFunction)T_slot_hashes, METH_O, "Every hash a slot holds, with repeats."},
    {"counts", (PyCFunction)T_counts, METH_NOARGS, "Counters."},
    {"nbytes", (PyCFunction)T_nbytes, METH_NOARGS, "Bytes allocated."},
    {"check", (PyCFunction)T_check, METH_NOARGS, "Check every invariant (tests); AssertionError."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef T_getset[] = {
    {"unlinked", (getter)T_unlinked, NULL, "Slots holding snapshot entries (an int bitmask).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods T_seq = {.sq_length = (lenfunc)T_len};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvrelay.router._holders.HolderTable",
    .tp_basicsize = sizeof(Table),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Block hash -> worker slots, prefix-closed, LRU-capped (see router/index_store.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)T_init,
    .tp_dealloc = (destructor)T_dealloc,
    .tp_methods = T_methods,
    .tp_getset = T_getset,
    .tp_as_sequence = &T_seq,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_holders", "The prefix index's storage in C (see router/index_store.py).", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__holders(void) {
    if (PyType_Ready(&TableType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&TableType);
    if (PyModule_AddObject(m, "HolderTable", (PyObject *)&TableType) < 0) {
        Py_DECREF(&TableType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
