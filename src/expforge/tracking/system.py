"""``tracking.system_metrics=true``: CPU, memory, disk, network and (with NVIDIA's library,
``pip install -e '.[gpu]'``) GPU use of the machine while a run is RUNNING, logged into the run
by MLflow's own system-metrics monitor (``system/cpu_utilization_percentage``, ...; the UI's
"System metrics" tab).

MLflow's monitor samples every ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (10 by
default) and logs nothing for a run that ends sooner: here each run also gets a last sample
at its end, so every run, a trial of a few milliseconds too, records one.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SystemMetrics"]


class SystemMetrics:
    """One MLflow monitor per RUNNING run of a store, started and finished with the run."""

    def __init__(self, uri: str) -> None:
        import logging

        import psutil

        # "Started monitoring system metrics." for every run, and its like: not for a console.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self.uri = uri
        self._monitors: dict[str, Any] = {}
        psutil.cpu_percent()  # its first reading is always 0.0: taken here, not by a run

    def start(self, run_id: str, resumed: bool = False) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        if run_id in self._monitors:
            return
        monitor = SystemMetricsMonitor(run_id, resume_logging=resumed, tracking_uri=self.uri)
        monitor.start()
        self._monitors[run_id] = monitor

    def finish(self, run_id: str) -> None:
        """Stop the run's monitor (before the run ends): the samples since its last log and
        one taken now, as a last step."""
        monitor = self._monitors.pop(run_id, None)
        if monitor is None:
            return
        monitor.finish()
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()

    def close(self) -> None:
        for run_id in list(self._monitors):
            self.finish(run_id)
