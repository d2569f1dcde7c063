"""The study driver: the program that runs one study on the cluster as a Ray Job (``python -m
service.sweep.driver``). The only part of ``service`` that imports ``ray`` (and Optuna's Tune bridge)."""
