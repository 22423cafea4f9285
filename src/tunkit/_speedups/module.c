/*
 * module.c: the module tunkit._speedups: its definition and method table,
 * its state (get_state), bind() and the argument parsing that the units'
 * functions share. Its Python side is tunkit/_offload/_impl.py, which
 * imports it, calls bind() and chooses it or the pure engine; the type stub
 * is tunkit/_speedups.pyi.
 */

#include "tunkit.h"

state_t *
get_state(PyObject *module)
{
    state_t *st = (state_t *)PyModule_GetState(module);
    if (st->malformed == NULL) {
        PyErr_SetString(PyExc_RuntimeError,
                        "tunkit._speedups: bind() was not called (import tunkit._offload)");
        return NULL;
    }
    return st;
}

/* Parse fast-call arguments by name: args[0..nargs) then keywords. */
int
parse_args(const char *fname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
           const char *const *names, int n_names, int n_required, PyObject **out)
{
    if (nargs > n_names) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", fname,
                     n_names, nargs);
        return -1;
    }
    for (int i = 0; i < n_names; i++) {
        out[i] = i < nargs ? args[i] : NULL;
    }
    if (kwnames != NULL) {
        Py_ssize_t nk = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t k = 0; k < nk; k++) {
            PyObject *key = PyTuple_GET_ITEM(kwnames, k);
            int found = 0;
            for (int i = 0; i < n_names; i++) {
                if (PyUnicode_CompareWithASCIIString(key, names[i]) == 0) {
                    if (out[i] != NULL) {
                        PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'",
                                     fname, names[i]);
                        return -1;
                    }
                    out[i] = args[nargs + k];
                    found = 1;
                    break;
                }
            }
            if (!found) {
                PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'",
                             fname, key);
                return -1;
            }
        }
    }
    for (int i = 0; i < n_required; i++) {
        if (out[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname,
                         names[i]);
            return -1;
        }
    }
    return 0;
}

PyDoc_STRVAR(bind_doc,
"bind(malformed, too_big, too_many, write_cls, zero_hdr)\n--\n\n"
"Give the kernels the Python classes they raise and build (tunkit._offload does).");

static PyObject *
py_bind(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "bind() takes 5 arguments");
        return NULL;
    }
    for (int i = 0; i < 3; i++) {
        if (!PyExceptionClass_Check(args[i])) {
            PyErr_SetString(PyExc_TypeError, "bind(): the first three must be exception classes");
            return NULL;
        }
    }
    /* new_write fills the tuple's items itself: a tuple subclass of 5
     * fields whose instances have no other storage (a NamedTuple). */
    PyObject *fields = PyType_Check(args[3]) ? PyObject_GetAttrString(args[3], "_fields") : NULL;
    Py_ssize_t n_fields = fields ? PyObject_Length(fields) : -1;
    Py_XDECREF(fields);
    if (n_fields != WRITE_FIELDS || !PyType_IsSubtype((PyTypeObject *)args[3], &PyTuple_Type) ||
        ((PyTypeObject *)args[3])->tp_basicsize != PyTuple_Type.tp_basicsize) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "bind(): write_cls must be a NamedTuple of 5 fields");
        return NULL;
    }
    state_t *st = (state_t *)PyModule_GetState(module);
    PyObject **slots[] = {&st->malformed, &st->too_big, &st->too_many, &st->write_cls,
                          &st->zero_hdr};
    for (int i = 0; i < 5; i++) {
        Py_INCREF(args[i]);
        Py_XSETREF(*slots[i], args[i]);
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"ones_sum", (PyCFunction)(void (*)(void))py_ones_sum, METH_FASTCALL | METH_KEYWORDS,
     ones_sum_doc},
    {"checksum", (PyCFunction)(void (*)(void))py_checksum, METH_FASTCALL | METH_KEYWORDS,
     checksum_doc},
    {"pseudo_sum", (PyCFunction)(void (*)(void))py_pseudo_sum, METH_FASTCALL | METH_KEYWORDS,
     pseudo_sum_doc},
    {"update16", (PyCFunction)(void (*)(void))py_update16, METH_FASTCALL | METH_KEYWORDS,
     update16_doc},
    {"split", (PyCFunction)(void (*)(void))py_split, METH_FASTCALL | METH_KEYWORDS, split_doc},
    {"coalesce", (PyCFunction)(void (*)(void))py_coalesce, METH_FASTCALL | METH_KEYWORDS,
     coalesce_doc},
    {"bind", (PyCFunction)(void (*)(void))py_bind, METH_FASTCALL, bind_doc},
    {"gso_segments", (PyCFunction)py_gso_segments, METH_O, gso_segments_doc},
    {NULL, NULL, 0, NULL},
};

static int
mod_traverse(PyObject *m, visitproc visit, void *arg)
{
    state_t *st = (state_t *)PyModule_GetState(m);
    Py_VISIT(st->malformed);
    Py_VISIT(st->too_big);
    Py_VISIT(st->too_many);
    Py_VISIT(st->write_cls);
    Py_VISIT(st->zero_hdr);
    return 0;
}

static int
mod_clear(PyObject *m)
{
    state_t *st = (state_t *)PyModule_GetState(m);
    Py_CLEAR(st->malformed);
    Py_CLEAR(st->too_big);
    Py_CLEAR(st->too_many);
    Py_CLEAR(st->write_cls);
    Py_CLEAR(st->zero_hdr);
    return 0;
}

static void
mod_free(void *m)
{
    mod_clear((PyObject *)m);
}

static int
mod_exec(PyObject *m)
{
    if (PyType_Ready(&packet_io_type) < 0) {
        return -1;
    }
    Py_INCREF(&packet_io_type);
    if (PyModule_AddObject(m, "PacketIo", (PyObject *)&packet_io_type) < 0) {
        Py_DECREF(&packet_io_type);
        return -1;
    }
    if (PyType_Ready(&udp_io_type) < 0) {
        return -1;
    }
    Py_INCREF(&udp_io_type);
    if (PyModule_AddObject(m, "UdpIo", (PyObject *)&udp_io_type) < 0) {
        Py_DECREF(&udp_io_type);
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, mod_exec},
    {0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    "tunkit._speedups",
    "Native kernels of tunkit: checksum, split, coalesce; PacketIo, the system calls of a TUN "
    "device.",
    sizeof(state_t),
    methods,
    slots,
    mod_traverse,
    mod_clear,
    mod_free,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&moduledef);
}
