"""An MLflow reporter for the harness: each job becomes an MLflow run.

Installed with the harness (entry point ``mlflow`` in the group ``harness``) but idle until asked
for; MLflow itself is an optional extra (``pip install 'harness-ad[mlflow]'``) and is imported only
when a run reports. See :mod:`harness_mlflow.plugin` for how to switch it on and
:mod:`harness_mlflow.reporter` for what each run holds.
"""
