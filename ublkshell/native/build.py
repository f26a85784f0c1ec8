"""cffi builder for ublkshell._native (API mode, compiled against liburing and libfuse3).

The cdef is generated from our own headers so that the C code and what Python
sees cannot drift apart: struct bodies come from uapi.h, every integer
#define in uapi.h becomes a constant on `lib`, and ushell_api.h (plus
fuse_api.h for the FUSE transport) is the call surface.
"""
import glob
import os
import re
import shlex
import subprocess

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
# a target is its own target_*.c (registered by one line in targets.c): none is listed here
SOURCES = ["pipeline.c", "ring.c", "ctrl.c", "records.c", "names.c", "faults.c", "faults_rules.c",
           "faults_heal.c", "writelog.c", "logwrites.c", "logwrites_file.c", "targets.c", "ring_batch.c", "ublk_buffers.c", "zones.c", "fuse_transport.c", "fuse_session.c"]
SOURCES += sorted(os.path.basename(p) for p in glob.glob(os.path.join(HERE, "target_*.c")))


def _read(name):
    with open(os.path.join(HERE, name)) as f:
        return f.read()


def _strip_preprocessor(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    # cdef cannot see macros: inline plain numbers so array sizes like [US_HIST_BUCKETS] parse
    numbers = dict(re.findall(r"^\s*#define\s+([A-Z][A-Z0-9_]+)\s+(\d+)\s*$", text, flags=re.M))
    body = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))
    for name, value in numbers.items():
        body = re.sub(rf"\b{name}\b", value, body)
    return body


def _constants(text):
    names = re.findall(r"^\s*#define\s+([A-Z][A-Z0-9_]+)\s+\S", text, flags=re.M)
    skip = {"USHELL_UAPI_H", "USHELL_RECORDS_H", "USHELL_FAULTS_H"}
    return "\n".join(f"#define {n} ..." for n in names if n not in skip)


def _pkg_config(pkg, fallback_include, fallback_lib):
    """(include dirs, libraries) of a library, from pkg-config when it is there."""
    try:
        cflags = subprocess.run(["pkg-config", "--cflags", pkg], capture_output=True, text=True, check=True).stdout
        libs = subprocess.run(["pkg-config", "--libs", pkg], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return [fallback_include], [fallback_lib]
    incs = [f[2:] for f in shlex.split(cflags) if f.startswith("-I")]
    names = [f[2:] for f in shlex.split(libs) if f.startswith("-l")]
    return incs, names or [fallback_lib]


def _sanitize_flags():
    """(compile, link) flags: ASan and UBSan when UBLKSHELL_SANITIZE=1 (scripts/sanitize.sh).

    Such a build only loads into a process whose first library is gcc's libasan
    (LD_PRELOAD), since Python itself is not instrumented. Every report is fatal.
    Python's own CFLAGS carry -fwrapv, which defines signed overflow and so turns
    UBSan's check for it off: -fno-wrapv turns it back on for our code.
    """
    if os.environ.get("UBLKSHELL_SANITIZE") != "1":
        return ["-O2"], []
    san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    return san + ["-fno-omit-frame-pointer", "-g", "-O1", "-fno-wrapv"], san


def make_ffi():
    uapi = _read("uapi.h")
    records = _read("records.h")
    ffi = FFI()
    ffi.cdef("""
typedef uint8_t __u8; typedef uint16_t __u16; typedef uint32_t __u32;
typedef uint64_t __u64; typedef int32_t __s32;
""")
    ffi.cdef(_strip_preprocessor(uapi))
    ffi.cdef(_constants(uapi))
    ffi.cdef(_strip_preprocessor(records))
    ffi.cdef(_constants(records))
    faults = _read("faults.h")
    ffi.cdef(_strip_preprocessor(faults))
    ffi.cdef(_constants(faults))
    ffi.cdef(_strip_preprocessor(_read("ushell_api.h")))
    ffi.cdef(_strip_preprocessor(_read("fuse_api.h")))
    fuse_incs, fuse_libs = _pkg_config("fuse3", "/usr/include/fuse3", "fuse3")
    cflags, ldflags = _sanitize_flags()
    ffi.set_source(
        "ublkshell._native",
        '#include "ushell.h"\n#include "fuse_api.h"\n',
        sources=[os.path.join("ublkshell", "native", s) for s in SOURCES],
        include_dirs=[os.path.join("ublkshell", "native")] + fuse_incs,
        libraries=["uring", "pthread"] + [l for l in fuse_libs if l != "pthread"],
        extra_compile_args=cflags + ["-Wall", "-Wno-unused-function", "-std=gnu11"],
        extra_link_args=ldflags,
    )
    return ffi


ffibuilder = make_ffi()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
