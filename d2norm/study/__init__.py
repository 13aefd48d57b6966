"""The small-batch study: AP against images per process at a fixed total batch, every norm.

* :mod:`.settings`: the grid, the schedule, per-norm rules (CBN window, MABN buffer, ...);
* :mod:`.run`: one run in P gloo processes, many runs side by side, resumable JSONL;
* :mod:`.records`: the JSONL records; :mod:`.stats`: means, paired 95% t-intervals;
* :mod:`.report`: Markdown tables and the plot.

``tools/small_batch_study.py`` is the command line.
"""

from .records import append_record, load_records, pending_runs, run_key
from .report import write_plot, write_report
from .run import execute_run, run_grid, run_or_report
from .settings import FULL, QUICK, StudySettings, available_norms, build_cfg, plan, settings_id
from .stats import aggregate, paired_difference, t_quantile

__all__ = [
    "StudySettings",
    "QUICK",
    "FULL",
    "available_norms",
    "build_cfg",
    "plan",
    "settings_id",
    "run_grid",
    "run_or_report",
    "execute_run",
    "append_record",
    "load_records",
    "pending_runs",
    "run_key",
    "aggregate",
    "paired_difference",
    "t_quantile",
    "write_report",
    "write_plot",
]
