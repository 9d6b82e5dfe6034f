"""The files of a sweep's output folder (named once: the sweep writes them, the report page reads them)."""

STUDY_FILE = "study.db"  # the default storage: SQLite in the output folder
REPORT_MD, REPORT_JSON, BEST_CONFIG = "sweep_report.md", "sweep_report.json", "best.yaml"  # what `sweep report` writes
