"""Build hook: generate the apcm.v1 gRPC stubs from proto/ before packaging.

The stubs are build output (git-ignored), never committed. The proto folder is
the import path (proto/apcm/v1 -> apcm.v1), so protoc's output imports cleanly.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
PROTO_ROOT = ROOT / "proto"
GEN_ROOT = ROOT / "gen"
# Folder -> import name. ``tools`` (training, evaluation, benchmarks) is mapped only
# where the folder exists: the serving image copies server/, client/ and wire/ alone.
PACKAGE_DIRS = {
    "apcm.server": "server",
    "apcm.client": "client",
    "apcm.wire": "wire",
    "apcm.tools": "tools",
    "apcm.v1": "gen/apcm/v1",
}


def generate_stubs() -> None:
    from grpc_tools import protoc  # build-time dependency only

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    out = GEN_ROOT / "apcm" / "v1"
    out.mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={GEN_ROOT}",
        f"--pyi_out={GEN_ROOT}",
        f"--grpc_python_out={GEN_ROOT}",
        *protos,
    ]
    cwd = os.getcwd()
    try:
        os.chdir(PROTO_ROOT)
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed to generate the apcm.v1 stubs")
    finally:
        os.chdir(cwd)
    (out / "__init__.py").write_text('"""Generated gRPC stubs for apcm.v1 (do not edit)."""\n')


def find_packages_mapped() -> list[str]:
    packages = []
    for name, folder in PACKAGE_DIRS.items():
        base = ROOT / folder
        if not base.is_dir():
            continue
        for init in sorted(base.rglob("__init__.py")):
            rel = init.parent.relative_to(base)
            packages.append(".".join([name, *rel.parts]) if rel.parts else name)
    return packages


class BuildWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        self.packages = find_packages_mapped()
        super().run()


generate_stubs()
setup(
    packages=find_packages_mapped(),
    package_dir={n: f for n, f in PACKAGE_DIRS.items() if (ROOT / f).is_dir()},
    package_data={"apcm.server.browser": ["static/*"]},
    cmdclass={"build_py": BuildWithStubs})
