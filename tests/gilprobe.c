/* gilprobe: a CPython extension that uses forkguard's C API the way extensions do,
 * with the GIL held (tp_new / tp_dealloc), forks from C, and installs fork hooks that
 * misbehave on purpose.  tests/test_lock_order.py builds it against the installed
 * forkguard.h and drives it from subprocesses under deadlines.
 *
 * It also emulates forkguard's earlier locking discipline (a registry lock taken in
 * the os.fork() before-hook with the GIL released and kept until after the fork),
 * so each scenario can be shown deadlocking under that discipline. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <forkguard.h>

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static PyObject *attach(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    if (forkguard_import() < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* ---- registration with the GIL held, as in tp_new / tp_dealloc ---------------- */

static PyObject *new_mutex(PyObject *self, PyObject *args)
{
    int policy = FORKGUARD_POLICY_RESET;
    (void)self;
    if (!PyArg_ParseTuple(args, "|i", &policy))
        return NULL;
    pthread_mutex_t *m = malloc(sizeof *m);
    if (m == NULL)
        return PyErr_NoMemory();
    pthread_mutex_init(m, NULL);
    forkguard_handle h;
    int rc = forkguard_register_mutex(m, FORKGUARD_MUTEX_DETECT, policy, 0.2, "gilprobe", &h);
    if (rc != FORKGUARD_OK) {
        free(m);
        return PyErr_Format(PyExc_RuntimeError, "register: %s", forkguard_strerror(rc));
    }
    return Py_BuildValue("(KK)", (unsigned long long)h, (unsigned long long)(uintptr_t)m);
}

static PyObject *free_mutex(PyObject *self, PyObject *args)
{
    unsigned long long h, addr;
    (void)self;
    if (!PyArg_ParseTuple(args, "KK", &h, &addr))
        return NULL;
    int rc = forkguard_unregister((forkguard_handle)h);
    pthread_mutex_destroy((pthread_mutex_t *)(uintptr_t)addr);
    free((void *)(uintptr_t)addr);
    return PyLong_FromLong(rc);
}

static void count_hook(void *arg) { __atomic_fetch_add((int *)arg, 1, __ATOMIC_RELAXED); }
static int hook_counter;

static PyObject *new_hooks(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    forkguard_handle h;
    int rc = forkguard_register_hooks(count_hook, count_hook, NULL, &hook_counter, "gilprobe.hooks",
                                      &h);
    if (rc != FORKGUARD_OK)
        return PyErr_Format(PyExc_RuntimeError, "register: %s", forkguard_strerror(rc));
    return PyLong_FromUnsignedLongLong(h);
}

static PyObject *unregister(PyObject *self, PyObject *args)
{
    unsigned long long h;
    (void)self;
    if (!PyArg_ParseTuple(args, "K", &h))
        return NULL;
    return PyLong_FromLong(forkguard_unregister((forkguard_handle)h));
}

/* ---- forks from C ---------------------------------------------------------------- */

