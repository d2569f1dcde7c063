"""The operator's programs: the ``bonn-sweep`` CLI and the embedded stack (local Ray, MLflow, API) it
starts and stops by pid.

The CLI: cli.py (arguments, dispatch, exit codes) -> stack_commands.py (up / down / status / demo),
study_commands.py (studies ...), key_commands.py (keys ...); api_client.py (the HTTP client, API URL
and key), display.py (what is printed), cli_errors.py (:class:`CliError` and error lines).
``spaces ...`` is handed to search_spaces/cli.py.

The stack: stack.py (start_stack / stop_stack) -> ray_cluster.py (head, extra nodes; ray_loopback.py
is the ``ray start`` of an extra node), mlflow_server.py, api_server.py; stack_record.py (the
``stack.json`` record), ports.py, processes.py (spawn, health waits, stopping by pid and start time);
watchdog.py (stops a stack whose starter died); gpu.py (visible GPUs, the MPS daemon of ``up --mps``),
gpu_node.py (the compose GPU worker's command: ``ray start`` inside an MPS daemon of its own).
"""
