"""The study driver: the program that runs one study on the cluster as a Ray Job (``python -m
service.sweep.driver``). The only part of ``service`` that imports ``ray`` (and Optuna's Tune bridge)
-- ``service.launch.ray_loopback`` aside.

``driver`` (entry point and the steps of a run) -> ``tuner`` (Tuner build / restore), ``searcher``
(Optuna under Tune), ``monitor`` (progress lines, failure limit, time budget), ``mlflow_callback``
(a run per trial) with its ``outbox`` (offline queue, spool), ``registry`` (the model);
``stop_reasons`` is the vocabulary they share; ``db_retry`` lets Optuna's storage ride out a database
restart."""
