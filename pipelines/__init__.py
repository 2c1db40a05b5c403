"""What runs in which order: the workflow DAG, the runner, the CLI and the config schema."""
