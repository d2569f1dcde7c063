"""The operator's programs: the ``bonn-sweep`` CLI and the embedded stack (local Ray, MLflow, API) it
starts and stops by pid."""
