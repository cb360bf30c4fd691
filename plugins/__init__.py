"""camkit's built-in CAM methods, one module per method, loaded through entry points."""
