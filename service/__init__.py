"""bonn-sweep's service: the HTTP API (``service.api``), the study store, the Ray Jobs client, the study
driver that runs on the cluster, MLflow tracking, the embedded local stack and the ``bonn-sweep`` CLI.

Importing ``service`` (or the API) never imports ``ray``: only ``service.sweep.driver`` (on the cluster) does.
"""
