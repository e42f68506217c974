"""``doit report``: one page per project for choosing a quantization by size, quality and speed.

Everything comes from artifacts.lock, so a report says nothing the lock does not record, and the same lock gives
the same page: ``REPORT.md`` with a table of every configured artifact (size, KL with its standard error, top-1
agreement, perplexity change, prefill and decode speed, gate), a size-against-KL plot per model (colour by
backend, marker by precision) and the per-position KL of the artifacts whose error grows along the window.
The plots are PNGs drawn by matplotlib's Agg renderer without its version stamp, so the bytes depend on the
figures and the matplotlib version alone. The release bundle carries the report of the artifacts it releases.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import reading
from .backends import PRECISIONS
from .errors import ConfigError
from .fidelity import checked, gate
from .project import Project
from .records import Fidelity, LockEntry
from .store import files_under, staged

PAGE = "REPORT.md"
TITLE = "# Fidelity, size and speed of "  # how every REPORT.md phibuild writes begins
DRIFT_PLOT = "kl-by-position.png"
# An artifact drifts when the KL over the last quarter of the window is this many times the first quarter's and
# above the floor; below the floor, the ratio of two tiny numbers is rounding noise (fp32 measures about 1e-8).
DRIFT_RATIO = 4.0
DRIFT_FLOOR = 1e-4
KL_FLOOR = 1e-10  # a KL of exactly zero, drawn on the logarithmic axis
COLOURS = {"onnx": "tab:blue", "gguf": "tab:orange", "openvino": "tab:green", "mlx": "tab:red"}
MARKERS = {"int4": "o", "int8": "s", "fp16": "^", "fp32": "D"}
BACKEND_ORDER = tuple(COLOURS)


@dataclass(frozen=True)
class Row:
    """One artifact as the report shows it."""

    name: str
    model: str
    backend: str
    precision: str
    size: int  # bytes, all files
    fidelity: Fidelity | None
    gate: str | None  # why it fails its gate, None when it passes or was not measured

    @classmethod
    def of(cls, project: Project, name: str, entry: LockEntry) -> Row:
        if entry.fidelity:
            checked(project, name, entry.fidelity)
        failed = gate(project, project.target(name), entry.fidelity) if entry.fidelity else None
        return cls(name, entry.model, entry.parts.backend, entry.parts.precision,
                   sum(file.size for file in entry.files.values()), entry.fidelity, failed)

    @property
    def measured(self) -> bool:
        return self.fidelity is not None and self.fidelity.not_run is None

    def drifts(self) -> bool:
        record = self.fidelity
        return (self.measured and len(record.kl_by_position) > 1 and record.kl_late >= DRIFT_FLOOR
                and record.kl_late >= DRIFT_RATIO * record.kl_early)


def rows(project: Project, names: list[str] | None = None) -> list[Row]:
    """The rows of the configured targets the lock has (or of ``names``), by model, backend and precision."""
    lock = project.lock.read().artifacts
    if names is None:
        names = [target.name for target in project.targets()[0] if target.name in lock]
    found = [Row.of(project, name, lock[name]) for name in names]
    return sorted(found, key=lambda row: (row.model, _index(BACKEND_ORDER, row.backend),
                                          _index(PRECISIONS, row.precision)))


def _index(order: tuple[str, ...], item: str) -> int:
    return order.index(item) if item in order else len(order)


def write(project: Project, directory: Path) -> list[Row]:
    """The project's report in ``directory``, replaced as a whole."""
    found = rows(project)
    with staged(directory, _not_reported) as staging:
        render(project, found, staging)
    return found


def _not_reported(directory: Path) -> set[str]:
    """What a report directory holds beyond a report phibuild wrote: its REPORT.md (by its title) and the plots
    that page shows, nothing else."""
    files = files_under(directory)
    try:
        page = reading.read_text(directory / PAGE, "model card")
    except (OSError, reading.Unreadable):
        return files
    if not page.startswith(TITLE):
        return files
    return {name for name in files if name != PAGE and f"]({name})" not in page}


