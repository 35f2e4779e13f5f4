/* The C prefix-index storage: shared definitions (the design: holders_table.c). */
#ifndef KVRELAY_HOLDERS_H
#define KVRELAY_HOLDERS_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define NIL 0u
#define MAX_SLOTS 65536
#define MAX_NODES 0xFFFFFFF0u   /* node ids are uint32 (0 = NIL) */
#define MAX_ANCESTRY 65536      /* longest parent chain walked to refuse a cycle (longer: refused too) */

typedef struct {
    uint64_t key;
    uint32_t val; /* node id (table) or reference count (extra); 0 = empty */
    uint32_t pad;
} Cell;

typedef struct {
    Cell *cells;
    uint64_t mask; /* capacity - 1 (capacity a power of two) */
    uint64_t count;
    uint64_t seed;
} Map;

typedef struct {
    uint64_t key;
    uint32_t prev, next;         /* LRU: head = oldest; next = free list for dead nodes */
    uint32_t parent, child;      /* linked parent, first linked child */
    uint32_t sprev, snext;       /* siblings under the same parent */
    uint32_t nextra;             /* extra-reference entries of this node */
    uint32_t alive : 1;
    uint32_t stamp : 31;         /* the last store call that referenced it (first visit per call) */
} Node;

typedef struct {
    PyObject_HEAD
    Map table, extra;
    Node *nodes;          /* [0] unused (NIL) */
    uint64_t *masks;      /* W words per node */
    uint32_t cap_nodes, top, free_head, lru_head, lru_tail;
    uint64_t count;       /* live nodes */
    uint64_t max_blocks, evict_chunk;
    uint32_t W;           /* mask words */
    uint64_t *usable, *unlinked; /* W words each */
    uint64_t *held;       /* per slot: distinct hashes held */
    uint32_t nslots;      /* slots with a held counter */
    uint64_t *scratch;    /* match temporaries: 3 * W words */
    size_t scratch_words;
    uint64_t *rstack;     /* resolve's pending (lo, hi, mask) entries, grown on demand */
    size_t rstack_words;
    uint32_t *stack;      /* cascade / resolve stack */
    size_t stack_cap;
    uint32_t call;        /* store calls, for Node.stamp (31 bits; stamps reset when it wraps) */
    uint64_t *set_keys;   /* has_repeat's scratch set: keys, generations, capacity, generation */
    uint32_t *set_gen;
    size_t set_cap;
    uint32_t set_round;
    uint64_t orphan_blocks, evictions, unknown_removes, cascaded_blocks, bad_chains, refused_links;
} Table;

static inline uint64_t mix(uint64_t x, uint64_t seed) {
    x ^= seed;
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBULL;
    x ^= x >> 31;
    return x;
}

static inline uint64_t map_slot(const Map *m, uint64_t key) {
    uint64_t i = mix(key, m->seed) & m->mask;
    while (m->cells[i].val && m->cells[i].key != key)
        i = (i + 1) & m->mask;
    return i;
}

static inline uint32_t map_get(const Map *m, uint64_t key) {
    uint64_t i = mix(key, m->seed) & m->mask;
    for (;;) {
        const Cell *c = &m->cells[i];
        if (c->key == key && c->val)
            return c->val;
        if (!c->val)
            return 0;
        i = (i + 1) & m->mask;
    }
}

static inline uint64_t *MASK(Table *t, uint32_t n) { return t->masks + (size_t)n * t->W; }

static inline int has_bit(const uint64_t *m, uint32_t slot) { return (m[slot >> 6] >> (slot & 63)) & 1; }

static inline int is_zero(const uint64_t *m, uint32_t W) {
    for (uint32_t i = 0; i < W; i++)
        if (m[i])
            return 0;
    return 1;
}

/* Raise unless __init__ has run (its arrays exist): every method starts with it. */
static inline int ready(Table *t) {
    if (t->nodes != NULL)
        return 1;
    PyErr_SetString(PyExc_RuntimeError, "HolderTable.__init__ has not run");
    return 0;
}

static inline uint64_t xkey(uint32_t n, uint32_t slot) { return ((uint64_t)n << 16) | slot; }

static inline uint64_t hash_at(Py_buffer *b, Py_ssize_t i) {
    uint64_t v;
    memcpy(&v, (const char *)b->buf + 8 * i, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

int map_init(Map *m, uint64_t cap, uint64_t seed);
int map_grow(Map *m);
int map_put(Map *m, uint64_t key, uint32_t val);
void map_del(Map *m, uint64_t key);
int ensure_width(Table *t, uint32_t slot);
PyObject *mask_to_long(const uint64_t *m, uint32_t W);
int long_to_mask(PyObject *v, uint64_t *out, uint32_t W);
int grow_nodes(Table *t);
void lru_unlink(Table *t, uint32_t n);
void lru_append(Table *t, uint32_t n);
uint32_t node_new(Table *t, uint64_t key);
void link_child(Table *t, uint32_t p, uint32_t c);
void unlink_parent(Table *t, uint32_t c);
void node_delete(Table *t, uint32_t n);
int reserve(Table *t, size_t n);
int push_children(Table *t, size_t *sp, uint32_t n);
int add_ref(Table *t, uint32_t n, uint32_t slot);
void drop_extra(Table *t, uint32_t n, uint32_t slot);
void drop_bit(Table *t, uint32_t n, uint32_t slot);
void unhold(Table *t, uint32_t n);
void evict(Table *t, uint64_t n, uint32_t keep);
void make_room(Table *t, uint64_t n, uint32_t keep);
int set_refs(Table *t, unsigned int slot, Py_buffer *b, Py_ssize_t n);
int cascade(Table *t, uint32_t n, unsigned int slot);
int is_ancestor(Table *t, uint32_t c, uint32_t x);
int has_repeat(Table *t, Py_buffer *b, Py_ssize_t n, int has_parent, uint64_t parent);
PyObject *T_match(Table *t, PyObject *arg);
PyObject *T_match_linear(Table *t, PyObject *arg);
PyObject *T_touch(Table *t, PyObject *args);

static inline void lru_touch(Table *t, uint32_t n) {
    if (t->lru_tail != n) {
        lru_unlink(t, n);
        lru_append(t, n);
    }
}

static inline int push(Table *t, size_t *sp, uint32_t n) {
    if (*sp >= t->stack_cap && reserve(t, *sp + 1) < 0)
        return -1;
    t->stack[(*sp)++] = n;
    return 0;
}

#endif
