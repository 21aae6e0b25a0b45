"""The skill bundle: the files of a checkout that OpenClaw receives (`./install.sh --openclaw`) and that
`clawhub publish` would publish, chosen by `.clawhubignore` (gitignore syntax, as ClawHub reads it).

    python -m pinkybrain.skill.bundle [--root DIR] [--out DIR] [--json]

lists the bundle (paths, sizes, total); with --out it also writes the bundle into a new folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pathspec

IGNORE_FILE = ".clawhubignore"
MAX_BUNDLE_BYTES = 1_000_000  # ClawHub bundles are text; the whole checkout (venv, model) is ~800 MB
REQUIRED = "SKILL.md"


class BundleError(RuntimeError):
    pass


@dataclass(frozen=True)
class Bundle:
    root: Path
    files: tuple[tuple[str, int], ...]  # (relative POSIX path, size in bytes)

    @property
    def total(self) -> int:
        return sum(size for _, size in self.files)

    def as_dict(self) -> dict:
        return {
            "root": str(self.root),
            "files": [{"path": p, "bytes": n} for p, n in self.files],
            "total_bytes": self.total,
            "limit_bytes": MAX_BUNDLE_BYTES,
        }


def load_spec(root: Path) -> pathspec.GitIgnoreSpec:
    try:
        lines = (root / IGNORE_FILE).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise BundleError(f"{root / IGNORE_FILE} is missing: without it the bundle would be the whole folder") from None
    return pathspec.GitIgnoreSpec.from_lines(lines)


def collect(root: Path) -> Bundle:
    """Every regular file under root that the ignore file keeps; ignored folders are not even entered
    (a .venv holds tens of thousands of files). Symbolic links are left out: a bundle holds copies."""
    root = root.resolve()
    spec = load_spec(root)
    files: list[tuple[str, int]] = []
    for here, dirs, names in os.walk(root):
        rel_here = Path(here).relative_to(root)
        dirs[:] = sorted(
            d for d in dirs
            if not (Path(here) / d).is_symlink() and not spec.match_file(f"{(rel_here / d).as_posix()}/")
        )
        for name in sorted(names):
            path = Path(here) / name
            rel = (rel_here / name).as_posix()
            if path.is_symlink() or not path.is_file() or spec.match_file(rel):
                continue
            files.append((rel, path.stat().st_size))
    bundle = Bundle(root, tuple(files))
    if REQUIRED not in {p for p, _ in bundle.files}:
        raise BundleError(f"{IGNORE_FILE} in {root} leaves out {REQUIRED}, the skill itself")
    if bundle.total > MAX_BUNDLE_BYTES:
        biggest = sorted(bundle.files, key=lambda f: -f[1])[:3]
        raise BundleError(
            f"the bundle is {bundle.total} bytes, over the {MAX_BUNDLE_BYTES}-byte limit; largest: "
            + ", ".join(f"{p} ({n} bytes)" for p, n in biggest)
            + f"; add them to {IGNORE_FILE}"
        )
    return bundle


def write(bundle: Bundle, out: Path) -> None:
    """Copy the bundle into `out`, which must not exist yet (or be empty): never merged with old files."""
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out} is not empty; give a new folder")
    for rel, _ in bundle.files:
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(bundle.root / rel, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pinkybrain.skill.bundle", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the checkout (default: here)")
    parser.add_argument("--out", type=Path, help="write the bundle into this new folder")
    parser.add_argument("--json", action="store_true", help="print the listing as JSON")
    args = parser.parse_args(argv)
    try:
        bundle = collect(args.root)
        if args.out:
            write(bundle, args.out)
    except (BundleError, OSError) as exc:
        print(f"pinkybrain bundle: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(bundle.as_dict(), indent=2))
    else:
        for rel, size in bundle.files:
            print(f"{size:>9}  {rel}")
        print(f"{bundle.total:>9}  total ({len(bundle.files)} files, limit {MAX_BUNDLE_BYTES})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
