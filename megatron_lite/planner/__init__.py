"""The planner: memory, communication, bubble and time of a layout from the model config, a cluster
and a workload, without running any of the training code (see README "Planning a layout")."""
