"""Every C function the Python packages declare to ctypes has the arity, argument kinds and
result kind of its prototype in ``include/elra.h`` — a wrong ``argtypes`` list would pass
arguments in the wrong registers and crash or corrupt memory, and paths that cannot run here
(the CUDA exports without a GPU) are only safe if their declarations are checked here."""

import ctypes
import importlib
import os
import re

import pytest

import elra

HEADER = os.path.join(os.path.dirname(__file__), "..", "..", "include", "elra.h")


def prototypes():
    """``{name: (result kind, [argument kinds])}`` of every ``elra_*`` prototype in the header."""
    text = re.sub(r"/\*.*?\*/", "", open(HEADER).read(), flags=re.S)
    out = {}
    for ret, name, args in re.findall(r"\n([A-Za-z_][\w \*]*?)\b(elra_\w+)\(([^;{]*?)\);", text):
        kinds = []
        for a in args.split(","):
            a = " ".join(a.split())
            if a and a != "void":
                kinds.append(c_kind(re.sub(r"\b\w+$", "", a).strip()))
        out[name] = (c_kind(ret.strip()), kinds)
    return out


def c_kind(t):
    if "*" in t:
        return "ptr"
    return {"size_t": "size", "uint32_t": "u32", "double": "f64", "float": "f32", "void": "void",
            "ElraStatus": "i32", "int32_t": "i32", "int": "i32"}[t]


def py_kind(t):
    if t is None:
        return "void"
    if t in (ctypes.c_void_p, ctypes.c_char_p) or issubclass(t, ctypes._Pointer) \
            or getattr(t, "__name__", "").startswith("LP_"):
        return "ptr"
    if issubclass(t, ctypes.c_void_p):
        return "ptr"
    return {ctypes.c_size_t: "size", ctypes.c_uint32: "u32", ctypes.c_double: "f64",
            ctypes.c_float: "f32", ctypes.c_int: "i32", ctypes.c_int32: "i32"}[t]


def declared():
    """The functions of ``elra.lib`` that a package configured (``argtypes`` set)."""
    for mod in ("elra.gpu", "elra.torch"):
        try:
            m = importlib.import_module(mod)
        except ImportError:  # torch is not installed
            continue
        if mod == "elra.gpu" and m.available():  # a library built with the `cuda` feature
            m._declare()
    return {name: f for name, f in vars(elra.lib).items()
            if name.startswith("elra_") and getattr(f, "argtypes", None) is not None}


def test_every_declared_function_matches_its_prototype():
    protos = prototypes()
    funcs = declared()
    assert len(funcs) >= 20, sorted(funcs)
    bad = []
    for name, f in sorted(funcs.items()):
        assert name in protos, f"{name} is declared in Python but not in include/elra.h"
        ret, args = protos[name]
        got = [py_kind(t) for t in f.argtypes]
        if got != args:
            bad.append(f"{name}: Python {got} vs header {args}")
        if py_kind(f.restype) != ret:
            bad.append(f"{name}: result {py_kind(f.restype)} vs header {ret}")
    assert not bad, "\n".join(bad)


def test_the_header_parser_sees_every_export():
    protos = prototypes()
    assert len(protos) >= 70
    assert protos["elra_op_forward_f32"][1][:3] == ["ptr", "ptr", "size"]
    assert protos["elra_version"] == ("u32", [])
    with pytest.raises(KeyError):
        c_kind("long double")
