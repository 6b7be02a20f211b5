"""Regenerate the committed gRPC code in services/shared/protos/ from protos/mso/v1/*.proto.

The protos' package is `mso.v1` (the wire contract: grpcurl says mso.v1.LauncherService), so protoc writes
modules that import each other as `mso.v1.*`; their import path here is `services.shared.protos`, the folder
they live in, and the imports are rewritten to it.

`python scripts/gen_protos.py --check` regenerates into a temporary folder and exits non-zero when the
committed files differ, naming them.
"""

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
TARGET = ROOT / "services" / "shared" / "protos"
PACKAGE = "services.shared.protos"


def generate(out: Path) -> list[Path]:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "mso" / "v1").glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    generated = out / "mso" / "v1"
    for f in generated.iterdir():
        text = f.read_text()
        text = re.sub(r"\b(from|import) mso\.v1\b", rf"\1 {PACKAGE}", text)
        f.write_text(re.sub(r"'mso\.v1\.(\w+_pb2)'", rf"'{PACKAGE}.\1'", text))
    (generated / "__init__.py").write_text('"""Generated gRPC code for protos/mso/v1 (scripts/gen_protos.py)."""\n')
    return sorted(generated.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed code is out of date")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        if args.check:
            names = {f.name for f in files} | {f.name for f in TARGET.glob("*.py*")}
            stale = [n for n in sorted(names)
                     if not (TARGET / n).exists() or not (Path(tmp) / "mso/v1" / n).exists()
                     or not filecmp.cmp(TARGET / n, Path(tmp) / "mso/v1" / n, shallow=False)]
            if stale:
                sys.exit(f"generated gRPC code is out of date with protos/: {', '.join(stale)}; "
                         "run python scripts/gen_protos.py")
            print("generated gRPC code is up to date")
            return
        TARGET.mkdir(exist_ok=True)
        for old in TARGET.glob("*.py*"):
            old.unlink()
        for f in files:
            shutil.copy(f, TARGET / f.name)
        print(f"wrote {len(files)} files to {TARGET.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
