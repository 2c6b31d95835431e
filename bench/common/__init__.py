"""What several bench programs share: the fast replaying upstream and its capture, the HTTP client,
the bench users' policy, the workloads, process and machine readings, quantiles and tool installs."""
