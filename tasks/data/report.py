"""What is wrong with a data set, record by record, in words a user can act on."""

import re
from collections import Counter
from dataclasses import dataclass, field

SHOWN_PER_KIND = 3  # a bad file repeats one mistake thousands of times; a few examples say enough


@dataclass(frozen=True)
class Problem:
    """One thing wrong in one record: where it is, what was found there, and how to fix it."""

    file: str
    line: int | None  # None: the problem is the whole file (or the whole document, for text files)
    field: str  # e.g. "messages[2].role"; "" for the record as a whole
    found: str
    fix: str
    unit: str = "line"  # what `line` counts: "line" in JSON Lines, "row" in tables and datasets

    @property
    def kind(self) -> tuple[str, str]:
        """Problems of one kind differ only in where they are and what was found."""
        return re.sub(r"\[\d+\]", "[]", self.field), self.fix

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file} {self.unit} {self.line}"
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
    num_file_problems: int = 0  # problems of the data set as a whole, which no allowance forgives
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)  # problems per kind
    shown: dict[tuple[str, str], list[Problem]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Nothing at all is wrong."""
        return not self.counts

    def acceptable(self, allow_percentage_invalid: float) -> bool:
        """Trainable once invalid records are skipped: at most that percentage of records invalid (Nova's
        allow_percentage_invalid_samples), at least one valid, and nothing wrong with the data set as a whole."""
        if self.num_file_problems or self.num_invalid == self.num_records:
            return self.ok
        return self.num_invalid * 100 <= allow_percentage_invalid * self.num_records

    def add_record(self, problems: list[Problem]) -> None:
        """Count one record, valid when `problems` is empty."""
        self.num_records += 1
        self.num_invalid += bool(problems)
        for problem in problems:
            self._keep(problem)

    def add_problem(self, problem: Problem) -> None:
        """A problem of the data set as a whole, such as having no records."""
        self.num_file_problems += 1
        self._keep(problem)

    def merge(self, other: "DataReport") -> None:
        """Add the report of a later part of the same data set (a worker's slice), keeping the first problems."""
        self.num_records += other.num_records
        self.num_invalid += other.num_invalid
        self.num_file_problems += other.num_file_problems
        self.counts.update(other.counts)
        for kind, problems in other.shown.items():
            shown = self.shown.setdefault(kind, [])
            shown += problems[: SHOWN_PER_KIND - len(shown)]

    def render(self, allow_percentage_invalid: float = 0.0) -> str:
        """A headline, then the first few problems of each kind, most frequent kind first."""
        if self.ok:
            return f"{self.source}: {self.num_records} valid {self.task_type} records"
        if self.num_file_problems:
            head = f"{self.source} is not valid {self.task_type}"
        else:
            head = f"{self.source}: {self.num_invalid} of {self.num_records} records are not valid {self.task_type}"
            share = f"{self.num_invalid * 100 / self.num_records:.3g}%"
            if self.acceptable(allow_percentage_invalid):
                head = (f"{self.source}: skipped {self.num_invalid} of {self.num_records} records ({share}) that are "
                        f"not valid {self.task_type}, as allow_percentage_invalid={allow_percentage_invalid:g} allows")
            elif allow_percentage_invalid:
                head += f" ({share}, more than allow_percentage_invalid={allow_percentage_invalid:g} allows)"
        lines = [head]
        for kind, count in self.counts.most_common():
            lines += [f"  {problem}" for problem in self.shown[kind]]
            if count > len(self.shown[kind]):
                lines.append(f"  ... and {count - len(self.shown[kind])} more like this")
        return "\n".join(lines)

    def _keep(self, problem: Problem) -> None:
        self.counts[problem.kind] += 1
        shown = self.shown.setdefault(problem.kind, [])
        if len(shown) < SHOWN_PER_KIND:
            shown.append(problem)
