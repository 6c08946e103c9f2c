"""Login side (configs/ composition, run directories, submission, status) and in-job side (one Ray
cluster per job) of opd. Nothing here imports torch or verl at import time: login nodes often have neither.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[3]  # the checkout: configs/, jobs/, containers/
CONFIGS = str(REPO / "configs")
JOBS_FILE = "jobs.tsv"  # in a sweep or run directory: job id, run directory, sweep point (one line per job)
REFUSED_FILE = "refused.txt"  # in a sweep directory: why the launcher refused to submit


class SubmissionError(ValueError):
    """A run that must not be queued; the message names the problem and the fix."""
