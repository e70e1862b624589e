"""The sweep flow: many TrainConfigs, concurrently, as child runs of one MLflow parent run.

    cnnflow run sweep --space normalization=batchnorm,groupnorm --space batch_size=4,16,64

- ``flow``: the flow itself, in the order it works.
- ``resume``: the sweep's memory in MLflow: its parent run, found again by name,
  and the trials already finished there.
- ``lease``: one live process per sweep name (a lease held in the parent's tags).
- ``executors``: where the trials train: worker processes (the default), task
  threads, or a Dask cluster.
- ``results``: a trial's result, its run name, and the best trial.
- ``summary``: what the sweep leaves on its parent run and in Prefect: the trial
  table, the comparison figure, the totals and a study's report.
"""

from .flow import SweepReport, TrialResult, sweep

__all__ = ["SweepReport", "TrialResult", "sweep"]
