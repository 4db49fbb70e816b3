"""Examples of using hpcpipe from outside the package (run them from the repository root)."""
