"""Headway's data plane: the sidecar in front of each model server, and its simulator."""
