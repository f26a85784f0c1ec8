"""Our cffi declarations must match the newest kernel's ublk uapi, byte for byte.

Expected values come from compiling a probe against linux/ublk_cmd.h from trixie-backports'
linux-libc-dev (the host's own header is usually years older), never from numbers typed in
here: a wrong offset in our cdef would otherwise only show up as corrupt I/O in the VM.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ublkshell.vm import debfetch

STRUCTS = [
    "ublksrv_ctrl_cmd",
    "ublksrv_ctrl_dev_info",
    "ublksrv_io_desc",
    "ublksrv_io_cmd",
    "ublk_param_basic",
    "ublk_param_discard",
    "ublk_param_devt",
    "ublk_param_zoned",
    "ublk_param_dma_align",
    "ublk_param_segment",
    "ublk_param_integrity",
    "ublk_params",
]
CONST_PREFIXES = ("UBLK_U_CMD_", "UBLK_U_IO_", "UBLK_CMD_", "UBLK_IO_", "UBLK_F_", "UBLK_S_",
                  "UBLK_PARAM_TYPE_", "UBLK_ATTR_")


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _matching_brace(text: str, open_at: int) -> int:
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError("unbalanced braces in header")


def _member_names(body: str) -> list[str]:
    """Field names of a struct body; members of anonymous unions/structs are flattened,
    as C (and cffi) let them be named directly."""
    names: list[str] = []
    i = 0
    while i < len(body):
        m = re.compile(r"\s*(union|struct)\s*\{").match(body, i)
        if m:
            close = _matching_brace(body, m.end() - 1)
            end = body.index(";", close)
            declarator = body[close + 1:end].strip()
            if declarator:
                names.append(re.match(r"\w+", declarator).group(0))
            else:
                names.extend(_member_names(body[m.end():close]))
            i = end + 1
            continue
        end = body.find(";", i)
        if end < 0:
            break
        decl = body[i:end].strip()
        i = end + 1
        if not decl:
            continue
        # "type name", "type name[N]", "type name : bits", "type a, b"
        for part in decl.split(","):
            part = re.sub(r"\[[^]]*\]", "", part.split(":")[0]).strip()
            names.append(re.findall(r"\w+", part)[-1])
    return names


def parse_header(text: str) -> tuple[dict[str, list[str]], list[str]]:
    """(struct name -> field names, constant macro names) from the header text."""
    clean = _strip_comments(text)
    structs = {}
    for name in STRUCTS:
        m = re.search(r"\bstruct\s+" + name + r"\s*\{", clean)
        if not m:
            continue
        close = _matching_brace(clean, m.end() - 1)
        structs[name] = _member_names(clean[m.end():close])
    # Object-like macros only: a name followed by "(" with no space is function-like.
    macro = re.compile(r"^[ \t]*#[ \t]*define[ \t]+(UBLK_\w+)(?=[ \t\\]|$)", re.M)
    consts = sorted({n for n in macro.findall(text) if n.startswith(CONST_PREFIXES)})
    return structs, consts


def _probe_source(structs: dict[str, list[str]], consts: list[str]) -> str:
    out = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <errno.h>",
        # The header uses _IOR/_IOWR without including their definitions, like its users do.
        "#include <linux/ioctl.h>",
        "#include <linux/ublk_cmd.h>",
        "#define MSZ(T, f) sizeof(((T *)0)->f)",
        "int main(void) {",
        '  printf("{\\"structs\\": {");',
    ]
    for si, (s, fields) in enumerate(structs.items()):
        out.append(f'  printf("%s\\"{s}\\": {{\\"size\\": %zu, \\"fields\\": {{", '
                   f'"{"," if si else ""}", sizeof(struct {s}));')
        for fi, f in enumerate(fields):
            out.append(f'  printf("%s\\"{f}\\": [%zu, %zu]", "{"," if fi else ""}", '
                       f"offsetof(struct {s}, {f}), MSZ(struct {s}, {f}));")
        out.append('  printf("}}");')
    out.append('  printf("}, \\"consts\\": {");')
    for ci, c in enumerate(consts):
        sep = "," if ci else ""
        # Some values are negative errnos, others use all 64 bits: print each in its own sign.
        out.append(f'  if (({c}) < 0) printf("{sep}\\"{c}\\": %lld", (long long)({c})); '
                   f'else printf("{sep}\\"{c}\\": %llu", (unsigned long long)({c}));')
    out += ['  printf("}}\\n");', "  return 0;", "}"]
    return "\n".join(out) + "\n"


_fetch_error: list[str] = []


@pytest.fixture(scope="session")
def kernel_header() -> Path:
    # pytest retries a failed session fixture for every test; offline, fail fast after once.
    if not _fetch_error:
        try:
            return debfetch.fetch_uapi_header()
        except debfetch.FetchError as e:
            _fetch_error.append(str(e))
    pytest.fail(f"cannot fetch the 7.x linux/ublk_cmd.h from linux-libc-dev: {_fetch_error[0]}",
                pytrace=False)


@pytest.fixture(scope="session")
def kernel_layout(kernel_header: Path, tmp_path_factory) -> dict:
    structs, consts = parse_header(kernel_header.read_text())
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.fail("no C compiler (cc) found; run scripts/setup.sh", pytrace=False)
    work = tmp_path_factory.mktemp("uapi-probe")
    # Only ublk_cmd.h comes from the new package: linux/types.h, asm/ioctl.h and friends stay
    # the system's, matching what our extension is compiled against.
    inc = work / "include"
    (inc / "linux").mkdir(parents=True)
    shutil.copy(kernel_header, inc / "linux" / "ublk_cmd.h")
    src = work / "probe.c"
    src.write_text(_probe_source(structs, consts))
    exe = work / "probe"
    p = subprocess.run([cc, "-std=gnu11", "-I", str(inc), "-o", str(exe), str(src)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.fail(f"the uapi probe did not compile:\n{p.stderr}", pytrace=False)
    p = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    layout = json.loads(p.stdout)
    layout["header"] = str(kernel_header)
    return layout


@pytest.fixture(scope="session")
def native():
    try:
        from ublkshell._native import ffi, lib
    except ImportError as e:
        pytest.fail(f"ublkshell._native is not built ({e}); run scripts/setup.sh", pytrace=False)
    return ffi, lib


def _report(title: str, problems: list[str], header: str) -> None:
    if problems:
        pytest.fail(f"{title} ({len(problems)}), compared with {header}:\n  "
                    + "\n  ".join(problems), pytrace=False)


def test_probe_covers_header(kernel_layout):
    """The probe itself: every struct found, fields parsed, constants of each family seen."""
    missing = [s for s in STRUCTS if s not in kernel_layout["structs"]]
    assert not missing, f"structs not found in {kernel_layout['header']}: {missing}"
    for s, info in kernel_layout["structs"].items():
        assert info["fields"], f"no fields parsed for struct {s}"
        assert info["size"] > 0
    consts = kernel_layout["consts"]
    for prefix in ("UBLK_U_CMD_", "UBLK_U_IO_", "UBLK_CMD_", "UBLK_IO_", "UBLK_F_", "UBLK_S_",
                   "UBLK_PARAM_TYPE_"):
        assert any(c.startswith(prefix) for c in consts), f"no {prefix}* macro found"
    # Union members must both be visible: the kernel overlays them, and we address both.
    iod = kernel_layout["structs"]["ublksrv_io_desc"]["fields"]
    assert iod["nr_sectors"][0] == iod["nr_zones"][0]
    cmd = kernel_layout["structs"]["ublksrv_io_cmd"]["fields"]
    assert cmd["addr"][0] == cmd["zone_append_lba"][0]


def test_struct_sizes(kernel_layout, native):
    ffi, _ = native
    problems = []
    for s, info in kernel_layout["structs"].items():
        try:
            ours = ffi.sizeof(f"struct {s}")
        except ffi.error as e:
            problems.append(f"struct {s}: not declared in our cdef ({e})")
            continue
        if ours != info["size"]:
            problems.append(f"struct {s}: sizeof kernel {info['size']}, ours {ours}")
    _report("struct size mismatches", problems, kernel_layout["header"])


def test_struct_fields(kernel_layout, native):
    ffi, _ = native
    problems = []
    for s, info in kernel_layout["structs"].items():
        try:
            ctype = ffi.typeof(f"struct {s}")
        except ffi.error:
            continue  # reported by test_struct_sizes
        ours = {name: f for name, f in (ctype.fields or [])}
        for name, (off, size) in info["fields"].items():
            try:
                our_off = ffi.offsetof(f"struct {s}", name)
            except (KeyError, ffi.error, TypeError):
                problems.append(f"struct {s}.{name}: missing in ours")
                continue
            if our_off != off:
                problems.append(f"struct {s}.{name}: offset kernel {off}, ours {our_off}")
            if name in ours:
                our_size = ffi.sizeof(ours[name].type)
                if our_size != size:
                    problems.append(f"struct {s}.{name}: size kernel {size}, ours {our_size}")
        for name in ours:
            if name and name not in info["fields"]:
                problems.append(f"struct {s}.{name}: ours only, the kernel has no such field")
    _report("struct field mismatches", problems, kernel_layout["header"])


def test_constants_present(kernel_layout, native):
    _, lib = native
    missing = [c for c in kernel_layout["consts"] if not hasattr(lib, c)]
    _report("kernel constants missing from ublkshell._native.lib", missing,
            kernel_layout["header"])


def test_constant_values(kernel_layout, native):
    _, lib = native
    problems = []
    for c, value in kernel_layout["consts"].items():
        if hasattr(lib, c) and getattr(lib, c) != value:
            ours = getattr(lib, c)
            problems.append(f"{c}: kernel {value:#x} ({value}), ours {ours:#x} ({ours})"
                            if isinstance(ours, int) else f"{c}: kernel {value}, ours {ours!r}")
    _report("constant value mismatches", problems, kernel_layout["header"])
