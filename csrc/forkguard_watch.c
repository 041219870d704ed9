/*
 * forkguard.watch()'s look before each fork, in C.
 *
 * Included by the cffi module's source (csrc/ffibuild.py), after Python.h and
 * forkguard_plain.c (for weak_borrowed()).  A Python before-hook writes every
 * object it touches (reference counts, the code object's counters), and each first
 * write after the last fork is a copy-on-write page fault in the parent: 10.9 per
 * fork for the look in Python, 2.1 for this one, in the 10-thread process of the
 * benchmarks (two committed runs, CPython 3.11).  This hook is a C function object: in the
 * common case (nothing taken, no thread count due) it reads the known files' owner
 * fields, tries the known locks, and returns (writing the locks' reference counts,
 * and on 3.13 the files', see weak_borrowed()).  Otherwise it calls the Python look
 * (_watch._look), which does all the Python hook does.
 *
 * The hook is called by os.fork() as a Python callable, with the GIL held, and
 * calls nothing that gives it up: no file can be freed while its field is read,
 * and the state Python replaces (a list, all items at once) cannot change under
 * it.  The hook reads that state rather than being told of changes through cffi
 * calls, which give the GIL up and, with busy threads about, wait a switch
 * interval to get it back.  Free-threaded builds keep the Python hook.
 */

#ifdef Py_GIL_DISABLED
static int fgpy_watch_install(uintptr_t box, uintptr_t look, uintptr_t state, uintptr_t lock_types,
                              long owner_at, int every)
{
    (void)box, (void)look, (void)state, (void)lock_types, (void)owner_at, (void)every;
    return -1;
}
#else

#define WATCH_STATE 5 /* [on, python, files, locks, the watch]: see _watch._c_state */

static struct {
    PyObject *state;   /* _watch._c_state */
    PyObject *globals; /* _watch's, and "_current": the watch on now */
    PyObject *current;
    PyObject *look;    /* _watch._look(count_threads) */
    PyObject *hook;    /* the function object below, made once */
    PyObject *lock;    /* _thread.LockType and _thread.RLock: the locks tried here */
    PyObject *rlock;
    /* Their acquire and release methods ([0]: the Lock's), called as functions: a
     * method looked up on the lock at each call would write its descriptor. */
    PyObject *acquire[2];
    PyObject *release[2];
    long owner_at;     /* a buffered file's owner field, from its start; -1: unknown */
    int every;         /* forks between two counts of the process's threads */
    int tick;          /* forks until the next count */
} watch;

/* 1 if a file of `files` (a tuple of weak references) has its owner field set,
 * or the tuple cannot be read; 0 if none has.  Nothing is written: the weak
 * references' targets are borrowed, and no Python code runs. */
static int watch_files_taken(PyObject *files)
{
    Py_ssize_t n = PyTuple_Size(files);
    if (n < 0 || (n > 0 && watch.owner_at < 0)) {
        PyErr_Clear();
        return 1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *file = weak_borrowed(PyTuple_GetItem(files, i));
        if (file == NULL)
            return 1;
        /* The field a buffered file sets while a thread holds its lock: its offset
         * verified at run time by forkguard._cpython_io, an unsigned long ident. */
        if (file != Py_None && *(const volatile unsigned long *)((char *)file + watch.owner_at))
            return 1;
    }
    return 0;
}

/* 1 if `lock` (borrowed; NULL: unreadable) is taken or cannot be tried here (not a
 * _thread lock); 0 if it is free or gone.  It is tried as the Python look tries it:
 * acquire(False), and given back at once.  The forking thread's own RLock reads as
 * free. */
static int watch_lock_taken(PyObject *lock)
{
    if (lock == NULL)
        return 1;
    if (lock == Py_None)
        return 0;
    PyObject *type = (PyObject *)Py_TYPE(lock);
    if (type != watch.lock && type != watch.rlock)
        return 1;
    int r = type == watch.rlock;
    Py_INCREF(lock);
    PyObject *got = PyObject_CallFunctionObjArgs(watch.acquire[r], lock, Py_False, NULL);
    int taken = got != Py_True;
    if (got == Py_True) {
        PyObject *done = PyObject_CallFunctionObjArgs(watch.release[r], lock, NULL);
        taken = done == NULL;
        Py_XDECREF(done);
    }
    Py_XDECREF(got);
    Py_DECREF(lock);
    PyErr_Clear();
    return taken;
}

/* 1 if a lock of `locks` (a tuple of weak references) is taken or cannot be tried,
 * or the tuple cannot be read; 0 if all are free.  The methods are C, but the
 * argument tuple they get on 3.10-3.12 can start a garbage collection, whose
 * callbacks run Python (watch()'s own rebuild _c_state): `locks` is held meanwhile. */
