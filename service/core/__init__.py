"""What every program of bonn-sweep shares: the StudySpec, the study store, settings, data paths, API keys,
and the Ray Jobs client (over HTTP; no ``import ray``). Imports nothing from ``service.api``,
``service.sweep`` or ``service.launch``."""
