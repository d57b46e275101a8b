"""Safe writes: one atomic-write primitive, the no-clobber rules, the run-directory lock, and
one-line explanations of storage faults (full disk, read-only, permissions, I/O errors)."""