static int watch_locks_taken(PyObject *locks)
{
    Py_ssize_t n = PyTuple_Size(locks);
    if (n <= 0) {
        PyErr_Clear();
        return n < 0;
    }
    Py_INCREF(locks);
    int taken = 0;
    for (Py_ssize_t i = 0; i < n && !taken; i++)
        taken = watch_lock_taken(weak_borrowed(PyTuple_GetItem(locks, i)));
    Py_DECREF(locks);
    return taken;
}

static PyObject *watch_hook(PyObject *self, PyObject *unused)
{
    (void)self, (void)unused;
    PyObject *on = PyList_GetItem(watch.state, 0);
    PyObject *python = PyList_GetItem(watch.state, 1);
    PyObject *files = PyList_GetItem(watch.state, 2);
    PyObject *locks = PyList_GetItem(watch.state, 3);
    PyObject *built_for = PyList_GetItem(watch.state, 4);
    /* The state is rebuilt by whichever thread gets _watch's index lock: a watch()
     * or stop() that found it taken may not be in it yet, and then Python looks. */
    PyObject *current = PyDict_GetItem(watch.globals, watch.current);
    int stale = built_for == NULL || built_for != (current != NULL ? current : Py_None);
    PyErr_Clear();
    if (!stale && on == Py_False)
        Py_RETURN_NONE;
    int count = watch.tick <= 0;
    watch.tick = count ? watch.every - 1 : watch.tick - 1;
    if (!stale && !count && on != NULL && python == Py_False && files != NULL &&
        locks != NULL && !watch_files_taken(files) && !watch_locks_taken(locks))
        Py_RETURN_NONE;
    PyObject *look = watch.look;
    Py_INCREF(look);
    PyObject *r = PyObject_CallFunctionObjArgs(look, count ? Py_True : Py_False, NULL);
    Py_DECREF(look);
    if (r == NULL)
        return NULL; /* reported as any before-hook's exception is */
    Py_DECREF(r);
    Py_RETURN_NONE;
}

static PyMethodDef watch_hook_def = {
    "forkguard_watch_before", watch_hook, METH_NOARGS,
    "forkguard.watch()'s look before a fork (csrc/forkguard_watch.c).",
};

/* Appends the hook to the list at `box` (an id(): cffi has no Python object
 * type).  The hook reads `state` (a list of WATCH_STATE) at each fork and calls
 * `look` (whose globals have the watch on now as "_current") when it must;
 * `lock_types` is (_thread.LockType, _thread.RLock), `owner_at` the owner field's
 * offset in a buffered file (-1: unknown), `every` the forks between two thread
 * counts.  0, or -1 with nothing changed.  Once per process. */
static int fgpy_watch_install(uintptr_t box, uintptr_t look, uintptr_t state, uintptr_t lock_types,
                              long owner_at, int every)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *types = (PyObject *)lock_types;
    int rc = -1;
    if (watch.hook == NULL && PyList_Check((PyObject *)state) &&
        PyList_Size((PyObject *)state) == WATCH_STATE && PyList_Check((PyObject *)box) &&
        PyTuple_Check(types) && PyTuple_Size(types) == 2) {
        PyObject *lock = PyTuple_GetItem(types, 0), *rlock = PyTuple_GetItem(types, 1);
        PyObject *methods[4] = {
            PyObject_GetAttrString(lock, "acquire"), PyObject_GetAttrString(rlock, "acquire"),
            PyObject_GetAttrString(lock, "release"), PyObject_GetAttrString(rlock, "release"),
        };
        PyObject *hook = PyCFunction_NewEx(&watch_hook_def, NULL, NULL);
        PyObject *globals = PyObject_GetAttrString((PyObject *)look, "__globals__");
        PyObject *current = PyUnicode_InternFromString("_current");
        int ok = hook != NULL && globals != NULL && PyDict_Check(globals) && current != NULL;
        for (int i = 0; i < 4; i++)
            ok = ok && methods[i] != NULL;
        if (ok && PyList_Append((PyObject *)box, hook) == 0) {
            watch.hook = hook;
            watch.globals = globals;
            watch.current = current;
            watch.acquire[0] = methods[0], watch.acquire[1] = methods[1];
            watch.release[0] = methods[2], watch.release[1] = methods[3];
            watch.look = (PyObject *)look;
            watch.state = (PyObject *)state;
            watch.lock = lock;
            watch.rlock = rlock;
            Py_INCREF(watch.look);
            Py_INCREF(watch.state);
            Py_INCREF(watch.lock);
            Py_INCREF(watch.rlock);
            watch.owner_at = owner_at;
            watch.every = every;
            rc = 0;
        } else {
            Py_XDECREF(hook);
            Py_XDECREF(globals);
            Py_XDECREF(current);
            for (int i = 0; i < 4; i++)
                Py_XDECREF(methods[i]);
        }
    }
    PyErr_Clear();
    PyGILState_Release(gil);
    return rc;
}
#endif /* Py_GIL_DISABLED */
