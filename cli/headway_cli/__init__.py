"""The ``headway`` command: the one place that may reach both the operator and the sidecar."""
