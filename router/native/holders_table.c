/* kvrelay.router._holders: the prefix index's storage and match in C (HolderTable).
 *
 * The same data structure and semantics as router/index_store.py (HolderMap, the pure-Python
 * reference; read its module doc first): block hash -> bitmask of worker slots, kept
 * prefix-closed per worker through parent -> child links, LRU-capped by evicting leaves only,
 * same-hash references counted, snapshot entries "unlinked". tests/router/test_holders_native.py
 * drives both with the same random operations and compares everything observable.
 *
 * Layout (no Python objects inside; nothing here allocates per block once warm):
 *   table   open addressing, linear probing, backward-shift deletion: (hash, node id) pairs,
 *           the hash mixed with a per-table random seed (so crafted hashes cannot cluster it)
 *   nodes   one per indexed hash, ids stable for life: LRU links, parent / first child /
 *           sibling links, the number of extra-reference entries; freed ids are reused
 *   masks   W 64-bit words per node (W grows with the highest slot registered)
 *   extra   (node << 16 | slot) -> references beyond the first (a second open-addressing table)
 * Bounds: nodes <= max_blocks (+ what eviction could not free: leaves only, as in Python);
 * tables at most half full; slots < 65536. Hostile input: chains repeating a hash are refused,
 * links closing a cycle are refused, every slot and size argument is range-checked, and a
 * method of a table whose __init__ has not run raises instead of touching NULL arrays.
 *
 * Files: holders.h (types, inline helpers), holders_table.c (this one: the structure and its
 * changes), holders_match.c (match, the linear walk, touch), holders_module.c (the Python type).
 * Built with -fvisibility=hidden: only PyInit__holders is exported.
 */
#include "holders.h"

