"""Re-execute policies on real GPUs with real copies and a budgeted expert cache."""
