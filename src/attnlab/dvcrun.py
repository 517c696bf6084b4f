"""``python -m attnlab.dvcrun <dvc arguments>``: DVC's own command line, writing ``dvc.lock`` faster.

After each stage, DVC re-reads the whole ``dvc.lock`` with ruamel's round-trip YAML parser
(pure Python; it keeps comments) and writes all of it again, to change that one stage's
entry: 1.3 s per stage for this project's 4,600-line lock, about 55 s of a ``make run``
(docs/results.md). This runs DVC's command line with one change: a stage's entry is
written by replacing that stage's block of lines in the file with DVC's own YAML dump of
the entry (its key at two spaces' indent, everything else deeper), or appending it when
the stage is new, which gives the same bytes as DVC's own writer (tests/test_dvcrun.py
compares both). Anything else -- no lock file yet, another schema, top-level keys after
``stages`` (DVC's datasets), lines at an indent DVC does not write, a stage's block not
found exactly once -- is written by DVC's own code. ``make run`` and ``make run-pretrained``
use it; a plain ``dvc repro`` reads and writes the same files, only slower.
"""
from __future__ import annotations

import sys
from typing import Any

HEADER = "schema: '2.0'\nstages:\n"


def blocks(text: str) -> list[str] | None:
    """The lock's stage entries as text (each with its lines' newlines), in file order;
    None when ``text`` is not a lock of stages only, as DVC writes it."""
    if not text.startswith(HEADER):
        return None
    out: list[str] = []
    for line in text[len(HEADER):].splitlines(keepends=True):
        if not line.endswith("\n"):
            return None
        if line.startswith("    "):
            if not out:
                return None
            out[-1] += line
        elif line.startswith("  ") and line[2] not in " -#\n":
            out.append(line)
        else:
            return None
    return out


def entry(stage_data: dict[str, Any]) -> str:
    """One stage's entry ``{name: {...}}`` as DVC dumps it inside ``stages:``."""
    from dvc.utils.serialize._yaml import dumps_yaml      # DVC's own dump, as its lock writer's

    text = dumps_yaml({"stages": stage_data})
    if not text.startswith("stages:\n"):
        raise ValueError(f"unexpected dump of {list(stage_data)}: {text[:40]!r}")
    return text[len("stages:\n"):]


def splice(text: str, entries: list[str]) -> tuple[str, bool] | None:
    """``text`` with each entry's block replaced (matched by its first line, the stage's
    key) or appended, and whether any entry changed; None when ``text`` is not as DVC
    writes it or a key line is not found exactly once."""
    parts = blocks(text)
    if parts is None:
        return None
    modified = False
    for new in entries:
        key = new.split("\n", 1)[0] + "\n"
        if key.startswith("    ") or not key.startswith("  "):
            return None
        where = [i for i, block in enumerate(parts) if block.startswith(key)]
        if len(where) > 1:
            return None
        if where:
            modified |= parts[where[0]] != new
            parts[where[0]] = new
        else:
            modified = True
            parts.append(new)
    return HEADER + "".join(parts), modified


def install() -> bool:
    """Replace ``Lockfile.dump_stages`` with the splicing writer (falling back to DVC's);
    False, with a line on stderr, when this DVC lacks what it replaces or calls."""
    try:
        from dvc.dvcfile import Lockfile, logger
        from dvc.stage import serialize
        from dvc.utils.serialize import _yaml

        original = Lockfile.dump_stages
        serialize.to_lockfile, _yaml.dumps_yaml  # noqa: B018  (what the writer calls)
    except (ImportError, AttributeError) as err:
        print(f"attnlab.dvcrun: dvc.lock is written by DVC's own code ({err})", file=sys.stderr)
        return False

    if getattr(original, "_attnlab", False):
        return True

    def dump_stages(self, stages, **kwargs):
        if not stages:
            return None
        fs = self.repo.fs
        try:
            with fs.open(self.path, encoding="utf-8") as fd:
                text = fd.read()
        except FileNotFoundError:
            return original(self, stages, **kwargs)
        try:
            entries = [entry(serialize.to_lockfile(stage, **kwargs)) for stage in stages]
        except ValueError:
            return original(self, stages, **kwargs)
        spliced = splice(text, entries)
        if spliced is None:
            return original(self, stages, **kwargs)
        new, modified = spliced
        logger.debug("attnlab.dvcrun: %d entries spliced into '%s'", len(entries), self.relpath)
        if modified:              # DVC compares the entries' data; equal data dumps to equal text
            logger.info("Updating lock file '%s'", self.relpath)
        with fs.open(self.path, "w+", encoding="utf-8") as fd:
            fd.write(new)
        if modified:
            self.repo.scm_context.track_file(self.relpath)
        return None

    dump_stages._attnlab = True
    Lockfile.dump_stages = dump_stages
    return True


def main(argv: list[str] | None = None) -> int:
    install()
    from dvc.cli import main as dvc_main

    return dvc_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