/* ---------------------------------------------------------------- hash maps (u64 -> u32) */
int map_init(Map *m, uint64_t cap, uint64_t seed) {
    m->cells = PyMem_Calloc(cap, sizeof(Cell));
    if (m->cells == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    m->mask = cap - 1;
    m->count = 0;
    m->seed = seed;
    return 0;
}

/* Index of key's cell, or of the empty cell where it would go. */
int map_grow(Map *m) {
    Map n;
    if (map_init(&n, (m->mask + 1) * 2, m->seed) < 0)
        return -1;
    for (uint64_t i = 0; i <= m->mask; i++) {
        if (m->cells[i].val) {
            uint64_t j = map_slot(&n, m->cells[i].key);
            n.cells[j] = m->cells[i];
        }
    }
    n.count = m->count;
    PyMem_Free(m->cells);
    *m = n;
    return 0;
}

/* Set key -> val (val != 0). */
int map_put(Map *m, uint64_t key, uint32_t val) {
    if ((m->count + 1) * 2 > m->mask + 1 && map_grow(m) < 0)
        return -1;
    uint64_t i = map_slot(m, key);
    if (!m->cells[i].val)
        m->count++;
    m->cells[i].key = key;
    m->cells[i].val = val;
    return 0;
}

/* Remove key (backward-shift deletion: no tombstones). */
void map_del(Map *m, uint64_t key) {
    uint64_t i = map_slot(m, key), j = i;
    if (!m->cells[i].val)
        return;
    for (;;) {
        j = (j + 1) & m->mask;
        if (!m->cells[j].val)
            break;
        uint64_t k = mix(m->cells[j].key, m->seed) & m->mask;
        /* move j back to i unless its home k lies cyclically in (i, j] */
        if ((i <= j) ? (i < k && k <= j) : (i < k || k <= j))
            continue;
        m->cells[i] = m->cells[j];
        i = j;
    }
    m->cells[i].val = 0;
    m->count--;
}

/* ---------------------------------------------------------------- masks */
/* Widen every mask to hold `slot`. */
int ensure_width(Table *t, uint32_t slot) {
    uint32_t W = slot / 64 + 1, old = t->W;
    if (W <= old)
        return 0;
    uint64_t *nm = PyMem_Calloc((size_t)t->cap_nodes * W, 8);
    uint64_t *nu = PyMem_Calloc(W, 8), *nl = PyMem_Calloc(W, 8);
    if (nm == NULL || nu == NULL || nl == NULL) {
        PyMem_Free(nm);
        PyMem_Free(nu);
        PyMem_Free(nl);
        PyErr_NoMemory();
        return -1;
    }
    for (size_t n = 0; n < t->cap_nodes; n++)
        memcpy(nm + n * W, t->masks + n * old, old * 8);
    memcpy(nu, t->usable, old * 8);
    memcpy(nl, t->unlinked, old * 8);
    PyMem_Free(t->masks);
    PyMem_Free(t->usable);
    PyMem_Free(t->unlinked);
    t->masks = nm, t->usable = nu, t->unlinked = nl, t->W = W;
    return 0;
}

/* W words <-> a non-negative int, in O(W) through little-endian bytes. */
PyObject *mask_to_long(const uint64_t *m, uint32_t W) {
    uint32_t top = W;
    while (top > 1 && !m[top - 1])
        top--;
    if (top == 1)
        return PyLong_FromUnsignedLongLong(m[0]);
    unsigned char *b = PyMem_Malloc((size_t)top * 8);
    if (b == NULL)
        return PyErr_NoMemory();
    for (uint32_t i = 0; i < top; i++)
        for (int k = 0; k < 8; k++)
            b[8 * i + k] = (unsigned char)(m[i] >> (8 * k));
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *r = PyLong_FromUnsignedNativeBytes(b, (size_t)top * 8, Py_ASNATIVEBYTES_LITTLE_ENDIAN);
#else
    PyObject *r = _PyLong_FromByteArray(b, (size_t)top * 8, 1, 0);
#endif
    PyMem_Free(b);
    return r;
}

/* Non-negative int -> W words (bits past W*64 must be zero). */
int long_to_mask(PyObject *v, uint64_t *out, uint32_t W) {
    if (!PyLong_Check(v) || _PyLong_Sign(v) < 0) {
        PyErr_SetString(PyExc_TypeError, "a mask must be a non-negative int");
        return -1;
    }
    if (_PyLong_NumBits(v) > (size_t)W * 64) {
        PyErr_SetString(PyExc_ValueError, "the mask has bits past the highest registered slot");
        return -1;
    }
    unsigned char *b = PyMem_Malloc((size_t)W * 8);
    if (b == NULL) {
        PyErr_NoMemory();
        return -1;
    }
#if PY_VERSION_HEX >= 0x030D0000
    Py_ssize_t rc = PyLong_AsNativeBytes(v, b, (Py_ssize_t)W * 8,
                                         Py_ASNATIVEBYTES_LITTLE_ENDIAN | Py_ASNATIVEBYTES_UNSIGNED_BUFFER);
#else
    int rc = _PyLong_AsByteArray((PyLongObject *)v, b, (size_t)W * 8, 1, 0);
#endif
    if (rc >= 0)
        for (uint32_t i = 0; i < W; i++) {
            out[i] = 0;
            for (int k = 0; k < 8; k++)
                out[i] |= (uint64_t)b[8 * i + k] << (8 * k);
        }
    PyMem_Free(b);
    return rc < 0 ? -1 : 0;
}

/* ---------------------------------------------------------------- nodes, LRU, links */
int grow_nodes(Table *t) {
    /* doubling, but landing on max_blocks + 1 (id 0 is NIL) rather than twice that */
    uint64_t want = t->cap_nodes ? (uint64_t)t->cap_nodes * 2 : 1024, full = t->max_blocks + 1;
    if (t->cap_nodes < full && want > full)
        want = full;
    if (want > MAX_NODES) {
        PyErr_SetString(PyExc_MemoryError, "HolderTable: too many nodes");
        return -1;
    }
    uint32_t cap = (uint32_t)want;
    Node *nn = PyMem_Realloc(t->nodes, (size_t)cap * sizeof(Node));
    if (nn == NULL)
        goto oom;
    t->nodes = nn;
    uint64_t *nm = PyMem_Realloc(t->masks, (size_t)cap * t->W * 8);
    if (nm == NULL)
        goto oom;
    t->masks = nm;
    memset(nn + t->cap_nodes, 0, (size_t)(cap - t->cap_nodes) * sizeof(Node));
    memset(nm + (size_t)t->cap_nodes * t->W, 0, (size_t)(cap - t->cap_nodes) * t->W * 8);
    t->cap_nodes = cap;
    return 0;
oom:
    PyErr_NoMemory();
    return -1;
}

void lru_unlink(Table *t, uint32_t n) {
    Node *x = &t->nodes[n];
    if (x->prev)
        t->nodes[x->prev].next = x->next;
    else
        t->lru_head = x->next;
    if (x->next)
        t->nodes[x->next].prev = x->prev;
    else
        t->lru_tail = x->prev;
    x->prev = x->next = NIL;
}

void lru_append(Table *t, uint32_t n) {
    Node *x = &t->nodes[n];
    x->prev = t->lru_tail;
    x->next = NIL;
    if (t->lru_tail)
        t->nodes[t->lru_tail].next = n;
    else
        t->lru_head = n;
    t->lru_tail = n;
}

/* A new node for key, the most recent in LRU order; NIL with an exception set on failure. */
uint32_t node_new(Table *t, uint64_t key) {
    uint32_t n;
    if (t->free_head) {
        n = t->free_head;
        t->free_head = t->nodes[n].next;
    } else {
        if (t->top + 1 >= t->cap_nodes && grow_nodes(t) < 0)
            return NIL;
        n = ++t->top;
    }
    if (map_put(&t->table, key, n) < 0) {
        t->nodes[n].next = t->free_head;
        t->free_head = n;
        return NIL;
    }
    Node *x = &t->nodes[n];
    memset(x, 0, sizeof *x);
    x->key = key;
    x->alive = 1;
    memset(MASK(t, n), 0, (size_t)t->W * 8);
    lru_append(t, n);
    t->count++;
    return n;
}

void link_child(Table *t, uint32_t p, uint32_t c) {
    Node *x = &t->nodes[c], *y = &t->nodes[p];
    x->parent = p;
    x->sprev = NIL;
    x->snext = y->child;
    if (y->child)
        t->nodes[y->child].sprev = c;
    y->child = c;
}

void unlink_parent(Table *t, uint32_t c) {
    Node *x = &t->nodes[c];
    if (!x->parent)
        return;
    if (x->sprev)
        t->nodes[x->sprev].snext = x->snext;
    else
        t->nodes[x->parent].child = x->snext;
    if (x->snext)
        t->nodes[x->snext].sprev = x->sprev;
    x->parent = x->sprev = x->snext = NIL;
}

/* Forget a node whose mask is empty and whose extra references are gone. */
void node_delete(Table *t, uint32_t n) {
    Node *x = &t->nodes[n];
    unlink_parent(t, n);
    for (uint32_t c = x->child; c;) {
        Node *y = &t->nodes[c];
        uint32_t next = y->snext;
        y->parent = y->sprev = y->snext = NIL;
        c = next;
    }
    x->child = NIL;
    map_del(&t->table, x->key);
    lru_unlink(t, n);
    x->alive = 0;
    x->next = t->free_head;
    t->free_head = n;
    t->count--;
}

int reserve(Table *t, size_t n) {
    if (n <= t->stack_cap)
        return 0;
    size_t cap = t->stack_cap ? t->stack_cap : 256;
    while (cap < n)
        cap *= 2;
    uint32_t *s = PyMem_Realloc(t->stack, cap * 4);
    if (s == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    t->stack = s;
    t->stack_cap = cap;
    return 0;
}

int push_children(Table *t, size_t *sp, uint32_t n) {
    for (uint32_t c = t->nodes[n].child; c; c = t->nodes[c].snext)
        if (push(t, sp, c) < 0)
            return -1;
    return 0;
}

/* ---------------------------------------------------------------- references */
/* One more reference of slot on node n. */
int add_ref(Table *t, uint32_t n, uint32_t slot) {
    uint64_t *m = MASK(t, n);
    if (!has_bit(m, slot)) {
        m[slot >> 6] |= 1ULL << (slot & 63);
        t->held[slot]++;
        return 0;
    }
    uint32_t r = map_get(&t->extra, xkey(n, slot));
    if (r == UINT32_MAX)  /* saturated: 2**32 references of one hash by one worker */
        return 0;
    if (map_put(&t->extra, xkey(n, slot), r + 1) < 0)
        return -1;
    if (!r)
        t->nodes[n].nextra++;
    return 0;
}

/* Drop the extra references of slot on node n, if any. */
void drop_extra(Table *t, uint32_t n, uint32_t slot) {
    if (t->nodes[n].nextra && map_get(&t->extra, xkey(n, slot))) {
        map_del(&t->extra, xkey(n, slot));
        t->nodes[n].nextra--;
    }
}

/* Clear slot's bit on n (its last reference); the node goes when no slot is left. */
void drop_bit(Table *t, uint32_t n, uint32_t slot) {
    uint64_t *m = MASK(t, n);
    m[slot >> 6] &= ~(1ULL << (slot & 63));
    t->held[slot]--;
    if (is_zero(m, t->W))
        node_delete(t, n);
}

/* Evict node n (a leaf): every slot's references go with it. */
void unhold(Table *t, uint32_t n) {
    uint64_t *m = MASK(t, n);
    for (uint32_t w = 0; w < t->W; w++) {
        uint64_t x = m[w];
        while (x) {
            uint32_t slot = w * 64 + (uint32_t)__builtin_ctzll(x);
            x &= x - 1;
            t->held[slot]--;
            drop_extra(t, n, slot);
        }
        m[w] = 0;
    }
    node_delete(t, n);
}

/* Drop the n least recently used leaves (inner nodes met are moved to the recent end). */
void evict(Table *t, uint64_t n, uint32_t keep) {
    uint64_t gone = 0, scanned = 0, budget = t->count;
    while (gone < n && t->count && scanned < budget) {
        uint32_t x = t->lru_head;
        scanned++;
        if (t->nodes[x].child || x == keep) {  /* inner (or kept): to the recent end */
            lru_touch(t, x);
            continue;
        }
        unhold(t, x);
        gone++;
    }
    t->evictions += gone;
}

void make_room(Table *t, uint64_t n, uint32_t keep) {
    int64_t room = (int64_t)t->max_blocks - (int64_t)t->count - (int64_t)n;
    if (room < 0)
        evict(t, (uint64_t)(-room) + t->evict_chunk - 1, keep);
}

/* ---------------------------------------------------------------- chains */
/* A new store call: its stamp (Node.stamp marks the first visit of a node in one call). */
static uint32_t next_call(Table *t) {
    if (++t->call >= (1u << 31)) {
        for (uint32_t n = 1; n <= t->top; n++)
            t->nodes[n].stamp = 0;
        t->call = 1;
    }
    return t->call;
}

/* Reference every hash of b for slot, deepest first, so the root ends the most recent; a hash
 * listed twice stays where its deepest occurrence put it. Node ids -> t->stack[0..n). */
int set_refs(Table *t, unsigned int slot, Py_buffer *b, Py_ssize_t n) {
    uint32_t call = next_call(t);
    if (reserve(t, (size_t)n) < 0)
        return -1;
    for (Py_ssize_t i = n - 1; i >= 0; i--) {
        uint64_t h = hash_at(b, i);
        uint32_t id = map_get(&t->table, h);
        if (id) {
            if (t->nodes[id].stamp != call)
                lru_touch(t, id);
        } else if ((id = node_new(t, h)) == NIL) {
            return -1;
        }
        t->nodes[id].stamp = call;
        if (add_ref(t, id, slot) < 0)
            return -1;
        t->stack[i] = id;
    }
    return 0;
}

int cascade(Table *t, uint32_t n, unsigned int slot) {
    size_t sp = 0;
    uint64_t cleared = 0;
    if (push_children(t, &sp, n) < 0)
        return -1;
    drop_bit(t, n, slot);
    while (sp) {
        uint32_t c = t->stack[--sp];
        if (!t->nodes[c].alive || !has_bit(MASK(t, c), slot))
            continue;
        if (push_children(t, &sp, c) < 0)
            return -1;
        drop_extra(t, c, slot);
        drop_bit(t, c, slot);
        cleared++;
    }
    t->cascaded_blocks += cleared;
    return 0;
}

/* Whether c is among x and its linked ancestors (a walk past MAX_ANCESTRY counts as yes). */
int is_ancestor(Table *t, uint32_t c, uint32_t x) {
    for (uint32_t steps = 0; x; steps++) {
        if (x == c || steps >= MAX_ANCESTRY)
            return 1;
        x = t->nodes[x].parent;
    }
    return 0;
}

/* Whether b's n hashes (and parent, when has_parent) hold a repeat: a scratch open-addressing
 * set, cleared by generation. -1 with an exception when it cannot allocate. */
int has_repeat(Table *t, Py_buffer *b, Py_ssize_t n, int has_parent, uint64_t parent) {
    size_t cap = 16;
    while (cap < 2 * (size_t)(n + 1))
        cap *= 2;
    if (cap > t->set_cap) {
        uint64_t *k = PyMem_Realloc(t->set_keys, cap * 8);
        if (k != NULL)
            t->set_keys = k;
        uint32_t *g = k ? PyMem_Calloc(cap, 4) : NULL;
        if (g == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        PyMem_Free(t->set_gen);
        t->set_gen = g, t->set_cap = cap, t->set_round = 0;
    }
    if (++t->set_round == 0) {  /* wrapped: forget every generation */
        memset(t->set_gen, 0, t->set_cap * 4);
        t->set_round = 1;
    }
    uint64_t mask = cap - 1, seed = t->table.seed;
    int shift = 64 - __builtin_ctzll(cap);
    for (Py_ssize_t i = has_parent ? -1 : 0; i < n; i++) {  /* seeded Fibonacci hashing: cheap */
        uint64_t h = i < 0 ? parent : hash_at(b, i), j = ((h ^ seed) * 0x9E3779B97F4A7C15ULL) >> shift;
        for (; t->set_gen[j] == t->set_round; j = (j + 1) & mask)
            if (t->set_keys[j] == h)
                return 1;
        t->set_gen[j] = t->set_round;
        t->set_keys[j] = h;
    }
    return 0;
}
