"""What is wrong with a data set, record by record, in words a user can act on."""

import re
from collections import Counter
from dataclasses import dataclass, field

SHOWN_PER_KIND = 3  # a bad file repeats one mistake thousands of times; a few examples say enough


@dataclass(frozen=True)
class Problem:
    """One thing wrong in one record: where it is, what was found there, and how to fix it."""

    file: str
    line: int | None  # None: the problem is the whole file
    field: str  # e.g. "messages[2].role"; "" for the record as a whole
    found: str
    fix: str

    @property
    def kind(self) -> tuple[str, str]:
        """Problems of one kind differ only in where they are and what was found."""
        return re.sub(r"\[\d+\]", "[]", self.field), self.fix

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file} line {self.line}"
        if self.field:
            where += f", field {self.field}"
        return f"{where}: found {self.found}; {self.fix}"


@dataclass
class DataReport:
    """Counts and the first few problems of each kind, kept small however large the data set."""

    source: str
    task_type: str
    num_records: int = 0
    num_invalid: int = 0
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)  # problems per kind
    shown: dict[tuple[str, str], list[Problem]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.counts

    def add_record(self, problems: list[Problem]) -> None:
        self.num_records += 1
        self.num_invalid += bool(problems)
        for problem in problems:
            self.add_problem(problem)

    def add_problem(self, problem: Problem) -> None:
        self.counts[problem.kind] += 1
        shown = self.shown.setdefault(problem.kind, [])
        if len(shown) < SHOWN_PER_KIND:
            shown.append(problem)

    def render(self) -> str:
        if self.ok:
            return f"{self.source}: {self.num_records} valid {self.task_type} records"
        if self.num_invalid:
            head = f"{self.source}: {self.num_invalid} of {self.num_records} records are not valid {self.task_type}"
        else:
            head = f"{self.source} is not valid {self.task_type}"
        lines = [head]
        for kind, count in self.counts.most_common():
            lines += [f"  {problem}" for problem in self.shown[kind]]
            if count > len(self.shown[kind]):
                lines.append(f"  ... and {count - len(self.shown[kind])} more like this")
        return "\n".join(lines)
