"""What every program of bonn-sweep shares: the StudySpec (``spec``), the job payload the API hands the
driver (``payload``), the study store (``store``, its Alembic ``migrations``), database URLs and one
PostgreSQL server for the three stores (``db``), settings, data paths, API keys (``auth``), the Ray Jobs
client over HTTP (``jobs``; no ``import ray``), the MLflow parent run's one owner (``parent_run``) and the
one MLflow call policy (``mlflow_calls``), the study's plots (``study_plots``, Optuna's visualization) and the
study report (``report``, for the API and the CLI). Imports nothing from ``service.api``, ``service.sweep`` or
``service.launch``."""