def render(project: Project, found: list[Row], directory: Path) -> None:
    """REPORT.md and its plots for ``found``, written into ``directory``."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("the report's plots need matplotlib: pip install 'phibuild[report]'") from None
    plots = {}
    for model in sorted({row.model for row in found}):
        measured = [row for row in found if row.model == model and row.measured]
        if measured:
            plots[model] = f"size-kl-{model}.png"
            _size_plot(Figure, model, measured, directory / plots[model])
    drifting = [row for row in found if row.drifts()]
    if drifting:
        _drift_plot(Figure, drifting, project.config.eval_settings()[2], directory / DRIFT_PLOT)
    (directory / PAGE).write_text(_page(project, found, plots, drifting))


def _page(project: Project, found: list[Row], plots: dict[str, str], drifting: list[Row]) -> str:
    _, windows, length = project.config.eval_settings()
    measured = [row for row in found if row.measured]
    lines = [f"{TITLE}{len(found)} artifacts", "",
             f"Each artifact is measured in its own runtime, with that runtime's defaults, against its source model "
             f"in float32 transformers, over held-out text ({windows} windows of {length} tokens in this project's "
             "settings; the Tokens column says how many each measurement used). `doit fidelity` measures, "
             "`doit report` writes this page from artifacts.lock.", "",
             "- **KL**: mean KL(reference ‖ artifact) of the next-token distributions, nats per token, ± its standard "
             "error (positions taken as independent: a lower bound). 0 is identical.",
             "- **Top-1**: how often the artifact's most likely next token is the reference's.",
             "- **Δppl**: the change of perplexity on the text against the reference's.",
             "- **Prefill** and **decode**: tokens per second on the machine that measured it (informational; "
             "another machine differs).",
             "- **Gate**: the project's fidelity thresholds for the precision (`[tool.phibuild.gates]`).", "",
             "| Model | Backend | Precision | Size (MiB) | KL (nats/token) | Top-1 | Δppl | Tokens | Prefill tok/s "
             "| Decode tok/s | Gate |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|"]
    for row in found:
        lines.append(f"| {row.model} | {row.backend} | {row.precision} | {row.size / 2**20:.1f} | "
                     + _figures(row) + " |")
    cost: dict[str, float] = {}
    for row in measured:
        cost[row.backend] = cost.get(row.backend, 0.0) + row.fidelity.tokens / row.fidelity.prefill_tps
    if cost:
        spent = ", ".join(f"{backend} {seconds:.1f} s" for backend, seconds in sorted(cost.items()))
        lines += ["", f"Evaluation time of the {len(measured)} measured artifacts, their tokens at their prefill "
                      f"speed: {sum(cost.values()):.1f} s ({spent}). Fewer tokens cost less and widen the standard "
                      "error (`eval_windows`, `eval_length`)."]
    runtimes = sorted({(row.backend, row.fidelity.runtime) for row in measured})
    if runtimes:
        lines += ["", "Runtimes, with the settings they ran with:", ""]
        lines += [f"- {backend}: {runtime}" for backend, runtime in runtimes]
    lines += ["", "## Size against KL", "",
              "Lower left is better: smaller and closer to the source. Colour is the backend, the marker the "
              "precision; KL is on a logarithmic axis.", ""]
    lines += [f"![{model}: size against KL]({plot})" for model, plot in plots.items()] or ["Nothing measured yet."]
    lines += ["", "## KL along the window", ""]
    if drifting:
        lines += [f"These artifacts' KL over the last quarter of the window is at least {DRIFT_RATIO:g} times the "
                  "first quarter's: their error grows with the position, and longer contexts than measured are "
                  "likely worse.", "", f"![KL by position]({DRIFT_PLOT})", ""]
        lines += [f"- {row.name}: first quarter {row.fidelity.kl_early:.3g}, last {row.fidelity.kl_late:.3g}"
                  for row in drifting]
    else:
        lines.append(f"No artifact's KL grows along the window (last quarter under {DRIFT_RATIO:g} times the first, "
                     f"or under {DRIFT_FLOOR:g}).")
    return "\n".join(lines) + "\n"


def _figures(row: Row) -> str:
    record = row.fidelity
    if record is None:
        return "not measured (`doit fidelity`) | | | | | | "
    if record.not_run is not None:
        return f"not run here: {record.not_run} | | | | | | "
    change = (record.ppl / record.ppl_reference - 1) if record.ppl_reference else 0.0
    return (f"{record.kl:.3g} ± {record.kl_se:.2g} | {record.top1:.1%} | {change:+.1%} | {record.tokens} | "
            f"{_speed(record.prefill_tps)} | {_speed(record.decode_tps)} | "
            + (f"**fails**: {row.gate}" if row.gate else "passes"))


def _speed(tokens_per_second: float) -> str:
    if not tokens_per_second:
        return "–"  # measured before decoding was
    return f"{tokens_per_second:,.0f}" if tokens_per_second >= 100 else f"{tokens_per_second:.3g}"


def _size_plot(Figure, model: str, found: list[Row], path: Path) -> None:
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    for row in found:
        axes.scatter(row.size / 2**20, max(row.fidelity.kl, KL_FLOOR), c=COLOURS.get(row.backend, "tab:gray"),
                     marker=MARKERS.get(row.precision, "x"), s=50)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("size (MiB)")
    axes.set_ylabel("mean KL (nats/token)")
    axes.set_title(f"{model}: size against KL")
    axes.grid(True, which="major", alpha=0.3)
    backends = [b for b in BACKEND_ORDER if any(row.backend == b for row in found)]
    precisions = [p for p in PRECISIONS if any(row.precision == p for row in found)]
    handles = [axes.scatter([], [], c=COLOURS[b], marker="o", label=b) for b in backends]
    handles += [axes.scatter([], [], c="black", marker=MARKERS[p], label=p) for p in precisions]
    axes.legend(handles=handles, fontsize="small", loc="best")
    _save(figure, path)


def _drift_plot(Figure, found: list[Row], length: int, path: Path) -> None:
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    for row in found:
        curve = row.fidelity.kl_by_position
        share = [(index + 0.5) / len(curve) for index in range(len(curve))]
        axes.plot(share, [max(value, KL_FLOOR) for value in curve], c=COLOURS.get(row.backend, "tab:gray"),
                  marker=MARKERS.get(row.precision, "x"), label=row.name)
    axes.set_yscale("log")
    axes.set_xlabel(f"position in the window (share of {length} tokens)")
    axes.set_ylabel("mean KL (nats/token)")
    axes.set_title("KL along the window")
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize="small", loc="best")
    _save(figure, path)


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100, metadata={"Software": None})
