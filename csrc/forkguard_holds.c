/*
 * The C_HOLDS fork phase (src/forkguard/_fork_phases.py) as a C function object.
 *
 * Included by the cffi module's source (csrc/ffibuild.py), after Python.h.  Every
 * process whose extension uses the C API installs this after_in_parent hook (C code
 * may register a hold at any time), so it must cost a fork next to nothing: a
 * Python function writes its frame's objects, and a cffi call gives the GIL up and
 * takes it back (with busy threads about, a switch interval's wait).  This one
 * reads the C core's count of this thread's holds that timed out, and calls
 * Python (the registry's report_c_timeouts) only when there are some.
 */

static PyObject *holds_hook(PyObject *report, PyObject *unused)
{
    (void)unused;
    if (fg_last_fork_timeouts() == 0)
        Py_RETURN_NONE;
    return PyObject_CallFunctionObjArgs(report, NULL);
}

static PyMethodDef holds_hook_def = {
    "after_fork_c_holds", holds_hook, METH_NOARGS,
    "forkguard's C_HOLDS fork phase (csrc/forkguard_holds.c): reports C holds that timed out.",
};

/* Appends to the list at `box` (an id(): cffi has no Python object type) a new
 * hook that calls `report` (kept by the hook) when holds timed out.  0, or -1
 * with nothing changed. */
static int fgpy_holds_hook(uintptr_t box, uintptr_t report)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    int rc = -1;
    if (PyList_Check((PyObject *)box) && PyCallable_Check((PyObject *)report)) {
        PyObject *hook = PyCFunction_NewEx(&holds_hook_def, (PyObject *)report, NULL);
        if (hook != NULL && PyList_Append((PyObject *)box, hook) == 0)
            rc = 0;
        Py_XDECREF(hook);
    }
    PyErr_Clear();
    PyGILState_Release(gil);
    return rc;
}
