"""Releases under the service's state directory, for the systemd unit: one venv per version and a
`current` link that the unit's ExecStart runs through, so an update never writes to the read-only
install tree (/opt/pinkybrain under ProtectSystem=strict) and needs no root.

    $PINKYBRAIN_HOME/releases/<version>/   a venv: this release and the dependencies it adds
    $PINKYBRAIN_HOME/current  -> a release (or the install tree's venv, as install.sh --system links it)
    $PINKYBRAIN_HOME/previous -> what `current` was before the last switch (rollback goes there)

A release venv reaches the install tree's packages through a .pth line (site.addsitedir, so .pth files
there work too): pip sees them as installed and fetches only what the release's own requirements add,
which land in the release venv and shadow the install tree's copies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

RELEASES_DIR = "releases"
CURRENT = "current"
PREVIOUS = "previous"
BASE_PTH = "pinkybrain-base.pth"
VENV_TIMEOUT_SECS = 120.0


class ReleaseTreeError(RuntimeError):
    """A release venv could not be made or switched; str() says why."""


def _site_packages(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return Path(out.stdout.strip())


def running_base_site() -> Path:
    """The install tree's site-packages as this process sees it: the running release's base, or, when the
    process runs from the install tree itself, its own site-packages."""
    own = Path(sysconfig.get_paths()["purelib"])
    pth = own / BASE_PTH
    if pth.is_file():
        for line in pth.read_text(encoding="utf-8").splitlines():
            if line.startswith("import site; site.addsitedir("):
                return Path(line.split("(", 1)[1].rsplit(")", 1)[0].strip("'\""))
    return own


class ReleaseTree:
    def __init__(self, home: Path):
        self.home = home
        self.releases = home / RELEASES_DIR
        self.current = home / CURRENT
        self.previous = home / PREVIOUS

    def running_through_current(self) -> bool:
        """Whether this process's environment is the one `current` names (the unit runs through it)."""
        try:
            return self.current.is_symlink() and self.current.resolve() == Path(sys.prefix).resolve()
        except OSError:
            return False

    def release_dir(self, version: str) -> Path:
        return self.releases / version

    def create(self, version: str, base_site: Path, python: str) -> Path:
        """A fresh venv for `version` whose imports fall back to the install tree's packages. Built at its
        final path (venv scripts name their interpreter by absolute path); a leftover of a failed attempt
        is replaced, the running release never."""
        target = self.release_dir(version)
        if self.current.exists() and target.resolve() == self.current.resolve():
            raise ReleaseTreeError(f"{target} is the running release")
        self.releases.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.rmtree(target, ignore_errors=True)
        try:
            subprocess.run(
                [python, "-m", "venv", "--without-pip", str(target)],
                capture_output=True, text=True, timeout=VENV_TIMEOUT_SECS, check=True,
            )  # fmt: skip
            site = _site_packages(target / "bin" / "python")
            (site / BASE_PTH).write_text(f"import site; site.addsitedir({str(base_site)!r})\n", encoding="utf-8")
        except (OSError, subprocess.SubprocessError) as exc:
            shutil.rmtree(target, ignore_errors=True)
            detail = getattr(exc, "stderr", None) or exc
            raise ReleaseTreeError(f"cannot create the release venv {target}: {detail}") from None
        return target

    def discard(self, target: Path) -> None:
        if not (self.current.exists() and target.resolve() == self.current.resolve()):
            shutil.rmtree(target, ignore_errors=True)

    def switch(self, target: Path) -> Path | None:
        """Point `current` at target (atomically: a new link renamed over the old one), `previous` at what
        it was; returns that. Releases that are neither are removed."""
        old = self.current.resolve() if self.current.is_symlink() else None
        if old is not None:
            _link(self.previous, old)
        _link(self.current, target)
        keep = {p.resolve() for p in (target, old) if p is not None}
        for release in self.releases.iterdir() if self.releases.is_dir() else ():
            if release.resolve() not in keep:
                shutil.rmtree(release, ignore_errors=True)
        return old

    def roll_back(self) -> Path:
        """`current` back to `previous`."""
        if not self.previous.is_symlink():
            raise ReleaseTreeError(f"no {self.previous} to go back to")
        target = self.previous.resolve()
        _link(self.current, target)
        return target


def _link(path: Path, target: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, path)
