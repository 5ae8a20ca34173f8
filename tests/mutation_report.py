r"""Summarise mutmut runs (tests/mutation.sh calls it: RUN for one run, --summary RUN... for all).

Prints, per mutated file: mutants tried, detected (a test failed or timed out),
surviving mutants listed as equivalent in the equivalents file, and the score
detected / (tried - equivalent). Then every survivor that is not listed, with its
diff, and every listed entry that matched no mutant (stale after a code change).

The equivalents file holds blocks separated by blank lines:

    distprop/optim/adam.py Adam.step
      - if weight_decay != 0:
      + if weight_decay != 1:
      why: with weight_decay 0 or 1 ...

A block matches a survivor of that file and function whose diff removes exactly
the "-" lines and adds exactly the "+" lines (whitespace at the ends ignored).

A rule covers one kind of mutant wherever it occurs: path and function are globs,
"-~" a regular expression for the one line removed and "+~" the line added instead
(with \1, \2 ... from the expression):

    distprop/* *
      -~ (.*)get_array_module\((?!None\))[^()]*\)(.*)
      +~ \1get_array_module(None)\2
      why: ...

A block whose only change line is "any mutant" covers every surviving mutant of the
functions it names: for functions that only choose between ways of computing the
same values (chunk sizes, which of two algorithms), where the reason says why.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mutmut.configuration import reset_config
from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files
from mutmut.utils.format_utils import orig_function_and_class_names_from_key

DETECTED = {"killed", "timeout", "segfault"}
UNDETECTED = {"survived", "no tests", "suspicious"}


@dataclass
class Equivalent:
    path: str  # a glob for rules
    function: str  # a glob for rules
    removed: tuple[str, ...]  # for a rule: one regular expression
    added: tuple[str, ...]  # for a rule: one template
    why: str
    where: str  # line of the equivalents file, for messages
    rule: bool = False
    any_mutant: bool = False
    matched: int = 0

    def matches(self, path: str, function: str, removed: tuple[str, ...], added: tuple[str, ...]) -> bool:
        if not self.rule:
            return (self.path, self.function, self.removed, self.added) == (path, function, removed, added)
        if not (fnmatch.fnmatchcase(path, self.path) and fnmatch.fnmatchcase(function, self.function)):
            return False
        if self.any_mutant:
            return True
        if len(removed) != 1 or len(added) != 1:
            return False
        found = re.fullmatch(self.removed[0], removed[0])
        return bool(found) and found.expand(self.added[0]) == added[0]


@dataclass
class FileScore:
    tried: int = 0
    detected: int = 0
    equivalent: int = 0
    open: list = field(default_factory=list)  # (mutant name, function, diff)

    @property
    def score(self) -> float:
        considered = self.tried - self.equivalent
        return 100.0 * self.detected / considered if considered else 100.0


def read_equivalents(path: Path) -> list[Equivalent]:
    entries, block, start = [], [], 0
    lines = path.read_text().splitlines() + [""]
    for number, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith("#"):
            if not block:
                start = number
            block.append(line)
        elif block:
            entries.append(_parse_block(block, f"{path.name}:{start}"))
            block = []
    return entries


def _parse_block(block: list[str], where: str) -> Equivalent:
    header = block[0].split()
    if len(header) != 2 or block[0][0].isspace():
        raise SystemExit(f"{where}: expected 'path function' on the first line, got {block[0]!r}")
    removed, added, why, rule, any_mutant = [], [], [], False, False
    for line in block[1:]:
        text = line.strip()
        if text == "any mutant":
            rule = any_mutant = True
        elif text.startswith(("-~ ", "+~ ")):
            rule = True
            (removed if text[0] == "-" else added).append(text[3:].strip())
        elif text.startswith("- "):
            removed.append(text[2:].strip())
        elif text.startswith("+ "):
            added.append(text[2:].strip())
        elif text.startswith("why:"):
            why.append(text[4:].strip())
        elif why:
            why.append(text)  # a reason continued on the next line
        else:
            raise SystemExit(f"{where}: lines start with '- ', '+ ' or 'why:', got {text!r}")
    if not why or not (removed or added or any_mutant):
        raise SystemExit(f"{where}: an entry needs '-'/'+' lines (or 'any mutant') and a 'why:'")
    if rule and not any_mutant and (len(removed), len(added)) != (1, 1):
        raise SystemExit(f"{where}: a rule has one '-~' and one '+~' line")
    return Equivalent(header[0], header[1], tuple(removed), tuple(added), " ".join(why), where, rule, any_mutant)


def function_name(mutant: str) -> str:
    name, class_name = orig_function_and_class_names_from_key(mutant)
    return f"{class_name}.{name}" if class_name else name


def changed_lines(diff: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    removed = tuple(line[1:].strip() for line in diff.splitlines()
                    if line.startswith("-") and not line.startswith("---"))
    added = tuple(line[1:].strip() for line in diff.splitlines()
                  if line.startswith("+") and not line.startswith("+++"))
    return removed, added


def score_run(directory: Path, equivalents: list[Equivalent]) -> tuple[dict[str, FileScore], Counter]:
    """Per mutated file, how the mutants of one mutmut run fared."""
    previous = Path.cwd()
    os.chdir(directory)  # mutmut reads its configuration and results from there
    reset_config()
    try:
        scores: dict[str, FileScore] = {}
        statuses: Counter = Counter()
        for path in walk_mutatable_files():
            data = SourceFileMutationData(path=path)
            data.load()
            score = FileScore()
            for mutant, exit_code in sorted(data.exit_code_by_key.items()):
                status = status_by_exit_code[exit_code]
                if status == "not checked":
                    continue  # outside this run's selection of functions
                statuses[status] += 1
                score.tried += 1
                if status in DETECTED:
                    score.detected += 1
                    continue
                diff = get_diff_for_mutant(mutant, path=path)
                removed, added = changed_lines(diff)
                listed = [e for e in equivalents if e.matches(str(path), function_name(mutant), removed, added)]
                for entry in listed:
                    entry.matched += 1
                if listed and status in UNDETECTED:
                    score.equivalent += 1
                else:
                    score.open.append((mutant, status, diff))
            if score.tried:
                scores[str(path)] = score
        return scores, statuses
    finally:
        os.chdir(previous)


def row(name: str, score: FileScore) -> str:
    return (f"{name:48} {score.tried:6} {score.detected:9} {score.equivalent:7} {len(score.open):5} "
            f"{score.score:6.1f}%")


HEADER = f"{'file':48} {'tried':>6} {'detected':>9} {'equiv.':>7} {'open':>5} {'score':>7}"


def add(total: FileScore, score: FileScore) -> None:
    total.tried += score.tried
    total.detected += score.detected
    total.equivalent += score.equivalent
    total.open += score.open


def report_run(directory: Path, equivalents: list[Equivalent]) -> None:
    """One run in full: the table, then every survivor not listed as equivalent."""
    scores, statuses = score_run(directory, equivalents)
    total = FileScore()
    print(f"mutation score, {datetime.date.today().isoformat()}")
    print(HEADER)
    for path, score in sorted(scores.items()):
        print(row(path, score))
        add(total, score)
    print(row("all", total))
    print("statuses: " + ", ".join(f"{status} {count}" for status, count in sorted(statuses.items())))
    for mutant, status, diff in total.open:
        print(f"\n--- {status}: {mutant}\n{diff.rstrip()}")
    stale = [e for e in equivalents if not e.matched and not e.rule and e.path in scores]
    for entry in stale:
        print(f"\nlisted as equivalent but matched no mutant ({entry.where}): {entry.path} {entry.function} "
              f"{entry.removed} -> {entry.added}")


def report_summary(directories: list[Path], equivalents: list[Equivalent]) -> None:
    """One table for several runs, with a total per group (the run's first name:
    functional/conv counts to functional)."""
    groups: dict[str, FileScore] = {}
    print(f"mutation score, {datetime.date.today().isoformat()}")
    print(HEADER)
    for directory in directories:
        scores, _ = score_run(directory, equivalents)
        minutes = directory / "minutes"
        took = f", {minutes.read_text().strip()} min" if minutes.exists() else ""
        sample = directory / "sample"  # tests/mutation.sh with MUTATION_SAMPLE
        took += f", {sample.read_text().strip()}" if sample.exists() else ""
        group = directory.parent.name if directory.parent.name == "functional" else directory.name
        print(f"[{directory.parent.name + '/' if group == 'functional' else ''}{directory.name}{took}]")
        for path, score in sorted(scores.items()):
            print(row("  " + path, score))
            add(groups.setdefault(group, FileScore()), score)
    print("per group:")
    for group, score in groups.items():
        print(row("  " + group, score))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--equivalents", type=Path, required=True)
    parser.add_argument("--summary", action="store_true", help="one table for all the runs given")
    parser.add_argument("runs", type=Path, nargs="+", help="directories where mutmut ran")
    args = parser.parse_args()
    equivalents = read_equivalents(args.equivalents)
    if args.summary:
        report_summary([run.resolve() for run in args.runs], equivalents)
    else:
        for run in args.runs:
            report_run(run.resolve(), equivalents)


if __name__ == "__main__":
    main()
