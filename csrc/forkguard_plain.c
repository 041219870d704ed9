/*
 * The child's reset of the plain Python registrations, in C.
 *
 * Included by the cffi module's source (csrc/ffibuild.py), after Python.h, with
 * the limited API cffi chooses.  The core (forkguard_core.c) knows nothing of
 * Python; this file, forkguard_holds.c and forkguard_watch.c are the C that calls
 * into the interpreter, all three compiled into the cffi module only.
 *
 * Registry.after_fork_in_child() resets the registrations whose whole reset is a
 * threading Lock or RLock re-initialised and Conditions' waiter lists emptied.
 * A Python loop over them takes a reference to every weak reference it walks,
 * which writes the weak reference: one copy-on-write page fault per page of weak
 * references, in every child (about 230 for 10,000 locks).  Here each weak
 * reference is only read, so a child writes the same pages a
 * hand-written loop over the locks would: the locks' own.
 */

#ifdef Py_GIL_DISABLED
/* The borrowed references from PyDict_Next below are safe only while no other
 * thread runs, and on a free-threaded build a thread started by a child hook may
 * change the dicts: there the Python loops, which walk copies, do it all.  The
 * registry does not call this on such a build; this is the backstop. */
static int fgpy_reset_plain(uintptr_t plain)
{
    (void)plain;
    return -1;
}
#else

/* Calls `fn(obj)`, or `fn()` when obj is NULL: 0, or -1 with the error cleared. */
static int plain_call(PyObject *fn, PyObject *obj, PyObject **result)
{
    *result = PyObject_CallFunctionObjArgs(fn, obj, NULL);
    if (*result != NULL)
        return 0;
    PyErr_Clear();
    return -1;
}

/* The object a weak reference points to, borrowed (Py_None if it is gone), or
 * NULL with the error cleared.  No reference is kept, so up to CPython 3.12 nothing
 * is written (3.13's call takes one and gives it back: a write of the object's
 * count), as watch()'s look before each fork wants (forkguard_watch.c).  The limited
 * API that cffi compiles against has only this call, which CPython 3.13 deprecated
 * for PyWeakref_GetRef, a call that API gains only from 3.13 on. */
static PyObject *weak_borrowed(PyObject *ref)
{
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#endif
    PyObject *obj = PyWeakref_GetObject(ref);
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
    if (obj == NULL)
        PyErr_Clear();
    return obj;
}

/* The same as a new reference.  Read, not called: calling the weak reference from C
 * costs a call per lock, about a sixth of the loop's time here. */
static PyObject *weak_target(PyObject *ref)
{
#if !defined(Py_LIMITED_API) && PY_VERSION_HEX >= 0x030D0000
    PyObject *obj;
    int alive = PyWeakref_GetRef(ref, &obj);
    if (alive < 0)
        PyErr_Clear();
    return alive < 0 ? NULL : alive ? obj : Py_NewRef(Py_None);
#else
    PyObject *obj = weak_borrowed(ref);
    Py_XINCREF(obj);
    return obj;
#endif
}

/* Re-initialise every live lock of `refs` (a dict of weak references) with
 * `reinit`, skipping those `is_owned` (if given) says this thread owns. */
static int plain_locks(PyObject *refs, PyObject *reinit, PyObject *is_owned)
{
    Py_ssize_t pos = 0;
    PyObject *key, *ref, *lock, *out;
    int rc = 0;
    /* Borrowed references throughout: nothing here runs Python code (these
     * are CPython's C locks and their C methods), so no entry can go meanwhile. */
    while (PyDict_Next(refs, &pos, &key, &ref)) {
        if ((lock = weak_target(ref)) == NULL) {
            rc = -1;
            continue;
        }
        if (lock != Py_None) {
            int skip = 0;
            if (is_owned != NULL) {
                if (plain_call(is_owned, lock, &out) < 0) {
                    skip = -1;
                } else {
                    skip = PyObject_IsTrue(out);
                    Py_DECREF(out);
                    if (skip < 0)
                        PyErr_Clear();
                }
            }
            if (skip == 0 && plain_call(reinit, lock, &out) == 0)
                Py_DECREF(out);
            else if (skip == 0)
                skip = -1;
            if (skip < 0)
                rc = -1;
        }
        Py_DECREF(lock);
    }
    return rc;
}

/* Empty every non-empty waiter list of `waiters` (a dict of tuples of waiter
 * lists, `deque` being collections.deque). */
static int plain_waiters(PyObject *waiters, PyObject *deque)
{
    Py_ssize_t pos = 0;
    PyObject *key, *lists, *out;
    int rc = 0;
    while (PyDict_Next(waiters, &pos, &key, &lists)) {
        Py_ssize_t n = PyTuple_Size(lists);
        if (n < 0) {
            PyErr_Clear();
            rc = -1;
            continue;
        }
        int held = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *list = PyTuple_GetItem(lists, i);
            /* The usual case only reads: an empty deque's length is C. */
            if ((PyObject *)Py_TYPE(list) == deque && PyObject_Size(list) == 0)
                continue;
            /* Otherwise Python code may run (a subclass's __len__, a waiter's
             * __del__ on clear()) and end this registration, and the tuple with it:
             * held from here to its end.  Not from its start, which would write
             * every tuple in every child. */
            if (!held) {
                Py_INCREF(lists);
                held = 1;
            }
            Py_ssize_t len = PyObject_Size(list);
            if (len == 0)
                continue;
            if (len > 0 && (out = PyObject_CallMethod(list, "clear", NULL)) != NULL) {
                Py_DECREF(out);
                continue;
            }
            PyErr_Clear();
            rc = -1;
        }
        if (held)
            Py_DECREF(lists);
    }
    return rc;
}

/* `plain` is the id() of Registry._plain: (Lock weak references, RLock weak
 * references, waiter lists, Lock._at_fork_reinit, RLock._at_fork_reinit,
 * RLock._is_owned, collections.deque), kept alive by the registry.  Everything is
 * attempted; 0 if all went well, else -1, with no exception left set: the caller
 * then runs its Python loops, which do the same again (every step is safe to
 * repeat) and report what failed.  cffi releases the GIL around this call; it is
 * taken back here, from the thread that holds its state. */
static int fgpy_reset_plain(uintptr_t plain)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *t = (PyObject *)plain, *locks = NULL, *rlocks = NULL, *waiters = NULL;
    int rc = -1;
    if (PyTuple_Check(t) && PyTuple_Size(t) == 7) {
        locks = PyTuple_GetItem(t, 0);
        rlocks = PyTuple_GetItem(t, 1);
        waiters = PyTuple_GetItem(t, 2);
    }
    if (locks != NULL && PyDict_Check(locks) && PyDict_Check(rlocks) && PyDict_Check(waiters)) {
        rc = 0;
        if (PyDict_Size(locks) > 0)
            rc |= plain_locks(locks, PyTuple_GetItem(t, 3), NULL);
        if (PyDict_Size(rlocks) > 0)
            rc |= plain_locks(rlocks, PyTuple_GetItem(t, 4), PyTuple_GetItem(t, 5));
        if (PyDict_Size(waiters) > 0)
            rc |= plain_waiters(waiters, PyTuple_GetItem(t, 6));
    }
    PyErr_Clear();
    PyGILState_Release(gil);
    return rc;
}
#endif /* Py_GIL_DISABLED */
