"""Post-hoc EMA (EDM2): power-function EMA profiles, their snapshots and reconstruction; docs/ema.md."""