static int fork_and_reap(void)
{
    pid_t pid = fork();
    if (pid == 0)
        _exit(0);
    if (pid < 0)
        return -1;
    int st = 0;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* fork() with the GIL held, as _posixsubprocess does when it cannot use vfork. */
static PyObject *c_fork_gil_held(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyLong_FromLong(fork_and_reap());
}

/* ---- hooks that misbehave -------------------------------------------------------- */

static int nested_status = -1;
static int busy_rc = 0;

static void forking_prepare(void *arg)
{
    (void)arg;
    nested_status = fork_and_reap(); /* a fork from inside a prepare hook */
}

static void registering_prepare(void *arg)
{
    (void)arg;
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    forkguard_handle h;
    busy_rc = forkguard_register_mutex(&m, FORKGUARD_MUTEX_DETECT, FORKGUARD_POLICY_RESET, 1.0,
                                       NULL, &h);
    if (busy_rc == FORKGUARD_OK)
        forkguard_unregister(h);
}

static PyObject *add_hook(PyObject *self, PyObject *args)
{
    const char *which;
    (void)self;
    if (!PyArg_ParseTuple(args, "s", &which))
        return NULL;
    forkguard_hook prepare = NULL, parent = NULL;
    if (strcmp(which, "fork_in_prepare") == 0)
        prepare = forking_prepare;
    else if (strcmp(which, "fork_in_parent") == 0)
        parent = forking_prepare;
    else if (strcmp(which, "register_in_prepare") == 0)
        prepare = registering_prepare;
    else
        return PyErr_Format(PyExc_ValueError, "no hook %s", which);
    forkguard_handle h;
    int rc = forkguard_register_hooks(prepare, parent, NULL, NULL, which, &h);
    if (rc != FORKGUARD_OK)
        return PyErr_Format(PyExc_RuntimeError, "register: %s", forkguard_strerror(rc));
    return PyLong_FromUnsignedLongLong(h);
}

static PyObject *hook_results(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return Py_BuildValue("(iii)", nested_status, busy_rc, hook_counter);
}

/* ---- fork() from a signal handler, interrupting registrations ------------------ */

static volatile sig_atomic_t signal_forks, signal_forks_ok;

static void on_signal(int sig)
{
    (void)sig;
    int saved = errno;
    signal_forks++;
    if (fork_and_reap() == 0)
        signal_forks_ok++;
    errno = saved;
}

static volatile int churning;

/* Reset-policy mutexes only: once the registry's arrays have grown, a registration
 * allocates nothing, so a signal never lands inside malloc (a fork() there hangs in
 * glibc's own malloc locks, with or without forkguard). */
static void *churn(void *arg)
{
    (void)arg;
    pthread_mutex_t m[4];
    for (int i = 0; i < 4; i++)
        pthread_mutex_init(&m[i], NULL);
    while (__atomic_load_n(&churning, __ATOMIC_RELAXED)) {
        forkguard_handle h[4];
        for (int i = 0; i < 4; i++)
            forkguard_register_mutex(&m[i], FORKGUARD_MUTEX_DETECT, FORKGUARD_POLICY_RESET,
                                     0.1, NULL, &h[i]);
        for (int i = 0; i < 4; i++)
            forkguard_unregister(h[i]);
    }
    return NULL;
}

/* A native thread registers and unregisters mutexes in a loop while `signals`
 * SIGUSR2s reach it, each handled by a fork().  Returns (forks, children that
 * exited 0). */
static PyObject *signal_fork_storm(PyObject *self, PyObject *args)
{
    int signals;
    (void)self;
    if (!PyArg_ParseTuple(args, "i", &signals))
        return NULL;
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR2, &sa, &old);
    signal_forks = signal_forks_ok = 0;
    churning = 1;
    pthread_t t;
    Py_BEGIN_ALLOW_THREADS
    pthread_create(&t, NULL, churn, NULL);
    struct timespec warm = {0, 20000000};
    nanosleep(&warm, NULL);
    for (int i = 0; i < signals; i++) {
        pthread_kill(t, SIGUSR2);
        struct timespec nap = {0, 200000};
        nanosleep(&nap, NULL);
    }
    __atomic_store_n(&churning, 0, __ATOMIC_RELAXED);
    pthread_join(t, NULL);
    Py_END_ALLOW_THREADS
    sigaction(SIGUSR2, &old, NULL);
    return Py_BuildValue("(ii)", (int)signal_forks, (int)signal_forks_ok);
}

/* ---- the earlier discipline, emulated -------------------------------------------- */

static pthread_mutex_t old_registry = PTHREAD_MUTEX_INITIALIZER;
static _Thread_local int old_pretaken;

/* As forkguard's before-hook did: take the registry lock with the GIL released (and
 * wait a little there, as a hold would), and keep it until the fork's parent or child
 * handler. */
static PyObject *old_before(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&old_registry);
    old_pretaken = 1;
    struct timespec nap = {0, 20000000};
    nanosleep(&nap, NULL);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static void old_prepare(void)
{
    if (!old_pretaken)
        pthread_mutex_lock(&old_registry); /* a fork() from C: taken here */
}

static void old_parent(void)
{
    old_pretaken = 0;
    pthread_mutex_unlock(&old_registry);
}

static void old_child(void)
{
    static const pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    old_pretaken = 0;
    memcpy(&old_registry, &fresh, sizeof fresh);
}

static PyObject *old_install(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    pthread_atfork(old_prepare, old_parent, old_child);
    Py_RETURN_NONE;
}

/* As a registration did: the registry lock, with the GIL held. */
static PyObject *old_register(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    pthread_mutex_lock(&old_registry);
    pthread_mutex_unlock(&old_registry);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"attach", attach, METH_NOARGS, NULL},
    {"new_mutex", new_mutex, METH_VARARGS, NULL},
    {"free_mutex", free_mutex, METH_VARARGS, NULL},
    {"new_hooks", new_hooks, METH_NOARGS, NULL},
    {"unregister", unregister, METH_VARARGS, NULL},
    {"c_fork_gil_held", c_fork_gil_held, METH_NOARGS, NULL},
    {"add_hook", add_hook, METH_VARARGS, NULL},
    {"hook_results", hook_results, METH_NOARGS, NULL},
    {"signal_fork_storm", signal_fork_storm, METH_VARARGS, NULL},
    {"old_before", old_before, METH_NOARGS, NULL},
    {"old_install", old_install, METH_NOARGS, NULL},
    {"old_register", old_register, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "gilprobe", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit_gilprobe(void) { return PyModule_Create(&module); }
