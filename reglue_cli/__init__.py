"""The `reglue` command line (joins the reglue and evaluation libraries)."""
