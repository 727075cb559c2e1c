"""How the process runs: CPU thread budgets and progress lines."""
