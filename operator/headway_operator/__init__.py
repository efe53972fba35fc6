"""Headway's control plane: CR parsing, rendering, kopf handlers, config push, autoscaling."""
