"""The DVC commands `pairgan retrain` runs, each a subprocess with an argument list, in the checkout."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

LOCK_FILE = "dvc.lock"


class DvcFailed(RuntimeError):
    """A DVC command failed; the message names it (DVC printed its own reason above)."""


def dvc(project: Path, *arguments: str, capture: bool = False,
        environment: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `dvc ARGUMENTS` in `project` (the same Python's DVC); its output reaches the console unless captured."""
    return subprocess.run([sys.executable, "-m", "dvc", *arguments], cwd=project, env=environment,
                          capture_output=capture, text=True)


def checked(project: Path, *arguments: str, capture: bool = False) -> subprocess.CompletedProcess:
    done = dvc(project, *arguments, capture=capture)
    if done.returncode != 0:
        detail = f": {(done.stderr or '').strip()[-2000:]}" if capture else ""
        raise DvcFailed(f"`dvc {' '.join(arguments)}` failed (exit status {done.returncode}){detail}")
    return done


def use_remote_url(project: Path, name: str, url: str) -> None:
    """Point the remote `name` at `url` for this checkout only (.dvc/config.local), as the default remote."""
    checked(project, "remote", "add", "--local", "--force", "--default", name, url, capture=True)


def remote_location(project: Path, name: str | None) -> tuple[str, str]:
    """(name, URL) of the remote `name`, or of the default remote; relative folders made absolute."""
    from dvc.repo import Repo

    repo = Repo(str(project))
    try:
        config = repo.config
        chosen = name or config["core"].get("remote")
        if not chosen:
            raise DvcFailed("no DVC remote: .dvc/config names no default remote (`dvc remote add -d NAME URL`)")
        if chosen not in config["remote"]:
            raise DvcFailed(f"no DVC remote named {chosen!r} (`dvc remote list` shows the configured ones)")
        return chosen, str(config["remote"][chosen]["url"])
    finally:
        repo.close()


def stale_stages(project: Path) -> list[str]:
    """The stages `dvc repro` would run: a dependency, a param or an output changed or is missing."""
    status = json.loads(checked(project, "status", "--json", capture=True).stdout or "{}")
    return sorted(name.rpartition(":")[2] for name in status)


def uncached_outputs(project: Path) -> list[str]:
    """The outputs dvc.yaml declares with `cache: false` (the reports): DVC's remote does not keep them."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    found = []
    for stage in stages.values():
        for out in stage.get("outs", []):
            if isinstance(out, dict):
                found += [path for path, options in out.items() if options and options.get("cache") is False]
    return found


def locked_stages(project: Path) -> dict[str, object]:
    """dvc.lock's record per stage ({} without one): a stage whose record changed has run."""
    path = project / LOCK_FILE
    if not path.exists():
        return {}
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages", {})
