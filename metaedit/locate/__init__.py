"""Shared machinery of the locate-then-edit methods (ROME, MEMIT, AlphaEdit) and causal tracing:
where the MLPs sit in each architecture (`arch`), where the subject's tokens are (`tokens`), the
second-moment statistics of MLP keys (`stats`), keys and target values (`keys`, `values`) and the
closed-form weight updates (`solve`)."""
